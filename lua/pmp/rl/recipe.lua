--- What recipes/rm.lua, dpo.lua, ppo.lua and grpo.lua share beyond pmp.train: their flags, the model they
--- start from (a Hugging Face directory, or the embedded sums task's start policy), prompts, reward sources.
local json = require 'pmp.json'
local sums = require 'pmp.rl.sums'
local rollout = require 'pmp.rl.rollout'
local streams = require 'pmp.rl.streams'

local M = {}

--- Flag sets (pmp.train.flags specs) that the RL recipes parse after pmp.train.flags.optimizer, whose
--- defaults 'common' replaces: common to all four, then 'rollout' (ppo, grpo) or 'preference' (rm, dpo).
M.flags = {
  common = {
    -- the optimizer the RL recipes train with: AdamW at a constant rate, torch's betas, no weight decay
    { '--min-lr', 0.0, 'final learning rate' },
    { '--lr-warmup-iters', 0, 'linear warmup steps' },
    { '--lr-decay-iters', 0, 'steps of decay (0: all of the run)' },
    { '--lr-decay-style', 'constant', 'cosine, linear, constant or WSD' },
    { '--weight-decay', 0.0, 'AdamW decoupled weight decay (not on norms and biases)' },
    { '--adam-beta2', 0.999, 'AdamW beta2' },
    { '--start-iters', 300, 'embedded task: fine-tuning steps of the start policy when it is made', integer = true, min = 1 },
    { '--seed', 1234, 'random seed', integer = true, min = 0 },
    { '--save', nil, 'checkpoint directory (written at the end)' },
    { '--save-hf', nil, 'write the trained model here as a Hugging Face directory' },
    { '--tensorboard-dir', nil, 'write TensorBoard event files here' },
    { '--tensor-model-parallel-size', 1, 'tensor-parallel ranks under mpirun (the rest of the world is data-parallel)',
      integer = true, min = 1 },
  },
  rollout = {
    { '--prompts', nil, 'jsonl file of prompts' },
    { '--reward-fn', nil, 'Lua file returning function(prompt, response, sample) -> number' },
    { '--reward-model', nil, 'Hugging Face *ForSequenceClassification reward model directory' },
    { '--temperature', 1.0, 'sampling temperature', above = 0 },
    { '--top-p', 1.0, 'nucleus sampling', above = 0, max = 1 },
    { '--max-new-tokens', 0, 'answer length limit (0: 4 for the embedded task, else 128)', integer = true, min = 0 },
    { '--eval-samples', 4, 'embedded task: sampled answers per held-out prompt', integer = true, min = 1 },
    { '--eval-interval', 0, 'embedded task: iterations between held-out evaluations (0: at the end)', integer = true, min = 0 },
  },
  preference = {
    { '--data-path', nil, 'jsonl file of preference pairs' },
    { '--eval-data-path', nil, 'jsonl file of held-out preference pairs' },
    { '--max-length', 1024, 'tokens per sequence (longer ones are cut)', integer = true, min = 2 },
  },
  -- the recipes with a frozen reference model (dpo, ppo, grpo)
  reference = {
    { '--ref-dtype', 'f32', 'frozen reference model dtype: f32, or bf16 (half its memory, log-probs to bf16 precision)',
      choices = { 'f32', 'bf16' } },
  },
  -- after pmp.train.flags.checkpoint (rm, dpo, grpo): --load names the start model, --save is resumed
  resume = {
    { '--load', nil, 'Hugging Face model directory (default: the embedded sums task)' },
    { '--save', nil, 'checkpoint directory (none if not given or ""); one that holds a checkpoint resumes' },
    { '--save-interval', 0, 'steps between checkpoints (0: only at the end)' },
  },
}

--- Data parallelism under mpirun, with tp tensor-parallel ranks (--tensor-model-parallel-size, default 1)
--- holding Megatron's parts of the model (pmp.nn.parallel.tensor_parallel, in place: every rank must have
--- built the whole model alike), else the whole model: pmp.dist's layout (is_logger: the last rank, which
--- prints) and, on several data-parallel ranks, a pmp.dist.ddp wrapper that averages the gradients of
--- model's trained parameters during backward (nil otherwise). batch_size (the global batch, named by flag
--- in the error) must split evenly over the data-parallel ranks. frozen: models (a reference) split as
--- model is, so that they compute alike (a reference equal to the policy gives equal log-probs), and kept frozen.
function M.data_parallel(model, batch_size, flag, tp, frozen)
  local got, layout = pcall(require('pmp.dist').init, { tp = tp or 1 })
  if not got then
    error(string.format('--tensor-model-parallel-size %d: %s', tp or 1, (tostring(layout):gsub('^pmp%.dist%.init: ', ''))), 0)
  end
  layout.is_logger = layout.rank == layout.world - 1
  M.tensor_parallel(model, layout)
  for _, copy in ipairs(frozen or {}) do
    M.tensor_parallel(copy, layout)
    for _, p in ipairs(copy:parameters()) do p.requires_grad = false end
  end
  if batch_size % layout.dp ~= 0 then
    error(string.format('%s %d is not divisible by the %d data-parallel processes', flag, batch_size, layout.dp), 0)
  end
  return layout, M.ddp(model, layout)
