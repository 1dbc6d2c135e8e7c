-- An independent reader of TensorBoard event files for specs: a bit-by-bit CRC-32C (no table;
-- spec/support/crc32c.lua), its own TFRecord unframing and its own protobuf decoder; none of
-- pmp.tensorboard's helpers.
local ffi = require 'ffi'
local assert = require 'luassert'
local shell = require 'spec.support.shell'

local crc32c = require 'spec.support.crc32c'

local function masked(crc)
  local rotated = (math.floor(crc / 2^15) + (crc % 2^15) * 2^17) % 2^32
  return (rotated + 0xa282ead8) % 2^32
end

local function le(s, pos, n)
  local value = 0
  for i = n - 1, 0, -1 do value = value * 256 + s:byte(pos + i) end
  return value
end

-- TFRecords -> list of payload strings; fails on any bad CRC or truncation.
local function read_records(content)
  local records, pos = {}, 1
  while pos <= #content do
    assert(pos + 12 - 1 <= #content, 'truncated record header')
    local length_bytes = content:sub(pos, pos + 7)
    local length = le(content, pos, 8)
    assert.equal(masked(crc32c(length_bytes)), le(content, pos + 8, 4), 'length crc')
    local data = content:sub(pos + 12, pos + 12 + length - 1)
    assert.equal(length, #data, 'truncated record data')
    assert.equal(masked(crc32c(data)), le(content, pos + 12 + length, 4), 'data crc')
    records[#records + 1] = data
    pos = pos + 12 + length + 4
  end
  return records
end

-- Protobuf message -> { [field] = { raw values in order } }. Varints as numbers, fixed64/fixed32
-- as raw 8/4-byte strings, length-delimited as strings.
local function decode(s)
  local fields, pos = {}, 1
  local function varint()
    local value, scale = 0, 1
    repeat
      local b = s:byte(pos); pos = pos + 1
      value = value + (b % 128) * scale
      scale = scale * 128
    until b < 128
    return value
  end
  while pos <= #s do
    local key = varint()
    local field, wire = math.floor(key / 8), key % 8
    local value
    if wire == 0 then value = varint()
    elseif wire == 1 then value = s:sub(pos, pos + 7); pos = pos + 8
    elseif wire == 5 then value = s:sub(pos, pos + 3); pos = pos + 4
    elseif wire == 2 then local n = varint(); value = s:sub(pos, pos + n - 1); pos = pos + n
    else error('unexpected wire type ' .. wire) end
    fields[field] = fields[field] or {}
    table.insert(fields[field], value)
  end
  return fields
end

local function as_double(raw) local b = ffi.new('double[1]'); ffi.copy(b, raw, 8); return b[0] end
local function as_float(raw) local b = ffi.new('float[1]'); ffi.copy(b, raw, 4); return b[0] end

local read_file = require('pmp.io').read_file

local function list_dir(dir)
  local names, pipe = {}, io.popen('ls -1 ' .. shell.quote(dir))
  for line in pipe:lines() do names[#names + 1] = line end
  pipe:close()
  return names
end

-- Events in the file as { wall_time, step, file_version, values = { {tag, simple_value, ...} } }.
local function read_events(path)
  local events = {}
  for _, record in ipairs(read_records(read_file(path))) do
    local f = decode(record)
    local e = { wall_time = f[1] and as_double(f[1][1]), step = f[2] and f[2][1] or 0,
                file_version = f[3] and f[3][1], values = {} }
    if f[5] then
      for _, raw in ipairs(decode(f[5][1])[1] or {}) do
        local v = decode(raw)
        e.values[#e.values + 1] = { tag = v[1][1], simple_value = v[2] and as_float(v[2][1]),
                                    metadata = v[9] and decode(v[9][1]), tensor = v[8] and decode(v[8][1]) }
      end
    end
    events[#events + 1] = e
  end
  return events
end

return { crc32c = crc32c, masked = masked, read_records = read_records, decode = decode, as_double = as_double, as_float = as_float, read_file = read_file, list_dir = list_dir, read_events = read_events }
