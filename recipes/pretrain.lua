--- Pretrain a Llama-style GPT from scratch. Flags use Megatron-LM's names; `--help` lists them.
--- With no arguments it trains a small model on the embedded corpus (no data files, no network),
--- saves a checkpoint under checkpoints/pretrain and prints a greedy sample.
---   pmp recipes/pretrain.lua --data-path ../shared/data/tinyshakespeare.txt --tokenizer-type char
--- Under mpirun it trains in parallel with Megatron's layout (the data-parallel size is what is left):
---   mpirun -np 8 pmp recipes/pretrain.lua --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
---     --use-distributed-optimizer
--- The pieces (flags, layout, data, step, logging, checkpoints) are pmp.train's; this is the loop.
local train = pmp.train
local flags, step = train.flags, train.step
-- Megatron-LM's and Pai-Megatron-Patch's run-script flags beyond pmp's sets
local megatron_flags = require 'pmp.train.megatron_flags'
local megatron_defaults = require 'pmp.train.megatron_defaults'
local hf_start = require 'pmp.train.hf_start'

local opts, given = flags.parse(arg, { flags.model, flags.moe, flags.mla, flags.training, flags.optimizer, flags.precision,
  flags.parallel, flags.data, flags.checkpoint, flags.logging, megatron_flags.architecture, megatron_flags.run,
  megatron_flags.ignored, {
    { '--load', nil, 'resume from this checkpoint directory (pmp or Megatron-LM), or start a new run from the weights ' ..
      'of a Hugging Face model directory (its config.json the architecture, its tokenizer the text data\'s)' },
    { '--save', 'checkpoints/pretrain', 'checkpoint directory ("" for none; the default one is replaced by every run that does not resume it)' },
    { '--sample-length', 200, 'characters of greedy sample at the end (0: none)', integer = true, min = 0 },
  } }, {
  usage = 'pmp recipes/pretrain.lua [flags]',
  description = 'Pretrain a GPT (by default Llama-style: RMSNorm, RoPE, SwiGLU, GQA) from scratch.\n' ..
    'Defaults: a run on Megatron indexed data (--data-path PREFIX or blend, --train-data-path) gets Megatron-LM\'s\n' ..
    'default for every flag it leaves out, and needs the flags Megatron requires (--num-layers --hidden-size\n' ..
    '--num-attention-heads --max-position-embeddings --seq-length --micro-batch-size --lr, --train-iters or\n' ..
    '--train-samples): --hidden-dropout 0.1, --weight-decay 0.01, --adam-beta2 0.999, --lr-decay-style linear,\n' ..
    '--min-lr 0, --lr-warmup-iters 0, --eval-interval 1000, --eval-iters 100, --log-interval 100, --save-interval\n' ..
    '(none: only at the end), --exit-signal-handler off, --normalization LayerNorm, --position-embedding-type\n' ..
    'learned_absolute, --ffn-hidden-size 4 x hidden (--swiglu: 8/3 x hidden rounded down to 64), --global-batch-size\n' ..
    'micro batch x data-parallel size, --attention-dropout 0.1 (attention runs unfused while training: give 0 for\n' ..
    'the fused kernels), a GELU MLP (the exact erf GELU; --swiglu for SwiGLU) and a bias on every linear layer\n' ..
    '(--disable-bias-linear for none). The embedded corpus and text files keep the defaults listed below.',
})
local megatron_run = megatron_defaults.apply(opts, given)
local flag_notes = megatron_flags.resolve(opts, given)

-- One process unless started by mpirun; only the last rank logs, as in Megatron.
local layout = train.parallel.init(opts)
-- --train-samples: the iterations it makes at this global batch
train.optimizer.resolve_samples(opts, given)

-- A checkpoint in --load resumes the run: its tokenizer, weights, optimizer, data position and generators.
-- A Hugging Face model directory in --load starts a new run from its weights (and tokenizer, for text).
-- A fresh run refuses a --save holding another run's checkpoint, except the default scratch directory.
local hf_dir = hf_start.is_hf_dir(opts.load) and opts.load or nil
local resume
if hf_dir then
  train.Checkpoints.check_save_dir(opts.save, opts.override_checkpoint or not given.save)
  if not train.data.is_indexed(opts) and not opts.train_data_path then
    opts.tokenizer_model = hf_start.tokenizer_model(opts, hf_dir)
  end
else
  resume = train.Checkpoints.resume(opts.load, opts.save, opts.override_checkpoint or not given.save)
end
-- the Hugging Face model a run (or the run it resumes) started from: its architecture, not the flags'
local hf_base = hf_dir or (resume and resume.state.hf_base)
local data = train.data.pretraining(opts, { tokenizer_state = resume and resume.state.tokenizer, name = 'pretrain' })
local tokenizer = data.tokenizer
-- Megatron's document boundaries (--eod-mask-loss, --reset-position-ids, --reset-attention-mask)
local documents
if opts.eod_mask_loss or opts.reset_position_ids or opts.reset_attention_mask then
  if not tokenizer.eod then
    error(string.format('--eod-mask-loss/--reset-position-ids/--reset-attention-mask: the %s tokenizer has no ' ..
      'end-of-document token', tokenizer.type), 0)
  end
  documents = { eod = tokenizer.eod, eod_mask_loss = opts.eod_mask_loss, reset_position_ids = opts.reset_position_ids,
    reset_attention_mask = opts.reset_attention_mask }
