--- Wall-clock time in seconds (monotonic), for throughput and ETA.
local ffi = require 'ffi'
ffi.cdef [[
typedef struct pmp_clock_timespec { long tv_sec; long tv_nsec; } pmp_clock_timespec;
int clock_gettime(int clock_id, pmp_clock_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local now_buffer = ffi.new('pmp_clock_timespec')

return {
  now = function()
    ffi.C.clock_gettime(CLOCK_MONOTONIC, now_buffer)
    return tonumber(now_buffer.tv_sec) + tonumber(now_buffer.tv_nsec) * 1e-9
  end,
}
