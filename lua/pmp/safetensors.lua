--- safetensors files (Hugging Face): read by mmap, written atomically, single files and sharded
--- directories. The layout and the validation rules are those of the reference implementation
--- (docs/formats.md §6): an 8-byte little-endian header length N, N bytes of JSON, then the data region
--- that the tensors tile from byte 0 to its end without gaps or overlaps.
--
--   local tensors, metadata = pmp.safetensors.load(path, {dtype = nil | 'f32' ..., names = {...}, copy = false})
--   pmp.safetensors.save(path, {name = tensor, ...}, {key = 'value'} or nil)
--   local tensors, metadata, index = pmp.safetensors.load_sharded(dir, options)
--   pmp.safetensors.save_sharded(dir, tensors, {max_shard_size = bytes or '5GB', metadata = {...}})
--   local info = pmp.safetensors.inspect(path)     -- the validated header, without loading anything
--   local t = pmp.safetensors.load_joined(path, {'a', 'b'}, shape)   -- one view over adjacent tensors
--
-- load: tensors whose dtype is kept are views of the file mapping (no copy; copy-on-write, so writing
-- to them in place never changes the file). The file stays mapped while any of them lives. `dtype`
-- converts the floating-point tensors (F64/F32/BF16/F16) to that dtype, in copies; integer and bool
-- tensors keep theirs. `names` loads only those tensors (a list, or a set name -> true). `copy = true`
-- copies everything, so nothing keeps the file mapped.
-- Every problem with a file is a Lua error that starts "safetensors: <path>: " and names the tensor or
-- header key at fault.
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local json = require 'pmp.json'
local pio = require 'pmp.io'
local tensor = require 'pmp.tensor'

local M = {}

M.MAX_HEADER_SIZE = 100000000

-- safetensors dtype -> pmp dtype name, for the dtypes pmp holds.
local TO_PMP = { F64 = 'f64', F32 = 'f32', BF16 = 'bf16', F16 = 'f16', I64 = 'i64', I32 = 'i32', U8 = 'u8', BOOL = 'bool' }
local FROM_PMP = {}
for st, name in pairs(TO_PMP) do FROM_PMP[name] = st end
M.SUPPORTED = 'F64 F32 BF16 F16 I64 I32 U8 BOOL'

-- Every dtype of the format, in the order of the reference implementation's Dtype enum (the writer
-- sorts tensors by this rank, descending, then by name), with its size in bits.
local ALL_DTYPES = {
  { 'BOOL', 8 }, { 'F4', 4 }, { 'F6_E2M3', 6 }, { 'F6_E3M2', 6 }, { 'U8', 8 }, { 'I8', 8 }, { 'F8_E5M2', 8 },
  { 'F8_E4M3', 8 }, { 'F8_E8M0', 8 }, { 'F8_E4M3FNUZ', 8 }, { 'F8_E5M2FNUZ', 8 }, { 'I16', 16 }, { 'U16', 16 },
  { 'F16', 16 }, { 'BF16', 16 }, { 'I32', 32 }, { 'U32', 32 }, { 'F32', 32 }, { 'C64', 64 }, { 'F64', 64 },
  { 'I64', 64 }, { 'U64', 64 },
}
local BITS, RANK = {}, {}
for i, d in ipairs(ALL_DTYPES) do
  BITS[d[1]] = d[2]
  RANK[d[1]] = i
end

local FLOAT = { f64 = true, f32 = true, bf16 = true, f16 = true }
local DTYPE_ALIASES = {
  float = 'f32', float32 = 'f32', double = 'f64', float64 = 'f64', bfloat16 = 'bf16', half = 'f16', float16 = 'f16',
}

local function last_error() return ffi.string(C.pmp_last_error()) end

local function shape_string(shape)
  local parts = {}
  for k = 1, #shape do parts[k] = string.format('%d', shape[k]) end
  return '[' .. table.concat(parts, ',') .. ']'
end

local function is_int(x) return type(x) == 'number' and x == math.floor(x) and x >= 0 and x < 2^53 end

---------------------------------------------------------------------------------------------------
-- Header parsing and validation

