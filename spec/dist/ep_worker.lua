-- Run by spec/dist_ep_spec.lua on every rank: pmp.dist's all_to_all with uneven counts (zero rows
-- included), then one training step of a small MoE GPT with its experts split over the expert-parallel
-- group (pmp.nn.expert_parallel, DistributedDataParallel skipping the experts or, for the distributed
-- optimizer, reducing them over the expert-data-parallel group; pmp.train.step.finish_grads), against the same step of the whole model in this process on the
-- whole batch. Prints from every rank:
--   A2A rank ok|<what differs>
--   GRAD rank name max_abs_diff             every parameter this rank holds vs the reference's
--   NORM rank norm reference                the global gradient norm
--   LOSS rank loss reference                the loss averaged over the data-parallel ranks
--   EXPERTS rank names...                   the expert indices of layer 0 this rank holds
--   OVERLAP rank identical|<what differs>   the step again with moe_shared_expert_overlap, against the above
local step = require 'pmp.train.step'
local expert_parallel = require 'pmp.nn.expert_parallel'

local ep_size = tonumber(arg[1])
-- 'distributed': the distributed optimizer's DistributedDataParallel, experts in buckets of their own
-- reduce-scattered over the expert-data-parallel group; each rank checks its shards of the gradients
local distributed = arg[2] == 'distributed'
local layout = pmp.dist.init { ep = ep_size }
local world, ep, dp = pmp.dist.group('world'), pmp.dist.group('ep'), pmp.dist.group('dp')

