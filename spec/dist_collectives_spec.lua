-- Collectives between MPI processes (core/dist/dist.c, lua/pmp/dist): results against sums each rank
-- computes itself in f64, Megatron's group layout, and the failures that must end a job quickly.
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'
local pio = require 'pmp.io'

local worker = shell.root .. '/spec/dist/'

local function count(text, pattern)
  local n = 0
  for _ in text:gmatch(pattern) do n = n + 1 end
  return n
end

describe('pmp.dist collectives', function()
  for _, np in ipairs({ 2, 3 }) do
    it('agree with reference reductions for every dtype and op on ' .. np .. ' processes', function()
      local reports = shell.temp_dir()
      finally(function() shell.remove_dir(reports) end)
      local _, err, status = mpi.run(np, worker .. 'collectives_worker.lua', { reports })
      assert.are.equal(0, status, err)
      local out = ''
      for rank = 0, np - 1 do out = out .. pio.read_file(reports .. '/rank' .. rank) end
      local failures = {}
      for line in out:gmatch('FAIL[^\n]*') do failures[#failures + 1] = line end
      assert.are.same({}, failures)
      -- every rank ran every check: all_reduce (4 float dtypes x 4 ops + 2 ints x 3 + u8 x 3 + bool x 2,
      -- three sizes, each with an identity check), 3 gathers, 3 scatters, one strided, np broadcasts,
      -- send/recv, async, stats
      local per_rank = (4 * 4 + 2 * 3 + 3 + 2) * 3 * 2 + 3 + 3 + 1 + np + 1 + 1 + 1
      assert.are.equal(per_rank * np, count(out, 'OK [^\n]*'))
    end)
  end

  it('runs as one process without mpirun', function()
    local out, err, status = shell.run_pmp({ worker .. 'collectives_worker.lua' })
    assert.are.equal(0, status, err)
    assert.are.equal(0, count(out, 'FAIL'))
    assert.is_true(count(out, 'OK ') > 100)
  end)

  it("build Megatron's groups: tensor-parallel ranks adjacent, pipeline outermost", function()
    -- Megatron-LM's initialize_model_parallel docstring layout, for 8 processes with TP=2, PP=2 (DP=2)
    local out, err, status = mpi.run(8, worker .. 'groups_worker.lua', { '2', '2' })
    assert.are.equal(0, status, err)
    local expected = {
      tp = { { 0, 1 }, { 2, 3 }, { 4, 5 }, { 6, 7 } },
      dp = { { 0, 2 }, { 1, 3 }, { 4, 6 }, { 5, 7 } },
      pp = { { 0, 4 }, { 1, 5 }, { 2, 6 }, { 3, 7 } },
      mp = { { 0, 1, 4, 5 }, { 2, 3, 6, 7 } },
      embedding = { { 0, 4 }, { 1, 5 }, { 2, 6 }, { 3, 7 } },
    }
    local seen = {}
    for rank, name, members in out:gmatch('GROUP (%d+) (%S+) (%S+)') do
      seen[name] = seen[name] or {}
      seen[name][tonumber(rank)] = members
    end
    for name, groups in pairs(expected) do
      for _, group in ipairs(groups) do
        for _, r in ipairs(group) do
          assert.are.equal(table.concat(group, ','), seen[name] and seen[name][r], name .. ' group of rank ' .. r)
        end
      end
    end
    -- a middle pipeline stage is in no embedding group: 3 stages of TP=2 on 6 processes
    out, err, status = mpi.run(6, worker .. 'groups_worker.lua', { '2', '3' })
    assert.are.equal(0, status, err)
    assert.truthy(out:find('GROUP 2 embedding %-'))
    assert.truthy(out:find('GROUP 0 embedding 0,4\n'))
    assert.truthy(out:find('GROUP 2 pp 0,2,4\n'))
  end)

  -- What each rank issues in failure_worker.lua's modes, as the engine describes a collective.
  local issued = {
    size = function(rank) return string.format('all_reduce of %d f32 elements (sum)', 4 + rank) end,
    op = function(rank) return rank == 0 and 'all_reduce of 4 f32 elements (sum)' or 'all_gather of 4 f32 elements' end,
    dtype = function(rank) return string.format('all_reduce of 4 %s elements (sum)', rank == 0 and 'f32' or 'bf16') end,
  }
  -- Which rank notices first depends on timing: every report must name a neighbour on the ring that
  -- issued something else, each side described as that rank issued it.
  local function assert_mismatch_reports(mode, err)
    local reports = 0
    for rank, mine, peer, theirs in err:gmatch('%(rank (%d) of 3, world rank %d%): mismatched collectives: ' ..
        'this rank issued ([^\n]-), rank (%d) issued ([^\n]-)\n') do
      rank, peer = tonumber(rank), tonumber(peer)
      reports = reports + 1
      assert.are.equal(issued[mode](rank), mine, 'what rank ' .. rank .. ' issued, in:\n' .. err)
      assert.are.equal(issued[mode](peer), theirs, 'what rank ' .. peer .. ' issued, in:\n' .. err)
      assert.are.equal(1, math.min((rank - peer) % 3, (peer - rank) % 3), 'a ring neighbour of ' .. rank)
      assert.are_not.equal(mine, theirs)
    end
    assert.is_true(reports > 0, 'no mismatch reported:\n' .. err)
  end

  for _, mode in ipairs({ 'size', 'op', 'dtype' }) do
    it('end the job with a message naming rank, group and op: ' .. mode, function()
      local started = os.time()
      local out, err, status = mpi.run(3, worker .. 'failure_worker.lua', { mode, '3' })
      assert.are_not.equal(0, status)
      assert_mismatch_reports(mode, err)
      assert.is_nil(out:find('FINISHED 0'))
      assert.is_true(os.time() - started < 25, 'took ' .. (os.time() - started) .. ' s')
    end)
  end

  it('end the job with a message naming rank, group and op: silent', function()
    local started = os.time()
    local out, err, status = mpi.run(3, worker .. 'failure_worker.lua', { 'silent', '3' })
    assert.are_not.equal(0, status)
    -- ranks 0 and 1 both wait on rank 2, which never joins; either may give up first
    assert.truthy(err:find("all_reduce on group 'world' %(rank ([01]) of 3, world rank %1%): no progress within 3 s"), err)
    assert.is_nil(out:find('FINISHED 0'))
    assert.is_true(os.time() - started < 25, 'took ' .. (os.time() - started) .. ' s')
  end)

  it('end the job when a peer dies', function()
    local started = os.time()
    local _, _, status = mpi.run(3, worker .. 'failure_worker.lua', { 'dead', '60' })
    assert.are_not.equal(0, status)
    assert.is_true(os.time() - started < 25, 'took ' .. (os.time() - started) .. ' s')
  end)
end)
