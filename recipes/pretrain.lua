-- Pretrain a Llama-style GPT from scratch. Flags use Megatron-LM's names; `--help` lists them.
-- With no arguments it trains a small model on the embedded corpus (no data files, no network),
-- saves a checkpoint under checkpoints/pretrain and prints a greedy sample.
--   pmp recipes/pretrain.lua --data-path ../shared/data/tinyshakespeare.txt --tokenizer-type char
-- Under mpirun it trains in parallel with Megatron's layout (the data-parallel size is what is left):
--   mpirun -np 8 pmp recipes/pretrain.lua --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
--     --use-distributed-optimizer
local F = pmp.nn.functional

local FLAGS = {
  { '--num-layers', 4, 'transformer layers' },
  { '--hidden-size', 192, 'model width' },
  { '--ffn-hidden-size', 0, 'MLP width (0: 8/3 of hidden for SwiGLU, rounded to 64)' },
  { '--num-attention-heads', 6, 'attention heads' },
  { '--num-query-groups', 0, 'KV heads for GQA (0: as many as attention heads)' },
  { '--seq-length', 64, 'tokens per sample' },
  { '--micro-batch-size', 16, 'samples per forward/backward' },
  { '--global-batch-size', 16, 'samples per optimizer step (a multiple of the micro batch)' },
  { '--train-iters', 300, 'optimizer steps' },
  { '--lr', 1e-3, 'peak learning rate' },
  { '--min-lr', 1e-4, 'final learning rate' },
  { '--lr-warmup-iters', 30, 'linear warmup steps' },
  { '--lr-decay-iters', 0, 'steps of decay (0: train-iters)' },
  { '--lr-decay-style', 'cosine', 'cosine, linear, constant or WSD' },
  { '--lr-wsd-decay-iters', 0, 'WSD: length of the final anneal' },
  { '--weight-decay', 0.1, 'AdamW decoupled weight decay (not on norms and biases)' },
  { '--adam-beta1', 0.9, 'AdamW beta1' },
  { '--adam-beta2', 0.95, 'AdamW beta2' },
  { '--adam-eps', 1e-8, 'AdamW epsilon' },
  { '--clip-grad', 1.0, 'global gradient-norm clipping (0: off)' },
  { '--hidden-dropout', 0.0, 'dropout on residual branches' },
  { '--init-method-std', 0.02, 'weight init standard deviation' },
  { '--rotary-base', 10000, 'RoPE theta' },
  { '--norm-epsilon', 1e-5, 'RMSNorm epsilon' },
  { '--untie-embeddings-and-output-weights', false, 'separate output layer' },
  { '--seed', 1234, 'random seed' },
  { '--make-vocab-size-divisible-by', 128, 'pad the vocabulary to a multiple of this times the tensor-parallel size' },
  { '--tensor-model-parallel-size', 1, 'tensor-parallel ranks (run under mpirun)' },
  { '--pipeline-model-parallel-size', 1, 'pipeline stages (run under mpirun)' },
  { '--sequence-parallel', false, 'norms and dropout on sequence shards of the tensor-parallel group' },
  { '--context-parallel-size', 1, 'ranks that split every sequence, attention gathering keys and values (run under mpirun)' },
  { '--decoder-first-pipeline-num-layers', 0, 'layers on the first pipeline stage (0: even split)' },
  { '--decoder-last-pipeline-num-layers', 0, 'layers on the last pipeline stage (0: even split)' },
  { '--num-layers-per-virtual-pipeline-stage', 0, 'layers per virtual pipeline stage: the interleaved schedule (0: off)' },
  { '--use-distributed-optimizer', false, 'shard f32 master weights and Adam moments over data-parallel ranks (ZeRO-1)' },
  { '--overlap-grad-reduce', true, 'reduce gradient buckets during backward (--overlap-grad-reduce=false: after it)' },
  { '--distributed-timeout-minutes', 10, 'a collective that makes no progress this long ends the job' },
  { '--bf16', false, 'bf16 parameters and activations, f32 master weights and optimizer state' },
  { '--recompute-granularity', nil, "'full': re-run each layer's forward in backward to save memory" },
  { '--data-path', nil, 'a text file, an indexed dataset PREFIX, or weighted prefixes "0.3 a 0.7 b" (default: the embedded corpus)', multiple = true },
  { '--split', '969,30,1', 'train,valid,test weights' },
  { '--tokenizer-type', 'char', 'char or byte' },
  { '--tokenizer-model', nil, 'Hugging Face tokenizer directory (tokenizer.json)' },
  { '--eval-interval', 100, 'steps between validations' },
  { '--eval-iters', 10, 'micro batches per validation' },
  { '--save', 'checkpoints/pretrain', 'checkpoint directory ("" for none)' },
  { '--save-interval', 150, 'steps between checkpoints' },
  { '--exit-interval', 0, 'stop (saving a checkpoint) after an iteration divisible by this (0: never)' },
  { '--load', nil, 'resume from this checkpoint directory' },
  { '--tensorboard-dir', nil, 'write TensorBoard event files here' },
  { '--log-interval', 20, 'steps between log lines' },
  { '--profile', false, 'time every engine op from --profile-step-start to --profile-step-end and print the table' },
  { '--profile-step-start', 10, 'first profiled iteration' },
  { '--profile-step-end', 12, 'last profiled iteration' },
  { '--sample-length', 200, 'characters of greedy sample at the end (0: none)' },
}

