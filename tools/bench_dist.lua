-- Communication of the parallel layouts: bytes each rank sends per training step, measured by the
-- engine (pmp.dist.stats) against the volume the algorithms should move, and the part of the
-- data-parallel gradient communication that the bucketed overlap hides behind backward.
-- Run under mpirun by tools/bench_dist.sh (`make bench-dist`):
--   mpirun -np 4 pmp tools/bench_dist.lua --tp 2 [--pp 1] [--distributed-optimizer] [--steps 4 ...]
-- The data-parallel size is what tp x pp leaves of the world. Gradients are averaged by
-- DistributedDataParallel (all-reduce, then AdamW; or reduce-scatter, the distributed optimizer and an
-- all-gather of the parameters), tensor parallelism is pmp.nn.parallel's (no sequence parallelism),
-- pipeline parallelism pmp.dist.pipeline's 1F1B, expert parallelism (--ep, every layer a MoE layer)
-- pmp.nn.expert_parallel's all-to-all token dispatch (--moe-shared-expert-intermediate-size adds shared
-- experts, --moe-shared-expert-overlap runs them behind the all-to-alls; the line then gives the share of
-- the all-to-all time hidden behind compute, measured as for the data-parallel buckets).
-- The expected volume per rank of our ring collectives over n ranks: all-reduce 2(n-1)/n x bytes,
-- reduce-scatter and all-gather (n-1)/n x the whole buffer, plus one 40-byte header per collective;
-- point-to-point sends their bytes; all-to-all the rows for the other ranks plus one header. The
-- all-to-all volume depends on the routing: the expected total counts the rows each call was given
-- (its send counts); the line also compares that with the analytical volume of evenly spread routing,
-- 4 (forward dispatch and return, their two backwards) x tokens x topk x (ep - 1) / ep rows of hidden
-- values per MoE layer and micro-batch. Step 1 warms up; the numbers are means over the other steps.
local clock = require 'pmp.clock'
local pipeline = require 'pmp.dist.pipeline'
local parallel = require 'pmp.nn.parallel'

local opts = pmp.args.parse(arg, {
  { '--tp', 1, 'tensor-parallel size' },
  { '--pp', 1, 'pipeline stages' },
  { '--ep', 1, 'expert-parallel size (> 1: every layer a MoE layer, experts split over the data-parallel ranks)' },
  { '--num-experts', 8, 'experts per MoE layer (with --ep)' },
  { '--moe-router-topk', 2, 'experts per token (with --ep)' },
  { '--moe-ffn-hidden-size', 352, 'expert MLP width (with --ep)' },
  { '--moe-shared-expert-intermediate-size', 0, 'shared experts width (with --ep; 0: none)' },
  { '--moe-shared-expert-overlap', false, "run the shared experts while the token all-to-alls are in flight" },
  { '--distributed-optimizer', false, 'shard the optimizer over the data-parallel ranks' },
  { '--steps', 4, 'optimizer steps (the first is not measured)' },
  { '--num-layers', 4, 'transformer layers' },
  { '--hidden-size', 256, 'model width' },
  { '--ffn-hidden-size', 704, 'MLP width' },
  { '--num-attention-heads', 8, 'attention heads' },
  { '--num-query-groups', 4, 'KV heads' },
  { '--vocab-size', 4096, 'vocabulary' },
  { '--seq-length', 128, 'tokens per sample' },
  { '--micro-batch-size', 4, 'samples per micro-batch' },
  { '--micro-batches', 2, 'micro-batches per step on each data-parallel rank' },
  { '--bucket-size', 250000, 'DDP bucket size in elements' },
  { '--no-overlap', false, 'reduce all buckets after backward (for comparison with the overlap)' },
  { '--bf16', false, 'bf16 parameters and activations (gradients reduce in f32)' },
}, { usage = 'mpirun -np N pmp tools/bench_dist.lua [flags]' })

