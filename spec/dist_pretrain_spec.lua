-- recipes/pretrain.lua under mpirun trains the same model to the same losses as one process: the
-- single-process run is the reference, every parallel layout must log the same losses.
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'

local common = { '--num-layers', '4', '--hidden-size', '32', '--num-attention-heads', '4', '--num-query-groups', '2',
  '--seq-length', '16', '--micro-batch-size', '2', '--global-batch-size', '8', '--train-iters', '3',
  '--log-interval', '1', '--eval-interval', '3', '--eval-iters', '4', '--sample-length', '0',
  '--lr-warmup-iters', '1', '--lr', '3e-3' }

local function with(extra, base)
  local out = {}
  for _, a in ipairs(base or common) do out[#out + 1] = a end
  for _, a in ipairs(extra) do out[#out + 1] = a end
  return out
end

local function losses(stdout)
  local out = {}
  for v in stdout:gmatch('| lm loss: (%S+) |') do out[#out + 1] = tonumber(v) end
  for v in stdout:gmatch('lm loss value: (%S+) |') do out[#out + 1] = tonumber(v) end
  return out
end

local function assert_close(want, got, label)
  assert.are.equal(#want, #got, label .. ': ' .. #got .. ' losses logged, expected ' .. #want)
  for k = 1, #want do
    local rel = math.abs(got[k] - want[k]) / math.abs(want[k])
    assert.is_true(rel <= 1e-5, string.format('%s: loss %d is %.7g, one process gave %.7g', label, k, got[k], want[k]))
  end
end

describe('recipes/pretrain.lua under mpirun', function()
  local dir, reference
  setup(function()
    dir = shell.temp_dir()
    -- a padded vocabulary of 128 rows either way: 128 x 1 here, 64 x tp 2 below
    local args = with({ '--save', '', '--make-vocab-size-divisible-by', '128' })
    table.insert(args, 1, shell.root .. '/recipes/pretrain.lua')
    local out, err, status = shell.run_pmp(args)
    assert.are.equal(0, status, err)
    reference = losses(out)
    -- 3 training losses, the validation at iteration 3, then the end of training's validation and test
    assert.are.equal(6, #reference, out)
  end)
  teardown(function() shell.remove_dir(dir) end)

  local layouts = {
    { 8, 'TP=2 x PP=2 x DP=2 with the distributed optimizer', { '--tensor-model-parallel-size', '2',
      '--pipeline-model-parallel-size', '2', '--use-distributed-optimizer', '--make-vocab-size-divisible-by', '64' } },
    { 4, 'TP=2 with sequence parallel x DP=2, gradients reduced after backward', { '--tensor-model-parallel-size', '2',
      '--sequence-parallel', '--overlap-grad-reduce=false', '--make-vocab-size-divisible-by', '64' } },
    { 3, 'PP=3 with an uneven split', { '--pipeline-model-parallel-size', '3', '--decoder-first-pipeline-num-layers', '2',
      '--make-vocab-size-divisible-by', '128' } },
    { 2, 'PP=2 with 2 virtual stages per rank (interleaved schedule)', { '--pipeline-model-parallel-size', '2',
      '--num-layers-per-virtual-pipeline-stage', '1', '--make-vocab-size-divisible-by', '128' } },
    { 4, 'PP=2 with 2 virtual stages x DP=2 with activation recompute', { '--pipeline-model-parallel-size', '2',
      '--num-layers-per-virtual-pipeline-stage', '1', '--recompute-granularity', 'full', '--make-vocab-size-divisible-by', '128' } },
    { 4, 'CP=2 x TP=2 with sequence parallel', { '--context-parallel-size', '2', '--tensor-model-parallel-size', '2',
      '--sequence-parallel', '--make-vocab-size-divisible-by', '64' } },
    { 4, 'CP=2 x DP=2 with the distributed optimizer', { '--context-parallel-size', '2', '--use-distributed-optimizer',
      '--make-vocab-size-divisible-by', '128' } },
  }
  for _, case in ipairs(layouts) do
    local np, name, flags = case[1], case[2], case[3]
    it('logs the single-process losses: ' .. name, function()
      local out, err, status = mpi.run(np, shell.root .. '/recipes/pretrain.lua',
        with(with({ '--save', '' }, flags)))
      assert.are.equal(0, status, err)
      assert_close(reference, losses(out), name)
      -- only the last rank logs
      local lines = 0
      for _ in out:gmatch(' iteration +1/') do lines = lines + 1 end
      assert.are.equal(1, lines)
    end)
  end

  -- six iterations of the common model on np processes (one: without mpirun)
  local six = {}
  for k, a in ipairs(common) do six[k] = a == '3' and common[k - 1] == '--train-iters' and '6' or a end
  local function run(np, extra)
    local args = with(extra, six)
    if np == 1 then
      table.insert(args, 1, shell.root .. '/recipes/pretrain.lua')
      return shell.run_pmp(args)
    end
    return mpi.run(np, shell.root .. '/recipes/pretrain.lua', args)
  end
  local interleaved = { '--pipeline-model-parallel-size', '2', '--num-layers-per-virtual-pipeline-stage', '1',
    '--make-vocab-size-divisible-by', '128' }

  it('resumes a TP=2 x PP=2 distributed-optimizer checkpoint in other layouts where one process would be', function()
    local out, err, status = run(1, { '--save', '', '--make-vocab-size-divisible-by', '128', '--eval-interval', '0', '--eval-iters', '0' })
    assert.are.equal(0, status, err)
    local want = losses(out)
    assert.are.equal(6, #want)
    out, err, status = run(8, { '--save', dir, '--exit-interval', '3', '--eval-interval', '0', '--eval-iters', '0', '--tensor-model-parallel-size', '2',
      '--pipeline-model-parallel-size', '2', '--use-distributed-optimizer', '--make-vocab-size-divisible-by', '64' })
    assert.are.equal(0, status, err)
    assert_close({ want[1], want[2], want[3] }, losses(out), 'before the checkpoint')
    for _, case in ipairs({ { 1, { '--make-vocab-size-divisible-by', '128' } },
                            { 4, { '--tensor-model-parallel-size', '2', '--make-vocab-size-divisible-by', '64' } },
                            { 2, interleaved } }) do
      out, err, status = run(case[1], with({ '--load', dir, '--save', '', '--eval-interval', '0', '--eval-iters', '0' }, case[2]))
      assert.are.equal(0, status, err)
      assert.truthy(out:find('resharded from another parallel layout', 1, true), out)
      assert_close({ want[4], want[5], want[6] }, losses(out), 'resumed on ' .. case[1] .. ' processes')
    end
    -- one process generates from the parallel run's checkpoint (its parts joined into the whole model)
    out, err, status = shell.run_pmp({ shell.root .. '/recipes/generate.lua', '--load', dir, '--prompt', 'the ',
      '--max-new-tokens', '8' })
    assert.are.equal(0, status, err)
    assert.truthy((out .. err):find('generate: 1 prompt, 8 tokens', 1, true), out .. err)
  end)

  it('saves virtual pipeline stages (PP=2 x DP=2, distributed optimizer) and resumes them in one process', function()
    local out, err, status = run(1, { '--save', '', '--make-vocab-size-divisible-by', '128', '--eval-interval', '0', '--eval-iters', '0' })
    assert.are.equal(0, status, err)
    local want = losses(out)
    local saved = dir .. '/interleaved'
    out, err, status = run(4, with({ '--save', saved, '--exit-interval', '3', '--eval-interval', '0', '--eval-iters', '0',
      '--use-distributed-optimizer' }, interleaved))
    assert.are.equal(0, status, err)
    assert_close({ want[1], want[2], want[3] }, losses(out), 'before the checkpoint')
    out, err, status = run(1, { '--load', saved, '--save', '', '--eval-interval', '0', '--eval-iters', '0', '--make-vocab-size-divisible-by', '128' })
    assert.are.equal(0, status, err)
    assert.truthy(out:find('resharded from another parallel layout', 1, true), out)
    assert_close({ want[4], want[5], want[6] }, losses(out), 'resumed on one process')
  end)

  it('refuses a layout the world cannot hold', function()
    local _, err, status = mpi.run(3, shell.root .. '/recipes/pretrain.lua', with({ '--tensor-model-parallel-size', '2', '--save', '' }))
    assert.are_not.equal(0, status)
    assert.truthy(err:find('not divisible by tp %(2%)'), err)
  end)
end)
