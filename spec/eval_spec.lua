require 'busted.runner'()
-- pmp.evaluation and recipes/eval.lua: perplexity against the mean NLL computed here from the model's
-- logits with a plain-Lua log-softmax, multiple-choice accuracy on a model whose choice likelihoods are
-- known by construction (all weights zero: every token has probability 1/V) and on a random model
-- against log-likelihoods summed here, exact match against greedy decoding re-run here without a
-- cache, bad task records, and the recipe end to end.
local evaluation = require 'pmp.evaluation'
local shell = require 'spec.support.shell'

local TEXT = 'the cat sees a dog. a dog sees the cat at night. 12 + 30 = 42. the old king finds a horse.'

local function char_tokenizer() return pmp.data.tokenizers.char_from_text(TEXT) end

local function random_model(vocab)
  pmp.manual_seed(7)
  local model = pmp.nn.GPTModel({ num_layers = 2, hidden_size = 32, num_attention_heads = 4, vocab_size = vocab,
    init_std = 0.3 })
  model:eval()
  return model
end

-- Every parameter zero: hidden states are zero, so the logits are zero and every token has
-- probability exactly 1/V.
local function uniform_model(vocab)
  local model = random_model(vocab)
  for _, p in ipairs(model:parameters()) do p:detach():zero_() end
  return model
end

-- log p(token) at every position of `ids` (a Lua list), from the logits with a plain-Lua log-softmax.
local function log_probs(model, ids)
  local logits = pmp.no_grad(function() return model(pmp.tensor({ ids }, { dtype = 'i64' })) end)
  local rows = logits:double():totable()[1]
  local out = {}
  for t, row in ipairs(rows) do
    local max = -math.huge
    for _, v in ipairs(row) do max = math.max(max, v) end
    local sum = 0
    for _, v in ipairs(row) do sum = sum + math.exp(v - max) end
    local log_z = max + math.log(sum)
    out[t] = function(id) return row[id + 1] - log_z end
  end
  return out
end

