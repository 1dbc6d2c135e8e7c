--- The flags of Megatron-LM's example scripts and Pai-Megatron-Patch's Qwen2.5/Llama-3 run scripts that
--- pmp's own sets (pmp.train.flags) lack, with Megatron's meaning. `architecture` and `run` are parsed
--- like any set; `ignored` holds flags that configure something pmp does not have (kernels, fusions,
--- Transformer Engine, dataloader workers), which change neither results nor files, so they are
--- accepted and named once in one log line. M.resolve then checks the combinations and maps Megatron's
--- spellings onto pmp's options. Where a flag is left out, runs on indexed data get Megatron's default
--- (pmp.train.megatron_defaults), other runs pmp's.
local M = {}

--- Model flags mapped onto the GPTModel config by pmp.train.model.gpt.
M.architecture = {
  { '--swiglu', true, 'SwiGLU MLP (--swiglu=false: a GELU MLP, Megatron\'s default)' },
  { '--openai-gelu', false, "without --swiglu: GELU's tanh approximation instead of the exact (erf) GELU" },
  { '--squared-relu', false, 'a squared-ReLU MLP (refused: pmp does not build it)' },
  { '--normalization', 'RMSNorm', 'RMSNorm, or LayerNorm (with a bias)', choices = { 'RMSNorm', 'LayerNorm' } },
  { '--position-embedding-type', 'rope', 'rope, or learned_absolute (up to --max-position-embeddings)',
    choices = { 'rope', 'learned_absolute' } },
  { '--use-rotary-position-embeddings', false, 'the same as --position-embedding-type rope (older scripts)' },
  { '--max-position-embeddings', 0, 'positions a model handles (0: --seq-length)', integer = true, min = 0 },
  { '--disable-bias-linear', true, 'no biases in the linear layers but --add-qkv-bias (--disable-bias-linear=false: ' ..
    "a bias on every linear layer, Megatron's default)" },
  { '--add-qkv-bias', false, 'a bias on the query/key/value projection (Qwen2)' },
  { '--qk-layernorm', false, 'normalize queries and keys per head before attention' },
  { '--group-query-attention', false, 'grouped-query attention with --num-query-groups KV heads (1 if not given)' },
  { '--kv-channels', 0, 'dims per attention head (0: --hidden-size / --num-attention-heads)', integer = true, min = 0 },
  { '--rotary-percent', 1.0, 'share of each head that RoPE rotates', above = 0, max = 1 },
  { '--rotary-seq-len-interpolation-factor', 1, 'divide RoPE positions by this (linear position interpolation)', above = 0 },
  { '--attention-dropout', 0.0, 'dropout on attention probabilities (above 0 attention runs unfused while training)',
    min = 0, below = 1 },
  { '--extra-vocab-size', 0, "Pai-Megatron-Patch: the vocabulary holds the tokenizer's own (without added tokens) plus " ..
    'this many rows, instead of --make-vocab-size-divisible-by padding', integer = true, min = 0 },
  { '--recompute-activations', false, "the same as --recompute-granularity selective" },
  { '--recompute-method', nil, "with --recompute-granularity full: uniform or block", choices = { 'uniform', 'block' } },
  { '--recompute-num-layers', 1, 'layers per recomputed chunk (uniform) or recomputed layers per stage (block)',
    integer = true, min = 1 },
}

