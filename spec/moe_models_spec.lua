require 'busted.runner'()
-- The mixture-of-experts families (models/mixtral.lua, qwen2_moe.lua, qwen3_moe.lua, deepseek_v2.lua,
-- deepseek_v3.lua) against tiny random-weight models written by transformers (tools/make_moe_fixtures.py ->
-- spec/fixtures/moe/<name>/):
-- logits of a left-padded batch and greedy continuations as transformers computes them in float32;
-- save_pretrained writes the fixture's tensors back bit for bit; a missing expert or an impossible
-- router config is an error naming it.
local json = require 'pmp.json'
local pio = require 'pmp.io'
local st = require 'pmp.safetensors'
local models = require 'pmp.models'
local tensor = require 'pmp.tensor'
local same_bits = require('spec.support.expect').same_bits
local fails_with = require('spec.support.expect').fails_with

local ROOT = package.loaded['pmp.root'] or '.'
local FIXTURES = ROOT .. '/spec/fixtures/moe'
local NAMES = { 'mixtral', 'qwen2_moe', 'qwen3_moe', 'deepseek_v2', 'deepseek_v3', 'deepseek_v3_direct_q' }

local tmp
before_each(function()
  tmp = string.format('%s/pmp_moe_spec.%d.%d', os.getenv('TMPDIR') or '/tmp', pio.getpid(), math.random(1e9))
  pio.mkdir_p(tmp)
end)
after_each(function() pio.remove_tree(tmp) end)

local reference_fixture = require 'spec.support.reference_fixture'

local function reference(name)
  local dir = FIXTURES .. '/' .. name
  local ref = reference_fixture.read(dir)
  return ref, dir
end

-- The padded batch as GPTModel takes it: positions counted from each row's first real token, and
-- first_key hiding the left padding.
local function padded_forward(model, ref)
  local positions, first_key = {}, {}
  for b, row in ipairs(ref.attention_mask) do
    local pads, count = 0, 0
    positions[b] = {}
    for t, m in ipairs(row) do
      if m == 0 then pads = pads + 1 end
      positions[b][t] = math.max(count - 1 + m, 0)
      count = count + m
    end
    first_key[b] = pads
  end
  local ids = tensor.tensor(ref.input_ids, { dtype = 'i64' })
  return model(ids, nil, { positions = tensor.tensor(positions, { dtype = 'i64' }),
    first_key = tensor.tensor(first_key, { dtype = 'i64' }) })
end

local function max_real_diff(logits, ref)
  local got, want = logits:totable(), ref.logits:totable()
  local worst = 0
  for b, row in ipairs(ref.attention_mask) do
    for t, m in ipairs(row) do
      if m == 1 then
        for v = 1, #want[b][t] do worst = math.max(worst, math.abs(got[b][t][v] - want[b][t][v])) end
      end
    end
  end
  return worst
end

