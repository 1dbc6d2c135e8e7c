--- Pre-tokenized supervised fine-tuning data: two Megatron indexed datasets with one document per
--- sample, PREFIX_text_document (the token ids) and PREFIX_loss_mask_document (1 where the token is
--- trained, 0 elsewhere, aligned with the ids), as `pmp tools/preprocess_data.lua --sft` writes them and
--- `recipes/sft.lua --data-path PREFIX` reads them.
local indexed = require 'pmp.data.indexed'

local M = {}

M.KEYS = { 'text', 'loss_mask' }

--- The two datasets' prefixes: ids, mask.
function M.prefixes(prefix) return prefix .. '_text_document', prefix .. '_loss_mask_document' end

--- Whether both datasets of prefix exist.
function M.exists(prefix)
  local text, mask = M.prefixes(prefix)
  return indexed.exists(text) and indexed.exists(mask)
end

--- The mask document of a sample ({ids, mask = booleans}): 1 and 0 per token.
function M.mask_document(sample)
  local out = {}
  for k, m in ipairs(sample.mask) do out[k] = m and 1 or 0 end
  return out
end

--- The samples ({ids, mask}) of prefix and the number of trained tokens. Datasets whose documents do
--- not line up, or a mask value other than 0 and 1, are an error naming the document.
function M.read(prefix)
  local text_prefix, mask_prefix = M.prefixes(prefix)
  local text, mask = indexed.open(text_prefix), indexed.open(mask_prefix)
  local function fail(message)
    text:close()
    mask:close()
    error(prefix .. ': ' .. message, 0)
  end
  if #text ~= #mask then
    fail(string.format('%s holds %d sequences but %s holds %d', text_prefix, #text, mask_prefix, #mask))
  end
  local samples, trained = {}, 0
  for i = 0, #text - 1 do
    local ids, flags = text:totable(i), mask:totable(i)
    if #ids ~= #flags then
      fail(string.format('sample %d has %d tokens but %d loss-mask entries', i, #ids, #flags))
    end
    local sample = { ids = ids, mask = {} }
    for k, f in ipairs(flags) do
      if f ~= 0 and f ~= 1 then fail(string.format('sample %d: loss-mask entry %d is %d (expected 0 or 1)', i, k, f)) end
      sample.mask[k] = f == 1
      if f == 1 then trained = trained + 1 end
    end
    samples[#samples + 1] = sample
  end
  text:close()
  mask:close()
  if #samples == 0 then error(prefix .. ' holds no samples', 0) end
  return samples, trained
end

return M
