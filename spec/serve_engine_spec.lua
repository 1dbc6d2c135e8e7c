require 'busted.runner'()
-- pmp.serve.engine (continuous batching over the paged KV cache) on the tiny HF fixtures: transformers'
-- greedy tokens (reference.json), every request's tokens against pmp.generate run on that request
-- alone (itself checked against transformers in generate_spec), prefix reuse against closed-form block
-- counts, and the block budget.
local engine_module = require 'pmp.serve.engine'
local fails_with = require('spec.support.expect').fails_with
local FIXTURES = package.loaded['pmp.root'] .. '/spec/fixtures/hf'

local function load(name) return pmp.models.from_pretrained(FIXTURES .. '/' .. name) end
local function reference(name) return pmp.json.decode(pmp.io.read_file(FIXTURES .. '/' .. name .. '/reference.json')) end

-- Deterministic token lists of the given lengths (ids in [3, vocab)).
local function prompts_of(lengths, vocab, seed)
  local state, out = seed, {}
  for k, L in ipairs(lengths) do
    out[k] = {}
    for i = 1, L do
      state = (state * 1103515245 + 12345) % 2147483648
      out[k][i] = 3 + state % (vocab - 3)
    end
  end
  return out
end

local function alone(model, prompt, n)
  return pmp.generate(model, { prompt }, { max_new_tokens = n })[1].tokens
end

