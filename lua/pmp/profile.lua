--- Where a step's time goes, op by op: the engine times every kernel while the profiler is on.
---
---   pmp.profile.start()
---   ... a few training steps ...
---   print(pmp.profile.report())     -- ops by total time, and the share spent outside kernels
---
--- Times are wall clock on the calling thread, so a kernel's time includes its parallel region.
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local clock = require 'pmp.clock'

local profile = {}
local started_at, stopped_at

--- Clears the counters and starts timing every kernel.
function profile.start()
  C.pmp_profile_reset()
  C.pmp_profile_enable(1)
  started_at, stopped_at = clock.now(), nil
end

--- Stops timing; results() and report() keep what was measured.
function profile.stop()
  C.pmp_profile_enable(0)
  stopped_at = stopped_at or clock.now()
end

--- {op =, calls =, seconds =} for every op that ran, slowest first, and the wall time since start().
function profile.results()
  local rows, calls, ns = {}, ffi.new('int64_t[1]'), ffi.new('int64_t[1]')
  for op = 0, C.PMP_OP_COUNT - 1 do
    C.pmp_profile_read(op, calls, ns)
    if calls[0] > 0 then
      rows[#rows + 1] = { op = ffi.string(C.pmp_op_name(op)), calls = tonumber(calls[0]), seconds = tonumber(ns[0]) * 1e-9 }
    end
  end
  table.sort(rows, function(a, b) return a.seconds > b.seconds end)
  local wall = started_at and ((stopped_at or clock.now()) - started_at) or 0
  return rows, wall
end

--- A table of ops by total time with calls, time per call and share of the wall time, as text.
function profile.report()
  local rows, wall = profile.results()
  local lines = { string.format('%-24s %8s %11s %10s %7s', 'op', 'calls', 'total ms', 'us/call', 'share') }
  local in_kernels = 0
  local function share(s) return wall > 0 and string.format('%6.1f%%', 100 * s / wall) or '      -' end
  for _, r in ipairs(rows) do
    in_kernels = in_kernels + r.seconds
    lines[#lines + 1] = string.format('%-24s %8d %11.2f %10.1f %s', r.op, r.calls, r.seconds * 1e3,
      r.seconds * 1e6 / r.calls, share(r.seconds))
  end
  lines[#lines + 1] = string.format('%-24s %8s %11.2f %10s %s', '(outside kernels)', '', (wall - in_kernels) * 1e3, '',
    share(wall - in_kernels))
  lines[#lines + 1] = string.format('%-24s %8s %11.2f', '(wall)', '', wall * 1e3)
  return table.concat(lines, '\n')
end

return profile
