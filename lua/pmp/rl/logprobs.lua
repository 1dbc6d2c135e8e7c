--- What a model says about given sequences: per-token log-probs (policies) and last-token scores
--- (reward models and critics with a score head).
local tensor = require 'pmp.tensor'
local F = require 'pmp.nn.functional'

local M = {}

local function as_ids(ids, who)
  if tensor.is_tensor(ids) then return ids:dim() == 2 and ids or error(who .. ': ids must be [B, T]', 3) end
  if type(ids) == 'table' and type(ids[1]) == 'table' then return tensor.tensor(ids, { dtype = 'i64' }) end
  error(who .. ': ids must be an i64 tensor [B, T] or a list of equal-length id lists', 3)
end

--- ids [B, T] (0-based token ids), mask [B, T] -> log p(ids[:, t] | ids[:, < t]) [B, T], 0 where mask is 0
--- and at t = 1 (nothing predicts the first token), with autograd through the model.
--- opts.temperature divides the logits first (to match a sampler's distribution); opts.entropy = true
--- also returns the per-token entropy of the predicted distributions [B, T] (no autograd, 0 off-mask).
function M.sequence_logprobs(model, ids, mask, opts)
  opts = opts or {}
  ids = as_ids(ids, 'pmp.rl.sequence_logprobs')
  local B, T = ids:size(1), ids:size(2)
  if T < 2 then error('pmp.rl.sequence_logprobs: sequences need at least 2 tokens', 2) end
  local logits = model(ids):narrow(2, 1, T - 1)
  if logits.dtype == 'bf16' or logits.dtype == 'f16' then logits = logits:float() end   -- log-softmax in f32
  if opts.temperature and opts.temperature ~= 1 then logits = logits / opts.temperature end
  local nll = F.cross_entropy(logits, ids:narrow(2, 2, T - 1):contiguous(), { reduction = 'none' })
  local first = tensor.zeros({ B, 1 }, { dtype = nll.dtype })
  local logp = tensor.cat({ first, -nll }, 2) * mask
  if not opts.entropy then return logp end
  local entropy = require('pmp').no_grad(function()
    local log_p = logits:float():log_softmax(-1)
    local per_token = -(log_p:exp() * log_p):sum(-1)
    return tensor.cat({ first:float(), per_token }, 2) * mask
  end)
  return logp, entropy
end

--- values [B, T] of a score-head model (pmp.models: head = 'score') at each row's last token -> [B].
--- `last` is either a pad id (the rightmost token that is not it, as transformers' sequence
--- classification picks) or a list of B 1-based positions.
function M.sequence_scores(model, ids, last)
  ids = as_ids(ids, 'pmp.rl.sequence_scores')
  local B, T = ids:size(1), ids:size(2)
  local positions = last
  if type(last) == 'number' then
    local rows = ids:totable()
    positions = {}
    for b = 1, B do
      for t = T, 1, -1 do
        if rows[b][t] ~= last then positions[b] = t break end
      end
      if not positions[b] then error('pmp.rl.sequence_scores: row ' .. b .. ' holds only padding', 2) end
    end
  elseif type(last) ~= 'table' or #last ~= B then
    error('pmp.rl.sequence_scores: last must be a pad id or a list of ' .. B .. ' positions', 2)
  end
  local pick = {}
  for b = 1, B do
    local p = positions[b]
    if type(p) ~= 'number' or p < 1 or p > T then error('pmp.rl.sequence_scores: position ' .. tostring(p) .. ' of row ' .. b .. ' is outside 1..' .. T, 2) end
    pick[b] = {}
    for t = 1, T do pick[b][t] = t == p and 1 or 0 end
  end
  local values = model(ids)
  return (values * tensor.tensor(pick, { dtype = values.dtype })):sum(2)
end

return M
