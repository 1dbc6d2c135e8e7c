require 'busted.runner'()
-- The op profiler counts every kernel run while it is on, and nothing while it is off.

describe('pmp.profile', function()
  local function calls_of(op)
    for _, r in ipairs((pmp.profile.results())) do
      if r.op == op then return r.calls, r.seconds end
    end
    return 0, 0
  end

  it('counts each kernel call and times it', function()
    local a, b = pmp.randn(64, 32), pmp.randn(32, 16)
    pmp.profile.start()
    for _ = 1, 5 do local _ = a:matmul(b) end
    local _ = a + a
    pmp.profile.stop()
    local matmuls, seconds = calls_of('matmul')
    assert.are.equal(5, matmuls)
    assert.is_true(seconds > 0)
    assert.are.equal(1, (calls_of('add')))
    local report = pmp.profile.report()
    assert.truthy(report:find('matmul%s+5%s'))
    assert.truthy(report:find('(outside kernels)', 1, true))
  end)

  it('records nothing once stopped, and start() begins from zero', function()
    local a = pmp.randn(8, 8)
    pmp.profile.start()
    local _ = a:matmul(a)
    pmp.profile.stop()
    local _ = a:matmul(a)
    assert.are.equal(1, (calls_of('matmul')))
    pmp.profile.start()
    pmp.profile.stop()
    assert.are.equal(0, (calls_of('matmul')))
  end)
end)
