-- Run by spec/dist_dp_spec.lua on every rank of a data-parallel group: trains a tiny Llama-style
-- GPTModel three steps with DistributedDataParallel (+ AdamW) and with the distributed optimizer, each
-- rank on its half of the global batch in two micro-batches, gradient clipping on; and, in the same
-- script, one process on the whole global batch (the reference). Prints (from every rank):
--   LOSS case step loss reference          the step's loss averaged over the data-parallel group
--   NORM case step norm reference          the global gradient norm before clipping
--   PARAM case name max_abs_diff           every parameter after the last step vs the reference
--   STATE case name key max_abs_diff       distributed optimizer: full_state() vs the reference AdamW's
--   OVERLAP case step buckets from_hooks launched_in_first_micro_batch in_order first_grads_seen params
--                                          before_backward_end  (how the buckets of the last backward started)
--   RESHARD case max_abs_diff              full_state -> optimizer with other buckets -> full_state
--   ROUNDTRIP case max_abs_diff            full_state -> load_full_state -> state_dict, same optimizer
local clock = require 'pmp.clock'
local ffi = require 'ffi'

pmp.dist.init{}
local dp = pmp.dist.group('dp')

local STEPS, MICRO, MB, T, VOCAB = 3, 2, 2, 16, 60
local GLOBAL = MB * MICRO * dp.size   -- sequences per step, every token a target: equal counts per micro-batch
local MAX_NORM, LR = 0.5, 1e-3

local config = { num_layers = 2, hidden_size = 32, num_attention_heads = 4, num_query_groups = 2,
  ffn_hidden_size = 64, vocab_size = VOCAB, padded_vocab_size = 64, dtype = 'f32' }

local function address(t) return tonumber(ffi.cast('uintptr_t', t.ptr)) end

pmp.manual_seed(1234)
local data = {}
for step = 1, STEPS do
  data[step] = { ids = pmp.randint(0, VOCAB, { GLOBAL, T }), targets = pmp.randint(0, VOCAB, { GLOBAL, T }) }
end

local function optimizer_options() return { lr = LR, weight_decay = 0.1 } end

-- The reference: one process, the whole global batch per step, the single-process clipping.
local reference = require('spec.support.reference_run').train(config, data,
  { seed = 7, adam = optimizer_options(), max_norm = MAX_NORM })
local ref, ref_opt, initial = reference.model, reference.optimizer, reference.initial
local ref_losses, ref_norms = reference.losses, reference.norms
local ref_params = {}
for _, pair in ipairs(ref:named_parameters()) do ref_params[pair[1]] = pair[2] end
local ref_state = {}
for _, s in ipairs(ref_opt.state) do ref_state[address(s.param)] = s end

local function fresh_model(dtype, changes)
  local c = {}
  for k, v in pairs(config) do c[k] = v end
  for k, v in pairs(changes or {}) do c[k] = v end
  local model = pmp.nn.GPTModel(c)
  model:load_state_dict(initial)
  if dtype then model:to(dtype) end
  return model
end

-- This rank's micro-batch k of a step: rows of the global batch, data-parallel rank-major as Megatron.
local function micro_batch(step, k)
  local first = (dp.rank * MICRO + k - 1) * MB + 1
  return data[step].ids:narrow(1, first, MB), data[step].targets:narrow(1, first, MB)
end

local function emit(...) print(table.concat({ ... }, ' ')) end