--- Checkpoint, data, schedule and logging flags recipes/pretrain.lua acts on.
M.run = {
  { '--no-load-optim', false, 'load weights but not the optimizer state from --load' },
  { '--no-load-rng', false, 'do not restore the random generators from --load' },
  { '--no-save-optim', false, 'save checkpoints without the optimizer state' },
  { '--finetune', false, 'start from --load\'s weights at iteration 0 (no optimizer, generators or data position)' },
  { '--eod-mask-loss', false, 'no loss on the token after an end-of-document token' },
  { '--reset-position-ids', false, 'positions restart after each end-of-document token' },
  { '--reset-attention-mask', false, 'attention stays inside each document (ends at end-of-document tokens)' },
  { '--train-data-path', nil, 'indexed data (PREFIX or weighted blend) used whole for training, instead of --data-path', multiple = true },
  { '--valid-data-path', nil, 'indexed data used whole for validation (with --train-data-path)', multiple = true },
  { '--test-data-path', nil, 'indexed data used whole for the test evaluation at the end (with --train-data-path)', multiple = true },
  { '--train-samples', 0, 'train on this many samples instead of --train-iters (iterations: samples / global batch)',
    integer = true, min = 0 },
  { '--lr-decay-samples', 0, 'with --train-samples: samples of decay (0: --train-samples)', integer = true, min = 0 },
  { '--lr-warmup-samples', 0, 'with --train-samples: samples of linear warmup', integer = true, min = 0 },
  { '--lr-warmup-fraction', 0, 'warmup as this share of the decay span, instead of --lr-warmup-iters/-samples (0: not used)',
    min = 0, max = 1 },
  { '--calculate-per-token-loss', false, 'a step\'s loss is the mean over all its trained tokens, not over micro batches' },
  { '--log-throughput', false, 'log the model TFLOP/s per process on each iteration line' },
  { '--optimizer', 'adam', 'adam (AdamW: decoupled weight decay, as Megatron\'s); hybridadam is the same update',
    choices = { 'adam', 'hybridadam' } },
  { '--dataset', 'MMAP', "Pai-Megatron-Patch's dataset kind: MMAP (indexed data; JSON-SFT is recipes/sft.lua's)",
    choices = { 'MMAP' } },
  { '--train-mode', 'pretrain', "Pai-Megatron-Patch's mode: pretrain (finetuning on chats is recipes/sft.lua)",
    choices = { 'pretrain' } },
  { '--fp16', false, 'f16 parameters and activations, f32 main weights, gradients and optimizer state, loss scaling' },
  { '--loss-scale', 0, 'with --fp16: this constant loss scale (0: the dynamic scale)', min = 0 },
  { '--initial-loss-scale', 2 ^ 32, 'with --fp16: the first dynamic loss scale', above = 0 },
  { '--min-loss-scale', 1.0, 'with --fp16: the dynamic scale never halves below this', above = 0 },
  { '--loss-scale-window', 1000, 'with --fp16: clean steps in a row after which the dynamic scale doubles', integer = true,
    min = 1 },
  { '--hysteresis', 2, 'with --fp16: the overflow (counted from the start or the last growth) that first halves ' ..
    'the dynamic scale; each later one halves it too', integer = true, min = 1 },
  { '--fp8-format', nil, 'fp8 training (refused: pmp has no fp8 kernels)' },
  { '--fp8-recipe', nil, 'fp8 scaling recipe (refused: pmp has no fp8 kernels)' },
  { '--fp8-param-gather', false, 'fp8 parameters (refused: pmp has no fp8 kernels)' },
  { '--dataloader-type', 'single', 'single: samples in the order of the shuffled index, as Megatron\'s',
    choices = { 'single' } },
}

