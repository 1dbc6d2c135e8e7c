require 'busted.runner'()
-- Error paths: every user mistake is a Lua error (pcall returns false) whose message names the op and
-- the shapes or the bad value, and the process keeps working afterwards.

local i64 = { dtype = 'i64' }

local fails_with = require('spec.support.expect').fails_with

-- The engine must still work after each failure (no poisoned state, no stale error).
local function still_works()
  local t = pmp.tensor({ { 1, 2 }, { 3, 4 } })
  assert.equal(10, t:sum():item())
  assert.are.same({ { 7, 10 }, { 15, 22 } }, pmp.matmul(t, t):totable())
  assert.are.same({ { 2, 4 }, { 6, 8 } }, (t + t):totable())
end

describe('errors', function()
  after_each(still_works)

  describe('shapes', function()
    it('add/sub/mul/div with shapes that do not broadcast', function()
      local a, b = pmp.zeros(2, 3), pmp.zeros(4, 5)
      fails_with(function() return a + b end, 'add', '[2,3]', '[4,5]')
      fails_with(function() return a:sub(b) end, 'sub', '[2,3]', '[4,5]')
      fails_with(function() return a * pmp.zeros(3, 2) end, 'mul', '[2,3]', '[3,2]')
      fails_with(function() return a / pmp.zeros(2) end, 'div', '[2,3]', '[2]')
      fails_with(function() return a:lt(pmp.zeros(4)) end, 'lt', '[2,3]', '[4]')
      fails_with(function() return pmp.where(pmp.zeros(2, 3):gt(0), a, pmp.zeros(5)) end, 'where', '[5]')
    end)

    it('matmul with inner dims that do not align', function()
      fails_with(function() return pmp.matmul(pmp.zeros(2, 3), pmp.zeros(4, 5)) end,
        'matmul', '[2,3]', '[4,5]', 'not aligned')
      fails_with(function() return pmp.matmul(pmp.zeros(2, 2, 3), pmp.zeros(3, 3, 4)) end,
        'matmul', '[2,2,3]', '[3,3,4]')
      fails_with(function() return pmp.matmul(pmp.zeros(2, 3), 5) end, 'matmul')
      fails_with(function() return pmp.matmul(pmp.tensor(1), pmp.zeros(2)) end, 'matmul', '[]', '[2]')
    end)

    it('matmul with 1-D operands reports the shapes the caller passed', function()
      fails_with(function() return pmp.zeros(2, 3):matmul(pmp.zeros(2)) end, 'matmul', '[2,3]', 'and [2]')
      fails_with(function() return pmp.matmul(pmp.zeros(3), pmp.zeros(4)) end, 'matmul', '[3] and [4]')
      fails_with(function() return pmp.matmul(pmp.zeros(3), pmp.zeros(4, 2)) end, 'matmul', '[3] and [4,2]')
    end)

    it('view of an incompatible non-contiguous tensor, and views of the wrong size', function()
      local t = pmp.zeros(2, 3):t()
      fails_with(function() return t:view(6) end, 'view', '[3,2]', '[6]')
      fails_with(function() return pmp.zeros(2, 3):view(4, 2) end, 'view', '[2,3]', '[4,2]')
      fails_with(function() return pmp.zeros(2, 3):reshape(5) end, 'reshape', '[2,3]', '[5]')
      fails_with(function() return pmp.zeros(2, 3):view(-1, -1) end, 'view')
      fails_with(function() return pmp.zeros(2, 3):view(4, -1) end, 'view', '[2,3]')
      assert.are.same({ 6 }, t:reshape(6).shape, 'reshape copies where view cannot')
    end)

    it('expand, cat, stack, split, permute with bad shapes', function()
      fails_with(function() return pmp.zeros(2, 3):expand(4, 3) end, 'expand', '[2,3]', '[4,3]')
      fails_with(function() return pmp.cat({ pmp.zeros(2, 3), pmp.zeros(2, 4) }, 1) end, 'cat', '[2,3]', '[2,4]')
      fails_with(function() return pmp.cat({ pmp.zeros(2, 3), pmp.zeros(3) }) end, 'cat')
      fails_with(function() return pmp.cat({}) end, 'cat')
      fails_with(function() return pmp.stack({ pmp.zeros(2), pmp.zeros(3) }) end, 'stack', '[2]', '[3]')
      fails_with(function() return pmp.arange(5):split({ 2, 2 }) end, 'split', '4', '5')
      fails_with(function() return pmp.zeros(2, 3):permute(1) end, 'permute')
      fails_with(function() return pmp.zeros(2, 3):permute(1, 1) end, 'permute')
      fails_with(function() return pmp.zeros(2, 3):masked_fill(pmp.zeros(3, 3):gt(0), 1) end, 'masked_fill', '[3,3]')
      fails_with(function() return pmp.ones(3):tril() end, 'tril', '[3]')
    end)
  end)

  describe('bad values', function()
    it('unknown dtype and device names', function()
      fails_with(function() return pmp.zeros(2, { dtype = 'float8' }) end, 'zeros', 'float8')
      fails_with(function() return pmp.tensor({ 1 }, { dtype = 'complex' }) end, 'tensor', 'complex')
      fails_with(function() return pmp.ones(2):to('f31') end, 'to', 'f31')
      fails_with(function() return pmp.arange(3, { dtype = 'int3' }) end, 'arange', 'int3')
      fails_with(function() return pmp.zeros(2, { device = 'tpu' }) end, 'zeros', 'tpu')
    end)

    it('out-of-range narrow', function()
      local t = pmp.zeros(2, 3)
      fails_with(function() return t:narrow(2, 3, 2) end, 'narrow', '3', '2', '[2,3]')
      fails_with(function() return t:narrow(2, 4, 1) end, 'narrow', '4')
      fails_with(function() return t:narrow(1, 0, 1) end, 'narrow', '0')
      fails_with(function() return t:narrow(1, -3, 1) end, 'narrow', '-3')
      fails_with(function() return t:narrow(1, 1, -1) end, 'narrow', '-1')
      fails_with(function() return t:narrow(3, 1, 1) end, 'narrow', '3')
    end)

    it('out-of-range dims are reported 1-based', function()
      local t = pmp.zeros(2, 3)
      fails_with(function() return t:sum(3) end, 'sum', 'dimension 3', '1..2')
      fails_with(function() return t:sum(0) end, 'sum', '0')
      fails_with(function() return t:mean(-3) end, 'mean', '-3')
      fails_with(function() return t:max(3) end, 'max', '3')
      fails_with(function() return t:argmax(5) end, 'argmax', '5')
      fails_with(function() return t:size(3) end, 'size', '3')
      fails_with(function() return t:transpose(1, 3) end, 'transpose', '3')
      fails_with(function() return t:softmax(3) end, 'softmax', '3')
      fails_with(function() return t:unsqueeze(4) end, 'unsqueeze', '4')
      fails_with(function() return t:squeeze(3) end, 'squeeze', '3')
      fails_with(function() return pmp.cat({ t, t }, 3) end, 'cat', '3')
      fails_with(function() return pmp.F.log_softmax(t, -3) end, 'log_softmax', '-3')
      assert.are.same({ 2, 3, 1 }, t:unsqueeze(3).shape, 'unsqueeze accepts ndim + 1')
    end)

    it('gather/index_select with an out-of-range index name the op and the index', function()
      local t = pmp.zeros(2, 3)
      fails_with(function() return t:gather(2, pmp.tensor({ { 0, 5 } }, i64)) end, 'gather', 'index 5', 'size 3')
      fails_with(function() return t:gather(2, pmp.tensor({ { -1 } }, i64)) end, 'gather', '-1')
      fails_with(function() return t:gather(2, pmp.tensor({ { 0.5 } })) end, 'gather', 'f32')
      fails_with(function() return t:gather(1, pmp.zeros(2, 2, 2, i64)) end, 'gather', '[2,2,2]', '[2,3]')
      fails_with(function() return t:index_select(1, pmp.tensor({ 2 }, i64)) end, 'index_select', 'index 2', 'size 2')
      fails_with(function() return t:index_select(2, pmp.tensor({ 0, -4 }, i64)) end, 'index_select', '-4')
    end)

    -- Dims in messages are 1-based, as everywhere on the Lua side (a message saying 'dim 0' is wrong).
    local function names_dim(err, dim)
      assert(err:find('dim ' .. dim, 1, true), 'the op ran along dim ' .. dim .. ' (1-based), message: ' .. err)
    end

    it('gather out-of-range index: the message names the 1-based dim', function()
      names_dim(fails_with(function() return pmp.zeros(2, 3):gather(2, pmp.tensor({ { 5 } }, i64)) end, 'gather'), 2)
    end)

    it('index_select out-of-range index: the message names the 1-based dim', function()
      names_dim(fails_with(function() return pmp.zeros(2, 3):index_select(1, pmp.tensor({ 2 }, i64)) end,
        'index_select'), 1)
    end)

    it('gather with an index of the wrong rank: the message names the 1-based dim', function()
      names_dim(fails_with(function() return pmp.zeros(2, 3):gather(1, pmp.zeros(2, 2, 2, i64)) end, 'gather'), 1)
    end)

    it('cat of mismatched shapes: the message names the 1-based dim', function()
      names_dim(fails_with(function() return pmp.cat({ pmp.zeros(2, 3), pmp.zeros(2, 4) }, 1) end,
        'cat', '[2,3]', '[2,4]'), 1)
    end)

    it('permute with a repeated dim: the message names the 1-based dim', function()
      names_dim(fails_with(function() return pmp.zeros(2, 3):permute(1, 1) end, 'permute'), 1)
    end)

    it('max over an empty dim: the message names the 1-based dim', function()
      names_dim(fails_with(function() return pmp.zeros(2, 0):max(2) end, 'max', '[2,0]'), 2)
    end)

    it('embedding with an out-of-range id names embedding and the id', function()
      fails_with(function() return pmp.F.embedding(pmp.tensor({ 7 }, i64), pmp.zeros(3, 2)) end, 'embedding', '7')
    end)

    it('cross_entropy with an out-of-range target', function()
      local logits = pmp.zeros(2, 3)
      fails_with(function() return pmp.F.cross_entropy(logits, pmp.tensor({ 0, 3 }, i64)) end, 'cross_entropy', '3')
      fails_with(function() return pmp.F.cross_entropy(logits, pmp.tensor({ -5, 0 }, i64)) end, 'cross_entropy', '-5')
      fails_with(function() return pmp.F.cross_entropy(logits, pmp.tensor({ 0, 1, 2 }, i64)) end,
        'cross_entropy', '[3]', '[2,3]')
      fails_with(function() return pmp.F.cross_entropy(logits, pmp.tensor({ 0, 1 }, i64), { reduction = 'avg' }) end,
        'cross_entropy', 'avg')
    end)

    it('item() on a multi-element tensor', function()
      fails_with(function() return pmp.zeros(2, 3):item() end, 'item', '[2,3]')
      fails_with(function() return pmp.zeros(0):item() end, 'item')
    end)

    it('pmp.tensor with a ragged or non-numeric nested table', function()
      fails_with(function() return pmp.tensor({ { 1, 2 }, { 3 } }) end, 'tensor', 'ragged')
      fails_with(function() return pmp.tensor({ { 1, 2 }, 3 }) end, 'tensor', 'ragged')
      fails_with(function() return pmp.tensor({ 1, { 2, 3 } }) end, 'tensor', 'ragged')
      fails_with(function() return pmp.tensor({ { { 1 } }, { { 1, 2 } } }) end, 'tensor', 'ragged')
      fails_with(function() return pmp.tensor({ 1, 'x' }) end, 'tensor', 'x')
    end)

    it('more than 8 dims', function()
      fails_with(function() return pmp.zeros(1, 1, 1, 1, 1, 1, 1, 1, 1) end, 'zeros', '8', '9')
      fails_with(function() return pmp.ones({ 1, 1, 1, 1, 1, 1, 1, 1, 1 }) end, 'ones', '8', '9')
      fails_with(function() return pmp.zeros(1):view(1, 1, 1, 1, 1, 1, 1, 1, 1) end, 'view', '8')
      fails_with(function() return pmp.zeros(1):reshape({ 1, 1, 1, 1, 1, 1, 1, 1, 1, 1 }) end, 'reshape', '8')
      fails_with(function() return pmp.tensor({ { { { { { { { { 1 } } } } } } } } }) end, 'tensor', '8')
      fails_with(function() return pmp.zeros(1, 1, 1, 1, 1, 1, 1, 1):unsqueeze(1) end, 'unsqueeze', '8')
      assert.equal(8, pmp.zeros(1, 1, 1, 1, 1, 1, 1, 2):dim(), '8 dims are fine')
    end)

    it('a negative size names the creation function that was called', function()
      fails_with(function() return pmp.zeros(2, -1) end, 'zeros', '[2,-1]')
      fails_with(function() return pmp.ones({ -3 }) end, 'ones', '-3')
    end)

    it('other bad arguments', function()
      fails_with(function() return pmp.zeros(2.5) end, 'zeros', '2.5')
      fails_with(function() return pmp.arange(0, 5, 0) end, 'arange', 'step')
      fails_with(function() return pmp.randint(5, 5, { 2 }) end, 'randint', '5')
      fails_with(function() return pmp.full({ 2 }, 'x') end, 'full')
      fails_with(function() return pmp.arange(5):chunk(0) end, 'chunk')
      fails_with(function() return pmp.F.dropout(pmp.ones(2), 1.5, true) end, 'dropout', '1.5')
      fails_with(function() return pmp.ones(2) + 'a' end, 'add')
      fails_with(function() return pmp.ones(2):clamp('a') end, 'clamp')
    end)
  end)

  describe('autograd', function()
    it('backward twice through a freed graph says so; retain_graph=true allows it', function()
      local w = pmp.tensor({ 1, 2, 3 }):requires_grad_()
      local loss = (w * w):sum()
      loss:backward()
      assert.are.same({ 2, 4, 6 }, w.grad:totable())
      local err = fails_with(function() loss:backward() end, 'backward')
      assert(err:find('second time', 1, true) or err:find('freed', 1, true),
        'the message should say the graph was freed: ' .. err)
      assert(err:find('retain_graph', 1, true), 'the message should point at retain_graph: ' .. err)
      -- the gradient is untouched by the failed call
      assert.are.same({ 2, 4, 6 }, w.grad:totable())

      local v = pmp.tensor({ 1, 2, 3 }):requires_grad_()
      local l2 = (v * v):sum()
      l2:backward({ retain_graph = true })
      l2:backward()
      assert.are.same({ 4, 8, 12 }, v.grad:totable(), 'gradients accumulate over both calls')
      fails_with(function() l2:backward() end, 'backward')
    end)

    it('backward on a tensor that does not require grad', function()
      fails_with(function() pmp.ones(2):sum():backward() end, 'backward', 'require')
      local d = pmp.ones(2):requires_grad_():detach()
      fails_with(function() d:sum():backward() end, 'backward', 'require')
      local n = pmp.ones(2):requires_grad_()
      local out = pmp.no_grad(function() return (n * n):sum() end)
      fails_with(function() out:backward() end, 'backward', 'require')
    end)

    it('backward without a gradient on a non-scalar', function()
      local w = pmp.ones(3):requires_grad_()
      fails_with(function() (w * 2):backward() end, 'backward', '[3]')
    end)

    it('requires_grad_ on an integer tensor', function()
      fails_with(function() pmp.zeros(2, { dtype = 'i64' }):requires_grad_() end, 'requires_grad', 'i64')
      fails_with(function() pmp.tensor({ true }):requires_grad_() end, 'requires_grad', 'bool')
      assert.is_true(pmp.zeros(2, { dtype = 'bf16' }):requires_grad_().requires_grad)
    end)

    it('an error inside no_grad restores grad mode', function()
      assert.is_true(pmp.is_grad_enabled())
      fails_with(function() pmp.no_grad(function() return pmp.zeros(2) + pmp.zeros(3) end) end,
        'add: shapes [2] and [3] cannot be broadcast together')
      assert.is_true(pmp.is_grad_enabled())
      local w = pmp.ones(2):requires_grad_()
      assert.is_true((w * w).requires_grad)
    end)
  end)

  it('a long run of failures leaves the engine usable', function()
    for _ = 1, 200 do
      pcall(function() return pmp.zeros(2, 3) + pmp.zeros(4, 5) end)
      pcall(function() return pmp.zeros(2, 3):item() end)
    end
    local ok = pcall(function() return pmp.zeros(2, 3) + pmp.zeros(2, 3) end)
    assert.is_true(ok)
  end)
end)
