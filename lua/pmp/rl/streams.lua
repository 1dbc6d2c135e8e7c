--- Keyed random streams: numbers that depend only on a key such as (seed, iteration, prompt index), not
--- on what drew random numbers before. Data-parallel ranks and a single process then draw the same data
--- order and the same samples for the same prompt, and a resumed run the same as an uninterrupted one.
---   local key = streams.key(opts.seed, 'order', pass)       -- a 64-bit seed (uint64 cdata)
---   local keys = streams.draw(key, function() return pmp.rand(n, { dtype = 'f64' }) end)
local ffi = require 'ffi'
local C = require('pmp.ffi').C

local M = {}

local FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325ULL, 0x100000001B3ULL

-- strings hashed to a number so that a key can name its purpose ('order', 'sample', ...)
local function as_number(part)
  if type(part) == 'string' then
    local h = FNV_OFFSET
    for k = 1, #part do h = (h * FNV_PRIME + part:byte(k)) end
    return h
  end
  if type(part) ~= 'number' or part ~= math.floor(part) or part < 0 then
    error('pmp.rl.streams.key: parts must be strings or non-negative integers, got ' .. tostring(part), 3)
  end
  return ffi.new('uint64_t', part)
end

--- A 64-bit seed from its parts (strings or non-negative integers), different for different parts.
function M.key(...)
  local h = FNV_OFFSET
  for k = 1, select('#', ...) do h = (h * FNV_PRIME) + as_number(select(k, ...)) + 1 end
  return h
end

--- fn(...) run with pmp's generator seeded by key (pmp.manual_seed's splitmix64 scrambles it); the
--- generator is restored afterwards, so the caller's stream goes on as if nothing had drawn.
function M.draw(key, fn, ...)
  local saved = ffi.new('uint64_t[4]')
  C.pmp_rng_get_state(saved)
  C.pmp_manual_seed(key)
  local ok, result = pcall(fn, ...)
  C.pmp_rng_set_state(saved)
  if not ok then error(result, 0) end
  return result
end

return M
