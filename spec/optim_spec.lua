require 'busted.runner'()
-- pmp.optim against closed-form updates written in plain Lua: AdamW (PyTorch's decoupled weight
-- decay with bias correction), SGD (torch.optim.SGD, dampening 0), Megatron's learning-rate schedules,
-- and global gradient-norm clipping. Expected values never come from the code under test.
local fails_with = require('spec.support.expect').fails_with
local optim = pmp.optim

---------------------------------------------------------------------------------------------------
-- Helpers

local function f64(data) return pmp.tensor(data, { dtype = 'f64' }) end
local function param(data, dtype) return pmp.tensor(data, { dtype = dtype or 'f64' }):requires_grad_() end
local function copy(list) return { unpack(list) } end

local function assert_values(expected, t, tol, what)
  local got = t:double():reshape(-1):totable()
  assert.are.equal(#expected, #got, (what or 'tensor') .. ': wrong number of elements')
  for i = 1, #expected do
    local scale = 1 + math.abs(expected[i])
    if math.abs(got[i] - expected[i]) > tol * scale then
      error(string.format('%s element %d: got %.17g, expected %.17g', what or 'tensor', i, got[i], expected[i]), 2)
    end
  end
end

-- PyTorch AdamW on plain Lua arrays:
--   p <- p (1 - lr wd); m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2
--   p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
local function reference_adamw(p, options)
  local s = { p = copy(p), m = {}, v = {}, t = 0 }
  for i = 1, #p do s.m[i], s.v[i] = 0, 0 end
  function s.step(g, lr, wd)
    local b1, b2, eps = options.betas[1], options.betas[2], options.eps
    s.t = s.t + 1
    local bc1, bc2 = 1 - b1 ^ s.t, 1 - b2 ^ s.t
    for i = 1, #s.p do
      s.p[i] = s.p[i] * (1 - lr * wd)
      s.m[i] = b1 * s.m[i] + (1 - b1) * g[i]
      s.v[i] = b2 * s.v[i] + (1 - b2) * g[i] * g[i]
      s.p[i] = s.p[i] - lr / bc1 * s.m[i] / (math.sqrt(s.v[i]) / math.sqrt(bc2) + eps)
    end
  end
  return s
end

-- torch.optim.SGD (dampening 0) on plain Lua arrays.
local function reference_sgd(p, options)
  local s = { p = copy(p) }
  function s.step(g)
    local d = {}
    for i = 1, #s.p do d[i] = g[i] + options.weight_decay * s.p[i] end
    if options.momentum ~= 0 then
      if not s.buf then
        s.buf = copy(d)
      else
        for i = 1, #s.p do s.buf[i] = options.momentum * s.buf[i] + d[i] end
      end
      for i = 1, #s.p do d[i] = options.nesterov and d[i] + options.momentum * s.buf[i] or s.buf[i] end
    end
    for i = 1, #s.p do s.p[i] = s.p[i] - options.lr * d[i] end
  end
  return s
end

---------------------------------------------------------------------------------------------------
-- AdamW

describe('optim.AdamW', function()
  local grads = {
    { 0.5, -1.25, 3.0, 0.0, -0.02 },
    { -0.3, 2.0, 1.5, 0.7, 0.01 },
    { 1.1, -0.4, -2.5, -0.7, 0.3 },
  }
  local start = { 1.0, -2.0, 0.5, 3.0, -0.25 }

  it('matches the closed-form PyTorch update over 3 steps (weight decay, bias correction, lr changes)', function()
    local options = { betas = { 0.8, 0.95 }, eps = 1e-6, weight_decay = 0.1 }
    local p = param(start)
    local opt = optim.AdamW({ p }, { lr = 0.05, betas = options.betas, eps = options.eps, weight_decay = 0.1 })
    local ref = reference_adamw(start, options)
    local lrs = { 0.05, 0.02, 0.1 }
    for k = 1, 3 do
      opt.lr = lrs[k]
      p.grad = f64(grads[k])
      opt:step()
      ref.step(grads[k], lrs[k], 0.1)
      assert_values(ref.p, p, 1e-13, 'step ' .. k)
    end
    assert.are.equal('f64', p.dtype)
    local state = opt:state_dict().state[1]
    assert.are.equal(3, state.step)
    assert_values(ref.m, state.exp_avg, 1e-14, 'exp_avg')
    assert_values(ref.v, state.exp_avg_sq, 1e-14, 'exp_avg_sq')
  end)

  it('uses PyTorch defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01', function()
    local p = param(start)
    local opt = optim.AdamW({ p })
    local ref = reference_adamw(start, { betas = { 0.9, 0.999 }, eps = 1e-8 })
    for k = 1, 2 do
      p.grad = f64(grads[k])
      opt:step()
      ref.step(grads[k], 1e-3, 0.01)
    end
    assert_values(ref.p, p, 1e-13, 'defaults')
  end)

  it('matches in f32 to f32 precision', function()
    local p = param(start, 'f32')
    local opt = optim.AdamW({ p }, { lr = 0.01, weight_decay = 0.05 })
    local ref = reference_adamw(start, { betas = { 0.9, 0.999 }, eps = 1e-8 })
    for k = 1, 3 do
      p.grad = pmp.tensor(grads[k])
      opt:step()
      ref.step(grads[k], 0.01, 0.05)
    end
    assert.are.equal('f32', p.dtype)
    assert_values(ref.p, p, 2e-6, 'f32')
  end)

  it('skips parameters without a gradient; their step count starts when a gradient first appears', function()
    local a, b = param(start), param({ 2.0, -1.0 })
    local opt = optim.AdamW({ a, b }, { lr = 0.1, weight_decay = 0.2 })
    local options = { betas = { 0.9, 0.999 }, eps = 1e-8 }
    local ref_a, ref_b = reference_adamw(start, options), reference_adamw({ 2.0, -1.0 }, options)
    a.grad = f64(grads[1])
    opt:step()
    ref_a.step(grads[1], 0.1, 0.2)
    assert_values(ref_a.p, a, 1e-13, 'a after step 1')
    assert.are.same({ 2.0, -1.0 }, b:totable())                  -- untouched: no decay, no step
    a.grad = f64(grads[2])
    b.grad = f64({ 0.4, -0.6 })
    opt:step()
    ref_a.step(grads[2], 0.1, 0.2)
    ref_b.step({ 0.4, -0.6 }, 0.1, 0.2)                           -- b's first step: bias correction of t = 1
    assert_values(ref_a.p, a, 1e-13, 'a after step 2')
    assert_values(ref_b.p, b, 1e-13, 'b after its first step')
    assert.are.equal(2, opt:state_dict().state[1].step)
    assert.are.equal(1, opt:state_dict().state[2].step)
    opt:zero_grad()
    assert.is_nil(a.grad)
    assert.is_nil(b.grad)
  end)

  it('param groups: weight_decay = 0 and lr_scale per group; plain tensors join the first group', function()
    local options = { betas = { 0.9, 0.999 }, eps = 1e-8 }
    local a, b, c = param(start), param({ 1.5, -0.5 }), param({ 4.0 })
    local opt = optim.AdamW({ a, { params = { b }, weight_decay = 0 }, { params = { c }, lr_scale = 0.5 } },
      { lr = 0.1, weight_decay = 0.3 })
    local ra, rb, rc = reference_adamw(start, options), reference_adamw({ 1.5, -0.5 }, options), reference_adamw({ 4.0 }, options)
    for k = 1, 3 do
      a.grad, b.grad, c.grad = f64(grads[k]), f64({ grads[k][1], grads[k][2] }), f64({ grads[k][3] })
      opt:step()
      ra.step(grads[k], 0.1, 0.3)
      rb.step({ grads[k][1], grads[k][2] }, 0.1, 0)
      rc.step({ grads[k][3] }, 0.05, 0.3)
    end
    assert_values(ra.p, a, 1e-13, 'default group')
    assert_values(rb.p, b, 1e-13, 'no-decay group')
    assert_values(rc.p, c, 1e-13, 'lr_scale group')
  end)

  it('bf16 parameters keep f32 master weights; the parameter is the master rounded to bf16', function()
    -- values and gradients exactly representable in bf16
    local init = { 1.5, -0.75, 2.0, 0.125, -3.0, 0.5 }
    local g = {
      { 0.5, -0.25, 1.0, 0.0625, -2.0, 0.75 },
      { -0.125, 0.5, -1.5, 0.25, 1.0, -0.375 },
      { 1.25, 0.0, 0.5, -0.5, 0.25, 2.0 },
    }
    local p = param(init, 'bf16')
    local opt = optim.AdamW({ p }, { lr = 0.03, weight_decay = 0.1 })
    local ref = reference_adamw(init, { betas = { 0.9, 0.999 }, eps = 1e-8 })
    for k = 1, 3 do
      p.grad = pmp.tensor(g[k], { dtype = 'bf16' })
      opt:step()
      ref.step(g[k], 0.03, 0.1)
      local state = opt:state_dict().state[1]
      assert.are.equal('f32', state.master.dtype)
      assert.are.equal('f32', state.exp_avg.dtype)
      assert_values(ref.p, state.master, 1e-6, 'master after step ' .. k)
      assert.are.equal('bf16', p.dtype)
      assert.are.equal(0, (p:double() - state.master:bf16():double()):abs():max():item(),
        'param is not the master rounded to bf16 after step ' .. k)
    end
  end)

  it('bf16 master weights accumulate updates smaller than a bf16 ulp', function()
    local p = param({ 1.0, 1.0 }, 'bf16')
    local opt = optim.AdamW({ p }, { lr = 1e-4, weight_decay = 0 })
    for _ = 1, 10 do
      p.grad = pmp.tensor({ 1.0, -1.0 }, { dtype = 'bf16' })
      opt:step()
    end
    -- each step moves by lr (|m_hat / sqrt(v_hat)| = 1 for a constant gradient): 1e-3 in total
    local master = opt:state_dict().state[1].master
    assert_values({ 1 - 1e-3, 1 + 1e-3 }, master, 1e-6, 'master')
    -- bf16 spacing is 2^-7 above 1 and 2^-8 below: the parameter stays at 1 both ways
    assert.are.same({ 1.0, 1.0 }, p:double():totable())
  end)

  it('state_dict / load_state_dict round trip gives identical subsequent steps', function()
    local a1, h1 = param(start), param({ 0.5, -1.5, 2.25 }, 'bf16')
    local opt1 = optim.AdamW({ a1, h1 }, { lr = 0.02, betas = { 0.85, 0.99 }, eps = 1e-7, weight_decay = 0.05 })
    local function set_grads(a, h, k)
      a.grad = f64(grads[k])
      h.grad = pmp.tensor({ grads[k][1], grads[k][2], grads[k][3] }, { dtype = 'bf16' })
    end
    for k = 1, 2 do
      set_grads(a1, h1, k)
      opt1:step()
    end
    opt1.lr = 0.015
    local sd = opt1:state_dict()
    -- a fresh optimizer with other hyperparameters over copies of the current parameters
    local a2, h2 = param(a1:totable()), pmp.tensor(h1:totable(), { dtype = 'bf16' }):requires_grad_()
    local opt2 = optim.AdamW({ a2, h2 }, { lr = 0.5, betas = { 0.5, 0.5 }, eps = 1, weight_decay = 0.9 })
    opt2:load_state_dict(sd)
    assert.are.equal(0.015, opt2.lr)
    assert.are.same({ 0.85, 0.99 }, opt2.betas)
    assert.are.equal(1e-7, opt2.eps)
    assert.are.equal(0.05, opt2.weight_decay)
    local s1, s2 = opt1:state_dict().state, opt2:state_dict().state
    assert.is_false(s1[1].exp_avg.ptr == s2[1].exp_avg.ptr, 'loaded state must be a copy')
    for k = 3, 4 do
      set_grads(a1, h1, k == 3 and 3 or 1)
      set_grads(a2, h2, k == 3 and 3 or 1)
      opt1:step()
      opt2:step()
      assert.are.same(a1:totable(), a2:totable())
      assert.are.same(h1:double():totable(), h2:double():totable())
      assert.are.same(s1[2].master:totable(), s2[2].master:totable())
    end
    assert.are.equal(4, opt2:state_dict().state[1].step)
    local ok, message = pcall(opt2.load_state_dict, opt2, { state = { sd.state[1] } })
    assert.is_false(ok)
    assert.matches('1 parameter states given, the optimizer has 2', message, 1, true)
  end)
end)

---------------------------------------------------------------------------------------------------
-- SGD

describe('optim.SGD', function()
  local grads = {
    { 0.5, -1.25, 3.0, 0.0 },
    { -0.3, 2.0, 1.5, 0.7 },
    { 1.1, -0.4, -2.5, -0.7 },
  }
  local start = { 1.0, -2.0, 0.5, 3.0 }

  for _, options in ipairs({
    { lr = 0.1, momentum = 0, weight_decay = 0, nesterov = false },
    { lr = 0.1, momentum = 0, weight_decay = 0.05, nesterov = false },
    { lr = 0.05, momentum = 0.9, weight_decay = 0, nesterov = false },
    { lr = 0.05, momentum = 0.9, weight_decay = 0.01, nesterov = false },
    { lr = 0.05, momentum = 0.8, weight_decay = 0.01, nesterov = true },
  }) do
    local name = string.format('lr=%g momentum=%g weight_decay=%g nesterov=%s', options.lr, options.momentum,
      options.weight_decay, tostring(options.nesterov))
    it('matches torch.optim.SGD over 3 steps: ' .. name, function()
      local p = param(start)
      local opt = optim.SGD({ p }, options)
      local ref = reference_sgd(start, options)
      for k = 1, 3 do
        p.grad = f64(grads[k])
        opt:step()
        ref.step(grads[k])
        assert_values(ref.p, p, 1e-14, 'step ' .. k)
      end
      assert.is_true(p.is_leaf and p.requires_grad)
    end)
  end

  it('defaults to lr 0.01 without momentum and skips parameters without a gradient', function()
    local a, b = param({ 1.0, 2.0 }), param({ 3.0 })
    local opt = optim.SGD({ a, b })
    a.grad = f64({ 1.0, -2.0 })
    opt:step()
    assert_values({ 1.0 - 0.01, 2.0 + 0.02 }, a, 1e-15, 'a')
    assert.are.same({ 3.0 }, b:totable())
    opt:zero_grad()
    assert.is_nil(a.grad)
  end)
end)

---------------------------------------------------------------------------------------------------
-- Schedules

describe('optim.schedule', function()
  local max_lr, min_lr, warmup, decay = 3e-4, 3e-5, 100, 1000

  -- Megatron's OptimizerParamScheduler.get_lr, restated.
  local function megatron(it, style, wsd)
    if it <= warmup then return max_lr * it / warmup end
    if style == 'constant' then return max_lr end
    if it > decay then return min_lr end
    local ratio = (it - warmup) / (decay - warmup)
    local coeff
    if style == 'linear' then coeff = 1 - ratio
    elseif style == 'cosine' then coeff = 0.5 * (math.cos(math.pi * ratio) + 1)
    else
      local anneal_start = decay - wsd.iters
      if it <= anneal_start then
        coeff = 1
      else
        local r = (it - anneal_start) / wsd.iters
        if wsd.style == 'linear' then coeff = 1 - r
        elseif wsd.style == 'cosine' then coeff = 0.5 * (math.cos(math.pi * r) + 1)
        elseif wsd.style == 'exponential' then coeff = 2 * 0.5 ^ r - 1
        elseif wsd.style == 'minus_sqrt' then coeff = 1 - math.sqrt(r) end
      end
    end
    return min_lr + (max_lr - min_lr) * coeff
  end

  local iterations = { 0, 1, 37, 99, 100, 101, 250, 550, 799, 800, 801, 900, 999, 1000, 1001, 5000 }

  for _, style in ipairs({ 'cosine', 'linear', 'constant' }) do
    it('linear warmup then ' .. style .. ' decay', function()
      local lr = optim.schedule.new({ max_lr = max_lr, min_lr = min_lr, warmup_iters = warmup, decay_iters = decay, style = style })
      for _, it in ipairs(iterations) do
        assert.is_near(megatron(it, style), lr(it), 1e-18)
      end
    end)
  end

  it('spot values: warmup fraction, cosine midpoint, end points', function()
    local cosine = optim.schedule.new({ max_lr = 1.0, min_lr = 0.1, warmup_iters = 10, decay_iters = 110 })
    assert.are.equal(0, cosine(0))
    assert.is_near(0.5, cosine(5), 1e-15)
    assert.is_near(1.0, cosine(10), 1e-15)
    assert.is_near(0.55, cosine(60), 1e-15)          -- halfway: min + (max - min) / 2
    assert.is_near(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), cosine(35), 1e-15)
    assert.is_near(0.1, cosine(110), 1e-15)
    assert.are.equal(0.1, cosine(111))
    local linear = optim.schedule.new({ max_lr = 1.0, warmup_iters = 0, decay_iters = 100, style = 'linear' })
    assert.is_near(1.0, linear(0), 1e-15)
    assert.is_near(0.75, linear(25), 1e-15)
    assert.is_near(0.0, linear(100), 1e-15)
  end)

  for _, wsd_style in ipairs({ 'linear', 'cosine', 'exponential', 'minus_sqrt' }) do
    it('WSD: warmup, stable at max_lr, then a ' .. wsd_style .. ' anneal over wsd_decay_iters', function()
      local wsd = { iters = 200, style = wsd_style }
      local lr = optim.schedule.new({ max_lr = max_lr, min_lr = min_lr, warmup_iters = warmup, decay_iters = decay,
        style = 'wsd', wsd_decay_iters = 200, wsd_decay_style = wsd_style })
      for _, it in ipairs(iterations) do
        assert.is_near(megatron(it, 'wsd', wsd), lr(it), 1e-18)
      end
      assert.are.equal(max_lr, lr(800))
      assert.is_near(min_lr, lr(1000), 1e-18)
    end)
  end

  it('WSD defaults to a linear anneal', function()
    local lr = optim.schedule.new({ max_lr = 1.0, min_lr = 0, warmup_iters = 0, decay_iters = 100, style = 'wsd',
      wsd_decay_iters = 20 })
    assert.are.equal(1.0, lr(80))
    assert.is_near(0.5, lr(90), 1e-15)
  end)

  it('reports an unknown style and an unknown WSD anneal style', function()
    local ok, message = pcall(optim.schedule.new, { max_lr = 1, decay_iters = 10, style = 'step' })
    assert.is_false(ok)
    assert.matches("unknown style 'step'", message, 1, true)
    local lr = optim.schedule.new({ max_lr = 1, decay_iters = 10, style = 'wsd', wsd_decay_iters = 5,
      wsd_decay_style = 'square' })
    assert.are.equal(1, lr(3))
    local ok2, message2 = pcall(lr, 8)
    assert.is_false(ok2)
    assert.matches("unknown wsd_decay_style 'square'", message2, 1, true)
    fails_with(function() optim.schedule.new({ decay_iters = 10 }) end, 'schedule: max_lr is required')
  end)
end)