describe('MoE families against transformers', function()
  for _, name in ipairs(NAMES) do
    it(name .. ': logits of a left-padded batch within 1e-4, greedy continuations identical', function()
      local ref, dir = reference(name)
      local model = models.from_pretrained(dir)
      model:eval()
      local diff = pmp.no_grad(function() return max_real_diff(padded_forward(model, ref), ref) end)
      assert(diff < 1e-4, string.format('%s: max logit difference %.3g', name, diff))
      local prompts = {}
      for b, row in ipairs(ref.input_ids) do
        prompts[b] = {}
        for t, id in ipairs(row) do
          if ref.attention_mask[b][t] == 1 then prompts[b][#prompts[b] + 1] = id end
        end
      end
      local out = pmp.generate(model, prompts, { max_new_tokens = #ref.greedy[1] })
      for b = 1, #prompts do assert.are.same(ref.greedy[b], out[b].tokens) end
    end)
  end

  it('reads the layer pattern and routing of each config', function()
    local q2 = models.from_pretrained(FIXTURES .. '/qwen2_moe')
    assert.is_not_nil(q2.decoder.layers['0'].mlp.router)
    assert.is_not_nil(q2.decoder.layers['1'].mlp.linear_fc1)   -- mlp_only_layers = [1]
    assert.is_true(q2.config.moe_router_pre_softmax)
    assert.is_not_nil(q2.decoder.layers['0'].mlp.shared_experts.gate_weight)
    local q3 = models.from_pretrained(FIXTURES .. '/qwen3_moe')
    assert.are.equal(6, q3.config.num_moe_experts)
    assert.are.equal(3, q3.config.moe_router_topk)
    assert.is_false(q3.config.moe_router_pre_softmax)
    local ds = models.from_pretrained(FIXTURES .. '/deepseek_v3')
    assert.is_not_nil(ds.decoder.layers['0'].mlp.linear_fc1)   -- first_k_dense_replace = 1
    assert.are.equal('sigmoid', ds.config.moe_router_score_function)
    assert.is_true(ds.decoder.layers['1'].mlp.router.expert_bias:abs():max():item() > 0)   -- e_score_correction_bias
    assert.is_not_nil(ds.decoder.layers['1'].self_attention.linear_q_down_proj)
    assert.is_not_nil(models.from_pretrained(FIXTURES .. '/deepseek_v3_direct_q').decoder.layers['0'].self_attention.linear_q_proj)
  end)

  it('save_pretrained writes the fixture tensors back bit for bit, under their HF names', function()
    for _, name in ipairs(NAMES) do
      local _, dir = reference(name)
      local model = models.from_pretrained(dir)
      model:save_pretrained(tmp .. '/' .. name)
      local want = st.load(dir .. '/model.safetensors', { copy = true })
      local got = st.load(tmp .. '/' .. name .. '/model.safetensors', { copy = true })
      local count = 0
      for key, t in pairs(want) do
        assert(got[key], name .. ': the export lacks ' .. key)
        assert(same_bits(t, got[key]), name .. ': ' .. key .. ' differs')
        count = count + 1
      end
      for key in pairs(got) do assert(want[key], name .. ': the export has an extra ' .. key) end
      assert.is_true(count > 0)
    end
  end)

  it('names a missing expert tensor', function()
    local dir = tmp .. '/mixtral'
    pio.mkdir_p(dir)
    pio.write_atomic(dir .. '/config.json', pio.read_file(FIXTURES .. '/mixtral/config.json'))
    local tensors = st.load(FIXTURES .. '/mixtral/model.safetensors', { copy = true })
    tensors['model.layers.1.block_sparse_moe.experts.3.w2.weight'] = nil
    st.save(dir .. '/model.safetensors', tensors)
    fails_with(function() models.from_pretrained(dir) end, 'missing weights: model.layers.1.block_sparse_moe.experts.3.w2.weight')
  end)

  it('rejects a router config it cannot honour, naming the key', function()
    local hf = json.read(FIXTURES .. '/qwen3_moe/config.json')
    hf.num_experts_per_tok = 9
    fails_with(function() models.from_config(hf) end, 'moe_router_topk 9', 'num_moe_experts 6')
    hf = json.read(FIXTURES .. '/mixtral/config.json')
    hf.router_jitter_noise = 0.1
    fails_with(function() models.from_config(hf) end, 'router_jitter_noise')
    hf = json.read(FIXTURES .. '/qwen2_moe/config.json')
    hf.num_experts = nil
    fails_with(function() models.from_config(hf) end, "missing key 'num_experts'")
    hf = json.read(FIXTURES .. '/deepseek_v3/config.json')
    hf.topk_group = 1
    fails_with(function() models.from_config(hf) end, 'moe_router_topk 4 exceeds the 2 experts of moe_router_group_topk 1 groups')
    hf = json.read(FIXTURES .. '/deepseek_v2/config.json')
    hf.topk_method = 'noaux_tc'
    fails_with(function() models.from_config(hf) end, "topk_method 'noaux_tc' is not supported")
    hf = json.read(FIXTURES .. '/deepseek_v3/config.json')
    hf.rope_parameters = { rope_type = 'yarn', rope_theta = 10000 }
    fails_with(function() models.from_config(hf) end, "rope scaling 'yarn' needs the number 'factor'")
  end)
end)

-- With transformers importable (PMP_HF_CHECK=1), transformers itself loads what save_pretrained wrote:
-- the loaded model (its config.json carried over) and the same weights in a model built from the pmp
-- config (config.json written by the family's hf_config).
local check = os.getenv('PMP_HF_CHECK') == '1'
describe('MoE export read by transformers', function()
  local test = check and it or pending
  test('transformers loads save_pretrained output to the reference logits (PMP_HF_CHECK=1)', function()
    for _, name in ipairs(NAMES) do
      local _, dir = reference(name)
      local loaded = models.from_pretrained(dir)
      loaded:save_pretrained(tmp .. '/' .. name)
      local plain = pmp.nn.GPTModel(loaded.config)
      plain:load_state_dict(loaded:state_dict())
      plain:save_pretrained(tmp .. '/' .. name .. '_from_config', { model_type = loaded.hf.model_type, max_shard_size = '30KB' })
    end
    local cmd = string.format('python3 %s/tools/make_moe_fixtures.py --out %s --verify-export %s 2>&1', ROOT, FIXTURES, tmp)
    local p = io.popen(cmd)
    local out = p:read('*a')
    local ok = p:close()
    assert(ok, out)
  end)
end)
