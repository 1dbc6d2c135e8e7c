require 'busted.runner'()
-- Fused ops (RMSNorm, RoPE, SwiGLU, attention) against the composition of primitive ops, forward and
-- backward, plus finite differences in f64; optimizer kernels against closed-form updates.
local check = require 'spec.support.gradcheck'
local gradcheck, random_input = check.gradcheck, check.random_input
local F = pmp.F

local function max_diff(a, b) return (a:double() - b:double()):abs():max():item() end

-- Runs fn on fresh leaf copies of inputs and returns output and input gradients for a fixed weighting.
local function forward_backward(fn, inputs, weights)
  local leaves = {}
  for k, x in ipairs(inputs) do leaves[k] = x:detach():clone():requires_grad_() end
  local out = fn(unpack(leaves))
  ;(out * weights):sum():backward()
  local grads = {}
  for k, leaf in ipairs(leaves) do grads[k] = leaf.grad end
  return out, grads
end

-- The fused op and the reference composition agree on outputs and on every input gradient.
local function agree(fused, composed, inputs, tolerance)
  local probe = composed(unpack(inputs))
  local weights = pmp.randn(probe.shape, { dtype = probe.dtype })
  local out_f, grads_f = forward_backward(fused, inputs, weights)
  local out_c, grads_c = forward_backward(composed, inputs, weights)
  assert.are.same(out_c.shape, out_f.shape)
  assert.is_true(max_diff(out_f, out_c) < tolerance, 'outputs differ by ' .. max_diff(out_f, out_c))
  for k = 1, #inputs do
    local d = max_diff(grads_f[k], grads_c[k])
    assert.is_true(d < tolerance, 'gradient of input ' .. k .. ' differs by ' .. d)
  end
end

local function composed_rms_norm(x, w) return x * (x:square():mean(-1, true) + 1e-6):rsqrt() * w end

local function rotate_half(x)
  local half = x:size(-1) / 2
  return pmp.cat({ -x:narrow(-1, half + 1, half), x:narrow(-1, 1, half) }, -1)
end

-- cos/sin tables of HF's rotary embedding: angles t * theta^(-2i/d), the halves repeated.
local function rope_tables(T, dim, dtype, offset)
  local cos, sin = {}, {}
  for t = 1, T do
    cos[t], sin[t] = {}, {}
    for i = 1, dim / 2 do
      local angle = (t - 1 + (offset or 0)) * 10000 ^ (-2 * (i - 1) / dim)
      cos[t][i], cos[t][i + dim / 2] = math.cos(angle), math.cos(angle)
      sin[t][i], sin[t][i + dim / 2] = math.sin(angle), math.sin(angle)
    end
  end
  return pmp.tensor(cos, { dtype = dtype }), pmp.tensor(sin, { dtype = dtype })
end

-- Softmax attention written with matmul, masks and softmax; k/v heads repeated for GQA.
local function composed_attention(q, k, v, options)
  options = options or {}
  local B, Hq, T, D = unpack(q.shape)
  local Hkv, S = k:size(2), k:size(3)
  local group = Hq / Hkv
  if group > 1 then
    k = k:unsqueeze(3):expand(B, Hkv, group, S, D):reshape(B, Hq, S, D)
    v = v:unsqueeze(3):expand(B, Hkv, group, S, D):reshape(B, Hq, S, D)
  end
  local scores = q:matmul(k:transpose(-1, -2)) * (1 / math.sqrt(D))
  if options.causal ~= false then
    local offset, window = S - T, options.window or 0
    local hidden = {}
    for t = 1, T do
      hidden[t] = {}
      for s = 1, S do
        local pos = t - 1 + offset
        hidden[t][s] = (s - 1 > pos) or (window > 0 and s - 1 < pos - window + 1)
      end
    end
    scores = scores:masked_fill(pmp.tensor(hidden), -math.huge)
  end
  return scores:softmax(-1):matmul(v)
end

