require 'busted.runner'()
-- Pre-tokenized SFT data: `tools/preprocess_data.lua --sft` writes ids and loss masks (in workers, the
-- same bytes as one process) that hold the samples recipes/sft.lua makes from the jsonl, and sft.lua
-- --data-path PREFIX trains on them to the same losses; misaligned or bad data fails naming it.
local shell = require 'spec.support.shell'
local fails_with = require('spec.support.expect').fails_with
local tiny_hf = require 'spec.support.tiny_hf'
local sft_indexed = pmp.data.sft_indexed

local RECORDS = {
  '{"instruction": "Say hello.", "input": "", "output": "Hello there!"}',
  '{"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]}',
  '',
  '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}, ' ..
    '{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}]}',
}

local function run(args)
  local words = { 'cd', shell.quote(shell.root), '&&', shell.quote(shell.pmp) }
  for _, a in ipairs(args) do words[#words + 1] = shell.quote(a) end
  return shell.run(table.concat(words, ' '))
end

describe('pre-tokenized SFT data', function()
  local dir
  setup(function()
    if not tiny_hf.available() then return end
    dir = shell.temp_dir()
    tiny_hf.write(dir .. '/base')
    shell.write_file(dir .. '/chat.jsonl', table.concat(RECORDS, '\n') .. '\n')
  end)
  teardown(function() if dir then shell.remove_dir(dir) end end)

  it('holds the samples sft.lua makes from the jsonl, written alike by 1 and 2 workers, and trains to the same losses', function()
    if not dir then
      pending('needs ../shared/tokenizers/qwen3')
      return
    end
    for _, workers in ipairs({ '1', '2' }) do
      local _, err, status = run({ 'tools/preprocess_data.lua', '--input', dir .. '/chat.jsonl', '--output-prefix',
        dir .. '/w' .. workers .. '/chat', '--sft', '--tokenizer-model', dir .. '/base', '--workers', workers })
      assert.are.equal(0, status, err)
    end
    for _, prefix in ipairs({ sft_indexed.prefixes('chat') }) do
      for _, ext in ipairs({ '.bin', '.idx' }) do
        assert.are.equal(pmp.io.read_file(dir .. '/w1/' .. prefix .. ext), pmp.io.read_file(dir .. '/w2/' .. prefix .. ext))
      end
    end
    local tokenizer = pmp.tokenizer.from_pretrained(dir .. '/base')
    local render = pmp.train.base_model.chat_renderer(tokenizer, dir .. '/base', nil, dir .. '/base')
    local expected, expected_trained = pmp.train.chat_data.samples(pmp.train.chat_data.lines(dir .. '/chat.jsonl'),
      { tokenizer = tokenizer, render = render, format = 'auto' })
    local samples, trained = sft_indexed.read(dir .. '/w2/chat')
    assert.are.equal(3, #samples)
    assert.are.same(expected, samples)
    assert.are.equal(expected_trained, trained)

    local function losses(data_path)
      local out, err, status = run({ 'recipes/sft.lua', '--load', dir .. '/base', '--data-path', data_path, '--packing',
        '--seq-length', '64', '--micro-batch-size', '1', '--global-batch-size', '1', '--train-iters', '3',
        '--log-interval', '1', '--lr', '1e-2' })
      assert.are.equal(0, status, err)
      local list = {}
      for loss in out:gmatch('lm loss: ([%d.E+-]+)') do list[#list + 1] = loss end
      return list
    end
    local from_jsonl = losses(dir .. '/chat.jsonl')
    assert.are.equal(3, #from_jsonl)
    assert.are.same(from_jsonl, losses(dir .. '/w1/chat'))
  end)

  it('names a bad record, a missing tokenizer, and datasets that do not line up', function()
    if not dir then
      pending('needs ../shared/tokenizers/qwen3')
      return
    end
    shell.write_file(dir .. '/bad.jsonl', RECORDS[1] .. '\n{"prompt": "no answer"}\n')
    local _, err, status = run({ 'tools/preprocess_data.lua', '--input', dir .. '/bad.jsonl', '--output-prefix',
      dir .. '/bad', '--sft', '--tokenizer-model', dir .. '/base' })
    assert.are_not.equal(0, status)
    assert.truthy(err:find(dir .. '/bad.jsonl:2: not an alpaca, sharegpt or messages record', 1, true), err)
    _, err, status = run({ 'tools/preprocess_data.lua', '--input', dir .. '/chat.jsonl', '--output-prefix', dir .. '/x', '--sft',
      '--tokenizer-type', 'byte' })
    assert.are_not.equal(0, status)
    assert.truthy(err:find('--sft needs --tokenizer-model DIR', 1, true), err)

    local text, mask = sft_indexed.prefixes(dir .. '/odd')
    pmp.data.indexed.write(text, { { { 5, 6, 7 } }, { { 8, 9 } } }, { vocab_size = 100 })
    pmp.data.indexed.write(mask, { { { 0, 1, 1 } }, { { 1 } } }, { vocab_size = 2 })
    fails_with(function() sft_indexed.read(dir .. '/odd') end, dir .. '/odd: sample 1 has 2 tokens but 1 loss-mask entries')
    pmp.data.indexed.write(mask, { { { 0, 1, 1 } }, { { 1, 2 } } }, { vocab_size = 3 })
    fails_with(function() sft_indexed.read(dir .. '/odd') end, 'sample 1: loss-mask entry 2 is 2 (expected 0 or 1)')
  end)
end)
