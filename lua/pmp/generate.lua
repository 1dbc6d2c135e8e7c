--- pmp.generate(model, prompts, options): batched text generation with a KV cache.
---
---   prompts: a list of token-id lists (0-based ids, any lengths) or an i64 tensor [B, T]
---   options: max_new_tokens (32), temperature (0 = greedy), top_k (0 = off), top_p (1 = off),
---            repetition_penalty (1 = off), eos_ids ({}), stop ({strings}, needs tokenizer),
---            tokenizer, seed, return_logprobs (false), pad_id (0), row_seeds (one 64-bit seed per
---            prompt: each row samples from its own stream, so its tokens depend only on its seed and
---            its logits, not on the other rows or pmp's generator, which it leaves as it was)
---   returns: one table per prompt: { tokens = {generated ids}, logprobs = {...} (when asked),
---            finish_reason = 'eos' | 'stop' | 'length', text = (when a tokenizer is given) }
--
-- Prompts of different lengths are left-padded: each row counts its own positions and never attends
-- to its padding. Log-probs are those of the sampled tokens under the temperature-scaled model
-- distribution before top-k/top-p filtering (what PPO needs to compare policies).
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local tensor = require 'pmp.tensor'

local function prompts_as_lists(prompts)
  if tensor.is_tensor(prompts) then return prompts:totable() end
  if type(prompts) ~= 'table' or #prompts == 0 then error('generate: prompts must be a non-empty list of id lists or a tensor', 3) end
  if type(prompts[1]) == 'number' then return { prompts } end
  return prompts
end

-- HF's repetition penalty: seen tokens' logits are divided by it when positive, multiplied when negative.
local function penalize(logits, seen, penalty)
  for id in pairs(seen) do
    local v = logits[id + 1]
    if v then logits[id + 1] = v > 0 and v / penalty or v * penalty end
  end
end

local function log_softmax_of(logits, id)
  local peak = -math.huge
  for _, v in ipairs(logits) do if v > peak then peak = v end end
  local total = 0
  for _, v in ipairs(logits) do total = total + math.exp(v - peak) end
  return logits[id + 1] - peak - math.log(total)
end

local function argmax(logits)
  local best, at = -math.huge, 1
  for k, v in ipairs(logits) do
    if v > best then best, at = v, k end
  end
  return at - 1
end

-- Samples from softmax(logits) restricted by top_k and top_p, with pmp's seeded generator.
local NEGLIGIBLE = 40   -- tokens this far below the best logit carry < 1e-17 of the probability mass

local function sample(logits, top_k, top_p)
  local peak_logit = -math.huge
  for _, v in ipairs(logits) do if v > peak_logit then peak_logit = v end end
  -- only sort the candidates that can matter (a large vocabulary would otherwise be sorted each token)
  local order = {}
  for k = 1, #logits do
    if logits[k] >= peak_logit - NEGLIGIBLE then order[#order + 1] = k end
  end
  table.sort(order, function(a, b) return logits[a] > logits[b] end)
  local keep = #order
  if top_k and top_k > 0 and top_k < keep then keep = top_k end
  local peak, weights, total = logits[order[1]], {}, 0
  for k = 1, keep do
    weights[k] = math.exp(logits[order[k]] - peak)
    total = total + weights[k]
  end
  if top_p and top_p < 1 then
    -- smallest prefix whose probability reaches top_p (at least one token)
    local mass, cut = 0, keep
    for k = 1, keep do
      mass = mass + weights[k] / total
      if mass >= top_p then cut = k break end
    end
    keep = cut
    total = 0
    for k = 1, keep do total = total + weights[k] end
  end
  local r = tensor.rand(1, { dtype = 'f64' }):item() * total
  for k = 1, keep do
    r = r - weights[k]
    if r <= 0 then return order[k] - 1 end
  end
  return order[keep] - 1
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

-- Picks a row's next token from its last logits (penalty, temperature, then sampling or argmax) and
-- records it in result and seen. Returns the id and, when it ends the row, the reason ('eos', 'stop').
local function next_token(row, result, seen, eos, options, penalty, temperature)
  if penalty ~= 1 then penalize(row, seen, penalty) end
  if temperature > 0 then
    for k = 1, #row do row[k] = row[k] / temperature end
  end
  local id = temperature > 0 and sample(row, options.top_k, options.top_p) or argmax(row)
  result.tokens[#result.tokens + 1] = id
  if result.logprobs then result.logprobs[#result.logprobs + 1] = log_softmax_of(row, id) end
  seen[id] = true
  if eos[id] then return id, 'eos' end
  if options.stop then
    local text = options.tokenizer:decode(result.tokens)
    for _, s in ipairs(options.stop) do
      if text:find(s, 1, true) then return id, 'stop' end
    end
  end
  return id, nil
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

-- Each row's generator state, seeded by options.row_seeds (nil without them).
local function row_streams(seeds, B)
  if not seeds then return nil end
  if type(seeds) ~= 'table' or #seeds ~= B then error('generate: row_seeds must hold one seed per prompt (' .. B .. ')', 3) end
  local saved, states = ffi.new('uint64_t[4]'), {}
  C.pmp_rng_get_state(saved)
  for b = 1, B do
    C.pmp_manual_seed(seeds[b])
    states[b] = ffi.new('uint64_t[4]')
    C.pmp_rng_get_state(states[b])
  end
  C.pmp_rng_set_state(saved)
  return states
end

local function generate(model, prompts, options)
  options = options or {}
  local lists = prompts_as_lists(prompts)
  local max_new = options.max_new_tokens or 32
  local temperature = options.temperature or 0
  local penalty = options.repetition_penalty or 1
  local pad_id = options.pad_id or 0
  local eos = {}
  for _, id in ipairs(options.eos_ids or {}) do eos[id] = true end
  if options.stop and not options.tokenizer then error('generate: stop strings need options.tokenizer', 2) end
  if options.seed then tensor.manual_seed(options.seed) end

  local B = #lists
  local padded, positions, first_key = left_pad(lists, pad_id)
  local streams = row_streams(options.row_seeds, B)
  local global_state = ffi.new('uint64_t[4]')   -- put back after the rows' streams
  C.pmp_rng_get_state(global_state)
  local results, seen, done = {}, {}, {}
  for b = 1, B do
    results[b] = { tokens = {}, logprobs = options.return_logprobs and {} or nil, finish_reason = 'length' }
    seen[b] = {}
    for _, id in ipairs(lists[b]) do seen[b][id] = true end
  end
  local state = { first_key = tensor.tensor(first_key, { dtype = 'i64' }), last_only = true }
  local was_training = model.training
  model:eval()
  require('pmp').no_grad(function()
    state.positions = tensor.tensor(positions, { dtype = 'i64' })
    local logits = model:decode(tensor.tensor(padded, { dtype = 'i64' }), state)
    local next_position = {}
    for b = 1, B do next_position[b] = #lists[b] end
    for step = 1, max_new do
      local last = logits:select(2, logits:size(2)):double():totable()
      local chosen, remaining = {}, 0
      for b = 1, B do
        if done[b] then
          chosen[b] = pad_id
        else
          if streams then C.pmp_rng_set_state(streams[b]) end
          local id, finish = next_token(last[b], results[b], seen[b], eos, options, penalty, temperature)
          if streams then C.pmp_rng_get_state(streams[b]) end
          chosen[b] = id
          if finish then
            done[b], results[b].finish_reason = true, finish
          else
            remaining = remaining + 1
          end
        end
      end
      if remaining == 0 or step == max_new then break end
      local step_positions = {}
      for b = 1, B do
        step_positions[b] = { next_position[b] }
        next_position[b] = next_position[b] + 1
      end
      state.positions = tensor.tensor(step_positions, { dtype = 'i64' })
      local column = {}
      for b = 1, B do column[b] = { chosen[b] } end
      logits = model:decode(tensor.tensor(column, { dtype = 'i64' }), state)
    end
  end)
  if streams then C.pmp_rng_set_state(global_state) end
  if was_training then model:train() end
  if options.tokenizer then add_texts(results, options.tokenizer, options.stop) end
  return results
end

return generate
