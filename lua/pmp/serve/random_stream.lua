--- pmp.serve.random_stream: a seeded stream of uniform numbers that belongs to one sequence, so what a
--- sampled request generates depends on its seed only, not on which requests run beside it.
---   local stream = random_stream.new(seed)   -- seed: a non-negative integer
---   stream:uniform()                          -- in [0, 1), 53 random bits
--- SplitMix64 (Steele, Lea, Flood 2014): each output mixes a counter advanced by the golden-ratio step.
local bit = require 'bit'

local M = {}

local Stream = {}
Stream.__index = Stream

local STEP = 0x9E3779B97F4A7C15ULL

function M.new(seed)
  if type(seed) ~= 'number' or seed < 0 or seed % 1 ~= 0 then
    error('random_stream: seed must be a non-negative integer, got ' .. tostring(seed), 2)
  end
  return setmetatable({ state = 0ULL + seed }, Stream)
end

function Stream:next_u64()
  self.state = self.state + STEP
  local z = self.state
  z = bit.bxor(z, bit.rshift(z, 30)) * 0xBF58476D1CE4E5B9ULL
  z = bit.bxor(z, bit.rshift(z, 27)) * 0x94D049BB133111EBULL
  return bit.bxor(z, bit.rshift(z, 31))
end

function Stream:uniform()
  return tonumber(bit.rshift(self:next_u64(), 11)) / 9007199254740992   -- 2^53
end

return M
