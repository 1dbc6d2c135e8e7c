--- TensorBoard event files written from Lua: scalars (and text) logged the way a training loop does.
--
--   local tb = pmp.tensorboard.writer('runs/exp1')
--   tb:add_scalar('lm loss', loss, iteration)
--   tb:close()
--
-- An event file is a sequence of TFRecords, each holding one serialized tensorflow.Event protobuf.
-- Both layers are small enough to encode by hand, so no protobuf library or Python is needed.
local bit = require 'bit'
local ffi = require 'ffi'

assert(ffi.abi('le'), 'pmp.tensorboard writes fixed-width fields by copying host bytes: little-endian only')

-- libc calls under private names (asm aliases), so these declarations cannot clash with the same
-- functions declared elsewhere in pmp with other prototypes.
ffi.cdef [[
struct pmp_tb_timeval { long sec; long usec; };
int pmp_tb_gettimeofday(struct pmp_tb_timeval *tv, void *tz) __asm__("gettimeofday");
int pmp_tb_gethostname(char *name, size_t len) __asm__("gethostname");
int pmp_tb_getpid(void) __asm__("getpid");
int pmp_tb_mkdir(const char *path, unsigned int mode) __asm__("mkdir");
]]
local C = ffi.C

local M = {}

---------------------------------------------------------------------------------------------------
-- CRC-32C (Castagnoli), the engine's (core/io/checksum.c), as an unsigned number.
local engine = require('pmp.ffi').C
function M.crc32c(data) return tonumber(engine.pmp_crc32c(0, data, #data)) end

-- TFRecord stores a "masked" CRC: a CRC of data that itself contains CRCs is otherwise weak.
function M.masked_crc32c(data)
  return (bit.ror(M.crc32c(data), 15) + 0xa282ead8) % 2^32
end

---------------------------------------------------------------------------------------------------
-- Little-endian fixed-width encodings.

local function uint32_le(n)
  return string.char(n % 256, math.floor(n / 2^8) % 256, math.floor(n / 2^16) % 256, math.floor(n / 2^24) % 256)
end

-- Doubles and floats: copy the host's IEEE bytes (little-endian, asserted above).
local double_box, float_box = ffi.new('double[1]'), ffi.new('float[1]')
local function double_le(x) double_box[0] = x; return ffi.string(double_box, 8) end
local function float_le(x) float_box[0] = x; return ffi.string(float_box, 4) end

-- One TFRecord: uint64 length, masked CRC of those 8 bytes, the data, masked CRC of the data.
function M.frame_record(data)
  local length = uint32_le(#data % 2^32) .. uint32_le(math.floor(#data / 2^32))
  return length .. uint32_le(M.masked_crc32c(length)) .. data .. uint32_le(M.masked_crc32c(data))
end

---------------------------------------------------------------------------------------------------
-- Protobuf wire format, only what Event/Summary need. A field is a key varint (field << 3 | wire
-- type) followed by its payload. Concatenating encoded fields gives an encoded message.

local VARINT, FIXED64, BYTES, FIXED32 = 0, 1, 2, 5

-- Varints carry 7 bits per byte, low bits first. int64 fields encode negatives as their 64-bit
-- two's complement, so the arithmetic runs on uint64_t cdata rather than doubles.
local function varint(n)
  assert(n == math.floor(n), 'protobuf varint needs an integer')
  local u = ffi.cast('uint64_t', ffi.cast('int64_t', n))
  local bytes = {}
  while u >= 128 do
    bytes[#bytes + 1] = tonumber(u % 128) + 128
    u = u / 128
  end
  bytes[#bytes + 1] = tonumber(u)
  return string.char(unpack(bytes))
end

local function key(field, wire_type) return varint(field * 8 + wire_type) end

local pb = {}
function pb.int64(field, n) return key(field, VARINT) .. varint(n) end
function pb.double(field, x) return key(field, FIXED64) .. double_le(x) end
function pb.float(field, x) return key(field, FIXED32) .. float_le(x) end
function pb.bytes(field, s) return key(field, BYTES) .. varint(#s) .. s end
pb.message = pb.bytes -- an embedded message is length-delimited like a string

---------------------------------------------------------------------------------------------------
-- tensorflow.Event and its Summary. Field numbers from tensorflow/core/util/event.proto,
-- summary.proto, tensor.proto and tensor_shape.proto.

-- step may be nil: the file_version event has none, like TensorFlow's.
local function event(wall_time, step, payload)
  return pb.double(1, wall_time) .. (step and pb.int64(2, step) or '') .. payload
end
local EVENT_FILE_VERSION, EVENT_SUMMARY = 3, 5
local VALUE_TAG, VALUE_SIMPLE, VALUE_TENSOR, VALUE_METADATA = 1, 2, 8, 9
local DT_STRING = 7

local function summary(value) return pb.message(EVENT_SUMMARY, pb.message(1, value)) end

function M.scalar_event(tag, value, step, wall_time)
  return event(wall_time, step, summary(pb.bytes(VALUE_TAG, tag) .. pb.float(VALUE_SIMPLE, value)))
end

-- Text is a string tensor of shape [1] tagged for the "text" plugin, which renders it as markdown.
function M.text_event(tag, text, step, wall_time)
  local metadata = pb.message(1, pb.bytes(1, 'text'))              -- plugin_data { plugin_name }
  local tensor = pb.int64(1, DT_STRING)                            -- dtype
    .. pb.message(2, pb.message(2, pb.int64(1, 1)))                -- tensor_shape { dim { size: 1 } }
    .. pb.bytes(8, text)                                           -- string_val
  return event(wall_time, step, summary(pb.bytes(VALUE_TAG, tag)
    .. pb.message(VALUE_METADATA, metadata) .. pb.message(VALUE_TENSOR, tensor)))
end

---------------------------------------------------------------------------------------------------
-- The writer.

local function now()
  local tv = ffi.new('struct pmp_tb_timeval')
  C.pmp_tb_gettimeofday(tv, nil)
  return tonumber(tv.sec) + tonumber(tv.usec) * 1e-6
end

local function hostname()
  local buf = ffi.new('char[256]')
  if C.pmp_tb_gethostname(buf, 255) ~= 0 then return 'localhost' end
  return ffi.string(buf)
end

-- mkdir -p through libc rather than a shell, so odd characters in paths need no quoting. Failures
-- (often "already exists") are ignored here; opening the event file reports a real problem.
local function mkdir_p(dir)
  local path = dir:sub(1, 1) == '/' and '' or '.'
  for part in dir:gmatch('[^/]+') do
    path = path .. '/' .. part
    C.pmp_tb_mkdir(path, tonumber('755', 8))
  end
end

-- Distinguishes files created by this process within the same second.
local file_counter = 0

local Writer = {}
Writer.__index = Writer

-- opts.filename_suffix: appended to the file name. opts.flush_secs (default 120) and opts.max_queue
-- (default 10): buffered events reach the disk when either is exceeded, and on flush/close.
function M.writer(dir, opts)
  opts = opts or {}
  mkdir_p(dir)
  local wall_time = now()
  local name = string.format('events.out.tfevents.%010d.%s.%d.%d%s', math.floor(wall_time), hostname(),
                             C.pmp_tb_getpid(), file_counter, opts.filename_suffix or '')
  file_counter = file_counter + 1
  local path = dir .. '/' .. name
  local file, err = io.open(path, 'wb')
  if not file then error('pmp.tensorboard: cannot create event file: ' .. tostring(err), 0) end
  local self = setmetatable({
    path = path, file = file, pending = {},
    flush_secs = opts.flush_secs or 120, max_queue = opts.max_queue or 10, last_flush = wall_time,
  }, Writer)
  -- TensorBoard identifies an event file by this first record; write it out at once so a reader
  -- sees a valid (if empty) run as soon as training starts.
  self:_write(event(wall_time, nil, pb.bytes(EVENT_FILE_VERSION, 'brain.Event:2')))
  self:flush()
  return self
end

function Writer:_write(event_bytes)
  assert(self.file, 'pmp.tensorboard: writer is closed')
  self.pending[#self.pending + 1] = M.frame_record(event_bytes)
  if #self.pending >= self.max_queue or now() - self.last_flush >= self.flush_secs then self:flush() end
end

-- value: a Lua number or anything with :item() (a one-element pmp tensor). Stored as float32.
function Writer:add_scalar(tag, value, step, wall_time)
  if type(value) ~= 'number' then value = value:item() end
  self:_write(M.scalar_event(tag, value, step or 0, wall_time or now()))
end

function Writer:add_text(tag, text, step, wall_time)
  self:_write(M.text_event(tag, text, step or 0, wall_time or now()))
end

function Writer:flush()
  if not self.file then return end
  if #self.pending > 0 then
    self.file:write(table.concat(self.pending))
    self.pending = {}
  end
  self.file:flush()
  self.last_flush = now()
end

function Writer:close()
  if not self.file then return end
  self:flush()
  self.file:close()
  self.file = nil
end

return M
