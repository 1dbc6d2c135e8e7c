require 'busted.runner'()
-- The LayerNorm-era families (OPT, GPT-BigCode, StarCoder 2, Falcon) train under tensor parallelism with
-- sequence parallelism (learned position embeddings, LayerNorm biases, parallel attention and MLP) and
-- under pipeline parallelism to the losses of one process: spec/dist/zoo_ln_worker.lua trains each
-- checkpoint both ways on the same micro-batches. The split models' Megatron-layout checkpoints load
-- back in one process bit for bit.
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'
local expect = require 'spec.support.expect'

local worker = shell.root .. '/spec/dist/zoo_ln_worker.lua'
-- multi-query models (one KV head) cannot be split over two tensor-parallel ranks, as in Megatron
local SPLITTABLE = { 'opt_post', 'gpt_bigcode_mha', 'starcoder2', 'falcon_new', 'falcon_seq' }
local ALL = { 'opt', 'opt_post', 'gpt_bigcode', 'gpt_bigcode_mha', 'starcoder2', 'falcon', 'falcon_new', 'falcon_seq' }

local FIXTURES = shell.root .. '/spec/fixtures/zoo_ln/'

-- Each name's Megatron-layout checkpoint under dir (saved by the worker from its split model) loads in
-- one process to exactly the checkpoint's weights.
local function check_checkpoints(dir, names)
  for _, name in ipairs(names) do
    local loaded = pmp.checkpoint.load_model(dir .. '/' .. name)
    local want = pmp.models.from_pretrained(FIXTURES .. name):state_dict()
    local got = loaded:state_dict()
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

  it('refuses to split a multi-query model over two tensor-parallel ranks, naming num_query_groups', function()
    local model = pmp.models.from_pretrained(shell.root .. '/spec/fixtures/zoo_ln/falcon')
    expect.fails_with(function() require('pmp.dist.sharding').check_config(model.config, 2) end, 'num_query_groups (1)')
  end)
end)
