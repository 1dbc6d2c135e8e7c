require 'busted.runner'()
-- BLOOM and Baichuan2-13B (ALiBi; Baichuan2's NormHead over a vocabulary split across ranks) train under
-- tensor parallelism (TP=2 with sequence parallelism: each rank its heads' slopes) and pipeline
-- parallelism (PP=2), and with each sequence split over a context-parallel group (CP=2), to the losses
-- of one process doing the same steps, on pretraining, left-padded and packed SFT batches:
-- spec/dist/family_dist_worker.lua computes both and prints them.
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'

local worker = shell.root .. '/spec/dist/family_dist_worker.lua'
local NAMES = { 'bloom', 'baichuan2_13b' }

-- tp == 'cp': a context-parallel group of pp ranks
local function check(tp, pp)
  local args = { 'zoo_alibi', tostring(tp), tostring(pp) }
  for _, name in ipairs(NAMES) do args[#args + 1] = name end
  local out, err, status = mpi.run(tp == 'cp' and pp or tp * pp, worker, args)
  assert.are.equal(0, status, err .. out)
  local seen = 0
  for _, r in ipairs(mpi.rows(out, 'LOSS')) do
    local got, want = tonumber(r[4]), tonumber(r[5])
    assert.is_true(math.abs(got - want) <= 1e-5 * math.abs(want),
      string.format('%s %s step %s: loss %s, one process %s', r[1], r[2], r[3], r[4], r[5]))
    seen = seen + 1
  end
  assert.are.equal(3 * 3 * #NAMES, seen, 'one LOSS line per family, kind and step')
end

describe('ALiBi families in parallel', function()
  it('TP=2 with sequence parallelism gives the losses of one process: pretraining, left-padded and packed SFT batches', function() check(2, 1) end)
  it('PP=2 gives the losses of one process: pretraining, left-padded and packed SFT batches', function() check(1, 2) end)
  it('CP=2 gives the losses of one process: pretraining, left-padded and packed SFT batches (ALiBi over the gathered keys)', function()
    check('cp', 2)
  end)
end)
