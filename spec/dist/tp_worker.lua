-- Run by spec/dist_tp_spec.lua on every rank of a tensor-parallel group as large as the world (also
-- without mpirun, as a group of one). Every comparison is against a reference computed in this same
-- script without tensor parallelism: F.cross_entropy on whole logits, plain Linear layers, and a plain
-- GPTModel trained on the same global batch. Differences are the largest over the ranks (each rank
-- compares its own part), printed by rank 0 alone: mpirun forwards each rank's output in chunks that
-- may split lines.
--   CE reduction loss_diff grad_diff           vocab_parallel_cross_entropy vs F.cross_entropy
--   LAYERS kind max_diff                        column+row parallel pair vs two Linear layers
--   LOSS case step parallel reference max_diff  training losses (parallel: rank 0's)
--   LOGITS case max_diff                        gathered logits of the trained models
--   GRAD case name max_diff scale               gradient shards after the first backward (and finish_grads)
--   PARAM case name max_diff                    each parameter shard vs the reference's shard ('missing':
--                                               absent or mis-shaped on some rank)
--   KEYS case extra                             state_dict keys the reference lacks, most on any rank
--   NAMES case count                            the reference's state_dict entries (one PARAM line each)
--   SAME case all_same                          group of one: the model came back untouched
--   ERROR case message                          the error tensor_parallel or forward raised on rank 0
local parallel = pmp.nn.parallel
local sharding = require 'pmp.dist.sharding'
local F = pmp.F

pmp.dist.init{ tp = pmp.dist.init().world }
local group = pmp.dist.group('tp')
local tp, r = group.size, group.rank

local function max_diff(a, b) return (a:double() - b:double()):abs():max():item() end
local function worst(x) return group:all_reduce(pmp.tensor({ x }, { dtype = 'f64' }), 'max'):item() end
local function report(...) if r == 0 then print(string.format(...)) end end
local function leaf(t) return t:detach():clone():requires_grad_() end
local function columns(t, first, n) return t:narrow(t:dim(), first, n):contiguous() end

---------------------------------------------------------------------------------------------------
-- vocab_parallel_cross_entropy: 6 rows, a vocabulary of 10 padded to 12 columns; the padding holds
-- large logits that must never count. One target is ignored.
do
  pmp.manual_seed(11)
  local full = pmp.randn({ 6, 12 }) * 3
  full = pmp.where(pmp.arange(0, 12):ge(10), 50, full)
  local targets = pmp.tensor({ 3, 9, -100, 0, 5, 7 }, { dtype = 'i64' })
  local weights = pmp.rand({ 6 }) + 0.5
  local n = 12 / tp
  for _, reduction in ipairs({ 'mean', 'sum', 'none' }) do
    local whole = leaf(full:narrow(2, 1, 10))
    local expected = F.cross_entropy(whole, targets, { reduction = reduction })
    local mine = leaf(columns(full, 1 + r * n, n))
    local got = parallel.vocab_parallel_cross_entropy(mine, targets, { reduction = reduction, vocab_size = 10 })
    if reduction == 'none' then
      (expected * weights):sum():backward()
      ;(got * weights):sum():backward()
    else
      expected:backward()
      got:backward()
    end
    local expected_grad = pmp.cat({ whole.grad, pmp.zeros({ 6, 2 }) }, 2)   -- padding gets no gradient
    report('CE %s %.3e %.3e', reduction, worst(max_diff(got, expected)),
      worst(max_diff(mine.grad, columns(expected_grad, 1 + r * n, n))))
  end
end