describe('fused RMSNorm', function()
  it('matches the composition, forward and backward, in f64 and f32', function()
    for _, dtype in ipairs({ 'f64', 'f32' }) do
      local x, w = pmp.randn(3, 5, 16, { dtype = dtype }), pmp.randn(16, { dtype = dtype })
      agree(function(a, b) return F.rms_norm(a, b, 1e-6) end, composed_rms_norm, { x, w }, dtype == 'f64' and 1e-12 or 1e-5)
    end
  end)
  it('passes finite differences, with and without a weight', function()
    gradcheck(function(a, b) return F.rms_norm(a, b, 1e-5) end, { random_input({ 3, 6 }), random_input({ 6 }) })
    gradcheck(function(a) return F.rms_norm(a, nil, 1e-5) end, { random_input({ 2, 5 }) })
  end)
  it('rounds to bf16 before the weight, as HF LlamaRMSNorm does', function()
    local x = pmp.randn(4, 32):bf16()
    local w = (pmp.randn(32) * 0.1 + 1):bf16()
    local xf = x:float()
    local hf = w * (xf * (xf:square():mean(-1, true) + 1e-6):rsqrt()):bf16()
    assert.are.equal(0, max_diff(F.rms_norm(x, w, 1e-6), hf))
  end)
  it('keeps epsilon on rows whose mean square is comparable to it, in f64, f32 and bf16', function()
    -- mean(x^2) ~ 4e-6 against eps = 1e-5: without eps the output would grow by ~1.9x
    local eps = 1e-5
    local function composed(x, w) return x * (x:square():mean(-1, true) + eps):rsqrt() * w end
    local x = pmp.randn(4, 3, 40, { dtype = 'f64' }) * 2e-3
    local w = pmp.randn(40, { dtype = 'f64' }) * 0.1 + 1
    local g = pmp.randn(4, 3, 40, { dtype = 'f64' })
    for dtype, tolerance in pairs({ f64 = 1e-12, f32 = 1e-6, bf16 = 1e-2 }) do
      -- the reference sees the inputs as rounded to dtype, so only the kernel's own rounding remains
      local xr, wr, gr = x:to(dtype), w:to(dtype), g:to(dtype)
      local want, want_grads = forward_backward(composed, { xr:double(), wr:double() }, gr:double())
      local got, grads = forward_backward(function(a, b) return F.rms_norm(a, b, eps) end, { xr, wr }, gr)
      local function relative(a, b) return max_diff(a, b) / b:abs():max():item() end
      assert.is_true(relative(got, want) < tolerance, dtype .. ' output off by ' .. relative(got, want))
      assert.is_true(relative(grads[1], want_grads[1]) < tolerance, dtype .. ' dx off by ' .. relative(grads[1], want_grads[1]))
      assert.is_true(relative(grads[2], want_grads[2]) < tolerance, dtype .. ' dw off by ' .. relative(grads[2], want_grads[2]))
    end
  end)
  it('rejects a weight of the wrong size', function()
    local ok, message = pcall(F.rms_norm, pmp.randn(2, 4), pmp.randn(5))
    assert.is_false(ok)
    assert.matches('rms_norm: weight of shape %[5%]', message)
  end)
end)