-- The mean NLL with windows of `length` inputs starting every `stride` tokens, each token scored in
-- the first window whose inputs precede it.
local function reference_mean_nll(model, tokens, length, stride)
  local scored, nll, count = {}, 0, 0
  local start = 1
  while true do
    local last = math.min(start + length - 1, #tokens - 1)
    local ids = {}
    for k = start, last do ids[#ids + 1] = tokens[k] end
    local lp = log_probs(model, ids)
    for k = start, last do
      if not scored[k + 1] then
        scored[k + 1] = true
        nll, count = nll - lp[k - start + 1](tokens[k + 1]), count + 1
      end
    end
    if last == #tokens - 1 then break end
    start = start + stride
  end
  assert(count == #tokens - 1)
  return nll / count
end

describe('evaluation.perplexity', function()
  local tokenizer = char_tokenizer()
  local tokens = tokenizer:encode(TEXT)

  it('is exp of the mean token NLL, for windows that do not overlap and for strided ones', function()
    local model = random_model(tokenizer.vocab_size)
    for _, case in ipairs({ { 16, 16, 8 }, { 16, 5, 3 }, { 7, 7, 1 }, { 200, 200, 8 } }) do
      local length, stride = case[1], case[2]
      local r = evaluation.perplexity(model, tokens, { seq_length = length, stride = stride, batch_size = case[3] })
      local expected = reference_mean_nll(model, tokens, length, stride)
      assert.are.equal(#tokens - 1, r.tokens)
      assert.is_true(math.abs(r.mean_nll - expected) < 1e-5, string.format('length %d stride %d: %.8f vs %.8f',
        length, stride, r.mean_nll, expected))
      assert.is_true(math.abs(r.perplexity - math.exp(expected)) < 1e-4 * math.exp(expected))
    end
  end)

  it('is the vocabulary size for a model that gives every token probability 1/V', function()
    local r = evaluation.perplexity(uniform_model(tokenizer.vocab_size), tokens, { seq_length = 10, stride = 4 })
    assert.is_true(math.abs(r.perplexity - tokenizer.vocab_size) < 1e-4, 'perplexity ' .. r.perplexity)
  end)

  it('rejects a stride longer than the window', function()
    assert.has_error(function() evaluation.perplexity(random_model(tokenizer.vocab_size), tokens, { seq_length = 4, stride = 5 }) end,
      'perplexity: stride must be in 1..seq_length (4), got 5')
  end)
end)

describe('evaluation.multiple_choice', function()
  local tokenizer = char_tokenizer()

  -- Zero weights except: every embedding row is 100 e1 (large enough that the norm's epsilon is lost) and the final norm's weight is 1, so the final
  -- hidden state is sqrt(H) * e1 at every position, and the untied output layer's first column is
  -- z / sqrt(H): every position predicts softmax(z), whatever the context.
  local function fixed_distribution_model(z)
    pmp.manual_seed(3)
    local H = 16
    local model = pmp.nn.GPTModel({ num_layers = 1, hidden_size = H, num_attention_heads = 2, vocab_size = #z,
      tie_embeddings = false })
    model:eval()
    for _, p in ipairs(model:parameters()) do p:detach():zero_() end
    model.embedding.word_embeddings.weight:detach():select(2, 1):fill_(100)
    model.decoder.final_layernorm.weight:detach():fill_(1)
    local column = {}
    for k, v in ipairs(z) do column[k] = v / math.sqrt(H) end
    model.output_layer.weight:detach():select(2, 1):copy_(pmp.tensor(column))
    return model
  end

  it('gives acc and acc_norm known by construction when every position predicts one fixed distribution', function()
    local z = {}
    for id = 0, tokenizer.vocab_size - 1 do z[id + 1] = (id * 7 % 11) * 0.45 end
    local log_z = 0
    for _, v in ipairs(z) do log_z = log_z + math.exp(v) end
    log_z = math.log(log_z)
    local function ll(text)
      local sum = 0
      for _, id in ipairs(tokenizer:encode(text)) do sum = sum + z[id + 1] - log_z end
      return sum
    end
    local records = {
      { context = 'the cat', choices = { ' sees', ' at night', ' a dog sees' }, gold = 0 },
      { context = 'the cat', choices = { ' at night', ' sees' }, gold = 0 },
      { context = 'a dog', choices = { ' sees the cat', ' sees', ' dog' }, gold = 2 },
      { context = '12 +', choices = { ' 30', ' 3', ' 42' }, gold = 0 },
      { context = 'the', choices = { ' old king', ' cat', ' horse.' }, gold = 2 },
    }
    local acc, acc_norm = 0, 0
    for _, record in ipairs(records) do
      local best, best_norm = 1, 1
      for c, choice in ipairs(record.choices) do
        if ll(choice) > ll(record.choices[best]) then best = c end
        if ll(choice) / #choice > ll(record.choices[best_norm]) / #record.choices[best_norm] then best_norm = c end
      end
      if best == record.gold + 1 then acc = acc + 1 end
      if best_norm == record.gold + 1 then acc_norm = acc_norm + 1 end
    end
    assert.is_true(acc ~= acc_norm and acc > 0 and acc_norm > 0 and acc < #records, 'the records tell acc from acc_norm')
    local r = evaluation.multiple_choice(fixed_distribution_model(z), tokenizer, records, { seq_length = 32 })
    assert.are.equal(acc / #records, r.acc)
    assert.are.equal(acc_norm / #records, r.acc_norm)
    assert.is_true(math.abs(r.details[3].loglikelihoods[1] - ll(' sees the cat')) < 1e-3)
  end)

  it('scores each choice by the log-likelihood of its tokens after the context', function()
    local model = random_model(tokenizer.vocab_size)
    local records = {
      { context = 'the cat sees', choices = { ' a dog.', ' the cat.', ' at night.' }, gold = 1 },
      { context = '12 + 30 =', choices = { ' 42.', ' 4.', ' 12 + 30.' }, gold = 0 },
      { context = 'a', choices = { ' dog', ' cat', ' king', ' horse' }, gold = 3 },
    }
    local expected_acc, expected_norm = 0, 0
    local expected_ll = {}
    for k, record in ipairs(records) do
      local best, best_norm, lls = 1, 1, {}
      for c, choice in ipairs(record.choices) do
        local ctx, all = tokenizer:encode(record.context), tokenizer:encode(record.context .. choice)
        local lp = log_probs(model, { unpack(all, 1, #all - 1) })
        local ll = 0
        for t = #ctx + 1, #all do ll = ll + lp[t - 1](all[t]) end
        lls[c] = ll
        if ll > lls[best] then best = c end
        if ll / #choice > lls[best_norm] / #record.choices[best_norm] then best_norm = c end
      end
      expected_ll[k] = lls
      if best == record.gold + 1 then expected_acc = expected_acc + 1 / #records end
      if best_norm == record.gold + 1 then expected_norm = expected_norm + 1 / #records end
    end
    local r = evaluation.multiple_choice(model, tokenizer, records, { seq_length = 64 })
    for k = 1, #records do
      for c = 1, #records[k].choices do
        assert.is_true(math.abs(r.details[k].loglikelihoods[c] - expected_ll[k][c]) < 1e-4)
      end
    end
    assert.is_true(math.abs(r.acc - expected_acc) < 1e-12)
    assert.is_true(math.abs(r.acc_norm - expected_norm) < 1e-12)
  end)
end)

describe('evaluation.exact_match', function()
  it('compares the greedy completion, whitespace trimmed, with the answers', function()
    -- a vocabulary without spaces or newlines, so the uniform model's greedy output (token 0, 'a',
    -- every step) runs to max_new_tokens
    local tokenizer = pmp.data.tokenizers.char({ 'a', 'b', 'c', 'd' })
    local records = {
      { prompt = 'bc', answer = 'aaaa' }, { prompt = 'd', answer = { 'x', ' aaaa ' } },
      { prompt = 'cc', answer = 'aaa' }, { prompt = 'a', answer = 'b' },
    }
    local r = evaluation.exact_match(uniform_model(4), tokenizer, records, { seq_length = 16, max_new_tokens = 4, stop = { '\n' } })
    assert.are.equal(0.5, r.exact_match)
    assert.are.equal('aaaa', r.details[3].completion)
  end)

  it('stops at a stop string, and matches greedy decoding without a cache', function()
    local tokenizer = char_tokenizer()
    local model = random_model(tokenizer.vocab_size)
    local prompts = { 'the cat', '12 + 30 =', 'a dog sees' }
    local records = {}
    for k, prompt in ipairs(prompts) do
      local ids = tokenizer:encode(prompt)
      local out = {}
      for _ = 1, 6 do
        local lp = log_probs(model, ids)
        local best, best_id = -math.huge, nil
        for id = 0, tokenizer.vocab_size - 1 do
          local v = lp[#ids](id)
          if v > best then best, best_id = v, id end
        end
        ids[#ids + 1] = best_id
        out[#out + 1] = best_id
      end
      records[k] = { prompt = prompt, answer = tokenizer:decode(out), full = tokenizer:decode(out) }
    end
    local r = evaluation.exact_match(model, tokenizer, records, { seq_length = 32, max_new_tokens = 6, stop = { '\n' } })
    for k, record in ipairs(records) do assert.are.equal(record.full, r.details[k].completion) end
    -- stopping at the completion's third character cuts it there
    local third = records[1].full:sub(3, 3)
    local cut = evaluation.exact_match(model, tokenizer, { records[1] }, { seq_length = 32, max_new_tokens = 6, stop = { third } })
    assert.are.equal(records[1].full:sub(1, (records[1].full:find(third, 1, true)) - 1), cut.details[1].completion)
  end)
end)

describe('evaluation.read_task', function()
  local dir
  before_each(function() dir = shell.temp_dir() end)
  after_each(function() shell.remove_dir(dir) end)

  local function task_error(lines)
    local path = dir .. '/t.jsonl'
    shell.write_file(path, table.concat(lines, '\n') .. '\n')
    local ok, err = pcall(evaluation.read_task, path)
    assert.is_false(ok)
    return (tostring(err):gsub(dir:gsub('%p', '%%%0'), 'DIR'))
  end

  it('names the file and line of a bad record', function()
    local good = '{"context": "a", "choices": [" b", " c"], "gold": 1}'
    assert.are.equal('DIR/t.jsonl:3: "gold" must be a 0-based index into the 2 choices, got 2',
      task_error({ good, '', '{"context": "a", "choices": [" b", " c"], "gold": 2}' }))
    assert.matches('^DIR/t.jsonl:2: not valid JSON', task_error({ good, '{"context": "a", ' }))
    assert.are.equal('DIR/t.jsonl:1: "choices" must be a list of at least 2 strings',
      task_error({ '{"context": "a", "choices": [" b"], "gold": 0}' }))
    assert.are.equal('DIR/t.jsonl:2: a exact_match record in a multiple_choice task',
      task_error({ good, '{"prompt": "a", "answer": "b"}' }))
    assert.are.equal('DIR/t.jsonl:1: "answer" must be a string or a list of strings',
      task_error({ '{"prompt": "a", "answer": 3}' }))
    assert.matches('^DIR/t.jsonl:1: expected "context"', task_error({ '{"text": "a"}' }))
  end)

  it('reads a task named after its file, up to a limit', function()
    local path = dir .. '/sums.jsonl'
    shell.write_file(path, '{"prompt": "1 + 1 =", "answer": "2"}\n{"prompt": "2 + 2 =", "answer": ["4", "four"]}\n')
    local task = evaluation.read_task(path, 1)
    assert.are.same({ name = 'sums', kind = 'exact_match', records = { { prompt = '1 + 1 =', answer = '2' } } }, task)
  end)
end)

describe('recipes/eval.lua', function()
  local dir
  before_each(function() dir = shell.temp_dir() end)
  after_each(function() shell.remove_dir(dir) end)

  local function run(args)
    local words = { 'cd', shell.quote(dir), '&&', shell.quote(shell.pmp), shell.quote(shell.root .. '/recipes/eval.lua') }
    for _, a in ipairs(args) do words[#words + 1] = shell.quote(a) end
    return shell.run(table.concat(words, ' '))
  end

  it('evaluates a checkpoint on a text file and task files, writing JSON and a table', function()
    local tokenizer = char_tokenizer()
    local model = random_model(tokenizer.vocab_size)
    pmp.checkpoint.save(dir .. '/ckpt', 5, model, nil,
      { model_config = model.config, tokenizer = tokenizer:state(), args = { seq_length = 12 } })
    shell.write_file(dir .. '/text.txt', TEXT)
    shell.write_file(dir .. '/mc.jsonl', '{"context": "the cat", "choices": [" sees", " at night"], "gold": 0}\n')
    shell.write_file(dir .. '/em.jsonl', '{"prompt": "12 +", "answer": "30"}\n')
    local out, err, status = run({ '--load', 'ckpt', '--data-path', 'text.txt', '--stride', '5', '--task', 'mc.jsonl',
      'em.jsonl', '--output', 'r.json' })
    assert.are.equal(0, status, err)
    local r = pmp.json.decode(pmp.io.read_file(dir .. '/r.json'))
    assert.are.equal(12, r.seq_length)
    local expected = reference_mean_nll(model, tokenizer:encode(TEXT), 12, 5)
    assert.is_true(math.abs(r.perplexity.mean_nll - expected) < 1e-5)
    assert.are.equal(#TEXT - 1, r.perplexity.tokens)
    assert.are.equal(1, r.tasks.mc.count)
    assert.are.equal(1, r.tasks.em.count)
    assert.matches('text.txt%s+perplexity%s+' .. string.format('%.4f', math.exp(r.perplexity.mean_nll)):gsub('%.', '%%.'), out)
    assert.matches('mc%s+acc_norm%s+[01]%.0000%s+1 records', out)
    assert.matches('em%s+exact_match', out)
    assert.matches('perplexity: %d+/%d+ tokens %(100%.0%%%)', err)
  end)

  it('reads an indexed dataset as one token stream', function()
    local tokenizer = char_tokenizer()
    local model = random_model(tokenizer.vocab_size)
    pmp.checkpoint.save(dir .. '/ckpt', 1, model, nil, { model_config = model.config, tokenizer = tokenizer:state() })
    local builder = pmp.data.indexed.builder(dir .. '/text', { vocab_size = tokenizer.vocab_size })
    local tokens = tokenizer:encode(TEXT)
    local half = math.floor(#tokens / 2)
    builder:add_document({ unpack(tokens, 1, half) }, { half })
    builder:add_document({ unpack(tokens, half + 1) }, { #tokens - half })
    builder:finalize()
    local _, err, status = run({ '--load', 'ckpt', '--data-path', 'text', '--seq-length', '9', '--output', 'r.json' })
    assert.are.equal(0, status, err)
    local r = pmp.json.decode(pmp.io.read_file(dir .. '/r.json'))
    assert.are.equal(#tokens - 1, r.perplexity.tokens)
    assert.is_true(math.abs(r.perplexity.mean_nll - reference_mean_nll(model, tokens, 9, 9)) < 1e-5)
  end)

  it('with no arguments evaluates a random model on the embedded text and sums', function()
    local out, err, status = run({})
    assert.are.equal(0, status, err)
    assert.matches('a random model', out)
    assert.matches('embedded held%-out text%s+perplexity', out)
    assert.matches('sums_choice%s+acc%s', out)
    assert.matches('sums_exact%s+exact_match', out)
  end)

  it('fails with the task file and line of a bad record', function()
    shell.write_file(dir .. '/bad.jsonl', '{"prompt": "a", "answer": "b"}\n{"prompt": 1, "answer": "b"}\n')
    local _, err, status = run({ '--task', 'bad.jsonl' })
    assert.are_not.equal(0, status)
    assert.matches('bad.jsonl:2: an exact%-match record needs a string "prompt"', err)
  end)
end)
