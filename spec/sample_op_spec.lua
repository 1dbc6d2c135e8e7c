require 'busted.runner'()
-- pmp.sample, the engine's token choice, on its own: thousands of rows of the same logits drawn in one
-- call, their frequencies against the distributions transformers' logits processors define
-- (tools/make_sampling_fixtures.py -> spec/fixtures/sampling/cases.json) in f64, f32 and bf16; greedy
-- choice against torch.argmax; log-probs against log_softmax computed here in f64; generators; thread
-- counts; bad settings.
local root = package.loaded['pmp.root']
local fixture = pmp.json.decode(pmp.io.read_file(root .. '/spec/fixtures/sampling/cases.json'))

local DRAWS = 20000
-- a log-prob rounded to f32 (logits exact in every dtype, the arithmetic in f64)
local LOGPROB_TOLERANCE = { f64 = 1e-12, f32 = 1e-6, bf16 = 1e-6 }

-- The chi-square quantile with `dof` degrees of freedom at upper tail probability ~1e-6
-- (Wilson-Hilferty): a correct sampler exceeds it once in a million seeds.
local function chi_square_bound(dof)
  local z = 4.753
  local a = 2 / (9 * dof)
  return dof * (1 - a + z * math.sqrt(a)) ^ 3
end

-- DRAWS rows of the same logits (and the same seen ids) sampled at once.
local function draw(logits, prompt, case, dtype, generator)
  local vocab = #logits
  local rows = pmp.tensor(logits, { dtype = 'f64' }):to(dtype):reshape(1, vocab):expand(DRAWS, vocab)
  local seen = #prompt > 0 and pmp.tensor(prompt, { dtype = 'i64' }):reshape(1, #prompt):expand(DRAWS, #prompt) or nil
  local ids, logprobs = pmp.sample(rows, { temperature = case.temperature, top_k = case.top_k, top_p = case.top_p,
    repetition_penalty = case.repetition_penalty, seen = seen, generator = generator })
  assert.are.equal('i64', ids.dtype)
  assert.are.equal(dtype == 'f64' and 'f64' or 'f32', logprobs.dtype)
  return ids:totable(), logprobs:totable()
end

local function check_distribution(logits, prompt, case, dtype, seed)
  local ids, logprobs = draw(logits, prompt, case, dtype, pmp.Generator(seed))
  local vocab = #logits
  local counts = {}
  for id = 0, vocab - 1 do counts[id] = 0 end
  local logprob_of = {}
  for row, id in ipairs(ids) do
    if not counts[id] then error('sampled id ' .. tostring(id) .. ' is outside the vocabulary') end
    counts[id] = counts[id] + 1
    logprob_of[id] = logprob_of[id] or logprobs[row]
    if logprobs[row] ~= logprob_of[id] then error('rows that drew token ' .. id .. ' report different log-probs') end
  end
  for id, logprob in pairs(logprob_of) do
    assert.is_near(case.logprobs[id + 1], logprob, LOGPROB_TOLERANCE[dtype], 'token ' .. id)
  end
  local chi_square, dof = 0, -1
  for id = 0, vocab - 1 do
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
  return counts
end

describe('pmp.sample draws from the distribution transformers defines', function()
  for _, dtype in ipairs({ 'f64', 'f32', 'bf16' }) do
    for _, case in ipairs(fixture.cases) do
      it(dtype .. ': ' .. case.name, function()
        check_distribution(fixture.logits, fixture.prompt, case, dtype, 1234)
      end)
    end
    for _, case in ipairs(fixture.ties.cases) do
      it(dtype .. ': ' .. case.name, function()
        check_distribution(fixture.ties.logits, {}, case, dtype, 99)
      end)
    end
  end
  -- a nucleus a hundred tokens deep, its boundary far below the peak: every kept token is drawn
  -- (each expects at least a few draws) and no other
  for _, case in ipairs(fixture.wide.cases) do
    it(case.name, function()
      local counts = check_distribution(fixture.wide.logits, {}, case, 'f32', 5)
      for id = 0, #fixture.wide.logits - 1 do
        if case.probs[id + 1] * DRAWS > 20 then assert(counts[id] > 0, 'kept token ' .. id .. ' never drawn') end
      end
    end)
  end
end)

describe('pmp.sample greedy', function()
  local rows = {}
  for b, row in ipairs(fixture.argmax.rows) do
    rows[b] = {}
    for v, x in ipairs(row) do rows[b][v] = x == pmp.json.null and 0 / 0 or x end
  end

  it('picks what torch.argmax picks: the first largest, NaN counting as largest, in f32 and bf16', function()
    for _, dtype in ipairs({ 'f32', 'bf16' }) do
      local ids = pmp.sample(pmp.tensor(rows):to(dtype), { temperature = 0 })
      assert.are.same(fixture.argmax[dtype], ids:totable(), dtype)
    end
  end)

  it('ignores top_k and top_p and draws nothing', function()
    local g = pmp.Generator(3)
    local ids = pmp.sample(pmp.tensor(fixture.ties.logits):reshape(1, -1), { temperature = 0, top_k = 7, top_p = 0.1,
      generator = g })
    assert.are.same({ 1 }, ids:totable())
    assert.are.equal(pmp.Generator(3):uniform(), g:uniform())
  end)
end)

