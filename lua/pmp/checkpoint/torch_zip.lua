--- torch.save files (docs/formats.md §4.1): a ZIP archive of stored (uncompressed) records under one
--- folder, `<name>/data.pkl` (the pickle) and `<name>/data/<key>` (one record per storage), read by
--- mapping the file and written atomically.
---
---   local value, report = torch_zip.load(path)        -- tensors: views of the file's mapping
---   torch_zip.save(path, value)                       -- tensors: pmp tensors or torch_zip.deferred(...)
---
--- Loading rebuilds the pickle with pmp.checkpoint.torch_pickle (nothing is executed): each tensor is a
--- copy-on-write view of its storage's bytes in the file, checked against the record's CRC-32 when it
--- is first rebuilt (a flipped byte is an error naming the record, not a wrong weight). Tensors of
--- dtypes pmp lacks (int16, int8, complex, fp8) become placeholders listed in the report with the
--- pickle's other placeholders. Saving writes every tensor as its own storage, each record's data on a
--- 64-byte boundary as torch aligns it, so torch.load(weights_only = True) reads the files.
local ffi = require 'ffi'
local bit = require 'bit'
local C = require('pmp.ffi').C
local tensor = require 'pmp.tensor'
local pio = require 'pmp.io'
local P = require 'pmp.checkpoint.torch_pickle'

local M = {}

---------------------------------------------------------------------------------------------------
-- CRC-32 (the ZIP polynomial, reflected 0xEDB88320), slicing by eight bytes

local band, bxor, rshift = bit.band, bit.bxor, bit.rshift
local CRC = ffi.new('uint32_t[8][256]')
for b = 0, 255 do
  local c = b
  for _ = 1, 8 do c = band(c, 1) ~= 0 and bxor(rshift(c, 1), 0xEDB88320) or rshift(c, 1) end
  CRC[0][b] = c
end
for b = 0, 255 do
  for k = 1, 7 do CRC[k][b] = bxor(rshift(CRC[k - 1][b], 8), CRC[0][band(CRC[k - 1][b], 0xff)]) end
end

--- The CRC-32 of nbytes at ptr (a pointer or a string), continuing crc (0 to start).
function M.crc32(ptr, nbytes, crc)
  local p = ffi.cast('const uint8_t *', ptr)
  local c = bit.bnot(crc or 0)
  local i, n = 0, nbytes
  -- bytes up to a 4-byte boundary, then two little-endian words at a time
  while i < n and tonumber(ffi.cast('uintptr_t', p + i) % 4) ~= 0 do
    c = bxor(CRC[0][band(bxor(c, p[i]), 0xff)], rshift(c, 8))
    i = i + 1
  end
  while i + 8 <= n do
    local w = ffi.cast('const uint32_t *', p + i)
    local a, b = bxor(c, w[0]), w[1]
    c = bxor(CRC[7][band(a, 0xff)], CRC[6][band(rshift(a, 8), 0xff)], CRC[5][band(rshift(a, 16), 0xff)],
      CRC[4][rshift(a, 24)], CRC[3][band(b, 0xff)], CRC[2][band(rshift(b, 8), 0xff)], CRC[1][band(rshift(b, 16), 0xff)],
      CRC[0][rshift(b, 24)])
    i = i + 8
  end
  while i < n do
    c = bxor(CRC[0][band(bxor(c, p[i]), 0xff)], rshift(c, 8))
    i = i + 1
  end
  c = bit.bnot(c)
  return c < 0 and c + 2 ^ 32 or c
end

---------------------------------------------------------------------------------------------------
-- Torch storages and dtypes

