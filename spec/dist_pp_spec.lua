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
  local seen, tied = {}, (case .. ':'):find(':tied:', 1, true) ~= nil
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

  it('PP=2 with 2 virtual stages per rank (interleaved 1F1B) matches one process, tied and untied', function()
    -- 4 layers: one per chunk; 6 layers with first_stage_layers 2: rank 0 one layer per chunk, rank 1 two
    local cases = { '4:-:-:tied:v2', '4:-:-:untied:v2', '6:2:-:untied:v2' }
    local out = run(2, { '2', '1', 'trace:2', unpack(cases) })
    for _, case in ipairs(cases) do check_case(out, case, 2, 1) end

    -- Megatron's order for PP=2, 2 chunks, 4 micro-batches (get_schedule_table with groups of pp
    -- micro-batches: (0,0) (1,0) (0,1) (1,1) (2,0) (3,0) (2,1) (3,1) as (micro-batch, chunk); backward k
    -- takes entry k with the chunk reversed; stage s warms up with 2 (pp - s - 1) + (V - 1) pp forwards)
    local traces = {}
    for _, r in ipairs(rows(out, 'TRACE')) do traces[tonumber(r[1])] = table.concat(r, ' ', 2) end
    assert.are.equal('F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0 B2.1 B3.1 B2.0 B3.0', traces[0])
    assert.are.equal('F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 F3.0 B1.0 F2.1 B2.1 F3.1 B3.1 B2.0 B3.0', traces[1])
  end)

  it('TP=2 x PP=2 matches one process, also with sequence parallelism and with virtual stages', function()
    local cases = { '4:-:-:tied', '3:1:-:untied', '4:-:-:untied:sp', '4:-:-:tied:sp:v2' }
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

  it('places the chunks of virtual stages where Megatron does', function()
    -- expected: Megatron's get_transformer_layer_offset (offset of chunk v on rank p) with its counts
    local function layout(...)
      local out = {}
      for p, chunks in ipairs(pipeline.chunk_layers(...)) do
        for v, c in ipairs(chunks) do out[#out + 1] = string.format('%d.%d:%d+%d', p - 1, v - 1, c.first, c.count) end
      end
      return table.concat(out, ' ')
    end
    assert.are.equal('0.0:0+2 0.1:4+2 1.0:2+2 1.1:6+2', layout(8, 2, 2))
    assert.are.equal('0.0:0+1 0.1:4+1 1.0:1+3 1.1:5+3', layout(8, 2, 2, 2))
    assert.are.equal('0.0:0+1 0.1:6+1 1.0:1+4 1.1:7+4 2.0:5+1 2.1:11+1', layout(12, 3, 2, 2, 2))
    assert.has_error(function() pipeline.chunk_layers(6, 2, 2) end,
      'pipeline: 6 layers cannot be split into 2 virtual stages on each of 2 stages (first stage even, last stage even layers)')
    assert.has_error(function() pipeline.chunk_layers(8, 2, 2, 3) end,
      'pipeline: 8 layers cannot be split into 2 virtual stages on each of 2 stages (first stage 3, last stage even layers)')
  end)

  it('rejects virtual stages without a pipeline, and micro-batch counts the interleaved schedule cannot run', function()
    assert.has_error(function()
      pipeline.stage(pmp.nn.GPTModel(config), { group = { rank = 0, size = 1, name = 'pp' }, virtual_stages = 2 })
    end, "pipeline.stage: virtual_stages = 2 needs a pipeline of more than one stage (group 'pp' has one rank)")
    local two_stages = { rank = 0, size = 2, name = 'pp' }
    local chunks = pipeline.stage(pmp.nn.GPTModel({ num_layers = 4, hidden_size = 16, num_attention_heads = 2,
      vocab_size = 20 }), { group = two_stages, virtual_stages = 2 })
    assert.is_true(pipeline.is_chunks(chunks))
    assert.are.equal(2, #pipeline.chunks(chunks))
    local batches = {}
    for k = 1, 3 do batches[k] = { ids = pmp.randint(0, 20, { 1, 4 }), targets = pmp.randint(0, 20, { 1, 4 }) } end
    -- no message is exchanged before these checks, so the fake group is enough
    assert.has_error(function() pipeline.forward_backward(chunks, batches, { group = two_stages }) end,
      "pipeline.forward_backward: the interleaved schedule needs a number of micro-batches that is a multiple of " ..
      "the pipeline size 2 (group 'pp'), got 3")
    assert.has_error(function() pipeline.forward_backward(chunks.items[1], batches, { group = two_stages }) end,
      "pipeline.forward_backward: the model is one chunk of a pipeline.Chunks (pass the Chunks) of stage 0 of 2 " ..
      "(call pipeline.stage with group 'pp')")
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
