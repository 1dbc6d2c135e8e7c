require 'busted.runner'()
-- ALiBi: the fused attention op with per-head linear biases (F.attention's alibi_slopes) against
-- softmax(q k^T / sqrt(d) + bias) v written with primitive ops, forward and backward, plus finite
-- differences in f64; the slopes against their closed form.
local check = require 'spec.support.gradcheck'
local gradcheck, random_input = check.gradcheck, check.random_input
local fails_with = require('spec.support.expect').fails_with
local alibi = require 'pmp.nn.alibi'
local F = pmp.F

local function max_diff(a, b) return (a:double() - b:double()):abs():max():item() end

-- The bias of head h for query t (0-based, at position t + S - T) and key s: slope_h * (s - position),
-- or options.bias(h, b, s), with keys after the position (causal) or before first_key[b] hidden.
local function composed(q, k, v, slopes, options)
  options = options or {}
  local B, Hq, T, D = unpack(q.shape)
  local Hkv, S = k:size(2), k:size(3)
  local group = Hq / Hkv
  k = k:unsqueeze(3):expand(B, Hkv, group, S, D):reshape(B, Hq, S, D)
  v = v:unsqueeze(3):expand(B, Hkv, group, S, D):reshape(B, Hq, S, D)
  local slope = slopes:totable()
  local bias, hidden = {}, {}
  for b = 1, B do
    bias[b], hidden[b] = {}, {}
    for h = 1, Hq do
      bias[b][h], hidden[b][h] = {}, {}
      for t = 1, T do
        bias[b][h][t], hidden[b][h][t] = {}, {}
        local position = t - 1 + S - T
        for s = 1, S do
          bias[b][h][t][s] = options.bias and options.bias(h, b, s - 1) or slope[h] * ((s - 1) - position)
          local before = options.first_key and s - 1 < options.first_key[b] or false
          hidden[b][h][t][s] = (options.causal ~= false and s - 1 > position) or before
        end
      end
    end
  end
  local scores = q:matmul(k:transpose(-1, -2)) * (1 / math.sqrt(D)) + pmp.tensor(bias, { dtype = q.dtype })
  return scores:masked_fill(pmp.tensor(hidden), -math.huge):softmax(-1):matmul(v)
end

-- Outputs and the gradients of q, k, v for a fixed weighting of the output.
local function forward_backward(fn, inputs, weights)
  local leaves = {}
  for i, x in ipairs(inputs) do leaves[i] = x:detach():clone():requires_grad_() end
  local out = fn(unpack(leaves))
  ;(out * weights):sum():backward()
  return out, { leaves[1].grad, leaves[2].grad, leaves[3].grad }
end

local function agree(fused, reference, inputs, tolerance)
  local weights = pmp.randn(inputs[1].shape, { dtype = inputs[1].dtype })
  local out_f, grads_f = forward_backward(fused, inputs, weights)
  local out_r, grads_r = forward_backward(reference, inputs, weights)
  assert.is_true(max_diff(out_f, out_r) < tolerance, 'outputs differ by ' .. max_diff(out_f, out_r))
  for i = 1, 3 do
    local d = max_diff(grads_f[i], grads_r[i])
    assert.is_true(d < tolerance, 'gradient of input ' .. i .. ' differs by ' .. d)
  end
end

describe('ALiBi slopes', function()
  it('are 2^(-8i/n) for a power-of-two head count', function()
    local want = {}
    for i = 1, 8 do want[i] = 2 ^ -i end
    assert.are.same(want, alibi.slopes(8):totable())
  end)
  it('interleave the odd terms of the next power of two for other head counts', function()
    -- 6 heads: 2^(-8i/4) for i = 1..4, then 2^(-8i/8) for i = 1, 3
    assert.are.same({ 2 ^ -2, 2 ^ -4, 2 ^ -6, 2 ^ -8, 2 ^ -1, 2 ^ -3 }, alibi.slopes(6):totable())
    -- 12 heads: 2^(-i) for i = 1..8, then 2^(-i/2) for i = 1, 3, 5, 7
    local got = alibi.slopes(12):totable()
    for i, e in ipairs({ 1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5 }) do
      assert.is_true(math.abs(got[i] - 2 ^ -e) < 1e-15, 'head ' .. i)
    end
    assert.are.same({ 2 ^ -8 }, alibi.slopes(1):totable())
    fails_with(function() alibi.slopes(0) end, 'positive integer')
  end)
  it('are multiplied by a scale when given (Falcon-RW divides them by sqrt(head_dim))', function()
    assert.are.same({ 2 ^ -3, 2 ^ -5, 2 ^ -7, 2 ^ -9, 2 ^ -2, 2 ^ -4 }, alibi.slopes(6, 0.5):totable())
  end)
end)

describe('attention with ALiBi', function()
  it('matches the composition for MHA and GQA across several tiles, forward and backward', function()
    for _, heads in ipairs({ { 3, 3 }, { 4, 2 } }) do
      local slopes = alibi.slopes(heads[1])
      local q = pmp.randn(2, heads[1], 70, 8, { dtype = 'f64' })
      local k = pmp.randn(2, heads[2], 70, 8, { dtype = 'f64' })
      local v = pmp.randn(2, heads[2], 70, 8, { dtype = 'f64' })
      agree(function(a, b, c) return F.attention(a, b, c, { alibi_slopes = slopes }) end,
        function(a, b, c) return composed(a, b, c, slopes) end, { q, k, v }, 1e-10)
    end
  end)
  it('counts distances from the query position with a KV cache, left padding and no causal mask', function()
    local slopes = pmp.tensor({ 0.7, 0.2 }, { dtype = 'f32' })   -- any float dtype; not just the standard slopes
    local q = pmp.randn(2, 2, 3, 4, { dtype = 'f64' })
    local k = pmp.randn(2, 1, 9, 4, { dtype = 'f64' })
    local v = pmp.randn(2, 1, 9, 4, { dtype = 'f64' })
    local starts = pmp.tensor({ 0, 4 }, { dtype = 'i64' })
    agree(function(a, b, c) return F.attention(a, b, c, { alibi_slopes = slopes, first_key = starts }) end,
      function(a, b, c) return composed(a, b, c, slopes:double(), { first_key = { 0, 4 } }) end, { q, k, v }, 1e-10)
    agree(function(a, b, c) return F.attention(a, b, c, { alibi_slopes = slopes, causal = false }) end,
      function(a, b, c) return composed(a, b, c, slopes:double(), { causal = false }) end, { q, k, v }, 1e-10)
  end)
  it('passes finite differences', function()
    local slopes = alibi.slopes(2) * 3   -- steep slopes, so a wrong bias in backward would show
    gradcheck(function(a, b, c) return F.attention(a, b, c, { alibi_slopes = slopes }) end,
      { random_input({ 1, 2, 5, 3 }), random_input({ 1, 1, 5, 3 }), random_input({ 1, 1, 5, 3 }) })
    local starts = pmp.tensor({ 0, 2 }, { dtype = 'i64' })
    gradcheck(function(a, b, c) return F.attention(a, b, c, { alibi_slopes = slopes, first_key = starts }):narrow(3, 3, 4) end,
      { random_input({ 2, 2, 6, 3 }), random_input({ 2, 2, 6, 3 }), random_input({ 2, 2, 6, 3 }) })
  end)
  it('runs bf16 inputs in f32 with the bias', function()
    local slopes = alibi.slopes(2)
    local q, k, v = pmp.randn(1, 2, 9, 8), pmp.randn(1, 2, 9, 8), pmp.randn(1, 2, 9, 8)
    local out = F.attention(q:bf16(), k:bf16(), v:bf16(), { alibi_slopes = slopes })
    assert.are.equal('bf16', out.dtype)
    assert.is_true(max_diff(out, composed(q:double(), k:double(), v:double(), slopes)) < 3e-2)
  end)
  it('rejects slopes that are not one per query head', function()
    local q, k = pmp.randn(1, 4, 3, 8), pmp.randn(1, 2, 3, 8)
    fails_with(function() F.attention(q, k, k, { alibi_slopes = alibi.slopes(2) }) end, 'ALiBi slopes', '[4]')
    fails_with(function() F.attention(q, k, k, { alibi_slopes = pmp.tensor({ 1, 2, 3, 4 }, { dtype = 'i64' }) }) end,
      'ALiBi slopes')
  end)
end)

-- x rounded to the nearest bf16 (8 significant bits), ties to even, as torch's .bfloat16() does
local function bf16(x)
  if x == 0 then return 0 end
  local m, e = math.frexp(x)
  local scaled = m * 2 ^ 8
  local r = math.floor(scaled + 0.5)
  if r - scaled == 0.5 and r % 2 == 1 then r = r - 1 end
  return r * 2 ^ (e - 8)
end

-- transformers' Falcon (build_alibi_tensor): slopes rounded to bf16 times the key's position counted
-- from the row's first real token ((cumsum(mask) - 1) * mask), a bf16 times an integer tensor, which
-- torch computes in bf16 (the position rounded too), then divided by sqrt(head_dim) with the mask
local function falcon_bias(slopes, first_key, D)
  local slope = slopes:totable()
  return function(h, b, s)
    local position = math.max(s - first_key[b], 0)
    return bf16(bf16(slope[h]) * bf16(position)) / math.sqrt(D)
  end
end

describe("attention with transformers' Falcon ALiBi bias (alibi_hf_falcon_scale)", function()
  local heads, D = 32, 2
  local slopes = alibi.slopes(heads)
  local function falcon(first_key)
    return function(a, b, c)
      return F.attention(a, b, c, { alibi_slopes = slopes, alibi_hf_falcon_scale = 1 / math.sqrt(D),
        first_key = first_key and pmp.tensor(first_key, { dtype = 'i64' }) })
    end
  end
  local function agrees_with_transformers(q, k, v, starts)
    agree(falcon(starts), function(a, b, c)
      return composed(a, b, c, slopes, { first_key = starts, bias = falcon_bias(slopes, starts, D) })
    end, { q, k, v }, 1e-10)
  end
  it('adds the bf16-rounded bias of absolute key positions from the first real key, forward and backward', function()
    local q = pmp.randn(2, heads, 80, D, { dtype = 'f64' })   -- queries at 16..95: each sees a key
    local k = pmp.randn(2, 8, 96, D, { dtype = 'f64' })
    local v = pmp.randn(2, 8, 96, D, { dtype = 'f64' })
    local starts = { 0, 13 }
    agrees_with_transformers(q, k, v, starts)
    -- the rounding matters here: the exact bias (BLOOM's, scaled) is far from it
    local exact = composed(q, k, v, slopes * (1 / math.sqrt(D)), { first_key = starts })
    assert.is_true(max_diff(falcon(starts)(q, k, v), exact) > 1e-3)
  end)
  it('keeps absolute positions for the last queries of a long KV cache', function()
    local q = pmp.randn(2, heads, 3, D, { dtype = 'f64' })
    local k = pmp.randn(2, 1, 320, D, { dtype = 'f64' })
    local v = pmp.randn(2, 1, 320, D, { dtype = 'f64' })
    agrees_with_transformers(q, k, v, { 0, 41 })
  end)
  it('rounds the scaled bias to bf16 for bf16 inputs', function()
    local q, k, v = pmp.randn(1, heads, 40, D), pmp.randn(1, heads, 40, D), pmp.randn(1, heads, 40, D)
    q, k, v = q:bf16(), k:bf16(), v:bf16()
    local bias = falcon_bias(slopes, { 0 }, D)
    local out = falcon()(q, k, v)
    assert.are.equal('bf16', out.dtype)
    local want = composed(q:double(), k:double(), v:double(), slopes,
      { bias = function(h, b, s) return bf16(bias(h, b, s)) end })
    assert.is_true(max_diff(out, want) < 1e-2, 'differs by ' .. max_diff(out, want))
  end)
  it('passes finite differences (the bias has no gradient)', function()
    local steep = alibi.slopes(2) * 3
    local starts = pmp.tensor({ 0, 2 }, { dtype = 'i64' })
    gradcheck(function(a, b, c)
      return F.attention(a, b, c, { alibi_slopes = steep, alibi_hf_falcon_scale = 0.7, first_key = starts }):narrow(3, 3, 4)
    end, { random_input({ 2, 2, 6, 3 }), random_input({ 2, 2, 6, 3 }), random_input({ 2, 2, 6, 3 }) })
  end)
  it('needs slopes and a positive scale', function()
    local q = pmp.randn(1, 2, 3, 4)
    fails_with(function() F.attention(q, q, q, { alibi_hf_falcon_scale = 0.5 }) end, 'Falcon ALiBi bias needs slopes')
    fails_with(function() F.attention(q, q, q, { alibi_slopes = alibi.slopes(2), alibi_hf_falcon_scale = 0 }) end,
      'positive bias scale')
  end)
end)
