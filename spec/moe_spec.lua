require 'busted.runner'()
-- Mixture of experts (pmp.nn.moe): the grouped GEMM and un-permutation ops against finite differences
-- in f64 and against products written out here; the MoE layer against a per-token reference in plain
-- Lua (softmax, top-k, renormalisation, SwiGLU experts, Qwen2-MoE's gated shared expert); the
-- auxiliary losses against their formulas, and their router gradients against finite differences.
local fails_with = require('spec.support.expect').fails_with
local check = require 'spec.support.gradcheck'
local gradcheck, random_input = check.gradcheck, check.random_input
local moe = pmp.nn.moe

local function close(a, b, tol, what)
  local x, y = a:reshape(-1):totable(), b:reshape(-1):totable()
  assert.are.equal(#x, #y, what)
  for i = 1, #x do
    if math.abs(x[i] - y[i]) > tol * (1 + math.abs(y[i])) then
      error(string.format('%s: element %d is %.10g, expected %.10g', what or 'values', i, x[i], y[i]), 2)
    end
  end
end

local function rows_of(t) return t:totable() end

-- plain-Lua linear algebra on tables
local function matvec(w, x)   -- w [out][in], x [in]
  local y = {}
  for o = 1, #w do
    local s = 0
    for i = 1, #x do s = s + w[o][i] * x[i] end
    y[o] = s
  end
  return y
end
local function silu(v) return v / (1 + math.exp(-v)) end
local function swiglu_mlp(fc1, fc2, x)   -- fc1 rows [gate; up]
  local h, F = matvec(fc1, x), #fc1 / 2
  local a = {}
  for j = 1, F do a[j] = silu(h[j]) * h[F + j] end
  return matvec(fc2, a)
end

-- The experts a token chooses (1-based, best first) and their weights, from Megatron's description of
-- its router: softmax or sigmoid scores, an expert bias that only steers the choice, group-limited
-- choice, renormalisation and a scaling factor. options: score ('softmax' | 'sigmoid'), renormalize,
-- bias (list), groups, group_topk, scaling.
local function route(logits, k, options)
  local E = #logits
  local score, selection = {}, {}
  if options.score == 'sigmoid' then
    for e = 1, E do
      score[e] = 1 / (1 + math.exp(-logits[e]))
      selection[e] = score[e] + (options.bias and options.bias[e] or 0)
    end
  else
    local top, z = -math.huge, 0
    for e = 1, E do top = math.max(top, logits[e]) end
    for e = 1, E do score[e] = math.exp(logits[e] - top); z = z + score[e] end
    for e = 1, E do
      score[e] = score[e] / z
      selection[e] = options.renormalize and logits[e] or score[e]
    end
  end
  local allowed = {}
  for e = 1, E do allowed[e] = true end
  if options.groups then
    local size, sums = E / options.groups, {}
    for g = 1, options.groups do
      local members = {}
      for e = (g - 1) * size + 1, g * size do members[#members + 1] = selection[e] end
      table.sort(members, function(a, b) return a > b end)
      sums[g] = 0
      for j = 1, k / options.group_topk do sums[g] = sums[g] + members[j] end
    end
    local order = {}
    for g = 1, options.groups do order[g] = g end
    table.sort(order, function(a, b) return sums[a] > sums[b] end)
    local keep = {}
    for j = 1, options.group_topk do keep[order[j]] = true end
    for e = 1, E do allowed[e] = keep[math.floor((e - 1) / size) + 1] or false end
  end
  local order = {}
  for e = 1, E do if allowed[e] then order[#order + 1] = e end end
  table.sort(order, function(a, b) return selection[a] > selection[b] end)
  local chosen, sum = {}, 0
  for j = 1, k do chosen[j] = order[j]; sum = sum + score[order[j]] end
  local weights = {}
  for j = 1, k do
    local w = score[chosen[j]]
    if options.score == 'sigmoid' or options.renormalize then w = w / sum end
    weights[j] = w * (options.scaling or 1)
  end
  return chosen, weights
end

-- Megatron's token dropping: per expert at most ceil(T k / E x factor) of the tokens that chose it, those
-- with the highest weight ('probs') or the first ones ('position'). Marks dropped choices in kept[t][j].
local function capacity_drop(choices, E, k, factor, policy)
  local capacity = math.ceil(#choices * k / E * factor)
  local kept, per_expert = {}, {}
  for t, c in ipairs(choices) do
    kept[t] = {}
    for j = 1, k do
      kept[t][j] = true
      local e = c.chosen[j]
      per_expert[e] = per_expert[e] or {}
      table.insert(per_expert[e], { t = t, j = j, w = c.weights[j] })
    end
  end
  for _, list in pairs(per_expert) do
    if policy == 'probs' then table.sort(list, function(a, b) return a.w > b.w end) end
    for i = capacity + 1, #list do kept[list[i].t][list[i].j] = false end
  end
  return kept
end

-- The MoE layer's output for token rows xs (tables), computed token by token.
local function reference_moe(layer, xs, options)
  local router = rows_of(layer.router.weight)
  local k = layer.config.moe_router_topk
  local choices = {}
  for t, x in ipairs(xs) do
    local chosen, weights = route(matvec(router, x), k, options)
    choices[t] = { chosen = chosen, weights = weights }
  end
  local kept = options.capacity and capacity_drop(choices, #router, k, options.capacity, options.policy)
  local out = {}
  for t, x in ipairs(xs) do
    local chosen, weights = choices[t].chosen, choices[t].weights
    local y = {}
    for i = 1, #x do y[i] = 0 end
    for j = 1, k do
      if kept and not kept[t][j] then goto dropped end
      local expert = layer.experts.local_experts[tostring(chosen[j] - 1)]
      local ye = swiglu_mlp(rows_of(expert.linear_fc1.weight), rows_of(expert.linear_fc2.weight), x)
      for i = 1, #x do y[i] = y[i] + weights[j] * ye[i] end
      ::dropped::
    end
    local shared = layer.shared_experts
    if shared then
      local ys = swiglu_mlp(rows_of(shared.linear_fc1.weight), rows_of(shared.linear_fc2.weight), x)
      local g = 1 / (1 + math.exp(-matvec(rows_of(shared.gate_weight), x)[1]))
      for i = 1, #x do y[i] = y[i] + g * ys[i] end
    end
    out[t] = y
  end
  return pmp.tensor(out, { dtype = 'f64' })
end

local function layer_config(extra)
  local c = { num_layers = 1, hidden_size = 6, num_attention_heads = 1, vocab_size = 8, num_moe_experts = 4,
    moe_router_topk = 2, moe_ffn_hidden_size = 3, dtype = 'f64', init_std = 0.5 }
  for key, v in pairs(extra or {}) do c[key] = v end
  return pmp.nn.config(c)
end

describe('MoE ops', function()
  before_each(function() pmp.manual_seed(11) end)

  it('grouped_matmul multiplies each group of rows by its expert matrix transposed', function()
    local x, w = random_input({ 7, 5 }), random_input({ 4, 3, 5 })
    local counts = { 2, 0, 4, 1 }
    local got = moe.grouped_matmul(x, w, counts)
    local parts, start = {}, 1
    for e, c in ipairs(counts) do
      if c > 0 then parts[#parts + 1] = x:narrow(1, start, c):matmul(w:select(1, e):t()) end
      start = start + c
    end
    close(got, pmp.cat(parts, 1), 1e-12, 'grouped product')
  end)

  it('grouped_matmul has finite-difference gradients (an empty expert included)', function()
    local counts = pmp.tensor({ 1, 3, 0, 2 }, { dtype = 'i64' })
    gradcheck(function(x, w) return moe.grouped_matmul(x, w, counts) end, { random_input({ 6, 4 }), random_input({ 4, 3, 4 }) })
  end)

  it('unpermute sums probability-weighted rows into their tokens, with finite-difference gradients', function()
    local y, probs = random_input({ 5, 3 }), random_input({ 5 })
    local rows = pmp.tensor({ 2, 0, 2, 1, 0 }, { dtype = 'i64' })
    local got = moe.unpermute(y, probs, rows, 4):totable()
    local yt, pt = y:totable(), probs:totable()
    local want = { { 0, 0, 0 }, { 0, 0, 0 }, { 0, 0, 0 }, { 0, 0, 0 } }
    for i, r in ipairs({ 2, 0, 2, 1, 0 }) do
      for j = 1, 3 do want[r + 1][j] = want[r + 1][j] + pt[i] * yt[i][j] end
    end
    close(pmp.tensor(got, { dtype = 'f64' }), pmp.tensor(want, { dtype = 'f64' }), 1e-14, 'unpermuted rows')
    gradcheck(function(a, p) return moe.unpermute(a, p, rows, 4) end, { y, probs })
  end)

  it('rejects counts that do not cover the rows, and rows out of range', function()
    fails_with(function() moe.grouped_matmul(pmp.randn(3, 2), pmp.randn(2, 4, 2), { 1, 1 }) end, 'counts sum to 2', '3 rows')
    fails_with(function() moe.grouped_matmul(pmp.randn(3, 2), pmp.randn(2, 4, 2), { 1, 1, 1 }) end, 'one per expert')
    fails_with(function()
      moe.unpermute(pmp.randn(2, 3), pmp.randn(2), pmp.tensor({ 0, 5 }, { dtype = 'i64' }), 3)
    end, 'token row 5 is out of range for 3 tokens')
  end)
end)

describe('MoELayer', function()
  before_each(function() pmp.manual_seed(5) end)

  for _, case in ipairs({
    { name = 'renormalised top-k (Mixtral, Qwen3-MoE), grouped GEMM', config = { moe_grouped_gemm = true }, renormalize = true },
    { name = 'renormalised top-k, one expert after another', config = {}, renormalize = true },
    { name = "softmax before top-k without renormalising, gated shared expert (Qwen2-MoE)",
      config = { moe_router_pre_softmax = true, moe_grouped_gemm = true, moe_shared_expert_intermediate_size = 5,
        moe_shared_expert_gate = true }, renormalize = false },
    { name = 'sigmoid scores with an expert bias, 2 of 4 groups, scaled (DeepSeek-V3)', config = {
      num_moe_experts = 8, moe_router_topk = 4, moe_router_score_function = 'sigmoid', moe_router_enable_expert_bias = true,
      moe_router_num_groups = 4, moe_router_group_topk = 2, moe_router_topk_scaling_factor = 2.5, moe_grouped_gemm = true },
      score = 'sigmoid', bias = { 0.3, -0.2, 0.1, 0, -0.4, 0.25, -0.1, 0.15 }, groups = 4, group_topk = 2, scaling = 2.5 },
    { name = 'capacity factor 0.5 dropping the lowest probabilities', config = { moe_expert_capacity_factor = 0.5,
      moe_grouped_gemm = true }, renormalize = true, capacity = 0.5, policy = 'probs' },
    { name = 'capacity factor 0.75 dropping the last tokens', config = { moe_expert_capacity_factor = 0.75,
      moe_token_drop_policy = 'position' }, renormalize = true, capacity = 0.75, policy = 'position' },
    { name = 'softmax with groups chosen by their logits', config = { num_moe_experts = 6, moe_router_topk = 2,
      moe_router_num_groups = 3, moe_router_group_topk = 1 }, renormalize = true, groups = 3, group_topk = 1 },
  }) do
    it(case.name .. ' matches a per-token reference', function()
      local layer = moe.MoELayer(layer_config(case.config), 1)
      if case.bias then layer.router.expert_bias:copy_(pmp.tensor(case.bias)) end
      local x = random_input({ 2, 5, 6 })
      local want = reference_moe(layer, x:reshape(-1, 6):totable(), case)
      close(layer(x):reshape(-1, 6), want, 1e-12, 'MoE output')
    end)
  end

  it('has finite-difference gradients for its input and every weight', function()
    local layer = moe.MoELayer(layer_config({ moe_grouped_gemm = true, moe_shared_expert_intermediate_size = 2,
      moe_shared_expert_gate = true }), 1)
    layer:eval()
    local named = layer:named_parameters()
    local inputs = { random_input({ 4, 6 }) }
    for _, pair in ipairs(named) do inputs[#inputs + 1] = pair[2]:detach() end
    gradcheck(function(x, ...)
      local weights = { ... }
      local state = {}
      for k, pair in ipairs(named) do state[pair[1]] = weights[k] end
      local copy = moe.MoELayer(layer.config, 1)
      copy:eval()
      for k, pair in ipairs(copy:named_parameters()) do
        local owner, key = copy, nil
        for part in pair[1]:gmatch('[^.]+') do
          if key then owner = owner[key] end
          key = part
        end
        owner[key] = weights[k]
      end
      return copy(x)
    end, inputs)
  end)

  it('gives the router the gradients of the load-balancing loss and z-loss, as their formulas', function()
    local aux_coeff, z_coeff = 0.01, 0.001
    local config = layer_config({ moe_aux_loss_coeff = aux_coeff, moe_z_loss_coeff = z_coeff })
    local layer = moe.MoELayer(config, 1)
    local x = random_input({ 5, 6 })
    local xs = x:totable()
    local E, k, N = 4, 2, 5
    -- Megatron's formulas over router weights w (tables)
    local function losses(w)
      local P, counts, z = {}, {}, 0
      for e = 1, E do P[e], counts[e] = 0, 0 end
      for _, xt in ipairs(xs) do
        local logits = matvec(w, xt)
        local top, s = -math.huge, 0
        for e = 1, E do top = math.max(top, logits[e]) end
        local p = {}
        for e = 1, E do p[e] = math.exp(logits[e] - top); s = s + p[e] end
        z = z + (math.log(s) + top) ^ 2
        local order = {}
        for e = 1, E do p[e] = p[e] / s; P[e] = P[e] + p[e]; order[e] = e end
        table.sort(order, function(a, b) return p[a] > p[b] end)
        for j = 1, k do counts[order[j]] = counts[order[j]] + 1 end
      end
      local aux = 0
      for e = 1, E do aux = aux + P[e] * counts[e] end
      return aux * E * aux_coeff / (k * N * N), z / N * z_coeff
    end
    moe.take_aux_losses()
    local out = layer(x)
    ;(out * 0):sum():backward()   -- only the auxiliary losses reach the router
    local w = layer.router.weight:totable()
    local aux, z = losses(w)
    local logged = moe.take_aux_losses()
    assert.is_true(math.abs(logged.load_balancing_loss - aux / aux_coeff) < 1e-12)
    assert.is_true(math.abs(logged.z_loss - z / z_coeff) < 1e-12)
    local grad = layer.router.weight.grad:totable()
    for e = 1, E do
      for i = 1, 6 do
        local saved = w[e][i]
        w[e][i] = saved + 1e-6
        local a1, z1 = losses(w)
        w[e][i] = saved - 1e-6
        local a2, z2 = losses(w)
        w[e][i] = saved
        local numeric = ((a1 + z1) - (a2 + z2)) / 2e-6
        assert.is_true(math.abs(grad[e][i] - numeric) < 1e-7, string.format('router[%d][%d]: %g vs %g', e, i, grad[e][i], numeric))
      end
    end
  end)

  it('computes seq_aux_loss per sequence as Megatron does', function()
    local coeff = 0.1
    local layer = moe.MoELayer(layer_config({ moe_router_load_balancing_type = 'seq_aux_loss', moe_aux_loss_coeff = coeff }), 1)
    local x = random_input({ 3, 4, 6 })
    local router = rows_of(layer.router.weight)
    local E, k, B, T = 4, 2, 3, 4
    local total = 0
    for _, sequence in ipairs(x:totable()) do
      local P, counts = {}, {}
      for e = 1, E do P[e], counts[e] = 0, 0 end
      for _, xt in ipairs(sequence) do
        local logits = matvec(router, xt)
        local z, top = 0, -math.huge
        for e = 1, E do top = math.max(top, logits[e]) end
        local p = {}
        for e = 1, E do p[e] = math.exp(logits[e] - top); z = z + p[e] end
        for e = 1, E do P[e] = P[e] + p[e] / z end
        for _, e in ipairs((route(logits, k, { renormalize = true }))) do counts[e] = counts[e] + 1 end
      end
      for e = 1, E do total = total + P[e] * counts[e] * E / (k * T * T) end
    end
    moe.take_aux_losses()
    layer(x)
    local logged = moe.take_aux_losses()
    assert.is_true(math.abs(logged.seq_load_balancing_loss - total / B) < 1e-12)
    assert.are.equal(1, #logged.expert_load_imbalance)
  end)

  it('moves the expert bias towards the mean load after a step (aux-loss-free balancing)', function()
    local layer = moe.MoELayer(layer_config({ num_moe_experts = 4, moe_router_score_function = 'sigmoid',
      moe_router_enable_expert_bias = true, moe_router_bias_update_rate = 0.01 }), 1)
    local model = { decoder = { layers = { items = { { mlp = layer } } } } }
    local x = random_input({ 10, 6 })
    local counts = { 0, 0, 0, 0 }
    for _, xt in ipairs(x:totable()) do
      for _, e in ipairs((route(matvec(rows_of(layer.router.weight), xt), 2, { score = 'sigmoid' }))) do
        counts[e] = counts[e] + 1
      end
    end
    layer(x)
    moe.update_expert_bias(model)
    local bias = layer.router.expert_bias:totable()
    for e = 1, 4 do
      local want = counts[e] < 5 and 0.01 or (counts[e] > 5 and -0.01 or 0)
      assert.is_true(math.abs(bias[e] - want) < 1e-7, string.format('expert %d (%d tokens): bias %g', e, counts[e], bias[e]))
    end
  end)

  it('makes the layers moe_layer_freq marks MoE layers', function()
    local model = pmp.nn.GPTModel({ num_layers = 4, hidden_size = 8, num_attention_heads = 2, vocab_size = 10,
      num_moe_experts = 2, moe_router_topk = 1, moe_layer_freq = { 0, 1, 1, 0 } })
    local kinds = {}
    for k, layer in ipairs(model.decoder.layers.items) do kinds[k] = layer.mlp.router and 'moe' or 'dense' end
    assert.are.same({ 'dense', 'moe', 'moe', 'dense' }, kinds)
    model = pmp.nn.GPTModel({ num_layers = 4, hidden_size = 8, num_attention_heads = 2, vocab_size = 10,
      num_moe_experts = 2, moe_router_topk = 1, moe_layer_freq = 2 })
    assert.is_not_nil(model.decoder.layers['0'].mlp.router)
    assert.is_nil(model.decoder.layers['1'].mlp.router)
  end)

  it('rejects a router it cannot honour, naming the setting', function()
    fails_with(function() layer_config({ moe_router_topk = 5 }) end, 'moe_router_topk 5', 'num_moe_experts 4')
    fails_with(function() layer_config({ expert_model_parallel_size = 3 }) end,
      'num_moe_experts 4 is not divisible by expert_model_parallel_size 3')
    fails_with(function() layer_config({ moe_shared_expert_overlap = true }) end,
      'moe_shared_expert_overlap needs shared experts (moe_shared_expert_intermediate_size)')
    fails_with(function() layer_config({ moe_router_load_balancing_type = 'sinkhorn' }) end,
      "moe_router_load_balancing_type 'sinkhorn'")
    fails_with(function() layer_config({ moe_layer_freq = { 1, 0 } }) end, 'moe_layer_freq lists 2 layers for num_layers 1')
    fails_with(function() layer_config({ moe_router_num_groups = 3, moe_router_group_topk = 1 }) end,
      'num_moe_experts 4 is not divisible by moe_router_num_groups 3')
    fails_with(function() layer_config({ moe_router_num_groups = 2 }) end, 'moe_router_num_groups and moe_router_group_topk go together')
    fails_with(function() layer_config({ moe_router_enable_expert_bias = true }) end,
      "moe_router_enable_expert_bias needs moe_router_score_function 'sigmoid'")
    fails_with(function() layer_config({ moe_expert_capacity_factor = -1 }) end, 'moe_expert_capacity_factor must be a positive number')
    fails_with(function() layer_config({ moe_token_drop_policy = 'random' }) end, "moe_token_drop_policy 'random'")
    fails_with(function() layer_config({ moe_router_score_function = 'sqrtsoftplus' }) end,
      "moe_router_score_function 'sqrtsoftplus'")
  end)
end)

describe('tools/bench_moe.lua', function()
  it('times a MoE layer against the dense MLP with as many active parameters (the router apart)', function()
    local shell = require 'spec.support.shell'
    local out, err, status = shell.run_pmp({ shell.root .. '/tools/bench_moe.lua', '--tokens', '32', '--hidden-size', '16',
      '--num-experts', '4', '--moe-router-topk', '2', '--moe-ffn-hidden-size', '8', '--reps', '1', '--no-torch' })
    assert.are.equal(0, status, err)
    local active, dense = out:match('active parameters (%d+)%) vs a dense SwiGLU MLP of width 16 %((%d+) parameters%)')
    -- 2 experts' SwiGLU (3 x 16 x 8 each) against one of width 16 (3 x 16 x 16); the router's 16 x 4
    assert.are.equal(3 * 16 * 16, tonumber(dense), out)
    assert.are.equal(3 * 16 * 16 + 16 * 4, tonumber(active), out)
    assert.matches('pmp   MoE +%d+ tokens/s .* MoE / dense time [%d.]+, cpu [%d.]+', out)
  end)
end)
