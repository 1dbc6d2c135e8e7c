require 'busted.runner'()
-- pmp.models and models/*.lua against tiny random-weight Hugging Face models written by transformers
-- (tools/make_hf_fixtures.py -> spec/fixtures/hf/<name>/): logits, loss, greedy continuation and
-- gradient norms match transformers' in float32; save_pretrained round trips bit for bit; bad configs
-- and bad weight files are errors that name what is wrong.
local json = require 'pmp.json'
local pio = require 'pmp.io'
local st = require 'pmp.safetensors'
local models = require 'pmp.models'
local tensor = require 'pmp.tensor'

local ROOT = package.loaded['pmp.root'] or '.'
local FIXTURES = ROOT .. '/spec/fixtures/hf'
local NAMES = { 'llama', 'llama3_bias_tied', 'mistral', 'qwen2_tied', 'qwen3' }

local fails_with = require('spec.support.expect').fails_with

local tmp
before_each(function()
  tmp = string.format('%s/pmp_hf_spec.%d.%d', os.getenv('TMPDIR') or '/tmp', pio.getpid(), math.random(1e9))
  pio.mkdir_p(tmp)
end)
after_each(function() pio.remove_tree(tmp) end)

local reference_fixture = require 'spec.support.reference_fixture'

local function reference(name)
  local dir = FIXTURES .. '/' .. name
  local ref = reference_fixture.read(dir)
  return ref, dir
end

-- Next-token targets for ids [B, T]: ids shifted left, the last position ignored (HF's labels = ids).
local function shifted(ids)
  local rows = ids:totable()
  for _, row in ipairs(rows) do
    table.remove(row, 1)
    row[#row + 1] = -100
  end
  return tensor.tensor(rows, { dtype = 'i64' })
end

-- Greedy decoding without a KV cache: re-run the whole sequence for every new token.
local function greedy(model, ids, steps)
  local rows = ids:totable()
  local out = {}
  for b = 1, #rows do out[b] = {} end
  for _ = 1, steps do
    local logits = model(tensor.tensor(rows, { dtype = 'i64' }))
    local last = logits:narrow(2, logits:size(2), 1):totable()
    for b = 1, #rows do
      local best, id = -math.huge, nil
      for v, x in ipairs(last[b][1]) do
        if x > best then best, id = x, v - 1 end
      end
      rows[b][#rows[b] + 1] = id
      out[b][#out[b] + 1] = id
    end
  end
  return out
end

local same_bits = require('spec.support.expect').same_bits

local function assert_same_tensors(want, got, what)
  local names = {}
  for name in pairs(want) do names[#names + 1] = name end
  for name in pairs(got) do
    assert(want[name] ~= nil, what .. ': unexpected tensor ' .. name)
  end
  table.sort(names)
  for _, name in ipairs(names) do
    assert(got[name] ~= nil, what .. ': missing tensor ' .. name)
    assert(same_bits(want[name], got[name]), what .. ': tensor ' .. name .. ' differs')
  end
  return #names
end

local function copy_dir(from, to)
  pio.mkdir_p(to)
  for _, name in ipairs(pio.listdir(from)) do
    pio.write_atomic(to .. '/' .. name, pio.read_file(from .. '/' .. name))
  end
  return to
end

local function edit_config(dir, fn)
  local cfg = json.read(dir .. '/config.json')
  fn(cfg)
  pio.write_atomic(dir .. '/config.json', json.encode(cfg, { indent = 2 }))
end

for _, name in ipairs(NAMES) do
  describe('HF ' .. name, function()
    local ref, dir = reference(name)
    local model = models.from_pretrained(dir)

    it('logits match transformers within 1e-4', function()
      local logits = model(ref.ids)
      assert.are.same(ref.logits.shape, logits.shape)
      local diff = (logits - ref.logits):abs():max():item()
      assert(diff < 1e-4, string.format('max |logits - transformers| = %g', diff))
    end)

    it('the loss matches transformers', function()
      local loss = model(ref.ids, shifted(ref.ids)):item()
      assert(math.abs(loss - ref.loss) < 1e-5, string.format('loss %.8f, transformers %.8f', loss, ref.loss))
    end)

    it('the greedy continuation is the same 8 tokens', function()
      assert.are.same(ref.greedy, greedy(model, ref.ids, #ref.greedy[1]))
    end)

    it('gradient norms of every HF parameter match transformers', function()
      model:zero_grad()
      model(ref.ids, shifted(ref.ids)):backward()
      local grads = {}
      for _, pair in ipairs(model:named_parameters()) do grads[pair[1]] = pair[2].grad end
      -- The gradients go through the same mapping as the weights, so they are compared by HF name.
      local hf_grads = models.export(models.family(model.hf.model_type), grads, model.config)
      local count = 0
      for hf_name, want in pairs(ref.grad_norms) do
        local g = hf_grads[hf_name]
        assert(g ~= nil, 'no gradient for ' .. hf_name)
        local norm = g:norm():item()
        assert(math.abs(norm - want) <= 1e-4 * want + 1e-6,
          string.format('%s: gradient norm %.8g, transformers %.8g', hf_name, norm, want))
        count = count + 1
      end
      for hf_name in pairs(hf_grads) do assert(ref.grad_norms[hf_name] ~= nil, 'extra gradient ' .. hf_name) end
      assert(count >= 20)
      -- The padded vocabulary rows never receive a gradient.
      local e = model.embedding.word_embeddings.weight.grad
      local pad = e:size(1) - model.config.vocab_size
      assert(pad > 0)
      assert.are.equal(0, e:narrow(1, model.config.vocab_size + 1, pad):abs():max():item())
    end)

    it('save_pretrained writes back the files transformers wrote, bit for bit, and reloads identically', function()
      model:save_pretrained(tmp)
      local original = st.load(dir .. '/model.safetensors')
      local n = assert_same_tensors(original, st.load(tmp .. '/model.safetensors'), 'HF -> pmp -> HF')
      assert(n >= 15)
      assert.are.same(json.read(dir .. '/config.json'), json.read(tmp .. '/config.json'))
      local again = models.from_pretrained(tmp)
      assert_same_tensors(model:state_dict(), again:state_dict(), 'pmp -> HF -> pmp')
    end)
  end)
end

describe('HF vocabulary padding', function()
  it('pads the vocabulary to a multiple of 128 by default (zero rows), or as asked', function()
    local ref, dir = reference('qwen3')
    local model = models.from_pretrained(dir)
    local e = model.embedding.word_embeddings.weight
    assert.are.same({ 256, 32 }, e.shape)
    assert.are.same({ 256, 32 }, model.output_layer.weight.shape)
    assert.are.equal(0, e:narrow(1, 151, 106):abs():max():item())
    assert.are.same({ 2, 20, 150 }, model(ref.ids).shape)
    local unpadded = models.from_pretrained(dir, { make_vocab_size_divisible_by = 1 })
    assert.are.same({ 150, 32 }, unpadded.embedding.word_embeddings.weight.shape)
    local by_64 = models.from_pretrained(dir, { make_vocab_size_divisible_by = 64 })
    assert.are.same({ 192, 32 }, by_64.embedding.word_embeddings.weight.shape)
    assert.are.equal(0, (by_64(ref.ids) - unpadded(ref.ids)):abs():max():item())
  end)

  it('keeps padded rows out of logits and loss even when they hold large values', function()
    local ref, dir = reference('llama')
    local model = models.from_pretrained(dir)
    local before = model(ref.ids, shifted(ref.ids)):item()
    pmp.no_grad(function()
      model.output_layer.weight:narrow(1, 151, 106):fill_(100)
      model.embedding.word_embeddings.weight:narrow(1, 151, 106):fill_(100)
    end)
    assert.are.equal(before, model(ref.ids, shifted(ref.ids)):item())
    assert.are.same({ 2, 20, 150 }, model(ref.ids).shape)
  end)
end)

describe('HF save_pretrained', function()
  it('shards large models with an index and reloads them bit for bit', function()
    local _, dir = reference('qwen3')
    local model = models.from_pretrained(dir)
    model:save_pretrained(tmp, { max_shard_size = '40KB' })
    local index = json.read(tmp .. '/model.safetensors.index.json')
    local files = {}
    for _, file in pairs(index.weight_map) do files[file] = true end
    assert(files['model-00001-of-00004.safetensors'] or files['model-00001-of-00003.safetensors'])
    assert.is_false(pio.exists(tmp .. '/model.safetensors'))
    local tensors = st.load_sharded(tmp)
    assert_same_tensors(st.load(dir .. '/model.safetensors'), tensors, 'sharded export')
    assert_same_tensors(model:state_dict(), models.from_pretrained(tmp):state_dict(), 'sharded reload')
  end)

  it('writes a config from the model config alone (new rope_parameters spelling) that reloads the same', function()
    for _, name in ipairs(NAMES) do
      local ref, dir = reference(name)
      local loaded = models.from_pretrained(dir)
      local plain = pmp.nn.GPTModel(loaded.config)
      plain:load_state_dict(loaded:state_dict())
      local out = tmp .. '/' .. name
      plain:save_pretrained(out, { model_type = loaded.hf.model_type })
      local cfg = json.read(out .. '/config.json')
      assert.are.equal(loaded.hf.model_type, cfg.model_type)
      assert.is_table(cfg.rope_parameters)
      local again = models.from_pretrained(out)
      assert.are.equal(0, (again(ref.ids) - loaded(ref.ids)):abs():max():item())
      assert_same_tensors(st.load(dir .. '/model.safetensors'), st.load(out .. '/model.safetensors'), name)
    end
  end)

  it('saves in another dtype and loads in bf16', function()
    local ref, dir = reference('mistral')
    local model = models.from_pretrained(dir, { dtype = 'bf16' })
    assert.are.equal('bf16', model.embedding.word_embeddings.weight.dtype)
    local diff = (model(ref.ids):float() - ref.logits):abs():max():item()
    assert(diff < 0.25, 'bf16 logits differ by ' .. diff)
    model:save_pretrained(tmp)
    assert.are.equal('bfloat16', json.read(tmp .. '/config.json').dtype)
    assert.are.equal('bf16', st.load(tmp .. '/model.safetensors')['model.norm.weight'].dtype)
  end)

  it('is refused for a model of no known family', function()
    local m = pmp.nn.GPTModel({ num_layers = 1, hidden_size = 8, num_attention_heads = 2, vocab_size = 5 })
    fails_with(function() m:save_pretrained(tmp) end, 'model_type')
  end)
end)

describe('HF configs', function()
  local function rope_of(cfg)
    local c = models.config_from_hf(cfg)
    return c.rotary_base, c.rope_scaling
  end
  local base = { model_type = 'llama', hidden_size = 32, intermediate_size = 40, num_hidden_layers = 1,
    num_attention_heads = 4, vocab_size = 10, max_position_embeddings = 128 }
  local function with(extra)
    local c = {}
    for k, v in pairs(base) do c[k] = v end
    for k, v in pairs(extra) do c[k] = v end
    return c
  end

  it('reads rope settings in both spellings (rope_parameters, rope_theta + rope_scaling with type or rope_type)', function()
    local l3 = { factor = 8, low_freq_factor = 1, high_freq_factor = 4, original_max_position_embeddings = 64 }
    local new = with({ rope_parameters = { rope_type = 'llama3', rope_theta = 5e5, factor = 8, low_freq_factor = 1,
      high_freq_factor = 4, original_max_position_embeddings = 64 } })
    local old = with({ rope_theta = 5e5, rope_scaling = { rope_type = 'llama3', factor = 8, low_freq_factor = 1,
      high_freq_factor = 4, original_max_position_embeddings = 64 } })
    local b1, s1 = rope_of(new)
    local b2, s2 = rope_of(old)
    assert.are.equal(5e5, b1)
    assert.are.equal(5e5, b2)
    l3.type = 'llama3'
    assert.are.same(l3, s1)
    assert.are.same(l3, s2)
    local _, lin = rope_of(with({ rope_theta = 1e4, rope_scaling = { type = 'linear', factor = 2 } }))
    assert.are.same({ type = 'linear', factor = 2 }, lin)
    local b3, none = rope_of(with({ rope_scaling = json.null }))
    assert.are.equal(10000, b3)
    assert.is_nil(none)
    -- llama3's original context defaults to max_position_embeddings, as in transformers.
    local _, s4 = rope_of(with({ rope_scaling = { rope_type = 'llama3', factor = 8, low_freq_factor = 1, high_freq_factor = 4 } }))
    assert.are.equal(128, s4.original_max_position_embeddings)
  end)

  it('computes llama3 inverse frequencies band by band', function()
    local rope = require('pmp.nn.transformer').RotaryEmbedding(8, { base = 10000,
      scaling = { type = 'llama3', factor = 8, low_freq_factor = 1, high_freq_factor = 4, original_max_position_embeddings = 64 } })
    local got = rope.inv_freq:totable()
    -- wavelengths 2pi*{1, 10, 100, 1000}: high (kept), medium (smoothed), low and low (divided by 8).
    local smooth = (64 / (2 * math.pi * 10) - 1) / 3
    local want = { 1, (1 - smooth) * 0.1 / 8 + smooth * 0.1, 0.01 / 8, 0.001 / 8 }
    for i = 1, 4 do assert(math.abs(got[i] - want[i]) < 1e-6 * want[i], i) end
  end)

  it('maps family settings: biases, q/k norms, head_dim, windows, ties', function()
    local c = models.config_from_hf(with({ attention_bias = true, mlp_bias = false, tie_word_embeddings = true }))
    assert.is_true(c.add_qkv_bias and c.add_proj_bias and c.tie_embeddings)
    assert.is_false(c.add_mlp_bias)
    c = models.config_from_hf(with({ model_type = 'qwen2' }))
    assert.is_true(c.add_qkv_bias)
    assert.is_falsy(c.add_proj_bias)
    assert.is_nil(c.sliding_window)
    c = models.config_from_hf(with({ model_type = 'qwen2', num_hidden_layers = 3, use_sliding_window = true, sliding_window = 16,
      max_window_layers = 1 }))
    assert.are.same({ 0, 16, 16 }, c.sliding_window)
    c = models.config_from_hf(with({ model_type = 'qwen3' }))
    assert.is_true(c.qk_layernorm)
    assert.are.equal(128, c.kv_channels) -- transformers' Qwen3 default head_dim
    c = models.config_from_hf(with({ model_type = 'mistral' }))
    assert.are.equal(4096, c.sliding_window)
    c = models.config_from_hf(with({ model_type = 'mistral', sliding_window = json.null, num_key_value_heads = 2 }))
    assert.is_nil(c.sliding_window)
    assert.are.equal(2, c.num_query_groups)
    assert.are.equal(8, c.kv_channels)
  end)

  it('rejects an unknown model_type, naming the supported ones', function()
    local _, dir = reference('llama')
    local bad = copy_dir(dir, tmp .. '/gpt2')
    edit_config(bad, function(c) c.model_type = 'gpt2' end)
    -- every family file in models/ is listed (more families must not break this)
    local listed = table.concat(models.known_families(), ', ')
    for _, family in ipairs({ 'llama', 'mistral', 'qwen2', 'qwen3' }) do assert.matches(family, listed, 1, true) end
    fails_with(function() models.from_pretrained(bad) end, "unknown model_type 'gpt2'", listed)
    fails_with(function() models.config_from_hf(with({ model_type = json.null })) end, "missing key 'model_type'")
  end)

  it('rejects a config without a required key, naming it and the file', function()
    local _, dir = reference('qwen2_tied')
    local bad = copy_dir(dir, tmp .. '/nohidden')
    edit_config(bad, function(c) c.hidden_size = nil end)
    fails_with(function() models.from_pretrained(bad) end, "missing key 'hidden_size'", bad .. '/config.json')
    fails_with(function() models.config_from_hf(with({ intermediate_size = json.null })) end, "missing key 'intermediate_size'")
  end)

  it('rejects unsupported settings', function()
    fails_with(function() models.config_from_hf(with({ rope_scaling = { rope_type = 'yarn', factor = 4 } })) end,
      "rope type 'yarn' is not supported")
    fails_with(function() models.config_from_hf(with({ hidden_act = 'gelu' })) end, "hidden_act 'gelu'")
    fails_with(function() models.config_from_hf(with({ num_key_value_heads = 3 })) end, 'num_key_value_heads 3')
    fails_with(function() models.config_from_hf(with({ rope_scaling = { rope_type = 'linear' } })) end, "'factor'")
  end)

  it('type-checks nested values instead of falling back to a default', function()
    fails_with(function() models.config_from_hf(with({ rope_parameters = { rope_type = 'default', rope_theta = '1e6' } })) end,
      "key 'rope_parameters.rope_theta' must be a number, got 1e6")
    fails_with(function() models.config_from_hf(with({ rope_scaling = { type = 3 } })) end,
      "key 'rope_scaling.type' must be a string, got 3")
    fails_with(function() models.config_from_hf(with({ rope_parameters = { rope_type = 'default', partial_rotary_factor = true } })) end,
      "key 'rope_parameters.partial_rotary_factor' must be a number, got true")
    fails_with(function() models.config_from_hf(with({ rope_scaling = { rope_type = 'linear', factor = '4' } })) end,
      "rope scaling 'linear' needs the number 'factor' (rope_scaling.factor), got 4")
    fails_with(function() models.config_from_hf(with({ rms_norm_eps = '1e-6' })) end, "key 'rms_norm_eps' must be a number")
    fails_with(function() models.config_from_hf(with({ tie_word_embeddings = 'yes' })) end,
      "key 'tie_word_embeddings' must be true or false")
  end)
end)

describe('HF weight files', function()
  local function broken(name, edit)
    local _, dir = reference(name)
    local bad = copy_dir(dir, tmp .. '/' .. name)
    local tensors = st.load(bad .. '/model.safetensors', { copy = true })
    edit(tensors)
    st.save(bad .. '/model.safetensors', tensors, { format = 'pt' })
    return bad
  end

  it('names a missing weight', function()
    local bad = broken('llama', function(t) t['model.layers.1.self_attn.k_proj.weight'] = nil end)
    fails_with(function() models.from_pretrained(bad) end, 'missing weights: model.layers.1.self_attn.k_proj.weight')
  end)

  it('names a missing lm_head of an untied model and a missing bias of Qwen2', function()
    local bad = broken('qwen3', function(t) t['lm_head.weight'] = nil end)
    fails_with(function() models.from_pretrained(bad) end, 'missing weights: lm_head.weight')
    bad = broken('qwen2_tied', function(t) t['model.layers.0.self_attn.v_proj.bias'] = nil end)
    fails_with(function() models.from_pretrained(bad) end, 'model.layers.0.self_attn.v_proj.bias')
  end)

  it('names a mis-shaped weight with both shapes', function()
    local bad = broken('qwen3', function(t) t['model.layers.0.self_attn.q_norm.weight'] = pmp.ones(8) end)
    fails_with(function() models.from_pretrained(bad) end,
      'mis-shaped weights: model.layers.0.self_attn.q_norm.weight (file [8], expected [16])')
    bad = broken('mistral', function(t) t['model.layers.1.mlp.down_proj.weight'] = pmp.zeros(40, 32) end)
    fails_with(function() models.from_pretrained(bad) end, 'model.layers.1.mlp.down_proj.weight (file [40,32], expected [32,40])')
  end)

  it('names unexpected weights (extra layers, biases the config turns off) and lists every problem at once', function()
    local bad = broken('llama', function(t)
      t['model.layers.2.mlp.up_proj.weight'] = pmp.zeros(40, 32)
      t['model.layers.0.mlp.up_proj.bias'] = pmp.zeros(40)
      t['model.norm.weight'] = nil
      t['model.embed_tokens.weight'] = pmp.zeros(151, 32)
    end)
    fails_with(function() models.from_pretrained(bad) end, 'missing weights: model.norm.weight',
      'unexpected weights: model.layers.0.mlp.up_proj.bias, model.layers.2.mlp.up_proj.weight',
      'model.embed_tokens.weight (file [151,32], expected [150,32])')
  end)

  it('ignores rotary inv_freq buffers and a tied lm_head, as transformers does', function()
    local bad = broken('qwen2_tied', function(t)
      t['model.layers.0.self_attn.rotary_emb.inv_freq'] = pmp.ones(4)
      t['lm_head.weight'] = pmp.zeros(150, 32)
    end)
    local ref = reference('qwen2_tied')
    local diff = (models.from_pretrained(bad)(ref.ids) - ref.logits):abs():max():item()
    assert(diff < 1e-4)
  end)

  it('says what it looked for in a directory without weights', function()
    local empty = tmp .. '/empty'
    pio.mkdir_p(empty)
    pio.write_atomic(empty .. '/config.json', pio.read_file(FIXTURES .. '/llama/config.json'))
    fails_with(function() models.from_pretrained(empty) end, 'has no model.safetensors')
    fails_with(function() models.from_pretrained(tmp .. '/nothing') end, 'is not a directory')
  end)
end)

-- With transformers importable (PMP_HF_CHECK=1), transformers itself loads what save_pretrained wrote.
local check = os.getenv('PMP_HF_CHECK') == '1'
describe('HF export read by transformers', function()
  local test = check and it or pending
  test('transformers loads save_pretrained output to the reference logits (PMP_HF_CHECK=1)', function()
    for _, name in ipairs(NAMES) do
      local _, dir = reference(name)
      local loaded = models.from_pretrained(dir)
      local plain = pmp.nn.GPTModel(loaded.config)
      plain:load_state_dict(loaded:state_dict())
      plain:save_pretrained(tmp .. '/' .. name, { model_type = loaded.hf.model_type, max_shard_size = '30KB' })
    end
    local cmd = string.format('python3 %s/tools/make_hf_fixtures.py --out %s --verify-export %s 2>&1', ROOT, FIXTURES, tmp)
    local p = io.popen(cmd)
    local out = p:read('*a')
    local ok = p:close()
    assert(ok, out)
  end)
end)