---------------------------------------------------------------------------------------------------
-- ColumnParallelLinear then RowParallelLinear against Linear(8 -> 12) then Linear(12 -> 8), built from
-- the same seed. 'gather': the column layer gathers its output and the row layer cuts its input again;
-- 'parallel': the output stays split; 'sequence': sequence parallel, the input scattered along the
-- sequence and each rank's loss taken on its slice of the output (the losses sum to the reference's).
local function layer_pair(kind)
  local sp = kind == 'sequence'
  pmp.manual_seed(5)
  local x = pmp.randn({ 2, 4, 8 })
  local w = pmp.randn({ 2, 4, 8 })
  pmp.manual_seed(6)
  local a, b = pmp.nn.Linear(8, 12), pmp.nn.Linear(12, 8)
  local bias_a, bias_b = pmp.randn({ 12 }), pmp.randn({ 8 })
  pmp.no_grad(function()
    a.bias:copy_(bias_a)
    b.bias:copy_(bias_b)
  end)
  local xr = leaf(x)
  local yr = b(a(xr))
  ;(yr * w):sum():backward()
  pmp.manual_seed(6)
  local col = parallel.ColumnParallelLinear(8, 12, { gather_output = kind == 'gather', sequence_parallel = sp })
  local row = parallel.RowParallelLinear(12, 8, { input_is_parallel = kind ~= 'gather', sequence_parallel = sp })
  pmp.no_grad(function()   -- the layers start with zero biases; give both pairs the same non-zero ones
    col.bias:copy_(sharding.shard('linear_qkv.bias', bias_a, {}, tp, r))
    row.bias:copy_(bias_b)
  end)
  local xp = leaf(x)
  local input = sp and parallel.scatter_to_sequence_parallel_region(xp) or xp
  local yp = row(col(input))
  local expected_y = sp and yr:narrow(2, 1 + r * 4 / tp, 4 / tp) or yr
  local wp = sp and w:narrow(2, 1 + r * 4 / tp, 4 / tp) or w
  ;(yp * wp):sum():backward()
  local diffs = {
    max_diff(yp, expected_y), max_diff(xp.grad, xr.grad),
    max_diff(col.weight.grad, sharding.shard('linear_qkv.weight', a.weight.grad, {}, tp, r)),
    max_diff(row.weight.grad, sharding.shard('linear_proj.weight', b.weight.grad, {}, tp, r)),
    max_diff(col.bias.grad, sharding.shard('linear_qkv.bias', a.bias.grad, {}, tp, r)),
  }
  -- with sequence parallelism each rank's row bias saw its slice of the sequence: sum them
  local row_bias_grad = sp and group:all_reduce(row.bias.grad:clone()) or row.bias.grad
  diffs[#diffs + 1] = max_diff(row_bias_grad, b.bias.grad)
  report('LAYERS %s %.3e', kind, worst(math.max(unpack(diffs))))
end
for _, kind in ipairs({ 'gather', 'parallel', 'sequence' }) do layer_pair(kind) end

---------------------------------------------------------------------------------------------------
-- GPTModel: 3 AdamW steps, tensor parallel vs one process, on the same global batch.

local STEPS, B, T, VOCAB = 3, 2, 16, 61

local function config(case)
  local c = { num_layers = 2, hidden_size = 32, num_attention_heads = 4, num_query_groups = 2, ffn_hidden_size = 48,
    vocab_size = VOCAB, make_vocab_size_divisible_by = 4, tensor_model_parallel_size = 2,   -- padded to 64
    tie_embeddings = case.tied }
  if case.extras then   -- LayerNorm, GELU, biases everywhere and qk_layernorm
    c.normalization, c.activation, c.add_bias_linear, c.add_qkv_bias, c.qk_layernorm = 'LayerNorm', 'gelu', true, true, true
  end
  if case.mla then   -- DeepSeek's multi-latent attention, with or without the low-rank query
    c.multi_latent_attention, c.kv_lora_rank, c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim = true, 12, 8, 4, 6
    c.q_lora_rank = case.mla == 'q_lora' and 10 or nil
  end
  if case.moe then   -- the second layer a MoE layer with gated shared experts and both auxiliary losses
    c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size, c.moe_grouped_gemm = 4, 2, 24, true
    c.moe_shared_expert_intermediate_size, c.moe_shared_expert_gate = 16, true
    c.moe_aux_loss_coeff, c.moe_z_loss_coeff, c.moe_layer_freq = 0.01, 0.001, { 0, 1 }
    c.moe_router_load_balancing_type = case.moe
  end
  return c
end

local function batch()
  pmp.manual_seed(99)
  local ids = pmp.randint(0, VOCAB, { B, T })
  local targets = pmp.randint(0, VOCAB, { B, T })
  return ids, pmp.where(pmp.rand({ B, T }):lt(0.2), -100, targets)
end

-- Adam divides each update by |gradient|, so where a gradient is as small as f32 rounding of the large
-- ones (1e-9 here) the summation order, which tensor parallelism changes, would pick the update; eps
-- 1e-6 keeps those updates proportional to their gradient. The gradients themselves are compared first.
local function train(model, ids, targets)
  local opt = pmp.optim.AdamW(model:parameters(), { lr = 1e-2, weight_decay = 0.1, eps = 1e-6 })
  local losses, first_grads = {}, {}
  for step = 1, STEPS do
    model:zero_grad()
    local loss = model(ids, targets)
    loss:backward()
    parallel.finish_grads(model)
    if step == 1 then
      for _, pair in ipairs(model:named_parameters()) do first_grads[pair[1]] = pair[2].grad:clone() end
    end
    opt:step()
    losses[step] = loss:item()
  end
  return losses, first_grads
end

local function build(case)
  pmp.manual_seed(1234)
  return pmp.nn.GPTModel(config(case))
end

local function run_case(case)
  local ids, targets = batch()
  local reference = build(case)
  local ref_losses, ref_grads = train(reference, ids, targets)
  local model = build(case)
  local original = model:state_dict()
  local returned = parallel.tensor_parallel(model, { sequence_parallel = case.sp })
  if tp == 1 then
    local same = returned == model
    for name, t in pairs(model:state_dict()) do same = same and original[name] == t end
    report('SAME %s %s', case.name, tostring(same))
  end
  local losses, grads = train(model, ids, targets)
  for step = 1, STEPS do
    report('LOSS %s %d %.9e %.9e %.3e', case.name, step, losses[step], ref_losses[step],
      worst(math.abs(losses[step] - ref_losses[step])))
  end
  report('LOGITS %s %.3e', case.name, worst(max_diff(model(ids), reference(ids))))
  local mine, theirs, extra = model:state_dict(), reference:state_dict(), 0
  for name in pairs(mine) do if not theirs[name] then extra = extra + 1 end end
  report('KEYS %s %d', case.name, worst(extra))
  local cfg = reference.config
  local names = {}
  for name in pairs(theirs) do names[#names + 1] = name end
  table.sort(names)   -- the same order on every rank: worst() is a collective
  report('NAMES %s %d', case.name, #names)
  for _, name in ipairs(names) do
    local expected = sharding.shard(name, theirs[name], cfg, tp, r)
    local got = mine[name]
    local fits = got and table.concat(got.shape, ',') == table.concat(expected.shape, ',')
    local diff = worst(fits and max_diff(got, expected) or math.huge)
    local expected_grad = sharding.shard(name, ref_grads[name], cfg, tp, r)
    local grad_diff = worst(fits and max_diff(grads[name], expected_grad) or math.huge)
    local scale = worst(expected_grad:abs():max():item())
    if diff == math.huge then
      report('PARAM %s %s missing', case.name, name)
    else
      report('PARAM %s %s %.3e', case.name, name, diff)
      report('GRAD %s %s %.3e %.3e', case.name, name, grad_diff, scale)
    end
  end
end

for _, case in ipairs({
  { name = 'tied', tied = true },
  { name = 'tied_sp', tied = true, sp = true },
  { name = 'untied', tied = false },
  { name = 'untied_sp', tied = false, sp = true },
  { name = 'extras', tied = false, extras = true },
  { name = 'extras_sp', tied = true, extras = true, sp = true },
  { name = 'moe', tied = false, moe = 'aux_loss' },
  { name = 'moe_sp', tied = false, moe = 'aux_loss', sp = true },
  { name = 'moe_seq_sp', tied = false, moe = 'seq_aux_loss', sp = true },
  { name = 'mla', tied = false, mla = 'q_lora' },
  { name = 'mla_sp', tied = true, mla = 'q_lora', sp = true },
  { name = 'mla_q_proj_sp', tied = false, mla = 'q_proj', sp = true },
}) do run_case(case) end

---------------------------------------------------------------------------------------------------
-- Sizes tensor parallelism cannot split.
if tp > 1 then
  local function try(name, overrides, sp, length)
    local c = config({ tied = true })
    for k, v in pairs(overrides) do c[k] = v end
    local ok, err = pcall(function()
      local model = parallel.tensor_parallel(pmp.nn.GPTModel(c), { sequence_parallel = sp })
      local ids = pmp.randint(0, VOCAB, { B, length or T })
      model(ids, ids)
    end)
    report('ERROR %s %s', name, ok and 'none' or tostring(err))
  end
  try('heads', { num_attention_heads = 3, num_query_groups = 3, hidden_size = 24 })
  try('groups', { num_query_groups = 1 })
  try('ffn', { ffn_hidden_size = 45 })
  try('vocab', { tensor_model_parallel_size = 1, make_vocab_size_divisible_by = 1 })
  try('sequence', {}, true, 15)
end
