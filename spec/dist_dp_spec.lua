require 'busted.runner'()
-- Data parallelism (lua/pmp/dist/ddp.lua), the distributed optimizer (lua/pmp/optim/distributed.lua)
-- and the global gradient norm (lua/pmp/dist/grad_norm.lua): under mpirun -np 2, three steps of a tiny
-- GPTModel on each rank's half of the global batch give the losses, gradient norms and parameters of
-- one process on the whole global batch (computed by the worker itself, spec/dist/dp_worker.lua).
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'
local ddp_module = require 'pmp.dist.ddp'

local worker = shell.root .. '/spec/dist/dp_worker.lua'

local words = mpi.words

local rows = mpi.rows

local function assert_relative(expected, actual, tolerance, what)
  local rel = math.abs(actual - expected) / math.abs(expected)
  assert.is_true(rel <= tolerance, string.format('%s: %.10g vs reference %.10g (relative %.3g)', what, actual, expected, rel))
end

local RANKS, STEPS, PARAMS = 2, 3, 14

-- tolerance: relative for losses and norms, absolute for parameters.
local function check_training(out, case, tolerance, param_tolerance)
  for _, key in ipairs({ 'LOSS', 'NORM' }) do
    local found = rows(out, key, case)
    assert.are.equal(RANKS * STEPS, #found, case .. ': one ' .. key .. ' line per step and rank')
    for _, r in ipairs(found) do
      assert_relative(tonumber(r[3]), tonumber(r[2]), tolerance, string.format('%s %s of step %s', case, key, r[1]))
    end
  end
  local params = rows(out, 'PARAM', case)
  assert.are.equal(RANKS * PARAMS, #params, case .. ': every parameter on every rank')
  for _, r in ipairs(params) do
    assert.is_true(tonumber(r[2]) <= param_tolerance,
      string.format('%s: %s differs from the reference by %s', case, r[1], r[2]))
  end
end

-- The buckets of the last micro-batch's backward started from the hooks, in order, during backward
-- (before the gradients of most parameters existed); the first micro-batch (sync off) started none.
local function check_overlap(out, case)
  local found = rows(out, 'OVERLAP', case)
  assert.are.equal(RANKS * STEPS, #found)
  for _, r in ipairs(found) do
    local buckets, from_hooks, early = tonumber(r[2]), tonumber(r[3]), tonumber(r[4])
    local first_seen, params = tonumber(r[6]), tonumber(r[7])
    assert.is_true(buckets >= 3, case .. ': several buckets, got ' .. buckets)
    assert.are.equal(buckets, from_hooks, case .. ': buckets started by the backward hooks')
    assert.are.equal(0, early, case .. ': buckets started during the no-sync micro-batch')
    assert.are.equal('true', r[5], case .. ': buckets started in index order')
    assert.is_true(first_seen < params / 2, string.format('%s: the first bucket started after %d of %d gradients',
      case, first_seen, params))
    assert.are.equal('true', r[8], case .. ': a bucket started after backward returned')
  end
end

describe('pmp.dist.ddp and pmp.optim.DistributedOptimizer', function()
  local out

  setup(function()
    local err, status
    out, err, status = mpi.run(RANKS, worker)
    assert.are.equal(0, status, err .. out)
  end)

  it('DP=2 with overlapped bucketed all-reduce matches one process on the global batch', function()
    check_training(out, 'ddp', 1e-5, 1e-5)
    check_overlap(out, 'ddp')
  end)

  it('overlaps with activation recompute too (parameters are read again in backward)', function()
    check_training(out, 'recompute', 1e-5, 1e-5)
    check_overlap(out, 'recompute')
  end)

  it('DP=2 with the distributed optimizer matches one process, moments included', function()
    check_training(out, 'distopt', 1e-5, 1e-5)
    check_overlap(out, 'distopt')
    local state = rows(out, 'STATE', 'distopt')
    assert.are.equal(RANKS * PARAMS * 2, #state)
    for _, r in ipairs(state) do
      local tolerance = r[2] == 'exp_avg' and 1e-6 or 1e-9
      assert.is_true(tonumber(r[3]) <= tolerance, string.format('%s of %s differs from AdamW by %s', r[2], r[1], r[3]))
    end
  end)

  it('reshards its full state into other buckets and loads it back exactly', function()
    local reshard, roundtrip = rows(out, 'RESHARD', 'distopt'), rows(out, 'ROUNDTRIP', 'distopt')
    assert.are.equal(RANKS, #reshard, 'one RESHARD line per rank')
    assert.are.equal(RANKS, #roundtrip, 'one ROUNDTRIP line per rank')
    for _, r in ipairs(reshard) do assert.are.same({ '0', '3', '0.001' }, r) end
    for _, r in ipairs(roundtrip) do assert.are.equal('0', r[1]) end
  end)

  it('trains bf16 parameters with f32 master weights close to the f32 reference', function()
    -- bf16 rounds activations and weights to 3 significant digits; a wrong update would move
    -- parameters by ~lr = 1e-3 per step in the wrong direction, and the loss by far more than 1%
    check_training(out, 'bf16', 1e-2, 1e-2)
  end)
end)

-- Data parallelism around pipeline stages (1F1B: several micro-batches' graphs alive at once; the tied
-- embedding's shards must line up between the first and last stage) and tensor-parallel parts.
describe('pmp.dist.ddp composed with pipeline and tensor parallelism', function()
  local composed = shell.root .. '/spec/dist/dp_composed_worker.lua'

  local function check(np, tp, pp, mode)
    local out, err, status = mpi.run(np, composed, { tostring(tp), tostring(pp), mode })
    assert.are.equal(0, status, err .. out)
    local what = string.format('TP=%d x PP=%d x DP=%d %s', tp, pp, np / (tp * pp), mode)
    for _, key in ipairs({ 'LOSS', 'NORM' }) do
      local found = mpi.lines(out, key)
      assert.are.equal(np * 3, #found, what .. ': ' .. key .. ' lines')
      for _, line in ipairs(found) do
        local w = words(line)
        assert_relative(tonumber(w[3]), tonumber(w[2]), 1e-5, string.format('%s %s of step %s', what, key, w[1]))
      end
    end
    local params = mpi.lines(out, 'PARAM')
    assert.is_true(#params >= np * 5, what .. ': parameters of every rank')
    for _, line in ipairs(params) do
      local w = words(line)
      assert.is_true(tonumber(w[2]) <= 1e-5, string.format('%s: %s differs from the reference by %s', what, w[1], w[2]))
    end
  end

  it('PP=2 x DP=2 matches one process, with DDP and with the distributed optimizer', function()
    check(4, 1, 2, 'ddp')
    check(4, 1, 2, 'distopt')
  end)

  it('TP=2 x PP=2 x DP=2 with the distributed optimizer matches one process', function()
    check(8, 2, 2, 'distopt')
  end)
end)

describe('pmp.dist.ddp in one process', function()
  local config = { num_layers = 2, hidden_size = 16, num_attention_heads = 2, vocab_size = 20 }

  local function pair()
    pmp.manual_seed(5)
    local a = pmp.nn.GPTModel(config)
    local b = pmp.nn.GPTModel(config)
    b:load_state_dict(a:state_dict())
    return a, b
  end

  it('accumulates micro-batches into the bucket buffers as plain backward does', function()
    local plain, model = pair()
    local ids, targets = pmp.randint(0, 20, { 4, 8 }), pmp.randint(0, 20, { 4, 8 })
    plain(ids, targets):backward()
    local ddp = ddp_module.DistributedDataParallel(model, { bucket_size = 500 })
    ddp:no_sync(function()
      local loss = model(ids:narrow(1, 1, 2), targets:narrow(1, 1, 2))
      ;(loss * 0.5):backward()
    end)
    ;(model(ids:narrow(1, 3, 2), targets:narrow(1, 3, 2)) * 0.5):backward()
    ddp:finish_grad_sync()
    local reference = plain:named_parameters()
    for k, p in ipairs(model:named_parameters()) do
      local diff = (p[2].grad - reference[k][2].grad):abs():max():item()
      assert.is_true(diff < 1e-6, p[1] .. ' gradient differs by ' .. diff)
    end
    assert.is_true(#ddp:bucket_layout() > 1)
    -- the global norm of a one-process model is the single-process norm
    assert.is_true(math.abs(pmp.dist.grad_norm(model) - pmp.optim.grad_norm(plain:parameters())) < 1e-6)
  end)

  it('names what is wrong when the optimizer and the wrapper do not fit', function()
    local _, model = pair()
    local ddp = ddp_module.DistributedDataParallel(model)
    assert.has_error(function() pmp.optim.DistributedOptimizer(model:parameters(), {}) end,
      'DistributedOptimizer: options.ddp must be the pmp.dist.ddp.DistributedDataParallel wrapping the model')
    assert.has_error(function() pmp.optim.DistributedOptimizer(model:parameters(), { ddp = ddp }) end,
      'DistributedOptimizer: the DistributedDataParallel was built without distributed_optimizer = true ' ..
      '(it all-reduces; the optimizer needs reduce-scattered buckets)')
    local other = pmp.nn.GPTModel(config)
    local sharded = ddp_module.DistributedDataParallel(other, { distributed_optimizer = true })
    local params = other:parameters()
    table.remove(params, 1)
    assert.has_error(function() pmp.optim.DistributedOptimizer(params, { ddp = sharded }) end,
      "DistributedOptimizer: parameter 'embedding.word_embeddings.weight' of the model is in no parameter group")
    assert.has_error(function() pmp.dist.clip_grad_norm(sharded, 1) end,
      'pmp.dist.clip_grad_norm: this DistributedDataParallel reduce-scatters (distributed optimizer); ' ..
      'pass the DistributedOptimizer, which holds the reduced shards')
  end)
end)