-- update(): clips and steps, returns the gradient norm.
local function train(case, model, ddp, opt, update)
  for step = 1, STEPS do
    opt:zero_grad()
    local loss_sum, launched_early, backward_end = 0, 0, nil
    for k = 1, MICRO do
      ddp:set_sync(k == MICRO)
      local ids, targets = micro_batch(step, k)
      local loss = model(ids, targets)
      loss_sum = loss_sum + loss:item()
      ;(loss * (1 / MICRO)):backward()
      if k < MICRO then launched_early = launched_early + #ddp.launches end
      backward_end = clock.now()
    end
    ddp:finish_grad_sync()
    local stats = ddp:sync_stats()
    local in_order, before_end = true, true
    for i, l in ipairs(stats.launches) do
      in_order = in_order and l.bucket == i and l.from_hook
      before_end = before_end and l.at < backward_end
    end
    emit('OVERLAP', case, step, stats.buckets, stats.from_hooks, launched_early, tostring(in_order),
      stats.launches[1].grads_seen, #ddp.entries, tostring(before_end))
    local norm = update()
    local loss = pmp.tensor({ loss_sum / MICRO }, { dtype = 'f64' })
    dp:all_reduce(loss, 'avg')
    emit('LOSS', case, step, string.format('%.10g %.10g', loss:item(), ref_losses[step]))
    emit('NORM', case, step, string.format('%.10g %.10g', norm, ref_norms[step]))
  end
  for _, pair in ipairs(model:named_parameters()) do
    local diff = (pair[2]:float() - ref_params[pair[1]]):abs():max():item()
    emit('PARAM', case, pair[1], string.format('%.3g', diff))
  end
end

local function max_diff(a, b) return (a:float() - b:float()):abs():max():item() end

-- DDP with overlap and small buckets (several per model), AdamW, clipping over the model.
do
  local model = fresh_model()
  local ddp = pmp.dist.ddp.DistributedDataParallel(model, { bucket_size = 3000 })
  local opt = pmp.optim.AdamW(pmp.optim.decay_groups(model), optimizer_options())
  train('ddp', model, ddp, opt, function()
    local norm = pmp.dist.clip_grad_norm(model, MAX_NORM)
    opt:step()
    return norm
  end)
end

-- The same with activation recompute: the hooks must see the parameters again in backward's re-run.
do
  local model = fresh_model(nil, { recompute_granularity = 'full' })
  local ddp = pmp.dist.ddp.DistributedDataParallel(model, { bucket_size = 3000 })
  local opt = pmp.optim.AdamW(pmp.optim.decay_groups(model), optimizer_options())
  train('recompute', model, ddp, opt, function()
    local norm = pmp.dist.clip_grad_norm(ddp, MAX_NORM)
    opt:step()
    return norm
  end)
end

-- The distributed optimizer (reduce-scatter, sharded AdamW, all-gather), clipping over its shards.
do
  local model = fresh_model()
  local ddp = pmp.dist.ddp.DistributedDataParallel(model, { bucket_size = 3000, distributed_optimizer = true })
  local options = optimizer_options()
  options.ddp = ddp
  local opt = pmp.optim.DistributedOptimizer(pmp.optim.decay_groups(model), options)
  train('distopt', model, ddp, opt, function()
    local norm = pmp.dist.clip_grad_norm(opt, MAX_NORM)
    opt:step()
    return norm
  end)

  local full = opt:full_state()
  for _, pair in ipairs(model:named_parameters()) do
    local s = ref_state[address(ref_params[pair[1]])]
    for _, key in ipairs({ 'exp_avg', 'exp_avg_sq' }) do
      emit('STATE', 'distopt', pair[1], key, string.format('%.3g', max_diff(full.params[pair[1]][key], s[key])))
    end
  end

  -- the same state into an optimizer whose buckets (so shards) are cut elsewhere
  local other_model = fresh_model()
  local other_ddp = pmp.dist.ddp.DistributedDataParallel(other_model, { bucket_size = 1e6, distributed_optimizer = true })
  local other = pmp.optim.DistributedOptimizer(pmp.optim.decay_groups(other_model), { ddp = other_ddp })
  other:load_full_state(full)
  local again, worst = other:full_state(), 0
  for name, s in pairs(full.params) do
    for key, t in pairs(s) do worst = math.max(worst, max_diff(t, again.params[name][key])) end
  end
  emit('RESHARD', 'distopt', worst, again.step, other.lr)

  local before = {}
  for k, b in ipairs(opt:state_dict().buckets) do before[k] = { b.exp_avg:clone(), b.exp_avg_sq:clone() } end
  for _, b in ipairs(opt:state_dict().buckets) do b.exp_avg:fill_(0); b.exp_avg_sq:fill_(0) end
  opt:load_full_state(full)
  worst = 0
  for k, b in ipairs(opt:state_dict().buckets) do
    worst = math.max(worst, max_diff(b.exp_avg, before[k][1]), max_diff(b.exp_avg_sq, before[k][2]))
  end
  emit('ROUNDTRIP', 'distopt', worst)
end

-- bf16 parameters with f32 master weights under the distributed optimizer (clipping by its option).
do
  local model = fresh_model('bf16')
  local ddp = pmp.dist.ddp.DistributedDataParallel(model, { bucket_size = 3000, distributed_optimizer = true })
  local options = optimizer_options()
  options.ddp, options.clip_grad = ddp, MAX_NORM
  local opt = pmp.optim.DistributedOptimizer(pmp.optim.decay_groups(model), options)
  train('bf16', model, ddp, opt, function() return opt:step() end)
end
