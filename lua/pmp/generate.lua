--- pmp.generate(model, prompts, options): batched text generation with a KV cache.
---
---   prompts: a list of token-id lists (0-based ids, any lengths) or an i64 tensor [B, T]
---   options: max_new_tokens (32), temperature (0 = greedy), top_k (0 = off), top_p (1 = off),
---            repetition_penalty (1 = off), eos_ids ({}), stop ({strings}, needs tokenizer),
---            tokenizer, seed (seeds the default generator), generator (a pmp.Generator for all rows, or
---            a list of one per prompt, drawn from instead of the default generator), return_logprobs
---            (false), pad_id (0)
---   returns: one table per prompt: { tokens = {generated ids}, logprobs = {...} (when asked),
---            finish_reason = 'eos' | 'stop' | 'length', text = (when a tokenizer is given) }
--
-- Prompts of different lengths are left-padded: each row counts its own positions and never attends
-- to its padding. Log-probs are those of the sampled tokens under the temperature-scaled model
-- distribution before top-k/top-p filtering (what PPO needs to compare policies). Tokens are chosen on
-- the engine (pmp.sample): only the chosen ids (and log-probs) come back to Lua each step.
local tensor = require 'pmp.tensor'
local sampling = require 'pmp.sampling'

local function prompts_as_lists(prompts)
  if tensor.is_tensor(prompts) then return prompts:totable() end
  if type(prompts) ~= 'table' or #prompts == 0 then error('generate: prompts must be a non-empty list of id lists or a tensor', 3) end
  if type(prompts[1]) == 'number' then return { prompts } end
  return prompts
end

-- Left-pads the prompts to the longest: the ids, each row's positions (counted from its first token)
-- and its number of padding keys.
local function left_pad(lists, pad_id)
  local longest = 0
  for b, ids in ipairs(lists) do
    if #ids == 0 then error('generate: prompt ' .. b .. ' is empty', 3) end
    longest = math.max(longest, #ids)
  end
  local padded, positions, first_key = {}, {}, {}
  for b, ids in ipairs(lists) do
    local pad = longest - #ids
    padded[b], positions[b] = {}, {}
    for t = 1, longest do
      padded[b][t] = t > pad and ids[t - pad] or pad_id
      positions[b][t] = math.max(t - 1 - pad, 0)
    end
    first_key[b] = pad
  end
  return padded, positions, first_key
end

-- Records a row's chosen token and returns why it ends the row ('eos', 'stop'), or nil.
local function record(result, id, logprob, eos, options)
  result.tokens[#result.tokens + 1] = id
  if result.logprobs then result.logprobs[#result.logprobs + 1] = logprob end
  if eos[id] then return 'eos' end
  if options.stop then
    local text = options.tokenizer:decode(result.tokens)
    for _, s in ipairs(options.stop) do
      if text:find(s, 1, true) then return 'stop' end
    end
  end
  return nil
end

-- The ids each row has seen, for the repetition penalty: its prompt, then room for max_new tokens
-- (-1, which pmp.sample skips) that the decode loop fills column by column.
local function seen_ids(lists, longest, max_new)
  local rows = {}
  for b, ids in ipairs(lists) do
    rows[b] = {}
    for s = 1, longest + max_new do rows[b][s] = ids[s] or -1 end
  end
  return tensor.tensor(rows, { dtype = 'i64' })
end

-- The rows still generating: all of them as they are, or those rows of the logits, seen ids and
-- generators, so that finished rows draw nothing.
local function active_rows(active, B, last, seen, generator)
  if #active == B then return last, seen, generator end
  local zero_based = {}
  for k, b in ipairs(active) do zero_based[k] = b - 1 end
  local index = tensor.tensor(zero_based, { dtype = 'i64' })
  local generators = generator
  if type(generator) == 'table' and not sampling.is_generator(generator) then
    generators = {}
    for k, b in ipairs(active) do generators[k] = generator[b] end
  end
  return last:index_select(1, index), seen and seen:index_select(1, index), generators
end

-- Each result's text, cut before the stop string that ended it.
local function add_texts(results, tokenizer, stop)
  for _, result in ipairs(results) do
    result.text = tokenizer:decode(result.tokens)
    if result.finish_reason == 'stop' then
      for _, s in ipairs(stop) do
        local at = result.text:find(s, 1, true)
        if at then result.text = result.text:sub(1, at - 1) end
      end
    end
  end
end

local function generate(model, prompts, options)
  options = options or {}
  local lists = prompts_as_lists(prompts)
  local max_new = options.max_new_tokens or 32
  local penalty = options.repetition_penalty or 1
  local pad_id = options.pad_id or 0
  local eos = {}
  for _, id in ipairs(options.eos_ids or {}) do eos[id] = true end
  if options.stop and not options.tokenizer then error('generate: stop strings need options.tokenizer', 2) end
  if options.seed then tensor.manual_seed(options.seed) end
  local choice = { temperature = options.temperature or 0, top_k = options.top_k, top_p = options.top_p,
                   repetition_penalty = penalty }

  local B = #lists
  local generator = options.generator
  if type(generator) == 'table' and not sampling.is_generator(generator) and #generator ~= B then
    error('generate: options.generator must be a pmp.Generator or a list of ' .. B .. ' (one per prompt)', 2)
  end
  local padded, positions, first_key = left_pad(lists, pad_id)
  local results, done = {}, {}
  for b = 1, B do
    results[b] = { tokens = {}, logprobs = options.return_logprobs and {} or nil, finish_reason = 'length' }
  end
  local longest = #padded[1]
  local seen = penalty ~= 1 and seen_ids(lists, longest, max_new) or nil
  local state = { first_key = tensor.tensor(first_key, { dtype = 'i64' }), last_only = true }
  local was_training = model.training
  model:eval()
  require('pmp').no_grad(function()
    state.positions = tensor.tensor(positions, { dtype = 'i64' })
    local logits = model:decode(tensor.tensor(padded, { dtype = 'i64' }), state)
    local next_position = {}
    for b = 1, B do next_position[b] = #lists[b] end
    for step = 1, max_new do
      local active = {}
      for b = 1, B do
        if not done[b] then active[#active + 1] = b end
      end
      local last = logits:select(2, logits:size(2))
      local rows, rows_seen, rows_generator = active_rows(active, B, last, seen, generator)
      choice.seen, choice.generator = rows_seen, rows_generator
      local ids, logprobs = sampling.sample(rows, choice)
      ids, logprobs = ids:totable(), options.return_logprobs and logprobs:totable() or nil
      local chosen, remaining = {}, 0
      for b = 1, B do chosen[b] = { pad_id } end
      for k, b in ipairs(active) do
        chosen[b][1] = ids[k]
        local finish = record(results[b], ids[k], logprobs and logprobs[k], eos, options)
        if finish then
          done[b], results[b].finish_reason = true, finish
        else
          remaining = remaining + 1
        end
      end
      if remaining == 0 or step == max_new then break end
      local step_positions = {}
      for b = 1, B do
        step_positions[b] = { next_position[b] }
        next_position[b] = next_position[b] + 1
      end
      state.positions = tensor.tensor(step_positions, { dtype = 'i64' })
      local column = tensor.tensor(chosen, { dtype = 'i64' })
      if seen then seen:narrow(2, longest + step, 1):copy_(column) end
      logits = model:decode(column, state)
    end
  end)
  if was_training then model:train() end
  if options.tokenizer then add_texts(results, options.tokenizer, options.stop) end
  return results
end

return generate
