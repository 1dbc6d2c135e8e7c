require 'busted.runner'()
-- pmp.tensorboard against an independent reader written here: a bit-by-bit CRC-32C (no table;
-- spec/support/crc32c.lua), its own TFRecord unframing and its own protobuf decoder. Nothing below calls the writer's
-- helpers except the check value test of the writer's crc32c.
local ffi = require 'ffi'
local shell = require 'spec.support.shell'

---------------------------------------------------------------------------------------------------
-- Independent reader

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

local function read_file(path)
  local f = assert(io.open(path, 'rb'))
  local content = f:read('*a')
  f:close()
  return content
end

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

---------------------------------------------------------------------------------------------------

describe('pmp.tensorboard', function()
  local tensorboard = pmp.tensorboard
  local dir
  before_each(function() dir = shell.temp_dir() end)
  after_each(function() shell.remove_dir(dir) end)

  it('computes the CRC-32C check value', function()
    assert.equal(0xE3069283, tensorboard.crc32c('123456789'))
    assert.equal(0xE3069283, crc32c('123456789')) -- the spec's reader agrees
    assert.equal(0, tensorboard.crc32c(''))
  end)

  it('names the file events.out.tfevents.<time>.<host>.<pid>.<counter><suffix> in a new directory', function()
    local before = os.time()
    local tb = tensorboard.writer(dir .. '/a/b', { filename_suffix = '.v2' })
    tb:close()
    local names = list_dir(dir .. '/a/b')
    assert.equal(1, #names)
    local t, host, pid, counter = names[1]:match('^events%.out%.tfevents%.(%d+)%.(.+)%.(%d+)%.(%d+)%.v2$')
    assert.truthy(t, names[1])
    assert.equal(10, #t)
    assert.is_true(math.abs(tonumber(t) - before) <= 2)
    assert.truthy(#host > 0)
    assert.truthy(tonumber(pid) > 0 and tonumber(counter) >= 0)
    -- a second writer in the same second gets a different name
    local tb2 = tensorboard.writer(dir .. '/a/b', { filename_suffix = '.v2' })
    tb2:close()
    assert.equal(2, #list_dir(dir .. '/a/b'))
  end)

  it('writes scalars that read back with tags, steps and float32-rounded values', function()
    local tb = tensorboard.writer(dir)
    local logged = {
      { 'lm loss', 10.123456789, 1 }, { 'lm loss', 0.1, 2 }, { 'learning-rate', 3e-4, 2 },
      { 'lm loss', -2.5, 2^40 }, { 'grad-norm', 1e30, 3 },
    }
    for _, s in ipairs(logged) do tb:add_scalar(s[1], s[2], s[3]) end
    tb:add_scalar('explicit time', 1, 7, 1234.5)
    tb:close()

    local events = read_events(tb.path)
    assert.equal(1 + #logged + 1, #events)
    assert.equal('brain.Event:2', events[1].file_version)
    assert.is_true(math.abs(events[1].wall_time - os.time()) < 60)
    for i, s in ipairs(logged) do
      local e = events[i + 1]
      assert.equal(s[3], e.step)
      assert.equal(1, #e.values)
      assert.equal(s[1], e.values[1].tag)
      assert.equal(tonumber(ffi.new('float', s[2])), e.values[1].simple_value)
    end
    -- float32 rounding, spelled out for one value: 0.1 is stored as the float nearest to it
    assert.equal(0.100000001490116119384765625, events[3].values[1].simple_value)
    assert.equal(1234.5, events[#events].wall_time)
    assert.equal(7, events[#events].step)
  end)

  it('buffers events until flush', function()
    local tb = tensorboard.writer(dir, { max_queue = 100, flush_secs = 1000 })
    local size_after_open = #read_file(tb.path)
    tb:add_scalar('x', 1, 1)
    assert.equal(size_after_open, #read_file(tb.path))
    tb:flush()
    assert.is_true(#read_file(tb.path) > size_after_open)
    tb:close()
    tb:close() -- closing twice is harmless
  end)

  it('writes text as a string tensor for the text plugin', function()
    local tb = tensorboard.writer(dir)
    tb:add_text('config', 'lr: **3e-4**', 5)
    tb:close()
    local v = read_events(tb.path)[2].values[1]
    assert.equal('config', v.tag)
    assert.equal('text', decode(v.metadata[1][1])[1][1]) -- plugin_data.plugin_name
    assert.equal(7, v.tensor[1][1])                      -- dtype DT_STRING
    assert.equal('lr: **3e-4**', v.tensor[8][1])         -- string_val
  end)
end)
