--- pmp.serve.token_choice: each running sequence's next token from its row of logits.
---   ids, logprobs = token_choice.choose(logits [N, V], sequences)
--- sequences[n].sampling = { temperature (0: greedy), top_k (0: off), top_p (1: off), logprobs (bool) } and
--- sequences[n].random a pmp.serve.random_stream (read only when sampling). logprobs[n] is the chosen
--- token's log-probability under the temperature-scaled distribution before top-k/top-p (as
--- pmp.generate reports it), or nil when the sequence did not ask for it.
---
--- This is the one place the engine picks tokens: greedy rows take the argmax on the engine; sampled rows
--- come to Lua (to be replaced by a sampling op on the engine).
local tensor = require 'pmp.tensor'

local M = {}

-- Tokens this far below the best logit carry < 1e-17 of the probability mass: never sampled.
local NEGLIGIBLE = 40

-- One draw from softmax(row) restricted to the top_k most likely tokens and then to the smallest set
-- whose probability reaches top_p; row holds temperature-scaled logits (a Lua list, ids 0-based).
local function sample(row, top_k, top_p, random)
  local peak = -math.huge
  for _, v in ipairs(row) do if v > peak then peak = v end end
  local order = {}
  for k = 1, #row do
    if row[k] >= peak - NEGLIGIBLE then order[#order + 1] = k end
  end
  table.sort(order, function(a, b) return row[a] > row[b] or (row[a] == row[b] and a < b) end)
  local keep = #order
  if top_k > 0 and top_k < keep then keep = top_k end
  local weights, total = {}, 0
  for k = 1, keep do
    weights[k] = math.exp(row[order[k]] - peak)
    total = total + weights[k]
  end
  if top_p < 1 then
    local mass = 0
    for k = 1, keep do
      mass = mass + weights[k] / total
      if mass >= top_p then keep = k break end
    end
    total = 0
    for k = 1, keep do total = total + weights[k] end
  end
  local r = random:uniform() * total
  for k = 1, keep do
    r = r - weights[k]
    if r <= 0 then return order[k] - 1 end
  end
  return order[keep] - 1
end

function M.choose(logits, sequences)
  local greedy = logits:argmax(2):totable()
  local ids, logprobs = {}, {}
  local any_logprobs = false
  for n, seq in ipairs(sequences) do
    local s = seq.sampling
    if s.temperature > 0 then
      local row = (logits:select(1, n):double() / s.temperature):totable()
      ids[n] = sample(row, s.top_k, s.top_p, seq.random)
    else
      ids[n] = greedy[n]
    end
    any_logprobs = any_logprobs or s.logprobs
  end
  if any_logprobs then
    local scale = {}
    for n, seq in ipairs(sequences) do
      local t = seq.sampling.temperature
      scale[n] = { t > 0 and 1 / t or 1 }
    end
    local scaled = logits:double() * tensor.tensor(scale, { dtype = 'f64' })
    local picked = scaled:log_softmax(2):gather(2, tensor.tensor(ids, { dtype = 'i64' }):view(#ids, 1)):totable()
    for n, seq in ipairs(sequences) do
      if seq.sampling.logprobs then logprobs[n] = picked[n][1] end
    end
  end
  return ids, logprobs
end

return M
