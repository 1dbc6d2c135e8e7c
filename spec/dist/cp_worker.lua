-- Run by spec/dist_cp_spec.lua. Context parallelism (lua/pmp/nn/context_parallel.lua) against one
-- process computed in this same script: a tiny Llama-style GPTModel (GQA) trained three AdamW steps on
-- the same global batch, the context-parallel one on each rank's part of the sequence, its gradients
-- averaged over 'dp_cp' by DistributedDataParallel.
--   cp_worker.lua TP [DIR]   on every rank of a world of TP x CP: the cases below; with DIR the 'gqa'
--                            case saves its model and optimizer there (pmp.checkpoint)
--   cp_worker.lua load DIR   one process: loads DIR into the whole model and compares it with the
--                            reference after the same three steps
-- Differences are the largest over the ranks, printed by rank 0 alone:
--   GATHER forward_diff backward_diff   gather_sequence vs the whole tensor / the closed-form gradient
--   LOSS case step parallel reference max_diff   the loss averaged over the cp group
--   GRAD case name max_diff scale       gradient shards after the first backward (and the cp average)
--   PARAM case name max_diff            parameter shards after three steps
--   CKPT what max_diff                  'load' mode: the loaded parameters and Adam moments
--   ERROR case message                  what a sequence length cp cannot split raises
local parallel = pmp.nn.parallel
local cp_lib = pmp.nn.context_parallel
local sharding = require 'pmp.dist.sharding'
local checkpoint = require 'pmp.checkpoint'

local load_mode = arg[1] == 'load'
local tp = load_mode and 1 or tonumber(arg[1])
local save_dir = load_mode and nil or arg[2]
local world = pmp.dist.init().world
pmp.dist.init{ tp = tp, cp = world / tp }
local layout = pmp.dist.layout()
local everyone = pmp.dist.group('world')
local cp_group = pmp.dist.group('cp')

local function max_diff(a, b) return (a:double() - b:double()):abs():max():item() end
local function worst(x) return everyone:all_reduce(pmp.tensor({ x }, { dtype = 'f64' }), 'max'):item() end
local function report(...) if layout.rank == 0 then print(string.format(...)) end end

local STEPS, B, T, VOCAB = 3, 2, 16, 61

---------------------------------------------------------------------------------------------------
-- gather_sequence alone: [B, heads, T, D] cut like a sequence, gathered back whole. With rank r's
-- upstream gradient (r + 1) w, each rank's input gradient is (sum over ranks of r + 1) w at its positions.
if not load_mode then
  pmp.manual_seed(3)
  local whole, w = pmp.randn({ 2, 3, T, 4 }), pmp.randn({ 2, 3, T, 4 })
  local mine = cp_lib.positions(T, cp_group)
  local x = whole:index_select(3, mine):requires_grad_()
  local y = cp_lib.gather_sequence(x, cp_group)
  ;(y * w * (cp_group.rank + 1)):sum():backward()
  local factor = cp_group.size * (cp_group.size + 1) / 2
  report('GATHER %.3e %.3e', worst(max_diff(y, whole)), worst(max_diff(x.grad, w:index_select(3, mine) * factor)))
end

---------------------------------------------------------------------------------------------------
-- GPTModel

local function config(case)
  return { num_layers = 2, hidden_size = 32, num_attention_heads = 4, num_query_groups = 2, ffn_hidden_size = 48,
    vocab_size = VOCAB, make_vocab_size_divisible_by = 4, tensor_model_parallel_size = 2,   -- padded to 64
    tie_embeddings = case.name ~= 'window', sliding_window = case.window }
end

-- The global batch; 'gqa' ignores a fifth of its targets, unevenly over the cp ranks' parts.
-- 'packed': two documents per row, positions restarting and attention kept inside each.
local function batch(case)
  pmp.manual_seed(99)
  local ids = pmp.randint(0, VOCAB, { B, T })
  local targets = pmp.randint(0, VOCAB, { B, T })
  if case.name == 'gqa' then targets = pmp.where(pmp.rand({ B, T }):lt(0.2), -100, targets) end
  local options
  if case.name == 'packed' then
    local starts = { { 0, 5 }, { 0, 9 } }
    local positions, first_key = {}, {}
    for b = 1, B do
      positions[b], first_key[b] = {}, {}
      for t = 0, T - 1 do
        local start = t >= starts[b][2] and starts[b][2] or 0
        positions[b][t + 1], first_key[b][t + 1] = t - start, start
      end
    end
    options = { positions = pmp.tensor(positions, { dtype = 'i64' }), first_key = pmp.tensor(first_key, { dtype = 'i64' }) }
  end
  return ids, targets, options
end