local HEADER = 40   -- bytes of the header each ring collective sends ahead (core/dist/dist.c)
local layout = pmp.dist.init{ tp = opts.tp, pp = opts.pp, ep = opts.ep }
local distributed_optimizer = opts.distributed_optimizer
local layout_name = string.format('tp%d pp%d dp%d%s%s%s%s', layout.tp, layout.pp, layout.dp,
  layout.ep > 1 and ' ep' .. layout.ep or '', distributed_optimizer and ' distopt' or '',
  opts.no_overlap and ' no-overlap' or '', opts.moe_shared_expert_overlap and ' shared-expert-overlap' or '')

local dtype = opts.bf16 and 'bf16' or 'f32'
local config = { num_layers = opts.num_layers, hidden_size = opts.hidden_size, ffn_hidden_size = opts.ffn_hidden_size,
  num_attention_heads = opts.num_attention_heads, num_query_groups = opts.num_query_groups, vocab_size = opts.vocab_size,
  dtype = 'f32' }
if layout.ep > 1 then
  config.num_moe_experts, config.moe_router_topk = opts.num_experts, opts.moe_router_topk
  config.moe_ffn_hidden_size, config.moe_grouped_gemm = opts.moe_ffn_hidden_size, true
  config.moe_shared_expert_intermediate_size = opts.moe_shared_expert_intermediate_size
  config.moe_shared_expert_overlap = opts.moe_shared_expert_overlap
end
pmp.manual_seed(1234)
local model = pmp.nn.GPTModel(config)
pipeline.stage(model)
parallel.tensor_parallel(model)
local expert_parallel = require 'pmp.nn.expert_parallel'
local ddp_options = { bucket_size = opts.bucket_size, distributed_optimizer = distributed_optimizer,
  overlap = not opts.no_overlap }
if layout.ep > 1 then
  expert_parallel.expert_parallel(model, { data_size = layout.dp })
  if distributed_optimizer then   -- as pmp.train.parallel.data_parallel
    ddp_options.experts = { match = expert_parallel.is_expert_parameter, group = pmp.dist.group('edp'),
      divisor = layout.dp }
    expert_parallel.reduced_elsewhere(model)
  else
    ddp_options.skip = expert_parallel.is_expert_parameter
  end
end
if opts.bf16 then model:to('bf16') end
local ddp = pmp.dist.ddp.DistributedDataParallel(model, ddp_options)

-- Every all-to-all of the expert-parallel group, with the bytes its send counts give to other ranks.
local a2a = { bytes = 0, calls = 0 }
if layout.ep > 1 then
  local group = pmp.dist.group('ep')
  local all_to_all = group.all_to_all
  rawset(group, 'all_to_all', function(self, t, send, recv, options)
    local row_bytes = t:numel() / math.max(t:size(1), 1) * t:element_size()
    for k, rows in ipairs(send) do
      if k - 1 ~= self.rank then a2a.bytes = a2a.bytes + rows * row_bytes end
    end
    a2a.calls = a2a.calls + 1
    return all_to_all(self, t, send, recv, options)
  end)
end
local optimizer
if distributed_optimizer then
  optimizer = pmp.optim.DistributedOptimizer(pmp.optim.decay_groups(model), { ddp = ddp, lr = 1e-4 })
else
  optimizer = pmp.optim.AdamW(pmp.optim.decay_groups(model), { lr = 1e-4 })
end

local mb, T, M = opts.micro_batch_size, opts.seq_length, opts.micro_batches
local function micro_batches(step)
  local out = {}
  for k = 1, M do
    pmp.manual_seed(step * 1000 + layout.dp_rank * 100 + k)
    out[k] = { ids = pmp.randint(0, opts.vocab_size, { mb, T }), targets = pmp.randint(0, opts.vocab_size, { mb, T }) }
  end
  return out
end

