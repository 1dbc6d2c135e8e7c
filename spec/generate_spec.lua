require 'busted.runner'()
-- pmp.generate against transformers' greedy continuations (tiny HF fixtures), the KV cache against
-- full re-computation, left-padded batches against single prompts, and the sampling controls.
local fails_with = require('spec.support.expect').fails_with
local root = package.loaded['pmp.root']
local FIXTURES = root .. '/spec/fixtures/hf'

local function reference(name)
  return pmp.json.decode(pmp.io.read_file(FIXTURES .. '/' .. name .. '/reference.json'))
end

local function load(name) return pmp.models.from_pretrained(FIXTURES .. '/' .. name) end

local function slice(list, first, last)
  local out = {}
  for k = first, last do out[#out + 1] = list[k] end
  return out
end

-- Greedy continuation by re-running the whole sequence each step (no cache): the plain reference.
local function greedy_without_cache(model, ids, n)
  local seq = slice(ids, 1, #ids)
  local out = {}
  pmp.no_grad(function()
    for _ = 1, n do
      local logits = model(pmp.tensor({ seq }, { dtype = 'i64' }))
      local id = logits:select(2, #seq):argmax():item()
      out[#out + 1] = id
      seq[#seq + 1] = id
    end
  end)
  return out
end

describe('pmp.generate', function()
  for _, name in ipairs({ 'llama', 'llama3_bias_tied', 'mistral', 'qwen2_tied', 'qwen3' }) do
    it('reproduces transformers\' greedy tokens for ' .. name, function()
      local ref = reference(name)
      local model = load(name)
      local results = pmp.generate(model, ref.input_ids, { max_new_tokens = #ref.greedy[1] })
      for b = 1, #ref.input_ids do
        assert.are.same(ref.greedy[b], results[b].tokens)
        assert.are.equal('length', results[b].finish_reason)
      end
    end)
  end

  it('gives each row of a left-padded batch the continuation it gets alone (with a sliding window)', function()
    for _, name in ipairs({ 'llama', 'mistral' }) do
      local ref = reference(name)
      local model = load(name)
      local prompts = { slice(ref.input_ids[1], 1, 9), ref.input_ids[2], slice(ref.input_ids[1], 3, 16) }
      local batched = pmp.generate(model, prompts, { max_new_tokens = 6 })
      for b, prompt in ipairs(prompts) do
        assert.are.same(greedy_without_cache(model, prompt, 6), batched[b].tokens)
      end
    end
  end)

  it('returns the log-probs of sampled tokens under the temperature-scaled distribution', function()
    local ref = reference('qwen3')
    local model = load('qwen3')
    local prompt = slice(ref.input_ids[1], 1, 10)
    local out = pmp.generate(model, { prompt }, { max_new_tokens = 4, temperature = 0.7, seed = 5, return_logprobs = true })[1]
    local seq = slice(prompt, 1, #prompt)
    for _, id in ipairs(out.tokens) do seq[#seq + 1] = id end
    local logits = pmp.no_grad(function() return model(pmp.tensor({ seq }, { dtype = 'i64' })) end)
    local logp = (logits:double() / 0.7):log_softmax(-1)
    for k, id in ipairs(out.tokens) do
      local expected = logp:select(2, #prompt + k - 1):select(2, id + 1):item()
      assert.is_near(expected, out.logprobs[k], 1e-4)
    end
  end)

  it('is reproducible for a seed; top_k = 1 and a tiny top_p are greedy', function()
    local ref = reference('llama')
    local model = load('llama')
    local prompts = { slice(ref.input_ids[1], 1, 8) }
    local a = pmp.generate(model, prompts, { max_new_tokens = 6, temperature = 1.5, seed = 42 })[1].tokens
    local b = pmp.generate(model, prompts, { max_new_tokens = 6, temperature = 1.5, seed = 42 })[1].tokens
    assert.are.same(a, b)
    local greedy = pmp.generate(model, prompts, { max_new_tokens = 6 })[1].tokens
    assert.are.same(greedy, pmp.generate(model, prompts, { max_new_tokens = 6, temperature = 1.5, top_k = 1, seed = 1 })[1].tokens)
    assert.are.same(greedy, pmp.generate(model, prompts, { max_new_tokens = 6, temperature = 1.5, top_p = 1e-6, seed = 1 })[1].tokens)
  end)

  it('stops a row at an end-of-sequence id', function()
    local ref = reference('llama')
    local model = load('llama')
    local first = ref.greedy[1][1]
    local results = pmp.generate(model, ref.input_ids, { max_new_tokens = 8, eos_ids = { first } })
    assert.are.same({ first }, results[1].tokens)
    assert.are.equal('eos', results[1].finish_reason)
    -- the other row runs until it produces that id too (or to the length limit)
    local expected = {}
    for _, id in ipairs(ref.greedy[2]) do
      expected[#expected + 1] = id
      if id == first then break end
    end
    assert.are.same(expected, results[2].tokens)
    assert.are.equal(#expected < #ref.greedy[2] and 'eos' or 'length', results[2].finish_reason)
  end)

  it('applies the repetition penalty to tokens already seen, as HF does', function()
    local ref = reference('llama')
    local model = load('llama')
    local prompt = slice(ref.input_ids[1], 1, 12)
    local logits = pmp.no_grad(function() return model(pmp.tensor({ prompt }, { dtype = 'i64' })) end)
    local row = logits:select(2, #prompt):select(1, 1):double():totable()
    local penalty = 3.0
    for _, id in ipairs(prompt) do
      local v = row[id + 1]
      row[id + 1] = v > 0 and v / penalty or v * penalty
    end
    local best, at = -math.huge, 0
    for k, v in ipairs(row) do if v > best then best, at = v, k - 1 end end
    -- a value computed once per seen token, so repeated ids in the prompt are penalized once
    local got = pmp.generate(model, { prompt }, { max_new_tokens = 1, repetition_penalty = penalty })[1].tokens[1]
    assert.are.equal(at, got)
  end)

  it('rejects empty prompts and stop strings without a tokenizer', function()
    local model = load('llama')
    fails_with(function() pmp.generate(model, { {} }) end, 'generate: prompt 1 is empty')
    fails_with(function() pmp.generate(model, { { 1, 2 } }, { stop = { 'x' } }) end,
      'generate: stop strings need options.tokenizer')
  end)
end)
