require 'busted.runner'()
-- Gradients of every differentiable op checked against central finite differences in float64,
-- including broadcasting, views and non-contiguous inputs; then f32/bf16 against f64.
local fails_with = require('spec.support.expect').fails_with

local check = require 'spec.support.gradcheck'
local gradcheck, random_input, f64 = check.gradcheck, check.random_input, check.f64

describe('finite-difference gradients (f64)', function()
  before_each(function() pmp.manual_seed(7) end)

  describe('unary ops', function()
    local cases = {
      neg = {}, exp = {}, sin = {}, cos = {}, tanh = {}, sigmoid = {}, silu = {}, gelu = {},
      log = { positive = true }, sqrt = { positive = true }, rsqrt = { positive = true },
      abs = { away = true }, relu = { away = true },
    }
    for name, options in pairs(cases) do
      it(name, function()
        gradcheck(function(x) return x[name](x) end, { random_input({ 3, 4 }, options) })
      end)
    end
    it('gelu with the tanh approximation', function()
      gradcheck(function(x) return x:gelu('tanh') end, { random_input({ 2, 5 }) })
    end)
    it('clamp (away from the bounds)', function()
      local x = f64({ -2.1, -0.7, -0.2, 0.3, 0.8, 1.9 }, { 2, 3 })
      gradcheck(function(a) return a:clamp(-1, 1) end, { x })
      gradcheck(function(a) return a:clamp(nil, 0.5) end, { x })
    end)
    it('square and pow with a scalar exponent', function()
      gradcheck(function(x) return x:square() end, { random_input({ 4 }) })
      gradcheck(function(x) return x ^ 3 end, { random_input({ 4 }) })
      gradcheck(function(x) return x:pow(0.5) end, { random_input({ 4 }, { positive = true }) })
    end)
  end)

  describe('binary ops with broadcasting', function()
    local ops = {
      add = function(a, b) return a + b end,
      sub = function(a, b) return a - b end,
      mul = function(a, b) return a * b end,
      div = function(a, b) return a / b end,
      maximum = function(a, b) return a:maximum(b) end,
      minimum = function(a, b) return a:minimum(b) end,
    }
    local layouts = {
      { { 3, 4 }, { 3, 4 } }, { { 3, 4 }, { 4 } }, { { 3, 1 }, { 1, 4 } }, { { 2, 3, 4 }, { 3, 1 } }, { {}, { 2, 3 } },
    }
    for name, op in pairs(ops) do
      it(name, function()
        for _, shapes in ipairs(layouts) do
          local b = name == 'div' and random_input(shapes[2], { positive = true }) or random_input(shapes[2])
          gradcheck(op, { random_input(shapes[1]), b })
        end
      end)
    end
    it('pow with tensor exponent', function()
      gradcheck(function(a, b) return a:pow(b) end,
        { random_input({ 2, 3 }, { positive = true }), random_input({ 3 }) })
    end)
    it('scalars on either side', function()
      local x = random_input({ 2, 3 }, { positive = true })
      gradcheck(function(a) return 2 - a end, { x })
      gradcheck(function(a) return 3 / a end, { x })
      gradcheck(function(a) return a * 2.5 + 1 end, { x })
      gradcheck(function(a) return -a end, { x })
    end)
    it('an input used twice', function()
      gradcheck(function(a) return a * a + a:exp() * a end, { random_input({ 5 }) })
    end)
  end)

  describe('selection ops', function()
    it('where', function()
      local cond = pmp.tensor({ { true, false, true }, { false, false, true } })
      gradcheck(function(a, b) return pmp.where(cond, a, b) end, { random_input({ 2, 3 }), random_input({ 3 }) })
    end)
    it('masked_fill', function()
      local mask = pmp.tensor({ { true, false, false } })
      gradcheck(function(a) return a:masked_fill(mask, -5) end, { random_input({ 2, 3 }) })
    end)
    it('tril and triu', function()
      gradcheck(function(a) return a:tril() end, { random_input({ 2, 3, 3 }) })
      gradcheck(function(a) return a:triu(1) end, { random_input({ 3, 4 }) })
    end)
  end)

  describe('reductions', function()
    it('sum over all, one dim, several dims, keepdim', function()
      local x = random_input({ 2, 3, 4 })
      gradcheck(function(a) return a:sum() end, { x })
      gradcheck(function(a) return a:sum(2) end, { x })
      gradcheck(function(a) return a:sum(-1, true) end, { x })
      gradcheck(function(a) return a:sum({ 1, 3 }) end, { x })
    end)
    it('mean', function()
      local x = random_input({ 3, 4 })
      gradcheck(function(a) return a:mean() end, { x })
      gradcheck(function(a) return a:mean(1, true) end, { x })
    end)
    it('max and min over a dim and over everything', function()
      local x = random_input({ 3, 4 })
      gradcheck(function(a) return (a:max(2)) end, { x })
      gradcheck(function(a) return (a:min(1, true)) end, { x })
      gradcheck(function(a) return a:max() end, { x })
    end)
    it('var and norm', function()
      local x = random_input({ 3, 4 })
      gradcheck(function(a) return a:var(2) end, { x })
      gradcheck(function(a) return a:var(nil, { unbiased = false }) end, { x })
      gradcheck(function(a) return a:norm() end, { x })
    end)
  end)

  describe('matmul', function()
    it('2-D, batched with broadcasting, and 1-D operands', function()
      gradcheck(pmp.matmul, { random_input({ 3, 4 }), random_input({ 4, 2 }) })
      gradcheck(pmp.matmul, { random_input({ 2, 3, 4 }), random_input({ 4, 5 }) })
      gradcheck(pmp.matmul, { random_input({ 2, 1, 3, 4 }), random_input({ 3, 4, 2 }) })
      gradcheck(pmp.matmul, { random_input({ 4 }), random_input({ 4, 3 }) })
      gradcheck(pmp.matmul, { random_input({ 3, 4 }), random_input({ 4 }) })
      gradcheck(pmp.matmul, { random_input({ 4 }), random_input({ 4 }) })
    end)
    it('non-contiguous operands', function()
      gradcheck(function(a, b) return a:t():matmul(b:transpose(1, 2)) end,
        { random_input({ 4, 3 }), random_input({ 2, 4 }) })
    end)
  end)

  describe('views and shape ops', function()
    local x = random_input({ 2, 3, 4 })
    local cases = {
      view = function(a) return a:view(6, 4) end,
      reshape_of_transposed = function(a) return a:transpose(1, 3):reshape(-1) end,
      permute = function(a) return a:permute(3, 1, 2) * 1 end,
      unsqueeze_squeeze = function(a) return a:unsqueeze(2):squeeze(2):unsqueeze(-1) end,
      expand = function(a) return a:narrow(2, 1, 1):expand(2, 5, 4) end,
      narrow = function(a) return a:narrow(3, 2, 2) end,
      narrow_negative = function(a) return a:narrow(-1, -2, 2) end,
      select = function(a) return a:select(2, 3) end,
      contiguous = function(a) return a:transpose(1, 2):contiguous() end,
      clone = function(a) return a:clone() end,
      chunk = function(a) local parts = a:chunk(2, 3); return parts[2] * 2 + parts[1] end,
      split = function(a) local parts = a:split({ 1, 2 }, 2); return parts[2]:sum(2) end,
    }
    for name, fn in pairs(cases) do
      it(name, function() gradcheck(fn, { x }) end)
    end
    it('cat and stack', function()
      gradcheck(function(a, b) return pmp.cat({ a, b, a }, 2) end, { random_input({ 2, 3 }), random_input({ 2, 1 }) })
      gradcheck(function(a, b) return pmp.stack({ a, b }, 1) end, { random_input({ 2, 3 }), random_input({ 2, 3 }) })
      local parts = {}
      gradcheck(function(a)
        for k = 1, 6 do parts[k] = a * k end
        return pmp.cat(parts, 1)
      end, { random_input({ 2 }) })
    end)
  end)

  describe('indexing', function()
    it('gather', function()
      local index = pmp.tensor({ { 0, 2 }, { 1, 1 }, { 2, 0 } }, { dtype = 'i64' })
      gradcheck(function(a) return a:gather(2, index) end, { random_input({ 3, 3 }) })
    end)
    it('index_select with repeated indices', function()
      local index = pmp.tensor({ 2, 0, 2 }, { dtype = 'i64' })
      gradcheck(function(a) return a:index_select(1, index) end, { random_input({ 3, 2 }) })
      gradcheck(function(a) return a:index_select(2, index) end, { random_input({ 2, 3 }) })
    end)
    it('scatter_add and index_add', function()
      local index = pmp.tensor({ { 0, 1 }, { 1, 1 } }, { dtype = 'i64' })
      gradcheck(function(a, s) return a:scatter_add(2, index, s) end, { random_input({ 2, 3 }), random_input({ 2, 2 }) })
      local rows = pmp.tensor({ 1, 1, 0 }, { dtype = 'i64' })
      gradcheck(function(a, s) return a:index_add(1, rows, s) end, { random_input({ 2, 3 }), random_input({ 3, 3 }) })
    end)
  end)

  describe('nn functional', function()
    local F = pmp.nn.functional
    it('softmax and log_softmax over the last and a middle dim', function()
      local x = random_input({ 2, 3, 4 })
      gradcheck(function(a) return F.softmax(a, -1) end, { x })
      gradcheck(function(a) return F.softmax(a, 2) end, { x })
      gradcheck(function(a) return F.log_softmax(a, -1) end, { x })
      gradcheck(function(a) return F.log_softmax(a, 1) end, { x })
    end)
    it('cross_entropy with ignore_index and every reduction', function()
      local targets = pmp.tensor({ { 1, -100, 3 }, { 0, 2, 2 } }, { dtype = 'i64' })
      local logits = random_input({ 2, 3, 4 })
      gradcheck(function(a) return F.cross_entropy(a, targets) end, { logits })
      gradcheck(function(a) return F.cross_entropy(a, targets, { reduction = 'sum' }) end, { logits })
      gradcheck(function(a) return F.cross_entropy(a, targets, { reduction = 'none' }) end, { logits })
    end)
    it('embedding', function()
      local ids = pmp.tensor({ { 0, 3 }, { 3, 1 } }, { dtype = 'i64' })
      gradcheck(function(w) return F.embedding(ids, w) end, { random_input({ 4, 3 }) })
    end)
    it('linear with and without bias', function()
      gradcheck(F.linear, { random_input({ 2, 3, 4 }), random_input({ 5, 4 }), random_input({ 5 }) })
      gradcheck(function(x, w) return F.linear(x, w) end, { random_input({ 3, 4 }), random_input({ 2, 4 }) })
    end)
    it('rms_norm and layer_norm', function()
      gradcheck(function(x, w) return F.rms_norm(x, w, 1e-6) end, { random_input({ 2, 5 }), random_input({ 5 }) })
      gradcheck(function(x, w, b) return F.layer_norm(x, w, b, 1e-5) end,
        { random_input({ 3, 4 }), random_input({ 4 }), random_input({ 4 }) })
    end)
    it('dropout (same mask for every evaluation)', function()
      gradcheck(function(x) return F.dropout(x, 0.4, true) end, { random_input({ 4, 5 }) })
    end)
  end)
end)

