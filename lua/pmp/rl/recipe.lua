--- What recipes/rm.lua, dpo.lua, ppo.lua and grpo.lua share: the model they start from (a Hugging Face
--- directory, or the embedded sums task's start policy), prompts, reward sources and failing cleanly.
local json = require 'pmp.json'
local sums = require 'pmp.rl.sums'
local rollout = require 'pmp.rl.rollout'

local M = {}

--- The flags every RL recipe has ('rollout': ppo, grpo; 'preference': rm, dpo) after its own.
function M.flags(kind, own)
  local out = {}
  for _, f in ipairs(own) do out[#out + 1] = f end
  local common = {
    { '--clip-grad', 1.0, 'global gradient-norm clipping (0: off)' },
    { '--start-iters', 300, 'embedded task: fine-tuning steps of the start policy when it is made' },
    { '--seed', 1234, 'random seed' },
    { '--save', nil, 'checkpoint directory (written at the end)' },
    { '--save-hf', nil, 'write the trained model here as a Hugging Face directory' },
  }
  if kind == 'rollout' then
    common[#common + 1] = { '--prompts', nil, 'jsonl file of prompts' }
    common[#common + 1] = { '--reward-fn', nil, 'Lua file returning function(prompt, response, sample) -> number' }
    common[#common + 1] = { '--reward-model', nil, 'Hugging Face *ForSequenceClassification reward model directory' }
    common[#common + 1] = { '--temperature', 1.0, 'sampling temperature' }
    common[#common + 1] = { '--top-p', 1.0, 'nucleus sampling' }
    common[#common + 1] = { '--max-new-tokens', 0, 'answer length limit (0: 4 for the embedded task, else 128)' }
    common[#common + 1] = { '--eval-samples', 4, 'embedded task: sampled answers per held-out prompt' }
    common[#common + 1] = { '--eval-interval', 0, 'embedded task: iterations between held-out evaluations (0: at the end)' }
  else
    common[#common + 1] = { '--data-path', nil, 'jsonl file of preference pairs' }
    common[#common + 1] = { '--eval-data-path', nil, 'jsonl file of held-out preference pairs' }
    common[#common + 1] = { '--max-length', 1024, 'tokens per sequence (longer ones are cut)' }
  end
  for _, f in ipairs(common) do out[#out + 1] = f end
  return out
end

--- Parses flags; a problem ends the process with "<name>: message" on stderr (exit status 2).
function M.parse(name, flags, usage)
  local function fail(message)
    io.stderr:write(name .. ': ' .. tostring(message) .. '\n')
    os.exit(2)
  end
  local ok, opts = pcall(require('pmp.args').parse, arg, flags, { usage = usage })
  if not ok then fail(opts) end
  if require('pmp.dist').init().world > 1 then fail('runs on one process; start it without mpirun') end
  return opts, fail
end

--- The chat-template renderer of an HF model directory: render(messages, add_generation_prompt) -> text.
function M.renderer(dir)
  local chat_template = require 'pmp.chat_template'
  return function(messages, add_generation_prompt)
    return chat_template.apply(dir, messages, { add_generation_prompt = add_generation_prompt })
  end
end

--- The policy to start from and its tokenizer: opts.load (an HF directory) or the embedded start.
--- Returns model, tokenizer, render (nil for the embedded task, whose prompts are plain text).
function M.policy(opts, load)
  if opts.load then
    local model = require('pmp.models').from_pretrained(opts.load, { head = load and load.head })
    return model, require('pmp.tokenizer').from_pretrained(opts.load), M.renderer(opts.load)
  end
  local model, tokenizer = sums.start_policy({ iters = opts.start_iters })
  if load and load.head == 'score' then model = require('pmp.models').score_model(model) end
  return model, tokenizer
end

--- Prompt token lists from a jsonl file of {"prompt": "text" | [messages]} or {"messages": [...]}
--- records (the chat template applied), or the embedded task's training prompts.
function M.prompts(opts, tokenizer, render)
  local out = {}
  if not opts.prompts then
    for k, pair in ipairs(sums.pairs('train')) do out[k] = tokenizer:encode(sums.prompt(pair)) end
    return out
  end
  local file = io.open(opts.prompts, 'r')
  if not file then error('cannot read --prompts ' .. opts.prompts, 0) end
  local number = 0
  for line in file:lines() do
    number = number + 1
    if line:match('%S') then
      local ok, record = pcall(json.decode, line)
      local messages = ok and type(record) == 'table' and (record.messages or record.prompt)
      if type(messages) == 'string' then messages = { { role = 'user', content = messages } } end
      if type(messages) ~= 'table' then
        file:close()
        error(string.format("%s:%d: expected a 'prompt' string or message list, or 'messages'", opts.prompts, number), 0)
      end
      out[#out + 1] = tokenizer:encode(render(messages, true))
    end
  end
  file:close()
  if #out == 0 then error(opts.prompts .. ' holds no prompts', 0) end
  return out
end

--- The reward source: --reward-fn FILE, --reward-model DIR, or the embedded task's exact reward.
function M.reward(opts, tokenizer)
  if opts.reward_fn and opts.reward_model then error('give one of --reward-fn and --reward-model', 0) end
  if opts.reward_fn then return rollout.load_reward_fn(opts.reward_fn) end
  if opts.reward_model then
    local model = require('pmp.models').from_pretrained(opts.reward_model, { head = 'score' })
    model:eval()
    return rollout.reward_model(model, tokenizer.pad_id or 0)
  end
  if opts.prompts then error('--prompts needs --reward-fn FILE or --reward-model DIR', 0) end
  return rollout.reward_fn(sums.reward, 'sums')
end

--- Token ids that end an answer.
function M.stop_ids(opts, tokenizer)
  if opts.load then return tokenizer.eos_id and { tokenizer.eos_id } or {} end
  return sums.stop_ids(tokenizer)
end

--- pmp.generate's options for rollouts under the recipe flags.
function M.sample_options(opts, tokenizer)
  return { temperature = opts.temperature, top_p = opts.top_p, eos_ids = M.stop_ids(opts, tokenizer),
    max_new_tokens = opts.max_new_tokens > 0 and opts.max_new_tokens or (opts.load and 128 or 4), pad_id = tokenizer.pad_id }
end

--- n rows split into mini-batches of `size` in a seeded random order: a list of 0-based i64 index tensors.
function M.minibatches(n, size)
  local tensor = require 'pmp.tensor'
  local keys = tensor.rand(n, { dtype = 'f64' }):totable()
  local order = {}
  for k = 1, n do order[k] = k end
  table.sort(order, function(a, b) return keys[a] < keys[b] end)
  local out = {}
  for first = 1, n, size do
    out[#out + 1] = tensor.tensor({ unpack(order, first, math.min(first + size - 1, n)) }, { dtype = 'i64' }) - 1
  end
  return out
end

--- A frozen copy of model: no gradients are recorded through it (callers run it under pmp.no_grad).
function M.frozen_copy(model)
  local copy = require('pmp.nn').GPTModel(model.config)
  copy:load_state_dict(model:state_dict())
  for _, p in ipairs(copy:parameters()) do p.requires_grad = false end
  copy:eval()
  return copy
end

--- Tokenized preference pairs for training and evaluation: --data-path (and --eval-data-path) jsonl in
--- TRL's formats (pmp.rl.preference), or the embedded task's pairs (the right sum chosen over a wrong one;
--- the held-out sums for evaluation).
function M.preference_pairs(opts, tokenizer, render)
  local preference = require 'pmp.rl.preference'
  if opts.data_path then
    local tokenize = { tokenizer = tokenizer, render = render }
    return preference.load_jsonl(opts.data_path, tokenize),
      opts.eval_data_path and preference.load_jsonl(opts.eval_data_path, tokenize) or nil
  end
  local state = opts.seed
  local function random(n)
    state = (state * 1103515245 + 12345) % 2147483648
    return math.floor(state / 65536) % n + 1
  end
  local plain = function(messages, add_generation_prompt)
    return add_generation_prompt and messages[1].content or messages[1].content .. messages[2].content
  end
  local function pairs_of(which, copies)
    local out = {}
    for _ = 1, copies do
      for _, pair in ipairs(sums.pairs(which)) do
        out[#out + 1] = preference.tokenize(sums.preference_record(pair, random), { tokenizer = tokenizer, render = plain })
      end
    end
    return out
  end
  return pairs_of('train', 1), pairs_of('held_out', 2)
end

--- The share of pairs where chosen_score > rejected_score (ties count half), over lists of numbers.
function M.pair_accuracy(chosen, rejected)
  local right = 0
  for k = 1, #chosen do
    right = right + (chosen[k] > rejected[k] and 1 or chosen[k] == rejected[k] and 0.5 or 0)
  end
  return right / #chosen
end

--- Batches of `size` items of list drawn in a seeded order, reshuffled each pass: returns next() -> a
--- list of items, and the position ({order, cursor}: JSON-able, assign both to resume).
function M.batches(list, size)
  local position = { order = {}, cursor = 0 }
  for k = 1, #list do position.order[k] = k end
  local function next_batch()
    local out = {}
    for k = 1, size do
      if position.cursor % #list == 0 then
        local keys = require('pmp.tensor').rand(#list, { dtype = 'f64' }):totable()
        table.sort(position.order, function(a, b) return keys[a] < keys[b] end)
      end
      out[k] = list[position.order[position.cursor % #list + 1]]
      position.cursor = position.cursor + 1
    end
    return out
  end
  return next_batch, position
end

return M