-- log_softmax(penalised(logits) / temperature) in f64, from the logits as stored in dtype.
local function expected_logprobs(logits, seen, penalty, temperature, ids)
  local out = {}
  for b, row in ipairs(logits) do
    local x = {}
    for v, value in ipairs(row) do x[v] = value end
    for _, id in ipairs(seen[b]) do
      local value = row[id + 1]
      x[id + 1] = value < 0 and value * penalty or value / penalty
    end
    local peak = -math.huge
    for v = 1, #x do
      if temperature > 0 then x[v] = x[v] / temperature end
      peak = math.max(peak, x[v])
    end
    local total = 0
    for v = 1, #x do total = total + math.exp(x[v] - peak) end
    out[b] = x[ids[b] + 1] - peak - math.log(total)
  end
  return out
end

describe('pmp.sample log-probs', function()
  it('are log_softmax of the penalised, temperature-scaled logits, for f32 and bf16, sampling and greedy', function()
    pmp.manual_seed(11)
    local seen = { { 3, 3, 17 }, {}, { 0, 49, 20, 21 } }
    local seen_tensor = pmp.tensor({ { 3, 3, 17, -1 }, { -1, -1, -1, -1 }, { 0, 49, 20, 21 } }, { dtype = 'i64' })
    for _, dtype in ipairs({ 'f32', 'bf16' }) do
      local logits = (pmp.randn(3, 50) * 3):to(dtype)
      local stored = logits:double():totable()
      for _, temperature in ipairs({ 0, 0.7, 1.6 }) do
        local ids, logprobs = pmp.sample(logits, { temperature = temperature, top_k = 10, top_p = 0.8,
          repetition_penalty = 1.3, seen = seen_tensor, generator = pmp.Generator(1) })
        local expected = expected_logprobs(stored, seen, 1.3, temperature, ids:totable())
        for b, value in ipairs(logprobs:totable()) do
          assert.is_near(expected[b], value, 1e-5, dtype .. ' temperature ' .. temperature .. ' row ' .. b)
        end
      end
    end
  end)

  it('take seen ids as a tensor or as lists of ids alike', function()
    local logits = pmp.tensor({ { 1, -2, 3, 0.5 }, { 2, 2, -1, 0 } })
    local as_lists = pmp.sample(logits, { temperature = 0, repetition_penalty = 4, seen = { { 2 }, { 0, 0 } } })
    local as_tensor = pmp.sample(logits, { temperature = 0, repetition_penalty = 4,
      seen = pmp.tensor({ { 2, -1 }, { 0, 0 } }, { dtype = 'i64' }) })
    -- row 1: 3 / 4 falls below 1; row 2: 2 / 4 falls below the other 2
    assert.are.same({ 0, 1 }, as_lists:totable())
    assert.are.same({ 0, 1 }, as_tensor:totable())
  end)
end)

describe('pmp.sample generators', function()
  local logits = pmp.tensor({ { 0.1, 0.3, -0.2, 0.05, 0.4, 0, 0.2, -0.1 } })
  local function rows(n) return logits:expand(n, 8) end

  local function tokens(n, generator) return pmp.sample(rows(n), { generator = generator }):totable() end

  it('a Generator starts the stream manual_seed starts, and sampling without one draws from that stream', function()
    local g = pmp.Generator(42)
    pmp.manual_seed(42)
    local stream = pmp.rand(3, { dtype = 'f64' }):totable()
    for k = 1, 3 do assert.are.equal(stream[k], g:uniform()) end
    pmp.manual_seed(42)
    local by_default = tokens(200)
    assert.are.same(tokens(200, pmp.Generator(42)), by_default)
  end)

  it('repeats for a seed, differs for another, and leaves the default generator alone', function()
    pmp.manual_seed(9)
    local untouched = pmp.rand(2, { dtype = 'f64' }):totable()
    pmp.manual_seed(9)
    local first = tokens(300, pmp.Generator(5))
    assert.are.same(untouched, pmp.rand(2, { dtype = 'f64' }):totable())
    assert.are.same(first, tokens(300, pmp.Generator(5)))
    assert.are_not.same(first, tokens(300, pmp.Generator(6)))
    local g = pmp.Generator(6)
    g:manual_seed(5)
    assert.are.same(first, tokens(300, g))
  end)

  it('per row: each row follows its own generator, whatever the other rows draw from', function()
    local alone = {}
    for b = 1, 4 do
      local g = pmp.Generator(100 + b)
      alone[b] = {}
      for step = 1, 50 do alone[b][step] = tokens(1, g)[1] end
    end
    local gens, others = {}, {}
    for b = 1, 4 do gens[b] = pmp.Generator(100 + b) end
    for b = 1, 4 do others[b] = pmp.Generator(7) end
    for step = 1, 50 do
      -- rows 1 and 3 from their generators, rows 2 and 4 from others'
      local mixed = pmp.sample(rows(4), { generator = { gens[1], others[2], gens[3], others[4] } }):totable()
      assert.are.equal(alone[1][step], mixed[1])
      assert.are.equal(alone[3][step], mixed[3])
      local again = pmp.sample(rows(2), { generator = { gens[2], gens[4] } }):totable()
      assert.are.equal(alone[2][step], again[1])
      assert.are.equal(alone[4][step], again[2])
    end
  end)

  it('a generator shared by rows serves them in row order', function()
    local shared = tokens(6, pmp.Generator(77))
    local g = pmp.Generator(77)
    for b = 1, 6 do assert.are.equal(shared[b], tokens(1, g)[1]) end
  end)
end)

