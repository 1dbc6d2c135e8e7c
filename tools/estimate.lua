--- Memory per rank and FLOPs of a training step, before running it (see lua/pmp/estimate.lua for what
--- is counted and how).
---   pmp tools/estimate.lua --model llama-7b --tensor-model-parallel-size 2 --pipeline-model-parallel-size 4 \
---       --data-parallel-size 2 --micro-batch-size 1 --global-batch-size 64 --seq-length 4096 --bf16 \
---       --use-distributed-optimizer --recompute-granularity full
---   pmp tools/estimate.lua --model path/to/config.json --grid tp=1,2,4 pp=1,2 --seq-length 2048
---   pmp tools/estimate.lua --num-layers 4 --hidden-size 192 --num-attention-heads 6 --vocab-size 128 \
---       --seq-length 64 --micro-batch-size 16                  (the pretraining recipe's default model)
--- --model: a family name (llama-7b, llama3-8b, qwen2-1.5b, ...: --model list prints them) or an HF
--- config.json; without it the --num-layers ... flags describe the model. --grid varies tp, pp, dp, cp,
--- micro (batch) or recompute (full, none) over the listed values and prints one row per combination.
--- --peak-tflops (one rank's peak, e.g. 989 for an H100's dense bf16) adds the step time at --mfu.
local estimate = pmp.estimate

local FLAGS = {
  { '--model', nil, "family name with size, 'list', or an HF config.json" },
  { '--num-layers', 0, 'transformer layers (without --model)' },
  { '--hidden-size', 0, 'model width' },
  { '--ffn-hidden-size', 0, 'MLP width (0: 8/3 of hidden for SwiGLU, rounded to 64, as the pretraining recipe)' },
  { '--num-attention-heads', 0, 'attention heads' },
  { '--num-query-groups', 0, 'KV heads (0: as many as attention heads)' },
  { '--kv-channels', 0, 'head dimension (0: hidden / heads)' },
  { '--vocab-size', 32000, 'vocabulary' },
  { '--make-vocab-size-divisible-by', 128, 'vocabulary padding multiple (times the tensor-parallel size)' },
  { '--untie-embeddings-and-output-weights', false, 'separate output layer (families set this themselves)' },
  { '--num-experts', 0, 'MoE experts per layer (0: dense)' },
  { '--moe-router-topk', 2, 'experts per token' },
  { '--moe-ffn-hidden-size', 0, "each expert's MLP width (0: --ffn-hidden-size's)" },
  { '--moe-shared-expert-intermediate-size', 0, 'width of the shared experts (0: none)' },
  { '--tensor-model-parallel-size', 1, 'TP' },
  { '--pipeline-model-parallel-size', 1, 'PP' },
  { '--data-parallel-size', 1, 'DP' },
  { '--context-parallel-size', 1, 'CP' },
  { '--expert-model-parallel-size', 1, 'EP' },
  { '--sequence-parallel', false, 'sequence parallelism in the TP group' },
  { '--decoder-first-pipeline-num-layers', 0, 'layers on the first pipeline stage (0: even split)' },
  { '--decoder-last-pipeline-num-layers', 0, 'layers on the last pipeline stage (0: even split)' },
  { '--micro-batch-size', 1, 'samples per micro batch' },
  { '--global-batch-size', 0, 'samples per step (0: micro batch x DP)' },
  { '--seq-length', 2048, 'tokens per sample' },
  { '--recompute-granularity', nil, "'full' to re-run each layer's forward in backward" },
  { '--use-distributed-optimizer', false, "shard optimizer state over DP x CP (the experts' over DP x CP / EP)" },
  { '--bf16', false, 'bf16 parameters and activations (f32 master weights); default f32' },
  { '--grid', nil, 'e.g. tp=1,2,4 pp=1,2 micro=1,2 recompute=none,full', multiple = true },
  { '--peak-tflops', 0, 'peak TFLOP/s of one rank, for step times' },
  { '--mfu', 0.4, 'model FLOPs utilization assumed for the step time' },
}

local ok, opts = pcall(pmp.args.parse, arg, FLAGS, { usage = 'pmp tools/estimate.lua (--model NAME|config.json | --num-layers ...) [layout flags]' })
if not ok then error(tostring(opts), 0) end

if opts.model == 'list' then
  local names = {}
  for name in pairs(estimate.FAMILIES) do names[#names + 1] = name end
  table.sort(names)
  print(table.concat(names, '\n'))
  return
end

local function model_config(tp)
  if opts.model then return estimate.model_config(opts.model, { tp = tp }) end
  if opts.num_layers <= 0 or opts.hidden_size <= 0 or opts.num_attention_heads <= 0 then
    error('give --model NAME|config.json, or --num-layers, --hidden-size and --num-attention-heads', 0)
  end
  local ffn = opts.ffn_hidden_size > 0 and opts.ffn_hidden_size or math.floor((opts.hidden_size * 8 / 3 + 63) / 64) * 64
  return estimate.model_config({
    num_layers = opts.num_layers, hidden_size = opts.hidden_size, ffn_hidden_size = ffn,
    num_attention_heads = opts.num_attention_heads,
    num_query_groups = opts.num_query_groups > 0 and opts.num_query_groups or nil,
    kv_channels = opts.kv_channels > 0 and opts.kv_channels or nil, vocab_size = opts.vocab_size,
    make_vocab_size_divisible_by = opts.make_vocab_size_divisible_by,
    tie_embeddings = not opts.untie_embeddings_and_output_weights,
    num_moe_experts = opts.num_experts > 0 and opts.num_experts or nil, moe_router_topk = opts.moe_router_topk,
    moe_ffn_hidden_size = opts.moe_ffn_hidden_size > 0 and opts.moe_ffn_hidden_size or nil,
    moe_shared_expert_intermediate_size = opts.moe_shared_expert_intermediate_size,
  }, { tp = tp })
end

local base_layout = {
  tp = opts.tensor_model_parallel_size, pp = opts.pipeline_model_parallel_size, dp = opts.data_parallel_size,
  cp = opts.context_parallel_size, ep = opts.expert_model_parallel_size, micro_batch = opts.micro_batch_size,
  seq_length = opts.seq_length, recompute = opts.recompute_granularity,
  distributed_optimizer = opts.use_distributed_optimizer, sequence_parallel = opts.sequence_parallel,
  first_stage_layers = opts.decoder_first_pipeline_num_layers > 0 and opts.decoder_first_pipeline_num_layers or nil,
  last_stage_layers = opts.decoder_last_pipeline_num_layers > 0 and opts.decoder_last_pipeline_num_layers or nil,
  dtype = opts.bf16 and 'bf16' or 'f32',
}
local function global_batch(layout)
  return opts.global_batch_size > 0 and opts.global_batch_size or layout.micro_batch * layout.dp
end

local function gib(bytes)
  if bytes < 2^30 then return string.format('%.1f MiB', bytes / 2^20) end
  return string.format('%.2f GiB', bytes / 2^30)
end
local function count(n)
  for _, u in ipairs({ { 1e12, 'T' }, { 1e9, 'B' }, { 1e6, 'M' }, { 1e3, 'K' } }) do
    if n >= u[1] then return string.format('%.2f%s', n / u[1], u[2]) end
  end
  return tostring(n)
end

local function evaluate(layout)
  layout.global_batch = global_batch(layout)
  local c = model_config(layout.tp)
  return c, estimate.memory(c, layout), estimate.flops(c, layout)
end

---------------------------------------------------------------------------------------------------
-- One layout: a table per pipeline stage, then FLOPs.

local function report(layout)
  local c, memory, flops = evaluate(layout)
  print(string.format('model: %d layers, hidden %d, ffn %d, heads %d (%d KV groups), vocabulary %d (padded %d)%s',
    c.num_layers, c.hidden_size, c.ffn_hidden_size, c.num_attention_heads, c.num_query_groups, c.vocab_size,
    c.padded_vocab_size, c.tie_embeddings and ', tied embeddings' or ''))
  print(string.format('layout: TP %d%s, PP %d, DP %d, CP %d, EP %d; micro batch %d, global batch %d (%d micro batches ' ..
    'per rank and step), sequence %d, %s%s%s', layout.tp, layout.sequence_parallel and ' (SP)' or '', layout.pp, layout.dp,
    layout.cp, layout.ep, layout.micro_batch, layout.global_batch, memory.micro_batches, layout.seq_length, layout.dtype,
    layout.recompute == 'full' and ', full recompute' or '', layout.distributed_optimizer and ', distributed optimizer' or ''))
  print(string.format('%-6s %7s %10s %11s %11s %11s %12s %9s %11s %11s %11s %11s', 'stage', 'layers', 'params',
    'weights', 'gradients', 'optimizer', 'activations', 'in flight', 'transient', 'step peak', 'run peak', 'live peak'))
  for _, s in ipairs(memory.stages) do
    print(string.format('%-6d %7d %10s %11s %11s %11s %12s %9d %11s %11s %11s %11s', s.stage, s.layers,
      count(s.parameters), gib(s.weights), gib(s.gradients), gib(s.optimizer), gib(s.activations), s.in_flight,
      gib(s.transient), gib(s.peak), gib(s.run_peak), gib(s.live_peak)))
  end
  print('(per rank. activations: also what waits for the Lua collector in one step; step peak: the first step\'s; ' ..
    'run peak: at most, once dropped tensors of earlier steps wait too; live peak: if dropped tensors were freed at once)')
  print(string.format('FLOPs: %s per token (6N + attention), %s per step (model), %s with recompute (hardware), ' ..
    '%s per rank of %d', count(flops.per_token), count(flops.model), count(flops.hardware), count(flops.per_rank), flops.world))
  if opts.peak_tflops > 0 then
    local ideal = flops.per_rank / (opts.peak_tflops * 1e12)
    print(string.format('step time: %.3f s at 100%% of %.0f TFLOP/s per rank; %.3f s at %.0f%% MFU (%.0f tokens/s)',
      ideal, opts.peak_tflops, ideal / opts.mfu, 100 * opts.mfu, flops.tokens / (ideal / opts.mfu)))
  end
end

---------------------------------------------------------------------------------------------------
-- A grid: every combination of the listed values, one row each.

local GRID_KEYS = { tp = 'tp', pp = 'pp', dp = 'dp', cp = 'cp', micro = 'micro_batch', recompute = 'recompute' }

local function parse_grid(words)
  local axes = {}
  for _, word in ipairs(words) do
    local key, list = word:match('^(%w+)=(.+)$')
    if not key or not GRID_KEYS[key] then
      error("--grid: expected KEY=V1,V2,... with KEY one of tp, pp, dp, cp, micro, recompute; got '" .. word .. "'", 0)
    end
    local values = {}
    for v in list:gmatch('[^,]+') do
      if key == 'recompute' then
        if v ~= 'full' and v ~= 'none' then error("--grid: recompute takes full or none, got '" .. v .. "'", 0) end
        values[#values + 1] = v ~= 'none' and v or false
      else
        local n = tonumber(v)
        if not n or n < 1 or n ~= math.floor(n) then error("--grid: " .. key .. " takes positive integers, got '" .. v .. "'", 0) end
        values[#values + 1] = n
      end
    end
    axes[#axes + 1] = { key = GRID_KEYS[key], values = values }
  end
  return axes
end

local function grid(axes)
  local layouts = { {} }
  for _, axis in ipairs(axes) do
    local grown = {}
    for _, partial in ipairs(layouts) do
      for _, v in ipairs(axis.values) do
        local l = {}
        for k, x in pairs(partial) do l[k] = x end
        l[axis.key] = v
        grown[#grown + 1] = l
      end
    end
    layouts = grown
  end
  local bar = pmp.progress.new({ total = #layouts, label = 'estimate', unit = 'layouts' })
  local rows = {}
  for k, overrides in ipairs(layouts) do
    local layout = {}
    for key, v in pairs(base_layout) do layout[key] = v end
    for key, v in pairs(overrides) do layout[key] = v or nil end
    local okl, _, memory, flops = pcall(evaluate, layout)
    rows[k] = okl and { layout = layout, memory = memory, flops = flops } or { layout = layout, error = tostring(_) }
    bar:update(k)
  end
  bar:finish()
  print(string.format('%4s %4s %4s %4s %6s %9s %11s %11s %11s %13s', 'TP', 'PP', 'DP', 'CP', 'micro', 'recompute',
    'step peak', 'run peak', 'live peak', 'TFLOP/rank'))
  for _, r in ipairs(rows) do
    local l = r.layout
    local head = string.format('%4d %4d %4d %4d %6d %9s', l.tp, l.pp, l.dp, l.cp, l.micro_batch, l.recompute or 'none')
    if r.error then
      print(head .. '  ' .. r.error)
    else
      local run, live = 0, 0
      for _, s in ipairs(r.memory.stages) do run, live = math.max(run, s.run_peak), math.max(live, s.live_peak) end
      print(string.format('%s %11s %11s %11s %13.1f', head, gib(r.memory.peak), gib(run), gib(live), r.flops.per_rank / 1e12))
    end
  end
end

if opts.grid then grid(parse_grid(opts.grid)) else report(base_layout) end