describe('autograd semantics', function()
  it('gradients accumulate across backward calls until cleared', function()
    local x = pmp.tensor({ 1, 2, 3 }, { dtype = 'f64' }):requires_grad_()
    local y = (x * x):sum()
    y:backward({ retain_graph = true })
    y:backward()
    assert.are.same({ 4, 8, 12 }, x.grad:totable())
    x.grad = nil
    assert.is_nil(x.grad)
    ;(x * 3):sum():backward()
    assert.are.same({ 3, 3, 3 }, x.grad:totable())
  end)

  it('backward with an explicit gradient for a non-scalar output', function()
    local x = pmp.tensor({ 1, 2 }, { dtype = 'f64' }):requires_grad_()
    local y = x * x
    y:backward(pmp.tensor({ 10, 100 }, { dtype = 'f64' }))
    assert.are.same({ 20, 400 }, x.grad:totable())
  end)

  it('detach and no_grad stop gradients', function()
    local x = pmp.tensor({ 1, 2 }, { dtype = 'f64' }):requires_grad_()
    local y = (x:detach() * x):sum()
    y:backward()
    assert.are.same({ 1, 2 }, x.grad:totable())
    local z = pmp.no_grad(function() return x * 2 end)
    assert.is_false(z.requires_grad)
    assert.is_true(pmp.is_grad_enabled())
  end)

  it('no_grad restores the mode when its function fails', function()
    fails_with(function() pmp.no_grad(function() error('boom') end) end, 'boom')
    assert.is_true(pmp.is_grad_enabled())
  end)

  it('a second backward through a freed graph is an error naming the cause', function()
    local x = pmp.tensor({ 1, 2 }):requires_grad_()
    local y = (x:exp() * 2):sum()
    y:backward()
    local ok, message = pcall(function() y:backward() end)
    assert.is_false(ok)
    assert.matches('second time', message)
  end)

  it('a deep chain backpropagates without exhausting the C stack', function()
    local x = pmp.tensor({ 1.0 }, { dtype = 'f64' }):requires_grad_()
    local y = x
    for _ = 1, 20000 do y = y * 1.0001 end
    y:sum():backward()
    assert.is_near(1.0001 ^ 20000, x.grad:item(), 1e-6 * 1.0001 ^ 20000)
  end)

  it('gradients reach a leaf through an integer-free dtype change', function()
    local x = pmp.tensor({ 0.5, 1.5 }, { dtype = 'f64' }):requires_grad_()
    local y = (x:float() * 2):double():sum()
    y:backward()
    assert.are.same({ 2, 2 }, x.grad:totable())
    assert.are.equal('f64', x.grad.dtype)
  end)
end)