end

--- model (built whole on every rank alike) split in place over layout's tensor-parallel ranks, as
--- data_parallel splits the policy (another trained model: ppo's critic); untouched on one. Returns it.
function M.tensor_parallel(model, layout)
  if layout.tp > 1 then require('pmp.nn.parallel').tensor_parallel(model) end
  return model
end

--- A pmp.dist.ddp wrapper that averages the gradients of model's trained parameters over the
--- data-parallel ranks of layout during backward; nil on one data-parallel rank.
function M.ddp(model, layout)
  if layout.dp == 1 then return nil end
  -- frozen weights (LoRA's base) get no gradient: a bucket waiting for them would never start
  local untrained = {}
  for _, pair in ipairs(model:named_parameters()) do untrained[pair[1]] = not pair[2].requires_grad end
  return require('pmp.dist.ddp').DistributedDataParallel(model, { skip = function(name) return untrained[name] end })
end

--- ' over N processes' (and their tensor-parallel size) for a recipe's first line; '' on one process.
function M.describe_layout(layout)
  if layout.world == 1 then return '' end
  return string.format(' over %d processes%s', layout.world,
    layout.tp > 1 and string.format(' (tensor-parallel %d, data-parallel %d)', layout.tp, layout.dp) or '')
end

--- Stops with an error naming the flags when --tensor-model-parallel-size > 1 comes with LoRA, which
--- the tensor-parallel split does not carry yet.
function M.check_tensor_parallel(opts)
  if opts.tensor_model_parallel_size > 1 and require('pmp.train').lora.enabled(opts) then
    error('LoRA (--lora-rank, --load-lora) with --tensor-model-parallel-size > 1 is not supported yet', 0)
  end
end

--- model whole, for writing it out (save_pretrained): itself on one tensor-parallel rank, else gathered on
--- rank 0 through a checkpoint under parts_dir (nil on the other ranks; every rank must call it).
function M.whole_model(model, layout, parts_dir)
  if layout.tp == 1 then return layout.is_logger and model or nil end
  return require('pmp.train.parallel').gather_model(model, layout, rawget(model, 'hf'), parts_dir)
end

--- The end of a run, on every rank: --save-lora / --merge-lora (pmp.train.lora.finish: rank 0 writes the
--- gathered adapters) and --save-hf of the model made whole. save_options: save_pretrained's; what: the
--- model's name in the printed line ('dpo: saved the policy to ...').
function M.save_model(model, layout, opts, save_options, what)
  require('pmp.train').lora.finish(model, opts, opts.load)
  local whole = opts.save_hf and M.whole_model(model, layout, opts.save_hf .. '.parts')
  if whole then
    whole:save_pretrained(opts.save_hf, save_options)
    print(what .. ' ' .. opts.save_hf)
  end
end

--- This data-parallel rank's contiguous share of a global batch (a list whose length dp divides).
function M.rank_share(list, layout)
  local n = #list / layout.dp
  return { unpack(list, layout.dp_rank * n + 1, (layout.dp_rank + 1) * n) }
end

--- A list of numbers averaged over the data-parallel ranks (each holding a mean over an equal share).
function M.mean_over_ranks(values, layout)
  if layout.dp == 1 then return values end
  local t = require('pmp.tensor').tensor(values, { dtype = 'f64' })
  require('pmp.dist').group('dp'):all_reduce(t, 'avg')
  return t:totable()
end

--- values ({tag = number}) as TensorBoard scalars at iteration, when the logger writes them (--tensorboard-dir).
function M.scalars(logger, iteration, values)
  if not logger.tensorboard then return end
  for tag, value in pairs(values) do logger.tensorboard:add_scalar(tag, value, iteration) end
end

--- The policy to start from and its tokenizer: opts.load (an HF directory) or the embedded start.
--- Returns model, tokenizer, render (nil for the embedded task, whose prompts are plain text).
function M.policy(opts, load)
  if opts.load then
    if not require('pmp.io').is_dir(opts.load) then error('--load ' .. opts.load .. ' is not a directory', 0) end
    local model = require('pmp.models').from_pretrained(opts.load, { head = load and load.head })
    local tokenizer = require('pmp.tokenizer').from_pretrained(opts.load)
    return model, tokenizer, require('pmp.train.base_model').chat_renderer(tokenizer, opts.load, nil, opts.load)
  end
  local dist = require('pmp.dist').init()
  local model, tokenizer = sums.start_policy({ iters = opts.start_iters,
    log = dist.rank == dist.world - 1 and print or function() end })   -- the logging rank's lines only
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
  if require('pmp.io').is_dir(opts.prompts) then error('--prompts ' .. opts.prompts .. ' is a directory (give a jsonl file)', 0) end
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
    if not require('pmp.io').is_dir(opts.reward_model) then error('--reward-model ' .. opts.reward_model .. ' is not a directory', 0) end
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

--- rollout.sample's options under the recipe flags.
function M.sample_options(opts, tokenizer)
  return { temperature = opts.temperature, top_p = opts.top_p, eos_ids = M.stop_ids(opts, tokenizer),
    max_new_tokens = opts.max_new_tokens > 0 and opts.max_new_tokens or (opts.load and 128 or 4), pad_id = tokenizer.pad_id }
end

--- The mini-batches of one pass over a rollout of n rows (all ranks' together, each rank holding its
--- contiguous share) in steps of `size` rows, as 0-based i64 index tensors into this rank's rows. The
--- rollout is dealt in blocks of n / size consecutive rows, each block giving every mini-batch one row in
--- an order drawn from the stream `key` (pmp.rl.streams); a rank's share is whole blocks (size must be a
--- multiple of layout.dp), so the ranks together step on exactly the mini-batches one process steps on.
function M.minibatches(n, size, key, layout)
  local tensor = require 'pmp.tensor'
  local count = n / size
  local keys = streams.draw(key, function() return tensor.rand(n, { dtype = 'f64' }):totable() end)
  local share = n / layout.dp
  local members = {}
  for j = 1, count do members[j] = {} end
  for block = layout.dp_rank * share / count + 1, (layout.dp_rank + 1) * share / count do
    local base, order = (block - 1) * count, {}
    for i = 1, count do order[i] = i end
    table.sort(order, function(a, b) return keys[base + a] < keys[base + b] end)
    for j = 1, count do
      local rows = members[j]
      rows[#rows + 1] = base + order[j] - 1 - layout.dp_rank * share
    end
  end
  for j = 1, count do members[j] = tensor.tensor(members[j], { dtype = 'i64' }) end
  return members
end

--- The weight that turns a token mean over this rank's rows of a mini-batch (mask: their answer tokens)
--- into its part of the token mean over the whole mini-batch, times dp since pmp.dist.ddp averages the
--- ranks' gradients: this rank's tokens / all ranks' tokens * dp. 1 on one process. Metrics weighted by
--- it and then averaged with mean_over_ranks are the whole mini-batch's token means.
function M.token_share(mask, layout)
  if layout.dp == 1 then return 1 end
  local mine = mask:sum():item()
  return mine / M.mean_over_ranks({ mine }, layout)[1]
end

--- pmp.rl.whiten over the answer tokens of all data-parallel ranks' rows (the whole rollout).
function M.whiten(x, mask, layout)
  if layout.dp == 1 then return require('pmp.rl').whiten(x, mask) end
  local count, sum = unpack(M.mean_over_ranks({ mask:sum():item(), (x * mask):sum():item() }, layout))
  local centered = x - sum / count
  local squares = M.mean_over_ranks({ (centered:square() * mask):sum():item() }, layout)[1] * layout.dp
  return centered * (1 / math.sqrt(squares / (count * layout.dp - 1) + 1e-8)) * mask
end

--- A frozen copy of model: no gradients are recorded through it (callers run it under pmp.no_grad).
--- dtype (--ref-dtype): 'f32' (nil) or 'bf16', its weights rounded to bf16 (pmp.rl.sequence_logprobs
--- still takes the log-softmax in f32).
function M.frozen_copy(model, dtype)
  if dtype ~= nil and dtype ~= 'f32' and dtype ~= 'bf16' then
    error(string.format("pmp.rl.recipe.frozen_copy: dtype must be 'f32' or 'bf16', got '%s'", tostring(dtype)), 2)
  end
  local copy = require('pmp.nn').GPTModel(model.config)
  copy:load_state_dict(model:state_dict())
  if dtype == 'bf16' then copy:to('bf16') end
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

--- pair_accuracy over all of pairs, scored 64 at a time without recording gradients: score(part) returns
--- the chosen and rejected scores of a list of pairs as tensors.
function M.pairs_accuracy(pairs, score)
  local chosen, rejected = {}, {}
  for first = 1, #pairs, 64 do
    local c, r = require('pmp').no_grad(score, { unpack(pairs, first, math.min(first + 63, #pairs)) })
    for _, v in ipairs(c:double():totable()) do chosen[#chosen + 1] = v end
    for _, v in ipairs(r:double():totable()) do rejected[#rejected + 1] = v end
  end
  return M.pair_accuracy(chosen, rejected)
end

--- Batches of `size` items of list drawn in an order reshuffled each pass from the stream (seed, pass)
--- (pmp.rl.streams: the same on every rank whatever else drew random numbers): returns next() -> a list
--- of items, and the position ({order, cursor}: JSON-able, assign both to resume). cursor counts the items
--- taken before, so the k-th item of a batch is item cursor + k of the whole run.
function M.batches(list, size, seed)
  local position = { order = {}, cursor = 0 }
  for k = 1, #list do position.order[k] = k end
  local function next_batch()
    local out = {}
    for k = 1, size do
      if position.cursor % #list == 0 then
        local keys = streams.draw(streams.key(seed, 'order', position.cursor / #list), function()
          return require('pmp.tensor').rand(#list, { dtype = 'f64' }):totable()
        end)
        local order = {}
        for i = 1, #list do order[i] = i end
        table.sort(order, function(a, b) return keys[a] < keys[b] end)
        position.order = order
      end
      out[k] = list[position.order[position.cursor % #list + 1]]
      position.cursor = position.cursor + 1
    end
    return out
  end
  return next_batch, position
end

return M
