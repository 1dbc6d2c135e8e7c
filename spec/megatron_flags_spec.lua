require 'busted.runner'()
-- recipes/pretrain.lua under the flags of Pai-Megatron-Patch's Qwen2.5 run script and Megatron-LM's
-- Llama-3 example (tiny sizes): each architecture flag shapes the saved model as Megatron's would,
-- flags for kernels and libraries pmp lacks are named once as ignored, an unknown flag still fails.
-- The shapes expected are written from Megatron's definitions: linear_qkv holds (heads + 2 groups) x
-- kv_channels rows, LayerNorm has a bias, --disable-bias-linear leaves only the qkv bias.
local shell = require 'spec.support.shell'
local losses = require('spec.support.train_log').losses

local TINY = { '--num-layers', '2', '--hidden-size', '32', '--num-attention-heads', '4', '--ffn-hidden-size', '48',
  '--seq-length', '16', '--micro-batch-size', '2', '--global-batch-size', '4', '--log-interval', '1',
  '--eval-interval', '2', '--eval-iters', '1', '--sample-length', '0', '--lr-warmup-iters', '1' }

-- the Megatron part of Pai-Megatron-Patch's run_mcore_qwen.sh (Qwen2.5-7B's options, tiny sizes)
local PAI = { '--lr', '1e-3', '--min-lr', '1e-4', '--lr-decay-style', 'cosine', '--weight-decay', '0.1',
  '--adam-beta1', '0.9', '--adam-beta2', '0.95', '--clip-grad', '1.0', '--init-method-std', '0.008',
  '--attention-dropout', '0.0', '--hidden-dropout', '0.0', '--max-position-embeddings', '64', '--log-throughput',
  '--tensorboard-queue-size', '1', '--log-timers-to-tensorboard', '--log-validation-ppl-to-tensorboard',
  '--no-load-optim', '--no-load-rng', '--num-workers', '8', '--patch-tokenizer-type', 'Qwen2Tokenizer', '--swiglu',
  '--normalization', 'RMSNorm', '--norm-epsilon', '1e-6', '--use-rotary-position-embeddings',
  '--position-embedding-type', 'rope', '--disable-bias-linear', '--add-qkv-bias', '--rotary-percent', '1.0',
  '--rotary-base', '1000000', '--rotary-seq-len-interpolation-factor', '1', '--no-save-optim',
  '--dataset', 'MMAP', '--transformer-impl', 'transformer_engine', '--recompute-method', 'uniform',
  '--recompute-num-layers', '1', '--recompute-granularity', 'full', '--group-query-attention', '--num-query-groups', '2',
  '--untie-embeddings-and-output-weights', '--overlap-grad-reduce', '--overlap-param-gather', '--train-mode', 'pretrain',
  '--attention-backend', 'flash' }