-- all_to_all: rank r sends (r + k) % 3 rows to rank k, row i to rank k holding 100 r + 10 k + i
do
  local n, r = world.size, world.rank
  local send, rows = {}, {}
  for k = 0, n - 1 do
    send[k + 1] = (r + k) % 3
    for i = 1, send[k + 1] do rows[#rows + 1] = { 100 * r + 10 * k + i, -(100 * r + 10 * k + i) } end
  end
  local t = #rows > 0 and pmp.tensor(rows) or pmp.zeros({ 0, 2 })
  local got = world:all_to_all(t, send):totable()
  local problem, at = nil, 0
  for s = 0, n - 1 do
    for i = 1, (s + r) % 3 do
      at = at + 1
      local want = 100 * s + 10 * r + i
      if not got[at] or got[at][1] ~= want or got[at][2] ~= -want then
        problem = string.format('row %d from rank %d: expected %d', at, s, want)
      end
    end
  end
  if not problem and #got ~= at then problem = string.format('%d rows received, expected %d', #got, at) end
  print(string.format('A2A %d %s', r, problem or 'ok'))
end

local config = { num_layers = 2, hidden_size = 16, num_attention_heads = 2, vocab_size = 40, dtype = 'f32',
  num_moe_experts = 4, moe_router_topk = 2, moe_ffn_hidden_size = 24, moe_grouped_gemm = true,
  moe_shared_expert_intermediate_size = 8, moe_shared_expert_gate = true, moe_aux_loss_coeff = 0.01,
  moe_z_loss_coeff = 0.001, moe_layer_freq = { 1, 1 } }
local MB, T = 2, 8
pmp.manual_seed(3)
local ids = pmp.randint(0, 40, { MB * dp.size, T }):long()
local targets = pmp.randint(0, 40, { MB * dp.size, T }):long()

local function batch(first, count)
  return { ids = ids:narrow(1, first, count), targets = targets:narrow(1, first, count) }
end

-- the reference: the whole model, each data-parallel rank's micro batch as one micro batch here
pmp.manual_seed(11)
local reference = pmp.nn.GPTModel(config)
local micro = {}
for d = 1, dp.size do micro[d] = batch(1 + (d - 1) * MB, MB) end
local ref_loss = step.forward_backward(reference, micro)
local ref_grads = {}
for _, pair in ipairs(reference:named_parameters()) do ref_grads[pair[1]] = pair[2].grad end
local ref_norm = require('pmp.dist.grad_norm').grad_norm(reference)

-- One step of the expert-parallel model, with or without --moe-shared-expert-overlap: the loss
-- averaged over the data-parallel ranks, the global gradient norm, the gradients as {name, tensor}
-- (with the distributed optimizer this rank's shards of them, the parameter's offset and length
-- appended) and the experts of layer 0 held here.
local function train(overlap)
  local settings = {}
  for k, v in pairs(config) do settings[k] = v end
  settings.moe_shared_expert_overlap = overlap
  pmp.manual_seed(11)
  local model = expert_parallel.expert_parallel(pmp.nn.GPTModel(settings), { data_size = layout.dp })
  local ddp, optimizer
  if distributed then
    ddp = pmp.dist.ddp.DistributedDataParallel(model, { distributed_optimizer = true, experts = {
      match = expert_parallel.is_expert_parameter, group = pmp.dist.group('edp'), divisor = dp.size } })
    expert_parallel.reduced_elsewhere(model)
    optimizer = pmp.optim.DistributedOptimizer(model:parameters(), { ddp = ddp })
  elseif dp.size > 1 then
    ddp = pmp.dist.ddp.DistributedDataParallel(model, { skip = expert_parallel.is_expert_parameter })
  end
  local loss = step.forward_backward(model, { batch(1 + layout.dp_rank * MB, MB) }, { ddp = ddp })
  step.finish_grads(model, ddp)
  local norm = require('pmp.dist.grad_norm').grad_norm(optimizer or model)
  loss = require('pmp.train.parallel').mean_loss(loss, { dp = dp.size, cp = 1 })
  local grads = {}
  if distributed then
    for _, shard in ipairs(optimizer.buckets) do
      for _, segment in ipairs(shard.segments) do
        grads[#grads + 1] = { segment.entry.name, shard.bucket.shard:narrow(1, segment.shard_offset + 1, segment.length),
          segment.param_offset, segment.length }
      end
    end
  else
    for _, pair in ipairs(model:named_parameters()) do grads[#grads + 1] = { pair[1], pair[2].grad } end
  end
  local held = {}
  local experts = model.decoder.layers['0'].mlp.experts.local_experts
  for _, expert in ipairs(experts.items) do
    for name, m in pairs(rawget(experts, '_modules').values) do
      if m == expert then held[#held + 1] = name end
    end
  end
  return loss, norm, grads, held
end

local loss, norm, grads, held = train(false)
print(string.format('EXPERTS %d %s', world.rank, table.concat(held, ' ')))
for _, g in ipairs(grads) do
  local name, got = g[1], g[2]
  local want = ref_grads[name]
  if want and g[3] then want = want:reshape(-1):narrow(1, g[3] + 1, g[4]) end
  print(string.format('GRAD %d %s %s', world.rank, name, tostring(want and got and (got - want):abs():max():item() or 'missing')))
end
print(string.format('NORM %d %.10g %.10g', world.rank, norm, ref_norm))
print(string.format('LOSS %d %.10g %.10g', world.rank, loss, ref_loss))

-- the same step with the shared experts overlapping the all-to-alls: every number bit for bit
local overlap_loss, overlap_norm, overlap_grads = train(true)
local differences = {}
if overlap_loss ~= loss then differences[#differences + 1] = string.format('loss %.17g vs %.17g', overlap_loss, loss) end
if overlap_norm ~= norm then differences[#differences + 1] = string.format('norm %.17g vs %.17g', overlap_norm, norm) end
for k, g in ipairs(grads) do
  local other = overlap_grads[k]
  if not other or other[1] ~= g[1] then
    differences[#differences + 1] = 'gradient ' .. g[1] .. ' missing'
  elseif g[2] and (other[2] - g[2]):abs():max():item() ~= 0 then
    differences[#differences + 1] = string.format('%s by %.3g', g[1], (other[2] - g[2]):abs():max():item())
  end
end
print(string.format('OVERLAP %d %s', world.rank, #differences == 0 and 'identical' or table.concat(differences, '; ')))
