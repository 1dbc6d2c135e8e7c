-- Supervised fine-tuning of a Hugging Face model on chat data with its own chat template.
--   pmp recipes/sft.lua --load MODEL_DIR --data-path train.jsonl --save-hf OUT_DIR [--packing]
-- train.jsonl holds alpaca (instruction/input/output), sharegpt (conversations) or messages
-- (role/content) records, detected per record unless --format says. Only assistant turns are trained
-- (end-of-turn tokens included); --packing puts several samples in one sequence with positions
-- restarting and attention kept inside each sample. The loss is averaged per trained token over the
-- whole global batch. --save writes Megatron-layout checkpoints (resumable with --load), --save-hf the
-- fine-tuned model as a Hugging Face directory.
--
-- With no --load and --data-path it runs the embedded default: it fine-tunes the model that
-- `pmp recipes/pretrain.lua` left in checkpoints/pretrain to answer "a + b = " with the sum, on sums it
-- generates, and prints the exact-match accuracy on held-out sums before and after.
local FLAGS = {
  { '--load', nil, 'Hugging Face model directory, or an SFT checkpoint directory to resume' },
  { '--data-path', nil, 'jsonl file of conversations' },
  { '--format', 'auto', 'auto, alpaca, sharegpt or messages' },
  { '--chat-template', nil, 'use a built-in template (chatml, llama3, alpaca) instead of the model\'s' },
  { '--seq-length', 512, 'tokens per sequence (longer samples are truncated)' },
  { '--packing', false, 'pack several samples per sequence' },
  { '--train-on-prompt', false, 'also train on system/user tokens' },
  { '--micro-batch-size', 4, 'sequences per forward/backward' },
  { '--global-batch-size', 8, 'sequences per optimizer step' },
  { '--train-iters', 0, 'optimizer steps (0: --epochs over the data)' },
  { '--epochs', 1, 'passes over the data when --train-iters is 0' },
  { '--lr', 1e-5, 'peak learning rate' },
  { '--min-lr', 0.0, 'final learning rate' },
  { '--lr-warmup-iters', 0, 'linear warmup steps' },
  { '--lr-decay-style', 'cosine', 'cosine, linear or constant' },
  { '--weight-decay', 0.0, 'AdamW weight decay (not on norms and biases)' },
  { '--adam-beta1', 0.9, 'AdamW beta1' },
  { '--adam-beta2', 0.95, 'AdamW beta2' },
  { '--clip-grad', 1.0, 'global gradient-norm clipping (0: off)' },
  { '--bf16', false, 'bf16 parameters, f32 master weights' },
  { '--recompute-granularity', nil, "'full' to recompute layer activations in backward" },
  { '--seed', 1234, 'shuffle seed' },
  { '--log-interval', 10, 'steps between log lines' },
  { '--save', nil, 'checkpoint directory (Megatron layout)' },
  { '--save-interval', 0, 'steps between checkpoints (0: only at the end)' },
  { '--save-hf', nil, 'write the fine-tuned model here as a Hugging Face directory' },
}

local ok, opts = pcall(pmp.args.parse, arg, FLAGS, { usage = 'pmp recipes/sft.lua --load MODEL_DIR --data-path FILE.jsonl [flags]' })
local function fail(message)
  io.stderr:write('sft: ' .. message .. '\n')
  os.exit(2)
end
if not ok then fail(tostring(opts)) end
-- Several processes would each train the whole model and write the same checkpoint files.
if pmp.dist.init().world > 1 then
  fail('runs on one process (parallel layouts are in recipes/pretrain.lua); start it without mpirun')
end
local embedded = not opts.load and not opts.data_path
if embedded then
  opts.load = 'checkpoints/pretrain'
  if not pmp.checkpoint.latest_iteration(opts.load) then
    fail('the embedded default fine-tunes checkpoints/pretrain: run `pmp recipes/pretrain.lua` first')
  end
  if opts.train_iters == 0 then opts.train_iters = 300 end
  if opts.lr == 1e-5 then opts.lr = 1e-3 end
  if opts.global_batch_size == 8 then opts.global_batch_size = 16 end
  opts.packing, opts.seq_length = true, math.min(opts.seq_length, 64)