end

-- Pai-Megatron-Patch's --extra-vocab-size sets the padded vocabulary (else --make-vocab-size-divisible-by does)
opts.padded_vocab_size = megatron_flags.padded_vocab_size(opts, given, tokenizer)
-- Every rank builds the whole model from the same seed (or reads it) and keeps its part of it.
pmp.manual_seed(opts.seed)
local whole
if hf_dir then
  whole = hf_start.model(hf_dir, opts, given, tokenizer)
elseif hf_base then
  whole = require('pmp.checkpoint').load_model(opts.load)   -- the architecture its checkpoint records
else
  whole = train.model.gpt(opts, tokenizer.vocab_size)
end
local model = train.parallel.split(whole, opts, layout)
local ddp = train.parallel.data_parallel(model, opts, layout)
local optimizer = train.optimizer.adamw(model, opts, ddp)
local lr_at = train.optimizer.schedule(opts, opts.train_iters)

local logger = train.Logger(opts, { name = 'pretrain', enabled = layout.is_logger, train_iters = opts.train_iters,
  consumed = true, flops_per_token = train.throughput.flops_per_token(model.config, opts.seq_length),
  peak_flops = train.throughput.measured_peak_flops(opts.bf16 and 'bf16' or opts.fp16 and 'f16' or 'f32'),
  world_size = layout.world })