-- What each ignored flag configures, for --help.
local IGNORED = {
  { '--transformer-impl', 'transformer_engine', 'Transformer Engine or local layers' },
  { '--attention-backend', 'auto', 'the attention kernel' },
  { '--use-flash-attn', false, 'the attention kernel' },
  { '--use-mcore-models', false, 'Megatron-Core models (pmp has only those)' },
  { '--distributed-backend', 'nccl', 'the collective library' },
  { '--no-masked-softmax-fusion', false, 'a fused kernel' },
  { '--no-bias-dropout-fusion', false, 'a fused kernel' },
  { '--no-bias-gelu-fusion', false, 'a fused kernel' },
  { '--no-bias-swiglu-fusion', false, 'a fused kernel' },
  { '--bias-swiglu-fusion', false, 'a fused kernel' },
  { '--no-rope-fusion', false, 'a fused kernel' },
  { '--no-persist-layer-norm', false, 'a fused kernel' },
  { '--cross-entropy-loss-fusion', false, 'a fused kernel' },
  { '--no-gradient-accumulation-fusion', false, 'a fused kernel' },
  { '--attention-softmax-in-fp32', false, 'softmax dtype (pmp computes it in f32)' },
  { '--accumulate-allreduce-grads-in-fp32', false, 'gradient dtype (pmp keeps f32 gradients)' },
  { '--apply-query-key-layer-scaling', false, 'an fp16 overflow guard that leaves results unchanged' },
  { '--overlap-param-gather', false, 'communication overlap' },
  { '--tp-comm-overlap', false, 'communication overlap' },
  { '--no-create-attention-mask-in-dataloader', false, 'where the causal mask is made' },
  { '--no-mmap-bin-files', false, 'how data files are read' },
  { '--num-workers', 2, 'dataloader processes' },
  { '--cpu-offloading', false, 'activation offloading to host memory' },
  { '--cpu-offloading-num-layers', 0, 'activation offloading to host memory' },
  { '--manual-gc', false, 'Python garbage collection' },
  { '--manual-gc-interval', 0, 'Python garbage collection' },
  { '--empty-unused-memory-level', 0, 'the CUDA caching allocator' },
  { '--tensorboard-queue-size', 1000, 'TensorBoard write batching' },
  { '--log-timers-to-tensorboard', false, 'TensorBoard extras' },
  { '--log-validation-ppl-to-tensorboard', false, 'TensorBoard extras' },
  { '--log-memory-to-tensorboard', false, 'TensorBoard extras' },
  { '--log-world-size-to-tensorboard', false, 'TensorBoard extras' },
  { '--timing-log-level', 0, 'timer detail' },
  { '--max-padding-length', 0, "Pai-Megatron-Patch's SFT padding (pretraining packs full sequences)" },
  { '--patch-tokenizer-type', '', "Pai-Megatron-Patch's tokenizer class (pmp's comes from the data or --tokenizer-model)" },
}
M.ignored = {}
for k, entry in ipairs(IGNORED) do
  M.ignored[k] = { entry[1], entry[2], 'ignored by pmp: configures ' .. entry[3] }
end

local function fail(text, ...) error(string.format(text, ...), 0) end

--- Pai-Megatron-Patch's padded vocabulary: the tokenizer's own vocabulary (without added tokens, as
--- transformers' tokenizer.vocab_size; all of a char or byte tokenizer's) plus --extra-vocab-size rows,
--- which must hold every token id and split evenly over the tensor-parallel ranks. nil without the flag.
function M.padded_vocab_size(opts, given, tokenizer)
  if not given.extra_vocab_size then return nil end
  local base = tokenizer.base_vocab_size or tokenizer.vocab_size
  local padded = base + opts.extra_vocab_size
  if padded < tokenizer.vocab_size then
    fail('--extra-vocab-size %d: %d + %d rows are fewer than the tokenizer\'s %d tokens (with its added tokens)',
      opts.extra_vocab_size, base, opts.extra_vocab_size, tokenizer.vocab_size)
  end
  local tp = opts.tensor_model_parallel_size or 1
  if padded % tp ~= 0 then
    fail('--extra-vocab-size %d: the vocabulary of %d rows does not split over --tensor-model-parallel-size %d',
      opts.extra_vocab_size, padded, tp)
  end
  return padded
end