describe('fused RoPE', function()
  it('matches x*cos + rotate_half(x)*sin, forward and backward', function()
    local x = pmp.randn(2, 3, 7, 8, { dtype = 'f64' })
    local cos, sin = rope_tables(7, 8, 'f64')
    agree(function(a) return F.rope(a, cos, sin) end, function(a) return a * cos + rotate_half(a) * sin end, { x }, 1e-12)
  end)
  it('rotates only the first rotary_dim dims when the tables are narrower (partial rotary)', function()
    local x = pmp.randn(1, 2, 5, 8, { dtype = 'f64' })
    local cos, sin = rope_tables(5, 4, 'f64')
    local function composed(a)
      local rot, pass = a:narrow(-1, 1, 4), a:narrow(-1, 5, 4)
      return pmp.cat({ rot * cos + rotate_half(rot) * sin, pass }, -1)
    end
    agree(function(a) return F.rope(a, cos, sin) end, composed, { x }, 1e-12)
  end)
  it('interleaved rotates adjacent pairs', function()
    local x = pmp.randn(1, 1, 3, 4, { dtype = 'f64' })
    local cos = pmp.tensor({ { 1, 1, 0.5, 0.5 }, { 0, 0, 1, 1 }, { 0.2, 0.2, -1, -1 } }, { dtype = 'f64' })
    local sin = pmp.tensor({ { 0, 0, 0.3, 0.3 }, { 1, 1, 0, 0 }, { 0.9, 0.9, 0.1, 0.1 } }, { dtype = 'f64' })
    local y = F.rope(x, cos, sin, true):totable()[1][1]
    local xv = x:totable()[1][1]
    local c, s = cos:totable(), sin:totable()
    for t = 1, 3 do
      for p = 0, 1 do
        local i, j = 2 * p + 1, 2 * p + 2
        assert.is_near(xv[t][i] * c[t][i] - xv[t][j] * s[t][i], y[t][i], 1e-12)
        assert.is_near(xv[t][j] * c[t][j] + xv[t][i] * s[t][j], y[t][j], 1e-12)
      end
    end
    gradcheck(function(a) return F.rope(a, cos, sin, true) end, { x })
  end)
  it('passes finite differences with per-batch tables', function()
    local cos = pmp.randn(2, 1, 3, 4, { dtype = 'f64' })
    local sin = pmp.randn(2, 1, 3, 4, { dtype = 'f64' })
    gradcheck(function(a) return F.rope(a, cos, sin) end, { random_input({ 2, 2, 3, 6 }) })
  end)
  it('takes a transposed [B, T, H, D] view as it is and returns the same layout, in f32 and bf16', function()
    for _, dtype in ipairs({ 'f32', 'bf16' }) do
      local cos, sin = rope_tables(5, 8, dtype)
      local x = pmp.randn(2, 5, 3, 8):to(dtype):transpose(2, 3)
      local y = F.rope(x, cos, sin)
      assert.is_false(y:is_contiguous())
      assert.are.equal(0, (y:double() - F.rope(x:contiguous(), cos, sin):double()):abs():max():item())
      local g = pmp.randn(2, 5, 3, 8):to(dtype):transpose(2, 3)
      local leaf, copy = x:detach():requires_grad_(), x:contiguous():requires_grad_()
      F.rope(leaf, cos, sin):backward(g)
      F.rope(copy, cos, sin):backward(g:contiguous())
      assert.are.equal(0, (leaf.grad:double() - copy.grad:double()):abs():max():item())
    end
  end)
end)

describe('fused SwiGLU', function()
  it('matches silu(gate) * up on the [gate | up] layout', function()
    local x = pmp.randn(3, 4, 10, { dtype = 'f64' })
    agree(F.swiglu, function(a) return a:narrow(-1, 1, 5):silu() * a:narrow(-1, 6, 5) end, { x }, 1e-12)
    gradcheck(F.swiglu, { random_input({ 2, 6 }) })
  end)
  it('matches HF rounding in bf16', function()
    local x = pmp.randn(4, 16):bf16()
    local hf = x:narrow(-1, 1, 8):silu() * x:narrow(-1, 9, 8)
    assert.are.equal(0, max_diff(F.swiglu(x), hf))
  end)
end)

