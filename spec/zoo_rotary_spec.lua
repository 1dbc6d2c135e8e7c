require 'busted.runner'()
-- The rotary families models/glm.lua, glm4.lua, qwen.lua and chatglm.lua against tiny random-weight
-- checkpoints in their published names and configs (tools/make_zoo_rotary_fixtures.py ->
-- spec/fixtures/zoo_rotary/<name>/): transformers computed the GLM references, the independent PyTorch
-- references tools/qwen_reference.py and tools/chatglm_reference.py those of Qwen 1 and ChatGLM2/3.
-- Logits, loss and gradient norms of a left-padded batch and greedy continuations match; save_pretrained
-- writes the files back;
-- configs a family cannot honour fail naming the key. Training under TP and PP: zoo_rotary_dist_spec.lua.
local json = require 'pmp.json'
local pio = require 'pmp.io'
local st = require 'pmp.safetensors'
local models = require 'pmp.models'
local tensor = require 'pmp.tensor'
local expect = require 'spec.support.expect'

local ROOT = package.loaded['pmp.root'] or '.'
local FIXTURES = ROOT .. '/spec/fixtures/zoo_rotary'
local NAMES = { 'glm', 'glm4', 'qwen', 'chatglm' }

local tmp
before_each(function()
  tmp = string.format('%s/pmp_zoo_rotary_spec.%d.%d', os.getenv('TMPDIR') or '/tmp', pio.getpid(), math.random(1e9))
  pio.mkdir_p(tmp)
end)
after_each(function() pio.remove_tree(tmp) end)

local reference_fixture = require 'spec.support.reference_fixture'

local function reference(name)
  local dir = FIXTURES .. '/' .. name
  local ref = reference_fixture.read(dir)
  return ref, dir
end