local ok, opts = pcall(pmp.args.parse, arg, FLAGS, {
  usage = 'pmp recipes/pretrain.lua [flags]',
  description = 'Pretrain a GPT (Llama-style: RMSNorm, RoPE, SwiGLU, GQA) from scratch.',
})
if not ok then
  io.stderr:write('pretrain: ' .. tostring(opts) .. '\n')
  os.exit(2)
end

local function fail(message)
  io.stderr:write('pretrain: ' .. message .. '\n')
  os.exit(2)
end

---------------------------------------------------------------------------------------------------
-- Parallel layout: one process unless started by mpirun. Only the last rank (last pipeline stage, last
-- tensor-, context- and data-parallel rank) logs, as in Megatron.

local tp, pp, cp = opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size, opts.context_parallel_size
local got_layout, layout = pcall(pmp.dist.init, { tp = tp, pp = pp, cp = cp,
  timeout = opts.distributed_timeout_minutes * 60 })
if not got_layout then fail(tostring(layout):gsub('^pmp%.dist%.init: ', '')) end
local dp = layout.dp
local is_logger = layout.rank == layout.world - 1
local function log(...) if is_logger then print(...) end end
if opts.sequence_parallel and tp == 1 then opts.sequence_parallel = false end

-- Context parallelism cuts every sequence into 2 x cp chunks (pmp.nn.context_parallel); sequence
-- parallelism then cuts a rank's two chunks into tp slices.
if opts.seq_length % (2 * cp) ~= 0 then
  fail(string.format('--seq-length %d is not divisible by 2 x --context-parallel-size %d (each rank holds two chunks ' ..
    'of every sequence)', opts.seq_length, cp))
end
if opts.sequence_parallel and (opts.seq_length / cp) % tp ~= 0 then
  fail(string.format('--sequence-parallel needs --seq-length %d / --context-parallel-size %d divisible by ' ..
    '--tensor-model-parallel-size %d', opts.seq_length, cp, tp))
end

if opts.global_batch_size % (opts.micro_batch_size * dp) ~= 0 then
  fail(string.format('--global-batch-size %d is not a multiple of --micro-batch-size %d x data-parallel size %d',
    opts.global_batch_size, opts.micro_batch_size, dp))
end

-- Interleaved pipeline: each stage holds `virtual` chunks of --num-layers-per-virtual-pipeline-stage
-- layers (Megatron: virtual size = num_layers / pp / that), and a step needs a multiple of pp micro batches.
local virtual = 1
local per_virtual = opts.num_layers_per_virtual_pipeline_stage
if per_virtual > 0 then
  if pp == 1 then fail('--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1') end
  if opts.num_layers % (pp * per_virtual) ~= 0 then
    fail(string.format('--num-layers %d is not a multiple of --pipeline-model-parallel-size %d x ' ..
      '--num-layers-per-virtual-pipeline-stage %d', opts.num_layers, pp, per_virtual))
  end
  virtual = opts.num_layers / (pp * per_virtual)
  local micro = opts.global_batch_size / (opts.micro_batch_size * dp)
  if micro % pp ~= 0 then
    fail(string.format('the interleaved schedule needs the micro batches per step (%d) to be a multiple of ' ..
      '--pipeline-model-parallel-size %d', micro, pp))
  end