local function step(iteration)
  optimizer:zero_grad()
  local batches = micro_batches(iteration)
  ddp:set_sync(false)
  if layout.pp > 1 then
    pipeline.forward_backward(model, batches, { before_last_backward = function() ddp:set_sync(true) end })
  else
    for k, b in ipairs(batches) do
      ddp:set_sync(k == M)
      local loss = model(b.ids, b.targets)
      ;(loss * (1 / M)):backward()
    end
  end
  ddp:finish_grad_sync()
  parallel.finish_grads(model)
  expert_parallel.finish_expert_grads(model)
  pipeline.sync_embedding_grads(model)
  pmp.dist.clip_grad_norm(distributed_optimizer and optimizer or model, 1.0)
  optimizer:step()
end

---------------------------------------------------------------------------------------------------
-- The expected bytes this rank sends in one step, by component.

local function ring_all_reduce(bytes, n) return n > 1 and 2 * (n - 1) / n * bytes + HEADER or 0 end
local function ring_half(bytes, n) return n > 1 and (n - 1) / n * bytes + HEADER or 0 end   -- reduce-scatter, all-gather

local function expected()
  local parts = {}
  local dp = ddp.group.size
  local grad_size = 4   -- gradient buckets are f32
  local param_size = opts.bf16 and 2 or 4
  local grads, params = 0, 0
  for _, b in ipairs(ddp.buckets) do
    local n = b.group.size   -- the expert buckets' is the expert-data-parallel group
    if distributed_optimizer then
      grads = grads + ring_half(b.padded_numel * grad_size, n)
      params = params + ring_half(b.padded_numel * param_size, n)
    else
      grads = grads + ring_all_reduce(b.padded_numel * grad_size, n)
    end
  end
  local ep = rawget(model, 'expert_parallel')
  if ep and not distributed_optimizer then
    -- finish_expert_grads: each expert gradient all-reduced over the expert-data-parallel group
    for _, pair in ipairs(model:named_parameters()) do
      if expert_parallel.is_expert_parameter(pair[1]) then
        grads = grads + ring_all_reduce(pair[2]:numel() * grad_size, ep.data_group.size)
      end
    end
  end
  parts[#parts + 1] = { 'gradients', grads }
  if distributed_optimizer then parts[#parts + 1] = { 'parameters', params } end
  -- the clipping norm: one f64 all-reduce over each group the norm sums over (and one over the
  -- expert-parallel group for the experts, which the distributed optimizer's shards do not need)
  local norm = 0
  if distributed_optimizer then norm = norm + ring_all_reduce(8, dp) end
  if ep and not distributed_optimizer then norm = norm + ring_all_reduce(8, layout.ep) end
  norm = norm + ring_all_reduce(8, layout.tp) + ring_all_reduce(8, layout.pp)
  parts[#parts + 1] = { 'norm', norm }
  if ep then
    -- per all-to-all: its rows for the other ranks and a header; per dispatch (a quarter of them) an
    -- all-gather of every rank's i64 token counts per expert
    local calls = a2a.calls / (opts.steps - 1)
    parts[#parts + 1] = { 'all-to-all', a2a.bytes / (opts.steps - 1) + calls * HEADER }
    parts[#parts + 1] = { 'expert counts', calls / 4 * ring_half(layout.ep * opts.num_experts * 8, layout.ep) }
  end
  local activation = mb * T * opts.hidden_size * param_size
  local stage = model.pipeline or { is_first = true, is_last = true }
  if layout.tp > 1 then
    -- per micro-batch: each row-parallel layer's forward all-reduce and each column-parallel one's
    -- backward all-reduce (2 + 2 per layer of this stage), the embedding's forward all-reduce (first
    -- stage), the output layer's backward all-reduce and the vocabulary-parallel cross-entropy's two
    -- (row maxima [N], then sums and target logits [N, 2]) on the last stage
    local per = 4 * #model.decoder.layers.items * ring_all_reduce(activation, layout.tp)
    if stage.is_first then per = per + ring_all_reduce(activation, layout.tp) end
    if stage.is_last then
      per = per + ring_all_reduce(activation, layout.tp) + ring_all_reduce(mb * T * 4, layout.tp)
        + ring_all_reduce(mb * T * 8, layout.tp)
    end
    parts[#parts + 1] = { 'tp activations', M * per }
  end
  if layout.pp > 1 then
    -- each stage sends its output forward and its input's gradient back, one per micro-batch
    local sends = (stage.is_last and 0 or M) + (stage.is_first and 0 or M)
    parts[#parts + 1] = { 'pp activations', sends * activation }
    if config.tie_embeddings ~= false and (stage.is_first or stage.is_last) then
      local weight = stage.is_first and model.embedding.word_embeddings.weight or model.output_layer.weight
      parts[#parts + 1] = { 'embedding', ring_all_reduce(weight:numel() * grad_size, 2) }
    end
  end
  local total = 0
  for _, p in ipairs(parts) do total = total + p[2] end
  return total, parts
end

---------------------------------------------------------------------------------------------------

local sent, seconds, hidden, exposed, comm, from_hooks = 0, 0, 0, 0, 0, 0
local a2a_wait, a2a_comm = 0, 0
for iteration = 1, opts.steps do
  pmp.dist.group('world'):barrier()
  pmp.dist.reset_stats()
  expert_parallel.all_to_all_stats()
  if iteration == 2 then a2a.bytes, a2a.calls = 0, 0 end
  local start = clock.now()
  step(iteration)
  local elapsed = clock.now() - start
  local s = pmp.dist.stats()
  if iteration > 1 then
    local sync = ddp:sync_stats()
    sent = sent + s.bytes_sent
    seconds = seconds + elapsed
    hidden = hidden + sync.hidden_fraction
    exposed = exposed + sync.wait_seconds
    comm = comm + sync.comm_seconds
    from_hooks = from_hooks + sync.from_hooks
    local tokens = expert_parallel.all_to_all_stats()
    a2a_wait, a2a_comm = a2a_wait + tokens.wait_seconds, a2a_comm + tokens.comm_seconds
  end
end
local n = opts.steps - 1
local total, parts = expected()
local measured = sent / n
local breakdown = {}
for _, p in ipairs(parts) do breakdown[#breakdown + 1] = string.format('%s %.0f', p[1], p[2]) end

local line = string.format('%s %s rank %d/%d: %.3f s/step | sent %.0f B/step, expected %.0f (%s) | ratio %.4f',
  layout_name, dtype, layout.rank, layout.world, seconds / n, measured, total, table.concat(breakdown, ', '),
  measured / total)
if layout.ep > 1 then
  -- evenly spread routing: each of the tokens' topk choices is on another rank with probability (ep-1)/ep
  local layers = #model.decoder.layers.items
  local tokens = opts.micro_batch_size * opts.seq_length * opts.micro_batches
  local even = 4 * layers * tokens * opts.moe_router_topk * (layout.ep - 1) / layout.ep * opts.hidden_size
    * (opts.bf16 and 2 or 4)
  local routed = a2a.bytes / n
  line = line .. string.format(' | all-to-all %.0f B/step, analytical (even routing) %.0f, ratio %.4f', routed, even,
    routed / even)
  -- as for the buckets: 1 - (time blocked on the token all-to-alls) / (their time on the communication thread)
  line = line .. string.format(' | all-to-all comm %.3f s, exposed %.3f s, hidden %.0f%%', a2a_comm / n, a2a_wait / n,
    a2a_comm > 0 and 100 * math.max(0, math.min(1, 1 - a2a_wait / a2a_comm)) or 0)
end
if ddp.group.size > 1 then
  line = line .. string.format(' | %d buckets, %.1f started in backward | dp comm %.3f s, exposed %.3f s, hidden %.0f%%',
    #ddp.buckets, from_hooks / n, comm / n, exposed / n, 100 * hidden / n)
end
-- one line per rank, in rank order
for r = 0, layout.world - 1 do
  if r == layout.rank then
    print(line)
    io.stdout:flush()
  end
  pmp.dist.group('world'):barrier()
end
