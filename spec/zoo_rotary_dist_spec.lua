require 'busted.runner'()
-- The rotary families (models/glm.lua, glm4.lua, qwen.lua, chatglm.lua) train under tensor parallelism
-- (TP=2 with sequence parallelism), pipeline parallelism (PP=2) and context parallelism (CP=2) to the
-- losses of one process doing
-- the same steps, on pretraining, left-padded and packed SFT batches: spec/dist/family_dist_worker.lua
-- computes both and prints them.
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'

local worker = shell.root .. '/spec/dist/family_dist_worker.lua'
local NAMES = { 'glm', 'glm4', 'qwen', 'chatglm' }

-- tp == 'cp': a context-parallel group of pp ranks
local function check(tp, pp)
  local args = { 'zoo_rotary', tostring(tp), tostring(pp) }
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

describe('rotary families in parallel', function()
  it('TP=2 with sequence parallelism gives the losses of one process: pretraining, left-padded and packed SFT batches', function() check(2, 1) end)
  it('PP=2 gives the losses of one process: pretraining, left-padded and packed SFT batches', function() check(1, 2) end)
  it('CP=2 gives the losses of one process: pretraining, left-padded and packed SFT batches', function() check('cp', 2) end)
end)