local function build(case)
  pmp.manual_seed(1234)
  return pmp.nn.GPTModel(config(case))
end

-- eps 1e-6: see spec/dist/tp_worker.lua (updates of gradients near f32 rounding stay proportional).
local function optimizer(model) return pmp.optim.AdamW(model:parameters(), { lr = 1e-2, weight_decay = 0.1, eps = 1e-6 }) end

local function train_reference(case)
  local model = build(case)
  local opt = optimizer(model)
  local ids, targets, options = batch(case)
  local losses, grads = {}, {}
  for step = 1, STEPS do
    opt:zero_grad()
    local loss = model(ids, targets, options)
    loss:backward()
    if step == 1 then
      for _, pair in ipairs(model:named_parameters()) do grads[pair[1]] = pair[2].grad:clone() end
    end
    opt:step()
    losses[step] = loss:item()
  end
  return model, opt, losses, grads
end

local function local_options(options)
  if not options then return nil end
  return { positions = cp_lib.split(options.positions, cp_group), first_key = cp_lib.split(options.first_key, cp_group) }
end

local function run_case(case)
  local reference, _, ref_losses, ref_grads = train_reference(case)
  local model = build(case)
  parallel.tensor_parallel(model, { sequence_parallel = case.sp })
  parallel.context_parallel(model, { group = cp_group })
  local ddp = pmp.dist.ddp.DistributedDataParallel(model)
  local opt = optimizer(model)
  local ids, targets, options = batch(case)
  ids, targets, options = cp_lib.split(ids, cp_group), cp_lib.split(targets, cp_group), local_options(options)
  local grads = {}
  for step = 1, STEPS do
    opt:zero_grad()
    ddp:zero_grad()
    local loss = model(ids, targets, options)
    loss:backward()
    ddp:finish_grad_sync()
    parallel.finish_grads(model)
    if step == 1 then
      for _, pair in ipairs(model:named_parameters()) do grads[pair[1]] = pair[2].grad:clone() end
    end
    opt:step()
    local mean = cp_group:all_reduce(pmp.tensor({ loss:item() }, { dtype = 'f64' }), 'avg'):item()
    report('LOSS %s %d %.9e %.9e %.3e', case.name, step, mean, ref_losses[step], worst(math.abs(mean - ref_losses[step])))
  end
  local cfg, theirs, mine = reference.config, reference:state_dict(), model:state_dict()
  local names = {}
  for name in pairs(theirs) do names[#names + 1] = name end
  table.sort(names)   -- the same order on every rank: worst() is a collective
  for _, name in ipairs(names) do
    local expected_grad = sharding.shard(name, ref_grads[name], cfg, layout.tp, layout.tp_rank)
    report('GRAD %s %s %.3e %.3e', case.name, name, worst(max_diff(grads[name], expected_grad)),
      worst(expected_grad:abs():max():item()))
    report('PARAM %s %s %.3e', case.name, name,
      worst(max_diff(mine[name], sharding.shard(name, theirs[name], cfg, layout.tp, layout.tp_rank))))
  end
  if save_dir and case.name == 'gqa' then checkpoint.save(save_dir, STEPS, model, opt, {}) end
end

local CASES = {
  { name = 'gqa', sp = true },
  { name = 'window', window = 5 },
  { name = 'packed', sp = true },
}

if load_mode then
  local reference, ref_opt = train_reference(CASES[1])
  local model = build(CASES[1])
  local opt = optimizer(model)
  checkpoint.load(arg[2], model, opt)
  local theirs, params, moments = reference:state_dict(), 0, 0
  for name, t in pairs(model:state_dict()) do params = math.max(params, max_diff(t, theirs[name])) end
  local want, got = ref_opt:state_dict().state, opt:state_dict().state
  for k, s in ipairs(got) do
    moments = math.max(moments, max_diff(s.exp_avg, want[k].exp_avg) / want[k].exp_avg:abs():max():item())
  end
  report('CKPT params %.3e', params)
  report('CKPT exp_avg %.3e', moments)
  return
end

for _, case in ipairs(CASES) do run_case(case) end

-- a sequence cp cannot cut into 2 cp chunks, and a local part that is not two chunks
for _, bad in ipairs({ { 'split', T - 2 }, { 'forward', T / cp_group.size - 1 } }) do
  local ok, err = pcall(function()
    local model = parallel.context_parallel(build(CASES[2]), { group = cp_group })
    local ids = pmp.zeros({ B, bad[2] }, { dtype = 'i64' })
    if bad[1] == 'split' then cp_lib.split(ids, cp_group) else model(ids) end
  end)
  report('ERROR %s %s', bad[1], ok and 'none' or tostring(err))
end