describe('low precision against f64', function()
  -- A mixed expression whose forward value and gradients are compared at each dtype's precision.
  local function run(dtype)
    pmp.manual_seed(3)
    local x = pmp.randn(8, 16, { dtype = 'f64' }):to(dtype):requires_grad_()
    local w = pmp.randn(16, 16, { dtype = 'f64' }):to(dtype):requires_grad_()
    local targets = pmp.randint(0, 16, { 8 })
    local h = pmp.F.rms_norm(x, nil, 1e-6):matmul(w):gelu():softmax(-1):log()
    local loss = pmp.F.cross_entropy(h, targets) + h:var()
    loss:backward()
    return loss:double():item(), x.grad:double(), w.grad:double()
  end
  local reference_loss, reference_gx, reference_gw = run('f64')
  local tolerances = { f32 = 1e-4, bf16 = 5e-2, f16 = 1e-2 }
  for dtype, tol in pairs(tolerances) do
    it(dtype, function()
      local loss, gx, gw = run(dtype)
      assert.is_near(reference_loss, loss, tol * math.abs(reference_loss))
      local function relative_error(a, b) return ((a - b):norm() / b:norm()):item() end
      assert.is_true(relative_error(gx, reference_gx) < tol * 2, dtype .. ' x grad')
      assert.is_true(relative_error(gw, reference_gw) < tol * 2, dtype .. ' w grad')
    end)
  end
end)
