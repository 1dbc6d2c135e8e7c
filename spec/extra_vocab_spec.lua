require 'busted.runner'()
-- Pai-Megatron-Patch's --extra-vocab-size (megatron_patch/tokenizer/__init__.py): the model's vocabulary
-- is the tokenizer's own (len(tokenizer.encoder), without added tokens) plus the extra rows, with no
-- --make-vocab-size-divisible-by rounding. Its Qwen2.5 run scripts give 293 for Qwen's 151643-token BPE,
-- which makes the 151936 rows of Qwen2.5's (and Qwen3's) config.json vocab_size.
local shell = require 'spec.support.shell'
local tiny_hf = require 'spec.support.tiny_hf'

local TINY = { '--num-layers', '1', '--hidden-size', '16', '--num-attention-heads', '2', '--seq-length', '16',
  '--micro-batch-size', '2', '--global-batch-size', '2', '--train-iters', '1', '--eval-iters', '1',
  '--sample-length', '0' }

local function pretrain(...)
  local args = { shell.root .. '/recipes/pretrain.lua' }
  for _, list in ipairs({ TINY, ... }) do
    for _, a in ipairs(list) do args[#args + 1] = a end
  end
  return shell.run_pmp(args)
end

local function saved(dir)
  local rank = dir .. '/iter_0000001/mp_rank_00'
  return pmp.safetensors.load(rank .. '/model_optim_rng.safetensors', { copy = true }),
    pmp.json.decode(pmp.io.read_file(rank .. '/model_optim_rng.json')).state
end

describe('--extra-vocab-size', function()
  local dir
  before_each(function() dir = shell.temp_dir() end)
  after_each(function() shell.remove_dir(dir) end)

  it("pads a char tokenizer's vocabulary by exactly that many rows", function()
    local out, err, status = pretrain({ '--extra-vocab-size', '5', '--save', dir .. '/ck' })
    assert.are.equal(0, status, err)
    local vocab = tonumber(out:match('tokenizer, vocabulary (%d+)%)'))
    local t, state = saved(dir .. '/ck')
    assert.are.equal(vocab + 5, t['model.embedding.word_embeddings.weight']:size(1))
    assert.are.equal(vocab + 5, state.model_config.padded_vocab_size)
    assert.are.equal(vocab, state.model_config.vocab_size)
  end)

  it("makes Qwen's 151936 rows from its tokenizer and Pai-Megatron-Patch's 293", function()
    if not tiny_hf.available() then
      pending('no Qwen3 tokenizer at ' .. tiny_hf.TOKENIZER)
      return
    end
    shell.write_file(dir .. '/text.txt', pmp.data.tiny_corpus.generate(20, 3))
    local data = { '--data-path', dir .. '/text.txt', '--tokenizer-model', tiny_hf.TOKENIZER, '--split', '90,10,0' }
    local _, err, status = pretrain(data, { '--extra-vocab-size', '293', '--save', dir .. '/ck' })
    assert.are.equal(0, status, err)
    local t, state = saved(dir .. '/ck')
    assert.are.equal(151936, t['model.embedding.word_embeddings.weight']:size(1))
    assert.are.equal(151936, state.model_config.padded_vocab_size)
    -- too few rows for the added tokens (151643 + 10 < 151669)
    local _, err2, status2 = pretrain(data, { '--extra-vocab-size', '10', '--save', '' })
    assert.are_not.equal(0, status2)
    assert.matches("%-%-extra%-vocab%-size 10: 151643 %+ 10 rows are fewer than the tokenizer's 151669 tokens", err2)
  end)

  it('must split over the tensor-parallel ranks', function()
    local padded = require('pmp.train.megatron_flags').padded_vocab_size
    local given = { extra_vocab_size = true }
    assert.are.equal(66, padded({ extra_vocab_size = 2, tensor_model_parallel_size = 2 }, given, { vocab_size = 64 }))
    assert.is_nil(padded({ extra_vocab_size = 0 }, {}, { vocab_size = 64 }))
    local ok, err = pcall(padded, { extra_vocab_size = 1, tensor_model_parallel_size = 2 }, given, { vocab_size = 64 })
    assert.is_false(ok)
    assert.matches('%-%-extra%-vocab%-size 1: the vocabulary of 65 rows does not split over %-%-tensor%-model%-parallel%-size 2', err)
  end)
end)