-- torch storage class -> pmp dtype (nil: a dtype pmp lacks; the tensor becomes a placeholder).
local STORAGE_DTYPE = {
  FloatStorage = 'f32', DoubleStorage = 'f64', HalfStorage = 'f16', BFloat16Storage = 'bf16', LongStorage = 'i64',
  IntStorage = 'i32', ByteStorage = 'u8', BoolStorage = 'bool', UInt16Storage = 'u16',
}
-- element sizes of the storages pmp cannot hold, for checking their records
local OTHER_STORAGE_SIZE = {
  ShortStorage = 2, CharStorage = 1, ComplexFloatStorage = 8, ComplexDoubleStorage = 16, UInt32Storage = 4,
  UInt64Storage = 8, Float8_e4m3fnStorage = 1, Float8_e5m2Storage = 1, QInt8Storage = 1, QUInt8Storage = 1,
}
local STORAGE_OF = {}
for name, dtype in pairs(STORAGE_DTYPE) do STORAGE_OF[dtype] = name end
M.TORCH_DTYPE = { f32 = 'float32', f64 = 'float64', f16 = 'float16', bf16 = 'bfloat16', i64 = 'int64', i32 = 'int32',
  u8 = 'uint8', bool = 'bool', u16 = 'uint16' }

---------------------------------------------------------------------------------------------------
-- Reading

local function u16(p, at) return p[at] + p[at + 1] * 256 end
local function u32(p, at) return p[at] + p[at + 1] * 256 + p[at + 2] * 65536 + p[at + 3] * 16777216 end
local function u64(p, at) return u32(p, at) + u32(p, at + 4) * 4294967296 end

local Archive = {}
Archive.__index = Archive

local function zip_fail(path, msg) error(string.format('torch_zip: %s: %s', path, msg), 0) end

-- The end of central directory record: {entries, cd_size, cd_offset}, zip64 fields resolved.
local function end_record(path, p, size)
  local lowest = math.max(0, size - 22 - 65535)
  for at = size - 22, lowest, -1 do
    if u32(p, at) == 0x06054b50 then
      local out = { entries = u16(p, at + 10), cd_size = u32(p, at + 12), cd_offset = u32(p, at + 16) }
      if at >= 20 and u32(p, at - 20) == 0x07064b50 then
        local z = u64(p, at - 20 + 8)
        if z + 56 > size or u32(p, z) ~= 0x06064b50 then zip_fail(path, 'the zip64 end of central directory is damaged') end
        out.entries, out.cd_size, out.cd_offset = u64(p, z + 32), u64(p, z + 40), u64(p, z + 48)
      end
      return out
    end
  end
  if size >= 2 and p[0] == 0x80 then
    zip_fail(path, 'a bare pickle: torch.save wrote this format before torch 1.6 (_use_new_zipfile_serialization=False); ' ..
      'save it again with a newer torch')
  end
  zip_fail(path, 'not a zip archive (no end of central directory record; torch.save files are zip archives)')
end

--- The mapping of the file at path (released when collected; each tensor view holds its own reference).
function M.map(path)
  local m = C.pmp_map_file(path)
  if m == nil then error('torch_zip: ' .. ffi.string(C.pmp_last_error()), 0) end
  return ffi.gc(m, C.pmp_mapping_release)
end

