require 'busted.runner'()
-- Context parallelism (lua/pmp/nn/context_parallel.lua): spec/dist/cp_worker.lua trains a tiny
-- Llama-style GPTModel (GQA; a sliding window shorter than the sequence; packed documents) on CP=2 and
-- on CP=2 x TP=2 with sequence parallelism, and compares, in the same process, with one process on the
-- same global batch. A CP run's checkpoint is then loaded by one process.
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'

local worker = shell.root .. '/spec/dist/cp_worker.lua'
local CASES = { 'gqa', 'window', 'packed' }
local rows = mpi.rows

local function check(out)
  local gather = rows(out, 'GATHER')
  assert.are.equal(1, #gather, out)
  assert.is_true(tonumber(gather[1][1]) == 0, 'gather_sequence forward differs by ' .. gather[1][1])
  assert.is_true(tonumber(gather[1][2]) <= 1e-6, 'gather_sequence backward differs by ' .. gather[1][2])

  local losses = rows(out, 'LOSS')
  assert.are.equal(#CASES * 3, #losses, 'one LOSS line per case and step')
  for _, r in ipairs(losses) do
    assert.is_true(tonumber(r[5]) <= 1e-5 * math.abs(tonumber(r[4])), string.format(
      '%s step %s: loss %s vs one process %s', r[1], r[2], r[3], r[4]))
  end
  -- the first step's gradients (through the K/V gather's backward and the cp average) and the
  -- parameters after three steps, every parameter of every case
  local grads, params = rows(out, 'GRAD'), rows(out, 'PARAM')
  assert.is_true(#grads >= #CASES * 10, 'GRAD lines: ' .. #grads)
  assert.are.equal(#grads, #params)
  for _, r in ipairs(grads) do
    assert.is_true(tonumber(r[3]) <= 1e-5 * tonumber(r[4]), string.format('%s: gradient of %s differs by %s (largest %s)',
      r[1], r[2], r[3], r[4]))
  end
  for _, r in ipairs(params) do
    assert.is_true(tonumber(r[3]) <= 1e-5, string.format('%s: %s differs by %s', r[1], r[2], r[3]))
  end

  local errors = {}
  for _, r in ipairs(rows(out, 'ERROR')) do errors[r[1]] = table.concat(r, ' ', 2) end
  assert.truthy((errors.split or ''):find('length must be divisible by 4, got 14', 1, true), errors.split)
  assert.truthy((errors.forward or ''):find('its length must be even, got 7', 1, true), errors.forward)
end

describe('context parallelism', function()
  local dir
  setup(function() dir = shell.temp_dir() end)
  teardown(function() shell.remove_dir(dir) end)

  it('CP=2 trains like one process, and its checkpoint loads in one process', function()
    local out, err, status = mpi.run(2, worker, { '1', dir })
    assert.are.equal(0, status, err .. out)
    check(out)
    out, err, status = shell.run(shell.quote(shell.pmp) .. ' ' .. shell.quote(worker) .. ' load ' .. shell.quote(dir))
    assert.are.equal(0, status, err .. out)
    local ckpt = {}
    for _, r in ipairs(rows(out, 'CKPT')) do ckpt[r[1]] = tonumber(r[2]) end
    assert.is_true(ckpt.params ~= nil and ckpt.params <= 1e-5, 'loaded parameters differ by ' .. tostring(ckpt.params))
    assert.is_true(ckpt.exp_avg ~= nil and ckpt.exp_avg <= 1e-4, 'loaded Adam moments differ by ' .. tostring(ckpt.exp_avg))
  end)

  it('CP=2 x TP=2 (sequence parallel in two cases) trains like one process', function()
    local out, err, status = mpi.run(4, worker, { '2' })
    assert.are.equal(0, status, err .. out)
    check(out)
  end)
end)
