require 'busted.runner'()
-- pmp.nn: the Module machinery (registration, names, state dicts, modes, printing) and every layer
-- and the GPT model against references composed by hand from primitive tensor ops (broadcast
-- multiply-and-sum, matmul, softmax, masks, rsqrt...) or plain Lua math, forward and backward.
-- Expected values never come from the code under test.
local nn = pmp.nn
local F = pmp.F

---------------------------------------------------------------------------------------------------
-- Helpers

local function max_abs(t) return t:double():abs():max():item() end
local function max_diff(a, b) return (a:double() - b:double()):abs():max():item() end

-- a and b agree to tol relative to the size of b.
local function assert_close(a, b, tol, what)
  assert.are.same(b.shape, a.shape, (what or 'value') .. ': shapes differ')
  local d, scale = max_diff(a, b), max_abs(b)
  assert.is_true(d <= tol * (1 + scale),
    string.format('%s differs by %.3g (scale %.3g, tolerance %.3g)', what or 'value', d, scale, tol))
end

local function leaf(t) return t:detach():clone():requires_grad_() end
local function f64(data) return pmp.tensor(data, { dtype = 'f64' }) end

-- Random values for every parameter: norm weights near 1, everything else N(0, std^2).
local function randomize(module, std)
  pmp.no_grad(function()
    for _, pair in ipairs(module:named_parameters()) do
      local name, p = pair[1], pair[2]
      local noise = pmp.randn(p.shape, { dtype = 'f64' })
      if name:match('norm%.weight$') or name == 'weight' and rawget(module, 'eps') then
        p:copy_(noise * 0.2 + 1)
      else
        p:copy_(noise * std)
      end
    end
  end)
  return module
end

local function names_of(module)
  local out = {}
  for k, pair in ipairs(module:named_parameters()) do out[k] = pair[1] end
  return out
end