--- The one log line naming the ignored flags the command line gave, or nil.
function M.ignored_line(given)
  local names = {}
  for _, spec in ipairs(M.ignored) do
    if given[spec[1]:gsub('^%-%-', ''):gsub('%-', '_')] then names[#names + 1] = spec[1] end
  end
  if #names == 0 then return nil end
  return 'ignored (they configure kernels, fusions or libraries pmp does not have; results are unchanged): ' ..
    table.concat(names, ' ')
end

--- Checks the Megatron flags in opts (parsed with the sets above; given: the keys the command line
--- gave) and maps them onto pmp's options in place; returns the notes to log (a list of lines).
function M.resolve(opts, given)
  local notes = {}
  for _, key in ipairs({ 'fp8_format', 'fp8_recipe', 'fp8_param_gather' }) do
    if given[key] then
      fail('--%s: pmp has no fp8 training (its kernels compute in f32, bf16 or f16; give --bf16 or --fp16)',
        (key:gsub('_', '-')))
    end
  end
  if opts.fp16 and opts.bf16 then fail('give either --fp16 or --bf16, not both') end
  if opts.fp16 and opts.use_distributed_optimizer then
    fail('--fp16 with --use-distributed-optimizer: pmp unscales f16 gradients into f32 main gradients only for ' ..
      'the plain optimizer (give --bf16, or leave out --use-distributed-optimizer)')
  end
  if not opts.fp16 then
    for _, key in ipairs({ 'loss_scale', 'initial_loss_scale', 'min_loss_scale', 'loss_scale_window', 'hysteresis' }) do
      if given[key] then fail('--%s needs --fp16 (pmp scales the loss only for f16 training)', (key:gsub('_', '-'))) end
    end
  end
  if opts.squared_relu then fail('--squared-relu: pmp builds no squared-ReLU MLP (give --swiglu, or neither for GELU)') end
  if opts.openai_gelu and opts.swiglu then fail('--openai-gelu picks the GELU of an MLP without --swiglu') end
  if opts.use_rotary_position_embeddings and opts.position_embedding_type ~= 'rope' then
    fail('--use-rotary-position-embeddings contradicts --position-embedding-type %s', opts.position_embedding_type)
  end
  if opts.max_position_embeddings == 0 then opts.max_position_embeddings = opts.seq_length end
  if opts.max_position_embeddings < opts.seq_length then
    fail('--max-position-embeddings %d is smaller than --seq-length %d', opts.max_position_embeddings, opts.seq_length)
  end
  if opts.attention_dropout > 0 and opts.reset_attention_mask then
    fail('--attention-dropout %g with --reset-attention-mask: pmp drops no probabilities of per-document attention',
      opts.attention_dropout)
  end
  if opts.attention_dropout > 0 and (opts.context_parallel_size or 1) > 1 then
    fail('--attention-dropout %g: pmp drops no attention probabilities under --context-parallel-size > 1', opts.attention_dropout)
  end
  -- Megatron uses --num-query-groups only with --group-query-attention, and 1 group when it is left out
  if opts.group_query_attention and not given.num_query_groups then opts.num_query_groups = 1 end

  -- recomputation changes memory, never results: Megatron's selective recompute (of core attention)
  -- becomes pmp's default of keeping every activation
  if opts.recompute_activations then
    if opts.recompute_granularity ~= nil and opts.recompute_granularity ~= 'selective' then
      fail('--recompute-activations contradicts --recompute-granularity %s', opts.recompute_granularity)
    end
    opts.recompute_granularity = 'selective'
  end
  if opts.recompute_granularity == 'selective' then
    opts.recompute_granularity = nil
    notes[#notes + 1] = 'recompute granularity selective: pmp keeps every activation instead (the same results, more memory)'
  elseif opts.recompute_granularity == 'full' then
    local per_stage = opts.num_layers / opts.pipeline_model_parallel_size
    if opts.recompute_method == 'block' and opts.recompute_num_layers < per_stage then
      fail('--recompute-method block --recompute-num-layers %d: pmp recomputes either every layer of a stage (%g) or none',
        opts.recompute_num_layers, per_stage)
    end
    if opts.recompute_method == 'uniform' and opts.recompute_num_layers > 1 then
      notes[#notes + 1] = string.format('recompute method uniform with %d layers per chunk: pmp recomputes one ' ..
        'layer at a time (the same results, a little more memory for the layer inputs it keeps)', opts.recompute_num_layers)
    end
  elseif opts.recompute_granularity ~= nil then
    fail("--recompute-granularity must be full or selective, got '%s'", opts.recompute_granularity)
  elseif given.recompute_method then
    fail('--recompute-method needs --recompute-granularity full')
  end

  if opts.train_data_path and opts.data_path then fail('give either --data-path or --train-data-path, not both') end
  if opts.valid_data_path and not opts.train_data_path then fail('--valid-data-path needs --train-data-path') end
  if opts.test_data_path and not opts.train_data_path then fail('--test-data-path needs --train-data-path') end
  if opts.tokenizer_type == 'HuggingFaceTokenizer' then
    if not opts.tokenizer_model then fail('--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR') end
  elseif opts.tokenizer_type ~= 'char' and opts.tokenizer_type ~= 'byte' then
    fail("--tokenizer-type must be char, byte or HuggingFaceTokenizer, got '%s'", tostring(opts.tokenizer_type))
  end
  if opts.finetune then opts.no_load_optim, opts.no_load_rng = true, true end
  return notes
end

return M
