--- Rollouts: answers sampled from a policy, and their rewards from a Lua function or a reward model.
---
---   local samples = rollout.sample(policy, prompt_id_lists, { temperature = 1, max_new_tokens = 32, eos_ids = {..} })
---   local reward = rollout.reward_fn(function(prompt, response, sample) ... end, 'file.lua')  -- or
---   local reward = rollout.reward_model(model, pad_id)
---   local rewards = reward(samples, tokenizer)         -- one number per sample
local generate = require 'pmp.generate'
local sampling = require 'pmp.sampling'
local serve_engine = require 'pmp.serve.engine'
local tensor = require 'pmp.tensor'
local sequences = require 'pmp.rl.sequences'
local logprobs = require 'pmp.rl.logprobs'

local M = {}

local BLOCK_SIZE = 16

-- The rows through pmp.serve.engine, each a request of its own seeded by its row seed; rows with the
-- same prompt (GRPO's G samples) share its cached prompt blocks. The cache holds every row at once.
local function sample_with_engine(policy, prompts, seeds, options)
  local blocks, longest = 0, 0
  for _, p in ipairs(prompts) do
    blocks = blocks + math.ceil((#p + options.max_new_tokens) / BLOCK_SIZE)
    longest = math.max(longest, #p)
  end
  local engine = serve_engine.new(policy, { block_size = BLOCK_SIZE, num_blocks = blocks, max_batch = #prompts,
    max_context = policy.config.max_position_embeddings or longest + options.max_new_tokens + 1,
    eos_ids = options.eos_ids })
  local requests = {}
  for k, p in ipairs(prompts) do
    requests[k] = { prompt = p, max_tokens = options.max_new_tokens, temperature = options.temperature,
      top_k = options.top_k, top_p = options.top_p, seed = seeds[k] }
  end
  local results = {}
  for k, r in ipairs(engine:run(requests)) do
    results[k] = { tokens = r.samples[1].tokens, finish_reason = r.samples[1].finish_reason }
  end
  return results
end

--- prompts: lists of token ids -> { prompt = ids, response = ids, finish_reason }, one per prompt.
--- opts: temperature (1), top_p, top_k, max_new_tokens, eos_ids, row_seeds (one 64-bit seed per prompt:
--- each row samples from pmp.Generator(its seed), so its tokens depend only on its seed and its logits,
--- not on the other rows, and pmp's default generator is left as it was; without row_seeds each row's
--- seed is drawn from the default generator).
--- Rows run through pmp.serve.engine (continuous batching, prompts' shared prefixes computed once) when
--- it runs the policy; otherwise (tensor-parallel policies, sliding-window, ALiBi or multi-latent
--- attention: pmp.serve.engine.unsupported) through pmp.generate. Both choose tokens with pmp.sample
--- from the same generators, so they give the same tokens.
function M.sample(policy, prompts, opts)
  local seeds = opts.row_seeds
  if seeds then
    if #seeds ~= #prompts then
      error('rollout: row_seeds must hold one seed per prompt (' .. #prompts .. ')', 2)
    end
  else
    local drawn = tensor.rand(#prompts, { dtype = 'f64' }):totable()
    seeds = {}
    for k, u in ipairs(drawn) do seeds[k] = math.floor(u * 2 ^ 53) end
  end
  local options = { max_new_tokens = opts.max_new_tokens or 32, temperature = opts.temperature or 1,
    top_p = opts.top_p, top_k = opts.top_k, eos_ids = opts.eos_ids }
  local results
  if serve_engine.unsupported(policy) then
    local generators = {}
    for k, seed in ipairs(seeds) do generators[k] = sampling.Generator(seed) end
    options.pad_id, options.generator = opts.pad_id, generators
    results = generate(policy, prompts, options)
  else
    results = sample_with_engine(policy, prompts, seeds, options)
  end
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