-- Runs module(inputs...) and reference(P, inputs...), where P maps each parameter name to a detached
-- leaf copy of that parameter, then backpropagates the same random weighting of both outputs and
-- compares outputs, the gradient of every floating input and of every parameter.
local function compare_module(module, reference, inputs, tol)
  local mod_in, ref_in = {}, {}
  for k, x in ipairs(inputs) do
    if pmp.is_tensor(x) and x:is_floating_point() then
      mod_in[k], ref_in[k] = leaf(x), leaf(x)
    else
      mod_in[k], ref_in[k] = x, x
    end
  end
  local out = module(unpack(mod_in, 1, #inputs))
  local weights = pmp.randn(out.shape, { dtype = out.dtype })
  ;(out * weights):sum():backward()
  local P = {}
  for _, pair in ipairs(module:named_parameters()) do P[pair[1]] = leaf(pair[2]) end
  local ref = reference(P, unpack(ref_in, 1, #inputs))
  ;(ref * weights):sum():backward()
  assert_close(out, ref, tol, 'output')
  for k, x in ipairs(mod_in) do
    if pmp.is_tensor(x) and x.requires_grad then
      assert.is_not_nil(x.grad, 'input ' .. k .. ' received no gradient')
      assert_close(x.grad, ref_in[k].grad, tol, 'gradient of input ' .. k)
    end
  end
  for _, pair in ipairs(module:named_parameters()) do
    local name, p = pair[1], pair[2]
    assert.is_not_nil(p.grad, name .. ' received no gradient')
    assert.is_not_nil(P[name].grad, name .. ' is not used by the reference')
    assert_close(p.grad, P[name].grad, tol, 'gradient of ' .. name)
  end
  return out, ref
end

---------------------------------------------------------------------------------------------------
-- Reference compositions (primitive tensor ops only; no F.* fused ops)

-- x [..., in] W [out, in] -> [..., out] by broadcast multiply and sum (no matmul).
local function ref_linear(x, w, b)
  local y = (x:unsqueeze(-2) * w):sum(-1)
  if b then y = y + b end
  return y
end

local function ref_rms_norm(x, w, eps)
  local y = x / (x:square():mean(-1, true) + eps):sqrt()
  if w then y = y * w end
  return y
end

local function ref_layer_norm(x, w, b, eps)
  local n = x:size(-1)
  local mu = x:sum(-1, true) / n
  local c = x - mu
  local y = c / ((c * c):sum(-1, true) / n + eps):sqrt()
  if w then y = y * w end
  if b then y = y + b end
  return y
end

local function ref_norm(P, name, c, x)
  if c.normalization == 'LayerNorm' then
    return ref_layer_norm(x, P[name .. '.weight'], P[name .. '.bias'], c.norm_epsilon)
  end
  return ref_rms_norm(x, P[name .. '.weight'], c.norm_epsilon)
end

-- HF/Megatron rotary tables in plain Lua: angle p * base^(-2i/d), the two halves repeated.
local function rope_tables(T, dim, options)
  options = options or {}
  local base, offset, factor = options.base or 10000, options.offset or 0, options.factor or 1
  local cos, sin = {}, {}
  for t = 1, T do
    cos[t], sin[t] = {}, {}
    for i = 1, dim / 2 do
      local angle = (t - 1 + offset) * base ^ (-2 * (i - 1) / dim) / factor
      cos[t][i], cos[t][i + dim / 2] = math.cos(angle), math.cos(angle)
      sin[t][i], sin[t][i + dim / 2] = math.sin(angle), math.sin(angle)
    end
  end
  return f64(cos), f64(sin)
end

local function rotate_half(x)
  local half = x:size(-1) / 2
  return pmp.cat({ -x:narrow(-1, half + 1, half), x:narrow(-1, 1, half) }, -1)
end

-- Rotate-half RoPE on the first rotary_dim channels of x [..., T, d]; the rest passes through.
local function ref_rope(x, cos, sin)
  local r, d = cos:size(-1), x:size(-1)
  local rot = x:narrow(-1, 1, r)
  rot = rot * cos + rotate_half(rot) * sin
  if r == d then return rot end
  return pmp.cat({ rot, x:narrow(-1, r + 1, d - r) }, -1)
end

local function causal_mask(T)
  local hidden = {}
  for t = 1, T do
    hidden[t] = {}
    for s = 1, T do hidden[t][s] = s > t end
  end
  return pmp.tensor(hidden)
end

-- Self-attention from the Megatron layout: linear_qkv rows are [q heads of group g, k_g, v_g] per
-- KV group g; each query head h attends with the K/V of its group (repeated KV heads).
local function ref_attention(P, prefix, c, x, rope)
  local heads, groups, d = c.num_attention_heads, c.num_query_groups, c.kv_channels
  local per_group = heads / groups
  local W, bias = P[prefix .. 'linear_qkv.weight'], P[prefix .. 'linear_qkv.bias']
  local function rows(first, count)
    return W:narrow(1, first, count), bias and bias:narrow(1, first, count) or nil
  end
  local T = x:size(-2)
  local mask = causal_mask(T)
  local function prepare(v, norm_name)
    if norm_name and P[prefix .. norm_name .. '.weight'] then v = ref_norm(P, prefix .. norm_name, c, v) end
    if rope then v = ref_rope(v, rope.cos, rope.sin) end
    return v
  end
  local outputs = {}
  for g = 0, groups - 1 do
    local block = g * (per_group + 2) * d
    local k = prepare(ref_linear(x, rows(block + per_group * d + 1, d)), 'k_layernorm')
    local v = ref_linear(x, rows(block + (per_group + 1) * d + 1, d))
    for j = 0, per_group - 1 do
      local q = prepare(ref_linear(x, rows(block + j * d + 1, d)), 'q_layernorm')
      local scores = q:matmul(k:transpose(-1, -2)) / math.sqrt(d)
      local probs = scores:masked_fill(mask, -math.huge):softmax(-1)
      outputs[g * per_group + j + 1] = probs:matmul(v)
    end
  end
  return ref_linear(pmp.cat(outputs, -1), P[prefix .. 'linear_proj.weight'], P[prefix .. 'linear_proj.bias'])
end

local function ref_mlp(P, prefix, c, x)
  local h = ref_linear(x, P[prefix .. 'linear_fc1.weight'], P[prefix .. 'linear_fc1.bias'])
  local f = c.ffn_hidden_size
  if c.activation == 'swiglu' then
    local gate, up = h:narrow(-1, 1, f), h:narrow(-1, f + 1, f)
    h = gate * gate:sigmoid() * up
  elseif c.activation == 'gelu' then
    h = h:gelu()
  elseif c.activation == 'gelu_tanh' then
    h = h * 0.5 * (((h + h * h * h * 0.044715) * math.sqrt(2 / math.pi)):tanh() + 1)
  elseif c.activation == 'relu' then
    h = h:clamp(0)
  end
  return ref_linear(h, P[prefix .. 'linear_fc2.weight'], P[prefix .. 'linear_fc2.bias'])
end

local function ref_block(P, prefix, c, x, rope)
  x = x + ref_attention(P, prefix .. 'self_attention.', c, ref_norm(P, prefix .. 'input_layernorm', c, x), rope)
  return x + ref_mlp(P, prefix .. 'mlp.', c, ref_norm(P, prefix .. 'pre_mlp_layernorm', c, x))
end

local function one_hot(ids, V)
  local rows = {}
  for b = 1, #ids do
    rows[b] = {}
    for t = 1, #ids[b] do
      local row = {}
      for v = 1, V do row[v] = (v - 1 == ids[b][t]) and 1 or 0 end
      rows[b][t] = row
    end
  end
  return f64(rows)
end

local function ref_gpt(P, c, ids)
  local B, T = #ids, #ids[1]
  local E = P['embedding.word_embeddings.weight']
  local x = one_hot(ids, c.vocab_size):reshape(B * T, c.vocab_size):matmul(E):view(B, T, c.hidden_size)
  local cos, sin = rope_tables(T, math.floor(c.kv_channels * c.rotary_percent), { base = c.rotary_base })
  for l = 0, c.num_layers - 1 do x = ref_block(P, 'decoder.layers.' .. l .. '.', c, x, { cos = cos, sin = sin }) end
  x = ref_norm(P, 'decoder.final_layernorm', c, x)
  return x:matmul((P['output_layer.weight'] or E):t())
end

local function ids_tensor(ids) return pmp.tensor(ids, { dtype = 'i64' }) end

---------------------------------------------------------------------------------------------------
-- Module machinery

local Net = nn.Module:extend('Net')
function Net:init(n)
  self.scale = pmp.ones(n, { dtype = 'f64' }):requires_grad_()
  self.first = nn.Linear(n, 3, { dtype = 'f64' })
  self.note = 'plain field'
  self.constant = pmp.ones(2, { dtype = 'f64' })          -- no grad: a plain field, not a parameter
  self.shift = pmp.zeros(3, { dtype = 'f64' }):requires_grad_()
  self.second = nn.Linear(3, 2, { dtype = 'f64', bias = false })
  self:register_buffer('running', pmp.zeros(2, { dtype = 'f64' }))
  self:register_buffer('scratch', pmp.zeros(2, { dtype = 'f64' }), false)
end
function Net:forward(x) return self.second(self.first(x * self.scale) + self.shift) end

describe('nn.Module', function()
  before_each(function() pmp.manual_seed(11) end)

  it('registers parameters and children on assignment, in assignment order', function()
    local m = Net(4)
    assert.are.same({ 'scale', 'shift', 'first.weight', 'first.bias', 'second.weight' }, names_of(m))
    assert.are.equal('plain field', m.note)
    assert.are.equal(2, m.constant:numel())
    assert.are.equal(2, #m:children())
    assert.are.equal('first', m:named_children()[1][1])
    assert.are.equal('second', m:named_children()[2][1])
    -- reassigning keeps the position; assigning nil removes
    m.first = nn.Linear(4, 3, { dtype = 'f64', bias = false })
    assert.are.same({ 'scale', 'shift', 'first.weight', 'second.weight' }, names_of(m))
    m.scale = nil
    assert.are.same({ 'shift', 'first.weight', 'second.weight' }, names_of(m))
    assert.is_nil(m.scale)
  end)

  it('parameters() follows named_parameters() and num_parameters counts elements', function()
    local m = Net(4)
    local named, plain = m:named_parameters(), m:parameters()
    assert.are.equal(#named, #plain)
    for k = 1, #named do assert.is_true(named[k][2].ptr == plain[k].ptr) end
    assert.are.equal(4 + 3 + 3 * 4 + 3 + 2 * 3, m:num_parameters())
    assert.are.equal(0, nn.Dropout(0.1):num_parameters())
  end)

  it('state_dict shares the tensors and includes persistent buffers only', function()
    local m = Net(4)
    local sd = m:state_dict()
    local keys = {}
    for k in pairs(sd) do keys[#keys + 1] = k end
    table.sort(keys)
    assert.are.same({ 'first.bias', 'first.weight', 'running', 'scale', 'second.weight', 'shift' }, keys)
    assert.is_true(sd['first.weight'].ptr == m.first.weight.ptr)
    pmp.no_grad(function() sd['shift']:fill_(2.5) end)
    assert.are.same({ 2.5, 2.5, 2.5 }, m.shift:totable())
  end)

  it('load_state_dict copies values (with dtype conversion) and does not alias the source', function()
    local m = Net(2)
    local sd = {
      scale = pmp.tensor({ 1.5, -2 }), shift = pmp.tensor({ 0.25, 0.5, 0.75 }),
      ['first.weight'] = pmp.tensor({ { 1, 2 }, { 3, 4 }, { 5, 6 } }), ['first.bias'] = pmp.tensor({ -1, 0, 1 }),
      ['second.weight'] = pmp.tensor({ { 1, 0, -1 }, { 0.5, 0.5, 0.5 } }), running = pmp.tensor({ 7, 8 }),
    }
    local result = m:load_state_dict(sd)
    assert.are.same({}, result.missing)
    assert.are.same({}, result.unexpected)
    assert.are.equal('f64', m.scale.dtype)
    assert.are.same({ 1.5, -2 }, m.scale:totable())
    assert.are.same({ { 1, 2 }, { 3, 4 }, { 5, 6 } }, m.first.weight:totable())
    assert.are.same({ 7, 8 }, m.running:totable())
    sd.scale:fill_(0)
    assert.are.same({ 1.5, -2 }, m.scale:totable())
    -- the loaded module computes with the loaded values: x=(1,1) -> scale*x=(1.5,-2)
    -- first: (1.5-4-1, 4.5-8, 7.5-12+1) = (-3.5, -3.5, -3.5); +shift = (-3.25, -3, -2.75)
    -- second: (-3.25+2.75, 0.5*(-9)) = (-0.5, -4.5)
    local y = m(f64({ { 1, 1 } }))
    assert.is_true(max_diff(y, f64({ { -0.5, -4.5 } })) < 1e-12)
    assert.is_true(m.scale.requires_grad and m.scale.is_leaf)
  end)

  it('strict load_state_dict lists missing, unexpected and mis-shaped keys and changes nothing', function()
    local m = Net(2)
    local before = m.first.weight:clone()
    local sd = {}
    for k, v in pairs(m:state_dict()) do sd[k] = v:clone() + 1 end
    sd['scale'] = nil
    sd['running'] = nil
    sd['extra.weight'] = pmp.zeros(1)
    sd['first.weight'] = pmp.zeros(2, 3)
    local ok, message = pcall(m.load_state_dict, m, sd)
    assert.is_false(ok)
    assert.matches('load_state_dict', message, 1, true)
    assert.matches('missing keys: running, scale', message, 1, true)
    assert.matches('unexpected keys: extra.weight', message, 1, true)
    assert.matches('mis-shaped keys: first.weight (checkpoint [2,3], model [3,2])', message, 1, true)
    assert.are.equal(0, max_diff(m.first.weight, before))
    assert.are.same({ 0, 0, 0 }, m.shift:totable())
  end)

  it('strict=false tolerates missing and unexpected keys but not mis-shaped ones', function()
    local m = Net(2)
    local result = m:load_state_dict({ shift = pmp.tensor({ 1, 2, 3 }), bogus = pmp.zeros(3) }, { strict = false })
    assert.are.same({ 1, 2, 3 }, m.shift:totable())
    assert.are.same({ 'bogus' }, result.unexpected)
    assert.are.same({ 'first.bias', 'first.weight', 'running', 'scale', 'second.weight' }, result.missing)
    assert.are.same({ 1, 1 }, m.scale:totable())
    local ok, message = pcall(m.load_state_dict, m, { shift = pmp.zeros(4) }, { strict = false })
    assert.is_false(ok)
    assert.matches('mis-shaped keys: shift (checkpoint [4], model [3])', message, 1, true)
    assert.is_nil(message:find('missing', 1, true))
  end)

  it('train() and eval() set training on every module; apply visits every module', function()
    local m = nn.GPTModel({ num_layers = 2, hidden_size = 8, num_attention_heads = 2, vocab_size = 5, dtype = 'f64' })
    local visited = {}
    local returned = m:apply(function(mod) visited[#visited + 1] = mod end)
    assert.is_true(returned == m)
    assert.are.equal(m, visited[#visited])            -- children first, the root last
    -- GPTModel, embedding, word_embeddings, rotary, decoder, layers, 2 x (block + 2 norms + attn + 2 linears
    -- + mlp + 2 linears), final norm
    assert.are.equal(1 + 2 + 1 + 1 + 1 + 2 * 9 + 1, #visited)
    assert.is_true(m:eval() == m)
    for _, mod in ipairs(visited) do assert.is_false(mod.training) end
    m:train()
    for _, mod in ipairs(visited) do assert.is_true(mod.training) end
    m.decoder:train(false)
    assert.is_true(m.training)
    assert.is_false(m.decoder.layers.items[2].mlp.linear_fc2.training)
    assert.is_true(m.embedding.word_embeddings.training)
  end)

  it('tostring shows the module tree with parameter counts', function()
    local text = tostring(Net(4))
    local lines = {}
    for line in text:gmatch('[^\n]+') do lines[#lines + 1] = line end
    assert.are.equal('Net() 28 params', lines[1])
    assert.matches('scale: f64 [4]', text, 1, true)
    assert.matches('(first): Linear(4 -> 3) 15 params', text, 1, true)
    assert.matches('(second): Linear(3 -> 2, no bias) 6 params', text, 1, true)
    assert.matches('    weight: f64 [3,4]', text, 1, true)
    local big = tostring(nn.Embedding(1000, 12))
    assert.matches('Embedding(1000 x 12) 12.0K params', big, 1, true)
  end)

  it('is callable: m(x) runs forward', function()
    local m = randomize(Net(3), 0.5)
    local x = pmp.randn(2, 3, { dtype = 'f64' })
    assert.are.equal(0, max_diff(m(x), m:forward(x)))
    local base = nn.Module()
    local ok, message = pcall(function() return base(x) end)
    assert.is_false(ok)
    assert.matches('forward is not implemented', message, 1, true)
  end)

  it('zero_grad clears the gradients of every parameter', function()
    local m = randomize(Net(3), 0.5)
    m(pmp.randn(2, 3, { dtype = 'f64' })):sum():backward()
    for _, p in ipairs(m:parameters()) do assert.is_not_nil(p.grad) end
    m:zero_grad()
    for _, p in ipairs(m:parameters()) do assert.is_nil(p.grad) end
  end)

  it('ModuleList names its children 0, 1, ...', function()
    local list = nn.ModuleList({ nn.Linear(2, 2), nn.Linear(2, 3, { bias = false }) })
    assert.are.same({ '0.weight', '0.bias', '1.weight' }, names_of(list))
    assert.are.equal(2, #list.items)
  end)
end)

---------------------------------------------------------------------------------------------------
-- Layers

describe('nn layers against hand-composed references', function()
  before_each(function() pmp.manual_seed(21) end)

  it('Linear with and without bias (2-D and 3-D inputs)', function()
    for _, bias in ipairs({ true, false }) do
      local layer = randomize(nn.Linear(5, 4, { dtype = 'f64', bias = bias }), 0.7)
      assert.are.equal(bias, layer.bias ~= nil)
      for _, shape in ipairs({ { 3, 5 }, { 2, 3, 5 } }) do
        layer:zero_grad()
        compare_module(layer, function(P, x) return ref_linear(x, P.weight, P.bias) end,
          { pmp.randn(shape, { dtype = 'f64' }) }, 1e-12)
      end
    end
    -- closed form on a tiny case: y = W x + b
    local layer = nn.Linear(2, 2, { dtype = 'f64' })
    layer:load_state_dict({ weight = f64({ { 1, 2 }, { 3, 4 } }), bias = f64({ 0.5, -0.5 }) })
    assert.are.same({ { 1 * 1 + 2 * -1 + 0.5, 3 * 1 + 4 * -1 - 0.5 } }, layer(f64({ { 1, -1 } })):totable())
  end)

  it('Linear initializes weight from N(0, init_std^2) and bias to zero', function()
    local layer = nn.Linear(200, 100, { init_std = 0.05 })
    local w = layer.weight:double()
    assert.is_true(math.abs(w:mean():item()) < 0.005)
    assert.is_true(math.abs(w:square():mean():sqrt():item() - 0.05) < 0.002)
    assert.are.equal(0, max_abs(layer.bias))
    assert.are.equal('f32', layer.weight.dtype)
  end)

  it('Embedding gathers rows, accumulating gradients of repeated ids', function()
    local layer = randomize(nn.Embedding(7, 3, { dtype = 'f64' }), 1)
    local ids = { { 0, 6, 2, 6 }, { 3, 3, 3, 1 } }
    compare_module(layer, function(P, x)
      return one_hot(ids, 7):reshape(8, 7):matmul(P.weight):view(2, 4, 3)
    end, { ids_tensor(ids) }, 1e-12)
    local w = layer.weight:totable()
    local y = layer(ids_tensor({ 5, 0 })):totable()
    assert.are.same({ w[6], w[1] }, y)
    local ok, message = pcall(function() return layer(ids_tensor({ 7 })) end)
    assert.is_false(ok)
    assert.matches('token id 7 is out of range for a vocabulary of 7', message, 1, true)
  end)

  it('RMSNorm: x / sqrt(mean(x^2) + eps) * w', function()
    local layer = randomize(nn.RMSNorm(6, { dtype = 'f64', eps = 1e-3 }), 1)
    assert.are.equal(1e-3, layer.eps)
    compare_module(layer, function(P, x) return ref_rms_norm(x, P.weight, 1e-3) end,
      { pmp.randn(2, 3, 6, { dtype = 'f64' }) * 0.1 }, 1e-12)
    assert.are.equal(1e-6, nn.RMSNorm(4).eps)
  end)

  it('LayerNorm: (x - mean) / sqrt(var + eps) * w + b, with and without bias', function()
    for _, bias in ipairs({ true, false }) do
      local layer = nn.LayerNorm(6, { dtype = 'f64', eps = 1e-2, bias = bias })
      randomize(layer, 0.5)
      pmp.no_grad(function() layer.weight:copy_(pmp.randn(6, { dtype = 'f64' }) * 0.2 + 1) end)
      compare_module(layer, function(P, x) return ref_layer_norm(x, P.weight, P.bias, 1e-2) end,
        { pmp.randn(4, 6, { dtype = 'f64' }) * 2 + 1 }, 1e-12)
    end
  end)

  it('LayerNorm keeps epsilon on rows whose variance is comparable to it, in f32 and bf16', function()
    -- variance ~ 9e-6 against eps = 1e-5: without eps the output would grow by ~1.5x
    local x = pmp.randn(6, 40, { dtype = 'f64' }) * 3e-3 + 1e-3
    local w = pmp.randn(40, { dtype = 'f64' }) * 0.1 + 1
    local b = pmp.randn(40, { dtype = 'f64' }) * 0.1
    for dtype, tolerance in pairs({ f32 = 1e-6, bf16 = 1e-2 }) do
      local layer = nn.LayerNorm(40, { dtype = dtype, eps = 1e-5 })
      pmp.no_grad(function()
        layer.weight:copy_(w)
        layer.bias:copy_(b)
      end)
      local xr = x:to(dtype)
      local want = ref_layer_norm(xr:double(), layer.weight:double(), layer.bias:double(), 1e-5)
      local got = layer(xr)
      local off = max_diff(got, want) / max_abs(want)
      assert.is_true(off < tolerance, dtype .. ' output off by ' .. off)
    end
  end)

  it('Dropout is the identity in eval mode and scales kept values by 1/(1-p) in training', function()
    local drop = nn.Dropout(0.25)
    local x = leaf(pmp.ones(20000, { dtype = 'f64' }))
    drop:eval()
    local y = drop(x)
    assert.are.equal(0, max_diff(y, x))
    drop:train()
    local y2 = drop(x)
    y2:sum():backward()
    local zeros, kept = 0, 0
    for _, v in ipairs(y2:totable()) do
      if v == 0 then zeros = zeros + 1
      elseif math.abs(v - 1 / 0.75) < 1e-12 then kept = kept + 1 end
    end
    assert.are.equal(20000, zeros + kept)
    assert.is_true(math.abs(zeros / 20000 - 0.25) < 0.02, 'dropped fraction ' .. zeros / 20000)
    assert.are.equal(0, max_diff(x.grad, y2))       -- d(sum y)/dx = mask / (1 - p)
    assert.are.equal(0.5, nn.Dropout().p)
    assert.are.equal(0, max_abs(nn.Dropout(1)(x)))
  end)

  it('RotaryEmbedding tables equal cos/sin of p * base^(-2i/d), halves repeated', function()
    for _, case in ipairs({ { dim = 8, base = 10000, T = 7, offset = 0 }, { dim = 6, base = 500, T = 5, offset = 3 } }) do
      local rotary = nn.RotaryEmbedding(case.dim, { base = case.base })
      local cos, sin = rotary(case.T, case.offset, 'f64')
      assert.are.equal('f64', cos.dtype)
      local ec, es = rope_tables(case.T, case.dim, { base = case.base, offset = case.offset })
      assert_close(cos, ec, 1e-6, 'cos')
      assert_close(sin, es, 1e-6, 'sin')
      local c2 = rotary(case.T, case.offset, 'f64')
      assert.is_true(c2.ptr == cos.ptr, 'tables are cached')
      local c32 = rotary(case.T, case.offset)
      assert.are.equal('f32', c32.dtype)
    end
    local scaled = nn.RotaryEmbedding(4, { scaling = { type = 'linear', factor = 4 } })
    local cos, sin = scaled(6)
    local ec, es = rope_tables(6, 4, { factor = 4 })
    assert_close(cos, ec, 1e-6, 'scaled cos')
    assert_close(sin, es, 1e-6, 'scaled sin')
    assert.are.same({}, names_of(scaled))
    assert.is_nil(scaled:state_dict().inv_freq)
  end)

  describe('Attention', function()
    local function run(options, T)
      local c = nn.config(options)
      local attention = randomize(nn.Attention(c), 0.4)
      local cos, sin = rope_tables(T, c.kv_channels)
      local x = pmp.randn(2, T, c.hidden_size, { dtype = 'f64' })
      compare_module(attention, function(P, input, rope) return ref_attention(P, '', c, input, rope) end,
        { x, { cos = cos, sin = sin } }, 1e-10)
      return attention, c
    end
    local base = { num_layers = 1, hidden_size = 16, num_attention_heads = 4, vocab_size = 8, dtype = 'f64' }
    local function with(extra)
      local out = {}
      for k, v in pairs(base) do out[k] = v end
      for k, v in pairs(extra) do out[k] = v end
      return out
    end

    it('MHA and GQA (4 heads with 4, 2 and 1 KV groups) match the grouped-rows composition', function()
      for _, groups in ipairs({ 4, 2, 1 }) do
        local attention = run(with({ num_query_groups = groups }), 6)
        assert.are.same({ (4 + 2 * groups) * 4, 16 }, attention.linear_qkv.weight.shape)
        assert.are.same({ 16, 16 }, attention.linear_proj.weight.shape)
        assert.are.same({ 'linear_qkv.weight', 'linear_proj.weight' }, names_of(attention))
      end
    end)

    it('6 heads in 2 groups with kv_channels different from hidden/heads, and linear biases', function()
      local attention = run(with({ hidden_size = 12, num_attention_heads = 6, num_query_groups = 2, kv_channels = 4,
        add_qkv_bias = true, add_bias_linear = true }), 5)
      assert.are.same({ 'linear_qkv.weight', 'linear_qkv.bias', 'linear_proj.weight', 'linear_proj.bias' }, names_of(attention))
      assert.are.same({ 12, 24 }, attention.linear_proj.weight.shape)
    end)

    it('qk_layernorm normalizes each query and key head before RoPE (RMSNorm and LayerNorm)', function()
      local attention = run(with({ num_query_groups = 2, qk_layernorm = true }), 5)
      assert.are.same({ 'linear_qkv.weight', 'q_layernorm.weight', 'k_layernorm.weight', 'linear_proj.weight' },
        names_of(attention))
      assert.are.same({ 4 }, attention.q_layernorm.weight.shape)
      run(with({ num_query_groups = 1, qk_layernorm = true, normalization = 'LayerNorm' }), 4)
    end)

    it('is causal: outputs at a position ignore later tokens', function()
      local c = nn.config(with({ num_query_groups = 2 }))
      local attention = randomize(nn.Attention(c), 0.4)
      local x = pmp.randn(1, 5, 16, { dtype = 'f64' })
      local y = pmp.cat({ x:narrow(2, 1, 3), pmp.randn(1, 2, 16, { dtype = 'f64' }) }, 2)
      local cos, sin = rope_tables(5, 4)
      local a, b = attention(x, { cos = cos, sin = sin }), attention(y, { cos = cos, sin = sin })
      assert.is_true(max_diff(a:narrow(2, 1, 3), b:narrow(2, 1, 3)) < 1e-14)
      assert.is_true(max_diff(a:narrow(2, 4, 2), b:narrow(2, 4, 2)) > 1e-6)
    end)
  end)

  it('MLP: SwiGLU over fc1 rows [gate; up], GELU, tanh-GELU and ReLU, with and without biases', function()
    for _, case in ipairs({
      { activation = 'swiglu' }, { activation = 'gelu' }, { activation = 'gelu_tanh' }, { activation = 'relu' },
      { activation = 'swiglu', add_bias_linear = true },
    }) do
      local c = nn.config({ num_layers = 1, hidden_size = 6, num_attention_heads = 2, vocab_size = 4, dtype = 'f64',
        ffn_hidden_size = 10, activation = case.activation, add_bias_linear = case.add_bias_linear })
      local mlp = randomize(nn.MLP(c), 0.5)
      local gated = case.activation == 'swiglu'
      assert.are.same({ (gated and 20 or 10), 6 }, mlp.linear_fc1.weight.shape)
      compare_module(mlp, function(P, x) return ref_mlp(P, '', c, x) end,
        { pmp.randn(2, 3, 6, { dtype = 'f64' }) }, 1e-11)
    end
    -- Megatron's default FFN size: 4h for GELU, 4h*2/3 for SwiGLU
    assert.are.equal(48, nn.config({ num_layers = 1, hidden_size = 12, num_attention_heads = 2, vocab_size = 4,
      activation = 'gelu' }).ffn_hidden_size)
    assert.are.equal(32, nn.config({ num_layers = 1, hidden_size = 12, num_attention_heads = 2, vocab_size = 4 }).ffn_hidden_size)
  end)

  it('TransformerBlock: x + attn(norm(x)), then + mlp(norm(.)) (pre-norm, RMSNorm and LayerNorm)', function()
    for _, normalization in ipairs({ 'RMSNorm', 'LayerNorm' }) do
      local c = nn.config({ num_layers = 1, hidden_size = 8, num_attention_heads = 4, num_query_groups = 2,
        vocab_size = 4, dtype = 'f64', ffn_hidden_size = 12, normalization = normalization, norm_epsilon = 1e-4 })
      local block = randomize(nn.TransformerBlock(c), 0.4)
      local cos, sin = rope_tables(5, 2)
      compare_module(block, function(P, x, rope) return ref_block(P, '', c, x, rope) end,
        { pmp.randn(2, 5, 8, { dtype = 'f64' }), { cos = cos, sin = sin } }, 1e-10)
    end
  end)
end)

---------------------------------------------------------------------------------------------------
-- GPTModel

describe('nn.GPTModel', function()
  before_each(function() pmp.manual_seed(31) end)
  local config = { num_layers = 2, hidden_size = 16, num_attention_heads = 4, num_query_groups = 2, vocab_size = 13,
    ffn_hidden_size = 24, dtype = 'f64' }
  local function with(extra)
    local out = {}
    for k, v in pairs(config) do out[k] = v end
    for k, v in pairs(extra or {}) do out[k] = v end
    return out
  end
  local ids = { { 1, 5, 12, 0, 5, 7 }, { 3, 3, 9, 2, 11, 4 } }

  it('has exactly the Megatron-Core parameter names', function()
    local untied = nn.GPTModel(with({ tie_embeddings = false }))
    local expected = { 'embedding.word_embeddings.weight' }
    for l = 0, 1 do
      local p = 'decoder.layers.' .. l .. '.'
      for _, s in ipairs({ 'input_layernorm.weight', 'self_attention.linear_qkv.weight', 'self_attention.linear_proj.weight',
        'pre_mlp_layernorm.weight', 'mlp.linear_fc1.weight', 'mlp.linear_fc2.weight' }) do
        expected[#expected + 1] = p .. s
      end
    end
    expected[#expected + 1] = 'decoder.final_layernorm.weight'
    expected[#expected + 1] = 'output_layer.weight'
    assert.are.same(expected, names_of(untied))
    local keys = {}
    for k in pairs(untied:state_dict()) do keys[#keys + 1] = k end
    table.sort(keys)
    local sorted = { unpack(expected) }
    table.sort(sorted)
    assert.are.same(sorted, keys)
    -- tied (the default): no output layer
    local tied = nn.GPTModel(with())
    table.remove(expected)
    assert.are.same(expected, names_of(tied))
    assert.is_nil(tied.output_layer)
    -- shapes: qkv (4 + 2*2) * 4 rows, fc1 [gate; up] 2 * 24 rows
    assert.are.same({ 32, 16 }, tied.decoder.layers.items[1].self_attention.linear_qkv.weight.shape)
    assert.are.same({ 48, 16 }, tied.decoder.layers.items[2].mlp.linear_fc1.weight.shape)
    assert.are.same({ 16, 24 }, tied.decoder.layers.items[2].mlp.linear_fc2.weight.shape)
    assert.are.same({ 13, 16 }, untied.output_layer.weight.shape)
    assert.are.equal(tied:num_parameters() + 13 * 16, untied:num_parameters())
  end)

  it('tied: logits and all gradients match the composition using the embedding as output layer', function()
    local model = randomize(nn.GPTModel(with()), 0.3)
    compare_module(model, function(P) return ref_gpt(P, model.config, ids) end, { ids_tensor(ids) }, 1e-6)
  end)

  it('untied: logits and all gradients match the composition using output_layer.weight', function()
    local model = randomize(nn.GPTModel(with({ tie_embeddings = false })), 0.3)
    local out = compare_module(model, function(P) return ref_gpt(P, model.config, ids) end, { ids_tensor(ids) }, 1e-6)
    assert.are.same({ 2, 6, 13 }, out.shape)
  end)

  it('LayerNorm, MHA, partial rotary and GELU variant matches too', function()
    local model = randomize(nn.GPTModel(with({ num_query_groups = 4, normalization = 'LayerNorm', activation = 'gelu',
      rotary_percent = 0.5, tie_embeddings = false, rotary_base = 100 })), 0.3)
    compare_module(model, function(P) return ref_gpt(P, model.config, ids) end, { ids_tensor(ids) }, 1e-6)
  end)

  it('hidden_dropout acts in training only: eval() gives the dropout-free composition', function()
    local model = randomize(nn.GPTModel(with({ hidden_dropout = 0.5 })), 0.3)
    local input = ids_tensor(ids)
    model:eval()
    compare_module(model, function(P) return ref_gpt(P, model.config, ids) end, { input }, 1e-6)
    model:train()
    local a, b = model(input), model(input)
    assert.is_true(max_diff(a, b) > 1e-3, 'training-mode outputs should differ between calls')
  end)

  it('with targets returns F.cross_entropy of the logits (ignore_index respected)', function()
    local model = randomize(nn.GPTModel(with()), 0.3)
    local input = ids_tensor(ids)
    local targets = { { 5, 12, 0, 5, 7, -100 }, { 3, 9, 2, 11, 4, 8 } }
    local logits = model(input)
    local loss = model(input, ids_tensor(targets))
    assert.are.same({}, loss.shape)
    assert.is_true(math.abs(loss:item() - F.cross_entropy(logits, ids_tensor(targets)):item()) < 1e-12)
    -- and the plain definition: mean over counted targets of logsumexp(logits) - logit[target]
    local l = logits:totable()
    local total, count = 0, 0
    for b = 1, 2 do
      for t = 1, 6 do
        local target = targets[b][t]
        if target ~= -100 then
          local m = -math.huge
          for _, v in ipairs(l[b][t]) do m = math.max(m, v) end
          local s = 0
          for _, v in ipairs(l[b][t]) do s = s + math.exp(v - m) end
          total = total + (m + math.log(s) - l[b][t][target + 1])
          count = count + 1
        end
      end
    end
    assert.is_true(math.abs(loss:item() - total / count) < 1e-10)
    local summed = model(input, ids_tensor(targets), { reduction = 'sum' })
    assert.is_true(math.abs(summed:item() - total) < 1e-9)
  end)

  it('a tiny model trained with AdamW on a fixed batch reduces its loss substantially', function()
    pmp.manual_seed(5)
    local model = nn.GPTModel({ num_layers = 2, hidden_size = 32, num_attention_heads = 4, num_query_groups = 2,
      vocab_size = 24, ffn_hidden_size = 64 })
    local input = pmp.randint(24, { 4, 12 })
    local targets = pmp.randint(24, { 4, 12 })
    local opt = pmp.optim.AdamW(model:parameters(), { lr = 1e-2, weight_decay = 0.01 })
    local first, last
    for step = 1, 30 do
      opt:zero_grad()
      local loss = model(input, targets)
      loss:backward()
      opt:step()
      if step == 1 then first = loss:item() end
      last = loss:item()
    end
    assert.is_true(math.abs(first - math.log(24)) < 0.3, 'initial loss ' .. first .. ' should be near ln(24)')
    assert.is_true(last < 0.5 * first, string.format('loss went from %.3f to %.3f', first, last))
  end)

  -- A falling loss also survives a wrong update (no bias correction, decay applied twice...); this
  -- checks the same training loop step by step against AdamW written out here in f64.
  it('trains with AdamW exactly as the textbook update applied to its gradients would (f64, 3 steps)', function()
    pmp.manual_seed(6)
    local model = nn.GPTModel({ num_layers = 1, hidden_size = 16, num_attention_heads = 2, vocab_size = 12,
      ffn_hidden_size = 32, dtype = 'f64' })
    local input, targets = pmp.randint(12, { 2, 6 }), pmp.randint(12, { 2, 6 })
    local lr, b1, b2, eps, wd = 3e-2, 0.9, 0.95, 1e-8, 0.1
    local opt = pmp.optim.AdamW(model:parameters(), { lr = lr, betas = { b1, b2 }, eps = eps, weight_decay = wd })
    local params = model:named_parameters()
    local m, v = {}, {}
    for k, pair in ipairs(params) do m[k], v[k] = pair[2]:detach() * 0, pair[2]:detach() * 0 end
    for step = 1, 3 do
      opt:zero_grad()
      model(input, targets):backward()
      local expected = {}
      for k, pair in ipairs(params) do
        local p, g = pair[2]:detach(), pair[2].grad
        m[k] = m[k] * b1 + g * (1 - b1)
        v[k] = v[k] * b2 + g:square() * (1 - b2)
        local m_hat, v_hat = m[k] / (1 - b1 ^ step), v[k] / (1 - b2 ^ step)
        expected[k] = p * (1 - lr * wd) - m_hat / (v_hat:sqrt() + eps) * lr
      end
      opt:step()
      for k, pair in ipairs(params) do
        assert_close(pair[2]:detach(), expected[k], 1e-12, pair[1] .. ' after step ' .. step)
      end
    end
  end)

  it('packs documents: positions restart and attention stays inside each document', function()
    pmp.manual_seed(1)
    local m = pmp.nn.GPTModel({ num_layers = 2, hidden_size = 32, num_attention_heads = 4, num_query_groups = 2,
      vocab_size = 20, dtype = 'f64' })
    local a, b = pmp.randint(0, 20, { 1, 5 }), pmp.randint(0, 20, { 1, 7 })
    local positions = pmp.tensor({ { 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6 } }, { dtype = 'i64' })
    local first_key = pmp.tensor({ { 0, 0, 0, 0, 0, 5, 5, 5, 5, 5, 5, 5 } }, { dtype = 'i64' })
    local packed = m(pmp.cat({ a, b }, 2), nil, { positions = positions, first_key = first_key })
    local separate = pmp.cat({ m(a), m(b) }, 2)
    assert.is_true((packed - separate):abs():max():item() < 1e-12)
  end)
end)