-- The padded batch as GPTModel takes it: positions counted from each row's first real token, and the
-- first real key of each row; also each row's real tokens alone (the prompts pmp.generate pads itself).
local function padded_batch(ref)
  local positions, first_key, prompts = {}, {}, {}
  for b, mask in ipairs(ref.attention_mask) do
    positions[b], first_key[b], prompts[b] = {}, 0, {}
    local seen = 0
    for t, real in ipairs(mask) do
      positions[b][t] = seen
      if real == 1 then
        seen = seen + 1
        prompts[b][#prompts[b] + 1] = ref.input_ids[b][t]
      else
        first_key[b] = t
      end
    end
  end
  return { positions = tensor.tensor(positions, { dtype = 'i64' }), first_key = tensor.tensor(first_key, { dtype = 'i64' }) },
    prompts
end

-- Each position's target: the next token of its row, none (-100) for the last position and padding.
local function next_tokens(ref)
  local rows = {}
  for b, ids in ipairs(ref.input_ids) do
    rows[b] = {}
    for t = 1, #ids do
      local real = t < #ids and ref.attention_mask[b][t] == 1
      rows[b][t] = real and ids[t + 1] or -100
    end
  end
  return tensor.tensor(rows, { dtype = 'i64' })
end

-- Largest |logits - reference| over the positions that hold real tokens.
local function real_diff(ref, logits)
  local worst = 0
  for b, mask in ipairs(ref.attention_mask) do
    for t, real in ipairs(mask) do
      if real == 1 then
        local d = (logits:select(1, b):select(1, t) - ref.logits:select(1, b):select(1, t)):abs():max():item()
        worst = math.max(worst, d)
      end
    end
  end
  return worst
end

local function assert_same_tensors(want, got, what, skip)
  local count = 0
  for name, t in pairs(want) do
    if not (skip and name:match(skip)) then
      assert(got[name] ~= nil, what .. ': missing tensor ' .. name)
      assert(expect.same_bits(t, got[name]), what .. ': tensor ' .. name .. ' differs')
      count = count + 1
    end
  end
  for name in pairs(got) do assert(want[name] ~= nil, what .. ': unexpected tensor ' .. name) end
  return count
end

for _, name in ipairs(NAMES) do
  describe(name, function()
    local ref, dir = reference(name)
    local model = models.from_pretrained(dir)
    local options, prompts = padded_batch(ref)

    it('gives the reference logits within 1e-4 on a left-padded batch', function()
      local logits = pmp.no_grad(function() return model(ref.ids, nil, options) end)
      assert.are.same(ref.logits.shape, logits.shape)
      local diff = real_diff(ref, logits)
      assert(diff < 1e-4, string.format('max |logits - reference| = %g', diff))
    end)

    it('gives the reference loss and gradient norm of every parameter (by its checkpoint name)', function()
      model:zero_grad()
      local loss = model(ref.ids, next_tokens(ref), options)
      assert(math.abs(loss:item() - ref.loss) < 1e-5, string.format('loss %.8f, reference %.8f', loss:item(), ref.loss))
      loss:backward()
      local grads = {}
      for _, pair in ipairs(model:named_parameters()) do grads[pair[1]] = pair[2].grad end
      local by_name = models.export(models.family(name), grads, model.config)
      local count = 0
      for hf_name, want in pairs(ref.grad_norms) do
        assert(by_name[hf_name] ~= nil, 'no gradient for ' .. hf_name)
        local norm = by_name[hf_name]:norm():item()
        assert(math.abs(norm - want) <= 1e-4 * want + 1e-6,
          string.format('%s: gradient norm %.8g, reference %.8g', hf_name, norm, want))
        count = count + 1
      end
      for hf_name in pairs(by_name) do assert(ref.grad_norms[hf_name] ~= nil, 'extra gradient ' .. hf_name) end
      assert(count >= 15)
    end)

    it('generates the reference greedy continuation of each row', function()
      local results = pmp.generate(model, prompts, { max_new_tokens = #ref.greedy[1] })
      for b = 1, #prompts do assert.are.same(ref.greedy[b], results[b].tokens) end
    end)

    it('save_pretrained writes back the published tensors and config; both reload to the same logits', function()
      model:save_pretrained(tmp .. '/loaded')
      local n = assert_same_tensors(st.load(dir .. '/model.safetensors'), st.load(tmp .. '/loaded/model.safetensors'),
        'HF -> pmp -> HF', '^transformer%.rotary_pos_emb%.inv_freq$')
      assert(n >= 15)
      -- the config comes back as it was, naming the dtype (Qwen 1's files do not)
      local config = json.read(dir .. '/config.json')
      if config.torch_dtype == nil then config.dtype = 'float32' end
      assert.are.same(config, json.read(tmp .. '/loaded/config.json'))
      -- a model that only has its GPTModel config writes the family's config from it
      local plain = pmp.nn.GPTModel(model.config)
      plain:load_state_dict(model:state_dict())
      plain:save_pretrained(tmp .. '/plain', { model_type = name })
      assert.are.equal(name, json.read(tmp .. '/plain/config.json').model_type)
      local want = pmp.no_grad(function() return model(ref.ids, nil, options) end)
      for _, out in ipairs({ 'loaded', 'plain' }) do
        local again = models.from_pretrained(tmp .. '/' .. out)
        local got = pmp.no_grad(function() return again(ref.ids, nil, options) end)
        assert.are.equal(0, (got - want):abs():max():item(), out)
      end
    end)
  end)
end

describe('rotary families in pmp.estimate', function()
  it('count every parameter a family\'s config.json gives the model (GLM-4\'s four norms per layer included)', function()
    local estimate = require 'pmp.estimate'
    for _, name in ipairs(NAMES) do
      local path = FIXTURES .. '/' .. name .. '/config.json'
      local count = 0
      for _, p in ipairs(models.from_pretrained(FIXTURES .. '/' .. name):parameters()) do count = count + p:numel() end
      local estimated = 0
      for _, stage in ipairs(estimate.memory(estimate.model_config(path), { seq_length = 8 }).stages) do
        estimated = estimated + stage.parameters
      end
      assert.are.equal(count, estimated, name)
    end
  end)
end)

describe('rotary family configs', function()
  local function edited(name, fn)
    local dir = tmp .. '/' .. name
    pio.mkdir_p(dir)
    local cfg = json.read(FIXTURES .. '/' .. name .. '/config.json')
    fn(cfg)
    pio.write_atomic(dir .. '/config.json', json.encode(cfg, { indent = 2 }))
    pio.write_atomic(dir .. '/model.safetensors', pio.read_file(FIXTURES .. '/' .. name .. '/model.safetensors'))
    return dir
  end

  it('refuse what the family cannot honour, naming the key', function()
    local cases = {
      { 'chatglm', function(c) c.multi_query_attention = false end, 'multi_query_attention' },
      { 'chatglm', function(c) c.rmsnorm = false end, 'rmsnorm' },
      { 'chatglm', function(c) c.apply_residual_connection_post_layernorm = true end, 'apply_residual_connection_post_layernorm' },
      { 'chatglm', function(c) c.pre_seq_len = 8 end, 'pre_seq_len' },
      { 'chatglm', function(c) c.quantization_bit = 4 end, 'quantization_bit' },
      { 'qwen', function(c) c.intermediate_size = 81 end, 'intermediate_size' },
      { 'qwen', function(c) c.scale_attn_weights = false end, 'scale_attn_weights' },
      { 'glm', function(c) c.hidden_act = 'gelu' end, 'hidden_act' },
      { 'glm4', function(c) c.rope_parameters.rope_type = 'yarn' end, 'yarn' },
      { 'glm', function(c) c.num_key_value_heads = nil end, 'num_key_value_heads' },
    }
    for _, case in ipairs(cases) do
      expect.fails_with(function() models.from_pretrained(edited(case[1], case[2])) end, case[3])
    end
  end)

  it('GLM rotates half of each head when the config does not say (transformers\' default)', function()
    local dir = edited('glm', function(c) c.rope_parameters.partial_rotary_factor = nil end)
    assert.are.equal(0.5, models.from_pretrained(dir).config.rotary_percent)
  end)

  it('Qwen 1 refuses positions from seq_length on while use_dynamic_ntk or use_logn_attn is on', function()
    local ids = tensor.zeros({ 1, 65 }, { dtype = 'i64' })
    local model = models.from_pretrained(FIXTURES .. '/qwen')
    expect.fails_with(function() model(ids) end, 'position 64 is not below rotary_position_limit 64')
    -- the 63rd new token comes from the logits at position 63, the 64th would need position 64
    assert.are.equal(63, #pmp.generate(model, { { 5, 6 } }, { max_new_tokens = 63 })[1].tokens)
    expect.fails_with(function() pmp.generate(model, { { 5, 6 } }, { max_new_tokens = 64 }) end, 'rotary_position_limit')
    local plain = models.from_pretrained(edited('qwen', function(c) c.use_dynamic_ntk, c.use_logn_attn = false, false end))
    assert.are.same({ 1, 65, 150 }, plain(ids).shape)
  end)

  it('a fused qkv of the wrong size is named with both shapes', function()
    local dir = edited('qwen', function(c) c.kv_channels = 4 end)
    expect.fails_with(function() models.from_pretrained(dir) end, 'transformer.h.0.attn.c_attn.weight (file [96,32], expected [48,32])')
  end)
end)

-- With transformers importable (PMP_HF_CHECK=1), transformers or the reference loads what pmp wrote.
local check = os.getenv('PMP_HF_CHECK') == '1'
describe('rotary family exports read by their references', function()
  local test = check and it or pending
  test('transformers and the PyTorch references load save_pretrained output to the reference logits (PMP_HF_CHECK=1)', function()
    for _, name in ipairs(NAMES) do
      local loaded = models.from_pretrained(FIXTURES .. '/' .. name)
      local plain = pmp.nn.GPTModel(loaded.config)
      plain:load_state_dict(loaded:state_dict())
      plain:save_pretrained(tmp .. '/' .. name, { model_type = name })
    end
    local cmd = string.format('python3 %s/tools/make_zoo_rotary_fixtures.py --out %s --verify-export %s 2>&1', ROOT, FIXTURES, tmp)
    local p = io.popen(cmd)
    local out = p:read('*a')
    assert(p:close(), out)
  end)
end)
