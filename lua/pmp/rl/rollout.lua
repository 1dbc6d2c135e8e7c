--- Rollouts: answers sampled from a policy with pmp.generate, and their rewards from a Lua function or
--- a reward model.
---
---   local samples = rollout.sample(policy, prompt_id_lists, { temperature = 1, max_new_tokens = 32, eos_ids = {..} })
---   local reward = rollout.reward_fn(function(prompt, response, sample) ... end, 'file.lua')  -- or
---   local reward = rollout.reward_model(model, pad_id)
---   local rewards = reward(samples, tokenizer)         -- one number per sample
local generate = require 'pmp.generate'
local sampling = require 'pmp.sampling'
local sequences = require 'pmp.rl.sequences'
local logprobs = require 'pmp.rl.logprobs'

local M = {}

--- prompts: lists of token ids -> { prompt = ids, response = ids, finish_reason }, one per prompt.
--- opts: temperature (1), top_p, top_k, max_new_tokens, eos_ids, row_seeds (one 64-bit seed per prompt:
--- each row samples from a pmp.Generator of its own, so its tokens depend only on its seed and its
--- logits, not on the other rows, and pmp's default generator is left as it was).
function M.sample(policy, prompts, opts)
  local generators
  if opts.row_seeds then
    if #opts.row_seeds ~= #prompts then
      error('rollout: row_seeds must hold one seed per prompt (' .. #prompts .. ')', 2)
    end
    generators = {}
    for k, seed in ipairs(opts.row_seeds) do generators[k] = sampling.Generator(seed) end
  end
  local results = generate(policy, prompts, { max_new_tokens = opts.max_new_tokens or 32,
    temperature = opts.temperature or 1, top_p = opts.top_p, top_k = opts.top_k, eos_ids = opts.eos_ids,
    pad_id = opts.pad_id, generator = generators })
  local out = {}
  for k, r in ipairs(results) do
    out[k] = { prompt = prompts[k], response = r.tokens, finish_reason = r.finish_reason }
  end
  return out
end

local function preview(text)
  text = tostring(text):gsub('\n', '\\n')
  return #text > 40 and text:sub(1, 40) .. '...' or text
end

--- A reward source from fn(prompt_text, response_text, sample) -> number; an error inside it or a
--- result that is not a finite number stops the run with a message naming `name` and the sample.
function M.reward_fn(fn, name)
  return function(samples, tokenizer)
    local out = {}
    for k, s in ipairs(samples) do
      local prompt, response = tokenizer:decode(s.prompt), tokenizer:decode(s.response)
      local ok, value = pcall(fn, prompt, response, s)
      if not ok then
        error(string.format('reward function %s failed on sample %d (prompt "%s"): %s', name, k, preview(prompt),
          tostring(value)), 0)
      end
      if type(value) ~= 'number' or value ~= value or value == math.huge or value == -math.huge then
        error(string.format('reward function %s returned %s for sample %d (prompt "%s", response "%s"); it must ' ..
          'return a finite number', name, value ~= value and 'NaN' or tostring(value), k, preview(prompt),
          preview(response)), 0)
      end
      out[k] = value
    end
    return out
  end
end

--- A reward function from a Lua file that returns function(prompt, response, sample) -> number.
function M.load_reward_fn(path)
  local chunk, err = loadfile(path)
  if not chunk then error('--reward-fn ' .. path .. ': ' .. tostring(err), 0) end
  local ok, fn = pcall(chunk)
  if not ok then error('--reward-fn ' .. path .. ': ' .. tostring(fn), 0) end
  if type(fn) ~= 'function' then
    error('--reward-fn ' .. path .. ' must return function(prompt, response, sample) -> number, returned a ' .. type(fn), 0)
  end
  return M.reward_fn(fn, path)
end

--- A reward source from a score-head model: its score at each sample's last token.
function M.reward_model(model, pad_id)
  return function(samples)
    local rows = {}
    for k, s in ipairs(samples) do rows[k] = { s.prompt, s.response } end
    local batch = sequences.collate(rows, pad_id)
    return require('pmp').no_grad(logprobs.sequence_scores, model, batch.ids, batch.last):double():totable()
  end
end

function M.mean(list)
  local sum = 0
  for _, v in ipairs(list) do sum = sum + v end
  return sum / math.max(#list, 1)
end

return M
