--- Batches of prompt + answer token lists as the tensors the pmp.rl functions take.
local tensor = require 'pmp.tensor'

local M = {}

--- rows: list of { prompt_ids, answer_ids } -> { ids [B, T] i64 (right-padded with pad_id), mask [B, T]
--- f32 (1 on answer tokens), last = { B 1-based positions of each row's last token } }. Rows longer than
--- max_length are cut at their end.
function M.collate(rows, pad_id, max_length)
  local T = 0
  for _, r in ipairs(rows) do T = math.max(T, #r[1] + #r[2]) end
  if max_length then T = math.min(T, max_length) end
  local ids, mask, last = {}, {}, {}
  for b, r in ipairs(rows) do
    ids[b], mask[b] = {}, {}
    local n = 0
    for part = 1, 2 do
      for _, id in ipairs(r[part]) do
        if n < T then
          n = n + 1
          ids[b][n], mask[b][n] = id, part == 2 and 1 or 0
        end
      end
    end
    last[b] = n
    for t = n + 1, T do ids[b][t], mask[b][t] = pad_id or 0, 0 end
  end
  return { ids = tensor.tensor(ids, { dtype = 'i64' }), mask = tensor.tensor(mask, { dtype = 'f32' }), last = last }
end

--- The rows of a collated batch picked by a list of 1-based indices.
function M.select(batch, indices)
  local index = tensor.tensor(indices, { dtype = 'i64' }) - 1
  local last = {}
  for k, i in ipairs(indices) do last[k] = batch.last[i] end
  return { ids = batch.ids:index_select(1, index), mask = batch.mask:index_select(1, index), last = last }
end

return M