---------------------------------------------------------------------------------------------------
-- Gradient norm and clipping

describe('optim.grad_norm and clip_grad_norm', function()
  local values = {
    { { 3.0, -4.0 }, { 1.5, 2.5 } },
    { 0.25, -7.0, 0.5 },
    { 12.0 },
  }
  local function make()
    local params = {}
    for k, v in ipairs(values) do
      params[k] = param(v)
      params[k].grad = f64(v)
    end
    params[#params + 1] = param({ 100.0 })                        -- no gradient: counts as zero
    return params
  end
  local function plain_norm()
    local total = 0
    for _, v in ipairs(values) do
      for _, x in ipairs(type(v[1]) == 'table' and { v[1][1], v[1][2], v[2][1], v[2][2] } or v) do total = total + x * x end
    end
    return math.sqrt(total)
  end

  it('grad_norm is sqrt(sum of squares) over all gradients', function()
    local params = make()
    assert.is_near(plain_norm(), optim.grad_norm(params), 1e-12)
    assert.are.equal(0, optim.grad_norm({ param({ 1.0 }) }))
    local mixed = { param({ 1.0, 2.0 }, 'f32'), param({ 2.0 }, 'bf16') }
    mixed[1].grad = pmp.tensor({ 1.0, 2.0 })
    mixed[2].grad = pmp.tensor({ 2.0 }, { dtype = 'bf16' })
    assert.is_near(3.0, optim.grad_norm(mixed), 1e-12)
  end)

  it('clip_grad_norm scales every gradient so the norm becomes max_norm and returns the old norm', function()
    local params = make()
    local norm = plain_norm()
    local returned = optim.clip_grad_norm(params, 2.0)
    assert.is_near(norm, returned, 1e-12)
    local after = optim.grad_norm(params)
    assert.is_true(math.abs(after - 2.0) <= 1e-6 * 2.0, 'norm after clipping ' .. after)
    local factor = 2.0 / norm
    for k, v in ipairs(values) do
      local flat = type(v[1]) == 'table' and { v[1][1], v[1][2], v[2][1], v[2][2] } or v
      local expected = {}
      for i, x in ipairs(flat) do expected[i] = x * factor end
      assert_values(expected, params[k].grad, 1e-6, 'gradient ' .. k)
    end
    assert.is_nil(params[#params].grad)
  end)

  it('leaves gradients alone when the norm is below max_norm', function()
    local params = make()
    local returned = optim.clip_grad_norm(params, plain_norm() * 2)
    assert.is_near(plain_norm(), returned, 1e-12)
    for k, v in ipairs(values) do assert.are.same(v, params[k].grad:totable()) end
  end)

  it('clips non-contiguous gradients too', function()
    local p = param({ { 0, 0, 0 }, { 0, 0, 0 } })
    p.grad = f64({ { 3.0, 0.0 }, { 0.0, 4.0 }, { 0.0, 0.0 } }):t()
    assert.is_near(5.0, optim.clip_grad_norm({ p }, 1.0), 1e-12)
    assert_values({ 0.6, 0, 0, 0, 0.8, 0 }, p.grad, 1e-6, 'clipped')
    assert.is_near(1.0, optim.grad_norm({ p }), 1e-6)
  end)
end)