-- The header's JSON object, after the checks on its 8-byte size. Returns the header size and the
-- decoded object.
local function read_header_json(ptr, file_size, fail)
  if file_size < 8 then
    fail(string.format('file is %d bytes, too short for the 8-byte header size', file_size))
  end
  local n64 = ffi.new('uint64_t', 0)
  for i = 7, 0, -1 do n64 = n64 * 256 + ptr[i] end
  if n64 > M.MAX_HEADER_SIZE then
    fail(string.format('header size %s exceeds the limit of %d bytes (not a safetensors file?)',
      tostring(n64):gsub('ULL$', ''), M.MAX_HEADER_SIZE))
  end
  local n = tonumber(n64)
  if 8 + n > file_size then
    fail(string.format('header size %d runs past the end of the file (%d bytes)', n, file_size))
  end
  if n == 0 then fail('header size is 0 (an empty header is not valid JSON)') end
  local text = ffi.string(ptr + 8, n)
  if text:byte(1) ~= 123 then fail('header does not start with "{" (not a safetensors file?)') end
  local ok, header = pcall(json.decode, text, { duplicate_keys = 'error' })
  if not ok then
    fail('header is not valid JSON: ' .. tostring(header):gsub('^json%.decode: ', '') .. ' of the header')
  end
  if type(header) ~= 'table' or json.is_array(header) or header == json.null then
    fail('header is not a JSON object')
  end
  return n, header
end

-- Copies the '__metadata__' entry (string values only) into metadata.
local function read_metadata(entry, metadata, fail)
  if type(entry) ~= 'table' or json.is_array(entry) then fail("header key '__metadata__' is not an object") end
  for k, v in pairs(entry) do
    if type(v) ~= 'string' then
      fail(string.format("__metadata__ key '%s' holds a %s; metadata values must be strings", k,
        v == json.null and 'null' or type(v)))
    end
    metadata[k] = v
  end
end

-- A tensor's header entry, validated on its own: { name, dtype, shape, begin, finish }.
local function read_tensor_entry(name, entry, fail)
  local function bad(msg) fail(string.format("tensor '%s': %s", name, msg)) end
  if type(entry) ~= 'table' or json.is_array(entry) or entry == json.null then bad('entry is not an object') end
  local dtype, shape, offsets = entry.dtype, entry.shape, entry.data_offsets
  if dtype == nil then bad("missing 'dtype'") end
  if shape == nil then bad("missing 'shape'") end
  if offsets == nil then bad("missing 'data_offsets'") end
  if type(dtype) ~= 'string' then bad("'dtype' is not a string") end
  if not BITS[dtype] then bad(string.format("unknown dtype '%s'", dtype)) end
  if type(shape) ~= 'table' or not json.is_array(shape) then
    bad("'shape' is not an array")
  end
  local numel = 1
  for k, size in ipairs(shape) do
    if not is_int(size) then bad(string.format("'shape' entry %d (%s) is not a non-negative integer", k, tostring(size))) end
    numel = numel * size
    if numel >= 2^53 then bad("'shape' " .. shape_string(shape) .. ' has too many elements') end
  end
  if type(offsets) ~= 'table' or not json.is_array(offsets) or #offsets ~= 2 then
    bad("'data_offsets' is not an array of two integers")
  end
  local begin, finish = offsets[1], offsets[2]
  if not is_int(begin) or not is_int(finish) then bad("'data_offsets' are not non-negative integers") end
  if finish < begin then bad(string.format("'data_offsets' [%d,%d] end before they begin", begin, finish)) end
  local bits = numel * BITS[dtype]
  if bits % 8 ~= 0 then bad(string.format('shape %s of %s is not a whole number of bytes', shape_string(shape), dtype)) end
  if bits / 8 ~= finish - begin then
    bad(string.format("shape %s of %s needs %d bytes but 'data_offsets' [%d,%d] span %d", shape_string(shape), dtype,
      bits / 8, begin, finish, finish - begin))
  end
  return { name = name, dtype = dtype, shape = shape, begin = begin, finish = finish }
end