local function pretrain(...)
  local words = { 'cd', shell.quote(shell.root), '&&', shell.quote(shell.pmp), 'recipes/pretrain.lua' }
  for _, list in ipairs({ TINY, ... }) do
    for _, a in ipairs(list) do words[#words + 1] = shell.quote(a) end
  end
  return shell.run(table.concat(words, ' '))
end

local function saved(dir, iteration)
  local rank = string.format('%s/iter_%07d/mp_rank_00', dir, iteration)
  return pmp.safetensors.load(rank .. '/model_optim_rng.safetensors', { copy = true }),
    pmp.json.decode(pmp.io.read_file(rank .. '/model_optim_rng.json'))
end

local function shape(t) return table.concat(t:size(), 'x') end

describe('recipes/pretrain.lua with Megatron run-script flags', function()
  local scratch
  before_each(function() scratch = shell.temp_dir() end)
  after_each(function() shell.remove_dir(scratch) end)

  it("runs a Pai-Megatron-Patch argument list and builds Qwen2.5's architecture", function()
    local out, err, status = pretrain(PAI, { '--train-iters', '2', '--save', scratch .. '/ck' })
    assert.are.equal(0, status, err)
    local ignored = {}
    for line in out:gmatch('[^\n]*ignored[^\n]*') do ignored[#ignored + 1] = line end
    assert.are.same({ 'pretrain: ignored (they configure kernels, fusions or libraries pmp does not have; results are ' ..
      'unchanged): --transformer-impl --attention-backend --overlap-param-gather --num-workers ' ..
      '--tensorboard-queue-size --log-timers-to-tensorboard --log-validation-ppl-to-tensorboard --patch-tokenizer-type' },
      ignored)
    assert.matches(' iteration +2/ +2 | consumed samples: +8 | elapsed time per iteration %(ms%): [%d.]+ | throughput per ' ..
      'GPU %(TFLOP/s/GPU%): [%d.]+ | learning rate: [%d.]+E[-+]%d+ | global batch size: +4 | lm loss: [%d.]+E[-+]%d+ | ' ..
      'loss scale: 1%.0 | grad norm: [%d.]+ |', out)
    assert.is_not_nil(losses(out)[2])
    local t, info = saved(scratch .. '/ck', 2)
    local layer = 'model.decoder.layers.0.'
    -- (4 heads + 2 x 2 groups) x 8 dims per head
    assert.are.equal('64x32', shape(t[layer .. 'self_attention.linear_qkv.weight']))
    assert.are.equal('64', shape(t[layer .. 'self_attention.linear_qkv.bias']))
    assert.is_nil(t[layer .. 'self_attention.linear_proj.bias'])
    assert.is_nil(t[layer .. 'mlp.linear_fc1.bias'])
    assert.are.equal('96x32', shape(t[layer .. 'mlp.linear_fc1.weight']))   -- SwiGLU: gate and up
    assert.is_nil(t[layer .. 'input_layernorm.bias'])                      -- RMSNorm
    assert.is_not_nil(t['model.output_layer.weight'])                      -- untied
    local optimizer_entries = 0
    for name in pairs(t) do if name:match('^optimizer%.') then optimizer_entries = optimizer_entries + 1 end end
    assert.are.equal(0, optimizer_entries)                                  -- --no-save-optim
    assert.are.equal(1000000, info.state.model_config.rotary_base)
    assert.are.equal(1e-6, info.state.model_config.norm_epsilon)

    -- --finetune starts a new run from those weights (no optimizer state to load: --no-save-optim)
    local tuned, err2, status2 = pretrain(PAI, { '--train-iters', '1', '--save', '', '--load', scratch .. '/ck', '--finetune' })
    assert.are.equal(0, status2, err2)
    assert.matches('loaded checkpoint from .- at iteration 2', tuned)
    assert.matches(' iteration +1/ +1 | consumed samples: +4 |', tuned)
  end)

  it("maps Megatron-LM's model flags: LayerNorm, biases, qk-layernorm, kv-channels, 1 query group, learned positions", function()
    local out, err, status = pretrain({ '--train-iters', '1', '--save', scratch .. '/ck', '--normalization', 'LayerNorm',
      '--add-qkv-bias', '--qk-layernorm', '--kv-channels', '16', '--group-query-attention',
      '--position-embedding-type', 'learned_absolute', '--max-position-embeddings', '24',
      '--recompute-activations', '--use-mcore-models', '--no-gradient-accumulation-fusion' })
    assert.are.equal(0, status, err)
    assert.matches('pretrain: ignored %(.-%): %-%-use%-mcore%-models %-%-no%-gradient%-accumulation%-fusion\n', out)
    assert.matches('pretrain: recompute granularity selective: pmp keeps every activation instead', out)
    local t = saved(scratch .. '/ck', 1)
    local layer = 'model.decoder.layers.1.'
    -- (4 heads + 2 x 1 group) x 16 channels; the projection reads 4 x 16
    assert.are.equal('96x32', shape(t[layer .. 'self_attention.linear_qkv.weight']))
    assert.are.equal('96', shape(t[layer .. 'self_attention.linear_qkv.bias']))
    assert.are.equal('32x64', shape(t[layer .. 'self_attention.linear_proj.weight']))
    assert.are.equal('16', shape(t[layer .. 'self_attention.q_layernorm.weight']))
    assert.are.equal('16', shape(t[layer .. 'self_attention.k_layernorm.bias']))
    assert.are.equal('32', shape(t[layer .. 'input_layernorm.bias']))
    assert.are.equal('32', shape(t['model.decoder.final_layernorm.bias']))
    assert.are.equal('24x32', shape(t['model.embedding.position_embeddings.weight']))
    assert.is_nil(t['model.output_layer.weight'])   -- tied, pmp's default

    -- without the flags: pmp's defaults (RMSNorm, no biases, rope, as many groups as --num-query-groups 0 says)
    local _, err2, status2 = pretrain({ '--train-iters', '1', '--save', scratch .. '/plain' })
    assert.are.equal(0, status2, err2)
    local p = saved(scratch .. '/plain', 1)
    assert.are.equal('96x32', shape(p[layer .. 'self_attention.linear_qkv.weight']))
    assert.is_nil(p[layer .. 'self_attention.linear_qkv.bias'])
    assert.is_nil(p[layer .. 'input_layernorm.bias'])
    assert.is_nil(p[layer .. 'self_attention.q_layernorm.weight'])
    assert.is_nil(p['model.embedding.position_embeddings.weight'])
  end)

  it('fails naming an unknown flag, and flags whose meaning pmp cannot honour', function()
    local cases = {
      { { '--no-such-flag' }, "unknown argument '%-%-no%-such%-flag'" },
      { { '--fp8-recipe', 'delayed' }, '%-%-fp8%-recipe: pmp has no fp8 training' },
      { { '--attention-dropout', '0.1', '--reset-attention-mask' }, '%-%-attention%-dropout 0%.1 with %-%-reset%-attention%-mask' },
      { { '--recompute-granularity', 'full', '--recompute-method', 'block', '--recompute-num-layers', '1' },
        '%-%-recompute%-method block %-%-recompute%-num%-layers 1: pmp recomputes either every layer' },
      { { '--recompute-method', 'uniform' }, '%-%-recompute%-method needs %-%-recompute%-granularity full' },
      { { '--test-data-path', 'a' }, '%-%-test%-data%-path needs %-%-train%-data%-path' },
      { { '--valid-data-path', 'a' }, '%-%-valid%-data%-path needs %-%-train%-data%-path' },
      { { '--train-data-path', 'nowhere', '--lr', '1e-3', '--max-position-embeddings', '16', '--swiglu', '--disable-bias-linear',
        '--attention-dropout', '0' }, '%-%-train%-data%-path: no indexed dataset nowhere' },
      { { '--max-position-embeddings', '8' }, '%-%-max%-position%-embeddings 8 is smaller than %-%-seq%-length 16' },
      { { '--tokenizer-type', 'HuggingFaceTokenizer' }, '%-%-tokenizer%-type HuggingFaceTokenizer needs %-%-tokenizer%-model' },
      { { '--normalization', 'ScaleNorm' }, '%-%-normalization must be one of RMSNorm, LayerNorm' },
      { { '--eod-mask-loss' }, 'the char tokenizer has no end%-of%-document token' },
      { { '--train-mode', 'finetune' }, '%-%-train%-mode must be one of pretrain' },
    }
    for _, case in ipairs(cases) do
      local _, err, status = pretrain({ '--train-iters', '1', '--save', '' }, case[1])
      assert.are_not.equal(0, status, table.concat(case[1], ' '))
      assert.matches(case[2], err)
    end
  end)
end)

describe('pmp.train.documents (Megatron\'s --eod-mask-loss, --reset-position-ids, --reset-attention-mask)', function()
  local documents = require 'pmp.train.documents'
  local EOD = 9

  it('masks the token after each end of document and restarts positions and attention there', function()
    local ids = pmp.tensor({ { 3, 4, EOD, 5, 6, EOD, 7 }, { 1, 2, 3, 4, 5, 6, 7 } }, { dtype = 'i64' })
    local targets = pmp.tensor({ { 4, EOD, 5, 6, EOD, 7, 8 }, { 2, 3, 4, 5, 6, 7, 8 } }, { dtype = 'i64' })
    local masked, options = documents.apply(ids, targets, EOD,
      { eod_mask_loss = true, reset_position_ids = true, reset_attention_mask = true })
    assert.are.same({ { 4, EOD, -100, 6, EOD, -100, 8 }, { 2, 3, 4, 5, 6, 7, 8 } }, masked:totable())
    assert.are.same({ { 0, 1, 2, 0, 1, 2, 0 }, { 0, 1, 2, 3, 4, 5, 6 } }, options.positions:totable())
    assert.are.same({ { 0, 0, 0, 3, 3, 3, 6 }, { 0, 0, 0, 0, 0, 0, 0 } }, options.first_key:totable())
    local same, none = documents.apply(ids, targets, EOD, {})
    assert.are.same(targets:totable(), same:totable())
    assert.is_nil(none)
  end)

  it('gives a second document the logits it has alone', function()
    pmp.manual_seed(3)
    local model = pmp.nn.GPTModel({ num_layers = 2, hidden_size = 16, num_attention_heads = 2, vocab_size = 12 })
    model:eval()
    local ids = pmp.tensor({ { 3, 4, EOD, 5, 6, 7 } }, { dtype = 'i64' })
    local _, options = documents.apply(ids, ids, EOD, { reset_position_ids = true, reset_attention_mask = true })
    local packed = model(ids, nil, options):narrow(2, 4, 3)
    local alone = model(pmp.tensor({ { 5, 6, 7 } }, { dtype = 'i64' }))
    assert.is_true((packed - alone):abs():max():item() < 1e-5)
    -- without the reset the second document sees the first
    assert.is_true((model(ids):narrow(2, 4, 3) - alone):abs():max():item() > 1e-3)
  end)

  it('trains on indexed data with end-of-document tokens under all three flags', function()
    local dir = shell.temp_dir()
    local lines = {}
    -- short documents of varied lengths: micro batches hold different numbers of end-of-document tokens
    for k = 1, 120 do lines[k] = pmp.json.encode({ text = pmp.data.tiny_corpus.generate(1, k):sub(1, 3 + k % 11) }) end
    shell.write_file(dir .. '/c.jsonl', table.concat(lines, '\n') .. '\n')
    local _, err, status = shell.run_pmp({ shell.root .. '/tools/preprocess_data.lua', '--input', dir .. '/c.jsonl',
      '--output-prefix', dir .. '/c', '--tokenizer-type', 'char', '--append-eod' })
    assert.are.equal(0, status, err)
    -- indexed data brings Megatron's defaults: the flags it requires, and those whose default pmp lacks
    local megatron = { '--lr', '1e-3', '--max-position-embeddings', '16', '--swiglu', '--disable-bias-linear',
      '--attention-dropout', '0' }
    local data = { '--train-iters', '2', '--save', '', '--data-path', dir .. '/c_text_document', '--split', '90,10,0',
      unpack(megatron) }
    local plain, err1, status1 = pretrain(data)
    assert.are.equal(0, status1, err1)
    local marked, err2, status2 = pretrain(data, { '--eod-mask-loss', '--reset-position-ids', '--reset-attention-mask' })
    assert.are.equal(0, status2, err2)
    -- the same weights and samples: the first loss differs only through the documents' boundaries
    assert.are_not.equal(losses(plain)[1], losses(marked)[1])
    -- --calculate-per-token-loss: the mean over the step's unmasked tokens, which is the mean of the micro
    -- batches' means only when there is one micro batch (the masked tokens differ between micro batches)
    local function first_loss(...)
      local out, e, s = pretrain(data, { '--eod-mask-loss' }, ...)
      assert.are.equal(0, s, e)
      return losses(out)[1]
    end
    local one = { '--micro-batch-size', '4' }
    assert.is_true(math.abs(first_loss(one) - first_loss(one, { '--calculate-per-token-loss' })) < 1e-6)
    assert.is_true(math.abs(first_loss() - first_loss({ '--calculate-per-token-loss' })) > 1e-6)

    -- --train-data-path / --valid-data-path: each blend whole for its split, so training reads what
    -- --data-path with --split 100,0,0 reads, and validation the other data
    _, err, status = shell.run_pmp({ shell.root .. '/tools/preprocess_data.lua', '--input', dir .. '/c.jsonl',
      '--output-prefix', dir .. '/d', '--tokenizer-type', 'char', '--vocab-file', dir .. '/c_text_document.tokenizer.json',
      '--append-eod' })
    assert.are.equal(0, status, err)
    local whole, err3, status3 = pretrain(megatron, { '--train-iters', '2', '--save', '', '--data-path',
      dir .. '/c_text_document', '--split', '100,0,0' })
    assert.are.equal(0, status3, err3)
    local split, err4, status4 = pretrain(megatron, { '--train-iters', '2', '--save', '', '--train-data-path', dir .. '/c_text_document',
      '--valid-data-path', dir .. '/d_text_document' })
    assert.are.equal(0, status4, err4)
    assert.are.same(losses(whole), losses(split))
    assert.is_nil(whole:match('validation loss'))
    assert.matches('validation loss at iteration 2 | lm loss value: [%d.]+E', split)
    shell.remove_dir(dir)
  end)
end)
