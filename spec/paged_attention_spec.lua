require 'busted.runner'()
-- The paged KV cache's C ops against the dense attention op (pmp.nn.functional.attention, itself
-- checked against torch): keys and values scattered over shuffled blocks of a pool, with GQA, several
-- block sizes, one query per sequence (decode) and several (a prefill after a cached prefix).
local paged = require 'pmp.serve.paged_kv_cache'
local F = require 'pmp.nn.functional'
local fails_with = require('spec.support.expect').fails_with

-- A shuffled list 0 .. n-1 (deterministic), so a sequence's blocks are scattered over the pool.
local function shuffled(n, seed)
  local out = {}
  for k = 1, n do out[k] = k - 1 end
  local state = seed
  for k = n, 2, -1 do
    state = (state * 1103515245 + 12345) % 2147483648
    local j = state % k + 1
    out[k], out[j] = out[j], out[k]
  end
  return out
end

-- Writes each sequence's dense keys/values into the pools through paged.write and returns the block
-- tables [N, M] and lengths [N].
local function scatter(keys, values, lengths, block_size, pool_k, pool_v, seed)
  local N, M = #lengths, 0
  for _, L in ipairs(lengths) do M = math.max(M, math.ceil(L / block_size)) end
  local order, next_block, tables = shuffled(pool_k:size(1), seed), 1, {}
  for n, L in ipairs(lengths) do
    tables[n] = {}
    for b = 1, M do
      if b <= math.ceil(L / block_size) then
        tables[n][b] = order[next_block]
        next_block = next_block + 1
      else
        tables[n][b] = 0   -- unused entries are never read
      end
    end
    local slots = {}
    for s = 0, L - 1 do slots[s + 1] = tables[n][math.floor(s / block_size) + 1] * block_size + s % block_size end
    local slot_tensor = pmp.tensor({ slots }, { dtype = 'i64' })
    paged.write(pool_k, keys[n], slot_tensor)
    paged.write(pool_v, values[n], slot_tensor)
  end
  return pmp.tensor(tables, { dtype = 'i64' }), pmp.tensor(lengths, { dtype = 'i64' })
end

local function check(case)
  local Hq, Hkv, D, T, bs = case.Hq, case.Hkv, case.D, case.T, case.block_size
  local dtype = case.dtype
  pmp.manual_seed(case.seed)
  local keys, values, queries = {}, {}, {}
  for n, L in ipairs(case.lengths) do
    keys[n] = pmp.randn({ 1, Hkv, L, D }, { dtype = dtype })
    values[n] = pmp.randn({ 1, Hkv, L, D }, { dtype = dtype })
    queries[n] = pmp.randn({ 1, Hq, T, D }, { dtype = dtype })
  end
  local blocks = 0
  for _, L in ipairs(case.lengths) do blocks = blocks + math.ceil(L / bs) end
  local pool_k = pmp.zeros({ blocks + 3, Hkv, bs, D }, { dtype = dtype })
  local pool_v = pmp.zeros({ blocks + 3, Hkv, bs, D }, { dtype = dtype })
  local tables, lengths = scatter(keys, values, case.lengths, bs, pool_k, pool_v, case.seed)
  local out = paged.attention(pmp.cat(queries, 1), pool_k, pool_v, tables, lengths)
  assert.are.same({ #case.lengths, Hq, T, D }, out.shape)
  for n = 1, #case.lengths do
    local dense = F.attention(queries[n], keys[n], values[n], { causal = true })
    local got = out:narrow(1, n, 1)
    local err = (got - dense):abs():max():item()
    assert(err < case.tolerance, string.format('sequence %d: max error %g', n, err))
  end
end

describe('paged attention', function()
  it('matches dense attention for one query per sequence (f64, GQA, block sizes 1, 4, 16)', function()
    for _, bs in ipairs({ 1, 4, 16 }) do
      check({ Hq = 4, Hkv = 2, D = 8, T = 1, block_size = bs, lengths = { 1, 7, 16, 33, 5 }, dtype = 'f64',
        seed = 10 + bs, tolerance = 1e-12 })
    end
  end)

  it('matches dense attention for several queries after a prefix (f64 and f32, MHA and MQA)', function()
    check({ Hq = 3, Hkv = 3, D = 16, T = 5, block_size = 4, lengths = { 5, 9, 21 }, dtype = 'f64', seed = 3,
      tolerance = 1e-12 })
    check({ Hq = 4, Hkv = 1, D = 32, T = 3, block_size = 8, lengths = { 3, 17, 40 }, dtype = 'f32', seed = 4,
      tolerance = 2e-6 })
  end)

  it('writes rows where the slots say and skips negative slots', function()
    local pool = pmp.zeros({ 3, 1, 2, 2 }, { dtype = 'f64' })
    local src = pmp.tensor({ { { { 1, 2 }, { 3, 4 }, { 5, 6 } } } }, { dtype = 'f64' })   -- [1, 1, 3, 2]
    paged.write(pool, src, pmp.tensor({ { 5, -1, 0 } }, { dtype = 'i64' }))
    assert.are.same({ { { { 5, 6 }, { 0, 0 } } }, { { { 0, 0 }, { 0, 0 } } }, { { { 0, 0 }, { 1, 2 } } } }, pool:totable())
  end)

  it('refuses block tables and slots outside the pool, and too few keys', function()
    local pool = pmp.zeros({ 2, 1, 4, 8 })
    local q = pmp.randn({ 1, 2, 1, 8 })
    fails_with(function()
      paged.attention(q, pool, pool, pmp.tensor({ { 0, 2 } }, { dtype = 'i64' }), pmp.tensor({ 6 }, { dtype = 'i64' }))
    end, 'outside the pool')
    fails_with(function()
      paged.attention(pmp.randn({ 1, 2, 3, 8 }), pool, pool, pmp.tensor({ { 0 } }, { dtype = 'i64' }),
        pmp.tensor({ 2 }, { dtype = 'i64' }))
    end, 'needs at least')
    fails_with(function()
      paged.write(pool, pmp.randn({ 1, 1, 1, 8 }), pmp.tensor({ { 8 } }, { dtype = 'i64' }))
    end, 'past the pool')
    fails_with(function()
      paged.attention(pmp.randn({ 1, 2, 1, 4 }), pool, pool, pmp.tensor({ { 0 } }, { dtype = 'i64' }),
        pmp.tensor({ 1 }, { dtype = 'i64' }))
    end, 'D and a multiple of Hkv')
  end)
end)