-- Sorts the entries by offset and checks that they tile the data region from 0 to its end.
local function check_tiling(order, data_size, fail)
  table.sort(order, function(a, b)
    if a.begin ~= b.begin then return a.begin < b.begin end
    if a.finish ~= b.finish then return a.finish < b.finish end
    return a.name < b.name
  end)
  local position, previous = 0, nil
  for _, e in ipairs(order) do
    if e.begin > position then
      if previous then
        fail(string.format("tensor '%s': data_offsets [%d,%d] leave a gap of %d bytes after tensor '%s' (which ends at %d)",
          e.name, e.begin, e.finish, e.begin - position, previous.name, position))
      end
      fail(string.format("tensor '%s': data_offsets [%d,%d]: the first tensor must start at byte 0 of the data region",
        e.name, e.begin, e.finish))
    elseif e.begin < position then
      fail(string.format("tensor '%s': data_offsets [%d,%d] overlap tensor '%s' (which ends at %d)", e.name, e.begin,
        e.finish, previous.name, position))
    end
    if e.finish > data_size then
      fail(string.format("tensor '%s': data_offsets [%d,%d] run past the end of the file (the data region holds %d bytes: truncated?)",
        e.name, e.begin, e.finish, data_size))
    end
    position, previous = e.finish, e
  end
  if position ~= data_size then
    fail(string.format('the tensors end at byte %d of the data region but it holds %d bytes (%d bytes unaccounted for)',
      position, data_size, data_size - position))
  end
end