describe('fused attention', function()
  it('matches softmax(q k^T / sqrt(d)) v for MHA, GQA and MQA across several tiles', function()
    for _, heads in ipairs({ { 4, 4 }, { 4, 2 }, { 6, 1 } }) do
      local q = pmp.randn(2, heads[1], 70, 8, { dtype = 'f64' })
      local k = pmp.randn(2, heads[2], 70, 8, { dtype = 'f64' })
      local v = pmp.randn(2, heads[2], 70, 8, { dtype = 'f64' })
      agree(F.attention, composed_attention, { q, k, v }, 1e-10)
    end
  end)
  it('handles fewer queries than keys (a KV cache), no mask, and a sliding window', function()
    local q = pmp.randn(1, 2, 5, 4, { dtype = 'f64' })
    local k = pmp.randn(1, 2, 69, 4, { dtype = 'f64' })
    local v = pmp.randn(1, 2, 69, 4, { dtype = 'f64' })
    agree(F.attention, composed_attention, { q, k, v }, 1e-10)
    agree(function(a, b, c) return F.attention(a, b, c, { causal = false }) end,
      function(a, b, c) return composed_attention(a, b, c, { causal = false }) end, { q, k, v }, 1e-10)
    local q2 = pmp.randn(1, 2, 80, 4, { dtype = 'f64' })
    local k2 = pmp.randn(1, 1, 80, 4, { dtype = 'f64' })
    local v2 = pmp.randn(1, 1, 80, 4, { dtype = 'f64' })
    agree(function(a, b, c) return F.attention(a, b, c, { window = 7 }) end,
      function(a, b, c) return composed_attention(a, b, c, { window = 7 }) end, { q2, k2, v2 }, 1e-10)
  end)
  it('hides the keys before first_key in each row (left padding)', function()
    local q = pmp.randn(2, 2, 6, 4, { dtype = 'f64' })
    local k = pmp.randn(2, 1, 6, 4, { dtype = 'f64' })
    local v = pmp.randn(2, 1, 6, 4, { dtype = 'f64' })
    local starts = pmp.tensor({ 0, 2 }, { dtype = 'i64' })
    local function composed(a, b, c)
      local scores = a:matmul(b:expand(2, 2, 6, 4):transpose(-1, -2)) * 0.5
      local hidden = {}
      for row = 1, 2 do
        hidden[row] = { {} }
        for t = 1, 6 do
          hidden[row][1][t] = {}
          for s = 1, 6 do hidden[row][1][t][s] = s > t or (row == 2 and s <= 2) end
        end
      end
      local p = scores:masked_fill(pmp.tensor(hidden), -math.huge):softmax(-1)
      return p:matmul(c:expand(2, 2, 6, 4))
    end
    local fused = F.attention(q, k, v, { first_key = starts })
    local reference = composed(q, k, v)
    -- row 2's first two queries see no key: the kernel gives zeros where softmax over nothing is NaN
    assert.are.equal(0, fused:narrow(1, 2, 1):narrow(3, 1, 2):abs():max():item())
    assert.is_true(max_diff(fused:narrow(3, 3, 4), reference:narrow(3, 3, 4)) < 1e-12)
    assert.is_true(max_diff(fused:narrow(1, 1, 1), reference:narrow(1, 1, 1)) < 1e-12)
    gradcheck(function(a, b, c) return F.attention(a, b, c, { first_key = starts }):narrow(3, 3, 4) end,
      { random_input({ 2, 2, 6, 4 }), random_input({ 2, 1, 6, 4 }), random_input({ 2, 1, 6, 4 }) })
  end)
  it('keeps packed documents apart with a per-query first key', function()
    -- two documents of lengths 3 and 4 packed in one row equal each document attended alone
    local q = pmp.randn(1, 2, 7, 4, { dtype = 'f64' })
    local k = pmp.randn(1, 2, 7, 4, { dtype = 'f64' })
    local v = pmp.randn(1, 2, 7, 4, { dtype = 'f64' })
    local starts = pmp.tensor({ { 0, 0, 0, 3, 3, 3, 3 } }, { dtype = 'i64' })
    local packed = F.attention(q, k, v, { first_key = starts })
    local first = F.attention(q:narrow(3, 1, 3), k:narrow(3, 1, 3), v:narrow(3, 1, 3))
    local second = F.attention(q:narrow(3, 4, 4), k:narrow(3, 4, 4), v:narrow(3, 4, 4))
    assert.is_true(max_diff(packed, pmp.cat({ first, second }, 3)) < 1e-12)
    gradcheck(function(a, b, c) return F.attention(a, b, c, { first_key = starts }) end,
      { random_input({ 1, 1, 7, 3 }), random_input({ 1, 1, 7, 3 }), random_input({ 1, 1, 7, 3 }) })
  end)
  it('passes finite differences', function()
    gradcheck(F.attention, { random_input({ 1, 2, 5, 3 }), random_input({ 1, 1, 5, 3 }), random_input({ 1, 1, 5, 3 }) })
  end)
  it('runs bf16 inputs in f32 and returns bf16', function()
    local q, k, v = pmp.randn(1, 2, 9, 8), pmp.randn(1, 2, 9, 8), pmp.randn(1, 2, 9, 8)
    local out = F.attention(q:bf16(), k:bf16(), v:bf16())
    assert.are.equal('bf16', out.dtype)
    assert.is_true(max_diff(out, composed_attention(q, k, v)) < 3e-2)
  end)
  it('reports mismatched shapes', function()
    local ok, message = pcall(F.attention, pmp.randn(1, 3, 4, 8), pmp.randn(1, 2, 4, 8), pmp.randn(1, 2, 4, 8))
    assert.is_false(ok)
    assert.matches('multiple of Hkv', message)
  end)
  -- Attention of the last T of S positions, written as loops over Lua numbers (f64): query t of row b
  -- sees keys [max(starts[b], pos - window + 1), pos] with pos = S - T + t (0-based); zeros if none.
  local function looped_attention(q, k, v, starts, window)
    local qt, kt, vt = q:double():totable(), k:double():totable(), v:double():totable()
    local B, Hq, T, D = unpack(q.shape)
    local Hkv, S = k:size(2), k:size(3)
    local out = {}
    for b = 1, B do
      out[b] = {}
      for h = 1, Hq do
        out[b][h] = {}
        local hk = math.floor((h - 1) / (Hq / Hkv)) + 1
        for t = 1, T do
          local pos = S - T + t - 1
          local first = math.max(starts[b], window > 0 and pos - window + 1 or 0)
          local scores, peak = {}, -math.huge
          for s = first, pos do
            local dot = 0
            for d = 1, D do dot = dot + qt[b][h][t][d] * kt[b][hk][s + 1][d] end
            scores[s] = dot / math.sqrt(D)
            peak = math.max(peak, scores[s])
          end
          local row, total = {}, 0
          for d = 1, D do row[d] = 0 end
          for s = first, pos do
            local e = math.exp(scores[s] - peak)
            total = total + e
            for d = 1, D do row[d] = row[d] + e * vt[b][hk][s + 1][d] end
          end
          for d = 1, D do row[d] = total > 0 and row[d] / total or 0 end
          out[b][h][t] = row
        end
      end
    end
    return pmp.tensor(out, { dtype = 'f64' })
  end
  it('decodes (1 to 8 queries against keys over several tiles, read as rows) as the looped f64 reference', function()
    -- GQA, a head dim off the vector width, left padding (the second row's first 70 keys hidden) and a
    -- window; T = 9 takes the tiled path beside them
    local S, D = 150, 12
    local starts = { 0, 70 }
    local first_key = pmp.tensor(starts, { dtype = 'i64' })
    for _, T in ipairs({ 1, 3, 8, 9 }) do
      local q, k, v = pmp.randn(2, 4, T, D, { dtype = 'f64' }), pmp.randn(2, 2, S, D, { dtype = 'f64' }),
        pmp.randn(2, 2, S, D, { dtype = 'f64' })
      for _, window in ipairs({ 0, 40 }) do
        for dtype, tolerance in pairs({ f64 = 1e-12, f32 = 1e-5, bf16 = 1e-2 }) do
          -- the reference sees the inputs rounded to dtype, so only the kernel's own rounding remains
          local qr, kr, vr = q:to(dtype), k:to(dtype), v:to(dtype)
          local want = looped_attention(qr, kr, vr, starts, window)
          local got = F.attention(qr, kr, vr, { first_key = first_key, window = window })
          assert.are.equal(dtype, got.dtype)
          local d = max_diff(got, want)
          assert.is_true(d < tolerance, ('T %d, window %d, %s: differs by %g'):format(T, window, dtype, d))
        end
      end
    end
  end)
end)

describe('fused attention layouts and half precision', function()
  local function same(a, b) return (a:double() - b:double()):abs():max():item() == 0 and a.dtype == b.dtype end
  local function strides(t) return { tonumber(t.ptr.strides[0]), tonumber(t.ptr.strides[1]), tonumber(t.ptr.strides[2]),
    tonumber(t.ptr.strides[3]) } end

  -- outputs and gradients of attention, and the strides of the gradients as attention hands them on
  -- (leaves keep contiguous copies, so an identity function in between looks at them)
  local function run(q, k, v, g, options)
    local leaves = { q:detach():requires_grad_(), k:detach():requires_grad_(), v:detach():requires_grad_() }
    local seen, probed = {}, {}
    for i, leaf in ipairs(leaves) do
      probed[i] = pmp.autograd.custom({ leaf }, leaf:detach(), function(grad)
        seen[i] = strides(grad)
        return { grad }
      end)
    end
    local o = F.attention(probed[1], probed[2], probed[3], options)
    o:backward(g)
    return o, leaves[1].grad, leaves[2].grad, leaves[3].grad, seen
  end

  it('reads transposed views in place and lays out o and the gradients like the model wants', function()
    for _, dtype in ipairs({ 'f32', 'bf16', 'f64' }) do
      local B, T, Hq, Hkv, D = 2, 70, 4, 2, 20
      local q = pmp.randn(B, T, Hq, D):to(dtype):transpose(2, 3)
      local k = pmp.randn(B, T, Hkv, D):to(dtype):transpose(2, 3)
      local v = pmp.randn(B, T, Hkv, D):to(dtype):transpose(2, 3)
      local g = pmp.randn(B, T, Hq, D):to(dtype):transpose(2, 3)
      local o, dq, dk, dv, seen = run(q, k, v, g)
      local o2, dq2, dk2, dv2, seen2 = run(q:contiguous(), k:contiguous(), v:contiguous(), g:contiguous())
      assert.is_true(same(o, o2) and same(dq, dq2) and same(dk, dk2) and same(dv, dv2), dtype)
      -- merging the heads back is a view, and the gradients have their inputs' layouts
      assert.is_true(o:transpose(2, 3):is_contiguous())
      assert.are.same({ strides(q), strides(k), strides(v) }, seen)
      assert.are.same({ strides(q:contiguous()), strides(k:contiguous()), strides(v:contiguous()) }, seen2)
    end
  end)

  -- bf16 on a CPU with AMX multiplies on the matrix unit: Q K^T and dO V^T are exact products summed in
  -- f32 in another order, and P and dS are rounded to bf16 before P V, P^T dO, dS K and dS^T Q (as
  -- PyTorch's CPU flash attention does). Against the f32 call on the upcast inputs, rounded once, that
  -- costs at most about half a bf16 rounding more: the relative (Frobenius) error of the output and of
  -- each gradient stays below 5e-3 (rounding the f32 result alone gives ~2e-3) and no element is off by
  -- more than 1e-2 of the largest. Without AMX the bf16 path is the f32 path, well inside this.
  local function close(a, reference)
    local err = a:double() - reference:double()
    local norm = reference:double():square():sum():sqrt():item()
    return a.dtype == 'bf16' and err:square():sum():sqrt():item() <= 5e-3 * norm and
      err:abs():max():item() <= 1e-2 * reference:double():abs():max():item()
  end

  it('computes f16 in f32 and rounds once, as converting around an f32 call does; bf16 within its rounding', function()
    for _, dtype in ipairs({ 'bf16', 'f16' }) do
      local q = pmp.randn(1, 3, 100, 16):to(dtype)
      local k, v = pmp.randn(1, 3, 130, 16):to(dtype), pmp.randn(1, 3, 130, 16):to(dtype)
      local g = pmp.randn(1, 3, 100, 16):to(dtype)
      for _, options in ipairs({ {}, { window = 9 }, { causal = false } }) do
        local o, dq, dk, dv = run(q, k, v, g, options)
        local o2, dq2, dk2, dv2 = run(q:float(), k:float(), v:float(), g:float(), options)
        if dtype == 'f16' then
          assert.is_true(same(o, o2:to(dtype)) and same(dq, dq2:to(dtype)) and same(dk, dk2:to(dtype)) and
            same(dv, dv2:to(dtype)), dtype)
        else
          assert.is_true(close(o, o2) and close(dq, dq2) and close(dk, dk2) and close(dv, dv2), dtype)
        end
      end
    end
  end)

  it('keeps bf16 (on the matrix unit where there is one) within bf16 rounding of the f32 path', function()
    local cases = { -- B, Hq, Hkv, T, S, D, options
      { 2, 4, 4, 70, 70, 64, {} }, { 2, 4, 2, 77, 77, 32, {} }, { 1, 4, 1, 33, 95, 128, { causal = false } },
      { 1, 2, 2, 130, 130, 40, { window = 9 } }, { 1, 2, 1, 45, 45, 64, { causal = false, window = 5 } },
      { 2, 2, 1, 50, 50, 64, { first_key = pmp.tensor({ 0, 7 }, { dtype = 'i64' }) } },
      { 1, 3, 3, 1, 17, 64, {} }, { 1, 2, 2, 9, 9, 8, {} }, { 1, 2, 2, 200, 200, 20, {} },
    }
    for _, case in ipairs(cases) do
      local B, Hq, Hkv, T, S, D, options = unpack(case)
      local q = pmp.randn(B, Hq, T, D):bf16()
      local k, v = pmp.randn(B, Hkv, S, D):bf16(), pmp.randn(B, Hkv, S, D):bf16()
      local g = pmp.randn(B, Hq, T, D):bf16()
      local o, dq, dk, dv = run(q, k, v, g, options)
      local o2, dq2, dk2, dv2 = run(q:float(), k:float(), v:float(), g:float(), options)
      local name = table.concat({ B, Hq, Hkv, T, S, D }, 'x')
      assert.is_true(close(o, o2), name .. ' output')
      assert.is_true(close(dq, dq2), name .. ' dq')
      assert.is_true(close(dk, dk2), name .. ' dk')
      assert.is_true(close(dv, dv2), name .. ' dv')
    end
  end)

  it('keeps bf16 on the f32 path, rounded once, under PMP_ATTENTION_NO_AMX=1', function()
    local shell = require 'spec.support.shell'
    local script = [[
      local F = pmp.F
      local function run(q, k, v, g, options)
        local l = { q:detach():requires_grad_(), k:detach():requires_grad_(), v:detach():requires_grad_() }
        local o = F.attention(l[1], l[2], l[3], options)
        o:backward(g)
        return { o, l[1].grad, l[2].grad, l[3].grad }
      end
      local q, k, v, g = pmp.randn(1, 4, 70, 40), pmp.randn(1, 2, 90, 40), pmp.randn(1, 2, 90, 40), pmp.randn(1, 4, 70, 40)
      for _, options in ipairs({ {}, { window = 9 }, { causal = false } }) do
        local a = run(q:bf16(), k:bf16(), v:bf16(), g:bf16(), options)
        local b = run(q:bf16():float(), k:bf16():float(), v:bf16():float(), g:bf16():float(), options)
        for i = 1, 4 do
          assert(a[i].dtype == 'bf16' and (a[i]:double() - b[i]:bf16():double()):abs():max():item() == 0)
        end
      end
      print('exact')
    ]]
    local out, err = shell.run('PMP_ATTENTION_NO_AMX=1 ' .. shell.quote(shell.pmp) .. ' -e ' .. shell.quote(script))
    assert.are.equal('exact\n', out, err)
  end)

  -- An expanded (stride 0) head dim must not end up innermost in the gradient's layout: the kernel
  -- writes each head's rows with the head dim contiguous.
  it('gives expanded keys and values the gradients of their contiguous copies', function()
    local q = pmp.randn(2, 3, 9, 4):requires_grad_()
    local k, v = pmp.randn(2, 1, 9, 4):requires_grad_(), pmp.randn(2, 1, 9, 4):requires_grad_()
    local g = pmp.randn(2, 3, 9, 4)
    F.attention(q, k:expand(2, 3, 9, 4), v:expand(2, 3, 9, 4), { causal = true }):backward(g)
    local q2, k2, v2 = q:detach():requires_grad_(), k:detach():requires_grad_(), v:detach():requires_grad_()
    F.attention(q2, k2:expand(2, 3, 9, 4):contiguous(), v2:expand(2, 3, 9, 4):contiguous(), { causal = true }):backward(g)
    assert.are.same(q2.grad:totable(), q.grad:totable())
    assert.are.same(k2.grad:totable(), k.grad:totable())
    assert.are.same(v2.grad:totable(), v.grad:totable())
  end)

  it('reads a gradient whose rows are not contiguous', function()
    local q, k, v = pmp.randn(2, 2, 9, 4), pmp.randn(2, 2, 9, 4), pmp.randn(2, 2, 9, 4)
    local g = pmp.randn(2, 2, 4, 9):transpose(3, 4)
    local _, dq, dk, dv = run(q, k, v, g)
    local _, dq2, dk2, dv2 = run(q, k, v, g:contiguous())
    assert.is_true(same(dq, dq2) and same(dk, dk2) and same(dv, dv2))
  end)
end)

describe('fused kernels on their vectorized paths', function()
  it('RMSNorm in f32 and bf16 agrees with f64 for row lengths that are not multiples of the vector width', function()
    for _, hidden in ipairs({ 1, 15, 37, 130 }) do
      local x, w = pmp.randn(5, 3, hidden, { dtype = 'f64' }), pmp.randn(hidden, { dtype = 'f64' })
      local g = pmp.randn(5, 3, hidden, { dtype = 'f64' })
      local out64, grads64 = forward_backward(function(a, b) return F.rms_norm(a, b, 1e-6) end, { x, w }, g)
      for dtype, tolerance in pairs({ f32 = 1e-4, bf16 = 0.1 }) do
        local out, grads = forward_backward(function(a, b) return F.rms_norm(a, b, 1e-6) end,
          { x:to(dtype), w:to(dtype) }, g:to(dtype))
        assert.is_true(max_diff(out, out64) < tolerance, dtype .. ' output, hidden ' .. hidden)
        assert.is_true(max_diff(grads[1], grads64[1]) < tolerance * 10, dtype .. ' dx, hidden ' .. hidden)
        assert.is_true(max_diff(grads[2], grads64[2]) < tolerance * 20, dtype .. ' dw, hidden ' .. hidden)
      end
    end
  end)
  it('RoPE in bf16 rounds each product to bf16 before the sum, also for values near overflow and underflow', function()
    for _, table_dtype in ipairs({ 'f32', 'bf16' }) do
      local x = (pmp.randn(2, 3, 5, 12) * (pmp.randn(2, 3, 5, 12) * 20):exp()):bf16()
      local cos = (pmp.randn(5, 12) * (pmp.randn(5, 12) * 20):exp()):to(table_dtype)
      local sin = (pmp.randn(5, 12) * (pmp.randn(5, 12) * 20):exp()):to(table_dtype)
      local xd, c, s = x:double(), cos:double(), sin:double()
      local function rounded(t) return t:float():bf16():double() end
      local x1, x2 = xd:narrow(-1, 1, 6), xd:narrow(-1, 7, 6)
      local y1 = rounded(x1 * c:narrow(-1, 1, 6)) + rounded(-x2 * s:narrow(-1, 1, 6))
      local y2 = rounded(x2 * c:narrow(-1, 7, 6)) + rounded(x1 * s:narrow(-1, 7, 6))
      local expected = pmp.cat({ y1, y2 }, -1):float():bf16():double()
      local got = F.rope(x, cos, sin):double()
      local differ = got:ne(expected):logical_and(got:eq(got):logical_or(expected:eq(expected))):sum():item()
      assert.are.equal(0, differ, table_dtype .. ' tables')
    end
  end)
  it('cross_entropy in f32 and bf16 agrees with f64 across row chunks, with ignored rows', function()
    for _, classes in ipairs({ 7, 65, 1100 }) do
      local logits = pmp.randn(6, classes, { dtype = 'f64' }) * 4
      local targets = pmp.tensor({ 0, classes - 1, -100, 3 % classes, 5 % classes, -100 }, { dtype = 'i64' })
      local g = pmp.randn(6, { dtype = 'f64' })
      local loss64, grads64 = forward_backward(function(a) return F.cross_entropy(a, targets, { reduction = 'none' }) end,
        { logits }, g)
      for dtype, tolerance in pairs({ f32 = 1e-5, bf16 = 0.1 }) do
        local loss, grads = forward_backward(function(a) return F.cross_entropy(a, targets, { reduction = 'none' }) end,
          { logits:to(dtype) }, g:to(dtype))
        local lossf = F.cross_entropy(logits:to(dtype):double(), targets, { reduction = 'none' })
        assert.is_true(max_diff(loss, lossf) < tolerance * 10, dtype .. ' loss, ' .. classes .. ' classes')
        assert.is_true(max_diff(grads[1], grads64[1]) < tolerance, dtype .. ' gradient, ' .. classes .. ' classes')
        assert.are.equal(0, grads[1]:narrow(1, 3, 1):abs():sum():item())
      end
      assert.is_true(loss64:narrow(1, 3, 1):item() == 0)
    end
  end)
end)