--- The archive at path, mapped: entries by name {name, offset (of the data), size, crc}. within: an
--- archive that is one byte range of a larger file (torch.distributed.checkpoint's .distcp files hold
--- one torch.save archive per tensor chunk): {mapping = M.map(file), offset, length}; path then only
--- names it in errors.
function M.open(path, within)
  local m = within and within.mapping or M.map(path)
  local self = setmetatable({ path = path, mapping = m, entries = {}, names = {}, start = within and within.offset or 0 },
    Archive)
  local size = within and within.length or tonumber(C.pmp_mapping_size(m))
  if self.start + size > tonumber(C.pmp_mapping_size(m)) then
    zip_fail(path, string.format('bytes %d to %d lie past the end of the file (%d bytes)', self.start, self.start + size,
      tonumber(C.pmp_mapping_size(m))))
  end
  local p = ffi.cast('const uint8_t *', C.pmp_mapping_data(m)) + self.start
  self.size, self.base = size, p
  if size < 22 then zip_fail(path, 'too short for a zip archive') end
  local e = end_record(path, p, size)
  if e.cd_offset + e.cd_size > size then zip_fail(path, 'the central directory lies past the end of the file') end
  local at = e.cd_offset
  for k = 1, e.entries do
    if at + 46 > size or u32(p, at) ~= 0x02014b50 then zip_fail(path, 'central directory entry ' .. k .. ' is damaged') end
    local method, crc = u16(p, at + 10), u32(p, at + 16)
    local csize, usize = u32(p, at + 20), u32(p, at + 24)
    local name_len, extra_len, comment_len = u16(p, at + 28), u16(p, at + 30), u16(p, at + 32)
    local local_offset = u32(p, at + 42)
    if at + 46 + name_len + extra_len + comment_len > size then
      zip_fail(path, 'central directory entry ' .. k .. ' runs past the end of the file')
    end
    local name = ffi.string(p + at + 46, name_len)
    -- zip64 extra: the fields that overflowed, in the order usize, csize, offset
    local x, stop = at + 46 + name_len, at + 46 + name_len + extra_len
    while x + 4 <= stop do
      local id, len = u16(p, x), u16(p, x + 2)
      if id == 1 then
        local y = x + 4
        if usize == 0xffffffff then usize, y = u64(p, y), y + 8 end
        if csize == 0xffffffff then csize, y = u64(p, y), y + 8 end
        if local_offset == 0xffffffff then local_offset = u64(p, y) end
      end
      x = x + 4 + len
    end
    if method ~= 0 then
      zip_fail(path, string.format("record '%s' is compressed (method %d); torch.save stores records uncompressed", name, method))
    end
    if local_offset + 30 > size or u32(p, local_offset) ~= 0x04034b50 then
      zip_fail(path, string.format("the local header of record '%s' is damaged", name))
    end
    local data = local_offset + 30 + u16(p, local_offset + 26) + u16(p, local_offset + 28)
    if data + usize > size or csize ~= usize then zip_fail(path, string.format("record '%s' lies past the end of the file", name)) end
    self.entries[name] = { name = name, offset = data, size = usize, crc = crc }
    self.names[k] = name
    at = at + 46 + name_len + extra_len + comment_len
  end
  -- the folder of every record: the first record's name up to '/'
  self.prefix = self.names[1] and self.names[1]:match('^([^/]*/)') or ''
  return self
end

-- The record `name` under the archive's folder, or an error naming it.
function Archive:entry(name)
  local e = self.entries[self.prefix .. name]
  if not e then zip_fail(self.path, string.format("no record '%s%s' (not a torch.save file?)", self.prefix, name)) end
  return e
end

local record_shape = ffi.new('int64_t[1]')

-- Checks a record's CRC-32 (reading it), then lets its pages leave resident memory again: opening a
-- checkpoint reads it once, without keeping it in memory.
function Archive:verify(e)
  if e.verified then return end
  local got = M.crc32(self.base + e.offset, e.size)
  if got ~= e.crc then
    zip_fail(self.path, string.format("record '%s' is corrupted: CRC-32 %08x, the archive records %08x", e.name, got, e.crc))
  end
  e.verified = true
  if e.size > 0 then
    record_shape[0] = e.size
    local bytes = C.pmp_mapping_tensor(self.mapping, self.start + e.offset, C.PMP_U8, record_shape, 1)
    if bytes ~= nil then
      C.pmp_mapping_drop_pages(bytes)
      C.pmp_tensor_release(bytes)
    end
  end
end

function Archive:read(name)
  local e = self:entry(name)
  self:verify(e)
  return ffi.string(self.base + e.offset, e.size)
end

local shape_buffer = ffi.new('int64_t[8]')

local function contiguous_strides(shape)
  local out, s = {}, 1
  for k = #shape, 1, -1 do
    out[k] = s
    s = s * shape[k]
  end
  return out, s
end

