require 'busted.runner'()
-- Checkpoints loaded into another layout in bounded memory: pmp's own (saved with TP=2 x PP=2 or by
-- one process) and Megatron-LM's legacy ones (spec/fixtures/megatron, written by Megatron-Core) are
-- copied from the mapped files straight into the parameters, each saved tensor once and a resharded one
-- piece by piece. The engine allocator's peak during a load (pmp.memory) is measured by
-- spec/dist/bounded_load_worker.lua: into a model built beforehand it stays within one tensor's bytes
-- (joining the saved parts and cutting them again held about two copies of the part), and a load that
-- builds the whole model within the model's bytes plus one tensor's.
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'
local expect = require 'spec.support.expect'
local sharding = require 'pmp.dist.sharding'

local worker = shell.root .. '/spec/dist/bounded_load_worker.lua'

local function run(np, args)
  local out, err, status
  if np == 1 then
    local quoted = { shell.quote(shell.pmp), shell.quote(worker) }
    for _, a in ipairs(args) do quoted[#quoted + 1] = shell.quote(a) end
    out, err, status = shell.run(table.concat(quoted, ' '))
  else
    out, err, status = mpi.run(np, worker, args)
  end
  assert.are.equal(0, status, err .. out)
  assert.are.same({}, mpi.lines(out, 'DIFFER'), 'loaded parameters that are not the reference\'s part')
  return out
end

-- Every rank's PEAK line: extra <= (whole model's bytes, when the load builds it) + its largest tensor.
local function check_peaks(out, np, builds_model)
  local peaks = mpi.rows(out, 'PEAK')
  assert.are.equal(np, #peaks, out)
  for _, r in ipairs(peaks) do
    local extra, model, largest = tonumber(r[2]), tonumber(r[3]), tonumber(r[4])
    local bound = (builds_model and model or 0) + largest
    assert.is_true(extra <= bound, string.format('rank %s: the load allocated %d bytes at its peak; the bound is %d ' ..
      '(model %d, largest tensor %d)', r[1], extra, bound, model, largest))
  end
end

local with_mpi = mpi.available and it or pending
describe('checkpoint loads into another layout in bounded memory', function()
  local dir
  setup(function() dir = shell.temp_dir() end)
  teardown(function() shell.remove_dir(dir) end)

  with_mpi('pmp checkpoints: TP=2 x PP=2 into one process, into PP=2; one process into TP=2', function()
    run(4, { 'save', dir .. '/tp2pp2', '2', '2' })
    run(1, { 'save', dir .. '/one', '1', '1' })
    check_peaks(run(1, { 'whole', dir .. '/tp2pp2' }), 1, true)
    check_peaks(run(2, { 'load', dir .. '/tp2pp2', '1', '2' }), 2, false)
    check_peaks(run(2, { 'load', dir .. '/one', '2', '1' }), 2, false)
  end)

  it('a Megatron-LM TP=2 x PP=2 checkpoint into one process', function()
    check_peaks(run(1, { 'megatron', shell.root .. '/spec/fixtures/megatron/tp2_pp2' }), 1, true)
  end)
end)

describe('sharding.copy_part', function()
  local config = { activation = 'swiglu' }
  -- the reference: the whole tensor joined from the saved parts (cat) and cut again (narrow)
  local function reference(name, parts, tp, rank) return sharding.shard(name, sharding.unshard(name, parts, config), config, tp, rank) end

  it('copies every part of every TP size from every saved TP size, bit for bit', function()
    pmp.manual_seed(3)
    local names = { ['decoder.layers.0.self_attention.linear_qkv.weight'] = { 24, 6 },   -- rows
      ['decoder.layers.0.self_attention.linear_proj.weight'] = { 6, 24 },                -- columns
      ['decoder.layers.0.mlp.linear_fc1.weight'] = { 48, 6 },                            -- [gate; up] halves
      ['decoder.layers.0.input_layernorm.weight'] = { 6 } }                              -- replicated
    for name, shape in pairs(names) do
      local whole = pmp.randn(shape)
      for _, saved_tp in ipairs({ 1, 2, 4 }) do
        local parts = {}
        for r = 0, saved_tp - 1 do parts[r + 1] = sharding.shard(name, whole, config, saved_tp, r) end
        for _, tp in ipairs({ 1, 2, 4 }) do
          for rank = 0, tp - 1 do
            local dst = pmp.full(sharding.shard_shape(name, shape, config, tp), 7)
            local asked = {}
            sharding.copy_part(name, dst, function(r) asked[#asked + 1] = r return parts[r + 1] end, saved_tp, tp, rank, config)
            assert(expect.same_bits(reference(name, parts, tp, rank), dst), string.format('%s from %d into %d/%d', name, saved_tp,
              rank, tp))
            -- only the saved parts that overlap are read (saved part 0 gives the sizes)
            local rule = sharding.rule(name, config)
            local most = rule and (rule.gated and 2 or 1) * math.max(1, saved_tp / tp) + 1 or 1
            assert.is_true(#asked <= most, string.format('%s from %d into %d/%d asked %d parts', name, saved_tp, rank, tp, #asked))
          end
        end
      end
    end
  end)

  it('re-pads a vocabulary table: the true vocabulary\'s rows, zeros after them', function()
    local name, vocab = 'embedding.word_embeddings.weight', 5
    local whole = pmp.randn({ 8, 3 })   -- saved with 8 rows, 5 of them the vocabulary
    local parts = { whole:narrow(1, 1, 4):contiguous(), whole:narrow(1, 5, 4):contiguous() }
    local padded = pmp.zeros({ 12, 3 })   -- the model pads to 12
    padded:narrow(1, 1, vocab):copy_(whole:narrow(1, 1, vocab))
    for _, tp in ipairs({ 1, 2, 3 }) do
      for rank = 0, tp - 1 do
        local dst = pmp.full({ 12 / tp, 3 }, 7)
        sharding.copy_part(name, dst, function(r) return parts[r + 1] end, 2, tp, rank, config, vocab)
        assert(expect.same_bits(padded:narrow(1, 1 + rank * 12 / tp, 12 / tp):contiguous(), dst), 'rank ' .. rank .. ' of ' .. tp)
      end
    end
  end)
end)
