require 'busted.runner'()
-- Megatron's sample-based schedule in recipes/pretrain.lua: --train-samples makes train_samples //
-- global batch iterations, and the learning rate of iteration i is OptimizerParamScheduler's at
-- i x global batch samples, its warmup and decay spans counted in samples (megatron/training/training.py
-- get_optimizer_param_scheduler, megatron/core/optimizer_param_scheduler.py get_lr), written here in
-- closed form.
local shell = require 'spec.support.shell'

local COMMON = { '--num-layers', '1', '--hidden-size', '32', '--num-attention-heads', '4', '--seq-length', '16',
  '--micro-batch-size', '2', '--global-batch-size', '4', '--log-interval', '1', '--eval-interval', '0',
  '--sample-length', '0', '--save', '', '--lr', '1e-2', '--min-lr', '1e-3', '--lr-decay-style', 'linear' }

local function pretrain(extra)
  local args = { shell.root .. '/recipes/pretrain.lua' }
  for _, list in ipairs({ COMMON, extra }) do
    for _, a in ipairs(list) do args[#args + 1] = a end
  end
  return shell.run_pmp(args)
end

local function logged_lrs(out)
  local list, total = {}, nil
  for it, of, lr in out:gmatch('iteration +(%d+)/ +(%d+) |.-learning rate: (%S+) |') do
    list[tonumber(it)], total = tonumber(lr), tonumber(of)
  end
  return list, total
end

-- Megatron's get_lr at num_steps samples, linear decay
local function megatron_lr(num_steps, warmup, decay, max_lr, min_lr)
  if warmup > 0 and num_steps <= warmup then return max_lr * num_steps / warmup end
  if num_steps > decay then return min_lr end
  return min_lr + (max_lr - min_lr) * (1 - (num_steps - warmup) / (decay - warmup))
end

local function assert_schedule(out, iterations, warmup, decay)
  local lrs, total = logged_lrs(out)
  assert.are.equal(iterations, total, out)
  for i = 1, iterations do
    local want = megatron_lr(i * 4, warmup, decay, 1e-2, 1e-3)
    assert.is_not_nil(lrs[i], 'iteration ' .. i)
    assert.is_true(math.abs(lrs[i] - want) <= 1e-6 * want, string.format('iteration %d: lr %.7g, Megatron %.7g', i, lrs[i], want))
  end
end

describe("Megatron's sample-based schedule", function()
  it('--train-samples, --lr-warmup-samples, --lr-decay-samples: iterations and learning rates', function()
    -- 22 samples at 4 per step: 5 iterations (the incomplete last batch dropped, as Megatron does)
    local out, err, status = pretrain({ '--train-samples', '22', '--lr-warmup-samples', '6', '--lr-decay-samples', '14' })
    assert.are.equal(0, status, err)
    assert.matches('consumed samples: +20 |', out)
    assert_schedule(out, 5, 6, 14)
  end)

  it('--lr-warmup-fraction: a share of the decay span, in samples or in iterations', function()
    local out, err, status = pretrain({ '--train-samples', '24', '--lr-warmup-fraction', '0.3' })
    assert.are.equal(0, status, err)
    assert_schedule(out, 6, 0.3 * 24, 24)
    out, err, status = pretrain({ '--train-iters', '6', '--lr-decay-iters', '5', '--lr-warmup-fraction', '0.3' })
    assert.are.equal(0, status, err)
    assert_schedule(out, 6, 0.3 * 5 * 4, 5 * 4)
  end)

  it('applies the rate before the scheduler steps: a warmup trains its first iteration at 0', function()
    -- Megatron's OptimizerParamScheduler starts at step 0 and steps after optimizer.step(), so the first
    -- iteration of a warmup trains at init_lr 0: its weights are those of a run at --lr 0
    local dir = shell.temp_dir()
    local function weights(extra)
      local _, err, status = pretrain({ '--train-iters', '1', '--save', dir .. '/' .. #extra, '--eval-iters', '0', unpack(extra) })
      assert.are.equal(0, status, err)
      return pmp.safetensors.load(dir .. '/' .. #extra .. '/iter_0000001/mp_rank_00/model_optim_rng.safetensors', { copy = true })
    end
    local warm, still = weights({ '--lr-warmup-iters', '1' }), weights({ '--lr', '0', '--min-lr', '0', '--lr-warmup-iters', '0' })
    local name = 'model.decoder.layers.0.mlp.linear_fc1.weight'
    assert.are.equal(0, (warm[name] - still[name]):abs():max():item())
    -- without warmup the first iteration trains at the peak rate
    local peak = weights({ '--lr-warmup-iters', '0', '--eval-interval', '0' })
    assert.is_true((peak[name] - still[name]):abs():max():item() > 1e-4)
    shell.remove_dir(dir)
  end)

  it('refuses mixing samples and iterations as Megatron does', function()
    local cases = {
      { { '--train-samples', '8', '--train-iters', '2' }, '%-%-train%-iters counts iterations: with %-%-train%-samples give samples' },
      { { '--train-samples', '8', '--lr-warmup-iters', '1' }, '%-%-lr%-warmup%-iters counts iterations' },
      { { '--train-iters', '2', '--lr-decay-samples', '8' }, '%-%-lr%-decay%-samples/%-%-lr%-warmup%-samples need %-%-train%-samples' },
      { { '--train-iters', '2', '--lr-warmup-fraction', '0.1', '--lr-warmup-iters', '1' },
        'give either %-%-lr%-warmup%-fraction or %-%-lr%-warmup%-iters, not both' },
      { { '--train-samples', '3' }, '%-%-train%-samples 3 is less than one %-%-global%-batch%-size 4' },
    }
    for _, case in ipairs(cases) do
      local _, err, status = pretrain(case[1])
      assert.are_not.equal(0, status, case[2])
      assert.matches(case[2], err)
    end
  end)
end)