-- The tensor rebuilt from a storage (persistent_load's value) by _rebuild_tensor_v2's arguments.
function Archive:tensor(storage, offset, size, stride, reader)
  local shape = {}
  for k, n in ipairs(size) do shape[k] = n end
  local want, numel = contiguous_strides(shape)
  if storage.placeholder then
    reader.report[storage.class] = (reader.report[storage.class] or 0) + 1
    return setmetatable({ global = 'torch.' .. storage.class, args = P.tuple({ P.tuple(shape) }) }, P.Placeholder)
  end
  for k = 1, #shape do
    if shape[k] > 1 and stride[k] ~= want[k] then
      reader:fail(string.format('a tensor of shape [%s] with strides (%s) in storage %s; only row-major tensors are read',
        table.concat(shape, ','), table.concat(stride, ','), storage.key))
    end
  end
  if offset < 0 or offset + numel > storage.numel then
    reader:fail(string.format('a tensor of %d elements at offset %d of storage %s, which holds %d', numel, offset,
      storage.key, storage.numel))
  end
  if numel == 0 then return tensor.empty(shape, { dtype = storage.dtype }) end
  self:verify(storage.entry)
  if #shape > 8 then reader:fail('a tensor of ' .. #shape .. ' dimensions (pmp holds at most 8)') end
  for k = 1, #shape do shape_buffer[k - 1] = shape[k] end
  local id = C.pmp_dtype_from_name(storage.dtype)
  local at = storage.entry.offset + offset * C.pmp_dtype_size(id)
  local ptr
  if (self.start + at) % C.pmp_dtype_size(id) == 0 then
    ptr = C.pmp_mapping_tensor(self.mapping, self.start + at, id, shape_buffer, #shape)
  else
    local cpu = ffi.new('pmp_device', C.PMP_CPU, 0)
    ptr = C.pmp_empty(shape_buffer, #shape, id, cpu)
    if ptr ~= nil then ffi.copy(ptr.data, self.base + at, numel * C.pmp_dtype_size(id)) end
  end
  if ptr == nil then reader:fail(ffi.string(C.pmp_last_error())) end
  return tensor.wrap(ptr)
end

-- persistent_load for ('storage', storage class, key, location, numel).
function Archive:storage(pid, reader)
  if P.kind_of(pid) ~= 'Tuple' or pid[1] ~= 'storage' or P.kind_of(pid[2]) ~= 'Global' then
    reader:fail('a persistent id that is not a storage')
  end
  local class, key, numel = pid[2].name, pid[3], pid[5]
  if type(key) ~= 'string' or type(numel) ~= 'number' then reader:fail('a storage id without key and size') end
  local cached = self.storages[key]
  if cached then return cached end
  local entry = self:entry('data/' .. key)
  local dtype = STORAGE_DTYPE[class]
  local element = dtype and C.pmp_dtype_size(C.pmp_dtype_from_name(dtype)) or OTHER_STORAGE_SIZE[class]
  if pid[2].module ~= 'torch' or not element then reader:fail('unknown storage class ' .. pid[2].module .. '.' .. class) end
  if entry.size ~= numel * element then
    zip_fail(self.path, string.format("record '%s' holds %d bytes, its %s of %d elements needs %d", entry.name,
      entry.size, class, numel, numel * element))
  end
  local s = { key = key, numel = numel, dtype = dtype, entry = entry, class = class, placeholder = dtype == nil }
  self.storages[key] = s
  return s
end

--- The value of the torch.save file at path and the report of placeholders (global name -> count).
--- Tensors are views of the file's mapping, which stays mapped while any of them lives. within: as
--- for M.open.
function M.load(path, within)
  local archive = M.open(path, within)
  archive.storages = {}
  local function rebuild_tensor(args, reader)
    if #args < 4 or type(args[1]) ~= 'table' or args[1].entry == nil and not args[1].placeholder then
      reader:fail('_rebuild_tensor_v2 without a storage')
    end
    return archive:tensor(args[1], args[2], args[3], args[4], reader)
  end
  local value, report = P.load(archive:read('data.pkl'), {
    source = path .. ':' .. archive.prefix .. 'data.pkl',
    persistent_load = function(pid, reader) return archive:storage(pid, reader) end,
    torch_rebuild = {
      ['torch._utils._rebuild_tensor_v2'] = rebuild_tensor,
      ['torch._utils._rebuild_tensor'] = rebuild_tensor,
      ['torch._utils._rebuild_parameter'] = function(args) return args[1] end,
      ['torch._utils._rebuild_parameter_with_state'] = function(args) return args[1] end,
    },
  })
  return value, report
end

---------------------------------------------------------------------------------------------------
-- Writing

local Deferred = {}
Deferred.__index = Deferred

--- A tensor for save that exists only while it is written: dtype and shape go into the pickle, and
--- produce() is called when its record is written; it returns a tensor with that many elements (any
--- layout; a floating-point one is converted to dtype on the way).
function M.deferred(dtype, shape, produce)
  if not STORAGE_OF[dtype] then error("torch_zip.deferred: dtype '" .. tostring(dtype) .. "' has no torch storage", 2) end
  return setmetatable({ dtype = dtype, shape = shape, produce = produce }, Deferred)
end

local function is_tensor_like(v) return tensor.is_tensor(v) or getmetatable(v) == Deferred end

local function le(n, bytes)
  local out = {}
  for i = 1, bytes do
    out[i] = n % 256
    n = math.floor(n / 256)
  end
  return string.char(unpack(out))
end

local ALIGNMENT = 64
local StorageRef = {}

-- Writes records one at a time through a pmp.io writer: add(name, bytes or tensor) then finish().
-- Offsets count from origin, where the archive starts in the file.
local ZipWriter = {}
ZipWriter.__index = ZipWriter

function ZipWriter:at() return self.w.bytes - self.origin end

function ZipWriter:header(name, size, crc)
  local zip64 = size >= 0xffffffff
  local extra = zip64 and ('\1\0\16\0' .. le(size, 8) .. le(size, 8)) or ''
  local fixed = 30 + #name + #extra + 4
  local pad = (ALIGNMENT - (self:at() + fixed) % ALIGNMENT) % ALIGNMENT
  extra = extra .. 'FB' .. le(pad, 2) .. string.rep('Z', pad)
  local small = zip64 and 0xffffffff or size
  self.records[#self.records + 1] = { name = name, size = size, crc = crc, offset = self:at() }
  self.w:write('PK\3\4' .. le(zip64 and 45 or 20, 2) .. le(0, 2) .. le(0, 2) .. le(0, 2) .. le(0x21, 2) .. le(crc, 4) ..
    le(small, 4) .. le(small, 4) .. le(#name, 2) .. le(#extra, 2) .. name .. extra)
end

function ZipWriter:add_bytes(name, data)
  local crc = M.crc32(data, #data)
  self:header(self.prefix .. name, #data, crc)
  self.w:write(data)
end

function ZipWriter:add_tensor(name, t)
  local nbytes = t:numel() * t:element_size()
  local p = t.ptr.data
  self:header(self.prefix .. name, nbytes, M.crc32(p, nbytes))
  if nbytes > 0 then self.w:write(ffi.cast('const char *', p), nbytes) end
end

function ZipWriter:finish()
  local cd_start = self:at()
  local parts = {}
  for _, r in ipairs(self.records) do
    local extra = ''
    if r.size >= 0xffffffff then extra = extra .. le(r.size, 8) .. le(r.size, 8) end
    if r.offset >= 0xffffffff then extra = extra .. le(r.offset, 8) end
    if extra ~= '' then extra = '\1\0' .. le(#extra, 2) .. extra end
    local small = r.size >= 0xffffffff and 0xffffffff or r.size
    parts[#parts + 1] = 'PK\1\2' .. le(extra ~= '' and 45 or 20, 2) .. le(extra ~= '' and 45 or 20, 2) .. le(0, 2) ..
      le(0, 2) .. le(0, 2) .. le(0x21, 2) .. le(r.crc, 4) .. le(small, 4) .. le(small, 4) .. le(#r.name, 2) ..
      le(#extra, 2) .. le(0, 2) .. le(0, 2) .. le(0, 2) .. le(0, 4) .. le(math.min(r.offset, 0xffffffff), 4) .. r.name .. extra
  end
  local cd = table.concat(parts)
  self.w:write(cd)
  local n, cd_end = #self.records, self:at()
  local zip64 = n >= 0xffff or cd_start >= 0xffffffff or #cd >= 0xffffffff
  if zip64 then
    self.w:write('PK\6\6' .. le(44, 8) .. le(45, 2) .. le(45, 2) .. le(0, 4) .. le(0, 4) .. le(n, 8) .. le(n, 8) ..
      le(#cd, 8) .. le(cd_start, 8))
    self.w:write('PK\6\7' .. le(0, 4) .. le(cd_end, 8) .. le(1, 4))
  end
  self.w:write('PK\5\6' .. le(0, 2) .. le(0, 2) .. le(math.min(n, 0xffff), 2) .. le(math.min(n, 0xffff), 2) ..
    le(math.min(#cd, 0xffffffff), 4) .. le(math.min(cd_start, 0xffffffff), 4) .. le(0, 2))
end

-- The bytes of a tensor to write: contiguous, on the cpu, in dtype.
local function materialize(v, name)
  local t = v
  if getmetatable(v) == Deferred then
    t = v.produce()
    local n = 1
    for _, s in ipairs(v.shape) do n = n * s end
    if not tensor.is_tensor(t) or t:numel() ~= n then
      error(string.format('torch_zip.save: deferred tensor %s produced %s, not %d elements', name,
        tensor.is_tensor(t) and t:numel() .. ' elements' or type(t), n), 0)
    end
  end
  if t.ptr.dev.type ~= C.PMP_CPU then t = t:to('cpu') end
  if t.dtype ~= v.dtype then t = t:to(v.dtype) end
  return t:contiguous()
end

--- Writes value as a torch.save archive whose records sit under folder `stem`, through pmp.io writer w
--- from its current position (a torch.distributed.checkpoint .distcp file holds one archive per tensor
--- chunk, one after another); returns the archive's length in bytes. Tensors as for M.save.
function M.write(w, stem, value)
  local storages, order = {}, {}
  local function reduce(v)
    if not is_tensor_like(v) then return nil end
    if not STORAGE_OF[v.dtype] then error('torch_zip.save: a tensor of dtype ' .. tostring(v.dtype) .. ' has no torch storage', 0) end
    local key = storages[v]
    if not key then
      key = tostring(#order)
      storages[v] = key
      order[#order + 1] = v
    end
    local shape = P.tuple({ unpack(v.shape) })
    local stride, numel = contiguous_strides(v.shape)
    local ref = setmetatable({ key = key, class = STORAGE_OF[v.dtype], numel = numel }, StorageRef)
    return { 'torch._utils', '_rebuild_tensor_v2' },
      P.tuple({ ref, 0, shape, P.tuple(stride), false, P.dict(true) })
  end
  local function persistent_id(v)
    if getmetatable(v) ~= StorageRef then return nil end
    return P.tuple({ 'storage', setmetatable({ module = 'torch', name = v.class }, P.Global), v.key, 'cpu', v.numel })
  end
  local pickle = P.dump(value, { reduce = reduce, persistent_id = persistent_id })
  local z = setmetatable({ w = w, prefix = stem .. '/', records = {}, origin = w.bytes }, ZipWriter)
  z:add_bytes('data.pkl', pickle)
  z:add_bytes('.format_version', '1')
  z:add_bytes('.storage_alignment', tostring(ALIGNMENT))
  z:add_bytes('byteorder', 'little')
  for k = 1, #order do
    z:add_tensor('data/' .. (k - 1), materialize(order[k], 'data/' .. (k - 1)))
    -- a deferred tensor's temporaries go now, their memory back to the system, not to the cache
    order[k] = false
    collectgarbage()
    C.pmp_memory_empty_cache(C.PMP_CPU)
  end
  z:add_bytes('version', '3\n')
  z:finish()
  return z:at()
end

--- Writes value (see pmp.checkpoint.torch_pickle for the kinds; tensors: pmp tensors or M.deferred)
--- to path atomically as torch.save does. Tensors are written one at a time (a deferred one is made
--- when its record is written and dropped after), so saving holds at most one tensor's temporary.
function M.save(path, value)
  local stem = pio.basename(path):gsub('%.[^.]*$', '')
  pio.remove_stale_temporaries(pio.dirname(path), pio.basename(path) .. '.tmp.')
  pio.write_atomic(path, function(w) M.write(w, stem, value) end)
  return path
end

return M
