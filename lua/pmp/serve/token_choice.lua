--- pmp.serve.token_choice: each running sequence's next token from its row of logits.
---   ids, logprobs = token_choice.choose(logits [N, V], sequences)
--- sequences[n].sampling = { temperature (0: greedy), top_k (0: off), top_p (1: off), repetition_penalty
--- (1: off), logprobs (bool) }, sequences[n].generator its pmp.Generator and sequences[n].tokens the ids it
--- has seen (prompt and generated, for the penalty). logprobs[n] is the chosen token's log-probability
--- under the penalised, temperature-scaled distribution before top-k/top-p (as pmp.generate reports
--- it), or nil when the sequence did not ask for it.
---
--- Every token is chosen by pmp.sample, the op pmp.generate uses, each sequence drawing from its own
--- generator: a sequence's tokens depend on its seed and logits only, not on what runs beside it. The
--- op takes one set of settings per call, so rows are chosen in groups of identical settings.
local tensor = require 'pmp.tensor'
local sampling = require 'pmp.sampling'

local M = {}

local function settings_key(s)
  return string.format('%.17g %d %.17g %.17g', s.temperature, s.top_k, s.top_p, s.repetition_penalty)
end

-- The sequences' row numbers (1-based) grouped by identical settings, groups in order of first row.
local function groups_of(sequences)
  local groups, by_key = {}, {}
  for n, seq in ipairs(sequences) do
    local key = settings_key(seq.sampling)
    local group = by_key[key]
    if not group then
      group = { settings = seq.sampling, rows = {} }
      by_key[key], groups[#groups + 1] = group, group
    end
    group.rows[#group.rows + 1] = n
  end
  return groups
end

function M.choose(logits, sequences)
  local ids, logprobs = {}, {}
  for _, group in ipairs(groups_of(sequences)) do
    local s, rows = group.settings, group.rows
    local group_logits = logits
    if #rows < #sequences then
      local zero_based = {}
      for k, n in ipairs(rows) do zero_based[k] = n - 1 end
      group_logits = logits:index_select(1, tensor.tensor(zero_based, { dtype = 'i64' }))
    end
    local generators, seen = {}, nil
    for k, n in ipairs(rows) do generators[k] = sequences[n].generator end
    if s.repetition_penalty ~= 1 then
      seen = {}
      for k, n in ipairs(rows) do seen[k] = sequences[n].tokens end
    end
    local chosen, chosen_logprobs = sampling.sample(group_logits, { temperature = s.temperature, top_k = s.top_k,
      top_p = s.top_p, repetition_penalty = s.repetition_penalty, seen = seen, generator = generators })
    chosen, chosen_logprobs = chosen:totable(), chosen_logprobs:totable()
    for k, n in ipairs(rows) do
      ids[n] = chosen[k]
      if sequences[n].sampling.logprobs then logprobs[n] = chosen_logprobs[k] end
    end
  end
  return ids, logprobs
end

return M
