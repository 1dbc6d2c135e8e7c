require 'busted.runner'()
-- The LayerNorm-era families (OPT, GPT-BigCode, StarCoder 2, Falcon, Falcon-RW with ALiBi) train under
-- tensor parallelism with sequence parallelism (learned position embeddings, LayerNorm biases, parallel
-- attention and MLP, each rank's share of the ALiBi slopes) and under pipeline parallelism to the losses
-- of one process: spec/dist/zoo_ln_worker.lua trains each checkpoint both ways on the same micro-batches.
-- The split models' Megatron-layout checkpoints load back in one process bit for bit, with their
-- positions' config; Falcon-RW also trains with each sequence split over a context-parallel group.
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'
local expect = require 'spec.support.expect'

local worker = shell.root .. '/spec/dist/zoo_ln_worker.lua'
-- multi-query models (one KV head) cannot be split over two tensor-parallel ranks, as in Megatron
local SPLITTABLE = { 'opt_post', 'opt_proj', 'gpt_bigcode_mha', 'starcoder2', 'falcon_new', 'falcon_seq', 'falcon_alibi' }
local ALL = { 'opt', 'opt_post', 'opt_proj', 'gpt_bigcode', 'gpt_bigcode_mha', 'starcoder2', 'falcon', 'falcon_new', 'falcon_seq',
  'falcon_alibi' }

local FIXTURES = shell.root .. '/spec/fixtures/zoo_ln/'

-- Each name's Megatron-layout checkpoint under dir (saved by the worker from its split model) loads in
-- one process to exactly the checkpoint's weights.
local function check_checkpoints(dir, names)
  for _, name in ipairs(names) do
    local loaded = pmp.checkpoint.load_model(dir .. '/' .. name)
    local original = pmp.models.from_pretrained(FIXTURES .. name)
    for _, key in ipairs({ 'position_embedding_type', 'alibi_slope_scale', 'alibi_bias_hf_falcon_bf16' }) do
      assert.are.equal(original.config[key], loaded.config[key], name .. ': ' .. key)
    end
    local want, got = original:state_dict(), loaded:state_dict()
    for key, t in pairs(want) do
      assert(got[key] ~= nil and expect.same_bits(t, got[key]), name .. ': ' .. key .. ' differs after the round trip')
    end
    for key in pairs(got) do assert(want[key] ~= nil, name .. ': unexpected ' .. key) end
  end
end

local function check(np, args, names)
  local dir = shell.temp_dir()
  local out, err, status = mpi.run(np, worker, args, { ZOO_LN_CHECKPOINTS = dir })
  assert.are.equal(0, status, err .. out)
  local seen = 0
  for _, r in ipairs(mpi.rows(out, 'LOSS')) do
    local got, want = tonumber(r[3]), tonumber(r[4])
    assert.is_true(math.abs(got - want) <= 1e-5 * math.abs(want),
      string.format('%s step %s: loss %s, one process %s', r[1], r[2], r[3], r[4]))
    seen = seen + 1
  end
  assert.are.equal(#names * 3, seen, out)
  check_checkpoints(dir, names)
  shell.remove_dir(dir)
end

local run = mpi.available and it or pending
describe('zoo families under mpirun', function()
  run('TP=2 with sequence parallelism gives the single-process losses; its checkpoints load back', function()
    local args = { '2', '1', 'sp' }
    for _, name in ipairs(SPLITTABLE) do args[#args + 1] = name end
    check(2, args, SPLITTABLE)
  end)

  run('PP=2 gives the single-process losses; its checkpoints load back', function()
    local args = { '1', '2', '-' }
    for _, name in ipairs(ALL) do args[#args + 1] = name end
    check(2, args, ALL)
  end)

  -- Falcon-RW's scaled ALiBi slopes over keys gathered from the context-parallel group
  run('CP=2 gives Falcon-RW\'s single-process losses: pretraining, left-padded and packed SFT batches', function()
    local out, err, status = mpi.run(2, shell.root .. '/spec/dist/family_dist_worker.lua', { 'zoo_ln', 'cp', '2', 'falcon_alibi' })
    assert.are.equal(0, status, err .. out)
    local rows = mpi.rows(out, 'LOSS')
    for _, r in ipairs(rows) do
      local got, want = tonumber(r[4]), tonumber(r[5])
      assert.is_true(math.abs(got - want) <= 1e-5 * math.abs(want),
        string.format('%s %s step %s: loss %s, one process %s', r[1], r[2], r[3], r[4], r[5]))
    end
    assert.are.equal(3 * 3, #rows, 'one LOSS line per kind and step')
  end)

  -- OPT-350m's projections: project_in travels with the embedding, project_out with the output layer
  it('puts the word-embedding projections on the first and last pipeline stage', function()
    local function stage_names(rank)
      local model = pmp.models.from_pretrained(FIXTURES .. 'opt_proj')
      require('pmp.dist.pipeline').stage(model, { group = { rank = rank, size = 2, name = 'pp' } })
      local names = {}
      for _, pair in ipairs(model:named_parameters()) do names[pair[1]] = pair[2].shape end
      return names
    end
    local first, last = stage_names(0), stage_names(1)
    assert.are.same({ 32, 16 }, first['embedding.input_projection.weight'])
    assert.is_nil(first['output_projection.weight'])
    assert.are.same({ 16, 32 }, last['output_projection.weight'])
    assert.is_nil(last['embedding.input_projection.weight'])
    -- the last stage's copy of the tied word embeddings is as narrow as the embeddings
    assert.are.equal(16, last['output_layer.weight'][2])
  end)

  it('refuses to split a multi-query model over two tensor-parallel ranks, naming num_query_groups', function()
    local model = pmp.models.from_pretrained(shell.root .. '/spec/fixtures/zoo_ln/falcon')
    expect.fails_with(function() require('pmp.dist.sharding').check_config(model.config, 2) end, 'num_query_groups (1)')
  end)
end)