-- Parses and validates the header of a mapped file. Returns
--   { header_size, data_start, file_size, metadata, tensors = {name -> entry}, order = {entries by offset} }
-- where entry = { name, dtype (safetensors string), shape, begin, finish (data_offsets) }.
-- `fail(msg)` raises the error.
local function parse_header(ptr, file_size, fail)
  local n, header = read_header_json(ptr, file_size, fail)
  local data_size = file_size - 8 - n
  local info = { header_size = n, data_start = 8 + n, file_size = file_size, data_size = data_size,
                 metadata = {}, tensors = {}, order = {} }
  local names = {}
  for key in pairs(header) do names[#names + 1] = key end
  table.sort(names)
  for _, name in ipairs(names) do
    if name == '__metadata__' then
      read_metadata(header[name], info.metadata, fail)
    else
      local e = read_tensor_entry(name, header[name], fail)
      info.tensors[name] = e
      info.order[#info.order + 1] = e
    end
  end
  check_tiling(info.order, data_size, fail)
  return info
end

local function map(path, op)
  if type(path) ~= 'string' then error('safetensors.' .. op .. ': expects a path, got ' .. type(path), 3) end
  local m = C.pmp_map_file(path)
  if m == nil then error('safetensors: ' .. last_error(), 3) end
  return m
end

-- Runs fn(mapping) and releases the loader's reference to the mapping whatever happens.
local function with_mapping(path, op, fn)
  local m = map(path, op)
  local results = { pcall(fn, m) }
  C.pmp_mapping_release(m)
  if not results[1] then error(results[2], 3) end
  return unpack(results, 2, table.maxn(results))
end

local function failer(path)
  return function(msg) error('safetensors: ' .. path .. ': ' .. msg, 0) end
end

-- The validated header of a file: header_size, data_start, file_size, metadata, and tensors
-- (name -> {dtype = 'BF16', shape = {...}, data_offsets = {begin, end}}), plus `names` in file order.
function M.inspect(path)
  return with_mapping(path, 'inspect', function(m)
    local info = parse_header(ffi.cast('const uint8_t *', C.pmp_mapping_data(m)), tonumber(C.pmp_mapping_size(m)),
      failer(path))
    local out = { header_size = info.header_size, data_start = info.data_start, file_size = info.file_size,
                  metadata = info.metadata, tensors = {}, names = {} }
    for k, e in ipairs(info.order) do
      out.tensors[e.name] = { dtype = e.dtype, shape = e.shape, data_offsets = { e.begin, e.finish } }
      out.names[k] = e.name
    end
    return out
  end)
end

---------------------------------------------------------------------------------------------------
-- load

local shape_buffer = ffi.new('int64_t[8]')

local function resolve_dtype(dtype, op)
  if dtype == nil then return nil end
  local name = DTYPE_ALIASES[dtype] or dtype
  if not FLOAT[name] then
    error('safetensors.' .. op .. ": the dtype option must be a floating-point dtype (f64 f32 bf16 f16), got '" ..
      tostring(dtype) .. "'", 4)
  end
  return name
end

local function name_set(names, op)
  if names == nil then return nil end
  if type(names) ~= 'table' then error('safetensors.' .. op .. ': names must be a list of tensor names', 4) end
  local set, list = {}, {}
  for k, v in pairs(names) do
    local name = type(k) == 'number' and v or k
    if type(name) ~= 'string' then error('safetensors.' .. op .. ': names must be strings', 4) end
    if not set[name] then list[#list + 1] = name end
    set[name] = true
  end
  table.sort(list)
  return set, list
end

local function load_entry(m, base, info, e, dtype, copy, fail)
  local src = TO_PMP[e.dtype]
  if not src then
    fail(string.format("tensor '%s': dtype %s is not supported by pmp (supported: %s)", e.name, e.dtype, M.SUPPORTED))
  end
  local ndim = #e.shape
  if ndim > 8 then fail(string.format("tensor '%s': shape %s has %d dims; pmp supports at most 8", e.name,
    shape_string(e.shape), ndim)) end
  for k = 1, ndim do shape_buffer[k - 1] = e.shape[k] end
  local target = (dtype and FLOAT[src]) and dtype or src
  local src_id = C.pmp_dtype_from_name(src)
  local offset = info.data_start + e.begin
  local ptr
  if offset % C.pmp_dtype_size(src_id) == 0 then
    ptr = C.pmp_mapping_tensor(m, offset, src_id, shape_buffer, ndim)
    if ptr == nil then fail(string.format("tensor '%s': %s", e.name, last_error())) end
    if target == src and not copy then return tensor.wrap(ptr) end
  else
    -- Misaligned for its dtype (a file from a writer that does not align): copy the bytes out.
    local cpu = ffi.new('pmp_device', C.PMP_CPU, 0)
    ptr = C.pmp_empty(shape_buffer, ndim, src_id, cpu)
    if ptr == nil then fail(string.format("tensor '%s': %s", e.name, last_error())) end
    ffi.copy(ptr.data, base + offset, e.finish - e.begin)
    if target == src then return tensor.wrap(ptr) end
  end
  -- ptr is a temporary: convert or clone it, then drop it (a view releases its hold on the mapping).
  local out
  if target == src then
    out = C.pmp_clone(ptr)
  else
    out = C.pmp_to_dtype(ptr, C.pmp_dtype_from_name(target))
  end
  local err = out == nil and last_error()
  C.pmp_tensor_release(ptr)
  if err then fail(string.format("tensor '%s': %s", e.name, err)) end
  return tensor.wrap(out)
end

function M.load(path, options)
  options = options or {}
  if type(options) ~= 'table' then error('safetensors.load: options must be a table', 2) end
  local dtype = resolve_dtype(options.dtype, 'load')
  local wanted, wanted_list = name_set(options.names, 'load')
  return with_mapping(path, 'load', function(m)
    local fail = failer(path)
    local base = ffi.cast('const uint8_t *', C.pmp_mapping_data(m))
    local info = parse_header(base, tonumber(C.pmp_mapping_size(m)), fail)
    if wanted_list then
      for _, name in ipairs(wanted_list) do
        if not info.tensors[name] then fail(string.format("no tensor named '%s'", name)) end
      end
    end
    local out = {}
    for _, e in ipairs(info.order) do
      if not wanted or wanted[e.name] then
        out[e.name] = load_entry(m, base, info, e, dtype, options.copy, fail)
      end
    end
    return out, info.metadata
  end)
end

-- One view of the mapping over tensors that lie back to back in the file, in this order and of one
-- dtype (as a writer that sorts by name puts gate_proj before up_proj), with the given shape (of their
-- elements together). Returns nil when they are not so laid out. The view is copy-on-write like load's.
function M.load_joined(path, names, shape)
  return with_mapping(path, 'load_joined', function(m)
    local fail = failer(path)
    local info = parse_header(ffi.cast('const uint8_t *', C.pmp_mapping_data(m)), tonumber(C.pmp_mapping_size(m)), fail)
    local first = info.tensors[names[1]]
    if not first then fail(string.format("no tensor named '%s'", names[1])) end
    local finish = first.finish
    for k = 2, #names do
      local e = info.tensors[names[k]]
      if not e then fail(string.format("no tensor named '%s'", names[k])) end
      if e.dtype ~= first.dtype or e.begin ~= finish then return nil end
      finish = e.finish
    end
    local dtype = TO_PMP[first.dtype]
    local numel = 1
    for k = 1, #shape do
      shape_buffer[k - 1] = shape[k]
      numel = numel * shape[k]
    end
    local offset = info.data_start + first.begin
    if not dtype or numel * BITS[first.dtype] / 8 ~= finish - first.begin or offset % C.pmp_dtype_size(C.pmp_dtype_from_name(dtype)) ~= 0 then
      return nil
    end
    local ptr = C.pmp_mapping_tensor(m, offset, C.pmp_dtype_from_name(dtype), shape_buffer, #shape)
    if ptr == nil then fail(last_error()) end
    return tensor.wrap(ptr)
  end)
end

---------------------------------------------------------------------------------------------------
-- save

local Deferred = {}
Deferred.__index = Deferred

--- A tensor for save/save_sharded that exists only while it is written: dtype and shape go into the
--- header, and produce() is called when the writer reaches it; it returns a tensor (usually a view) with
--- that many elements in row-major order, in any layout and floating-point dtype, which the writer
--- converts to dtype on the way to the file (at most one tensor's temporary). Nothing is kept after.
function M.deferred(dtype, shape, produce)
  if not FROM_PMP[dtype] then error("safetensors.deferred: dtype '" .. tostring(dtype) .. "' has no safetensors form", 2) end
  if type(shape) ~= 'table' or type(produce) ~= 'function' then
    error('safetensors.deferred: expects a dtype, a shape table and a function', 2)
  end
  return setmetatable({ dtype = dtype, shape = shape, produce = produce }, Deferred)
end

local function is_deferred(t) return getmetatable(t) == Deferred end

local function check_tensors(tensors, op)
  if type(tensors) ~= 'table' then error('safetensors.' .. op .. ': expects a table name -> tensor', 3) end
  local names = {}
  for name, t in pairs(tensors) do
    if type(name) ~= 'string' or name == '' then
      error('safetensors.' .. op .. ': tensor names must be non-empty strings, got ' .. tostring(name), 3)
    end
    if name == '__metadata__' then error('safetensors.' .. op .. ": '__metadata__' cannot name a tensor", 3) end
    if not tensor.is_tensor(t) and not is_deferred(t) then
      error('safetensors.' .. op .. ": '" .. name .. "' is a " .. type(t) .. ', not a tensor', 3)
    end
    if not FROM_PMP[t.dtype] then
      error('safetensors.' .. op .. ": '" .. name .. "' has dtype " .. tostring(t.dtype) .. ' with no safetensors form', 3)
    end
    names[#names + 1] = name
  end
  return names
end

local function metadata_header(metadata, op)
  local md = { format = 'pt' }
  if metadata ~= nil then
    if type(metadata) ~= 'table' then error('safetensors.' .. op .. ': metadata must be a table of strings', 3) end
    for k, v in pairs(metadata) do
      if type(k) ~= 'string' then error('safetensors.' .. op .. ': metadata keys must be strings', 3) end
      if type(v) == 'number' then
        v = json.encode(v)
      elseif type(v) == 'boolean' then
        v = tostring(v)
      elseif type(v) ~= 'string' then
        error('safetensors.' .. op .. ": metadata '" .. k .. "' is a " .. type(v) .. '; values must be strings', 3)
      end
      md[k] = v
    end
  end
  return md
end

local function nbytes_of(t)
  if is_deferred(t) then
    local n = 1
    for _, size in ipairs(t.shape) do n = n * size end
    return n * C.pmp_dtype_size(C.pmp_dtype_from_name(t.dtype))
  end
  return t:numel() * t:element_size()
end

-- Writes a tensor's bytes; a deferred one is made now and must match its header entry.
local function write_entry(w, name, t)
  if not is_deferred(t) then return w:write_tensor(t) end
  local made = t.produce()
  local n = 1
  for _, size in ipairs(t.shape) do n = n * size end
  if not tensor.is_tensor(made) or made:numel() ~= n or (made.dtype ~= t.dtype and not (FLOAT[made.dtype] and FLOAT[t.dtype])) then
    error(string.format("deferred tensor '%s' produced %s, not %s %s", name,
      tensor.is_tensor(made) and (made.dtype .. ' ' .. shape_string(made.shape)) or type(made), t.dtype, shape_string(t.shape)), 0)
  end
  w:write_tensor(made, t.dtype)
end

-- The reference writer's layout order: larger dtypes first (every tensor stays aligned), then by name.
local function layout_order(tensors, names)
  table.sort(names, function(a, b)
    local ra, rb = RANK[FROM_PMP[tensors[a].dtype]], RANK[FROM_PMP[tensors[b].dtype]]
    if ra ~= rb then return ra > rb end
    return a < b
  end)
  return names
end

-- The complete header (8-byte size + padded JSON) for tensors laid out in `names` order.
local function build_header(tensors, names, md)
  local parts = { '{"__metadata__":' .. json.encode(md) }
  local offset = 0
  for _, name in ipairs(names) do
    local t = tensors[name]
    local size = nbytes_of(t)
    parts[#parts + 1] = string.format('%s:{"dtype":"%s","shape":%s,"data_offsets":[%d,%d]}', json.encode(name),
      FROM_PMP[t.dtype], shape_string(t.shape), offset, offset + size)
    offset = offset + size
  end
  local text = table.concat(parts, ',') .. '}'
  text = text .. string.rep(' ', (8 - #text % 8) % 8)
  local n = #text
  local size_bytes = {}
  for i = 1, 8 do
    size_bytes[i] = string.char(n % 256)
    n = math.floor(n / 256)
  end
  return table.concat(size_bytes) .. text, offset
end

-- Writes tensors (name -> tensor, any layout or device, or M.deferred) to path atomically. metadata: string -> string
-- (numbers are written as their JSON text); "format" defaults to "pt". Returns the file size in bytes.
function M.save(path, tensors, metadata)
  if type(path) ~= 'string' or path == '' then error('safetensors.save: expects a path', 2) end
  local names = layout_order(tensors, check_tensors(tensors, 'save'))
  local header = build_header(tensors, names, metadata_header(metadata, 'save'))
  pio.remove_stale_temporaries(pio.dirname(path), pio.basename(path) .. '.tmp.')   -- a killed save's
  local ok, result = pcall(pio.write_atomic, path, function(w)
    w:write(header)
    for _, name in ipairs(names) do write_entry(w, name, tensors[name]) end
  end)
  if not ok then error('safetensors.save: ' .. tostring(result):gsub('^pmp%.io%.write_atomic: ', ''), 2) end
  return result
end

---------------------------------------------------------------------------------------------------
-- Sharded directories (Hugging Face layout)

M.INDEX_NAME = 'model.safetensors.index.json'
M.SINGLE_NAME = 'model.safetensors'

-- "5GB" -> 5e9, "500MiB" -> 500 * 2^20, as huggingface_hub parses sizes; numbers pass through.
function M.parse_size(size)
  if type(size) == 'number' then return size end
  if type(size) ~= 'string' then error('safetensors: a size must be a number of bytes or a string like "5GB"', 3) end
  local number, unit = size:upper():match('^%s*([%d%.]+)%s*(%a*)%s*$')
  local units = { [''] = 1, B = 1, KB = 1e3, MB = 1e6, GB = 1e9, TB = 1e12, KIB = 2^10, MIB = 2^20, GIB = 2^30, TIB = 2^40 }
  if not number or not tonumber(number) or not units[unit] then
    error("safetensors: cannot read the size '" .. size .. "' (e.g. 5GB, 500MB, 2GiB)", 3)
  end
  return math.floor(tonumber(number) * units[unit])
end

-- Orders names as people read them: digit runs compare as numbers (layers.2 before layers.10).
function M.natural_less(a, b)
  local i, j = 1, 1
  while i <= #a and j <= #b do
    local da, db = a:match('^%d+', i), b:match('^%d+', j)
    if da and db then
      local na, nb = tonumber(da), tonumber(db)
      if na ~= nb then return na < nb end
      if #da ~= #db then return #da < #db end
      i, j = i + #da, j + #db
    else
      local ca, cb = a:byte(i), b:byte(j)
      if ca ~= cb then return ca < cb end
      i, j = i + 1, j + 1
    end
  end
  return #a - i < #b - j
end

local function shard_name(prefix, i, n)
  if n == 1 then return prefix .. '.safetensors' end
  return string.format('%s-%05d-of-%05d.safetensors', prefix, i, n)
end

-- Splits the names (in order) into shards the way huggingface_hub does: a tensor larger than the limit
-- gets a shard of its own; otherwise a new shard starts when the next tensor would pass the limit.
local function plan_shards(tensors, names, max_size)
  local shards, current, current_size, total = {}, {}, 0, 0
  for _, name in ipairs(names) do
    local size = nbytes_of(tensors[name])
    total = total + size
    if size > max_size then
      shards[#shards + 1] = { name }
    else
      if current_size + size > max_size then
        shards[#shards + 1] = current
        current, current_size = {}, 0
      end
      current[#current + 1] = name
      current_size = current_size + size
    end
  end
  if #current > 0 or #shards == 0 then shards[#shards + 1] = current end
  return shards, total
end

-- Writes tensors into dir as `model.safetensors`, or as `model-0000i-of-0000N.safetensors` shards plus
-- `model.safetensors.index.json` when they pass max_shard_size (default "5GB"). Every file is written
-- atomically; the index last. Shard files of an earlier save that the new index does not list are
-- removed. options: max_shard_size, metadata (each shard's __metadata__), order (list of names: the
-- order tensors fill shards; default: natural name order), prefix (default 'model').
-- Returns the index table, or nil when everything fit in one file.
function M.save_sharded(dir, tensors, options)
  options = options or {}
  if type(dir) ~= 'string' or dir == '' then error('safetensors.save_sharded: expects a directory', 2) end
  local names = check_tensors(tensors, 'save_sharded')
  local max_size = M.parse_size(options.max_shard_size or '5GB')
  if max_size <= 0 then error('safetensors.save_sharded: max_shard_size must be positive', 2) end
  local prefix = options.prefix or 'model'
  if options.order then
    local seen = {}
    for _, name in ipairs(options.order) do
      if tensors[name] == nil then error("safetensors.save_sharded: order names '" .. tostring(name) .. "', which is not among the tensors", 2) end
      seen[name] = true
    end
    for _, name in ipairs(names) do
      if not seen[name] then error("safetensors.save_sharded: order leaves out '" .. name .. "'", 2) end
    end
    names = options.order
  else
    table.sort(names, M.natural_less)
  end
  local shards, total = plan_shards(tensors, names, max_size)
  pio.mkdir_p(dir)
  local index_path = dir .. '/' .. prefix .. '.safetensors.index.json'
  local keep, weight_map = {}, {}
  local n = #shards
  for i, shard in ipairs(shards) do
    local file = shard_name(prefix, i, n)
    local part = {}
    for _, name in ipairs(shard) do
      part[name] = tensors[name]
      weight_map[name] = file
    end
    local ok, err = pcall(M.save, dir .. '/' .. file, part, options.metadata)
    if not ok then error(err, 2) end
    keep[file] = true
  end
  local index = nil
  if n > 1 then
    index = { metadata = { total_size = total }, weight_map = weight_map }
    pio.write_atomic(index_path, json.encode(index, { indent = 2 }) .. '\n')
    keep[prefix .. '.safetensors.index.json'] = true
  end
  -- Remove what an earlier save left that the new layout does not use.
  local pattern = '^' .. prefix:gsub('%p', '%%%0') .. '%-%d+%-of%-%d+%.safetensors$'
  for _, name in ipairs(pio.listdir(dir)) do
    if not keep[name] and (name:match(pattern) or name == prefix .. '.safetensors'
        or name == prefix .. '.safetensors.index.json') then
      pio.remove(dir .. '/' .. name)
    end
  end
  return index
end

-- The files of a directory written by save_sharded or by Hugging Face, without reading any tensor:
-- the index's weight_map when there is model.safetensors.index.json, else model.safetensors. Returns
-- the paths (in natural order), name -> path for the tensors wanted (options.names, default all; nil
-- for a single file, whose header lists them), and the index table (nil for a single file).
-- options: names, prefix (default 'model').
function M.shard_files(dir, options)
  options = options or {}
  if type(dir) ~= 'string' then error('safetensors.load_sharded: expects a directory', 3) end
  local prefix = options.prefix or 'model'
  if not pio.is_dir(dir) then error('safetensors.load_sharded: ' .. dir .. ' is not a directory', 0) end
  local index_path = dir .. '/' .. prefix .. '.safetensors.index.json'
  if not pio.is_file(index_path) then
    local single = dir .. '/' .. prefix .. '.safetensors'
    if not pio.is_file(single) then
      error('safetensors.load_sharded: ' .. dir .. ' has neither ' .. prefix .. '.safetensors.index.json nor ' ..
        prefix .. '.safetensors', 3)
    end
    return { single }, nil, nil
  end
  local function fail(msg) error('safetensors: ' .. index_path .. ': ' .. msg, 4) end
  local ok, index = pcall(json.read, index_path)
  if not ok then error('safetensors: ' .. tostring(index), 3) end
  if type(index) ~= 'table' or json.is_array(index) then fail('not a JSON object') end
  local weight_map = index.weight_map
  if type(weight_map) ~= 'table' or json.is_array(weight_map) then fail("missing the 'weight_map' object") end
  local wanted, wanted_list = name_set(options.names, 'load_sharded')
  local path_of, seen, files = {}, {}, {}
  for name, file in pairs(weight_map) do
    if type(file) ~= 'string' or file == '' then fail(string.format("weight_map entry '%s' is not a file name", name)) end
    if file:sub(1, 1) == '/' or file:match('^%.%./') or file:match('/%.%./') or file:match('/%.%.$') or file == '..' then
      fail(string.format("weight_map entry '%s' names '%s', outside the directory", name, file))
    end
    if not wanted or wanted[name] then
      local path = dir .. '/' .. file
      if not seen[path] then
        if not pio.is_file(path) then
          fail(string.format("weight_map puts tensor '%s' in %s, which does not exist", name, file))
        end
        seen[path] = true
        files[#files + 1] = path
      end
      path_of[name] = path
    end
  end
  if wanted_list then
    for _, name in ipairs(wanted_list) do
      if weight_map[name] == nil then fail(string.format("weight_map has no tensor named '%s'", name)) end
    end
  end
  table.sort(files, M.natural_less)
  return files, path_of, index
end

-- Loads a directory written by save_sharded or by Hugging Face (see shard_files; a path to a
-- .safetensors file also works). options as for load (dtype, names, copy) and prefix. Returns tensors,
-- the first shard's __metadata__, and the index table (nil for a single file).
function M.load_sharded(dir, options)
  options = options or {}
  if type(dir) == 'string' and pio.is_file(dir) then return M.load(dir, options) end
  local files, path_of, index = M.shard_files(dir, options)
  if not index then
    local tensors, metadata = M.load(files[1], options)
    return tensors, metadata, nil
  end
  local by_file = {}
  for name, path in pairs(path_of) do
    by_file[path] = by_file[path] or {}
    table.insert(by_file[path], name)
  end
  local out, metadata = {}, nil
  for _, path in ipairs(files) do
    local tensors, md = M.load(path, { dtype = options.dtype, copy = options.copy, names = by_file[path] })
    metadata = metadata or md
    for name, t in pairs(tensors) do out[name] = t end
  end
  return out, metadata or {}, index
end

-- The pmp dtype name of a safetensors dtype ('BF16' -> 'bf16'), or nil when pmp has none.
function M.pmp_dtype(st_dtype) return TO_PMP[st_dtype] end

return M