local ignored = megatron_flags.ignored_line(given)
if ignored then logger:line('pretrain: ' .. ignored) end
for _, note in ipairs(flag_notes) do logger:line('pretrain: ' .. note) end
if hf_dir then logger:line('pretrain: a new run from the weights of the Hugging Face model in ' .. hf_dir) end
if megatron_run then logger:line("pretrain: indexed data: Megatron-LM's defaults for the flags left out (see --help)") end
local checkpoints = train.Checkpoints(opts, logger)
local nan_guard = train.NanGuard(opts, logger)
-- --fp16: Megatron's loss scaler, which skips the steps whose gradients overflowed
local scaler = opts.fp16 and train.LossScaler(opts) or nil
-- after everything that draws random numbers, so the restored generator state is the one used
-- samples trained, and validation samples evaluated (each evaluation moves on through the split, as Megatron's)
-- scheduler_steps: the steps of the learning-rate schedule; as in Megatron, an --fp16 step skipped for
-- an overflow leaves the rate where it was
local iteration, consumed, consumed_valid, scheduler_steps = 0, 0, 0, 0
if resume then
  local state
  iteration, state = checkpoints:load(opts.load, model, not opts.no_load_optim and optimizer or nil,
    { rng = not opts.no_load_rng })
  consumed, consumed_valid = state.consumed_samples, state.consumed_valid_samples or 0
  -- --bf16/--fp16 master weights were made from the initial weights: without the loaded optimizer
  -- state they must be the loaded ones
  if opts.no_load_optim then optimizer:refresh_master() end
  scheduler_steps = state.scheduler_steps or iteration
  if scaler and state.loss_scaler and not opts.no_load_optim then scaler:load(state.loss_scaler) end
  -- Megatron's --finetune: the loaded weights start a new run
  if opts.finetune then iteration, consumed, consumed_valid, scheduler_steps, checkpoints.first_iteration = 0, 0, 0, 0, 0 end
end
-- what checkpoints save of the optimizer (--no-save-optim: nothing)
local saved_optimizer = not opts.no_save_optim and optimizer or nil
local function checkpoint_state()
  return { consumed_samples = consumed, consumed_valid_samples = consumed_valid, scheduler_steps = scheduler_steps,
    loss_scaler = scaler and scaler:state(), hf_base = hf_base, tokenizer = tokenizer:state(), args = opts,
    model_config = model.config }
end

logger:line(string.format('pretrain: %s, %d tokens (%s tokenizer, vocabulary %d); %s', data.source, data.num_tokens,
  tokenizer.type, tokenizer.vocab_size, tostring(model):match('^[^\n]*')))
logger:line(string.format('pretrain: %d train samples, %d steps x %d samples x %d tokens, %d threads, GEMM peak %.1f GFLOP/s',
  data.train.count, opts.train_iters, opts.global_batch_size, opts.seq_length, pmp.num_threads(), logger.peak_flops / 1e9))
if layout.world > 1 then logger:line('pretrain: ' .. train.parallel.describe(opts, layout)) end

-- Megatron's --calculate-per-token-loss: a step's loss is the mean over all the tokens it trains. Only
-- --eod-mask-loss makes micro batches train different numbers of tokens; without it the mean of the
-- micro batches' means is the same thing, so the divisor is needed only then.
local per_token = opts.calculate_per_token_loss and opts.eod_mask_loss
if per_token and layout.world > 1 then
  error('--calculate-per-token-loss with --eod-mask-loss: pmp counts the tokens in one process only', 0)
end
local function trained_tokens(batches)
  local n = 0
  for _, mb in ipairs(batches) do n = n + mb.targets:ne(-100):sum():item() end
  return n
end

-- The mean loss over Megatron's --eval-iters global batches of a split from sample `first` on.
local function evaluate(dataset, first)
  local count = opts.eval_iters * layout.accumulation
  local batches = train.data.micro_batches(dataset, first, count, opts.micro_batch_size, layout, true, documents)
  if not per_token then return step.evaluate(model, batches, layout) end
  model:eval()
  local n = trained_tokens(batches)
  local sum = step.forward_backward(model, batches, { forward_only = true, loss_divisor = n })
  model:train()
  return sum / n
end

-- Validation reads on from where the last one stopped, as Megatron's validation iterator does.
local function validate()
  local loss = evaluate(data.valid, consumed_valid)
  consumed_valid = consumed_valid + opts.eval_iters * opts.global_batch_size
  return loss
end

local first_iteration, stopped = iteration, false
while iteration < opts.train_iters do
  iteration = iteration + 1
  logger:begin_iteration(iteration)
  -- Megatron's scheduler steps after the optimizer: an iteration trains at the rate of the global batches
  -- stepped before it (0 on a warmup's first iteration) and logs the rate it then steps to
  optimizer.lr = lr_at(scheduler_steps)
  step.zero_grad(optimizer, ddp)
  local batches = train.data.micro_batches(data.train, consumed, layout.accumulation, opts.micro_batch_size, layout, false,
    documents)
  local loss = step.forward_backward(model, batches, { ddp = ddp, loss_divisor = per_token and trained_tokens(batches) or nil,
    grad_scale = scaler and scaler.scale })
  consumed = consumed + opts.global_batch_size
  step.finish_grads(model, ddp)
  if scaler then train.LossScaler.main_grads(model, scaler.scale) end
  -- the global norm, the same on every rank: an overflow anywhere makes it Inf or NaN
  local grad_norm = step.clip_grads(model, optimizer, opts.clip_grad)
  local finite
  if scaler then
    finite = scaler:update(grad_norm ~= grad_norm or math.abs(grad_norm) == math.huge)
  else
    finite = nan_guard:finite(iteration, grad_norm)
  end
  if finite then optimizer:step() end
  -- a step pmp's NanGuard skipped moves the schedule on; only the loss scaler's skips hold it
  if finite or not scaler then scheduler_steps = scheduler_steps + 1 end
  local lr = lr_at(scheduler_steps)
  loss = train.parallel.mean_loss(loss, layout)
  local aux, aux_layers = pmp.nn.moe.take_aux_losses()
  logger:iteration(iteration, { lr = lr, loss = loss, grad_norm = grad_norm, consumed = consumed, skipped = not finite,
    loss_scale = scaler and scaler.scale,
    tokens = opts.global_batch_size * opts.seq_length, aux_losses = train.parallel.mean_aux_losses(aux, layout, aux_layers) })
  if data.valid and opts.eval_iters > 0 and opts.eval_interval > 0 and iteration % opts.eval_interval == 0 then
    logger:validation(iteration, validate)
  end
  checkpoints:save_if_due(iteration, model, saved_optimizer, checkpoint_state)
  if checkpoints:exit_due(iteration) then stopped = true; break end
end
checkpoints:finish(iteration, model, saved_optimizer, checkpoint_state)
-- Megatron's end of training: the validation split (reading on) and the test split (from its start);
-- a run stopped by --exit-interval, a time limit or a signal ends without them, as Megatron's exits.
if not stopped and opts.eval_iters > 0 then
  if data.valid then logger:validation(iteration, validate, 'validation') end
  if data.test then logger:validation(iteration, function() return evaluate(data.test, 0) end, 'test') end
end
logger:finish(iteration - first_iteration)

-- A greedy sample from the start of the validation text.
if opts.sample_length > 0 and layout.world > 1 then
  logger:line('pretrain: no sample under a parallel layout (load the checkpoint in one process: recipes/generate.lua)')
elseif opts.sample_length > 0 then
  model:eval()
  local context = {}
  local prompt_ids = (data.valid_tokens or data.train_tokens):narrow(1, 1, math.min(16, opts.seq_length)):totable()
  for k, id in ipairs(prompt_ids) do context[k] = id end
  local produced = {}
  pmp.no_grad(function()
    for _ = 1, opts.sample_length do
      local window = {}
      for k = math.max(1, #context - opts.seq_length + 1), #context do window[#window + 1] = context[k] end
      local logits = model(pmp.tensor({ window }, { dtype = 'i64' }))
      local next_id = logits:select(2, #window):argmax():item()
      context[#context + 1] = next_id
      produced[#produced + 1] = next_id
    end
  end)
  print('sample: ' .. tokenizer:decode(prompt_ids) .. '|' .. tokenizer:decode(produced))
end
