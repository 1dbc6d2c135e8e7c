--- Supervised fine-tuning of a Hugging Face model on chat data with its own chat template.
---   pmp recipes/sft.lua --load MODEL_DIR --data-path train.jsonl --save-hf OUT_DIR [--packing]
--- --load also takes a Megatron-LM checkpoint (torch or torch_dist; the architecture from its args) with
--- --tokenizer-model HF_DIR, whose tokenizer and chat template it is trained with; --save-hf writes it
--- as --model-type (default: HF_DIR's config.json model_type, else llama).
--- train.jsonl holds alpaca (instruction/input/output), sharegpt (conversations) or messages
--- (role/content) records, detected per record unless --format says; --data-path PREFIX reads them
--- pre-tokenized by `pmp tools/preprocess_data.lua --sft` instead (the same samples, no tokenizing). Only assistant turns are trained
--- (end-of-turn tokens included); --packing puts several samples in one sequence with positions
--- restarting and attention kept inside each sample. The loss is averaged per trained token over the
--- whole global batch. --save writes Megatron-layout checkpoints (resumable with --load), --save-hf the
--- fine-tuned model as a Hugging Face directory. --lora-rank N trains LoRA adapters on the frozen model
--- instead (--save-lora writes them for PEFT, --merge-lora --save-hf the merged model).
--- Under mpirun it fine-tunes in parallel with pretrain.lua's layout flags and meanings, to the losses of
--- one process (any --load resharded; --save-hf and --save-lora gather on rank 0; adapters split like their layers):
---   mpirun -np 4 pmp recipes/sft.lua --load MODEL_DIR --data-path train.jsonl --packing \
---     --tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer
---
--- With no --load and --data-path it runs the embedded default: it fine-tunes the model that
--- `pmp recipes/pretrain.lua` left in checkpoints/pretrain to answer "a + b = " with the sum, on sums it
--- generates, and prints the exact-match accuracy on held-out sums before and after.
local train = pmp.train
local flags, step = train.flags, train.step

local opts = flags.parse(arg, { {
  { '--data-path', nil, 'jsonl file of conversations, or the PREFIX of tools/preprocess_data.lua --sft output' },
  { '--format', 'auto', 'auto, alpaca, sharegpt or messages', choices = { 'auto', 'alpaca', 'sharegpt', 'messages' } },
  { '--chat-template', nil, 'use a built-in template (chatml, llama3, alpaca) instead of the model\'s', choices = require('pmp.chat_template').builtins },
  { '--packing', false, 'pack several samples per sequence' },
  { '--train-on-prompt', false, 'also train on system/user tokens' },
  { '--skip-bad-records', false, 'skip (and count) records that are malformed or have no assistant turn instead of stopping' },
  { '--epochs', 1, 'passes over the data when --train-iters is 0', integer = true, min = 1 },
  { '--save-hf', nil, 'write the fine-tuned model here as a Hugging Face directory' },
  { '--tokenizer-model', nil, 'with a Megatron-LM checkpoint in --load: the Hugging Face directory of its tokenizer (and chat template)' },
  { '--model-type', nil, "--save-hf of a checkpoint's model: its HF family (models/*.lua; default --tokenizer-model's, else llama)" },
}, flags.training, flags.optimizer, flags.precision, flags.parallel, flags.checkpoint, flags.logging, train.lora.flags, {
  -- the shared flags whose defaults or meaning differ for fine-tuning
  { '--load', nil, 'Hugging Face model directory, Megatron-LM checkpoint (with --tokenizer-model), pretraining ' ..
    'checkpoint, or an SFT checkpoint directory to resume' },
  { '--seq-length', 512, 'tokens per sequence (longer samples are truncated)' },
  { '--micro-batch-size', 4, 'sequences per forward/backward' },
  { '--global-batch-size', 8, 'sequences per optimizer step' },
  { '--train-iters', 0, 'optimizer steps (0: --epochs over the data)' },
  { '--seed', 1234, 'shuffle seed' },
  { '--lr', 1e-5, 'peak learning rate' },
  { '--min-lr', 0.0, 'final learning rate' },
  { '--lr-warmup-iters', 0, 'linear warmup steps' },
  { '--weight-decay', 0.0, 'AdamW weight decay (not on norms and biases)' },
  { '--save', nil, 'checkpoint directory (Megatron layout)' },
  { '--save-interval', 0, 'steps between checkpoints (0: only at the end)' },
  { '--log-interval', 10, 'steps between log lines' },
} }, { usage = 'pmp recipes/sft.lua --load MODEL_DIR --data-path FILE.jsonl [flags]' })
local embedded = not opts.load and not opts.data_path
if embedded then
  opts.load = 'checkpoints/pretrain'
  if not train.Checkpoints.info(opts.load) then
    error('the embedded default fine-tunes checkpoints/pretrain: run `pmp recipes/pretrain.lua` first', 0)
  end
  if opts.train_iters == 0 then opts.train_iters = 300 end
  if opts.lr == 1e-5 then opts.lr = 1e-3 end
  if opts.global_batch_size == 8 then opts.global_batch_size = 16 end
  opts.packing, opts.seq_length = true, math.min(opts.seq_length, 64)
end
if not opts.load then error('--load MODEL_DIR is required', 0) end
if not opts.data_path and not embedded then error('--data-path FILE.jsonl is required', 0) end
if opts.global_batch_size % opts.micro_batch_size ~= 0 then error('--global-batch-size must be a multiple of --micro-batch-size', 0) end

-- The base model: a Hugging Face directory, a Megatron-LM checkpoint, or a pretraining checkpoint (as
-- the embedded default uses). An SFT checkpoint records its base, so --load on one resumes.
local base, resume = train.base_model.locate(opts.load, opts.tokenizer_model)
if opts.tokenizer_model and (base.kind ~= 'megatron' or resume) then
  error('--tokenizer-model is for a Megatron-LM checkpoint in --load; ' .. opts.load .. ' brings its own tokenizer', 0)
end
local model_type = train.base_model.model_type(base, opts.model_type)
if not resume then train.Checkpoints.check_save_dir(opts.save, opts.override_checkpoint) end
train.lora.check(opts, opts.save_hf, resume and resume.state.args)
-- Under mpirun every rank keeps its part of the model (pmp.train.parallel, as pretraining lays it out);
-- split gets the whole model built uninitialized and each rank reads only its part from the files. The
-- layout's checks need the model's depth.
local layout
local function split(whole)
  if opts.save_hf and model_type then train.base_model.check_family(whole, model_type) end
  opts.num_layers = whole.config.num_layers
  layout = train.parallel.init(opts)
  return layout.world > 1 and train.parallel.split(whole, opts, layout, true) or whole
end
local model, tokenizer, template_dir = train.base_model.load(base, { dtype = opts.bf16 and 'bf16' or 'f32',
  recompute_granularity = opts.recompute_granularity, split = split })
local hf = rawget(model, 'hf')
-- adapters on the split model (split like their layers), before data parallelism buckets what trains
train.lora.setup(model, opts, model_type)
local ddp = train.parallel.data_parallel(model, opts, layout)
-- the embedded task is in the corpus' own format: "12 + 7 = 19."
local function sums_format(messages)
  return messages[1].content .. ' = ' .. (messages[2] and messages[2].content .. '.\n' or '')
end
local render = embedded and sums_format or train.base_model.chat_renderer(tokenizer, template_dir, opts.chat_template, base.dir)

-- The embedded task: sums of numbers below 50 (as in the corpus) as messages records; the first 100
-- pairs are held out for the accuracy check.
local held_out = {}
local function sums()
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

local chat_options = { tokenizer = tokenizer, render = render, format = opts.format, train_on_prompt = opts.train_on_prompt,
  skip_bad_records = opts.skip_bad_records }
local samples, trained_tokens, skipped
if embedded then samples, trained_tokens, skipped = train.chat_data.samples(sums(), chat_options)
else samples, trained_tokens, skipped = train.chat_data.from_data_path(opts.data_path, chat_options) end
if #skipped > 0 and layout.rank == 0 then
  print(string.format('sft: skipped %d bad records (--skip-bad-records); the first, %s: %s', #skipped, skipped[1].where,
    skipped[1].why))
end
local rows = opts.packing and pmp.data.sft.pack(samples, opts.seq_length) or pmp.data.sft.pad(samples, opts.seq_length)

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
local accuracy_before = embedded and layout.world == 1 and sums_accuracy()

local optimizer = train.optimizer.adamw(model, opts, ddp)
local train_iters = opts.train_iters > 0 and opts.train_iters or
  math.max(1, math.floor(#rows / opts.global_batch_size)) * opts.epochs
local lr_at = train.optimizer.schedule(opts, train_iters)
local logger = train.Logger(opts, { name = 'sft', enabled = layout.is_logger, train_iters = train_iters })
local checkpoints = train.Checkpoints(opts, logger)
local nan_guard = train.NanGuard(opts, logger)
logger:line(string.format('sft: %d samples (%d trained tokens) in %d %s rows of <= %d tokens; %s; %d steps',
  #samples, trained_tokens, #rows, opts.packing and 'packed' or 'unpacked', opts.seq_length,
  tostring(model):match('^[^\n]*'), train_iters))
if layout.world > 1 then logger:line('sft: ' .. train.parallel.describe(opts, layout)) end

local order = train.Epochs(rows, opts.seed)   -- reshuffled each epoch
local iteration = 0
if resume then
  local state
  iteration, state = checkpoints:load(opts.load, model, optimizer)
  order:seek(state.consumed_rows)
end
local function checkpoint_state() return { consumed_rows = order.position, base_model = base, args = opts } end

local first_iteration = iteration
model:train()
while iteration < train_iters do
  iteration = iteration + 1
  logger:begin_iteration(iteration)
  local lr = lr_at(iteration)
  optimizer.lr = lr
  step.zero_grad(optimizer, ddp)
  -- every trained token of the global batch weighs the same, whichever micro batch or rank it falls in
  local batches, trained, tokens = train.chat_data.micro_batches(order, layout.accumulation, opts.micro_batch_size,
    tokenizer.pad_id or 0, layout.world > 1 and layout or nil, opts.seq_length)
  local loss = step.forward_backward(model, batches, { ddp = ddp, loss_divisor = math.max(trained, 1) })
  step.finish_grads(model, ddp)
  local grad_norm = step.clip_grads(model, optimizer, opts.clip_grad)
  local finite = nan_guard:finite(iteration, grad_norm)
  if finite then optimizer:step() end
  loss = train.parallel.mean_loss(loss, layout)
  logger:iteration(iteration, { lr = lr, loss = loss, grad_norm = grad_norm, tokens = tokens, skipped = not finite })
  checkpoints:save_if_due(iteration, model, optimizer, checkpoint_state)
  if checkpoints:exit_due(iteration) then break end
end
checkpoints:finish(iteration, model, optimizer, checkpoint_state)
logger:finish(iteration - first_iteration)

if embedded and layout.world > 1 then
  logger:line('sft: no accuracy check under a parallel layout (load the checkpoint in one process)')
elseif embedded then
  print(string.format('sft: exact-match accuracy on %d held-out sums: %.1f%% before, %.1f%% after fine-tuning',
    #held_out, 100 * accuracy_before, 100 * sums_accuracy()))
end

train.lora.finish(model, opts, base.dir)
if opts.save_hf then
  local whole = train.parallel.gather_model(model, layout, hf, opts.save_hf .. '.parts')
  if whole then whole:save_pretrained(opts.save_hf, { model_type = model_type }) end
end
if opts.save_hf and layout.rank == 0 then
  for _, name in ipairs({ 'tokenizer.json', 'tokenizer.model', 'qwen.tiktoken', 'tokenizer_config.json', 'chat_template.jinja' }) do
    local source = pmp.io.join(template_dir or base.dir, name)
    if pmp.io.is_file(source) then pmp.io.write_atomic(pmp.io.join(opts.save_hf, name), pmp.io.read_file(source)) end
  end
  print('sft: saved the fine-tuned model to ' .. opts.save_hf)
end
