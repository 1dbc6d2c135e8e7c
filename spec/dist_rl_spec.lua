require 'busted.runner'()
-- recipes/rm.lua and dpo.lua under mpirun -np 2 (each rank its half of every batch of pairs, gradients
-- averaged) against one process on the whole batch: the TensorBoard scalars (loss, accuracy, margin,
-- grad norm) and the final weights agree within 1e-5; and rm, dpo and grpo resume bit-exactly from a
-- checkpoint. All on the embedded sums task from a tiny pretraining checkpoint.
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'
local reader = require 'spec.support.tensorboard_reader'

local ITERS = 3

local function command(dir, script, args)
  local words = { 'cd', shell.quote(dir), '&&', shell.quote(shell.pmp), shell.quote(shell.root .. '/recipes/' .. script) }
  for _, a in ipairs(args) do words[#words + 1] = shell.quote(a) end
  return table.concat(words, ' ')
end

local function run(dir, script, args)
  local out, err, status = shell.run(command(dir, script, args))
  assert.are.equal(0, status, script .. ': ' .. err)
  return out
end

-- tag -> {step -> value} from the one event file in dir
local function scalars(dir)
  local names = reader.list_dir(dir)
  assert.are.equal(1, #names, dir .. ' holds one event file (one writing rank)')
  local out = {}
  for _, event in ipairs(reader.read_events(dir .. '/' .. names[1])) do
    for _, v in ipairs(event.values) do
      out[v.tag] = out[v.tag] or {}
      out[v.tag][event.step] = v.simple_value
    end
  end
  return out
end

local function weights(dir, iteration)
  return pmp.safetensors.load(string.format('%s/iter_%07d/mp_rank_00/model_optim_rng.safetensors', dir, iteration))
end

-- |a - b| within 1e-5, relative for values above 1
local function close(a, b) return math.abs(a - b) <= 1e-5 * math.max(1, math.abs(a)) end

-- the log lines' fields after the learning rate up to the grad norm, one per iteration
local function metric_lines(out)
  local lines = {}
  for line in out:gmatch('iteration +%d+/ +%d+ | elapsed time per iteration %(ms%): [%d.]+ | (.-)\n') do
    lines[#lines + 1] = line
  end
  return lines
end

describe('RL recipes in parallel and resumed', function()
  local dir
  setup(function()
    dir = shell.temp_dir()
    run(dir, 'pretrain.lua', { '--num-layers', '1', '--hidden-size', '32', '--num-attention-heads', '2',
      '--train-iters', '4', '--log-interval', '2', '--eval-interval', '4', '--sample-length', '0' })
  end)
  teardown(function() shell.remove_dir(dir) end)

  local cases = {
    { 'rm.lua', { 'pairwise loss', 'accuracy' } },
    { 'dpo.lua', { 'dpo loss', 'rewards accuracy', 'rewards margin' } },
  }

  it('data-parallel on 2 processes logs and trains as one process on the whole batch', function()
    for _, case in ipairs(cases) do
      local script, tags = case[1], case[2]
      local name = script:match('^%w+')
      local function args(tag)
        return { '--start-iters', '3', '--train-iters', tostring(ITERS), '--batch-size', '4', '--log-interval', '1',
          '--tensorboard-dir', name .. '_tb_' .. tag, '--save', name .. '_ck_' .. tag }
      end
      run(dir, script, args('one'))
      local out, err, status = mpi.run(2, shell.root .. '/recipes/' .. script, args('dp'), nil, dir)
      assert.are.equal(0, status, script .. ': ' .. err .. out)
      assert.are.equal(ITERS, #metric_lines(out), script .. ': one log line per iteration, from one rank')
      assert.matches(' over 2 processes', out)

      local one, dp = scalars(dir .. '/' .. name .. '_tb_one'), scalars(dir .. '/' .. name .. '_tb_dp')
      tags[#tags + 1] = 'grad-norm'
      for _, tag in ipairs(tags) do
        for step = 1, ITERS do
          local a, b = one[tag] and one[tag][step], dp[tag] and dp[tag][step]
          assert.is_number(a, string.format('%s: %s at step %d', script, tag, step))
          assert.is_true(close(a, b or 0 / 0), string.format('%s: %s at step %d: %s on 2 processes, %.9g on one',
            script, tag, step, tostring(b), a))
        end
      end
      local w1, w2 = weights(dir .. '/' .. name .. '_ck_one', ITERS), weights(dir .. '/' .. name .. '_ck_dp', ITERS)
      for key, t in pairs(w1) do
        if key:match('^model%.') then
          local difference = (t:double() - w2[key]:double()):abs():max():item()
          assert.is_true(difference <= 1e-5, string.format('%s: %s differs by %g', script, key, difference))
        end
      end
    end
  end)

  it('each data-parallel rank takes its own contiguous share of the global batch, in order', function()
    local recipe = require 'pmp.rl.recipe'
    local batch = { 'a', 'b', 'c', 'd', 'e', 'f' }
    assert.are.same({ 'a', 'b', 'c', 'd', 'e', 'f' }, recipe.rank_share(batch, { dp = 1, dp_rank = 0 }))
    assert.are.same({ 'a', 'b' }, recipe.rank_share(batch, { dp = 3, dp_rank = 0 }))
    assert.are.same({ 'e', 'f' }, recipe.rank_share(batch, { dp = 3, dp_rank = 2 }))
  end)

  it('resume from a checkpoint gives the log lines and weights of an uninterrupted run', function()
    for _, case in ipairs(cases) do
      local script = case[1]
      local function args(save, extra)
        local a = { '--start-iters', '3', '--train-iters', '4', '--batch-size', '4', '--log-interval', '1', '--save', save }
        for _, word in ipairs(extra or {}) do a[#a + 1] = word end
        return a
      end
      local whole = metric_lines(run(dir, script, args('whole')))
      local first = metric_lines(run(dir, script, args('parts', { '--exit-interval', '2' })))
      local rest_out = run(dir, script, args('parts'))
      assert.matches('loaded checkpoint from parts at iteration 2', rest_out)
      local rest = metric_lines(rest_out)
      assert.are.equal(4, #whole)
      assert.are.same(whole, { first[1], first[2], rest[1], rest[2] }, script)
      local a, b = weights(dir .. '/whole', 4), weights(dir .. '/parts', 4)
      for key, t in pairs(a) do
        assert.are.equal(0, (t:double() - b[key]:double()):abs():max():item(), script .. ' ' .. key)
      end
      shell.remove_dir(dir .. '/whole')
      shell.remove_dir(dir .. '/parts')
    end
  end)

  it('grpo resumed from a checkpoint gives the log lines, TensorBoard scalars and weights of an uninterrupted run', function()
    -- a reward that varies within a group (the sums reward of a tiny start is 0 everywhere: nothing would train)
    shell.write_file(dir .. '/length.lua', 'return function(prompt, response) return #response / 4 end\n')
    local function grpo(save, extra)
      local a = { '--reward-fn', 'length.lua', '--iterations', '4', '--prompts-per-iteration', '2', '--num-generations', '3',
        '--mini-batch-size', '3', '--eval-samples', '1', '--save', save, '--tensorboard-dir', save .. '_tb' }
      for _, word in ipairs(extra or {}) do a[#a + 1] = word end
      local lines = {}
      for line in run(dir, 'grpo.lua', a):gmatch('iteration +%d+/ +%d+ | (.-)| time') do lines[#lines + 1] = line end
      return lines
    end
    local whole = grpo('grpo_whole')
    local first, rest = grpo('grpo_parts', { '--exit-interval', '2' }), grpo('grpo_parts')
    assert.are.equal(4, #whole)
    assert.are.same(whole, { first[1], first[2], rest[1], rest[2] })
    local a, b = weights(dir .. '/grpo_whole', 4), weights(dir .. '/grpo_parts', 4)
    for key, t in pairs(a) do
      assert.are.equal(0, (t:double() - b[key]:double()):abs():max():item(), 'grpo ' .. key)
    end
    local tb = scalars(dir .. '/grpo_whole_tb')
    for _, tag in ipairs({ 'reward mean', 'kl', 'entropy', 'loss', 'clipfrac', 'grad-norm', 'learning-rate' }) do
      for step = 1, 4 do assert.is_number(tb[tag] and tb[tag][step], tag .. ' at step ' .. step) end
    end
    assert.is_true(tb['grad-norm'][1] > 0, 'the policy trained')
  end)
end)
