require 'busted.runner'()
-- recipes/sft.lua --load of a Megatron-LM checkpoint (the Megatron-Core fixtures of
-- tools/megatron_reference.py, legacy torch and torch_dist) with --tokenizer-model: it trains, and at
-- --lr 0 the model it writes (--save-hf, --save) holds the checkpoint's weights bit for bit, as
-- pmp.checkpoint.megatron reads them (checked against Megatron-Core's logits in
-- megatron_checkpoint_spec.lua and megatron_torch_dist_spec.lua).
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'
local megatron = require 'pmp.checkpoint.megatron'

local ROOT = package.loaded['pmp.root']

-- A character tokenizer (newline and printable ASCII) with ChatML's two markers: 98 tokens, within the
-- fixtures' vocabulary of 100 (padded to 128).
local function write_tokenizer(dir)
  local vocab, next_id = { ['\n'] = 0 }, 1
  for byte = 32, 126 do
    vocab[string.char(byte)], next_id = next_id, next_id + 1
  end
  local added = {}
  for _, marker in ipairs({ '<|im_start|>', '<|im_end|>' }) do
    vocab[marker] = next_id
    added[#added + 1] = { id = next_id, content = marker, single_word = false, lstrip = false, rstrip = false,
      normalized = false, special = true }
    next_id = next_id + 1
  end
  local null = pmp.json.null
  pmp.io.mkdir_p(dir)
  shell.write_file(dir .. '/tokenizer.json', pmp.json.encode({ version = '1.0', added_tokens = added,
    normalizer = null, pre_tokenizer = null, post_processor = null, decoder = null,
    model = { type = 'BPE', vocab = vocab, merges = pmp.json.array({}) } }))
  return next_id
end

local function write_chats(path)
  local lines = {}
  for k = 1, 4 do
    lines[k] = pmp.json.encode({ messages = { { role = 'user', content = 'What is ' .. k .. ' + ' .. k .. '?' },
      { role = 'assistant', content = tostring(k + k) } } })
  end
  shell.write_file(path, table.concat(lines, '\n') .. '\n')
end

