--- Document boundaries inside pretraining samples, as Megatron's --eod-mask-loss, --reset-position-ids
--- and --reset-attention-mask draw them: a document ends with its end-of-document token, so the token
--- after it starts the next one.
local tensor = require 'pmp.tensor'

local M = {}

--- ids, targets [B, T] i64 -> targets (with -100 where the input is the EOD token, under
--- options.eod_mask_loss) and the GPTModel forward options {positions (restarting at 0 after each EOD,
--- reset_position_ids), first_key (the 0-based index of each query's document start,
--- reset_attention_mask)}, or nil when neither applies.
function M.apply(ids, targets, eod, options)
  local rows, target_rows = ids:totable(), targets:totable()
  local positions, first_key = {}, {}
  for b, row in ipairs(rows) do
    positions[b], first_key[b] = {}, {}
    local start = 0   -- 0-based index of the current document's first token
    for t, id in ipairs(row) do
      positions[b][t] = t - 1 - start
      first_key[b][t] = start
      if id == eod then
        if options.eod_mask_loss then target_rows[b][t] = -100 end
        start = t
      end
    end
  end
  if options.eod_mask_loss then targets = tensor.tensor(target_rows, { dtype = 'i64' }) end
  local forward = {}
  if options.reset_position_ids then forward.positions = tensor.tensor(positions, { dtype = 'i64' }) end
  if options.reset_attention_mask then forward.first_key = tensor.tensor(first_key, { dtype = 'i64' }) end
  return targets, next(forward) and forward or nil
end

return M
