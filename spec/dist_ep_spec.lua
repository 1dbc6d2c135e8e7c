require 'busted.runner'()
-- Expert parallelism under mpirun: spec/dist/ep_worker.lua checks pmp.dist's all_to_all with uneven
-- counts and one training step of an expert-parallel MoE GPT against the whole model in one process
-- (every gradient, the global norm, the loss), on EP=2 and on EP=2 x expert-data-parallel 2 (also
-- with the distributed optimizer), and the same step with --moe-shared-expert-overlap bit for bit; then recipes/pretrain.lua with --expert-model-parallel-size 2 logs
-- the single-process losses, alone, with tensor parallelism (also with sequence parallelism), with
-- pipeline parallelism and with the distributed optimizer (experts sharded over their
-- expert-data-parallel group). Expert-parallel
-- checkpoints: a model saved under EP=2 loads into one process with the same logits, and pretraining
-- resumes across EP=2 and one process with the uninterrupted run's losses, also from the distributed
-- optimizer's sharded states.
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'

local worker = shell.root .. '/spec/dist/ep_worker.lua'

local function check_worker(np, ep, holdings, mode)
  local out, err, status = mpi.run(np, worker, { tostring(ep), mode })
  assert.are.equal(0, status, err .. out)
  local a2a = mpi.rows(out, 'A2A')
  assert.are.equal(np, #a2a)
  for _, r in ipairs(a2a) do assert.are.equal('ok', r[2], 'all_to_all on rank ' .. r[1] .. ': ' .. table.concat(r, ' ', 2)) end
  for _, r in ipairs(mpi.rows(out, 'EXPERTS')) do
    assert.are.same(holdings[tonumber(r[1]) + 1], { unpack(r, 2) }, 'experts of rank ' .. r[1])
  end
  local grads = mpi.rows(out, 'GRAD')
  assert.is_true(#grads > 0)
  for _, r in ipairs(grads) do
    assert.are_not.equal('missing', r[3], 'rank ' .. r[1] .. ': no gradient or no reference for ' .. r[2])
    assert.is_true(tonumber(r[3]) <= 1e-6, string.format('rank %s: %s differs from one process by %s', r[1], r[2], r[3]))
  end
  -- the same step with the shared experts overlapping the all-to-alls (--moe-shared-expert-overlap):
  -- loss, norm and every gradient bit for bit those of the blocking path
  local overlap = mpi.rows(out, 'OVERLAP')
  assert.are.equal(np, #overlap)
  for _, r in ipairs(overlap) do
    assert.are.equal('identical', r[2], 'overlap on rank ' .. r[1] .. ': ' .. table.concat(r, ' ', 2))
  end
  for _, key in ipairs({ 'NORM', 'LOSS' }) do
    local rows = mpi.rows(out, key)
    assert.are.equal(np, #rows)
    for _, r in ipairs(rows) do
      local got, want = tonumber(r[2]), tonumber(r[3])
      assert.is_true(math.abs(got - want) <= 1e-6 * math.abs(want), string.format('%s on rank %s: %s vs %s', key, r[1], r[2], r[3]))
    end
  end
end

local PRETRAIN = { '--num-layers', '2', '--hidden-size', '32', '--num-attention-heads', '4', '--seq-length', '16',
  '--micro-batch-size', '2', '--global-batch-size', '8', '--train-iters', '3', '--log-interval', '1',
  '--eval-interval', '3', '--eval-iters', '4', '--sample-length', '0', '--lr-warmup-iters', '1', '--lr', '3e-3',
  '--save', '', '--make-vocab-size-divisible-by', '128', '--num-experts', '4', '--moe-router-topk', '2', '--moe-ffn-hidden-size', '32',
  '--moe-aux-loss-coeff', '0.01', '--moe-z-loss-coeff', '0.001', '--moe-grouped-gemm' }

-- the training losses by iteration, the validation loss, then the logged auxiliary losses (averaged
-- over the data-parallel ranks, which makes them the single process's)
local function losses(stdout)
  local out = require('spec.support.train_log').losses(stdout)
  out[#out + 1] = tonumber(stdout:match('lm loss value: (%S+) |'))
  for name in ('load_balancing_loss z_loss'):gmatch('%S+') do
    for v in stdout:gmatch(' ' .. name .. ': (%S+) |') do out[#out + 1] = tonumber(v) end
  end
  return out
end

describe('expert parallelism under mpirun', function()
  local test = mpi.available and it or pending

  test('EP=2: all_to_all, and a training step equal to one process', function()
    check_worker(2, 2, { { '0', '1' }, { '2', '3' } })
  end)

  test('EP=2 x expert-data-parallel 2: the same', function()
    check_worker(4, 2, { { '0', '1' }, { '2', '3' }, { '0', '1' }, { '2', '3' } })
  end)

  test('EP=2 x expert-data-parallel 2, distributed optimizer: every gradient shard, the norm', function()
    check_worker(4, 2, { { '0', '1' }, { '2', '3' }, { '0', '1' }, { '2', '3' } }, 'distributed')
  end)

  local reference
  local function single_process()
    if not reference then
      local args = { shell.root .. '/recipes/pretrain.lua' }
      for _, a in ipairs(PRETRAIN) do args[#args + 1] = a end
      local out, err, status = shell.run_pmp(args)
      assert.are.equal(0, status, err)
      reference = losses(out)
      assert.are.equal(10, #reference, out)
    end
    return reference
  end

  -- the vocabulary is padded to 128 rows in every layout: 128 x 1 in one process, 64 x tp 2
  for _, case in ipairs({
    { 2, 'EP=2', { '--expert-model-parallel-size', '2', '--make-vocab-size-divisible-by', '128' } },
    { 4, 'EP=2 x TP=2 (experts whole on each tensor-parallel rank)', { '--expert-model-parallel-size', '2',
      '--tensor-model-parallel-size', '2', '--make-vocab-size-divisible-by', '64' } },
    { 4, 'EP=2 x PP=2 (one MoE layer per stage, expert-data-parallel 1 on each)', { '--expert-model-parallel-size', '2',
      '--pipeline-model-parallel-size', '2', '--make-vocab-size-divisible-by', '128' } },
    { 4, 'EP=2 x TP=2 with sequence parallelism (each rank routes its slice of the sequence)', {
      '--expert-model-parallel-size', '2', '--tensor-model-parallel-size', '2', '--sequence-parallel',
      '--make-vocab-size-divisible-by', '64' } },
    { 4, 'EP=2 x DP=4 with the distributed optimizer (experts sharded over expert-data-parallel 2)',
      { '--expert-model-parallel-size', '2', '--use-distributed-optimizer', '--make-vocab-size-divisible-by', '128' } },
  }) do
    local np, name, extra = case[1], case[2], case[3]
    test('recipes/pretrain.lua logs the single-process losses: ' .. name, function()
      local want = single_process()
      local flags = { unpack(PRETRAIN) }
      for _, a in ipairs(extra) do flags[#flags + 1] = a end
      local par, par_err, par_status = mpi.run(np, shell.root .. '/recipes/pretrain.lua', flags)
      assert.are.equal(0, par_status, par_err)
      assert.matches('expert-parallel 2', par, 1, true)
      local got = losses(par)
      assert.are.equal(#want, #got, par)
      for k = 1, #want do
        assert.is_true(math.abs(got[k] - want[k]) <= 1e-5 * math.abs(want[k]),
          string.format('%s: loss %d is %.7g, one process gave %.7g', name, k, got[k], want[k]))
      end
    end)
  end
end)

describe('expert parallelism with the shared experts overlapping the all-to-alls under mpirun', function()
  local test = mpi.available and it or pending
  test('recipes/pretrain.lua --moe-shared-expert-overlap at EP=2 logs the single-process losses', function()
    local flags = { unpack(PRETRAIN) }
    for _, a in ipairs({ '--moe-shared-expert-intermediate-size', '16', '--moe-shared-expert-gate',
      '--moe-shared-expert-overlap' }) do flags[#flags + 1] = a end
    local args = { shell.root .. '/recipes/pretrain.lua' }
    for _, a in ipairs(flags) do args[#args + 1] = a end
    local out, err, status = shell.run_pmp(args)   -- one process: nothing to overlap
    assert.are.equal(0, status, err)
    local want = losses(out)
    flags[#flags + 1] = '--expert-model-parallel-size'
    flags[#flags + 1] = '2'
    local par, par_err, par_status = mpi.run(2, shell.root .. '/recipes/pretrain.lua', flags)
    assert.are.equal(0, par_status, par_err)
    local got = losses(par)
    assert.are.equal(10, #want, out)
    assert.are.equal(#want, #got, par)
    for k = 1, #want do
      assert.is_true(math.abs(got[k] - want[k]) <= 1e-5 * math.abs(want[k]),
        string.format('loss %d is %.7g, one process gave %.7g', k, got[k], want[k]))
    end
  end)
end)

describe('expert parallelism with virtual pipeline stages under mpirun', function()
  local test = mpi.available and it or pending
  local function norms(stdout)
    local out = {}
    for v in stdout:gmatch('| grad norm: (%S+) |') do out[#out + 1] = v end
    assert.are.equal(3, #out, stdout)
    return out
  end

  -- 4 layers, the first dense (a chunk without experts to split), 2 virtual stages per pipeline rank,
  -- clipped by the global norm
  test('EP=2 x PP=2 interleaved with a dense first layer logs the single-process losses', function()
    local flags = { unpack(PRETRAIN) }
    for _, a in ipairs({ '--num-layers', '4', '--moe-layer-freq', '[0,1,1,1]', '--clip-grad', '0.05' }) do
      flags[#flags + 1] = a
    end
    local args = { shell.root .. '/recipes/pretrain.lua', unpack(flags) }
    local out, err, status = shell.run_pmp(args)
    assert.are.equal(0, status, err)
    local want, reference_out = losses(out), out
    assert.are.equal(10, #want, out)
    for _, a in ipairs({ '--expert-model-parallel-size', '2', '--pipeline-model-parallel-size', '2',
      '--num-layers-per-virtual-pipeline-stage', '1' }) do flags[#flags + 1] = a end
    out, err, status = mpi.run(4, shell.root .. '/recipes/pretrain.lua', flags)
    assert.are.equal(0, status, err)
    local got = losses(out)
    assert.are.equal(#want, #got, out)
    for k = 1, #want do
      assert.is_true(math.abs(got[k] - want[k]) <= 1e-5 * math.abs(want[k]),
        string.format('loss %d is %.7g, one process gave %.7g', k, got[k], want[k]))
    end
    -- Adam's steps hardly depend on a clipping scale: the logged norms (3 decimals) are compared too
    assert.are.same(norms(reference_out), norms(out))
  end)
end)

describe('expert-parallel checkpoints under mpirun', function()
  local test = mpi.available and it or pending
  local dir
  setup(function() dir = shell.temp_dir() end)
  teardown(function() shell.remove_dir(dir) end)

  test('an EP=2 checkpoint loads into one process with the same logits; a missing expert is named', function()
    local saved = dir .. '/model'
    local out, err, status = mpi.run(2, shell.root .. '/spec/dist/ep_checkpoint_worker.lua', { saved, '2' })
    assert.are.equal(0, status, err .. out)
    local root = saved .. '/iter_0000001'
    assert.is_true(pmp.io.is_dir(root .. '/mp_rank_00_000') and pmp.io.is_dir(root .. '/mp_rank_00_001'))
    -- each expert-parallel rank's directory holds its own experts only
    local second = pmp.safetensors.load(root .. '/mp_rank_00_001/model_optim_rng.safetensors')
    assert.is_not_nil(second['model.decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight'])
    assert.is_nil(second['model.decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight'])
    assert.is_nil(second['model.embedding.word_embeddings.weight'])

    local model = pmp.checkpoint.load_model(saved)
    pmp.manual_seed(3)   -- the worker's batch
    local ids = pmp.randint(0, 40, { 2, 8 }):long()
    local want = pmp.safetensors.load(saved .. '/logits.safetensors').logits
    assert.is_true((model(ids) - want):abs():max():item() <= 1e-5)

    -- the description loses expert 3 of layer 1: the load names it
    local layout = pmp.json.decode(pmp.io.read_file(root .. '/layout.json'))
    local lost = 'decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight'
    assert.is_not_nil(layout.params[lost])
    layout.params[lost] = nil
    pmp.io.write_atomic(root .. '/layout.json', pmp.json.encode(layout))
    local ok, why = pcall(pmp.checkpoint.load_model, saved)
    assert.is_false(ok)
    assert.matches('holds no model.' .. lost, tostring(why), 1, true)
  end)

  test('pretraining resumes an EP=2 checkpoint under EP=2 bit-exactly, and across EP=2 and one process', function()
    local flags = { unpack(PRETRAIN) }
    for _, a in ipairs({ '--train-iters', '6', '--eval-interval', '0' }) do flags[#flags + 1] = a end
    local function run(np, extra)
      local args = { unpack(flags) }
      for _, a in ipairs(extra) do args[#args + 1] = a end
      local out, err, status
      if np == 1 then
        table.insert(args, 1, shell.root .. '/recipes/pretrain.lua')
        out, err, status = shell.run_pmp(args)
      else
        out, err, status = mpi.run(np, shell.root .. '/recipes/pretrain.lua', args)
      end
      assert.are.equal(0, status, err)
      return require('spec.support.train_log').losses(out), out
    end
    local ep2 = { '--expert-model-parallel-size', '2' }
    local function with(a, b)
      local out = { unpack(a) }
      for _, x in ipairs(b) do out[#out + 1] = x end
      return out
    end
    local full = run(2, ep2)
    for it = 1, 6 do assert.is_number(full[it], 'iteration ' .. it) end
    local before = run(2, with(ep2, { '--save', dir .. '/ep2', '--exit-interval', '3' }))
    assert.are.same({ full[1], full[2], full[3] }, before)
    local resumed, out = run(2, with(ep2, { '--load', dir .. '/ep2' }))
    assert.matches('loaded checkpoint', out, 1, true)
    assert.are.same({ [4] = full[4], [5] = full[5], [6] = full[6] }, resumed)
    local function assert_close(got, label)
      for it = 4, 6 do
        assert.is_number(got[it], label .. ': iteration ' .. it)
        assert.is_true(math.abs(got[it] - full[it]) <= 1e-5 * math.abs(full[it]),
          string.format('%s: loss %d is %.7g, the uninterrupted run gave %.7g', label, it, got[it], full[it]))
      end
    end
    assert_close(run(1, { '--load', dir .. '/ep2' }), 'EP=2 checkpoint resumed in one process')
    run(1, { '--save', dir .. '/one', '--exit-interval', '3' })
    assert_close(run(2, with(ep2, { '--load', dir .. '/one' })), 'one-process checkpoint resumed under EP=2')

    -- the distributed optimizer over 4 ranks: dense states in 4 pieces, each EP rank's experts' in 4
    -- pieces written by its 2 expert-data-parallel replicas
    local sharded = with(ep2, { '--use-distributed-optimizer' })
    run(4, with(sharded, { '--save', dir .. '/zero', '--exit-interval', '3' }))
    local root = dir .. '/zero/iter_0000003'
    local experts = pmp.safetensors.load(root .. '/mp_rank_00_001/distrib_optim_003.safetensors')
    assert.is_not_nil(experts['decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight.exp_avg'])
    assert.is_nil(experts['decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight.exp_avg'])
    assert.is_nil(experts['decoder.layers.0.self_attention.linear_qkv.weight.exp_avg'])
    assert_close(run(4, with(sharded, { '--load', dir .. '/zero' })), 'EP=2 distributed-optimizer checkpoint resumed')
    assert_close(run(1, { '--load', dir .. '/zero' }), 'EP=2 distributed-optimizer checkpoint resumed in one process')
  end)
end)

describe('expert-parallel settings', function()
  it('fail before any work when the experts do not divide', function()
    local args = { shell.root .. '/recipes/pretrain.lua', '--num-experts', '4', '--expert-model-parallel-size', '3',
      '--save', '' }
    local _, err, status = shell.run_pmp(args)
    assert.are_not.equal(0, status)
    assert.matches('--num-experts 4 is not divisible by --expert-model-parallel-size 3', err, 1, true)
  end)
end)

describe('make bench-dist under expert parallelism', function()
  local test = mpi.available and it or pending
  -- the engine's count of the bytes each rank sent against what the all-to-alls' send counts and the
  -- other collectives' ring formulas give (tools/bench_dist.lua), on EP=2 and EP=2 x DP=4 with the
  -- distributed optimizer (expert buckets over the expert-data-parallel group)
  -- (the 2-rank run with shared experts overlapping the all-to-alls, which adds no traffic)
  for _, case in ipairs({ { 2, { '--moe-shared-expert-intermediate-size', '16', '--moe-shared-expert-overlap' } },
    { 4, { '--distributed-optimizer' } } }) do
    local np, extra = case[1], case[2]
    test(np .. ' ranks, ' .. extra[#extra] .. ': sent bytes equal the expected, and the share of all-to-all time hidden', function()
      local args = { '--ep', '2', '--steps', '2', '--num-layers', '2', '--hidden-size', '32', '--ffn-hidden-size', '64',
        '--num-attention-heads', '4', '--num-query-groups', '2', '--vocab-size', '64', '--seq-length', '16',
        '--micro-batch-size', '2', '--moe-ffn-hidden-size', '32', '--num-experts', '4', unpack(extra) }
      local out, err, status = mpi.run(np, shell.root .. '/tools/bench_dist.lua', args)
      assert.are.equal(0, status, err .. out)
      local lines = 0
      for sent, expected, a2a in out:gmatch('sent (%d+) B/step, expected (%d+) %(.-all%-to%-all (%d+)') do
        lines = lines + 1
        assert.is_true(tonumber(a2a) > 0, out)
        -- (ring pieces of buffers not divisible by the group size differ between ranks by a few bytes)
        assert.is_true(math.abs(tonumber(sent) - tonumber(expected)) <= 8, out)
      end
      assert.are.equal(np, lines, out)
      assert.matches('analytical %(even routing%) %d+, ratio [%d.]+', out)
      for hidden in out:gmatch('all%-to%-all comm [%d.]+ s, exposed [%d.]+ s, hidden (%d+)%%') do
        lines = lines - 1
        assert.is_true(tonumber(hidden) >= 0 and tonumber(hidden) <= 100, out)
      end
      assert.are.equal(0, lines, out)
    end)
  end
end)
