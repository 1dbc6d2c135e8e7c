require 'busted.runner'()
-- --fp16 as Megatron-LM trains it: f16 model, f32 main gradients and weights, loss scaling by
-- Megatron's DynamicGradScaler (megatron/core/optimizer/grad_scaler.py) or a constant scale, steps
-- whose gradients overflowed skipped. The scaler's schedule is checked against its closed form
-- written out by hand; the recipe's f16 losses against an f32 run's.
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'
local losses = require('spec.support.train_log').losses
local LossScaler = require 'pmp.train.loss_scaler'

local TINY = { '--num-layers', '1', '--hidden-size', '32', '--num-attention-heads', '4', '--seq-length', '16',
  '--micro-batch-size', '4', '--global-batch-size', '8', '--log-interval', '1', '--eval-iters', '0',
  '--sample-length', '0', '--lr-warmup-iters', '0', '--lr', '3e-3', '--lr-decay-style', 'constant' }

local function pretrain(...)
  local words = { 'cd', shell.quote(shell.root), '&&', shell.quote(shell.pmp), 'recipes/pretrain.lua' }
  for _, list in ipairs({ TINY, ... }) do
    for _, a in ipairs(list) do words[#words + 1] = shell.quote(a) end
  end
  return shell.run(table.concat(words, ' '))
end

local function weights(dir, iteration)
  local path = string.format('%s/iter_%07d/mp_rank_00/model_optim_rng.safetensors', dir, iteration)
  local out = {}
  for name, t in pairs(pmp.safetensors.load(path, { copy = true })) do
    if name:match('^model%.') then out[name] = t end
  end
  return out
end

-- field of each iteration's log line, as numbers
local function logged(out, field)
  local values = {}
  for it, v in out:gmatch('iteration%s+(%d+)/%s*%d+ |.-' .. field .. ': +([%d.E+-]+) |') do values[tonumber(it)] = tonumber(v) end
  return values
end

describe("Megatron's loss scaler", function()
  it('halves after --hysteresis overflows, then on every overflow, and doubles after a window of clean steps', function()
    local scaler = LossScaler({ loss_scale = 0, initial_loss_scale = 1024, min_loss_scale = 1, loss_scale_window = 3,
      hysteresis = 2 })
    -- x: an overflow, o: a clean step. Closed form: the first overflow after the start or a growth only
    -- takes one of the 2 lives; with none left each overflow halves; 3 clean steps in a row double the
    -- scale and restore the lives.
    local events = 'xxxooxoooxooooooxx'
    local expected = { 1024, 512, 256, 256, 256, 128, 128, 128, 256, 256, 256, 256, 512, 512, 512, 1024, 1024, 512 }
    local stepped = { false, false, false, true, true, false, true, true, true, false, true, true, true, true, true, true,
      false, false }
    for k = 1, #events do
      local ok = scaler:update(events:sub(k, k) == 'x')
      assert.are.equal(expected[k], scaler.scale, 'after event ' .. k)
      assert.are.equal(stepped[k], ok, 'step ' .. k)
    end
  end)

  it('never halves below --min-loss-scale; a constant --loss-scale never moves', function()
    local scaler = LossScaler({ loss_scale = 0, initial_loss_scale = 8, min_loss_scale = 2, loss_scale_window = 1000,
      hysteresis = 1 })
    for _, scale in ipairs({ 4, 2, 2, 2 }) do
      assert.is_false(scaler:update(true))
      assert.are.equal(scale, scaler.scale)
    end
    local constant = LossScaler({ loss_scale = 128, initial_loss_scale = 2 ^ 32, min_loss_scale = 1,
      loss_scale_window = 1, hysteresis = 1 })
    assert.is_false(constant:update(true))
    assert.is_true(constant:update(false))
    assert.are.equal(128, constant.scale)
    assert.has_error(function() LossScaler({ loss_scale = 0, initial_loss_scale = 4, min_loss_scale = 8,
      loss_scale_window = 1, hysteresis = 1 }) end, '--min-loss-scale 8 is above --initial-loss-scale 4')
  end)

  it('makes f32 main gradients divided by the scale, keeping an overflow', function()
    local model = pmp.nn.Linear(3, 2, { bias = false })
    model:to('f16')
    local w = model:parameters()[1]
    w.grad = pmp.tensor({ { 1024, -2048, 3 }, { 65504, 0, 1 } }):to('f16')
    LossScaler.main_grads(model, 1024)
    assert.are.equal('f32', w.grad.dtype)
    assert.are.same({ { 1, -2, 3 / 1024 }, { 65504 / 1024, 0, 1 / 1024 } }, w.grad:double():totable())
    w.grad = pmp.tensor({ { math.huge, 0, 0 }, { 0, 0, 0 } }):to('f16')
    LossScaler.main_grads(model, 1024)
    assert.are.equal(math.huge, w.grad:double():totable()[1][1])
  end)
end)

describe('recipes/pretrain.lua --fp16', function()
  local scratch
  before_each(function() scratch = shell.temp_dir() end)
  after_each(function() shell.remove_dir(scratch) end)

  it("skips and counts the overflowing steps from Megatron's initial scale, leaving the weights and the rate", function()
    -- 2^32, then with one of the two lives gone 2^31: both overflow the f16 gradients
    local out, err, status = pretrain({ '--fp16', '--train-iters', '2', '--save', scratch .. '/over' })
    assert.are.equal(0, status, err)
    assert.are.same({ 2 ^ 32, 2 ^ 31 }, logged(out, 'loss scale'))
    assert.are.same({ 1, 1 }, logged(out, 'number of skipped iterations'))
    assert.are.same({ 0, 0 }, logged(out, 'number of nan iterations'))
    -- the schedule did not move: the constant rate's first step is still to come
    assert.are.same({ 3e-3, 3e-3 }, logged(out, 'learning rate'))
    -- the same model stepped at --lr 0 with a scale that does not overflow: the initial weights
    out, err, status = pretrain({ '--fp16', '--loss-scale', '1', '--lr', '0', '--train-iters', '2', '--save', scratch .. '/zero' })
    assert.are.equal(0, status, err)
    assert.are.same({ 0, 0 }, logged(out, 'number of skipped iterations'))
    local a, b = weights(scratch .. '/over', 2), weights(scratch .. '/zero', 2)
    local count = 0
    for name, t in pairs(b) do
      assert.are.equal('f16', t.dtype, name)
      assert((a[name]:double() - t:double()):abs():max():item() == 0, name .. ' changed in a skipped step')
      count = count + 1
    end
    assert.is_true(count > 5)
  end)

  it("trains an f16 model whose losses track the f32 run's", function()
    local common = { '--train-iters', '12', '--save', '' }
    local f32, err1, status1 = pretrain(common)
    assert.are.equal(0, status1, err1)
    local f16, err2, status2 = pretrain(common, { '--fp16', '--initial-loss-scale', '4096', '--loss-scale-window', '5' })
    assert.are.equal(0, status2, err2)
    local a, b = losses(f32), losses(f16)
    -- 5 clean steps double the scale: 4096 until iteration 4, then 8192 and 16384
    local scales = logged(f16, 'loss scale')
    assert.are.same({ 4096, 8192, 16384 }, { scales[4], scales[5], scales[10] })
    for it, skipped in pairs(logged(f16, 'number of skipped iterations')) do assert.are.equal(0, skipped, 'iteration ' .. it) end
    local worst, differs = 0, false
    for it = 1, 12 do
      worst = math.max(worst, math.abs(a[it] - b[it]))
      differs = differs or a[it] ~= b[it]
    end
    -- f16 rounds to 2^-11 relative: the losses (about 3) agree to about a thousandth, and do differ
    assert.is_true(worst < 1e-3, 'f16 losses differ from f32 by ' .. worst)
    assert.is_true(differs, 'the f16 run computed in f32')
    assert.is_true(b[12] < b[1] - 0.2, f16)
  end)

  it('trains the same across two pipeline stages as in one process, as --bf16 does', function()
    if not mpi.available then pending('mpirun is not installed') return end
    local common = { '--num-layers', '2', '--micro-batch-size', '2', '--train-iters', '4', '--save', '' }
    -- bf16 rounds to 2^-8 relative, f16 to 2^-11
    for _, case in ipairs({ { { '--fp16', '--initial-loss-scale', '4096' }, 1e-3 }, { { '--bf16' }, 2e-2 } }) do
      local one, err1, status1 = pretrain(common, case[1])
      assert.are.equal(0, status1, err1)
      local args = {}
      for _, list in ipairs({ TINY, common, case[1], { '--pipeline-model-parallel-size', '2' } }) do
        for _, a in ipairs(list) do args[#args + 1] = a end
      end
      local two, err2, status2 = mpi.run(2, shell.root .. '/recipes/pretrain.lua', args, nil, shell.root)
      assert.are.equal(0, status2, err2)
      local a, b = losses(one), losses(two)
      for it = 1, 4 do
        assert(math.abs(a[it] - b[it]) < case[2], string.format('%s iteration %d: %.6f in one process, %.6f over two stages',
          case[1][1], it, a[it], b[it]))
      end
    end
  end)

  it('refuses fp8, --bf16 with it, the distributed optimizer, and scaler flags without it, naming them', function()
    for _, case in ipairs({
      { { '--fp8-format', 'hybrid' }, '%-%-fp8%-format: pmp has no fp8 training' },
      { { '--fp8-param-gather' }, '%-%-fp8%-param%-gather: pmp has no fp8 training' },
      { { '--fp16', '--bf16' }, 'give either %-%-fp16 or %-%-bf16, not both' },
      { { '--fp16', '--use-distributed-optimizer' }, '%-%-fp16 with %-%-use%-distributed%-optimizer' },
      { { '--hysteresis', '3' }, '%-%-hysteresis needs %-%-fp16' },
    }) do
      local _, err, status = pretrain(case[1], { '--train-iters', '1', '--save', '' })
      assert.are_not.equal(0, status, case[2])
      assert.matches(case[2], err)
    end
  end)
end)
