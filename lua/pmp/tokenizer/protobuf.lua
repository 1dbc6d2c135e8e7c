-- A reader of the protobuf wire format, enough for SentencePiece's ModelProto: walk a message's fields
-- in order, each with its number, wire type and value (a number for varints, a byte-string for
-- length-delimited fields, the four or eight raw bytes for fixed-width ones). Offsets in errors are
-- 0-based byte positions in the whole file.
local M = {}

local WIRE_VARINT, WIRE_FIXED64, WIRE_LEN, WIRE_FIXED32 = 0, 1, 2, 5

-- A varint at 1-based position i of s (message ends at stop); returns value and next position.
local function varint(s, i, stop, fail)
  local value, scale = 0, 1
  for k = 0, 9 do
    if i + k > stop then fail(i - 1, 'varint runs past the end of the message') end
    local b = s:byte(i + k)
    value = value + (b % 128) * scale
    if b < 128 then return value, i + k + 1 end
    scale = scale * 128
  end
  fail(i - 1, 'varint longer than 10 bytes')
end

--- Iterates the fields of the message in s[first..last] (1-based, inclusive):
---   for number, wire, value, offset in protobuf.fields(s, first, last, fail) do ... end
--- fail(offset, message) must raise; offset is where the field starts.
function M.fields(s, first, last, fail)
  local i = first
  return function()
    if i > last then return nil end
    local start = i - 1
    local key
    key, i = varint(s, i, last, fail)
    local number, wire = math.floor(key / 8), key % 8
    if number == 0 then fail(start, 'field number 0 is not valid') end
    local value
    if wire == WIRE_VARINT then
      value, i = varint(s, i, last, fail)
    elseif wire == WIRE_LEN then
      local len
      len, i = varint(s, i, last, fail)
      if i + len - 1 > last then
        fail(start, string.format('field %d of %d bytes runs past the end of its message (%d bytes left)', number, len,
          last - i + 1))
      end
      value = { first = i, last = i + len - 1 }
      i = i + len
    elseif wire == WIRE_FIXED32 or wire == WIRE_FIXED64 then
      local width = wire == WIRE_FIXED32 and 4 or 8
      if i + width - 1 > last then fail(start, string.format('field %d: %d-byte value runs past the end', number, width)) end
      value = s:sub(i, i + width - 1)
      i = i + width
    else
      fail(start, string.format('field %d has wire type %d, which is not valid here', number, wire))
    end
    return number, wire, value, start
  end
end

--- The f32 stored little-endian in a 4-byte string. Decoded by arithmetic, not through an FFI float:
--- a NaN read from cdata keeps its payload, which LuaJIT can mistake for a tagged value; here every
--- NaN is Lua's own.
function M.float32(bytes)
  local b1, b2, b3, b4 = bytes:byte(1, 4)
  local sign = b4 >= 128 and -1 or 1
  local exponent = (b4 % 128) * 2 + math.floor(b3 / 128)
  local mantissa = ((b3 % 128) * 256 + b2) * 256 + b1
  if exponent == 255 then
    if mantissa == 0 then return sign * math.huge end
    return 0 / 0
  end
  if exponent == 0 then return sign * math.ldexp(mantissa, -149) end
  return sign * math.ldexp(mantissa + 8388608, exponent - 150)
end

--- Checks a field's wire type; fail(offset, message) raises.
function M.expect(wire, expected, number, offset, fail, what)
  if wire ~= expected then
    local names = { [0] = 'varint', [1] = 'fixed64', [2] = 'length-delimited', [5] = 'fixed32' }
    fail(offset, string.format('%s (field %d) should be %s, is %s', what, number, names[expected], names[wire] or tostring(wire)))
  end
end

M.VARINT, M.FIXED64, M.LEN, M.FIXED32 = WIRE_VARINT, WIRE_FIXED64, WIRE_LEN, WIRE_FIXED32

return M
