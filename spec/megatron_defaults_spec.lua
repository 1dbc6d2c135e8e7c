require 'busted.runner'()
-- recipes/pretrain.lua on Megatron indexed data takes Megatron-LM's default for every flag left out.
-- The expected values are Megatron-Core r0.12's megatron/training/arguments.py (add_argument defaults
-- and validate_args' derived values), written out here from that source, not from pmp's output.
local shell = require 'spec.support.shell'
local losses = require('spec.support.train_log').losses

local dir, prefix

-- Megatron's required flags (tiny sizes)
local REQUIRED = { '--num-layers', '1', '--hidden-size', '48', '--num-attention-heads', '4',
  '--max-position-embeddings', '16', '--seq-length', '16', '--micro-batch-size', '2', '--lr', '1e-3',
  '--train-iters', '2' }

local function pretrain(...)
  local args = { shell.root .. '/recipes/pretrain.lua', '--sample-length', '0' }
  for _, list in ipairs({ ... }) do
    for _, a in ipairs(list) do args[#args + 1] = a end
  end
  return shell.run_pmp(args)
end

local function saved_args(ck, iteration)
  local path = string.format('%s/iter_%07d/mp_rank_00/model_optim_rng.json', ck, iteration)
  return pmp.json.decode(pmp.io.read_file(path)).state
end

describe("recipes/pretrain.lua's defaults", function()
  setup(function()
    dir = shell.temp_dir()
    local lines = {}
    for k = 1, 60 do lines[k] = pmp.json.encode({ text = pmp.data.tiny_corpus.generate(2, k) }) end
    shell.write_file(dir .. '/c.jsonl', table.concat(lines, '\n') .. '\n')
    local _, err, status = shell.run_pmp({ shell.root .. '/tools/preprocess_data.lua', '--input', dir .. '/c.jsonl',
      '--output-prefix', dir .. '/c', '--tokenizer-type', 'char', '--append-eod' })
    assert.are.equal(0, status, err)
    prefix = dir .. '/c_text_document'
  end)
  teardown(function() shell.remove_dir(dir) end)

  it("on indexed data, given only Megatron's required flags, are Megatron's", function()
    local out, err, status = pretrain(REQUIRED, { '--data-path', prefix, '--save', dir .. '/ck' })
    assert.are.equal(0, status, err)
    assert.matches("pretrain: indexed data: Megatron%-LM's defaults for the flags left out", out)
    -- --log-interval 100: only the last iteration's line
    assert.is_nil(losses(out)[1])
    assert.is_not_nil(losses(out)[2])
    local state = saved_args(dir .. '/ck', 2)
    local megatron = {
      hidden_dropout = 0.1, attention_dropout = 0.1, weight_decay = 0.01, adam_beta1 = 0.9, adam_beta2 = 0.999, adam_eps = 1e-8,
      lr_decay_style = 'linear', min_lr = 0, lr_warmup_iters = 0, init_method_std = 0.02, clip_grad = 1.0,
      eval_interval = 1000, eval_iters = 100, log_interval = 100, seed = 1234, split = '969, 30, 1',
      normalization = 'LayerNorm', position_embedding_type = 'learned_absolute', norm_epsilon = 1e-5,
      rotary_base = 10000, make_vocab_size_divisible_by = 128, untie_embeddings_and_output_weights = false,
      exit_signal_handler = false,
      swiglu = false, openai_gelu = false, disable_bias_linear = false,
      -- validate_args: 4 * hidden without --swiglu; micro batch x data-parallel size 1
      ffn_hidden_size = 192, global_batch_size = 2,
    }
    for key, value in pairs(megatron) do assert.are.equal(value, state.args[key], key) end
    -- save interval None: the only checkpoint is the last
    assert.are.equal(0, state.args.save_interval)
    assert.is_false(pmp.io.exists(dir .. '/ck/iter_0000001'))
    assert.are.equal(0.1, state.model_config.hidden_dropout)
    assert.are.equal(0.1, state.model_config.attention_dropout)
    assert.are.equal('LayerNorm', state.model_config.normalization)
    assert.are.equal('learned_absolute', state.model_config.position_embedding_type)
    -- Megatron's MLP: the exact GELU, a bias on every linear layer
    assert.are.equal('gelu', state.model_config.activation)
    assert.is_true(state.model_config.add_bias_linear)
  end)

  it('train the GELU MLP with linear biases, saved under Megatron\'s bias names', function()
    local out, err, status = pretrain(REQUIRED, { '--data-path', prefix, '--save', dir .. '/gelu', '--train-iters', '12',
      '--log-interval', '1', '--lr', '3e-3', '--hidden-dropout', '0', '--attention-dropout', '0' })
    assert.are.equal(0, status, err)
    local l = losses(out)
    assert.is_true((l[10] + l[11] + l[12]) / 3 < (l[1] + l[2] + l[3]) / 3 - 0.15, out)
    local rank = dir .. '/gelu/iter_0000012/mp_rank_00/model_optim_rng.safetensors'
    local t = pmp.safetensors.load(rank, { copy = true })
    local layer = 'model.decoder.layers.0.'
    for name, size in pairs({ ['self_attention.linear_qkv.bias'] = 144, ['self_attention.linear_proj.bias'] = 48,
      ['mlp.linear_fc1.bias'] = 192, ['mlp.linear_fc2.bias'] = 48 }) do
      assert(t[layer .. name], 'no ' .. name)
      assert.are.same({ size }, t[layer .. name]:size(), name)
    end
    assert.are.same({ 192, 48 }, t[layer .. 'mlp.linear_fc1.weight']:size())
  end)

  it('build the MLP the flags name: --swiglu, --openai-gelu, and refuse --squared-relu', function()
    local out, err, status = pretrain(REQUIRED, { '--data-path', prefix, '--save', dir .. '/swiglu', '--swiglu',
      '--disable-bias-linear' })
    assert.are.equal(0, status, err)
    local config = saved_args(dir .. '/swiglu', 2).model_config
    assert.are.equal('swiglu', config.activation)
    assert.is_false(config.add_bias_linear)
    -- int((4 * hidden * 2 / 3) / 64) * 64 with --swiglu
    assert.are.equal(128, config.ffn_hidden_size)
    out, err, status = pretrain(REQUIRED, { '--data-path', prefix, '--save', dir .. '/tanh', '--openai-gelu' })
    assert.are.equal(0, status, err)
    assert.are.equal('gelu_tanh', saved_args(dir .. '/tanh', 2).model_config.activation)
    for _, case in ipairs({ { '--squared-relu', 'pmp builds no squared%-ReLU MLP' },
      { '--openai-gelu', '%-%-openai%-gelu picks the GELU of an MLP without %-%-swiglu', '--swiglu' } }) do
      _, err, status = pretrain(REQUIRED, { '--data-path', prefix, '--save', '', case[1], case[3] })
      assert.are_not.equal(0, status)
      assert.matches(case[2], err)
    end
  end)

  it("names the flag Megatron requires", function()
    local function without(flag, values)
      local out = {}
      local k = 1
      while k <= #REQUIRED do
        if REQUIRED[k] == flag then k = k + values + 1 else out[#out + 1] = REQUIRED[k]; k = k + 1 end
      end
      return out
    end
    local cases = {
      { without('--lr', 1), '%-%-lr is required with indexed data %(Megatron has no default for it%)' },
      { without('--max-position-embeddings', 1), '%-%-max%-position%-embeddings is required with indexed data' },
      { without('--train-iters', 1), '%-%-train%-iters or %-%-train%-samples is required with indexed data' },
    }
    for _, case in ipairs(cases) do
      local _, err, status = pretrain(case[1], { '--data-path', prefix, '--save', '' })
      assert.are_not.equal(0, status, case[2])
      assert.matches(case[2], err)
    end
  end)

  it('stay pmp\'s on the embedded corpus (the quick demo)', function()
    local out, err, status = pretrain({ '--num-layers', '1', '--hidden-size', '32', '--num-attention-heads', '4',
      '--seq-length', '16', '--micro-batch-size', '4', '--global-batch-size', '4', '--train-iters', '1',
      '--eval-iters', '1', '--save', dir .. '/demo' })
    assert.are.equal(0, status, err)
    assert.is_nil(out:match("Megatron%-LM's defaults"))
    local args = saved_args(dir .. '/demo', 1).args
    assert.are_not.equal(0.999, args.adam_beta2)
    assert.are_not.equal('linear', args.lr_decay_style)
    assert.are.equal(0, args.hidden_dropout)
    assert.are.equal(0, args.attention_dropout)
  end)
end)

describe('--eval-iters', function()
  it('counts global batches, each validation reading on through the split', function()
    -- at --lr 0 the weights never change, so one validation of 2 global batches is the mean of two
    -- validations of 1 global batch each (2 micro batches of 2 samples per global batch)
    local common = { '--num-layers', '1', '--hidden-size', '32', '--num-attention-heads', '4', '--seq-length', '16',
      '--micro-batch-size', '2', '--global-batch-size', '4', '--train-iters', '2', '--lr', '0', '--min-lr', '0',
      '--save', '', '--log-interval', '1' }
    local function validations(out)
      local list = {}
      for v in out:gmatch('validation loss at iteration %d+ | lm loss value: (%S+) |') do list[#list + 1] = tonumber(v) end
      return list
    end
    local one, err1, status1 = pretrain(common, { '--eval-interval', '1', '--eval-iters', '1' })
    assert.are.equal(0, status1, err1)
    local two, err2, status2 = pretrain(common, { '--eval-interval', '2', '--eval-iters', '2' })
    assert.are.equal(0, status2, err2)
    local a, b = validations(one), validations(two)
    assert.are.equal(2, #a, one)
    assert.are.equal(1, #b, two)
    assert.is_true(math.abs(a[1] - a[2]) > 1e-6, 'the two validations read the same samples')
    assert.is_true(math.abs((a[1] + a[2]) / 2 - b[1]) < 1e-5 * b[1], string.format('%.7g %.7g %.7g', a[1], a[2], b[1]))
  end)
end)
