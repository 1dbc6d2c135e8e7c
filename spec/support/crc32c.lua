-- CRC-32C (Castagnoli) one bit at a time, straight from the definition (reflected polynomial
-- 0x82F63B78, inverted in and out): the specs' reference for the engine's table and instruction
-- versions. bytes: a string or a list of byte values. Returns an unsigned number.
local bit = require 'bit'

return function(bytes)
  local crc = 0xFFFFFFFF
  local text = type(bytes) == 'string'
  for i = 1, #bytes do
    crc = bit.bxor(crc, text and bytes:byte(i) or bytes[i])
    for _ = 1, 8 do
      local lsb = bit.band(crc, 1)
      crc = bit.rshift(crc, 1)
      if lsb == 1 then crc = bit.bxor(crc, 0x82F63B78) end
    end
  end
  return bit.bxor(crc, 0xFFFFFFFF) % 2^32
end