describe('pmp.sample threads', function()
  it('gives the same ids and log-probs on one thread and on two', function()
    local threads = pmp.num_threads()
    pmp.manual_seed(3)
    local logits = (pmp.randn(64, 5000) * 4):to('bf16')
    local seen = pmp.randint(0, 5000, { 64, 30 })
    local settings = {
      { temperature = 0, repetition_penalty = 1.2, seen = seen },
      { temperature = 0.9, top_k = 40, top_p = 0.9, repetition_penalty = 1.2, seen = seen },
      { temperature = 1.1, top_p = 0.95 },
      { temperature = 1 },
    }
    for k, options in ipairs(settings) do
      local results = {}
      for _, n in ipairs({ 1, 2 }) do
        pmp.set_num_threads(n)
        options.generator = pmp.Generator(k)
        local ids, logprobs = pmp.sample(logits, options)
        results[n] = { ids:totable(), logprobs:totable() }
      end
      pmp.set_num_threads(threads)
      assert.are.same(results[1], results[2], 'settings ' .. k)
    end
  end)
end)

describe('pmp.sample rejects bad input', function()
  local logits = pmp.tensor({ { 1, 2, 3 }, { 3, 2, 1 } })
  local cases = {
    { pmp.tensor({ 1, 2, 3 }), {}, 'logits must be a tensor %[batch, vocab%], got shape %[3%]' },
    { pmp.zeros(2, 3, 4), {}, 'logits must be a tensor %[batch, vocab%], got shape %[2,3,4%]' },
    { 'logits', {}, 'logits must be a tensor %[batch, vocab%], got string' },
    { pmp.tensor({ { 1, 2 } }, { dtype = 'i64' }), {}, 'logits must be a floating tensor' },
    { pmp.zeros(2, 0), {}, 'logits must be a floating tensor %[batch, vocab%] with vocab > 0, got f32 %[2,0%]' },
    { logits, { top_k = -1 }, 'top_k must be >= 0' },
    { logits, { top_k = 1.5 }, 'options.top_k must be an integer' },
    { logits, { top_p = 0 }, 'top_p must be in %(0, 1%]' },
    { logits, { top_p = 1.01 }, 'top_p must be in %(0, 1%]' },
    { logits, { temperature = -0.5 }, 'temperature must be a finite number >= 0' },
    { logits, { temperature = 0 / 0 }, 'temperature must be a finite number >= 0' },
    { logits, { temperature = 'hot' }, 'options.temperature must be a number' },
    { logits, { repetition_penalty = 0 }, 'repetition_penalty must be a finite number > 0' },
    { logits, { repetition_penalty = 1.2, seen = { { 3 }, {} } }, 'seen id 3 in row 0 is outside the vocabulary of 3' },
    { logits, { repetition_penalty = 1.2, seen = pmp.zeros(3, 1):long() }, 'seen must be an integer tensor %[2, ids%]' },
    { logits, { repetition_penalty = 1.2, seen = pmp.zeros(2, 1) }, 'seen must be an integer tensor' },
    { logits, { generator = { pmp.Generator(1) } }, 'options.generator must be a pmp.Generator or a list of 2' },
    { logits, { generator = { pmp.Generator(1), 7 } }, 'options.generator%[2%] is not a pmp.Generator' },
    { pmp.tensor({ { 1, 0 / 0 } }), {}, 'row 0 of logits holds NaN or %+inf' },
    { pmp.tensor({ { -math.huge, -math.huge } }), {}, 'every logit of row 0 is %-inf' },
  }
  for k, case in ipairs(cases) do
    it('case ' .. k .. ': ' .. case[3]:gsub('%%', ''), function()
      local ok, err = pcall(pmp.sample, case[1], case[2])
      assert.is_false(ok)
      assert.truthy(tostring(err):find('sample: ' .. case[3]), tostring(err))
    end)
  end

  it('and pmp.Generator a seed that is no integer', function()
    local ok, err = pcall(pmp.Generator, 1.5)
    assert.is_false(ok)
    assert.truthy(tostring(err):find('Generator: seed must be an integer', 1, true), tostring(err))
  end)
end)
