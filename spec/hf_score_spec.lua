require 'busted.runner'()
-- Reward models / critics: Hugging Face *ForSequenceClassification checkpoints (num_labels 1) loaded with
-- pmp.models.from_pretrained(dir, {head = 'score'}) give transformers' scores (fixtures written by
-- tools/make_score_fixtures.py), and save_pretrained writes them back.
local expect = require 'spec.support.expect'
local ROOT = package.loaded['pmp.root']
local FIXTURES = ROOT .. '/spec/fixtures/hf_score'
local NAMES = { 'llama', 'mistral', 'qwen2_tied', 'qwen3' }
local tmp = os.tmpname()
os.remove(tmp)
pmp.io.mkdir_p(tmp)

local function reference(name)
  return pmp.json.decode(pmp.io.read_file(FIXTURES .. '/' .. name .. '/reference.json'))
end

local function assert_close(expected, got, tol, what)
  for i, e in ipairs(expected) do
    assert(math.abs(e - got[i]) <= tol * (1 + math.abs(e)), string.format('%s %d: expected %.6g, got %.6g', what, i, e, got[i]))
  end
end

local function scores_of(model, ref)
  return pmp.no_grad(pmp.rl.sequence_scores, model, ref.ids, 0):double():totable()
end

describe('score-head models from Hugging Face', function()
  teardown(function() pmp.io.remove_tree(tmp) end)
  it('give transformers\' values at every real position and its scores at the last non-pad token', function()
    for _, name in ipairs(NAMES) do
      local ref = reference(name)
      local model = pmp.models.from_pretrained(FIXTURES .. '/' .. name, { head = 'score' })
      local values = pmp.no_grad(function() return model(pmp.tensor(ref.ids, { dtype = 'i64' })) end):double():totable()
      for row, n in ipairs(ref.lengths) do
        assert_close({ unpack(ref.values[row], 1, n) }, { unpack(values[row], 1, n) }, 1e-4, name .. ' values row ' .. row)
      end
      assert_close(ref.scores, scores_of(model, ref), 1e-4, name .. ' scores')
    end
  end)

  it('save_pretrained writes a *ForSequenceClassification directory that loads back to the same scores', function()
    for _, name in ipairs(NAMES) do
      local ref = reference(name)
      local model = pmp.models.from_pretrained(FIXTURES .. '/' .. name, { head = 'score' })
      model:save_pretrained(tmp .. '/' .. name)
      local config = pmp.json.read(tmp .. '/' .. name .. '/config.json')
      assert.is_truthy(config.architectures[1]:match('ForSequenceClassification$'))
      assert.are.same({ ['0'] = 'LABEL_0' }, config.id2label)
      assert.are.equal(0, config.pad_token_id)
      local tensors = pmp.safetensors.load(tmp .. '/' .. name .. '/model.safetensors')
      assert.are.same({ 1, 32 }, tensors['score.weight'].shape)
      assert.is_nil(tensors['lm_head.weight'])
      assert_close(ref.scores, scores_of(pmp.models.from_pretrained(tmp .. '/' .. name, { head = 'score' }), ref), 1e-6,
        name .. ' reloaded scores')
    end
  end)

  local check = os.getenv('PMP_HF_CHECK') == '1'
  local test = check and it or pending
  test('transformers loads the export to the reference scores (PMP_HF_CHECK=1)', function()
    for _, name in ipairs(NAMES) do
      pmp.models.from_pretrained(FIXTURES .. '/' .. name, { head = 'score' }):save_pretrained(tmp .. '/' .. name)
    end
    local p = io.popen(string.format('python3 %s/tools/make_score_fixtures.py --out %s --verify-export %s 2>&1', ROOT,
      FIXTURES, tmp))
    local out = p:read('*a')
    assert(p:close(), out)
  end)

  it('loads a causal LM with a zero head (a critic initialised from a policy)', function()
    local ref = reference('llama')
    local model = pmp.models.from_pretrained(ROOT .. '/spec/fixtures/hf/llama', { head = 'score' })
    assert.are.same({ 0, 0, 0 }, scores_of(model, ref))
    assert.is_nil(model.output_layer)
  end)

  it('score_model copies a model\'s trunk under a zero head', function()
    local policy = pmp.models.from_pretrained(ROOT .. '/spec/fixtures/hf/llama')
    local critic = pmp.models.score_model(policy)
    assert.are.equal(0, critic.score.weight:abs():sum():item())
    assert.are.equal(0, (critic.embedding.word_embeddings.weight - policy.embedding.word_embeddings.weight):abs():sum():item())
    critic:save_pretrained(tmp .. '/critic')
    assert.are.equal('LlamaForSequenceClassification', pmp.json.read(tmp .. '/critic/config.json').architectures[1])
  end)

  it('rejects a classifier with more than one label', function()
    local dir = tmp .. '/two_labels'
    pmp.io.mkdir_p(dir)
    local config = pmp.json.read(FIXTURES .. '/llama/config.json')
    config.id2label = { ['0'] = 'A', ['1'] = 'B' }
    pmp.io.write_atomic(dir .. '/config.json', pmp.json.encode(config))
    pmp.io.write_atomic(dir .. '/model.safetensors', pmp.io.read_file(FIXTURES .. '/llama/model.safetensors'))
    expect.fails_with(function() pmp.models.from_pretrained(dir, { head = 'score' }) end, 'num_labels is 2', 'config.json')
  end)
end)