end

---------------------------------------------------------------------------------------------------
-- Data

-- Checkpoints of any layout load into any other (pmp.checkpoint reshards them); what is read here is
-- the saved state (tokenizer, data position) needed before the model is built.
local resume_info
if opts.load and pmp.checkpoint.latest_iteration(opts.load) then
  local got, info = pcall(pmp.checkpoint.info, opts.load)
  if not got then fail('--load: ' .. tostring(info)) end
  resume_info = info
end

-- --data-path is a plain text file (tokenized here), or Megatron indexed datasets: `PREFIX` or a blend
-- `0.3 PREFIX_A 0.7 PREFIX_B` (as made by tools/preprocess_data.lua), read through pmp.data.gpt_dataset.
-- Either way the data position is the count of consumed samples, so a resumed run continues with the
-- sample after the last one it trained on.
local source, tokenizer, tokens, train_tokens, valid_tokens, train_data, valid_data
local tokenizers = pmp.data.tokenizers
local indexed_data = opts.data_path and (#opts.data_path > 1 or pmp.data.indexed.exists(opts.data_path[1]))

if indexed_data then
  local gpt_dataset, dataset_tokenizer = pmp.data.gpt_dataset, pmp.data.dataset_tokenizer
  local ok, prefixes = pcall(gpt_dataset.parse_blend, opts.data_path)
  if not ok then fail('--data-path: ' .. tostring(prefixes):gsub('^gpt dataset: ', '')) end
  for _, prefix in ipairs(prefixes) do
    if not pmp.data.indexed.exists(prefix) then fail('--data-path: no indexed dataset ' .. prefix .. '.bin/.idx') end
  end
  -- The tokenizer: the checkpoint's when resuming, else the one tools/preprocess_data.lua recorded next
  -- to the data (PREFIX.tokenizer.json), else --tokenizer-model / --tokenizer-type byte.
  local got, tok = pcall(function()
    if resume_info then return dataset_tokenizer.from_state(resume_info.state.tokenizer) end
    local state = dataset_tokenizer.load(prefixes[1])
    for k = 2, #prefixes do
      if pmp.json.encode(dataset_tokenizer.load(prefixes[k]) or {}) ~= pmp.json.encode(state or {}) then
        error(prefixes[k] .. ' was tokenized differently from ' .. prefixes[1], 0)
      end
    end
    if state then return dataset_tokenizer.from_state(state) end
    if opts.tokenizer_model then return dataset_tokenizer.hf(opts.tokenizer_model) end
    if opts.tokenizer_type == 'byte' then return dataset_tokenizer.byte() end
    error(prefixes[1] .. dataset_tokenizer.SUFFIX .. ' (written by tools/preprocess_data.lua) is missing: ' ..
      'give --tokenizer-model DIR, or --tokenizer-type byte for byte-level data', 0)
  end)
  if not got then fail('--data-path: ' .. tostring(tok)) end
  tokenizer = tok
  local built
  ok, built = pcall(gpt_dataset.build, opts.data_path, {
    seq_length = opts.seq_length, seed = opts.seed, split = opts.split,
    -- Megatron's train_val_test_num_samples, so each split's order is the one Megatron builds
    sizes = { train = opts.train_iters * opts.global_batch_size,
              valid = (math.floor(opts.train_iters / math.max(opts.eval_interval, 1)) + 1) * opts.eval_iters * opts.global_batch_size,
              test = opts.eval_iters * opts.global_batch_size },
  })
  if not ok then fail(tostring(built)) end
  for _, warning in ipairs(built.warnings) do print('pretrain: warning: ' .. warning) end
  train_data, valid_data = built.train, built.valid
  if not train_data then fail('--data-path: the --split ' .. opts.split .. ' leaves no training data') end
  local total = 0
  for _, ds in ipairs(built.indexed) do total = total + ds.num_tokens end
  tokens = { numel = function() return total end }
  train_tokens = train_data:sample(0)
  valid_tokens = valid_data and valid_data:sample(0)
  source = table.concat(opts.data_path, ' ')
else
  local text
  if opts.data_path then
    source = opts.data_path[1]
    local file = io.open(source, 'rb')
    if not file then fail('cannot read --data-path ' .. source .. ' (neither a text file nor an indexed dataset prefix)') end
    text = file:read('*a')
    file:close()
  else
    source = 'the embedded corpus'
    text = pmp.data.tiny_corpus.generate()
  end

  if resume_info then
    tokenizer = pmp.data.dataset_tokenizer.from_state(resume_info.state.tokenizer)
  elseif opts.tokenizer_model then
    tokenizer = pmp.data.dataset_tokenizer.hf(opts.tokenizer_model)
  elseif opts.tokenizer_type == 'char' then
    tokenizer = tokenizers.char_from_text(text)
  elseif opts.tokenizer_type == 'byte' then
    tokenizer = tokenizers.byte()
  else
    fail("--tokenizer-type must be char or byte, got '" .. tostring(opts.tokenizer_type) .. "'")
  end

  tokens = pmp.tensor(tokenizer:encode(text), { dtype = 'i64' })
  train_tokens, valid_tokens = pmp.data.TextDataset.split(tokens, opts.split)
  train_data = pmp.data.TextDataset(train_tokens, opts.seq_length, opts.seed)
  valid_data = valid_tokens and valid_tokens:numel() > opts.seq_length and pmp.data.TextDataset(valid_tokens, opts.seq_length, opts.seed + 1)
end

---------------------------------------------------------------------------------------------------
-- Model and optimizer

pmp.manual_seed(opts.seed)
local ffn = opts.ffn_hidden_size
if ffn == 0 then ffn = math.floor((opts.hidden_size * 8 / 3 + 63) / 64) * 64 end
local model = pmp.nn.GPTModel({
  num_layers = opts.num_layers,
  hidden_size = opts.hidden_size,
  ffn_hidden_size = ffn,
  num_attention_heads = opts.num_attention_heads,
  num_query_groups = opts.num_query_groups > 0 and opts.num_query_groups or opts.num_attention_heads,
  vocab_size = tokenizer.vocab_size,
  rotary_base = opts.rotary_base,
  norm_epsilon = opts.norm_epsilon,
  init_std = opts.init_method_std,
  hidden_dropout = opts.hidden_dropout,
  tie_embeddings = not opts.untie_embeddings_and_output_weights,
  recompute_granularity = opts.recompute_granularity,
  make_vocab_size_divisible_by = opts.make_vocab_size_divisible_by,
  tensor_model_parallel_size = tp,
})
-- Every rank built the whole model from the same seed; now it keeps its pipeline stage and its
-- tensor-parallel shard, so the initial weights are the single-process model's whatever the layout.
-- With virtual stages the model becomes a pmp.dist.pipeline.Chunks of this stage's chunks.
local got_parts, why = pcall(function()
  model = pmp.dist.pipeline.stage(model, {
    first_stage_layers = opts.decoder_first_pipeline_num_layers > 0 and opts.decoder_first_pipeline_num_layers or nil,
    last_stage_layers = opts.decoder_last_pipeline_num_layers > 0 and opts.decoder_last_pipeline_num_layers or nil,
    virtual_stages = virtual,
  })
  for _, chunk in ipairs(pmp.dist.pipeline.chunks(model)) do
    pmp.nn.parallel.tensor_parallel(chunk, { sequence_parallel = opts.sequence_parallel })
    pmp.nn.parallel.context_parallel(chunk)
  end
end)
if not got_parts then fail(tostring(why)) end
if opts.bf16 then model:to('bf16') end

-- Data parallelism: gradient buckets averaged (or reduce-scattered for the distributed optimizer) over
-- the data- and context-parallel ranks ('dp_cp') while backward runs. Context-parallel ranks hold the
-- same parameters, each with the gradient of its part of the sequences, so they need the average too.
local ddp
if dp > 1 or cp > 1 or opts.use_distributed_optimizer then
  ddp = pmp.dist.ddp.DistributedDataParallel(model, {
    overlap = opts.overlap_grad_reduce, distributed_optimizer = opts.use_distributed_optimizer,
  })
end

-- No weight decay on norms and biases (1-D parameters), as Megatron does.
local adam_options = {
  lr = opts.lr, betas = { opts.adam_beta1, opts.adam_beta2 }, eps = opts.adam_eps, weight_decay = opts.weight_decay,
}
local optimizer
if opts.use_distributed_optimizer then
  adam_options.ddp = ddp
  optimizer = pmp.optim.DistributedOptimizer(pmp.optim.decay_groups(model), adam_options)
else
  optimizer = pmp.optim.AdamW(pmp.optim.decay_groups(model), adam_options)
end
local lr_at = pmp.optim.schedule.new({
  max_lr = opts.lr, min_lr = opts.min_lr, warmup_iters = opts.lr_warmup_iters,
  decay_iters = opts.lr_decay_iters > 0 and opts.lr_decay_iters or opts.train_iters,
  style = opts.lr_decay_style:lower(), wsd_decay_iters = opts.lr_wsd_decay_iters,
})
local params = model:parameters()


---------------------------------------------------------------------------------------------------
-- Throughput accounting: model FLOPs per token (matmuls x 3 for forward + backward) against the
-- GEMM rate measured on this machine now, since a CPU has no single datasheet peak.

local c = model.config
local tokens_per_step = opts.global_batch_size * opts.seq_length
-- from the whole model's config: a rank holds only its part
local per_layer = c.hidden_size * (c.num_attention_heads + 2 * c.num_query_groups) * c.kv_channels
  + c.num_attention_heads * c.kv_channels * c.hidden_size
  + c.hidden_size * c.ffn_hidden_size * (c.activation == 'swiglu' and 3 or 2)
local flops_per_token = 6 * (c.num_layers * per_layer + c.vocab_size * c.hidden_size)
  + 12 * c.num_layers * opts.seq_length * c.num_attention_heads * c.kv_channels
local clock = require('pmp.clock')
-- In the training dtype: bf16 GEMMs run on other units (AMX, AVX512-BF16) than f32 ones.
local function measured_peak_flops()
  local dtype = opts.bf16 and 'bf16' or 'f32'
  local a, b = pmp.randn(1024, 1024):to(dtype), pmp.randn(1024, 1024):to(dtype)
  pmp.matmul(a, b)
  local start, n = clock.now(), 0
  while clock.now() - start < 0.3 do
    pmp.matmul(a, b)
    n = n + 1
  end
  return n * 2 * 1024 ^ 3 / (clock.now() - start)
end
local peak = measured_peak_flops()

-- Resume after everything that draws random numbers, so the restored generator state is the one used.
local iteration, consumed = 0, 0
if resume_info then
  local info = pmp.checkpoint.load(opts.load, model, optimizer)
  iteration, consumed = info.iteration, info.state.consumed_samples
  log(string.format(' loaded checkpoint from %s at iteration %d%s', opts.load, iteration,
    info.resharded and ' (resharded from another parallel layout)' or ''))
end

log(string.format('pretrain: %s, %d tokens (%s tokenizer, vocabulary %d); %s',
  source, tokens:numel(), tokenizer.type, tokenizer.vocab_size, tostring(model):match('^[^\n]*')))
log(string.format('pretrain: %d train samples, %d steps x %d samples x %d tokens, %d threads, GEMM peak %.1f GFLOP/s',
  train_data.count, opts.train_iters, opts.global_batch_size, opts.seq_length, pmp.num_threads(), peak / 1e9))
if layout.world > 1 then
  log(string.format('pretrain: %d processes: tensor-parallel %d%s, pipeline-parallel %d%s, context-parallel %d, ' ..
    'data-parallel %d%s', layout.world, tp, opts.sequence_parallel and ' (sequence parallel)' or '', pp,
    virtual > 1 and string.format(' (%d virtual stages each)', virtual) or '', cp, dp,
    opts.use_distributed_optimizer and ' (distributed optimizer)' or ''))
end

local tb = is_logger and opts.tensorboard_dir and pmp.tensorboard.writer(opts.tensorboard_dir)

---------------------------------------------------------------------------------------------------
-- Training

local accumulation = opts.global_batch_size / (opts.micro_batch_size * dp)
local pipeline = pmp.dist.pipeline

-- This data-parallel rank's share of the samples from `first` on, in Megatron's order: micro-step k
-- of data-parallel rank r reads the micro batch at first + (k * dp + r) * micro_batch_size. Each
-- context-parallel rank keeps its two chunks of every sequence.
local context_parallel = pmp.nn.context_parallel
local function micro_batches(data, first, count, wrap)
  local list = {}
  for k = 0, count - 1 do
    local start = first + (k * dp + layout.dp_rank) * opts.micro_batch_size
    if wrap then start = start % data.count end
    local x, y = data:batch(start, opts.micro_batch_size)
    list[#list + 1] = { ids = context_parallel.split(x), targets = context_parallel.split(y) }
  end
  return list
end

-- Forward (and backward) over the micro batches; the mean loss on the last pipeline stage, nil on the
-- others. With data parallelism only the last micro batch's backward reduces gradients.
local function forward_backward(batches, forward_only)
  if ddp and not forward_only then ddp:set_sync(false) end
  if pp > 1 then
    return pipeline.forward_backward(model, batches, { forward_only = forward_only,
      before_last_backward = ddp and function() ddp:set_sync(true) end })
  end
  local total = 0
  for k, mb in ipairs(batches) do
    if forward_only then
      total = total + pmp.no_grad(function() return model(mb.ids, mb.targets):item() end)
    else
      if ddp then ddp:set_sync(k == #batches) end
      local loss = model(mb.ids, mb.targets)
      -- one micro batch needs no scaling (x / 1 is x, forward and backward), so no extra ops
      ;(#batches == 1 and loss or loss / #batches):backward()
      total = total + loss:item()
    end
  end
  return total / #batches
end

-- A last-stage loss averaged over the data- and context-parallel ranks (which all hold one: a
-- context-parallel rank its share of the mean over whole sequences, see pmp.nn.context_parallel).
local function data_parallel_mean(loss)
  if loss == nil or dp * cp == 1 then return loss end
  local t = pmp.tensor({ loss }, { dtype = 'f64' })
  pmp.dist.group('dp_cp'):all_reduce(t, 'avg')
  return t:item()
end

local function evaluate()
  model:eval()
  local loss = forward_backward(micro_batches(valid_data, 0, math.max(1, math.floor(opts.eval_iters / dp)), true), true)
  model:train()
  return data_parallel_mean(loss)
end

local function save()
  if opts.save == '' then return end
  local state = { consumed_samples = consumed, tokenizer = tokenizer:state(), args = opts, model_config = model.config }
  pmp.checkpoint.save(opts.save, iteration, model, optimizer, state)
  log(string.format(' saved checkpoint to %s at iteration %d', opts.save, iteration))
end

local function duration(seconds)
  seconds = math.max(0, math.floor(seconds + 0.5))
  return string.format('%02d:%02d:%02d', math.floor(seconds / 3600), math.floor(seconds / 60) % 60, seconds % 60)
end

local first_iteration = iteration
local interval_start, loss_sum, loss_count, run_start = clock.now(), 0, 0, clock.now()
while iteration < opts.train_iters do
  iteration = iteration + 1
  if opts.profile and iteration == opts.profile_step_start then pmp.profile.start() end
  local lr = lr_at(iteration)
  optimizer.lr = lr
  optimizer:zero_grad()
  if ddp then ddp:zero_grad() end
  local step_loss = forward_backward(micro_batches(train_data, consumed, accumulation))
  consumed = consumed + opts.global_batch_size
  -- gradients complete: data-parallel buckets in, then the sums over tensor-parallel ranks (sequence
  -- parallel norms) and over the pipeline's two copies of a tied embedding
  if ddp then ddp:finish_grad_sync() end
  for _, chunk in ipairs(pipeline.chunks(model)) do pmp.nn.parallel.finish_grads(chunk) end
  pipeline.sync_embedding_grads(model)
  local grad_norm
  if opts.use_distributed_optimizer then
    grad_norm = opts.clip_grad > 0 and optimizer:clip_grad_norm(opts.clip_grad) or optimizer:grad_norm()
  elseif layout.world > 1 then
    grad_norm = opts.clip_grad > 0 and pmp.dist.clip_grad_norm(model, opts.clip_grad) or pmp.dist.grad_norm(model)
  else
    grad_norm = opts.clip_grad > 0 and pmp.optim.clip_grad_norm(params, opts.clip_grad) or pmp.optim.grad_norm(params)
  end
  optimizer:step()
  step_loss = data_parallel_mean(step_loss)
  loss_sum, loss_count = loss_sum + (step_loss or 0), loss_count + 1

  if tb and step_loss then
    tb:add_scalar('lm loss', step_loss, iteration)
    tb:add_scalar('learning-rate', lr, iteration)
    tb:add_scalar('grad-norm', grad_norm, iteration)
  end
  if iteration % opts.log_interval == 0 or iteration == opts.train_iters then
    local now = clock.now()
    local per_iteration = (now - interval_start) / loss_count
    local throughput = tokens_per_step / per_iteration
    local eta = per_iteration * (opts.train_iters - iteration)
    log(string.format(' iteration %8d/%8d | consumed samples: %12d | elapsed time per iteration (ms): %.1f | ' ..
      'learning rate: %.6E | global batch size: %5d | lm loss: %.6E | grad norm: %.3f | tokens per second: %.0f | ' ..
      'MFU: %.1f%% | ETA: %s |', iteration, opts.train_iters, consumed, per_iteration * 1000, lr, opts.global_batch_size,
      loss_sum / loss_count, grad_norm, throughput, 100 * throughput * flops_per_token / peak, duration(eta)))
    if tb then tb:add_scalar('throughput', throughput, iteration) end
    interval_start, loss_sum, loss_count = now, 0, 0
  end
  if opts.profile and iteration == opts.profile_step_end then
    pmp.profile.stop()
    log(string.format(' engine ops over iterations %d-%d:\n%s', opts.profile_step_start, iteration, pmp.profile.report()))
  end
  if valid_data and opts.eval_interval > 0 and (iteration % opts.eval_interval == 0 or iteration == opts.train_iters) then
    local eval_start = clock.now()
    local valid_loss = evaluate() or 0
    local line = string.format(' validation loss at iteration %d | lm loss value: %.6E | lm loss PPL: %.6E |',
      iteration, valid_loss, math.exp(math.min(valid_loss, 20)))
    log(string.rep('-', #line))
    log(line)
    log(string.rep('-', #line))
    if tb then tb:add_scalar('lm loss validation', valid_loss, iteration) end
    interval_start = interval_start + (clock.now() - eval_start)  -- validation time is not training time
  end
  if opts.save ~= '' and opts.save_interval > 0 and iteration % opts.save_interval == 0 then save() end
  if opts.exit_interval > 0 and iteration % opts.exit_interval == 0 then
    log(string.format('pretrain: exiting at iteration %d (--exit-interval %d)', iteration, opts.exit_interval))
    break
  end
end
if opts.save ~= '' and iteration > first_iteration and iteration % opts.save_interval ~= 0 then save() end
if tb then tb:close() end
local function peak_rss_mib()
  local status = io.open('/proc/self/status', 'r')
  local text = status and status:read('*a') or ''
  if status then status:close() end
  return (tonumber(text:match('VmHWM:%s*(%d+)')) or 0) / 1024
end
log(string.format('pretrain: %d iterations in %s | peak engine memory: %.1f MiB | peak resident memory: %.1f MiB',
  iteration - first_iteration, duration(clock.now() - run_start), pmp.memory.stats().peak / 2^20, peak_rss_mib()))

---------------------------------------------------------------------------------------------------
-- A greedy sample from the start of the validation text.

if opts.sample_length > 0 and layout.world > 1 then
  log('pretrain: no sample under a parallel layout (load the checkpoint in one process: recipes/generate.lua)')
elseif opts.sample_length > 0 then
  model:eval()
  local context = {}
  local prompt_ids = (valid_tokens or train_tokens):narrow(1, 1, math.min(16, opts.seq_length)):totable()
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
