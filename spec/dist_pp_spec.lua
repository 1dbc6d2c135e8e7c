require 'busted.runner'()
-- Pipeline parallelism (lua/pmp/dist/pipeline.lua): three AdamW steps of tiny GPTModels split into
-- stages under mpirun give the losses and parameters of one process accumulating gradients over the
-- same micro-batches (computed by the worker itself, spec/dist/pp_worker.lua).
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'
local pipeline = require 'pmp.dist.pipeline'

local worker = shell.root .. '/spec/dist/pp_worker.lua'

local words = mpi.words

local rows = mpi.rows

local function assert_close(expected, actual, what)
  local rel = math.abs(actual - expected) / math.abs(expected)
  assert.is_true(rel <= 1e-5, string.format('%s: %.10g vs reference %.10g (relative %.3g)', what, actual, expected, rel))
end

-- copies: ranks holding each stage's parameters (the tensor-parallel size); world: processes.
local function check_case(out, case, world, copies)
  local losses = rows(out, 'LOSS', case)
  assert.are.equal(3 * copies, #losses, case .. ': one LOSS line per step from each last-stage rank')
  for _, r in ipairs(losses) do assert_close(tonumber(r[3]), tonumber(r[2]), case .. ' loss of step ' .. r[1]) end

  local val = rows(out, 'VALLOSS', case)
  assert.are.equal(copies, #val)
  for _, r in ipairs(val) do assert_close(tonumber(r[2]), tonumber(r[1]), case .. ' forward_only loss') end

  -- forward_backward returns the loss on the last stage only; broadcast_loss gives it to every rank
  local broadcast, returned = rows(out, 'BLOSS', case), 0
  assert.are.equal(world, #broadcast)
  for _, r in ipairs(broadcast) do
    if r[2] == 'number' then returned = returned + 1 end
    assert_close(tonumber(r[4]), tonumber(r[3]), case .. ' broadcast loss on rank ' .. r[1])
  end
  assert.are.equal(copies, returned)

  -- every reference parameter lives on exactly one stage (the tied embedding on the first and last),
  -- with the reference's values
  local seen, tied = {}, case:match(':tied$') ~= nil
  for _, r in ipairs(rows(out, 'PARAM', case)) do
    seen[r[1]] = (seen[r[1]] or 0) + 1
    assert.is_true(tonumber(r[2]) <= 1e-5, string.format('%s: %s differs from the reference by %s', case, r[1], r[2]))
  end
  local names = 0
  for name, n in pairs(seen) do
    names = names + 1
    local expected = (tied and name == 'embedding.word_embeddings.weight') and 2 * copies or copies
    assert.are.equal(expected, n, case .. ': copies of ' .. name)
  end
  assert.are.equal(tonumber(rows(out, 'NREF', case)[1][1]), names, case .. ': parameters covered by the stages')
end

local function run(np, args)
  local out, err, status = mpi.run(np, worker, args)
  assert.are.equal(0, status, err .. out)
  return out
end

describe('pmp.dist.pipeline', function()
  it('PP=2 matches one process: tied embeddings on 2+2 layers, untied on 1+2 (first_stage_layers)', function()
    local cases = { '4:-:-:tied', '3:1:-:untied' }
    local out = run(2, { '2', '1', unpack(cases) })
    for _, case in ipairs(cases) do check_case(out, case, 2, 1) end
  end)

  it('PP=4 matches one process, tied and untied, one layer per stage', function()
    local cases = { '4:-:-:tied', '4:-:-:untied' }
    local out = run(4, { '4', '1', unpack(cases) })
    for _, case in ipairs(cases) do check_case(out, case, 4, 1) end
  end)

  it('TP=2 x PP=2 matches one process, also with sequence parallelism', function()
    local cases = { '4:-:-:tied', '3:1:-:untied', '4:-:-:untied:sp' }
    local out = run(4, { '2', '2', unpack(cases) })
    for _, case in ipairs(cases) do check_case(out, case, 4, 2) end
  end)

  it('keeps memory bounded by the micro-batches in flight, not by their number (1F1B)', function()
    local out = run(2, { '2', '1', 'memory' })
    local peaks = mpi.lines(out, 'PEAK')
    assert.are.equal(2, #peaks)
    for _, line in ipairs(peaks) do
      local w = words(line)
      local two, eight = tonumber(w[2]), tonumber(w[3])
      assert.is_true(eight < 1.5 * two, string.format('rank %s: peak %d bytes with 8 micro-batches, %d with 2', w[1], eight, two))
    end
  end)

  local config = { num_layers = 3, hidden_size = 16, num_attention_heads = 2, vocab_size = 20 }

  it('rejects a layer split that does not divide', function()
    local two_stages = { rank = 0, size = 2, name = 'pp' }   -- stage() only reads the group's rank and size
    assert.has_error(function() pipeline.stage(pmp.nn.GPTModel(config), { group = two_stages }) end,
      'pipeline: 3 layers cannot be split into 2 stages (first stage even, last stage even layers)')
    assert.has_error(function()
      pipeline.stage(pmp.nn.GPTModel(config), { group = two_stages, first_stage_layers = 4 })
    end, 'pipeline: 3 layers cannot be split into 2 stages (first stage 4, last stage even layers)')
  end)

  it('is plain gradient accumulation with a single stage', function()
    pmp.manual_seed(3)
    local model = pmp.nn.GPTModel(config)
    local n = #model:parameters()
    local batches = {}
    for k = 1, 3 do batches[k] = { ids = pmp.randint(0, 20, { 2, 8 }), targets = pmp.randint(0, 20, { 2, 8 }) } end
    assert.are.equal(model, pipeline.stage(model))
    assert.are.equal(n, #model:parameters())
    local loss = pipeline.forward_backward(model, batches)
    pipeline.sync_embedding_grads(model)
    local grads = {}
    for k, p in ipairs(model:parameters()) do grads[k] = p.grad:clone() end
    model:zero_grad()
    local sum = 0
    for _, mb in ipairs(batches) do
      local l = model(mb.ids, mb.targets)
      sum = sum + l:item()
      ;(l * (1 / 3)):backward()
    end
    assert.are.equal(sum / 3, loss)
    assert.are.equal(loss, pipeline.broadcast_loss(loss))
    for k, p in ipairs(model:parameters()) do assert.are.equal(0, (p.grad - grads[k]):abs():max():item()) end
  end)
end)