end
if not opts.load then fail('--load MODEL_DIR is required') end
if not opts.data_path and not embedded then fail('--data-path FILE.jsonl is required') end
if opts.global_batch_size % opts.micro_batch_size ~= 0 then fail('--global-batch-size must be a multiple of --micro-batch-size') end

local sft = pmp.data.sft

-- The base model: a Hugging Face directory ({kind = 'hf'}) or a pretraining checkpoint ({kind = 'pmp'},
-- as the embedded default uses). An SFT checkpoint records its base, so --load on one resumes.
local resume_info, base = nil, { kind = 'hf', dir = opts.load }
if embedded then
  base = { kind = 'pmp', dir = opts.load }
elseif pmp.checkpoint.latest_iteration(opts.load) then
  local got, info = pcall(pmp.checkpoint.info, opts.load)
  if not got then fail('--load: ' .. tostring(info)) end
  if type(info.state.base_model) == 'table' then
    resume_info, base = info, info.state.base_model
  elseif type(info.layout.model_config) == 'table' then
    base = { kind = 'pmp', dir = opts.load }
  else
    fail(opts.load .. ' is neither an SFT checkpoint nor a pretraining checkpoint')
  end
elseif not pmp.io.is_file(pmp.io.join(opts.load, 'config.json')) then
  fail(opts.load .. ' has neither config.json nor latest_checkpointed_iteration.txt')
end
local base_dir = base.dir

local base_model, tokenizer, template_dir
if base.kind == 'pmp' then
  local got, loaded, base_info = pcall(pmp.checkpoint.load_model, base_dir)
  if not got then fail(tostring(loaded)) end
  base_model = loaded
  tokenizer = pmp.data.dataset_tokenizer.from_state(base_info.state.tokenizer)
  -- a pretraining run with a Hugging Face tokenizer brings that tokenizer's chat template along
  template_dir = base_info.state.tokenizer.type == 'hf' and base_info.state.tokenizer.model or nil
  if not embedded and not template_dir and not opts.chat_template then
    fail(base_dir .. ' has no chat template (its tokenizer is ' .. tostring(base_info.state.tokenizer.type) ..
      '): give --chat-template chatml, llama3 or alpaca')
  end
else
  tokenizer = pmp.tokenizer.from_pretrained(base_dir)
  template_dir = base_dir
end
local template = opts.chat_template and pmp.chat_template.compile(pmp.chat_template.builtin(opts.chat_template))
local function render(messages, add_generation_prompt)
  if embedded then
    -- the sums task in the corpus' own format: "12 + 7 = 19."
    local text = messages[1].content .. ' = '
    if messages[2] then text = text .. messages[2].content .. '.\n' end
    return text
  end
  if template then
    return (template:render({ messages = messages, add_generation_prompt = add_generation_prompt,
      bos_token = tokenizer.bos_token or '', eos_token = tokenizer.eos_token or '' }))
  end
  return pmp.chat_template.apply(template_dir, messages, { add_generation_prompt = add_generation_prompt })
end

