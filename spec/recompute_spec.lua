require 'busted.runner'()
-- Lua autograd functions and activation recompute.
local fails_with = require('spec.support.expect').fails_with

describe('pmp.autograd.custom', function()
  it('routes gradients through a Lua backward', function()
    local x = pmp.tensor({ 1, 2, 3 }, { dtype = 'f64' }):requires_grad_()
    local y = pmp.no_grad(function() return x * x end)
    y = pmp.autograd.custom({ x }, y, function(g) return { g * x * 2 } end)
    ;(y * pmp.tensor({ 1, 10, 100 }, { dtype = 'f64' })):sum():backward()
    assert.are.same({ 2, 40, 600 }, x.grad:totable())
  end)

  it('reports an error raised in the Lua backward as a Lua error', function()
    local x = pmp.ones(2):requires_grad_()
    local y = pmp.autograd.custom({ x }, pmp.no_grad(function() return x * 2 end), function() error('boom') end)
    local ok, message = pcall(function() y:sum():backward() end)
    assert.is_false(ok)
    assert.matches('custom function backward: .*boom', message)
  end)

  it('rejects a gradient of the wrong shape', function()
    local x = pmp.ones(2):requires_grad_()
    local y = pmp.autograd.custom({ x }, pmp.no_grad(function() return x * 2 end), function() return { pmp.ones(3) } end)
    local ok, message = pcall(function() y:sum():backward() end)
    assert.is_false(ok)
    assert.matches('gradient of shape %[3%]', message)
  end)
end)

describe('activation recompute', function()
  local function gradients(recompute, dropout)
    pmp.manual_seed(11)
    local model = pmp.nn.GPTModel({ num_layers = 3, hidden_size = 32, num_attention_heads = 4, num_query_groups = 2,
      vocab_size = 24, dtype = 'f64', hidden_dropout = dropout, recompute_granularity = recompute })
    local ids = pmp.randint(0, 24, { 2, 12 })
    local loss = model(ids, ids)
    loss:backward()
    local grads = {}
    for _, pair in ipairs(model:named_parameters()) do grads[pair[1]] = pair[2].grad end
    return loss:item(), grads
  end

  it('gives identical loss and gradients, also with dropout (the masks are replayed)', function()
    for _, dropout in ipairs({ 0, 0.3 }) do
      local loss_a, grads_a = gradients(nil, dropout)
      local loss_b, grads_b = gradients('full', dropout)
      assert.are.equal(loss_a, loss_b)
      for name, g in pairs(grads_a) do
        assert.are.equal(0, (g - grads_b[name]):abs():max():item(), name)
      end
    end
  end)

  it('keeps fewer activations alive between forward and backward', function()
    local function peak(recompute)
      collectgarbage()
      pmp.manual_seed(3)
      local model = pmp.nn.GPTModel({ num_layers = 6, hidden_size = 64, num_attention_heads = 4, vocab_size = 32,
        recompute_granularity = recompute })
      local ids = pmp.randint(0, 32, { 4, 128 })
      collectgarbage()
      pmp.memory.reset_peak()
      local base = pmp.memory.stats().in_use
      model(ids, ids):backward()
      return pmp.memory.stats().peak - base
    end
    pmp.memory.set_gc_step(256 * 1024)   -- collect garbage promptly so the peak counts live tensors
    local plain, recomputed = peak(nil), peak('full')
    pmp.memory.set_gc_step(256 * 1024 * 1024)
    assert.is_true(recomputed < 0.7 * plain, string.format('peak %d vs %d bytes', recomputed, plain))
  end)

  it('is rejected with an unknown granularity', function()
    fails_with(function()
      pmp.nn.GPTModel({ num_layers = 1, hidden_size = 8, num_attention_heads = 2, vocab_size = 4, recompute_granularity = 'selective' })
    end, "recompute_granularity must be 'full' or nil, got 'selective'")
  end)
end)
