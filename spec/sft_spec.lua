require 'busted.runner'()
-- SFT data: formats, assistant-only labels, and packing whose loss equals the unpacked loss.
local fails_with = require('spec.support.expect').fails_with
local sft = pmp.data.sft

-- ChatML, the format Qwen uses, written out directly so these tests do not depend on a template engine.
local function chatml(messages, add_generation_prompt)
  local parts = {}
  for _, m in ipairs(messages) do parts[#parts + 1] = '<|im_start|>' .. m.role .. '\n' .. m.content .. '<|im_end|>\n' end
  if add_generation_prompt then parts[#parts + 1] = '<|im_start|>assistant\n' end
  return table.concat(parts)
end

-- A byte tokenizer with the two ChatML markers as single special tokens.
local Bytes = {}
function Bytes:encode(text)
  local ids, k = {}, 1
  while k <= #text do
    if text:sub(k, k + 11) == '<|im_start|>' then ids[#ids + 1], k = 256, k + 12
    elseif text:sub(k, k + 9) == '<|im_end|>' then ids[#ids + 1], k = 257, k + 10
    else ids[#ids + 1], k = text:byte(k), k + 1 end
  end
  return ids
end

describe('pmp.data.sft', function()
  it('detects and converts alpaca, sharegpt and messages records', function()
    assert.are.equal('alpaca', sft.detect_format({ instruction = 'a', input = '', output = 'b' }))
    assert.are.same({ { role = 'user', content = 'Add.\n\n2+2' }, { role = 'assistant', content = '4' } },
      sft.to_messages({ instruction = 'Add.', input = '2+2', output = '4' }))
    assert.are.same({ { role = 'system', content = 's' }, { role = 'user', content = 'hi' }, { role = 'assistant', content = 'yo' } },
      sft.to_messages({ system = 's', conversations = { { from = 'human', value = 'hi' }, { from = 'gpt', value = 'yo' } } }))
    local m = { { role = 'user', content = 'x' } }
    assert.are.equal(m, sft.to_messages({ messages = m }))
    fails_with(function() sft.to_messages({ text = 'plain' }) end, 'sft: unknown record format')
    fails_with(function() sft.to_messages({ conversations = { { from = 'robot', value = 'x' } } }) end,
      "sft: conversation turn 1 has an unknown 'from' (robot)")
  end)

  it('trains only assistant tokens, end-of-turn included, over several turns', function()
    local messages = { { role = 'system', content = 'S' }, { role = 'user', content = 'Q1' }, { role = 'assistant', content = 'A1' },
      { role = 'user', content = 'Q2' }, { role = 'assistant', content = 'A2' } }
    local s = sft.tokenize(messages, { tokenizer = Bytes, render = chatml })
    assert.are.same(Bytes:encode(chatml(messages, false)), s.ids)
    local trained = {}
    for k, id in ipairs(s.ids) do
      if s.mask[k] then trained[#trained + 1] = id < 256 and string.char(id) or (id == 257 and '<E>' or '<S>') end
    end
    -- exactly the two answers, each with its end-of-turn token and newline
    assert.are.equal('A1<E>\nA2<E>\n', table.concat(trained))
    local all = sft.tokenize(messages, { tokenizer = Bytes, render = chatml, train_on_prompt = true })
    for k in ipairs(all.ids) do assert.is_true(all.mask[k]) end
  end)

  it('locates answers by their prompts when the template rewrites earlier turns', function()
    -- like Qwen3: the last answer carries an empty thinking block that disappears once a turn follows
    local function thinking(messages, gen)
      local parts = {}
      for k, m in ipairs(messages) do
        local content = m.content
        if m.role == 'assistant' and k == #messages then content = '<think></think>' .. content end
        parts[#parts + 1] = '<|im_start|>' .. m.role .. '\n' .. content .. '<|im_end|>\n'
      end
      if gen then parts[#parts + 1] = '<|im_start|>assistant\n' end
      return table.concat(parts)
    end
    local messages = { { role = 'user', content = 'Q1' }, { role = 'assistant', content = 'A1' },
      { role = 'user', content = 'Q2' }, { role = 'assistant', content = 'A2' } }
    local s = sft.tokenize(messages, { tokenizer = Bytes, render = thinking, end_of_turn_id = 257 })
    assert.are.same(Bytes:encode(thinking(messages, false)), s.ids)
    local trained = {}
    for k, id in ipairs(s.ids) do
      if s.mask[k] then trained[#trained + 1] = id < 256 and string.char(id) or (id == 257 and '<E>' or '<S>') end
    end
    assert.are.equal('A1<E><think></think>A2<E>', table.concat(trained))
    local ok, message = pcall(sft.tokenize, messages, { tokenizer = Bytes, render = thinking })
    assert.is_false(ok)
    assert.matches('no end_of_turn_id', message)
  end)

  it('packs samples so that the loss equals the unpacked loss', function()
    pmp.manual_seed(4)
    local samples = {}
    for k = 1, 5 do
      local q, a = string.rep('q', k + 2), string.rep('a', 7 - k)
      samples[k] = sft.tokenize({ { role = 'user', content = q }, { role = 'assistant', content = a } }, { tokenizer = Bytes, render = chatml })
    end
    local model = pmp.nn.GPTModel({ num_layers = 2, hidden_size = 32, num_attention_heads = 4, vocab_size = 258, dtype = 'f64' })
    local function loss_sum(rows)
      local batch = sft.collate(rows)
      local count = batch.targets:ne(sft.IGNORE_INDEX):sum():item()
      local total = model(batch.inputs, batch.targets, { positions = batch.positions, first_key = batch.first_key, reduction = 'sum' })
      return total:item(), count
    end
    local packed_rows = sft.pack(samples, 64)
    assert.is_true(#packed_rows < #samples)
    local packed, n_packed = loss_sum(packed_rows)
    local unpacked, n_unpacked = loss_sum(sft.pad(samples, 64))
    assert.are.equal(n_unpacked, n_packed)
    assert.is_near(unpacked, packed, 1e-9 * math.abs(unpacked))
    -- and a row never mixes documents in attention: the first key of each token is its document start
    local row = packed_rows[1]
    for t = 1, #row.inputs do assert.is_true(row.first_key[t] <= t - 1 and row.positions[t] == t - 1 - row.first_key[t]) end
  end)

  it('never lets attention cross documents: one document\'s loss has zero gradient on another\'s tokens', function()
    -- document A uses ids 1..9, document B ids 20..29; A's loss must not reach B's embedding rows
    local a = { ids = { 1, 2, 3, 4, 5, 6, 7, 8, 9 }, mask = { true, true, true, true, true, true, true, true, true } }
    local b = { ids = { 20, 21, 22, 23, 24, 25, 26, 27, 28, 29 }, mask = {} }
    for k = 1, #b.ids do b.mask[k] = false end   -- B trains nothing, so the loss is A's alone
    local batch = sft.collate(sft.pack({ b, a }, 32))
    -- untied: with tied embeddings every row gets gradient through the output layer's softmax
    local model = pmp.nn.GPTModel({ num_layers = 2, hidden_size = 16, num_attention_heads = 2, vocab_size = 32, dtype = 'f64',
      tie_embeddings = false })
    model(batch.inputs, batch.targets, { positions = batch.positions, first_key = batch.first_key }):backward()
    local grad = model.embedding.word_embeddings.weight.grad
    assert.are.equal(0, grad:narrow(1, 21, 10):abs():max():item())
    assert.is_true(grad:narrow(1, 2, 9):abs():max():item() > 0)
  end)

  it('recipes/sft.lua fine-tunes a tiny model: the loss falls, a checkpoint resumes, save_hf loads back', function()
    local tiny_hf = require 'spec.support.tiny_hf'
    if not tiny_hf.available() then
      pending('needs ../shared/tokenizers/qwen3')
      return
    end
    local shell = require 'spec.support.shell'
    local dir = shell.temp_dir()
    local tok = tiny_hf.write(dir .. '/base')
    shell.write_file(dir .. '/data.jsonl', table.concat({
      '{"instruction": "Say hello.", "input": "", "output": "Hello there!"}',
      '{"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]}',
      '{"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]}',
    }, '\n') .. '\n')
    local out, err, status = shell.run_pmp({ shell.root .. '/recipes/sft.lua', '--load', dir .. '/base', '--data-path',
      dir .. '/data.jsonl', '--packing', '--seq-length', '96', '--micro-batch-size', '1', '--global-batch-size', '1',
      '--train-iters', '12', '--log-interval', '1', '--lr', '1e-2', '--lr-decay-style', 'constant',
      '--save', dir .. '/ck', '--save-hf', dir .. '/out' })
    assert.are.equal(0, status, err)
    local losses = {}
    for loss in out:gmatch('lm loss: ([%d.E+-]+)') do losses[#losses + 1] = tonumber(loss) end
    assert.are.equal(12, #losses)
    assert.is_true(losses[12] < 0.8 * losses[1], 'loss did not fall: ' .. losses[1] .. ' -> ' .. losses[12])
    local tuned = pmp.models.from_pretrained(dir .. '/out')
    assert.are.equal(tok.vocab_size, tuned.config.vocab_size)
    assert.are.equal(12, pmp.checkpoint.latest_iteration(dir .. '/ck'))
    shell.remove_dir(dir)
  end)

  it('runs the embedded default on a pretraining checkpoint and reports the task metric', function()
    local shell = require 'spec.support.shell'
    local dir = shell.temp_dir()
    local function run(script, args)
      local words = { 'cd', shell.quote(dir), '&&', shell.quote(shell.pmp), shell.quote(shell.root .. '/recipes/' .. script) }
      for _, a in ipairs(args) do words[#words + 1] = shell.quote(a) end
      return shell.run(table.concat(words, ' '))
    end
    local _, err0, status0 = run('sft.lua', {})
    assert.are_not.equal(0, status0)
    assert.matches('run `pmp recipes/pretrain.lua` first', err0)
    local _, err1, status1 = run('pretrain.lua', { '--num-layers', '1', '--hidden-size', '32', '--num-attention-heads', '2',
      '--train-iters', '4', '--log-interval', '2', '--eval-interval', '4', '--sample-length', '0' })
    assert.are.equal(0, status1, err1)
    local out, err2, status2 = run('sft.lua', { '--train-iters', '6', '--log-interval', '2' })
    assert.are.equal(0, status2, err2)
    assert.matches('2000 samples', out)
    assert.matches('exact%-match accuracy on 100 held%-out sums: [%d.]+%% before, [%d.]+%% after fine%-tuning', out)
    shell.remove_dir(dir)
  end)
end)

describe('pmp.train.chat_data.samples', function()
  local chat_data = pmp.train.chat_data
  local tokenizer = setmetatable({ eos_id = 257 }, { __index = Bytes })
  local function lines_of(text)
    local path = os.tmpname()
    local file = assert(io.open(path, 'w'))
    file:write(text)
    file:close()
    local lines = chat_data.lines(path)
    os.remove(path)
    return lines
  end
  local function samples(text, options)
    options = options or {}
    options.tokenizer, options.render, options.format, options.source = tokenizer, chatml, 'auto', 'data.jsonl'
    return chat_data.samples(lines_of(text), options)
  end
  local good = '{"instruction": "Add.", "input": "", "output": "4"}'

  it('names the file and the line of a bad record, blank lines counted', function()
    fails_with(function() samples(good .. '\n\n' .. good .. '\n{"instruction": null, "output": "x"}\n') end,
      "data.jsonl:4: sft: alpaca field 'instruction' must be a string, got null")
    fails_with(function() samples(good .. '\n{"instruction": "a", "output": 12}') end,
      "data.jsonl:2: sft: alpaca field 'output' must be a string, got a number")
    fails_with(function() samples('{"messages": [{"role": "user", "content": null}]}\n') end,
      'data.jsonl:1: sft: message 1 needs string role and content, got role a string and content null')
    fails_with(function() samples(good .. '\n{"conversations": [7]}\n') end,
      'data.jsonl:2: sft: conversation turn 1 is a number, not an object')
    fails_with(function() samples(good .. '\n{"messages": [{"role": "user", "content": "hi"}]}\n') end,
      'data.jsonl:2: the record has no assistant turn: nothing to train on')
    fails_with(function() samples(good .. '\n{"instruction": "a", "output": "b"\n') end, 'data.jsonl:2: ')
  end)

  it('skips and reports bad records when asked', function()
    local all, _, skipped = samples(good .. '\n{"instruction": 1, "output": "x"}\n' .. good .. '\n{"text": "t"}\n',
      { skip_bad_records = true })
    assert.are.equal(2, #all)
    assert.are.same({ 'data.jsonl:2', 'data.jsonl:4' }, { skipped[1].where, skipped[2].where })
    assert.are.equal("sft: alpaca field 'instruction' must be a string, got a number", skipped[1].why)
    assert.are.equal('not an alpaca, sharegpt or messages record', skipped[2].why)
  end)

  it('takes a null alpaca input as none', function()
    local with_null = samples('{"instruction": "Add.", "input": null, "output": "4"}')
    local without = samples('{"instruction": "Add.", "output": "4"}')
    assert.are.same(without[1].ids, with_null[1].ids)
  end)
end)
