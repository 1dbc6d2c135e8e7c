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
