require 'busted.runner'()
-- recipes/pretrain.lua with Megatron's MoE flags: a small MoE model trains (the loss falls), the log
-- line carries the auxiliary losses, the checkpoint holds every expert under Megatron-Core's names and
-- generates; --moe-layer-freq takes Megatron's spellings; bad MoE flags fail naming the setting.
local shell = require 'spec.support.shell'
local losses = require('spec.support.train_log').losses
local fails_with = require('spec.support.expect').fails_with

local TINY = { '--num-layers', '2', '--hidden-size', '32', '--num-attention-heads', '4', '--seq-length', '16',
  '--micro-batch-size', '4', '--global-batch-size', '8', '--log-interval', '1', '--eval-interval', '0',
  '--sample-length', '0', '--lr-warmup-iters', '2', '--num-experts', '4', '--moe-router-topk', '2',
  '--moe-ffn-hidden-size', '32' }

local function run_pretrain(extra)
  local words = { 'cd', shell.quote(shell.root), '&&', shell.quote(shell.pmp), 'recipes/pretrain.lua' }
  for _, list in ipairs({ TINY, extra }) do
    for _, a in ipairs(list) do words[#words + 1] = shell.quote(a) end
  end
  return shell.run(table.concat(words, ' '))
end

-- recipes/generate.lua continues a prompt from the checkpoint in dir.
local function generates_from(dir)
  local gen, err, status = shell.run_pmp({ shell.root .. '/recipes/generate.lua', '--load', dir, '--prompt', 'the ',
    '--max-new-tokens', '6' })
  assert.are.equal(0, status, err)
  assert.matches('^the ', gen)
end

describe('pretraining a mixture of experts', function()
  local scratch
  before_each(function() scratch = shell.temp_dir() end)
  after_each(function() shell.remove_dir(scratch) end)

  it('trains with --num-experts 4 --moe-router-topk 2, logs the auxiliary losses and checkpoints every expert', function()
    local out, err, status = run_pretrain({ '--train-iters', '12', '--moe-aux-loss-coeff', '0.01', '--moe-z-loss-coeff',
      '0.001', '--moe-grouped-gemm', '--moe-layer-freq', '([0]*1+[1]*1)', '--moe-expert-capacity-factor', '1.5',
      '--save', scratch .. '/ck' })
    assert.are.equal(0, status, err)
    local l = losses(out)
    assert.is_true(l[12] < l[1], 'loss did not fall')
    assert.matches('lm loss: [%d.]+E[-+]%d+ | loss scale: 1.0 | grad norm: [%d.]+ | number of skipped iterations: +0 | number of nan ' ..
      'iterations: +0 | tokens per second: %d+ | load_balancing_loss: [%d.]+E[-+]%d+ | z_loss: [%d.]+E[-+]%d+ |', out)
    local tensors = pmp.safetensors.load(scratch .. '/ck/iter_0000012/mp_rank_00/model_optim_rng.safetensors', { copy = true })
    assert.is_not_nil(tensors['model.decoder.layers.0.mlp.linear_fc1.weight'])   -- layer 0 dense
    assert.is_not_nil(tensors['model.decoder.layers.1.mlp.router.weight'])
    for e = 0, 3 do
      assert.are.same({ 64, 32 }, tensors['model.decoder.layers.1.mlp.experts.local_experts.' .. e .. '.linear_fc1.weight'].shape)
    end
    generates_from(scratch .. '/ck')
  end)

  it('routes as DeepSeek-V3 with Megatron flags: sigmoid scores, expert bias moved each step, groups, seq_aux_loss', function()
    local deepseek = { '--train-iters', '4', '--num-experts', '8', '--moe-router-topk', '4',
      '--moe-router-score-function', 'sigmoid', '--moe-router-enable-expert-bias', '--moe-router-bias-update-rate', '0.01',
      '--moe-router-num-groups', '4', '--moe-router-group-topk', '2', '--moe-router-topk-scaling-factor', '2.5',
      '--moe-router-load-balancing-type', 'seq_aux_loss', '--moe-aux-loss-coeff', '0.001' }
    local out, err, status = run_pretrain({ '--save', scratch .. '/ck', unpack(deepseek) })
    assert.are.equal(0, status, err)
    assert.matches('seq_load_balancing_loss: [%d.]+E[-+]%d+ | expert load max/mean per MoE layer: [%d.]+ [%d.]+ |', out)
    -- activation recompute re-runs each layer's forward in backward: the same losses, aux losses and loads
    local again, again_err, again_status = run_pretrain({ '--save', '', '--recompute-granularity', 'full', unpack(deepseek) })
    assert.are.equal(0, again_status, again_err)
    local function logged(log)
      local lines = {}
      for line in log:gmatch('lm loss: [^\n]*') do
        lines[#lines + 1] = (line:match('^(.*MoE layer: [%d. ]+|)'):gsub('tokens per second: %d+', ''))
      end
      return lines
    end
    assert.are.same(logged(out), logged(again))
    local tensors = pmp.safetensors.load(scratch .. '/ck/iter_0000004/mp_rank_00/model_optim_rng.safetensors', { copy = true })
    local moved = 0
    for layer = 0, 1 do
      -- four updates of +-0.01 or 0 each
      for _, b in ipairs(tensors['model.decoder.layers.' .. layer .. '.mlp.router.expert_bias']:totable()) do
        local steps = b / 0.01
        assert.is_true(math.abs(steps - math.floor(steps + 0.5)) < 1e-4 and math.abs(steps) <= 4 + 1e-4, tostring(b))
        if math.abs(b) > 1e-6 then moved = moved + 1 end
      end
    end
    assert.is_true(moved > 0, 'no expert bias moved')
  end)

  it('trains multi-latent attention with Megatron flags, and generates from the checkpoint', function()
    local out, err, status = run_pretrain({ '--train-iters', '12', '--multi-latent-attention', '--q-lora-rank', '16',
      '--kv-lora-rank', '12', '--qk-head-dim', '8', '--qk-pos-emb-head-dim', '4', '--v-head-dim', '6',
      '--save', scratch .. '/ck' })
    assert.are.equal(0, status, err)
    local l = losses(out)
    assert.is_true(l[12] < l[1], 'loss did not fall')
    local tensors = pmp.safetensors.load(scratch .. '/ck/iter_0000012/mp_rank_00/model_optim_rng.safetensors', { copy = true })
    assert.are.same({ 16, 32 }, tensors['model.decoder.layers.0.self_attention.linear_q_down_proj.weight'].shape)
    assert.are.same({ 16, 32 }, tensors['model.decoder.layers.0.self_attention.linear_kv_down_proj.weight'].shape)
    assert.are.same({ 4 * 14, 12 }, tensors['model.decoder.layers.0.self_attention.linear_kv_up_proj.weight'].shape)
    generates_from(scratch .. '/ck')
  end)

  it('reads --moe-layer-freq as Megatron writes it', function()
    local freq = pmp.train.model.moe_layer_freq
    assert.are.equal(2, freq('2'))
    assert.are.same({ 0, 1, 1, 1 }, freq('[0,1,1,1]'))
    assert.are.same({ 0, 0, 1, 1, 1 }, freq('([0]*2+[1]*3)'))
    fails_with(function() freq('every other') end, "--moe-layer-freq 'every other'")
  end)

  it('fails before training on a top-k larger than the experts', function()
    local _, err, status = run_pretrain({ '--train-iters', '1', '--moe-router-topk', '5', '--save', '' })
    assert.are_not.equal(0, status)
    assert.matches('moe_router_topk 5 must be an integer from 1 to num_moe_experts 4', err, 1, true)
  end)
end)
