require 'busted.runner'()
-- The end of recipes/pretrain.lua's training as Megatron-LM's pretrain() ends it: the validation split
-- (read on from where the last validation stopped) and the test split (--split's third part, or
-- --test-data-path) are evaluated over --eval-iters global batches and printed as
-- ' validation loss at iteration N on validation set | ...' and '... on test set | ...'; a run
-- stopped by --exit-interval ends without them.
local shell = require 'spec.support.shell'

local MEGATRON = { '--num-layers', '1', '--hidden-size', '32', '--num-attention-heads', '4', '--seq-length', '16',
  '--max-position-embeddings', '16', '--micro-batch-size', '2', '--global-batch-size', '4', '--train-iters', '2',
  '--swiglu', '--disable-bias-linear', '--attention-dropout', '0', '--log-interval', '1', '--eval-iters', '1',
  '--sample-length', '0', '--save', '' }

local function pretrain(...)
  local args = { shell.root .. '/recipes/pretrain.lua' }
  for _, list in ipairs({ MEGATRON, ... }) do
    for _, a in ipairs(list) do args[#args + 1] = a end
  end
  return shell.run_pmp(args)
end

local function final_loss(out, split)
  return tonumber(out:match(' validation loss at iteration 2 on ' .. split .. ' set | lm loss value: (%S+) | lm loss PPL: %S+ |'))
end

describe("recipes/pretrain.lua's end of training", function()
  local dir
  setup(function()
    dir = shell.temp_dir()
    for name, seed in pairs({ c = 0, d = 500 }) do
      local lines = {}
      for k = 1, 60 do lines[k] = pmp.json.encode({ text = pmp.data.tiny_corpus.generate(2, seed + k) }) end
      shell.write_file(dir .. '/' .. name .. '.jsonl', table.concat(lines, '\n') .. '\n')
    end
    local _, err, status = shell.run_pmp({ shell.root .. '/tools/preprocess_data.lua', '--input', dir .. '/c.jsonl',
      '--output-prefix', dir .. '/c', '--tokenizer-type', 'char', '--append-eod' })
    assert.are.equal(0, status, err)
    _, err, status = shell.run_pmp({ shell.root .. '/tools/preprocess_data.lua', '--input', dir .. '/d.jsonl',
      '--output-prefix', dir .. '/d', '--tokenizer-type', 'char', '--vocab-file', dir .. '/c_text_document.tokenizer.json',
      '--append-eod' })
    assert.are.equal(0, status, err)
  end)
  teardown(function() shell.remove_dir(dir) end)

  it("evaluates --split's validation and test parts, after the in-training validations", function()
    local out, err, status = pretrain({ '--lr', '1e-3', '--data-path', dir .. '/c_text_document', '--split', '80,10,10',
      '--eval-interval', '1' })
    assert.are.equal(0, status, err)
    local order = {}
    for what in out:gmatch(' validation loss at iteration (%d[^|]*)|') do order[#order + 1] = what end
    assert.are.same({ '1 ', '2 ', '2 on validation set ', '2 on test set ' }, order)
    -- Megatron's framing: dashes as long as the line
    local line = out:match('\n( validation loss at iteration 2 on test set [^\n]*)\n')
    assert.is_not_nil(line, out)
    assert.matches('\n' .. string.rep('%-', #line) .. '\n' .. line:gsub('%p', '%%%0') .. '\n' .. string.rep('%-', #line) .. '\n', out)
    assert.is_true(final_loss(out, 'test') > 0)
  end)

  it('reads --test-data-path whole, as --valid-data-path reads its data', function()
    -- at --lr 0 the weights stay the initial ones, and both splits hold all of d.jsonl in the same order
    -- (one epoch each, shuffled by the same seed), so the first validation and the test read the same samples
    local out, err, status = pretrain({ '--lr', '0', '--min-lr', '0', '--eval-interval', '0',
      '--train-data-path', dir .. '/c_text_document', '--valid-data-path', dir .. '/d_text_document',
      '--test-data-path', dir .. '/d_text_document' })
    assert.are.equal(0, status, err)
    assert.matches('%(validation: .-d_text_document%) %(test: .-d_text_document%)', out)
    local valid, test = final_loss(out, 'validation'), final_loss(out, 'test')
    assert.is_not_nil(valid, out)
    assert.are.equal(valid, test)
    -- the training data as the test split instead: another loss
    local other, err2, status2 = pretrain({ '--lr', '0', '--min-lr', '0', '--eval-interval', '0',
      '--train-data-path', dir .. '/c_text_document', '--test-data-path', dir .. '/c_text_document' })
    assert.are.equal(0, status2, err2)
    assert.is_nil(final_loss(other, 'validation'))
    assert.are_not.equal(test, final_loss(other, 'test'))
  end)

  it('is skipped by a run that --exit-interval stops, and --test-data-path needs --train-data-path', function()
    local out, err, status = pretrain({ '--lr', '1e-3', '--data-path', dir .. '/c_text_document', '--split', '80,10,10',
      '--exit-interval', '2' })
    assert.are.equal(0, status, err)
    assert.matches('exiting at iteration 2 %(%-%-exit%-interval 2%)', out)
    assert.is_nil(out:match('validation loss'))
    local _, err2, status2 = pretrain({ '--lr', '1e-3', '--data-path', dir .. '/c_text_document', '--test-data-path',
      dir .. '/d_text_document' })
    assert.are_not.equal(0, status2)
    assert.matches('%-%-test%-data%-path needs %-%-train%-data%-path', err2)
  end)
end)
