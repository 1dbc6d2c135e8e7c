require 'busted.runner'()
-- pmp.generate's sampling as a distribution: a stand-in model returns the same fixed logits for every
-- row of a large batch, so one call draws thousands of independent seeded samples through the whole
-- generate path (repetition penalty, temperature, top-k, top-p). Their frequencies are compared with
-- the exact filtered, renormalised distributions that transformers' logits processors give
-- (tools/make_sampling_fixtures.py -> spec/fixtures/sampling/cases.json).
local root = package.loaded['pmp.root']
local fixture = pmp.json.decode(pmp.io.read_file(root .. '/spec/fixtures/sampling/cases.json'))

local DRAWS = 20000
local VOCAB = #fixture.logits

-- A model whose next-token logits are fixed: decode returns them for every row and position.
local function fixed_logits_model(logits)
  local model = { training = false }
  function model.eval(self) self.training = false end
  function model.train(self) self.training = true end
  function model.decode(_, tokens)
    local B, T = tokens:size(1), tokens:size(2)
    return pmp.tensor(logits, { dtype = 'f64' }):reshape(1, 1, VOCAB):expand(B, T, VOCAB)
  end
  return model
end

local function draw(case, seed, rows)
  rows = rows or DRAWS
  local prompts = {}
  for b = 1, rows do prompts[b] = fixture.prompt end
  local results = pmp.generate(fixed_logits_model(fixture.logits), prompts, {
    max_new_tokens = 1, seed = seed, return_logprobs = true, temperature = case.temperature,
    top_k = case.top_k, top_p = case.top_p, repetition_penalty = case.repetition_penalty })
  assert.are.equal(rows, #results)
  return results
end

-- The chi-square quantile with `dof` degrees of freedom at upper tail probability ~1e-6
-- (Wilson-Hilferty): a correct sampler exceeds it once in a million seeds.
local function chi_square_bound(dof)
  local z = 4.753
  local a = 2 / (9 * dof)
  return dof * (1 - a + z * math.sqrt(a)) ^ 3
end

describe('sampling in pmp.generate', function()
  for _, case in ipairs(fixture.cases) do
    it('draws from the exact distribution transformers defines: ' .. case.name, function()
      local results = draw(case, 1234)
      local counts = {}
      for id = 0, VOCAB - 1 do counts[id] = 0 end
      for _, result in ipairs(results) do
        local id = result.tokens[1]
        assert(counts[id], 'sampled id ' .. tostring(id) .. ' is outside the vocabulary')
        counts[id] = counts[id] + 1
        -- the log-prob pmp reports is that of the penalised, temperature-scaled, unfiltered distribution
        assert.is_near(case.logprobs[id + 1], result.logprobs[1], 1e-12)
      end
      local chi_square, dof = 0, -1
      for id = 0, VOCAB - 1 do
        local p = case.probs[id + 1]
        if p == 0 then
          assert.are.equal(0, counts[id], 'token ' .. id .. ' was filtered out but drawn')
        else
          local expected = p * DRAWS
          chi_square = chi_square + (counts[id] - expected) ^ 2 / expected
          dof = dof + 1
        end
      end
      if dof > 0 then
        assert(chi_square < chi_square_bound(dof), string.format(
          'chi-square %.1f over %d degrees of freedom exceeds %.1f', chi_square, dof, chi_square_bound(dof)))
      end
    end)
  end

  it('repeats a seeded run exactly and differs for another seed', function()
    local case = fixture.cases[#fixture.cases]
    local function tokens(seed)
      local out = {}
      for b, result in ipairs(draw(case, seed, 2000)) do out[b] = result.tokens[1] end
      return out
    end
    local first = tokens(7)
    assert.are.same(first, tokens(7))
    assert.are_not.same(first, tokens(8))
  end)

  it('draws each row from its own generator when given one per prompt, leaving the default one alone', function()
    local case = fixture.cases[#fixture.cases]
    local function run(prompts, generator)
      return pmp.generate(fixed_logits_model(fixture.logits), prompts, { max_new_tokens = 12,
        temperature = case.temperature, top_k = case.top_k, top_p = case.top_p,
        repetition_penalty = case.repetition_penalty, generator = generator })
    end
    pmp.manual_seed(3)
    local untouched = pmp.rand(2, { dtype = 'f64' }):totable()
    pmp.manual_seed(3)
    local together = run({ fixture.prompt, fixture.prompt, fixture.prompt },
      { pmp.Generator(1), pmp.Generator(2), pmp.Generator(3) })
    assert.are.same(untouched, pmp.rand(2, { dtype = 'f64' }):totable())
    for b = 1, 3 do
      assert.are.same(run({ fixture.prompt }, pmp.Generator(b))[1].tokens, together[b].tokens)
    end
    assert.are_not.same(together[1].tokens, together[2].tokens)
    local ok, err = pcall(run, { fixture.prompt, fixture.prompt }, { pmp.Generator(1) })
    assert.is_false(ok)
    assert.truthy(tostring(err):find('options.generator must be a pmp.Generator or a list of 2', 1, true), tostring(err))
  end)
end)
