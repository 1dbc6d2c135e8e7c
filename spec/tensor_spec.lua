require 'busted.runner'()
-- Forward behaviour of the tensor API against closed-form values or plain-Lua reference computations.
-- Expected values never come from pmp itself: every reference below is computed in plain Lua (doubles).
local ffi = require 'ffi'

---------------------------------------------------------------------------------------------------
-- Helpers (plain Lua)

local function flatten(x, out)
  out = out or {}
  if type(x) == 'table' then
    for _, v in ipairs(x) do flatten(v, out) end
  else
    out[#out + 1] = x
  end
  return out
end

local function shape_of_table(x)
  local shape = {}
  while type(x) == 'table' do
    shape[#shape + 1] = #x
    x = x[1]
  end
  return shape
end

local function fmt_shape(s) return '[' .. table.concat(s, ',') .. ']' end

-- Builds a nested table of the given shape from a flat array (row-major).
local function nest(flat, shape)
  if #shape == 0 then return flat[1] end
  local pos = 0
  local function build(d)
    local out = {}
    for k = 1, shape[d] do
      if d == #shape then
        pos = pos + 1
        out[k] = flat[pos]
      else
        out[k] = build(d + 1)
      end
    end
    return out
  end
  return build(1)
end

local function is_close(a, e, tol)
  if type(e) == 'boolean' or type(a) == 'boolean' then return a == e end
  if e ~= e then return a ~= a end
  if e == math.huge or e == -math.huge then return a == e end
  return math.abs(a - e) <= tol * (1 + math.abs(e))
end

-- Compares a tensor (or plain value) against an expected nested table/number: shape and values.
local function assert_close(actual, expected, tol, what)
  tol = tol or 1e-5
  local got = type(actual) == 'cdata' and actual:totable() or actual
  local gs, es = shape_of_table(got), shape_of_table(expected)
  assert(fmt_shape(gs) == fmt_shape(es),
    (what or 'value') .. ': shape ' .. fmt_shape(gs) .. ' expected ' .. fmt_shape(es))
  local gf, ef = flatten(got), flatten(expected)
  for k = 1, #ef do
    if not is_close(gf[k], ef[k], tol) then
      error(string.format('%s: element %d is %s, expected %s (tol %g)', what or 'value', k,
        tostring(gf[k]), tostring(ef[k]), tol), 2)
    end
  end
end

local function assert_shape(t, shape)
  assert.are.same(shape, t.shape)
end

-- Deterministic pseudo-random data in plain Lua (a small LCG), so references never depend on pmp.
local lcg_state = 12345
local function lcg()
  lcg_state = (lcg_state * 1103515245 + 12345) % 2147483648
  return lcg_state / 2147483648
end
local function rand_values(n, lo, hi)
  lo, hi = lo or -2, hi or 2
  local out = {}
  for k = 1, n do
    -- quarter steps: exactly representable in f32, so products and sums are easy to compare
    out[k] = math.floor((lo + (hi - lo) * lcg()) * 4) / 4
  end
  return out
end
local function numel_of(shape)
  local n = 1
  for _, s in ipairs(shape) do n = n * s end
  return n
end
local function rand_table(shape, lo, hi) return nest(rand_values(numel_of(shape), lo, hi), shape) end

-- Element [i1, i2, ...] (1-based) of a nested table.
local function at(x, idx)
  for _, i in ipairs(idx) do x = x[i] end
  return x
end

-- Calls fn(idx) for every multi-index of shape (row-major), idx 1-based.
local function each_index(shape, fn)
  local n = numel_of(shape)
  local idx = {}
  for k = 1, #shape do idx[k] = 1 end
  for _ = 1, n do
    fn(idx)
    for d = #shape, 1, -1 do
      idx[d] = idx[d] + 1
      if idx[d] <= shape[d] then break end
      idx[d] = 1
    end
  end
end

local function broadcast_shape(a, b)
  local n = math.max(#a, #b)
  local out = {}
  for k = 1, n do
    local da = a[#a - n + k] or 1
    local db = b[#b - n + k] or 1
    assert(da == db or da == 1 or db == 1, 'reference: shapes do not broadcast')
    out[k] = math.max(da, db)
  end
  return out
end

-- Element of x (shape xs) seen at index idx of a broadcast result of rank #idx.
local function bcast_at(x, xs, idx)
  if type(x) ~= 'table' then return x end
  local sub = {}
  local off = #idx - #xs
  for k = 1, #xs do sub[k] = xs[k] == 1 and 1 or idx[off + k] end
  return at(x, sub)
end

-- Elementwise reference with numpy broadcasting. a and b are nested tables or numbers.
local function ref_binary(a, b, fn)
  local as = type(a) == 'table' and shape_of_table(a) or {}
  local bs = type(b) == 'table' and shape_of_table(b) or {}
  local shape = broadcast_shape(as, bs)
  local flat = {}
  each_index(shape, function(idx)
    flat[#flat + 1] = fn(bcast_at(a, as, idx), bcast_at(b, bs, idx))
  end)
  return nest(flat, shape), shape
end

local function ref_map(x, fn)
  if type(x) ~= 'table' then return fn(x) end
  local out = {}
  for k, v in ipairs(x) do out[k] = ref_map(v, fn) end
  return out
end

-- numpy matmul semantics, in plain Lua.
local function ref_matmul(a, b)
  local as, bs = shape_of_table(a), shape_of_table(b)
  local a_vec, b_vec = #as == 1, #bs == 1
  if a_vec then a = { a }; as = { 1, as[1] } end
  if b_vec then
    local col = {}
    for k, v in ipairs(b) do col[k] = { v } end
    b = col
    bs = { bs[1], 1 }
  end
  local m, k, n = as[#as - 1], as[#as], bs[#bs]
  assert(k == bs[#bs - 1], 'reference: inner dims')
  local abatch, bbatch = {}, {}
  for i = 1, #as - 2 do abatch[i] = as[i] end
  for i = 1, #bs - 2 do bbatch[i] = bs[i] end
  local batch = broadcast_shape(abatch, bbatch)
  local flat = {}
  local function matrix_at(x, xbatch, idx)
    local sub = {}
    local off = #idx - #xbatch
    for i = 1, #xbatch do sub[i] = xbatch[i] == 1 and 1 or idx[off + i] end
    return at(x, sub)
  end
  local function one(idx)
    local am, bm = matrix_at(a, abatch, idx), matrix_at(b, bbatch, idx)
    for i = 1, m do
      for j = 1, n do
        local s = 0
        for p = 1, k do s = s + am[i][p] * bm[p][j] end
        flat[#flat + 1] = s
      end
    end
  end
  if #batch == 0 then one({}) else each_index(batch, one) end
  local shape = {}
  for i = 1, #batch do shape[#shape + 1] = batch[i] end
  if not a_vec then shape[#shape + 1] = m end
  if not b_vec then shape[#shape + 1] = n end
  return nest(flat, shape)
end

-- erf by its Taylor series (|x| <= 4 here), precise to ~1e-12 in doubles.
local function erf(x)
  local sum, term, n = 0, x, 0
  repeat
    local add = term / (2 * n + 1)
    sum = sum + add
    n = n + 1
    term = -term * x * x / n
  until math.abs(add) < 1e-17 or n > 200
  return 2 / math.sqrt(math.pi) * sum
end

local function sigmoid(x) return 1 / (1 + math.exp(-x)) end

-- Raw engine tensor behind a Lua tensor value (handle struct or the pointer itself).
local function raw(t)
  local ok, p = pcall(function() return t.ptr end)
  if ok and p ~= nil then return p end
  return t
end
local function data_addr(t) return tonumber(ffi.cast('intptr_t', raw(t).data)) end

local function lua_softmax_row(row)
  local m = -math.huge
  for _, v in ipairs(row) do m = math.max(m, v) end
  local s = 0
  for _, v in ipairs(row) do s = s + math.exp(v - m) end
  local out = {}
  for k, v in ipairs(row) do out[k] = math.exp(v - m) / s end
  return out, m + math.log(s)
end

---------------------------------------------------------------------------------------------------

describe('creation', function()
  local dtypes = { 'f64', 'f32', 'bf16', 'f16', 'i64', 'i32', 'u8', 'bool' }

  it('zeros/ones/full/empty take shapes as varargs or a table, with options last', function()
    local z = pmp.zeros(2, 3)
    assert_shape(z, { 2, 3 })
    assert.equal('f32', z.dtype)
    assert_close(z, { { 0, 0, 0 }, { 0, 0, 0 } }, 0)
    assert_shape(pmp.zeros({ 2, 3 }), { 2, 3 })
    assert_close(pmp.ones({ 4 }), { 1, 1, 1, 1 }, 0)
    assert_close(pmp.ones(2, 1, { dtype = 'f64' }), { { 1 }, { 1 } }, 0)
    assert.equal('f64', pmp.ones(2, 1, { dtype = 'f64' }).dtype)
    assert.equal('i64', pmp.zeros({ 3 }, { dtype = 'i64' }).dtype)
    local f = pmp.full(2, 2, 7)
    assert_close(f, { { 7, 7 }, { 7, 7 } }, 0)
    assert.equal('f32', f.dtype)
    local fi = pmp.full({ 3 }, -4, { dtype = 'i32' })
    assert.equal('i32', fi.dtype)
    assert.are.same({ -4, -4, -4 }, fi:totable())
    assert_close(pmp.full({ 2 }, 0.25, { dtype = 'f64' }), { 0.25, 0.25 }, 0)
    local e = pmp.empty(3, 2, { dtype = 'f16' })
    assert_shape(e, { 3, 2 })
    assert.equal('f16', e.dtype)
    assert_shape(pmp.empty({ 5 }), { 5 })
  end)

  it('supports every dtype and the cpu device', function()
    for _, dt in ipairs(dtypes) do
      local t = pmp.ones(2, 2, { dtype = dt, device = 'cpu' })
      assert.equal(dt, t.dtype)
      assert.equal('cpu', t.device)
      local expected = dt == 'bool' and true or 1
      assert.are.same({ { expected, expected }, { expected, expected } }, t:totable())
      local zero = 0
      if dt == 'bool' then zero = false end
      assert.are.same({ { zero } }, pmp.zeros(1, 1, { dtype = dt }):totable())
    end
  end)

  it('pmp.tensor builds from nested tables and numbers', function()
    local t = pmp.tensor({ { 1, 2, 3 }, { 4, 5, 6 } })
    assert_shape(t, { 2, 3 })
    assert.equal('f32', t.dtype)
    assert.are.same({ { 1, 2, 3 }, { 4, 5, 6 } }, t:totable())
    local s = pmp.tensor(3.5)
    assert.are.same({}, s.shape)
    assert.equal(0, s:dim())
    assert.equal(1, s:numel())
    assert.equal(3.5, s:item())
    local i = pmp.tensor({ 1, -2, 3 }, { dtype = 'i64' })
    assert.equal('i64', i.dtype)
    assert.are.same({ 1, -2, 3 }, i:totable())
    local b = pmp.tensor({ true, false })
    assert.equal('bool', b.dtype)
    assert.are.same({ true, false }, b:totable())
    local d = pmp.tensor({ 0.1 }, { dtype = 'f64', device = 'cpu' })
    assert.equal('f64', d.dtype)
    assert.equal(0.1, d:item())
    local deep = pmp.tensor({ { { { 1 } }, { { 2 } } } })
    assert_shape(deep, { 1, 2, 1, 1 })
    -- large integers survive exactly in i64
    assert.equal(2 ^ 53, pmp.tensor({ 2 ^ 53 }, { dtype = 'i64' }):totable()[1])
  end)

  it('arange: integers give i64, floats give f32', function()
    local a = pmp.arange(5)
    assert.equal('i64', a.dtype)
    assert.are.same({ 0, 1, 2, 3, 4 }, a:totable())
    assert.are.same({ 2, 4, 6 }, pmp.arange(2, 8, 2):totable())
    assert.are.same({ 1, 4, 7 }, pmp.arange(1, 10, 3):totable())
    assert.are.same({ 5, 3, 1 }, pmp.arange(5, 0, -2):totable())
    local f = pmp.arange(0, 1, 0.25)
    assert.equal('f32', f.dtype)
    assert_close(f, { 0, 0.25, 0.5, 0.75 }, 0)
    local g = pmp.arange(0.5, 3)
    assert.equal('f32', g.dtype)
    assert_close(g, { 0.5, 1.5, 2.5 }, 0)
    local h = pmp.arange(4, { dtype = 'f64' })
    assert.equal('f64', h.dtype)
    assert_close(h, { 0, 1, 2, 3 }, 0)
    assert.equal(0, pmp.arange(0):numel())
  end)

  it('manual_seed makes rand, randn and randint reproducible', function()
    pmp.manual_seed(1234)
    local a1, b1, c1 = pmp.rand(6):totable(), pmp.randn(2, 3):totable(), pmp.randint(0, 100, { 6 }):totable()
    pmp.manual_seed(1234)
    local a2, b2, c2 = pmp.rand(6):totable(), pmp.randn(2, 3):totable(), pmp.randint(0, 100, { 6 }):totable()
    assert.are.same(a1, a2)
    assert.are.same(b1, b2)
    assert.are.same(c1, c2)
    pmp.manual_seed(4321)
    assert.are_not.same(a1, pmp.rand(6):totable())
    -- consecutive draws differ
    pmp.manual_seed(1234)
    local x, y = pmp.rand(6):totable(), pmp.rand(6):totable()
    assert.are_not.same(x, y)
  end)

  it('rand is uniform in [0, 1)', function()
    pmp.manual_seed(7)
    local t = pmp.rand(100000)
    assert.equal('f32', t.dtype)
    assert_shape(t, { 100000 })
    local v = t:totable()
    local sum, lo, hi, below_quarter = 0, math.huge, -math.huge, 0
    for _, x in ipairs(v) do
      sum = sum + x
      lo, hi = math.min(lo, x), math.max(hi, x)
      if x < 0.25 then below_quarter = below_quarter + 1 end
    end
    assert.is_true(lo >= 0, 'min ' .. lo)
    assert.is_true(hi < 1, 'max ' .. hi)
    assert.is_true(math.abs(sum / #v - 0.5) < 0.01, 'mean ' .. sum / #v)
    assert.is_true(math.abs(below_quarter / #v - 0.25) < 0.01)
    assert.equal('f64', pmp.rand({ 3 }, { dtype = 'f64' }).dtype)
    assert_shape(pmp.rand(2, 3), { 2, 3 })
  end)

  it('randn has mean 0 and std 1 on 100k samples', function()
    pmp.manual_seed(11)
    local v = pmp.randn(100000):totable()
    local sum, sq = 0, 0
    for _, x in ipairs(v) do sum = sum + x end
    local mean = sum / #v
    for _, x in ipairs(v) do sq = sq + (x - mean) ^ 2 end
    local std = math.sqrt(sq / (#v - 1))
    assert.is_true(math.abs(mean) < 0.02, 'mean ' .. mean)
    assert.is_true(math.abs(std - 1) < 0.02, 'std ' .. std)
    local within1 = 0
    for _, x in ipairs(v) do if math.abs(x) < 1 then within1 = within1 + 1 end end
    -- P(|z| < 1) = erf(1/sqrt 2) = 0.6827
    assert.is_true(math.abs(within1 / #v - erf(1 / math.sqrt(2))) < 0.01)
    assert_shape(pmp.randn({ 2, 5 }), { 2, 5 })
    assert.equal('f64', pmp.randn(3, { dtype = 'f64' }).dtype)
  end)

  it('randint draws integers in [low, high)', function()
    pmp.manual_seed(3)
    local t = pmp.randint(3, 9, { 6000 })
    assert.equal('i64', t.dtype)
    local counts = {}
    for _, x in ipairs(t:totable()) do
      assert.is_true(x >= 3 and x < 9 and x == math.floor(x), 'value ' .. x)
      counts[x] = (counts[x] or 0) + 1
    end
    for x = 3, 8 do assert.is_true((counts[x] or 0) > 800, 'count of ' .. x .. ': ' .. tostring(counts[x])) end
    local u = pmp.randint(5, { 2, 3 })   -- randint(high, shape)
    assert_shape(u, { 2, 3 })
    for _, x in ipairs(flatten(u:totable())) do assert.is_true(x >= 0 and x < 5) end
    local w = pmp.randint(-2, 2, 4, 4)
    assert_shape(w, { 4, 4 })
    for _, x in ipairs(flatten(w:totable())) do assert.is_true(x >= -2 and x < 2) end
    assert.equal('i32', pmp.randint(0, 4, { 3 }, { dtype = 'i32' }).dtype)
  end)
end)

describe('properties', function()
  it('shape, size, dim, numel, dtype, device', function()
    local t = pmp.zeros(2, 3, 4)
    assert.are.same({ 2, 3, 4 }, t.shape)
    local shape = t.shape
    shape[1] = 99
    assert.are.same({ 2, 3, 4 }, t.shape, 'shape is a fresh table')
    assert.equal(2, t:size(1))
    assert.equal(4, t:size(3))
    assert.equal(4, t:size(-1))
    assert.equal(2, t:size(-3))
    assert.equal(3, t:dim())
    assert.equal(24, t:numel())
    assert.equal('f32', t.dtype)
    assert.equal('cpu', t.device)
    assert.equal(0, pmp.zeros(0, 3):numel())
  end)
end)

describe('conversions', function()
  it('to/float/double/long/bf16 change the dtype', function()
    local t = pmp.tensor({ 1.5, -2.75 })
    assert.equal('f64', t:to('f64').dtype)
    assert.equal('f64', t:double().dtype)
    assert.equal('f32', t:double():float().dtype)
    assert.equal('bf16', t:bf16().dtype)
    assert.equal('i64', t:long().dtype)
    assert_close(t:double(), { 1.5, -2.75 }, 0)
    assert.equal('cpu', t:to('cpu').device)
    assert.equal('f32', t:to('cpu').dtype)
    -- float to integer truncates toward zero
    assert.are.same({ 2, -2, 0 }, pmp.tensor({ 2.9, -2.9, 0.5 }):long():totable())
    assert.are.same({ 1, -1 }, pmp.tensor({ 1.7, -1.7 }):to('i32'):totable())
    assert.are.same({ false, true, true }, pmp.tensor({ 0, 2, -0.5 }):to('bool'):totable())
    assert.are.same({ 1, 0 }, pmp.tensor({ true, false }):long():totable())
    -- f32 storage rounds 0.1 to the nearest float
    local f32_of_tenth = 13421773 * 2 ^ -27
    assert.equal(f32_of_tenth, pmp.tensor({ 0.1 }):double():item())
  end)

  it('bf16 rounds to nearest, ties to even', function()
    local one = 1
    local values = {
      one + 2 ^ -8,               -- halfway between 1 and 1+2^-7: ties to even -> 1
      one + 3 * 2 ^ -8,           -- halfway between 1+2^-7 and 1+2^-6: -> 1+2^-6
      one + 2 ^ -8 + 2 ^ -16,     -- above halfway -> 1+2^-7
      one + 2 ^ -7,               -- exact
      3.14159274101257324,        -- f32 pi -> 3.140625
      -(one + 2 ^ -8),
      256 + 1,                    -- 257 -> 256 (tie to even)
      256 + 3,                    -- 259 -> 260
    }
    local expected = { 1, 1 + 2 ^ -6, 1 + 2 ^ -7, 1 + 2 ^ -7, 3.140625, -1, 256, 260 }
    local b = pmp.tensor(values):bf16()
    assert.equal('bf16', b.dtype)
    assert_close(b:float(), expected, 0, 'bf16 rounding')
    assert_close(b:double(), expected, 0, 'bf16 rounding (f64)')
    -- bf16 keeps the f32 exponent range
    assert_close(pmp.tensor({ 1e30, -1e-30 }):bf16():double(), { 1e30, -1e-30 }, 2 ^ -8)
  end)

  it('f16 rounds to nearest even and overflows to inf beyond its range', function()
    local values = { 65504, 65519, 65520, 1e5, -1e5, 2 ^ -24, 2 ^ -25, 1 + 2 ^ -11, 1 + 3 * 2 ^ -11, 2 ^ -14 }
    local expected = { 65504, 65504, math.huge, math.huge, -math.huge, 2 ^ -24, 0, 1, 1 + 2 ^ -9, 2 ^ -14 }
    local h = pmp.tensor(values):to('f16')
    assert.equal('f16', h.dtype)
    assert_close(h:float(), expected, 0, 'f16 rounding')
  end)

  it('clone copies, contiguous makes a dense copy of a strided view', function()
    local t = pmp.tensor({ { 1, 2, 3 }, { 4, 5, 6 } })
    local c = t:clone()
    assert.are.same(t:totable(), c:totable())
    assert.are_not.equal(data_addr(t), data_addr(c))
    local tt = t:transpose(1, 2)
    assert.is_false(tt:is_contiguous())
    local cc = tt:contiguous()
    assert.is_true(cc:is_contiguous())
    assert.are.same({ { 1, 4 }, { 2, 5 }, { 3, 6 } }, cc:totable())
    assert.are.same({ { 1, 4 }, { 2, 5 }, { 3, 6 } }, tt:totable())
  end)

  it('item and totable', function()
    assert.equal(2.5, pmp.tensor({ { 2.5 } }):item())
    assert.equal(7, pmp.tensor({ 7 }, { dtype = 'i64' }):item())
    assert.equal(true, pmp.tensor({ true }):item())
    assert.equal(false, pmp.tensor(false):item())
    assert.equal(-3, pmp.full({}, -3, { dtype = 'i32' }):item())
    assert.equal(2 ^ 40 + 1, pmp.tensor({ 2 ^ 40 + 1 }, { dtype = 'i64' }):item())
    assert.equal(4.5, pmp.tensor(4.5):totable())
    assert.are.same({ { { 1 }, { 2 } } }, pmp.tensor({ { { 1 }, { 2 } } }):totable())
    assert.are.same({}, pmp.zeros(0):totable())
  end)

  it('tostring is readable and truncates large tensors', function()
    local s = tostring(pmp.tensor({ { 1.5, 2 }, { 3, 4 } }))
    assert.matches('1.5', s, 1, true)
    assert.matches('4', s, 1, true)
    assert.matches('f32', s, 1, true)
    assert.matches('2,2', s, 1, true)
    local i = tostring(pmp.tensor({ 7, -8 }, { dtype = 'i64' }))
    assert.matches('7', i, 1, true)
    assert.matches('-8', i, 1, true)
    assert.matches('i64', i, 1, true)
    local b = tostring(pmp.tensor({ true, false }))
    assert.matches('true', b, 1, true)
    assert.matches('false', b, 1, true)
    local big = tostring(pmp.arange(10000):view(100, 100))
    assert.matches('...', big, 1, true)
    assert.is_true(#big < 2000, 'printed ' .. #big .. ' characters')
    assert.matches('9999', big, 1, true)   -- the last element is shown
    assert.matches('100,100', big, 1, true)
    assert.matches('2.5', tostring(pmp.tensor(2.5)), 1, true)
  end)
end)

describe('views', function()
  -- writes a float through the raw data pointer, to observe sharing without in-place ops
  local function poke_f32(t, element, value) ffi.cast('float *', raw(t).data)[element] = value end

  it('narrow, transpose, view, permute, unsqueeze, squeeze, expand share storage', function()
    local base = pmp.arange(12):float():view(3, 4)
    local n = base:narrow(2, 2, 2)                 -- columns 2..3
    local tr = base:transpose(1, 2)
    local flat = base:view(12)
    local p = base:view(1, 3, 4):permute(3, 2, 1)
    local u = base:unsqueeze(1)
    local sq = u:squeeze(1)
    local row = base:narrow(1, 2, 1)
    local ex = row:expand(5, 4)
    assert.equal(data_addr(base) + 4, data_addr(n))
    assert.equal(data_addr(base), data_addr(tr))
    assert.equal(data_addr(base), data_addr(flat))
    assert.equal(data_addr(base), data_addr(p))
    assert.equal(data_addr(base), data_addr(u))
    assert.equal(data_addr(base), data_addr(sq))
    assert.equal(data_addr(base) + 16, data_addr(ex))
    -- element (2,3) of base (flat 6) is seen by every view
    poke_f32(base, 6, 100)
    assert.equal(100, n:totable()[2][2])
    assert.equal(100, tr:totable()[3][2])
    assert.equal(100, flat:totable()[7])
    assert.equal(100, p:totable()[3][2][1])
    assert.equal(100, u:totable()[1][2][3])
    assert.equal(100, sq:totable()[2][3])
    for r = 1, 5 do assert.equal(100, ex:totable()[r][3]) end
    -- and writes through a view reach the base
    poke_f32(n, 0, -1)   -- n[1][1] is base[1][2]
    assert.equal(-1, base:totable()[1][2])
    assert.are.same({ { -1, 2 }, { 5, 100 }, { 9, 10 } }, n:totable())
  end)

  it('reshape is a view when possible and copies otherwise', function()
    local base = pmp.arange(6):float():view(2, 3)
    local r = base:reshape(3, 2)
    assert.equal(data_addr(base), data_addr(r))
    local t = base:t()
    local rt = t:reshape(6)
    assert.are.same({ 0, 3, 1, 4, 2, 5 }, rt:totable())
    assert.are.same({ 3, 2 }, base:view(-1, 2).shape)
    assert.are.same({ 2, 1, 3 }, base:reshape({ 2, -1, 3 }).shape)
    -- the copy does not alias the transposed storage
    poke_f32(base, 1, 42)
    assert.equal(1, rt:totable()[3])
  end)

  it('squeeze/unsqueeze/expand/permute shapes', function()
    local t = pmp.zeros(1, 2, 1, 3)
    assert.are.same({ 2, 3 }, t:squeeze().shape)
    assert.are.same({ 2, 1, 3 }, t:squeeze(1).shape)
    assert.are.same({ 1, 2, 3 }, t:squeeze(-2).shape)
    assert.are.same({ 1, 2, 1, 3 }, t:squeeze(2).shape)   -- size 2: unchanged
    assert.are.same({ 2, 1 }, pmp.zeros(2):unsqueeze(-1).shape)
    assert.are.same({ 1, 2 }, pmp.zeros(2):unsqueeze(1).shape)
    assert.are.same({ 3, 1, 2, 1 }, t:permute(4, 1, 2, 3).shape)
    assert.are.same({ 3, 1, 2, 1 }, t:permute({ 4, 1, 2, 3 }).shape)
    local e = pmp.tensor({ { 1 }, { 2 } }):expand(2, 3)
    assert.are.same({ { 1, 1, 1 }, { 2, 2, 2 } }, e:totable())
    assert.are.same({ { 1, 1, 1 }, { 2, 2, 2 } }, pmp.tensor({ { 1 }, { 2 } }):expand(-1, 3):totable())
    assert.are.same({ { { 5, 6 } }, { { 5, 6 } } }, pmp.tensor({ 5, 6 }):expand(2, 1, 2):totable())
  end)

  it('non-contiguous inputs give the same results as contiguous copies', function()
    local vals = rand_table({ 4, 3 })
    local x = pmp.tensor(vals)
    local xt = x:t()                                  -- [3,4], strided
    local xc = xt:contiguous()
    local ref_t = {}
    for i = 1, 3 do
      ref_t[i] = {}
      for j = 1, 4 do ref_t[i][j] = vals[j][i] end
    end
    local y = pmp.tensor(rand_table({ 3, 4 }))
    local function both(fn, what, tol)
      local a, b = fn(xt), fn(xc)
      assert_close(a, b:totable(), tol or 1e-6, what)
      return a
    end
    assert_close(both(function(t) return t:exp() end, 'exp'), ref_map(ref_t, math.exp), 1e-5)
    assert_close(both(function(t) return t:add(y) end, 'add'),
      ref_binary(ref_t, y:totable(), function(p, q) return p + q end), 1e-6)
    assert_close(both(function(t) return y:mul(t) end, 'mul'),
      ref_binary(y:totable(), ref_t, function(p, q) return p * q end), 1e-6)
    local rowsum = {}
    for i = 1, 3 do
      rowsum[i] = 0
      for j = 1, 4 do rowsum[i] = rowsum[i] + ref_t[i][j] end
    end
    assert_close(both(function(t) return t:sum(2) end, 'sum'), rowsum, 1e-6)
    assert_close(both(function(t) return t:max(2) end, 'max'), (function()
      local out = {}
      for i = 1, 3 do out[i] = math.max(unpack(ref_t[i])) end
      return out
    end)(), 0)
    assert_close(both(function(t) return pmp.matmul(t, x) end, 'matmul'), ref_matmul(ref_t, vals), 1e-5)
    assert_close(both(function(t) return pmp.matmul(x, t) end, 'matmul right'), ref_matmul(vals, ref_t), 1e-5)
    local sm = {}
    for i = 1, 3 do sm[i] = lua_softmax_row(ref_t[i]) end
    assert_close(both(function(t) return t:softmax(-1) end, 'softmax'), sm, 1e-5)
    both(function(t) return pmp.cat({ t, t }, 2) end, 'cat')
    both(function(t) return t:gather(2, pmp.tensor({ { 3 }, { 0 }, { 1 } }, { dtype = 'i64' })) end, 'gather')
    both(function(t) return t:index_select(2, pmp.tensor({ 3, 1 }, { dtype = 'i64' })) end, 'index_select')
    both(function(t) return t:tril() end, 'tril')
    both(function(t) return t:masked_fill(t:gt(0), 0) end, 'masked_fill')
    both(function(t) return t:reshape(12) end, 'reshape')
    both(function(t) return t:to('f64') end, 'to')
    both(function(t) return t:mean(1) end, 'mean')
    both(function(t) return t:argmax(2) end, 'argmax')
    both(function(t) return pmp.F.cross_entropy(t, pmp.tensor({ 0, 3, 2 }, { dtype = 'i64' }), { reduction = 'none' }) end,
      'cross_entropy')
    -- a narrowed (offset) view too
    local n = x:narrow(1, 2, 2)
    assert_close(n:exp(), ref_map({ vals[2], vals[3] }, math.exp), 1e-5, 'narrow exp')
    -- an expanded (stride 0) view
    local e = pmp.tensor({ { 1 }, { 2 } }):expand(2, 3)
    assert_close(e:add(pmp.tensor({ 10, 20, 30 })), { { 11, 21, 31 }, { 12, 22, 32 } }, 0)
    assert_close(e:sum(), 9, 0)
  end)
end)

describe('large and strided inputs', function()
  it('reductions over big tensors are exact where the math is exact', function()
    local n = 2 ^ 20
    assert.equal(n * (n - 1) / 2, pmp.arange(n):sum():item(), 'i64')
    assert.equal(n * (n - 1) / 2, pmp.arange(n, { dtype = 'f64' }):sum():item(), 'f64')
    local f = pmp.arange(n, { dtype = 'f32' }):sum():item()
    assert.is_true(math.abs(f / (n * (n - 1) / 2) - 1) < 1e-4, 'f32 sum ' .. f)
    local cols = pmp.ones(1000, 1000):sum(1)
    assert.equal(1000, cols:min():item())
    assert.equal(1000, cols:max():item())
    local m = pmp.arange(1000000):float():view(1000, 1000)
    local v, i = m:max(2)
    assert.equal(999999, v:totable()[1000])
    assert.equal(999, i:totable()[1000])
    assert.equal(999999, m:argmax():item())
    -- elementwise on a big transposed view: element [1][2] of m^T is m[2][1] = 1000
    assert.equal(1001, (m:t() + 1):totable()[1][2])
    local rows = pmp.zeros(4, 100000):softmax(-1):sum(-1)
    assert_close(rows, { 1, 1, 1, 1 }, 1e-4)
  end)

  it('copies of transposed and head-split views, fills of views, in every layout the fast paths take', function()
    -- x[a][b][c] = 10000 (a-1) + 100 (b-1) + (c-1), exact in f32 and (small) in bf16
    local function ref(a, b, c) return 10000 * (a - 1) + 100 * (b - 1) + (c - 1) end
    local x = pmp.arange(3):float():view(3, 1, 1) * 10000 + pmp.arange(37):float():view(1, 37, 1) * 100 +
        pmp.arange(53):float():view(1, 1, 53)
    for _, dt in ipairs({ 'f32', 'f64', 'i32' }) do
      local t = x:to(dt):transpose(2, 3):contiguous() -- [3, 53, 37], a tiled transpose
      local back = t:totable()
      assert.equal(ref(3, 37, 53), back[3][53][37], dt)
      assert.equal(ref(2, 5, 7), back[2][7][5], dt)
      local p = x:to(dt):permute(2, 1, 3):contiguous() -- [37, 3, 53]: contiguous runs of 53
      assert.equal(ref(3, 11, 17), p:totable()[11][3][17], dt)
    end
    local h = x:bf16():permute(2, 1, 3):contiguous():float() -- runs converted on the way
    assert.equal(ref(1, 2, 3), h:totable()[2][1][3])
    local f = pmp.zeros(6, 5)
    f:t():fill_(0.1)
    f:narrow(2, 2, 2):fill_(-2)
    local v = f:totable()
    assert.equal(-2, v[6][3])
    assert.equal(pmp.tensor({ 0.1 }):item(), v[6][5])
    assert.equal(pmp.tensor({ 0.1 }):bf16():double():item(), pmp.full({ 300000 }, 0.1, { dtype = 'bf16' }):max():double():item())
  end)

  it('reductions over every dim of a permuted 3-D view', function()
    -- x[a][b][c] = 12 (a-1) + 4 (b-1) + (c-1); p = x:permute(3, 1, 2), so p[c][a][b] = x[a][b][c]
    local p = pmp.arange(24):float():view(2, 3, 4):permute(3, 1, 2)
    local function x(a, b, c) return 12 * (a - 1) + 4 * (b - 1) + (c - 1) end
    local s1, s2, s3 = {}, {}, {}
    for a = 1, 2 do
      s1[a] = {}
      for b = 1, 3 do
        local acc = 0
        for c = 1, 4 do acc = acc + x(a, b, c) end
        s1[a][b] = acc
      end
    end
    for c = 1, 4 do
      s2[c], s3[c] = {}, {}
      for b = 1, 3 do s2[c][b] = x(1, b, c) + x(2, b, c) end
      for a = 1, 2 do s3[c][a] = x(a, 1, c) + x(a, 2, c) + x(a, 3, c) end
    end
    assert_close(p:sum(1), s1, 0, 'sum 1')
    assert_close(p:sum(2), s2, 0, 'sum 2')
    assert_close(p:sum(3), s3, 0, 'sum 3')
    local v, i = p:max(1)
    local ref_i = {}
    for a = 1, 2 do ref_i[a] = { 3, 3, 3 } end
    assert.are.same(ref_i, i:totable())
    assert_close(v, ref_map(s1, function(q) return (q - 6) / 4 + 3 end), 0, 'max over permuted dim')
  end)

  it('matmul with permuted and expanded operands', function()
    local a = pmp.tensor({ { 1, 2 }, { 3, 4 } }):unsqueeze(1):expand(3, 2, 2)
    local b_vals = rand_table({ 3, 2, 1 })
    local a_vals = { { { 1, 2 }, { 3, 4 } }, { { 1, 2 }, { 3, 4 } }, { { 1, 2 }, { 3, 4 } } }
    assert_close(pmp.matmul(a, pmp.tensor(b_vals)), ref_matmul(a_vals, b_vals), 1e-6, 'expanded')
    local x = pmp.arange(24):float():view(2, 3, 4)
    local xp = x:permute(2, 1, 3)          -- [3,2,4]
    local ref_xp = {}
    for j = 1, 3 do
      ref_xp[j] = {}
      for i = 1, 2 do
        ref_xp[j][i] = {}
        for k = 1, 4 do ref_xp[j][i][k] = 12 * (i - 1) + 4 * (j - 1) + (k - 1) end
      end
    end
    local w_vals = rand_table({ 4, 5 })
    assert_close(pmp.matmul(xp, pmp.tensor(w_vals)), ref_matmul(ref_xp, w_vals), 1e-5, 'permuted')
    local wt = pmp.tensor(rand_table({ 5, 4 }))
    local ref_wt = {}
    local wt_vals = wt:totable()
    for k = 1, 4 do
      ref_wt[k] = {}
      for j = 1, 5 do ref_wt[k][j] = wt_vals[j][k] end
    end
    assert_close(pmp.matmul(xp, wt:t()), ref_matmul(ref_xp, ref_wt), 1e-5, 'transposed right')
    local big = pmp.matmul(pmp.ones(64, 300), pmp.ones(300, 70))
    assert.equal(300, big:min():item())
    assert.equal(300, big:max():item())
  end)

  it('integer tensors: unary math promotes to float where torch does', function()
    local i = pmp.tensor({ -3, 4 }, { dtype = 'i64' })
    assert.equal('i64', i:abs().dtype)
    assert.are.same({ 3, 4 }, i:abs():totable())
    assert.equal('i64', (-i).dtype)
    assert.are.same({ 3, -4 }, (-i):totable())
    assert.equal('i64', i:relu().dtype)
    assert.equal('f32', i:exp().dtype)
    assert_close(i:exp(), { math.exp(-3), math.exp(4) }, 1e-6)
    assert_close(pmp.tensor({ 4 }, { dtype = 'i64' }):sqrt(), { 2 }, 0)
    assert.are.same({ 0, 3 }, i:clamp(0, 3):totable())
    assert.are.same({ 9, 16 }, i:pow(2):totable())
    assert.equal('f32', i:mean():to('f32').dtype)
  end)
end)

describe('elementwise math', function()
  local vals = { -2, -0.75, -0.25, 0, 0.5, 1, 1.75, 3 }
  local x = pmp.tensor(vals)

  it('unary functions match plain Lua', function()
    local pos = { 0.25, 0.5, 1, 2, 4 }
    local xp = pmp.tensor(pos)
    assert_close(x:exp(), ref_map(vals, math.exp), 1e-6, 'exp')
    assert_close(xp:log(), ref_map(pos, math.log), 1e-6, 'log')
    assert_close(xp:sqrt(), ref_map(pos, math.sqrt), 1e-6, 'sqrt')
    assert_close(xp:rsqrt(), ref_map(pos, function(v) return 1 / math.sqrt(v) end), 1e-6, 'rsqrt')
    assert_close(x:abs(), ref_map(vals, math.abs), 0, 'abs')
    assert_close(x:sin(), ref_map(vals, math.sin), 1e-6, 'sin')
    assert_close(x:cos(), ref_map(vals, math.cos), 1e-6, 'cos')
    assert_close(x:tanh(), ref_map(vals, function(v)
      return (math.exp(v) - math.exp(-v)) / (math.exp(v) + math.exp(-v))
    end), 1e-6, 'tanh')
    assert_close(x:sigmoid(), ref_map(vals, sigmoid), 1e-6, 'sigmoid')
    assert_close(x:relu(), ref_map(vals, function(v) return math.max(v, 0) end), 0, 'relu')
    assert_close(x:gelu(), ref_map(vals, function(v) return v * 0.5 * (1 + erf(v / math.sqrt(2))) end), 1e-6, 'gelu')
    assert_close(x:silu(), ref_map(vals, function(v) return v * sigmoid(v) end), 1e-6, 'silu')
    assert_close(-x, ref_map(vals, function(v) return -v end), 0, 'unary minus')
    assert_close(x:pow(2), ref_map(vals, function(v) return v * v end), 1e-6, 'pow 2')
    assert_close(xp:pow(0.5), ref_map(pos, math.sqrt), 1e-6, 'pow 0.5')
    assert_close(x ^ 3, ref_map(vals, function(v) return v ^ 3 end), 1e-6, '^ 3')
    assert_close(2 ^ x, ref_map(vals, function(v) return 2 ^ v end), 1e-6, '2 ^ x')
    assert_close(x:clamp(-1, 1), ref_map(vals, function(v) return math.min(math.max(v, -1), 1) end), 0, 'clamp')
    assert_close(x:clamp(0), ref_map(vals, function(v) return math.max(v, 0) end), 0, 'clamp min')
    assert_close(x:clamp(nil, 0.5), ref_map(vals, function(v) return math.min(v, 0.5) end), 0, 'clamp max')
    assert_close(x:double():exp(), ref_map(vals, math.exp), 1e-12, 'exp f64')
    assert_close(x:bf16():exp():float(), ref_map(vals, math.exp), 2 ^ -7, 'exp bf16')
    assert.equal('bf16', x:bf16():exp().dtype)
  end)

  local ops = {
    { 'add', function(p, q) return p + q end },
    { 'sub', function(p, q) return p - q end },
    { 'mul', function(p, q) return p * q end },
    { 'div', function(p, q) return p / q end },
    { 'pow', function(p, q) return p ^ q end },
  }

  it('binary ops broadcast ([2,1,3] with [4,1], [3] with [2,3], 0-d tensors)', function()
    local a_vals = rand_table({ 2, 1, 3 }, 0.5, 2)
    local b_vals = rand_table({ 4, 1 }, 0.5, 2)
    local c_vals = rand_table({ 3 }, 0.5, 2)
    local a, b, c = pmp.tensor(a_vals), pmp.tensor(b_vals), pmp.tensor(c_vals)
    local s = pmp.tensor(1.5)
    for _, op in ipairs(ops) do
      local name, fn = op[1], op[2]
      local r = a[name](a, b)
      assert.are.same({ 2, 4, 3 }, r.shape, name)
      assert_close(r, ref_binary(a_vals, b_vals, fn), 1e-5, name .. ' [2,1,3]x[4,1]')
      assert_close(b[name](b, a), ref_binary(b_vals, a_vals, fn), 1e-5, name .. ' [4,1]x[2,1,3]')
      assert_close(a[name](a, c), ref_binary(a_vals, c_vals, fn), 1e-5, name .. ' [2,1,3]x[3]')
      assert_close(a[name](a, s), ref_binary(a_vals, 1.5, fn), 1e-5, name .. ' with 0-d')
      assert_close(s[name](s, c), ref_binary(1.5, c_vals, fn), 1e-5, name .. ' 0-d with [3]')
    end
    local cmp = {
      { 'eq', function(p, q) return p == q end }, { 'ne', function(p, q) return p ~= q end },
      { 'lt', function(p, q) return p < q end }, { 'le', function(p, q) return p <= q end },
      { 'gt', function(p, q) return p > q end }, { 'ge', function(p, q) return p >= q end },
    }
    local p_vals = { { 1 }, { 2 }, { 3 } }
    local q_vals = { 1, 2, 3, 2.5 }
    local p, q = pmp.tensor(p_vals), pmp.tensor(q_vals)
    for _, op in ipairs(cmp) do
      local r = p[op[1]](p, q)
      assert.equal('bool', r.dtype, op[1])
      assert.are.same(ref_binary(p_vals, q_vals, op[2]), r:totable(), op[1])
      assert.are.same(ref_binary(q_vals, 2, op[2]), q[op[1]](q, 2):totable(), op[1] .. ' scalar')
    end
  end)

  it('operators take scalars on either side', function()
    local v = { 1, 2, 4 }
    local t = pmp.tensor(v)
    local function r(fn) return ref_map(v, fn) end
    assert_close(t + 1, r(function(e) return e + 1 end), 0, 't + 1')
    assert_close(1 + t, r(function(e) return 1 + e end), 0, '1 + t')
    assert_close(t - 1, r(function(e) return e - 1 end), 0, 't - 1')
    assert_close(2 - t, r(function(e) return 2 - e end), 0, '2 - t')
    assert_close(t * 3, r(function(e) return e * 3 end), 0, 't * 3')
    assert_close(3 * t, r(function(e) return 3 * e end), 0, '3 * t')
    assert_close(t / 2, r(function(e) return e / 2 end), 0, 't / 2')
    assert_close(2 / t, r(function(e) return 2 / e end), 0, '2 / t')
    assert_close(t + 0.5, r(function(e) return e + 0.5 end), 0, 't + 0.5')
    assert_close(t - t, { 0, 0, 0 }, 0, 't - t')
    assert_close(t + t, { 2, 4, 8 }, 0, 't + t')
    assert_close(t * t, { 1, 4, 16 }, 0, 't * t')
    assert_close(t / t, { 1, 1, 1 }, 0, 't / t')
    assert_close(-t + 1, { 0, -1, -3 }, 0, '-t + 1')
    assert_close(t:add(1), r(function(e) return e + 1 end), 0, 't:add(1)')
    assert_close(t:sub(pmp.tensor(1)), r(function(e) return e - 1 end), 0, 't:sub(0-d)')
    assert_close(pmp.tensor({ { 1 }, { 2 } }) - pmp.tensor({ 10, 20 }), { { -9, -19 }, { -8, -18 } }, 0, 'broadcast -')
  end)

  it('promotes types like torch', function()
    local i = pmp.tensor({ 7, -7 }, { dtype = 'i64' })
    local j = pmp.tensor({ 2, 2 }, { dtype = 'i64' })
    local f = pmp.tensor({ 0.5, 0.5 })
    local r = i:add(f)
    assert.equal('f32', r.dtype, 'i64+f32')
    assert_close(r, { 7.5, -6.5 }, 0)
    assert.equal('f32', f:add(i).dtype, 'f32+i64')
    r = i:add(j)
    assert.equal('i64', r.dtype, 'i64+i64')
    assert.are.same({ 9, -5 }, r:totable())
    assert.equal('i64', i:mul(j).dtype)
    assert.equal('i64', i:mul(3).dtype, 'i64*int scalar')
    assert.are.same({ 21, -21 }, i:mul(3):totable())
    r = i:div(j)
    assert.equal('f32', r.dtype, 'i64/i64 is true division')
    assert_close(r, { 3.5, -3.5 }, 0)
    assert.equal('f32', (i / 2).dtype)
    assert_close(i / 2, { 3.5, -3.5 }, 0)
    assert.equal('f32', i:mul(2.5).dtype, 'i64*float scalar')
    assert_close(i:mul(2.5), { 17.5, -17.5 }, 0)
    local b = pmp.tensor({ true, false })
    r = b * 1
    assert.equal('i64', r.dtype, 'bool*1')
    assert.are.same({ 1, 0 }, r:totable())
    assert.equal('i64', b:add(b:long()).dtype)
    r = f:add(pmp.tensor({ 1, 2 }):bf16())
    assert.equal('f32', r.dtype, 'f32+bf16')
    assert_close(r, { 1.5, 2.5 }, 0)
    r = pmp.tensor({ 1, 2 }):bf16():add(pmp.tensor({ 0.5, 0.25 }):to('f16'))
    assert.equal('f32', r.dtype, 'bf16+f16')
    assert_close(r, { 1.5, 2.25 }, 0)
    assert.equal('f64', pmp.tensor({ 1 }, { dtype = 'f64' }):add(f:narrow(1, 1, 1)).dtype, 'f64+f32')
    assert.equal('bf16', pmp.tensor({ 1 }):bf16():mul(2.5).dtype, 'bf16*scalar stays bf16')
    assert.equal('bf16', pmp.tensor({ 1 }):bf16():add(pmp.tensor({ 1 }, { dtype = 'i64' })).dtype, 'bf16+i64')
    assert.equal('i64', pmp.tensor({ 1 }, { dtype = 'i32' }):add(pmp.tensor({ 1 }, { dtype = 'i64' })).dtype)
    assert.equal('i32', pmp.tensor({ 1 }, { dtype = 'i32' }):mul(2).dtype)
    assert.equal('f16', pmp.tensor({ 1 }):to('f16'):add(pmp.tensor({ 1 }):to('f16')).dtype)
  end)

  it('bool with bool stays bool (add is or, mul is and)', function()
    local p = pmp.tensor({ true, true, false, false })
    local q = pmp.tensor({ true, false, true, false })
    local s = p:add(q)
    assert.equal('bool', s.dtype)
    assert.are.same({ true, true, true, false }, s:totable())
    local m = p:mul(q)
    assert.equal('bool', m.dtype)
    assert.are.same({ true, false, false, false }, m:totable())
  end)

  it('where selects with broadcasting and scalars', function()
    local cond = pmp.tensor({ { true, false, true }, { false, false, true } })
    local a = pmp.tensor({ { 1, 2, 3 }, { 4, 5, 6 } })
    local b = pmp.tensor({ -1, -2, -3 })
    assert_close(pmp.where(cond, a, b), { { 1, -2, 3 }, { -1, -2, 6 } }, 0)
    assert_close(pmp.where(cond, a, 0), { { 1, 0, 3 }, { 0, 0, 6 } }, 0)
    assert_close(pmp.where(cond, 9, b), { { 9, -2, 9 }, { -1, -2, 9 } }, 0)
    assert_close(pmp.where(pmp.tensor({ { true }, { false } }), a, b), { { 1, 2, 3 }, { -1, -2, -3 } }, 0)
    assert_close(pmp.where(a:gt(3), a, a:neg()), { { -1, -2, -3 }, { 4, 5, 6 } }, 0)
  end)

  it('bf16 arithmetic rounds once, from the f32 result, ties to even', function()
    -- 1 + 3/256 lies halfway between bf16 neighbours 1 + 2/256 and 1 + 4/256: the even one wins
    local x = pmp.tensor({ 1, 1, 1, -3 }):bf16()
    local y = pmp.tensor({ 2 ^ -8, 3 * 2 ^ -8, 5 * 2 ^ -8, 0.5 }):bf16()
    assert_close((x + y):double(), { 1, 1 + 4 / 256, 1 + 4 / 256, -2.5 }, 0)
    assert_close((x * y):double(), { 2 ^ -8, 3 * 2 ^ -8, 5 * 2 ^ -8, -1.5 }, 0)
    assert_close(x:maximum(y):double(), { 1, 1, 1, 0.5 }, 0)
    -- 2049 elements: whole vectors and a tail, with a scalar operand
    local big = pmp.full({ 2049 }, 1, { dtype = 'bf16' }) + 3 * 2 ^ -8
    assert.equal('bf16', big.dtype)
    assert.equal(2049, big:eq(1 + 4 / 256):sum():item())
  end)
end)

describe('reductions', function()
  local vals = { { { 1, 5, 2 }, { 7, 0, 3 } }, { { -4, 6, 5.5 }, { 2, 2.5, -8 } } }   -- [2,2,3], no ties
  local t = pmp.tensor(vals)

  local function ref_reduce(x, dim, fn, init)
    -- reduce the nested table x over 1-based dim with fn(acc, v, position)
    local shape = shape_of_table(x)
    local out_shape = {}
    for k = 1, #shape do if k ~= dim then out_shape[#out_shape + 1] = shape[k] end end
    local flat = {}
    each_index(out_shape, function(idx)
      local acc = init
      local full = {}
      for k = 1, #shape do
        if k < dim then full[k] = idx[k] elseif k > dim then full[k] = idx[k - 1] end
      end
      for p = 1, shape[dim] do
        full[dim] = p
        acc = fn(acc, at(x, full), p)
      end
      flat[#flat + 1] = acc
    end)
    return nest(flat, out_shape), out_shape, flat
  end

  it('sum and mean over all, over a dim, negative dims, keepdim, several dims', function()
    local total = 0
    for _, v in ipairs(flatten(vals)) do total = total + v end
    local s = t:sum()
    assert.are.same({}, s.shape)
    assert.equal(total, s:item())
    assert_close(t:mean(), total / 12, 1e-6)
    for dim = 1, 3 do
      local ref = ref_reduce(vals, dim, function(a, v) return a + v end, 0)
      assert_close(t:sum(dim), ref, 0, 'sum ' .. dim)
      assert_close(t:sum(dim - 4), ref, 0, 'sum ' .. (dim - 4))
      assert_close(t:mean(dim), ref_map(ref, function(v) return v / t.shape[dim] end), 1e-6, 'mean ' .. dim)
      local k = t:sum(dim, true)
      local kshape = t.shape
      kshape[dim] = 1
      assert.are.same(kshape, k.shape, 'keepdim ' .. dim)
      assert.are.same(kshape, t:mean(dim, true).shape, 'mean keepdim ' .. dim)
    end
    assert.are.same({ 2, 1, 1 }, t:sum({ 2, 3 }, true).shape)
    assert_close(t:sum({ 2, -1 }), { 1 + 5 + 2 + 7 + 0 + 3, -4 + 6 + 5.5 + 2 + 2.5 - 8 }, 0, 'sum over dims 2,3')
    assert.are.same({ 2, 2, 1 }, t:sum(-1, { keepdim = true }).shape)
    -- integer sums stay integers, bool sums count
    local i = pmp.tensor({ { 1, 2 }, { 3, 4 } }, { dtype = 'i64' })
    assert.equal('i64', i:sum().dtype)
    assert.equal(10, i:sum():item())
    assert.equal(2, pmp.tensor({ true, false, true }):sum():item())
    assert_close(i:mean(), 2.5, 0)
  end)

  it('bf16 reductions accumulate in f32', function()
    -- 1000 ones: a bf16 accumulator would stall at 256
    assert.equal(1000, pmp.ones(1000, { dtype = 'bf16' }):sum():float():item())
    assert.equal(1, pmp.ones(1000, { dtype = 'bf16' }):mean():float():item())
    assert.equal(1000, pmp.ones(1000, { dtype = 'f16' }):sum():float():item())
  end)

  it('max/min return values and 0-based indices; argmax over all is flat', function()
    for dim = 1, 3 do
      local function best(better)
        local _, out_shape, flat = ref_reduce(vals, dim, function(acc, v, p)
          if p == 1 or better(v, acc.v) then return { v = v, i = p - 1 } end
          return acc
        end, nil)
        local values, indices = {}, {}
        for k, pair in ipairs(flat) do values[k], indices[k] = pair.v, pair.i end
        return values, indices, out_shape
      end
      local max_v, max_i, out_shape = best(function(a, b) return a > b end)
      local min_v, min_i = best(function(a, b) return a < b end)
      local v, idx = t:max(dim)
      assert.are.same(out_shape, v.shape, 'max shape ' .. dim)
      assert.are.same(out_shape, idx.shape, 'max index shape ' .. dim)
      assert.equal('i64', idx.dtype)
      assert.are.same(max_v, flatten(v:totable()), 'max values ' .. dim)
      assert.are.same(max_i, flatten(idx:totable()), 'max indices ' .. dim)
      local mn, mi = t:min(dim - 4, true)
      local kshape = t.shape
      kshape[dim] = 1
      assert.are.same(kshape, mn.shape, 'min keepdim shape ' .. dim)
      assert.are.same(kshape, mi.shape, 'min keepdim index shape ' .. dim)
      assert.are.same(min_v, flatten(mn:totable()), 'min values ' .. dim)
      assert.are.same(min_i, flatten(mi:totable()), 'min indices ' .. dim)
      assert.are.same(max_i, flatten(t:argmax(dim):totable()), 'argmax ' .. dim)
      assert.are.same(min_i, flatten(t:argmin(-4 + dim):totable()), 'argmin ' .. dim)
    end
    -- explicit small cases
    local m = pmp.tensor({ { 1, 5, 2 }, { 7, 4, 0 } })
    local v, i = m:max(-1, true)
    assert.are.same({ { 5 }, { 7 } }, v:totable())
    assert.are.same({ { 1 }, { 0 } }, i:totable())
    v, i = m:min(1)
    assert.are.same({ 1, 4, 0 }, v:totable())
    assert.are.same({ 0, 1, 1 }, i:totable())
    assert.equal(7, m:max():item())
    assert.equal(0, m:min():item())
    assert.equal(3, m:argmax():item())
    assert.equal('i64', m:argmax().dtype)
    assert.equal(5, m:argmin():item())
    assert.are.same({ 1, 0 }, m:argmax(2):totable())
    assert.are.same({ { 1, 0, 0 } }, m:argmax(1, true):totable())
    -- flat index over a 3-D tensor: max 7 sits at [1][2][1] -> 0*6 + 1*3 + 0 = 3
    assert.equal(3, t:argmax():item())
    assert.equal(11, t:argmin():item())
    assert.equal(5, pmp.tensor({ 1, 5 }):bf16():max():float():item())
  end)

  it('var is unbiased by default; norm is the 2-norm', function()
    local v = { 1, 2, 3, 4, 10 }
    local mean = (1 + 2 + 3 + 4 + 10) / 5
    local ss = 0
    for _, x in ipairs(v) do ss = ss + (x - mean) ^ 2 end
    local x = pmp.tensor(v)
    assert_close(x:var(), ss / 4, 1e-6, 'unbiased')
    assert_close(x:var(nil, { unbiased = false }), ss / 5, 1e-6, 'biased')
    local m = pmp.tensor({ { 1, 2, 3 }, { 2, 4, 9 } })
    assert_close(m:var(2), { 1, 13 }, 1e-6, 'var over dim 2')
    assert_close(m:var(1), { 0.5, 2, 18 }, 1e-6, 'var over dim 1')
    assert.are.same({ 2, 1 }, m:var(-1, { keepdim = true }).shape)
    assert_close(pmp.tensor({ 3, 4 }):norm(), 5, 1e-6)
    assert_close(m:norm(), math.sqrt(1 + 4 + 9 + 4 + 16 + 81), 1e-6)
    assert_close(pmp.tensor({ 1, 2 }, { dtype = 'i64' }):var(), 0.5, 1e-6, 'integer var')
  end)
end)

describe('matmul', function()
  local function check(ashape, bshape, expected_shape)
    local av, bv = rand_table(ashape), rand_table(bshape)
    local r = pmp.matmul(pmp.tensor(av), pmp.tensor(bv))
    assert.are.same(expected_shape, r.shape,
      'matmul ' .. fmt_shape(ashape) .. ' x ' .. fmt_shape(bshape))
    assert_close(r, ref_matmul(av, bv), 1e-5, 'matmul ' .. fmt_shape(ashape) .. ' x ' .. fmt_shape(bshape))
    local m = pmp.tensor(av):matmul(pmp.tensor(bv))
    assert.are.same(r:totable(), m:totable())
  end

  it('1-D, 2-D, 3-D and 4-D operands with batch broadcasting', function()
    check({ 4 }, { 4 }, {})
    check({ 3 }, { 3, 5 }, { 5 })
    check({ 2, 3 }, { 3 }, { 2 })
    check({ 2, 3 }, { 3, 4 }, { 2, 4 })
    check({ 1, 1 }, { 1, 1 }, { 1, 1 })
    check({ 3, 2, 4 }, { 3, 4, 5 }, { 3, 2, 5 })
    check({ 3, 2, 4 }, { 4, 5 }, { 3, 2, 5 })
    check({ 2, 4 }, { 3, 4, 5 }, { 3, 2, 5 })
    check({ 2, 3, 4 }, { 4 }, { 2, 3 })
    check({ 3 }, { 2, 3, 4 }, { 2, 4 })
    check({ 2, 1, 3, 4 }, { 5, 4, 2 }, { 2, 5, 3, 2 })
    check({ 2, 3, 2, 4 }, { 2, 3, 4, 3 }, { 2, 3, 2, 3 })
    check({ 1, 3, 2, 4 }, { 2, 1, 4, 3 }, { 2, 3, 2, 3 })
  end)

  it('keeps dtypes and accumulates bf16 in f32', function()
    local a = pmp.tensor({ { 1, 2 }, { 3, 4 } }, { dtype = 'i64' })
    local r = pmp.matmul(a, a)
    assert.equal('i64', r.dtype)
    assert.are.same({ { 7, 10 }, { 15, 22 } }, r:totable())
    local d = pmp.matmul(a:double(), a:double())
    assert.equal('f64', d.dtype)
    assert_close(d, { { 7, 10 }, { 15, 22 } }, 0)
    local b = pmp.matmul(pmp.ones(1, 512, { dtype = 'bf16' }), pmp.ones(512, 1, { dtype = 'bf16' }))
    assert.equal('bf16', b.dtype)
    assert.equal(512, b:float():item())
    -- f64 keeps double precision
    local e = pmp.matmul(pmp.tensor({ { 1 + 2 ^ -40 } }, { dtype = 'f64' }), pmp.tensor({ { 1 } }, { dtype = 'f64' }))
    assert.equal(1 + 2 ^ -40, e:item())
  end)

  -- f32/bf16 run on oneDNN (bf16 on AMX tiles where the CPU has them) and f64 on BLIS: the f64
  -- product of the same (rounded) values is an independent reference, over layouts read in place
  -- (transposes, collapsible batches) and those handed over per batch (permuted batch dims, broadcast
  -- right operand). The AMX kernel reads whole 32-row blocks of a in place and packs the rest, b in
  -- groups of columns and a in chunks of rows of bounded size: the shapes below take each way, with
  -- rows, columns and k that are and are not whole tiles, several column groups (k = 1024, 300
  -- columns), several row chunks (k = 4096, 1100 rows of a transposed a) and several pieces of b
  -- (k = 4096, 1100 columns).
  it('f32 and bf16 agree with f64 on large, transposed, permuted and broadcast operands', function()
    local function max_rel_err(got, a, b)
      local want = pmp.matmul(a:double(), b:double())
      local scale = want:abs():max():item()
      return (got:double() - want):abs():max():item() / scale
    end
    local cases = {
      { pmp.randn(70, 130), pmp.randn(130, 90) },
      { pmp.randn(130, 70):t(), pmp.randn(90, 130):t() },
      { pmp.randn(3, 40, 33), pmp.randn(3, 33, 50) },
      { pmp.randn(40, 3, 33):transpose(1, 2), pmp.randn(3, 50, 33):transpose(2, 3) },
      { pmp.randn(2, 3, 17, 9):permute(2, 1, 3, 4), pmp.randn(9, 21) },
      { pmp.randn(4, 17, 9), pmp.randn(1, 9, 21):expand(4, 9, 21) },
      { pmp.randn(64, 96), pmp.randn(96, 80) },
      { pmp.randn(96, 64):t(), pmp.randn(80, 96):t() },
      { pmp.randn(33, 1024), pmp.randn(1024, 47) },
      { pmp.randn(64, 1024), pmp.randn(47, 1024):t() },
      { pmp.randn(5, 40), pmp.randn(40, 3) },
      { pmp.randn(2, 64, 160), pmp.randn(2, 160, 48) },
      { pmp.randn(64, 1024), pmp.randn(300, 1024):t() },
      { pmp.randn(4096, 1100):t(), pmp.randn(4096, 70) },
      { pmp.randn(40, 4096), pmp.randn(4096, 1100) },
      -- 2-D f32 products of 256 rows or more go to oneDNN's sgemm: each transpose combination
      { pmp.randn(300, 40), pmp.randn(40, 50) },
      { pmp.randn(260, 33), pmp.randn(50, 33):t() },
      { pmp.randn(33, 270):t(), pmp.randn(33, 50) },
      { pmp.randn(40, 300):t(), pmp.randn(50, 40):t() },
    }
    for i, c in ipairs(cases) do
      local a, b = c[1], c[2]
      assert.is_true(max_rel_err(pmp.matmul(a, b), a, b) < 1e-5, 'f32 case ' .. i)
      local ab, bb = a:to('bf16'), b:to('bf16')
      local r = pmp.matmul(ab, bb)
      assert.equal('bf16', r.dtype)
      -- inputs are exact in f64; the only error is the f32 accumulation and one bf16 rounding
      assert.is_true(max_rel_err(r, ab, bb) < 2 ^ -8, 'bf16 case ' .. i)
      assert.are.same(r:float():totable(), pmp.matmul(ab, bb):float():totable(), 'repeatable, case ' .. i)
    end
  end)

  -- Up to 8 rows (decoding) f32, bf16 and f16 run on the few-row kernels of core/cpu/cpu_gemv.c: a
  -- weight W [m, k] used as W:t() or a right operand [k, m] stored by rows, with k not a whole number
  -- of vectors (37) and m not a whole number of output blocks (67, 200); a strided left operand is
  -- converted, a right operand stored neither way falls back to the GEMM paths, and 9 rows go there too.
  -- The reference is the f64 product (BLIS) of the same rounded values.
  -- Each kernel the CPU runs is tried: the widest, then those PMP_GEMV_KERNEL narrows it to.
  local ffi = require 'ffi'
  pcall(ffi.cdef, 'int setenv(const char *name, const char *value, int overwrite); int unsetenv(const char *name);')
  local function each_kernel(fn)
    for _, kernel in ipairs({ 'widest', 'avx512', 'avx2', 'scalar' }) do
      if kernel ~= 'widest' then ffi.C.setenv('PMP_GEMV_KERNEL', kernel, 1) end
      local ok, err = pcall(fn, kernel)
      ffi.C.unsetenv('PMP_GEMV_KERNEL')
      if not ok then error(err, 0) end
    end
  end

  it('few-row products agree with f64 for every row count, layout and dtype', function()
    local function max_rel_err(got, a, b)
      local want = pmp.matmul(a:double(), b:double())
      return (got:double() - want):abs():max():item() / want:abs():max():item()
    end
    local tolerance = { f32 = 1e-5, bf16 = 2 ^ -8, f16 = 2 ^ -10 }
    pmp.manual_seed(7)
    each_kernel(function(kernel)
      for _, dtype in ipairs({ 'f32', 'bf16', 'f16' }) do
        for rows = 1, 9 do
          for _, shape in ipairs({ { 37, 67 }, { 64, 200 } }) do
            local k, m = shape[1], shape[2]
            local a = pmp.randn(rows, k):to(dtype)
            local cases = {
              { a, pmp.randn(m, k):to(dtype):t(), 'W:t()' },
              { a, pmp.randn(k, m):to(dtype), 'by rows' },
              { pmp.randn(k, rows):to(dtype):t(), pmp.randn(m, k):to(dtype):t(), 'strided a' },
              { a, pmp.randn(k, m, 2):to(dtype):select(3, 1), 'strided b' },
            }
            for _, c in ipairs(cases) do
              local r = pmp.matmul(c[1], c[2])
              local what = string.format('%s kernel, %s rows %d k %d m %d %s', kernel, dtype, rows, k, m, c[3])
              assert.equal(dtype, r.dtype, what)
              assert.are.same({ rows, m }, r.shape, what)
              assert.is_true(max_rel_err(r, c[1], c[2]) < tolerance[dtype], what)
            end
          end
        end
      end
    end)
  end)

  it('few-row products give the same bits on 1 and 2 threads', function()
    local threads = pmp.num_threads()
    pmp.manual_seed(8)
    each_kernel(function(kernel)
      for _, dtype in ipairs({ 'f32', 'bf16', 'f16' }) do
        for _, rows in ipairs({ 1, 3, 8 }) do
          local a, w, b = pmp.randn(rows, 301):to(dtype), pmp.randn(1000, 301):to(dtype), pmp.randn(301, 1000):to(dtype)
          pmp.set_num_threads(1)
          local one_wt, one_b = pmp.matmul(a, w:t()):float():totable(), pmp.matmul(a, b):float():totable()
          pmp.set_num_threads(2)
          local two_wt, two_b = pmp.matmul(a, w:t()):float():totable(), pmp.matmul(a, b):float():totable()
          pmp.set_num_threads(threads)
          assert.are.same(one_wt, two_wt, kernel .. ' kernel, ' .. dtype .. ' W:t() rows ' .. rows)
          assert.are.same(one_b, two_b, kernel .. ' kernel, ' .. dtype .. ' by rows, rows ' .. rows)
        end
      end
    end)
  end)
end)

describe('joining, splitting and indexing', function()
  it('cat and stack', function()
    local a = pmp.tensor({ { 1, 2 }, { 3, 4 } })
    local b = pmp.tensor({ { 5, 6 } })
    assert.are.same({ { 1, 2 }, { 3, 4 }, { 5, 6 } }, pmp.cat({ a, b }):totable())
    assert.are.same({ { 1, 2 }, { 3, 4 }, { 5, 6 } }, pmp.cat({ a, b }, 1):totable())
    assert.are.same({ { 1, 2, 9 }, { 3, 4, 9 } }, pmp.cat({ a, pmp.full({ 2, 1 }, 9) }, -1):totable())
    assert.are.same({ 3, 2 }, pmp.cat({ a, b }, -2).shape)
    assert.are.same({ 1, 2, 3 }, pmp.cat({ pmp.tensor({ 1 }), pmp.tensor({ 2, 3 }) }):totable())
    local s = pmp.stack({ pmp.tensor({ 1, 2 }), pmp.tensor({ 3, 4 }), pmp.tensor({ 5, 6 }) })
    assert.are.same({ { 1, 2 }, { 3, 4 }, { 5, 6 } }, s:totable())
    s = pmp.stack({ pmp.tensor({ 1, 2 }), pmp.tensor({ 3, 4 }) }, 2)
    assert.are.same({ { 1, 3 }, { 2, 4 } }, s:totable())
    assert.are.same({ 2, 2, 2 }, pmp.stack({ a, a }, -1).shape)
    assert.are.same({ { 1, 1 }, { 2, 2 }, { 3, 3 }, { 4, 4 } }, pmp.stack({ a, a }, -1):view(4, 2):totable())
    local i = pmp.cat({ pmp.tensor({ 1 }, { dtype = 'i64' }), pmp.tensor({ 2 }, { dtype = 'i64' }) })
    assert.equal('i64', i.dtype)
  end)

  it('chunk and split', function()
    local t = pmp.arange(7)
    local c = t:chunk(3)
    assert.equal(3, #c)
    assert.are.same({ 0, 1, 2 }, c[1]:totable())
    assert.are.same({ 3, 4, 5 }, c[2]:totable())
    assert.are.same({ 6 }, c[3]:totable())
    local s = t:split(2)
    assert.equal(4, #s)
    assert.are.same({ 6 }, s[4]:totable())
    s = t:split({ 2, 5 })
    assert.are.same({ 0, 1 }, s[1]:totable())
    assert.are.same({ 2, 3, 4, 5, 6 }, s[2]:totable())
    local m = pmp.arange(12):view(3, 4)
    local cols = m:chunk(2, 2)
    assert.are.same({ { 0, 1 }, { 4, 5 }, { 8, 9 } }, cols[1]:totable())
    assert.are.same({ { 2, 3 }, { 6, 7 }, { 10, 11 } }, cols[2]:totable())
    local rows = m:split({ 1, 2 }, 1)
    assert.are.same({ { 0, 1, 2, 3 } }, rows[1]:totable())
    assert.are.same({ 2, 4 }, rows[2].shape)
    assert.are.same({ { 4, 5, 6, 7 }, { 8, 9, 10, 11 } }, rows[2]:totable())
    assert.are.same({ 3, 1 }, m:split(3, -1)[2].shape)
  end)

  it('narrow with 1-based and negative starts', function()
    local t = pmp.arange(10, 16)
    assert.are.same({ 11, 12 }, t:narrow(1, 2, 2):totable())
    assert.are.same({ 14, 15 }, t:narrow(1, -2, 2):totable())
    assert.are.same({ 10 }, t:narrow(-1, 1, 1):totable())
    assert.are.same({}, t:narrow(1, 3, 0):totable())
    local m = pmp.arange(12):view(3, 4)
    assert.are.same({ { 1, 2 }, { 5, 6 }, { 9, 10 } }, m:narrow(2, 2, 2):totable())
  end)

  it('gather picks along a dim with 0-based indices', function()
    local vals = { { 1, 2, 3 }, { 4, 5, 6 } }
    local t = pmp.tensor(vals)
    local idx_vals = { { 2, 0 }, { 1, 1 } }
    local g = t:gather(2, pmp.tensor(idx_vals, { dtype = 'i64' }))
    local ref = {}
    for i = 1, 2 do
      ref[i] = {}
      for j = 1, 2 do ref[i][j] = vals[i][idx_vals[i][j] + 1] end
    end
    assert.are.same(ref, g:totable())
    local g1 = t:gather(1, pmp.tensor({ { 1, 0, 1 } }, { dtype = 'i64' }))
    assert.are.same({ { 4, 2, 6 } }, g1:totable())
    local g2 = t:gather(-1, pmp.tensor({ { 0 }, { 2 } }, { dtype = 'i64' }))
    assert.are.same({ { 1 }, { 6 } }, g2:totable())
    local i32 = t:gather(2, pmp.tensor({ { 1 }, { 2 } }, { dtype = 'i32' }))
    assert.are.same({ { 2 }, { 6 } }, i32:totable())
  end)

  it('index_select picks slices with 0-based indices', function()
    local t = pmp.tensor({ { 1, 2, 3 }, { 4, 5, 6 } })
    assert.are.same({ { 4, 5, 6 }, { 1, 2, 3 }, { 4, 5, 6 } },
      t:index_select(1, pmp.tensor({ 1, 0, 1 }, { dtype = 'i64' })):totable())
    assert.are.same({ { 3, 1 }, { 6, 4 } }, t:index_select(2, pmp.tensor({ 2, 0 }, { dtype = 'i64' })):totable())
    assert.are.same({ { 2 }, { 5 } }, t:index_select(-1, pmp.tensor({ 1 }, { dtype = 'i64' })):totable())
  end)

  it('masked_fill with broadcast masks', function()
    local t = pmp.tensor({ { 1, 2 }, { 3, 4 } })
    assert.are.same({ { -1, 2 }, { 3, -1 } },
      t:masked_fill(pmp.tensor({ { true, false }, { false, true } }), -1):totable())
    assert.are.same({ { 0, 2 }, { 0, 4 } }, t:masked_fill(pmp.tensor({ true, false }), 0):totable())
    assert.are.same({ { 1, 2 }, { 9, 9 } }, t:masked_fill(pmp.tensor({ { false }, { true } }), 9):totable())
    local inf = t:masked_fill(t:gt(2), -math.huge):totable()
    assert.are.same({ { 1, 2 }, { -math.huge, -math.huge } }, inf)
    assert.are.same({ { 1, 2 }, { 3, 4 } }, t:totable(), 'masked_fill is out of place')
  end)

  it('tril and triu with diagonals and batches', function()
    local function ref(n, m, k, lower)
      local out = {}
      for i = 1, n do
        out[i] = {}
        for j = 1, m do
          local keep
          if lower then keep = j - i <= k else keep = j - i >= k end
          out[i][j] = keep and (i * 10 + j) or 0
        end
      end
      return out
    end
    local vals = {}
    for i = 1, 3 do
      vals[i] = {}
      for j = 1, 4 do vals[i][j] = i * 10 + j end
    end
    local t = pmp.tensor(vals)
    for _, k in ipairs({ -2, -1, 0, 1, 2 }) do
      assert.are.same(ref(3, 4, k, true), t:tril(k):totable(), 'tril ' .. k)
      assert.are.same(ref(3, 4, k, false), t:triu(k):totable(), 'triu ' .. k)
    end
    assert.are.same(ref(3, 4, 0, true), t:tril():totable())
    local b = pmp.stack({ t, t })
    local bt = b:triu(1):totable()
    assert.are.same(ref(3, 4, 1, false), bt[1])
    assert.are.same(ref(3, 4, 1, false), bt[2])
  end)
end)

describe('nn.functional', function()
  local F = pmp.nn.functional

  it('is also pmp.F', function() assert.equal(F, pmp.F) end)

  it('softmax and log_softmax match exp/sum', function()
    local vals = { { 1, 2, 3, 4 }, { -1, 0, 0, 100 }, { 0.5, 0.5, 0.5, 0.5 } }
    local s = F.softmax(pmp.tensor(vals), -1)
    local ls = F.log_softmax(pmp.tensor(vals), -1)
    for i, row in ipairs(vals) do
      local ref, lse = lua_softmax_row(row)
      assert_close(s:totable()[i], ref, 1e-6, 'softmax row ' .. i)
      local sum = 0
      for _, v in ipairs(s:totable()[i]) do sum = sum + v end
      assert.is_true(math.abs(sum - 1) < 1e-6, 'row sums to ' .. sum)
      assert_close(ls:totable()[i], ref_map(row, function(v) return v - lse end), 1e-6, 'log_softmax row ' .. i)
    end
    -- over dim 1: columns sum to 1
    local c = F.softmax(pmp.tensor({ { 1, 2 }, { 3, 5 } }), 1):totable()
    assert_close(c[1][1] + c[2][1], 1, 1e-6)
    assert_close(c[1][1], 1 / (1 + math.exp(2)), 1e-6)
    assert_close(c[2][2], 1 / (1 + math.exp(-3)), 1e-6)
    -- default dim is the last; 3-D input
    local x3 = rand_table({ 2, 3, 4 })
    local s3 = F.softmax(pmp.tensor(x3)):totable()
    for i = 1, 2 do
      for j = 1, 3 do assert_close(s3[i][j], (lua_softmax_row(x3[i][j])), 1e-6) end
    end
    -- large logits do not overflow
    assert_close(F.softmax(pmp.tensor({ 1000, 1000 })), { 0.5, 0.5 }, 1e-6)
    assert_close(pmp.tensor({ 1, 2 }):bf16():softmax(1):float(), { sigmoid(-1), sigmoid(1) }, 2 ^ -8)
  end)

  it('cross_entropy with ignore_index and all reductions', function()
    local logits = { { 1, 2, 3 }, { 1, 1, 1 }, { 5, -2, 0.5 }, { 0, 0, 4 } }
    local targets = { 2, -100, 0, 1 }
    local per_row, sum, count = {}, 0, 0
    for i, row in ipairs(logits) do
      local _, lse = lua_softmax_row(row)
      if targets[i] == -100 then
        per_row[i] = 0
      else
        per_row[i] = lse - row[targets[i] + 1]
        sum = sum + per_row[i]
        count = count + 1
      end
    end
    local l, t = pmp.tensor(logits), pmp.tensor(targets, { dtype = 'i64' })
    assert_close(F.cross_entropy(l, t), sum / count, 1e-6, 'mean')
    assert_close(F.cross_entropy(l, t, { reduction = 'mean' }), sum / count, 1e-6, 'mean explicit')
    assert_close(F.cross_entropy(l, t, { reduction = 'sum' }), sum, 1e-6, 'sum')
    local none = F.cross_entropy(l, t, { reduction = 'none' })
    assert.are.same({ 4 }, none.shape)
    assert_close(none, per_row, 1e-6, 'none')
    -- a custom ignore_index
    local t2 = pmp.tensor({ 2, 1, 0, 7 }, { dtype = 'i64' })
    local _, lse2 = lua_softmax_row(logits[2])
    local s2 = per_row[1] + per_row[3] + (lse2 - 1)
    assert_close(F.cross_entropy(l, t2, { ignore_index = 7 }), s2 / 3, 1e-6, 'ignore_index=7')
    -- [B, T, C] logits with [B, T] targets
    local l3 = pmp.tensor({ logits[1], logits[3] }):view(1, 2, 3)
    local r3 = F.cross_entropy(l3, pmp.tensor({ { 2, 0 } }, { dtype = 'i64' }), { reduction = 'none' })
    assert.are.same({ 1, 2 }, r3.shape)
    assert_close(r3, { { per_row[1], per_row[3] } }, 1e-6)
    -- uniform logits give log(C)
    assert_close(F.cross_entropy(pmp.zeros(3, 5), pmp.tensor({ 0, 4, 2 }, { dtype = 'i64' })), math.log(5), 1e-6)
  end)

  it('embedding picks rows by 0-based ids', function()
    local w = pmp.tensor({ { 1, 2 }, { 3, 4 }, { 5, 6 } })
    local e = F.embedding(pmp.tensor({ { 2, 0 }, { 1, 1 } }, { dtype = 'i64' }), w)
    assert.are.same({ 2, 2, 2 }, e.shape)
    assert.are.same({ { { 5, 6 }, { 1, 2 } }, { { 3, 4 }, { 3, 4 } } }, e:totable())
    assert.are.same({ { 3, 4 } }, F.embedding(pmp.tensor({ 1 }, { dtype = 'i64' }), w):totable())
  end)

  it('linear is x W^T + b', function()
    local xv, wv, bv = rand_table({ 2, 3, 4 }), rand_table({ 5, 4 }), rand_table({ 5 })
    local wt = {}
    for i = 1, 4 do
      wt[i] = {}
      for j = 1, 5 do wt[i][j] = wv[j][i] end
    end
    local ref = ref_binary(ref_matmul(xv, wt), bv, function(p, q) return p + q end)
    local y = F.linear(pmp.tensor(xv), pmp.tensor(wv), pmp.tensor(bv))
    assert.are.same({ 2, 3, 5 }, y.shape)
    assert_close(y, ref, 1e-5)
    assert_close(F.linear(pmp.tensor(xv), pmp.tensor(wv)), ref_matmul(xv, wt), 1e-5, 'no bias')
  end)

  it('rms_norm and layer_norm match plain Lua', function()
    local xv = { { 3, 4, 0, -1 }, { 0.001, -0.002, 0.0015, 0.0005 } }
    local wv = { 1, 0.5, 2, -1 }
    local bv = { 0.1, 0, -0.1, 0.2 }
    local function rms(row, eps)
      local ms = 0
      for _, v in ipairs(row) do ms = ms + v * v end
      ms = ms / #row
      local out = {}
      for k, v in ipairs(row) do out[k] = v / math.sqrt(ms + eps) * wv[k] end
      return out
    end
    local function ln(row, eps)
      local mean, var = 0, 0
      for _, v in ipairs(row) do mean = mean + v end
      mean = mean / #row
      for _, v in ipairs(row) do var = var + (v - mean) ^ 2 end
      var = var / #row
      local out = {}
      for k, v in ipairs(row) do out[k] = (v - mean) / math.sqrt(var + eps) * wv[k] + bv[k] end
      return out
    end
    local x, w, b = pmp.tensor(xv), pmp.tensor(wv), pmp.tensor(bv)
    for _, eps in ipairs({ 1e-6, 1e-5 }) do
      assert_close(F.rms_norm(x, w, eps), { rms(xv[1], eps), rms(xv[2], eps) }, 1e-5, 'rms_norm eps ' .. eps)
      assert_close(F.layer_norm(x, w, b, eps), { ln(xv[1], eps), ln(xv[2], eps) }, 1e-5, 'layer_norm eps ' .. eps)
    end
    -- bf16 input normalizes in f32 and returns bf16
    local y = F.rms_norm(x:bf16(), w:bf16(), 1e-6)
    assert.equal('bf16', y.dtype)
    assert_close(y:float():totable()[1], rms(xv[1], 1e-6), 2 ^ -7)
  end)

  it('dropout scales kept values by 1/(1-p) and is the identity when not training', function()
    pmp.manual_seed(5)
    local x = pmp.full({ 20000 }, 3)
    local y = F.dropout(x, 0.25, true)
    local zeros, kept = 0, 0
    for _, v in ipairs(y:totable()) do
      if v == 0 then zeros = zeros + 1
      else
        assert.is_true(math.abs(v - 4) < 1e-6, 'kept value ' .. v)
        kept = kept + 1
      end
    end
    assert.is_true(math.abs(zeros / 20000 - 0.25) < 0.02, 'dropped fraction ' .. zeros / 20000)
    assert.are.same(x:totable(), F.dropout(x, 0.25, false):totable())
    assert.are.same(x:totable(), F.dropout(x, 0, true):totable())
    assert.are.same({ 0, 0 }, F.dropout(pmp.ones(2), 1, true):totable())
  end)

  it('u16 holds 0..65535 and promotes like an unsigned integer between u8 and i32', function()
    local t = pmp.tensor({ 0, 1, 65535 }, { dtype = 'u16' })
    assert.are.equal('u16', t.dtype)
    assert.are.same({ 0, 1, 65535 }, t:totable())
    assert.are.equal(65536, t:sum():item())
    assert.are.equal('u16', (t + pmp.tensor({ 1 }, { dtype = 'u8' })).dtype)
    assert.are.equal('i32', (t + pmp.tensor({ 1 }, { dtype = 'i32' })).dtype)
    assert.are.equal('f32', (t * 0.5).dtype)
    assert.are.same({ 0, 1, 65535 }, t:long():totable())
  end)
end)