-- Every weight of model equals the checkpoint's (the vocabulary's first vocab_rows rows: past them
-- both hold padding).
local function assert_checkpoint_weights(fixture, model, vocab_rows)
  local ckpt = megatron.open(fixture, { true_vocab_size = vocab_rows })
  local state, count = model:state_dict(), 0
  for _, name in ipairs(ckpt.names) do
    local want, got = ckpt:tensor(name), state[name]
    assert.is_not_nil(got, 'the model lacks ' .. name)
    if name == 'embedding.word_embeddings.weight' or name == 'output_layer.weight' then
      want, got = want:narrow(1, 1, vocab_rows), got:narrow(1, 1, vocab_rows)
    end
    assert.are.same(want.shape, got.shape, name)
    assert.are.equal(0, (want:double() - got:double()):abs():max():item(), name .. ' differs')
    count = count + 1
  end
  assert.are.equal(#ckpt.names, count)
end

describe('recipes/sft.lua --load of a Megatron-LM checkpoint', function()
  local dir, vocab_size
  setup(function()
    dir = shell.temp_dir()
    vocab_size = write_tokenizer(dir .. '/tok')
    write_chats(dir .. '/chats.jsonl')
  end)
  teardown(function() shell.remove_dir(dir) end)

  local function sft(fixture, extra, model_type)
    local words = { shell.root .. '/recipes/sft.lua', '--load', fixture, '--tokenizer-model', dir .. '/tok',
      '--data-path', dir .. '/chats.jsonl', '--chat-template', 'chatml', '--packing', '--seq-length', '64',
      '--micro-batch-size', '1', '--global-batch-size', '1', '--train-iters', '2', '--log-interval', '1', '--lr', '0',
      '--model-type', model_type or 'qwen2' }
    for _, w in ipairs(extra) do words[#words + 1] = w end
    return shell.run_pmp(words)
  end

  for _, case in ipairs({ { 'legacy torch', ROOT .. '/spec/fixtures/megatron/tp1_pp1' },
    { 'torch_dist', ROOT .. '/spec/fixtures/megatron_torch_dist/tp1_pp1' } }) do
    it('trains on ' .. case[1] .. ' and at --lr 0 writes its weights bit for bit', function()
      local name, fixture = case[1]:gsub(' ', '_'), case[2]
      local out, err, status = sft(fixture, { '--save', dir .. '/' .. name .. '_ck', '--save-hf', dir .. '/' .. name .. '_hf' })
      assert.are.equal(0, status, err)
      local losses = {}
      for loss in out:gmatch('lm loss: ([%d.E+-]+)') do losses[#losses + 1] = tonumber(loss) end
      assert.are.equal(2, #losses, out)
      for _, loss in ipairs(losses) do assert.is_true(loss > 0 and loss < math.huge, 'loss ' .. loss) end
      local hf = pmp.models.from_pretrained(dir .. '/' .. name .. '_hf')
      assert.are.equal('qwen2', hf.hf.model_type)
      assert.are.equal(vocab_size, hf.config.vocab_size)
      assert_checkpoint_weights(fixture, hf, vocab_size)
      assert.is_true(pmp.io.is_file(dir .. '/' .. name .. '_hf/tokenizer.json'))
      assert_checkpoint_weights(fixture, (pmp.checkpoint.load_model(dir .. '/' .. name .. '_ck')), vocab_size)
    end)
  end

  it('resumes a run from its checkpoint, which records the Megatron-LM base and its tokenizer', function()
    local fixture = ROOT .. '/spec/fixtures/megatron/tp1_pp1'
    local out, err, status = sft(fixture, { '--save', dir .. '/first' })
    assert.are.equal(0, status, err)
    local words = { shell.root .. '/recipes/sft.lua', '--load', dir .. '/first', '--data-path', dir .. '/chats.jsonl',
      '--chat-template', 'chatml', '--packing', '--seq-length', '64', '--micro-batch-size', '1', '--global-batch-size',
      '1', '--train-iters', '3', '--log-interval', '1', '--lr', '0', '--model-type', 'qwen2', '--save-hf', dir .. '/resumed' }
    out, err, status = shell.run_pmp(words)
    assert.are.equal(0, status, err)
    assert.matches(' iteration +3/ +3 |', out)
    assert.is_nil(out:match(' iteration +2/ +3 |'))
    assert_checkpoint_weights(fixture, pmp.models.from_pretrained(dir .. '/resumed'), vocab_size)
    -- the resumed base brings its tokenizer: another one is refused, not ignored
    words[#words + 1], words[#words + 2] = '--tokenizer-model', dir .. '/tok'
    _, err, status = shell.run_pmp(words)
    assert.are_not.equal(0, status)
    assert.matches('--tokenizer-model is for a Megatron-LM checkpoint in --load', err, 1, true)
  end)

  it('under mpirun each tensor-parallel rank reads its part of a TP=2 x PP=2 checkpoint', function()
    if not mpi.available then
      pending('needs mpirun')
      return
    end
    local fixture = ROOT .. '/spec/fixtures/megatron/tp2_pp2'
    local words = { '--load', fixture, '--tokenizer-model', dir .. '/tok', '--data-path', dir .. '/chats.jsonl',
      '--chat-template', 'chatml', '--packing', '--seq-length', '64', '--micro-batch-size', '1', '--global-batch-size',
      '1', '--train-iters', '2', '--lr', '0', '--model-type', 'qwen2', '--tensor-model-parallel-size', '2',
      '--save-hf', dir .. '/tp2_hf' }
    local _, err, status = mpi.run(2, shell.root .. '/recipes/sft.lua', words)
    assert.are.equal(0, status, err)
    assert_checkpoint_weights(fixture, pmp.models.from_pretrained(dir .. '/tp2_hf'), vocab_size)
  end)

  it('needs --tokenizer-model, and a --model-type that can hold the model, before any training', function()
    local fixture = ROOT .. '/spec/fixtures/megatron/tp1_pp1'
    local _, err, status = shell.run_pmp({ shell.root .. '/recipes/sft.lua', '--load', fixture,
      '--data-path', dir .. '/chats.jsonl' })
    assert.are_not.equal(0, status)
    assert.matches(fixture .. ' is a Megatron-LM checkpoint, which holds no tokenizer: give --tokenizer-model', err, 1, true)
    -- Llama's attention_bias covers o_proj too; the fixture has q/k/v biases only
    local out
    out, err, status = sft(fixture, { '--save-hf', dir .. '/llama_hf' }, 'llama')
    assert.are_not.equal(0, status)
    assert.is_nil(out:match('lm loss'), 'trained before refusing')
    assert.matches('--model-type llama cannot hold the model of --load: llama: attention_bias covers q/k/v and o together',
      err, 1, true)
    assert.is_false(pmp.io.exists(dir .. '/llama_hf'))
    -- Megatron-LM's defaults (LayerNorm, GeLU, biases): Llama's config.json would describe another model
    out, err, status = sft(ROOT .. '/spec/fixtures/megatron/gelu_bias_tp1_pp1', { '--save-hf', dir .. '/gelu_hf' }, 'llama')
    assert.are_not.equal(0, status)
    assert.is_nil(out:match('lm loss'), 'trained before refusing')
    assert.matches('--model-type llama cannot hold the model of --load: its normalization is LayerNorm, the family ' ..
      'writes RMSNorm', err, 1, true)
    assert.is_false(pmp.io.exists(dir .. '/gelu_hf'))
  end)
end)
