-- Finite-difference gradient checking in float64, shared by the specs.
local assert = require 'luassert'

local M = {}

local function values_of(t)
  local flat = t:reshape(-1):totable()
  return type(flat) == 'number' and { flat } or flat
end

function M.f64(values, shape)
  return pmp.tensor(values, { dtype = 'f64' }):view(shape)
end

-- Random input with entries kept away from 0 when `away` is set (for abs/relu/log...).
function M.random_input(shape, options)
  options = options or {}
  local t = pmp.randn(shape, { dtype = 'f64' })
  if options.positive then t = t:abs() + 0.5 end
  if options.away then t = t + t:sign() * 0.3 end
  return t
end

local EPS = 1e-6

-- Checks d(sum(fn(inputs) * w))/d(input) for every input against central differences.
function M.gradcheck(fn, inputs, tolerance)
  tolerance = tolerance or 1e-6
  local shapes, base = {}, {}
  for k, x in ipairs(inputs) do
    shapes[k] = x.shape
    base[k] = values_of(x)
  end
  local function build(k_changed, index, delta, requires)
    local built = {}
    for k = 1, #inputs do
      local values = base[k]
      if k == k_changed then
        values = { unpack(values) }
        values[index] = values[index] + delta
      end
      built[k] = M.f64(values, shapes[k])
      if requires then built[k]:requires_grad_() end
    end
    return built
  end
  local probe = fn(unpack(build(0, 0, 0, false)))
  pmp.manual_seed(99)
  local weights = pmp.randn(probe.shape, { dtype = 'f64' })
  local function loss(args)
    pmp.manual_seed(1234)
    return (fn(unpack(args)) * weights):sum()
  end
  local leaves = build(0, 0, 0, true)
  loss(leaves):backward()
  for k = 1, #inputs do
    local analytic = leaves[k].grad
    assert.is_not_nil(analytic, 'input ' .. k .. ' received no gradient')
    assert.are.same(shapes[k], analytic.shape)
    local got = values_of(analytic)
    for i = 1, #base[k] do
      local plus = loss(build(k, i, EPS, false)):item()
      local minus = loss(build(k, i, -EPS, false)):item()
      local numeric = (plus - minus) / (2 * EPS)
      local err = math.abs(got[i] - numeric)
      if err > tolerance * (1 + math.abs(numeric)) then
        error(string.format('input %d element %d: analytic %.10g vs numeric %.10g', k, i, got[i], numeric), 2)
      end
    end
  end
end


return M
