require 'busted.runner'()
-- Ctrl-C inside engine ops: the host sets a flag (pmp_request_interrupt) and whichever op runs a kernel
-- next fails with "<op>: interrupted" and clears it, so the next op runs normally. Every op front-end
-- goes through the same tail, so each kind of op is checked here, not only the elementwise ones.
local C = require('pmp.ffi').C
local fails_with = require('spec.support.expect').fails_with
local F = pmp.F
local i64 = { dtype = 'i64' }

describe('an interrupt request', function()
  after_each(function() C.pmp_clear_interrupt() end)

  local m = pmp.tensor({ { 1, -2, 3 }, { -4, 5, -6 } })
  local positive = m:gt(0)
  local index = pmp.tensor({ { 0, 2 }, { 1, 0 } }, i64)
  local rows = pmp.tensor({ 1, 0 }, i64)
  local q = pmp.ones(1, 2, 3, 4)
  local cases = {
    { 'exp', function() return m:exp() end },
    { 'add', function() return m + m end },
    { 'where', function() return pmp.where(positive, m, m) end },
    { 'clamp', function() return m:clamp(0, 1) end },
    { 'masked_fill', function() return m:masked_fill(positive, 0) end },
    { 'tril', function() return m:tril() end },
    { 'sum', function() return m:sum() end },
    { 'matmul', function() return pmp.matmul(m, m:t()) end },
    { 'softmax', function() return m:softmax(2) end },
    { 'gather', function() return m:gather(2, index) end },
    { 'scatter_add', function() return m:scatter_add(2, index, m) end },
    { 'index_select', function() return m:index_select(1, rows) end },
    { 'index_add', function() return m:index_add(1, rows, m) end },
    { 'rms_norm', function() return F.rms_norm(m) end },
    { 'swiglu', function() return F.swiglu(pmp.ones(2, 4)) end },
    { 'attention', function() return F.attention(q, q, q) end },
  }
  for _, case in ipairs(cases) do
    local name, run = case[1], case[2]
    it('stops ' .. name .. ', naming it, and is used up by that op', function()
      local expected = run()   -- not interrupted: the reference result
      C.pmp_request_interrupt()
      fails_with(run, name .. ': interrupted')
      assert.are.same(expected:totable(), run():totable())
    end)
  end
end)