-- Samples
local samples, line_number, trained_tokens = {}, 0, 0
local held_out = {}
local function lines_of_data()
  if not embedded then
    local file = io.open(opts.data_path, 'r')
    if not file then fail('cannot read --data-path ' .. opts.data_path) end
    local text = file:read('*a')
    file:close()
    return text:gmatch('[^\n]*')
  end
  -- sums of numbers below 50 (as in the corpus); 100 pairs are held out for the accuracy check
  local records, state = {}, opts.seed
  local function number()
    state = (state * 1103515245 + 12345) % 2147483648
    return math.floor(state / 65536) % 50
  end
  for k = 1, 2100 do
    local a, b = number(), number()
    local record = pmp.json.encode({ messages = { { role = 'user', content = a .. ' + ' .. b },
      { role = 'assistant', content = tostring(a + b) } } })
    if k <= 100 then held_out[#held_out + 1] = { a, b } else records[#records + 1] = record end
  end
  local i = 0
  return function() i = i + 1; return records[i] end
end
for line in lines_of_data() do
  line_number = line_number + 1
  if line:match('%S') then
    local parsed, record = pcall(pmp.json.decode, line)
    if not parsed then fail(string.format('%s:%d: %s', tostring(opts.data_path), line_number, tostring(record))) end
    local format = opts.format ~= 'auto' and opts.format or sft.detect_format(record)
    if not format then fail(string.format('%s:%d: not an alpaca, sharegpt or messages record', opts.data_path, line_number)) end
    local converted, result = pcall(function()
      return sft.tokenize(sft.to_messages(record, format), { tokenizer = tokenizer, render = render,
        train_on_prompt = opts.train_on_prompt, end_of_turn_id = tokenizer.eos_id or tokenizer.eod })
    end)
    if not converted then fail(string.format('%s:%d: %s', opts.data_path, line_number, tostring(result))) end
    samples[#samples + 1] = result
    for _, m in ipairs(result.mask) do if m then trained_tokens = trained_tokens + 1 end end
  end
end
if #samples == 0 then fail(tostring(opts.data_path) .. ' holds no samples') end
local rows = opts.packing and sft.pack(samples, opts.seq_length) or sft.pad(samples, opts.seq_length)

-- Model and optimizer
local model = base_model or pmp.models.from_pretrained(base_dir, {
  dtype = opts.bf16 and 'bf16' or 'f32', config = { recompute_granularity = opts.recompute_granularity } })

-- The embedded task's metric: exact-match accuracy of greedy answers on the held-out sums.
local function sums_accuracy()
  local prompts = {}
  for k, pair in ipairs(held_out) do prompts[k] = tokenizer:encode(pair[1] .. ' + ' .. pair[2] .. ' = ') end
  local dot = tokenizer:encode('.')[1]
  local results = pmp.generate(model, prompts, { max_new_tokens = 4, eos_ids = { dot } })
  local right = 0
  for k, result in ipairs(results) do
    local answer = tokenizer:decode(result.tokens):gsub('%.$', '')
    if answer == tostring(held_out[k][1] + held_out[k][2]) then right = right + 1 end
  end
  model:train()
  return right / #held_out
end
local accuracy_before = embedded and sums_accuracy()
local optimizer = pmp.optim.AdamW(pmp.optim.decay_groups(model),
  { lr = opts.lr, betas = { opts.adam_beta1, opts.adam_beta2 }, weight_decay = opts.weight_decay })
local steps_per_epoch = math.max(1, math.floor(#rows / opts.global_batch_size))
local train_iters = opts.train_iters > 0 and opts.train_iters or steps_per_epoch * opts.epochs
local lr_at = pmp.optim.schedule.new({ max_lr = opts.lr, min_lr = opts.min_lr, warmup_iters = opts.lr_warmup_iters,
  decay_iters = train_iters, style = opts.lr_decay_style })
local params = model:parameters()

print(string.format('sft: %d samples (%d trained tokens) in %d %s rows of <= %d tokens; %s; %d steps',
  #samples, trained_tokens, #rows, opts.packing and 'packed' or 'unpacked', opts.seq_length,
  tostring(model):match('^[^\n]*'), train_iters))

-- A seeded order over the rows, reshuffled each epoch.
local order, cursor = {}, 0
local function shuffle(epoch)
  -- its own stream: the training generator (dropout) must not depend on where epochs start
  local saved = pmp.checkpoint.rng_state()
  pmp.manual_seed(opts.seed + epoch)
  local keys = pmp.rand(#rows, { dtype = 'f64' }):totable()
  pmp.checkpoint.set_rng_state(saved)
  order = {}
  for k = 1, #rows do order[k] = k end
  table.sort(order, function(a, b) return keys[a] < keys[b] end)
end
local function next_rows(n)
  local out = {}
  for _ = 1, n do
    if cursor % #rows == 0 then shuffle(cursor / #rows) end
    out[#out + 1] = rows[order[cursor % #rows + 1]]
    cursor = cursor + 1
  end
  return out
end

local iteration = 0
if resume_info then
  local info = pmp.checkpoint.load(opts.load, model, optimizer)
  iteration, cursor = info.iteration, info.state.consumed_rows
  if cursor > 0 then shuffle(math.floor((cursor - 1) / #rows)) end
  print(string.format(' loaded checkpoint from %s at iteration %d', opts.load, iteration))
end

local function save()
  pmp.checkpoint.save(opts.save, iteration, model, optimizer, { consumed_rows = cursor, base_model = base, args = opts })
  print(string.format(' saved checkpoint to %s at iteration %d', opts.save, iteration))
end

local clock = require 'pmp.clock'
local accumulation = opts.global_batch_size / opts.micro_batch_size
local interval_start, loss_sum, count, tokens_seen = clock.now(), 0, 0, 0
model:train()
while iteration < train_iters do
  iteration = iteration + 1
  local lr = lr_at(iteration)
  optimizer.lr = lr
  optimizer:zero_grad()
  -- every trained token of the global batch weighs the same, whichever micro batch it falls in
  local batches, trained = {}, 0
  for k = 1, accumulation do
    batches[k] = sft.collate(next_rows(opts.micro_batch_size), tokenizer.pad_id or 0)
    trained = trained + batches[k].targets:ne(sft.IGNORE_INDEX):sum():item()
  end
  local step_loss = 0
  for _, batch in ipairs(batches) do
    tokens_seen = tokens_seen + batch.inputs:numel()
    local loss = model(batch.inputs, batch.targets, { positions = batch.positions, first_key = batch.first_key,
      reduction = 'sum' }) / math.max(trained, 1)
    loss:backward()
    step_loss = step_loss + loss:item()
  end
  local grad_norm = opts.clip_grad > 0 and pmp.optim.clip_grad_norm(params, opts.clip_grad) or pmp.optim.grad_norm(params)
  optimizer:step()
  loss_sum, count = loss_sum + step_loss, count + 1
  if iteration % opts.log_interval == 0 or iteration == train_iters then
    local now = clock.now()
    print(string.format(' iteration %8d/%8d | elapsed time per iteration (ms): %.1f | learning rate: %.6E | ' ..
      'global batch size: %5d | lm loss: %.6E | grad norm: %.3f | tokens per second: %.0f |', iteration, train_iters,
      (now - interval_start) * 1000 / count, lr, opts.global_batch_size, loss_sum / count, grad_norm,
      tokens_seen / (now - interval_start)))
    interval_start, loss_sum, count, tokens_seen = now, 0, 0, 0
  end
  if opts.save and opts.save_interval > 0 and iteration % opts.save_interval == 0 then save() end
end
if opts.save and (opts.save_interval == 0 or iteration % opts.save_interval ~= 0) then save() end

if embedded then
  print(string.format('sft: exact-match accuracy on %d held-out sums: %.1f%% before, %.1f%% after fine-tuning',
    #held_out, 100 * accuracy_before, 100 * sums_accuracy()))
end

if opts.save_hf then
  -- a pretraining checkpoint's model has Llama's architecture and exports as one
  model:save_pretrained(opts.save_hf, { model_type = base.kind == 'pmp' and 'llama' or nil })
  for _, name in ipairs({ 'tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja' }) do
    local source = pmp.io.join(template_dir or base_dir, name)
    if pmp.io.is_file(source) then pmp.io.write_atomic(pmp.io.join(opts.save_hf, name), pmp.io.read_file(source)) end
  end
  print('sft: saved the fine-tuned model to ' .. opts.save_hf)
end