describe('serve.engine', function()
  it("reproduces transformers' greedy tokens (llama, qwen3)", function()
    for _, name in ipairs({ 'llama', 'qwen3' }) do
      local ref = reference(name)
      local engine = engine_module.new(load(name), { block_size = 4, num_blocks = 64, max_batch = 2 })
      local requests = {}
      for b, ids in ipairs(ref.input_ids) do requests[b] = { id = b, prompt = ids, max_tokens = #ref.greedy[b] } end
      local results = engine:run(requests)
      for b = 1, #requests do
        assert.are.same(ref.greedy[b], results[b].samples[1].tokens)
        assert.are.equal('length', results[b].samples[1].finish_reason)
      end
    end
  end)

  it('gives every request the tokens it gets alone, with more requests than batch slots', function()
    local model = load('qwen3')
    local lengths, outputs = { 3, 17, 1, 40, 9, 25, 5, 12, 33, 2 }, { 7, 2, 12, 4, 9, 1, 15, 6, 3, 10 }
    local prompts = prompts_of(lengths, 150, 7)
    local requests = {}
    for k, p in ipairs(prompts) do requests[k] = { id = 'r' .. k, prompt = p, max_tokens = outputs[k] } end
    local seen = {}
    local engine = engine_module.new(model, { block_size = 4, num_blocks = 200, max_batch = 3 })
    local results = engine:run(requests, function(result) seen[#seen + 1] = result.id end)
    for k, p in ipairs(prompts) do
      assert.are.equal('r' .. k, results[k].id)
      assert.are.same(alone(model, p, outputs[k]), results[k].samples[1].tokens)
    end
    -- requests joined and left a running batch: all three slots were used, and results came out of order
    assert.are.equal(3, engine.stats.peak_batch)
    assert.are_not.same({ 'r1', 'r2', 'r3', 'r4', 'r5', 'r6', 'r7', 'r8', 'r9', 'r10' }, seen)
    assert.are.equal(#prompts, #seen)
    assert.are.equal(0, engine.blocks.used)   -- every block came back
  end)

  it('reuses the cached blocks of a shared prefix and of n samples, with identical tokens', function()
    local model = load('llama')
    local system = prompts_of({ 12 }, 150, 3)[1]
    local tails = prompts_of({ 3, 3, 3, 3 }, 150, 11)
    local requests = {}
    for k, tail in ipairs(tails) do
      local p = {}
      for i, id in ipairs(system) do p[i] = id end
      for _, id in ipairs(tail) do p[#p + 1] = id end
      requests[k] = { prompt = p, max_tokens = 2 }
    end
    local function run(prefix_caching)
      local engine = engine_module.new(model, { block_size = 4, num_blocks = 64, max_batch = 4,
        prefix_caching = prefix_caching })
      return engine:run(requests), engine
    end
    local shared, with = run(true)
    local separate, without = run(false)
    for k, r in ipairs(requests) do
      local expected = alone(model, r.prompt, 2)
      assert.are.same(expected, shared[k].samples[1].tokens)
      assert.are.same(expected, separate[k].samples[1].tokens)
    end
    -- 15 prompt tokens + 1 fed back = 16 positions = 4 blocks of 4 per request; the 3 blocks of the
    -- 12-token system prompt are held once when shared: 4 * 4 = 16 blocks apart, 3 + 4 * 1 = 7 shared
    assert.are.equal(16, without.blocks.peak)
    assert.are.equal(7, with.blocks.peak)
    assert.are.equal(3 * 12, with.stats.cached_prompt_tokens)

    -- n = 3 greedy samples of one 9-token prompt: samples 2 and 3 find its 2 full blocks
    local engine = engine_module.new(model, { block_size = 4, num_blocks = 64, max_batch = 4 })
    local result = engine:run({ { prompt = requests[1].prompt, n = 3, max_tokens = 3 } })[1]
    local expected = alone(model, requests[1].prompt, 3)
    for k = 1, 3 do assert.are.same(expected, result.samples[k].tokens) end
    assert.are.equal(2 * 3 * 4, engine.stats.cached_prompt_tokens)
  end)

  it('stays within the block budget: requests wait for blocks and still get their tokens', function()
    local model = load('qwen3')
    local prompts = prompts_of({ 10, 14, 6, 11, 9, 13 }, 150, 5)
    local requests = {}
    for k, p in ipairs(prompts) do requests[k] = { prompt = p, max_tokens = 6 } end
    -- each request needs ceil((len + 6) / 4) = 4 or 5 blocks; 10 blocks hold two at a time
    local engine = engine_module.new(model, { block_size = 4, num_blocks = 10, max_batch = 6, prefix_caching = false })
    local results = engine:run(requests)
    for k, p in ipairs(prompts) do assert.are.same(alone(model, p, 6), results[k].samples[1].tokens) end
    assert(engine.blocks.peak <= 10)
    assert(engine.stats.peak_batch <= 2, 'more requests ran than the budget holds')
    fails_with(function() engine:add({ prompt = prompts_of({ 30 }, 150, 1)[1], max_tokens = 20 }) end,
      'needs 13 KV-cache blocks', 'the cache has 10')
  end)

  it('samples each seeded request from its own stream, whatever runs beside it', function()
    local model = load('qwen3')
    local prompts = prompts_of({ 5, 8, 3, 11 }, 150, 9)
    local function sampled(k) return { id = k, prompt = prompts[k], max_tokens = 8, temperature = 1.5, top_p = 0.9, seed = 40 + k } end
    local engine = engine_module.new(model, { block_size = 4, num_blocks = 64, max_batch = 4 })
    local together = engine:run({ sampled(1), sampled(2), sampled(3), sampled(4) })
    for k = 1, 4 do
      local solo = engine_module.new(model, { block_size = 8, num_blocks = 16, max_batch = 1 }):run({ sampled(k) })[1]
      assert.are.same(solo.samples[1].tokens, together[k].samples[1].tokens)
    end
    -- top_k = 1 leaves only the most likely token: greedy, whatever the temperature
    local top1 = engine:run({ { prompt = prompts[2], max_tokens = 6, temperature = 2, top_k = 1, seed = 3 } })[1]
    assert.are.same(alone(model, prompts[2], 6), top1.samples[1].tokens)
  end)

  it("samples the tokens and log-probs pmp.generate gives with the same per-row Generator seeds", function()
    local model = load('qwen3')
    local prompts = prompts_of({ 5, 8, 3, 11 }, 150, 9)
    -- rows of different settings step together: the engine chooses them in groups
    local settings = {
      { temperature = 1.5, top_p = 0.9 },
      { temperature = 0.7, top_k = 5 },
      { temperature = 1.5, top_p = 0.9, repetition_penalty = 1.3 },
      { temperature = 1 },
    }
    local requests = {}
    for k, p in ipairs(prompts) do
      requests[k] = { id = k, prompt = p, max_tokens = 8, seed = 40 + k, logprobs = true }
      for key, v in pairs(settings[k]) do requests[k][key] = v end
    end
    -- the n = 2 samples of request 4 draw from the two seeds the engine documents
    requests[4].n = 2
    local results = engine_module.new(model, { block_size = 4, num_blocks = 64, max_batch = 5 }):run(requests)
    for k, p in ipairs(prompts) do
      for sample = 1, requests[k].n or 1 do
        local options = { max_new_tokens = 8, return_logprobs = true,
          generator = pmp.Generator(engine_module.sample_seed(40 + k, sample)) }
        for key, v in pairs(settings[k]) do options[key] = v end
        local expected = pmp.generate(model, { p }, options)[1]
        local got = results[k].samples[sample]
        assert.are.same(expected.tokens, got.tokens)
        for i = 1, #expected.tokens do assert(math.abs(expected.logprobs[i] - got.logprobs[i]) < 1e-5) end
      end
    end
    assert.are_not.same(results[4].samples[1].tokens, results[4].samples[2].tokens)
    assert.are.equal(40ULL, engine_module.sample_seed(40, 1))
    assert.are.equal(40ULL + 0x9E3779B97F4A7C15ULL * 2, engine_module.sample_seed(40, 3))
  end)

  it("reports each greedy token's log-prob as pmp.generate does", function()
    local model = load('llama')
    local prompt = prompts_of({ 7 }, 150, 2)[1]
    local expected = pmp.generate(model, { prompt }, { max_new_tokens = 5, return_logprobs = true })[1]
    local engine = engine_module.new(model, { block_size = 4, num_blocks = 16 })
    local got = engine:run({ { prompt = prompt, max_tokens = 5, logprobs = true } })[1].samples[1]
    assert.are.same(expected.tokens, got.tokens)
    for i = 1, 5 do assert(math.abs(expected.logprobs[i] - got.logprobs[i]) < 1e-5) end
  end)

  it('ends sequences at an eos id, and refuses bad requests by name', function()
    local model = load('qwen3')
    local prompt = prompts_of({ 6 }, 150, 4)[1]
    local greedy = alone(model, prompt, 4)
    local engine = engine_module.new(model, { block_size = 4, num_blocks = 16, eos_ids = { greedy[3] } })
    local sample = engine:run({ { prompt = prompt, max_tokens = 10 } })[1].samples[1]
    assert.are.equal('eos', sample.finish_reason)
    assert(#sample.tokens <= 3 and sample.tokens[#sample.tokens] == greedy[3])
    fails_with(function() engine:add({ prompt = {} }) end, 'prompt must be a non-empty list')
    fails_with(function() engine:add({ prompt = { 1 }, temprature = 1 }) end, "unknown field 'temprature'")
    fails_with(function() engine:add({ prompt = prompts_of({ 128 }, 150, 1)[1] }) end, 'the prompt has 128 tokens',
      'the context holds 128')
    fails_with(function() engine:add({ prompt = { 1 }, top_p = 2 }) end, 'top_p must be')
    fails_with(function() engine:add({ prompt = { 1 }, repetition_penalty = 0 }) end, 'repetition_penalty must be above 0')
    fails_with(function() engine:add({ prompt = { 1 }, seed = -1 }) end, 'seed must be')
    fails_with(function() engine:add({ prompt = { 1 }, stop = { 'x' } }) end, 'stop strings need')
    assert.is_false(engine:busy())
    fails_with(function() engine_module.new(model, { block_size = 0 }) end, 'block_size must be a positive integer')
    fails_with(function() engine_module.new(load('mistral')) end, 'sliding-window attention is not supported')
  end)
end)
