--- Megatron-LM indexed datasets (.bin/.idx), docs/formats.md §5.1: a reader over memory mappings of both
--- files and a builder that writes them atomically. Files are interchangeable with
--- megatron.core.datasets.indexed_dataset (tools/check_indexed_megatron.py checks both directions).
--
--   local ds = pmp.data.indexed.open(prefix)        -- reads prefix.idx and prefix.bin, validated
--   #ds                                             -- sequences (S)
--   ds:get(i)  ds:get(i, offset, length)            -- sequence i (0-based, as Megatron) as a 1-D tensor
--   ds:length(i)  ds:num_documents()  ds:document(d) -- tokens of sequence i; documents; d's sequences
--   ds.sequence_lengths (i32 [S])  ds.sequence_pointers (i64 [S])  ds.document_indices (i64 [D])
--   ds.dtype ('uint16', 'int32', ...)  ds.dtype_code  ds.itemsize  ds.sequence_count  ds.document_count
--   ds:pointer(i, offset)                           -- typed cdata pointer into the .bin mapping
--   ds:close()                                      -- drop the mappings now (views keep their own hold)
--
--   local b = pmp.data.indexed.builder(prefix, {dtype = 'uint16'} or {vocab_size = n})
--   b:add_item(tokens)  b:end_document()            -- one sequence at a time, then close the document
--   b:add_document(tokens, lengths)                 -- lengths: tokens per sequence (default {#tokens})
--   b:add_index(other_prefix)                       -- append another dataset (same dtype)
--   b:finalize()                                    -- prefix.bin and prefix.idx appear atomically
--   b:abort()                                       -- discard (also what happens to an unfinalized builder)
--
-- Zero copy: the .bin is mapped (copy-on-write, so in-place writes to a view never reach the file) and
-- ds:get returns a view of the mapping for the dtypes pmp tensors hold (uint16, int32, int64, uint8,
-- float32, float64). pmp has no 16- or 8-bit signed integer dtype, so for int16 and int8 data ds:get
-- returns an i32 copy of the requested range; ds:pointer gives zero-copy access for every dtype, and
-- the GPT dataset reads through it. The .idx arrays start at byte 34 (not aligned for int32/int64), so the tensors
-- ds.sequence_lengths / sequence_pointers / document_indices are aligned copies made on first use;
-- the reader itself reads the mapping in place.
--
-- Every problem with a file is a Lua error "indexed dataset: <path>: <what is wrong>".
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local pio = require 'pmp.io'
local tensor = require 'pmp.tensor'

local M = {}

M.MAGIC = 'MMIDIDX\0\0'
M.VERSION = 1
M.HEADER_SIZE = 34

-- DType codes of megatron.core.datasets.indexed_dataset.DType. `pmp`: the tensor dtype that holds
-- the values as they are (zero-copy views); the others are copied to i32 by get().
M.DTYPES = {
  [1] = { code = 1, name = 'uint8', ctype = 'uint8_t', size = 1, pmp = 'u8', min = 0, max = 255 },
  [2] = { code = 2, name = 'int8', ctype = 'int8_t', size = 1, min = -128, max = 127 },
  [3] = { code = 3, name = 'int16', ctype = 'int16_t', size = 2, min = -32768, max = 32767 },
  [4] = { code = 4, name = 'int32', ctype = 'int32_t', size = 4, pmp = 'i32', min = -2^31, max = 2^31 - 1 },
  [5] = { code = 5, name = 'int64', ctype = 'int64_t', size = 8, pmp = 'i64', min = -2^53, max = 2^53 },
  [6] = { code = 6, name = 'float64', ctype = 'double', size = 8, pmp = 'f64', float = true },
  [7] = { code = 7, name = 'float32', ctype = 'float', size = 4, pmp = 'f32', float = true },
  [8] = { code = 8, name = 'uint16', ctype = 'uint16_t', size = 2, pmp = 'u16', min = 0, max = 65535 },
}
local BY_NAME = {}
for _, d in pairs(M.DTYPES) do
  d.ptr_t = ffi.typeof('const ' .. d.ctype .. ' *')
  d.array_t = ffi.typeof(d.ctype .. '[?]')
  BY_NAME[d.name] = d
end
BY_NAME.u8, BY_NAME.i32, BY_NAME.i64, BY_NAME.u16, BY_NAME.i16, BY_NAME.i8 =
  BY_NAME.uint8, BY_NAME.int32, BY_NAME.int64, BY_NAME.uint16, BY_NAME.int16, BY_NAME.int8
BY_NAME.f32, BY_NAME.f64 = BY_NAME.float32, BY_NAME.float64

-- The dtype Megatron's preprocess_data picks for a vocabulary (DType.optimal_dtype).
function M.optimal_dtype(vocab_size)
  if vocab_size ~= nil and vocab_size < 65500 then return 'uint16' end
  return 'int32'
end

function M.dtype_info(name_or_code)
  local d = type(name_or_code) == 'number' and M.DTYPES[name_or_code] or BY_NAME[name_or_code]
  if not d then error("indexed dataset: unknown dtype '" .. tostring(name_or_code) .. "'", 2) end
  return d
end

function M.idx_path(prefix) return prefix .. '.idx' end
function M.bin_path(prefix) return prefix .. '.bin' end

-- True when prefix.idx and prefix.bin both exist.
function M.exists(prefix)
  return pio.is_file(prefix .. '.idx') and pio.is_file(prefix .. '.bin')
end

local function last_error() return ffi.string(C.pmp_last_error()) end

local function u64_at(p)
  local v = ffi.cast('const uint64_t *', p)[0]   -- unaligned loads are fine on x86-64 and arm64
  if v >= 9007199254740992ULL then return math.huge end
  return tonumber(v)
end

-- An int64 cdata as a plain decimal string.
local function i64s(x) return (tostring(x):gsub('U?LL$', '')) end

---------------------------------------------------------------------------------------------------
-- Objects with a length: Lua 5.1 tables ignore __len, so datasets are userdata proxies whose
-- metatable forwards field reads to a state table and methods to a class table.

local function make_object(state, class, lazy, gc)
  local proxy = newproxy(true)
  local mt = getmetatable(proxy)
  mt.__index = function(_, key)
    local v = state[key]
    if v ~= nil then return v end
    v = class[key]
    if v ~= nil then return v end
    local make = lazy and lazy[key]
    if make then
      v = make(state)
      state[key] = v
      return v
    end
    return nil
  end
  mt.__newindex = state
  mt.__len = function() return state.sequence_count end
  mt.__tostring = class.__tostring and function() return class.__tostring(state) end
  mt.__gc = gc and function() gc(state) end
  return proxy
end

---------------------------------------------------------------------------------------------------
-- Reader

local Reader = {}

local function reader_fail(path, msg) error('indexed dataset: ' .. path .. ': ' .. msg, 0) end

local function release(state)
  if state.idx_map ~= nil then C.pmp_mapping_release(state.idx_map) end
  if state.bin_map ~= nil then C.pmp_mapping_release(state.bin_map) end
  state.idx_map, state.bin_map = nil, nil
  state.closed = true
end

-- Validates a mapped .idx against the size of the .bin; fills `state`.
local function parse_index(state, idx_path, bin_path, base, size, bin_size, options)
  local function fail(msg) reader_fail(idx_path, msg) end
  if size < M.HEADER_SIZE then
    fail(string.format('file is %d bytes, shorter than the %d-byte header (truncated?)', size, M.HEADER_SIZE))
  end
  if ffi.string(base, 9) ~= M.MAGIC then
    fail('bad magic ' .. string.format('%q', ffi.string(base, 9)) .. ' (expected "MMIDIDX\\0\\0": not a Megatron .idx file)')
  end
  local version = u64_at(base + 9)
  if version ~= M.VERSION then fail(string.format('unsupported version %s (expected 1)', tostring(version))) end
  local code = base[17]
  local d = M.DTYPES[code]
  if not d then fail(string.format('unknown dtype code %d (expected 1..8)', code)) end
  local S, D = u64_at(base + 18), u64_at(base + 26)
  if S == math.huge or D == math.huge then fail('sequence or document count is absurdly large (corrupt header)') end
  local base_size = M.HEADER_SIZE + 12 * S + 8 * D
  local has_modes
  if size == base_size then
    has_modes = false
  elseif size == base_size + S and S > 0 then
    has_modes = true    -- multimodal: one int8 mode per sequence follows
  elseif size < base_size then
    fail(string.format('file is %d bytes but %d sequences and %d document indices need %d (truncated?)',
      size, S, D, base_size))
  else
    fail(string.format('file is %d bytes but %d sequences and %d document indices need %d (%d bytes too many)',
      size, S, D, base_size, size - base_size))
  end
  if options.multimodal == true and not has_modes then fail('no sequence modes (not a multimodal dataset)') end
  if D < 1 then fail('document count is 0 (document indices must start with 0 and end with the sequence count)') end

  local lengths = ffi.cast('const int32_t *', base + M.HEADER_SIZE)
  local pointers = ffi.cast('const int64_t *', base + M.HEADER_SIZE + 4 * S)
  local docs = ffi.cast('const int64_t *', base + M.HEADER_SIZE + 12 * S)
  local itemsize = d.size
  local expect = 0
  for i = 0, S - 1 do
    local len = lengths[i]
    if len < 0 then fail(string.format('sequence %d has negative length %d', i, len)) end
    if pointers[i] ~= expect then
      fail(string.format('sequence %d: pointer %s but the lengths before it put it at byte %d', i,
        i64s(pointers[i]), expect))
    end
    expect = expect + len * itemsize
  end
  if docs[0] ~= 0 then fail('document indices start with ' .. i64s(docs[0]) .. ', not 0') end
  for k = 1, D - 1 do
    if docs[k] < docs[k - 1] then
      fail(string.format('document indices decrease at entry %d (%s after %s)', k, i64s(docs[k]), i64s(docs[k - 1])))
    end
  end
  if docs[D - 1] ~= S then
    fail(string.format('the last document index is %s, not the sequence count %d', i64s(docs[D - 1]), S))
  end
  if expect ~= bin_size then
    reader_fail(bin_path, string.format('file is %d bytes but %s says its %d sequences of %s hold %d bytes%s',
      bin_size, idx_path, S, d.name, expect, bin_size < expect and ' (truncated?)' or ''))
  end
  state.dtype_info, state.dtype, state.dtype_code, state.itemsize = d, d.name, code, itemsize
  state.sequence_count, state.document_count = S, D
  state.lengths_ptr, state.pointers_ptr, state.docs_ptr = lengths, pointers, docs
  state.modes_ptr = has_modes and ffi.cast('const int8_t *', base + M.HEADER_SIZE + 12 * S + 8 * D) or nil
  state.multimodal = has_modes
  state.num_tokens = expect / itemsize
end

-- Aligned tensor copies of the index arrays, made on first use.
local function copy_tensor(ptr, n, dtype, elem_size)
  local t = tensor.empty({ n }, { dtype = dtype })
  if n > 0 then ffi.copy(t.ptr.data, ptr, n * elem_size) end
  return t
end
local lazy = {
  sequence_lengths = function(s) return copy_tensor(s.lengths_ptr, s.sequence_count, 'i32', 4) end,
  sequence_pointers = function(s) return copy_tensor(s.pointers_ptr, s.sequence_count, 'i64', 8) end,
  document_indices = function(s) return copy_tensor(s.docs_ptr, s.document_count, 'i64', 8) end,
  sequence_modes = function(s)
    if not s.modes_ptr then return false end
    local t = tensor.empty({ s.sequence_count }, { dtype = 'i32' })
    local dst = ffi.cast('int32_t *', t.ptr.data)
    for i = 0, s.sequence_count - 1 do dst[i] = s.modes_ptr[i] end
    return t
  end,
}

-- Opens prefix.idx and prefix.bin (or options.idx_path / options.bin_path). options.multimodal = true
-- requires the per-sequence modes; without it they are read when present.
function M.open(prefix, options)
  options = options or {}
  if type(prefix) ~= 'string' then error('indexed dataset: open expects a path prefix, got ' .. type(prefix), 2) end
  local idx_path = options.idx_path or prefix .. '.idx'
  local bin_path = options.bin_path or prefix .. '.bin'
  local state = { path_prefix = prefix, idx_path = idx_path, bin_path = bin_path }
  local idx_map = C.pmp_map_file(idx_path)
  if idx_map == nil then error('indexed dataset: ' .. last_error(), 2) end
  state.idx_map = idx_map
  local bin_map = C.pmp_map_file(bin_path)
  if bin_map == nil then
    local msg = last_error()
    release(state)
    error('indexed dataset: ' .. msg, 2)
  end
  state.bin_map = bin_map
  local ok, err = pcall(parse_index, state, idx_path, bin_path,
    ffi.cast('const uint8_t *', C.pmp_mapping_data(idx_map)), tonumber(C.pmp_mapping_size(idx_map)),
    tonumber(C.pmp_mapping_size(bin_map)), options)
  if not ok then
    release(state)
    error(err, 2)
  end
  state.bin_base = ffi.cast('const uint8_t *', C.pmp_mapping_data(bin_map))
  state.data_ptr = ffi.cast(state.dtype_info.ptr_t, state.bin_base)
  return make_object(state, Reader, lazy, release)
end
M.IndexedDataset = M.open

function Reader.__tostring(s)
  return string.format('IndexedDataset(%s: %d sequences, %d documents, %s)', s.path_prefix, s.sequence_count,
    s.document_count - 1, s.dtype)
end

local function check_open(s)
  if s.closed then error('indexed dataset: ' .. s.path_prefix .. ': used after close()', 3) end
end

local function check_range(s, i, offset, length)
  check_open(s)
  if type(i) ~= 'number' or i ~= math.floor(i) or i < 0 or i >= s.sequence_count then
    error(string.format('indexed dataset: %s: sequence %s out of range [0, %d)', s.path_prefix, tostring(i),
      s.sequence_count), 3)
  end
  local n = s.lengths_ptr[i]
  offset = offset or 0
  length = length or n - offset
  if offset < 0 or offset > n or length < 0 or offset + length > n then
    error(string.format('indexed dataset: %s: tokens [%d, %d) of sequence %d are outside its %d tokens',
      s.path_prefix, offset, offset + length, i, n), 3)
  end
  return offset, length
end

-- Tokens in sequence i.
function Reader:length(i)
  local s = self
  check_range(s, i)
  return s.lengths_ptr[i]
end

function Reader:num_documents() return self.document_count - 1 end

-- The sequences of document d (0-based): first, last + 1.
function Reader:document(d)
  if type(d) ~= 'number' or d < 0 or d >= self.document_count - 1 then
    error(string.format('indexed dataset: %s: document %s out of range [0, %d)', self.path_prefix, tostring(d),
      self.document_count - 1), 2)
  end
  return tonumber(self.docs_ptr[d]), tonumber(self.docs_ptr[d + 1])
end

-- A typed pointer to token `offset` of sequence i, pointing into the mapping (valid while the dataset
-- is open), and the number of tokens from there to the end of the sequence.
function Reader:pointer(i, offset)
  offset = check_range(self, i, offset, 0)
  return self.data_ptr + (tonumber(self.pointers_ptr[i]) / self.itemsize + offset), self.lengths_ptr[i] - offset
end

local shape1 = ffi.new('int64_t[1]')
-- Sequence i, or `length` tokens of it from `offset`, as a 1-D tensor: a view of the mapping for
-- dtypes pmp holds, an i32 copy for int16/int8.
function Reader:get(i, offset, length)
  local s = self
  offset, length = check_range(s, i, offset, length)
  local d = s.dtype_info
  local byte_offset = tonumber(s.pointers_ptr[i]) + offset * d.size
  if d.pmp then
    shape1[0] = length
    local ptr = C.pmp_mapping_tensor(s.bin_map, byte_offset, C.pmp_dtype_from_name(d.pmp), shape1, 1)
    if ptr == nil then error('indexed dataset: ' .. s.bin_path .. ': ' .. last_error(), 2) end
    return tensor.wrap(ptr)
  end
  local t = tensor.empty({ length }, { dtype = 'i32' })
  local src = ffi.cast(d.ptr_t, s.bin_base + byte_offset)
  local dst = ffi.cast('int32_t *', t.ptr.data)
  for k = 0, length - 1 do dst[k] = src[k] end
  return t
end

-- Copies `length` tokens of sequence i from `offset` into dst (an int64_t pointer) as int64.
function Reader:read_into(dst, i, offset, length)
  local s = self
  offset, length = check_range(s, i, offset, length)
  local src = s.data_ptr + (tonumber(s.pointers_ptr[i]) / s.itemsize + offset)
  for k = 0, length - 1 do dst[k] = src[k] end
  return length
end

-- Sequence i (or a range) as a Lua table of numbers.
function Reader:totable(i, offset, length)
  offset, length = check_range(self, i, offset, length)
  local src = self.data_ptr + (tonumber(self.pointers_ptr[i]) / self.itemsize + offset)
  local out = {}
  for k = 0, length - 1 do out[k + 1] = tonumber(src[k]) end
  return out
end

function Reader:close() release(self) end

---------------------------------------------------------------------------------------------------
-- Growable native arrays (the builder's index stays out of Lua tables: 4 + 8 bytes per sequence).

local Vec = {}
Vec.__index = Vec
local function vec(ctype, capacity)
  capacity = capacity or 1024
  return setmetatable({ ctype = ctype, array_t = ffi.typeof(ctype .. '[?]'), n = 0, cap = capacity,
    data = ffi.new(ctype .. '[?]', capacity) }, Vec)
end
function Vec:reserve(n)
  if n <= self.cap then return end
  local cap = self.cap
  while cap < n do cap = cap * 2 end
  local data = self.array_t(cap)
  ffi.copy(data, self.data, self.n * ffi.sizeof(self.ctype))
  self.data, self.cap = data, cap
end
function Vec:push(x)
  local n = self.n
  if n == self.cap then self:reserve(n + 1) end
  self.data[n] = x
  self.n = n + 1
end
M._vec = vec

---------------------------------------------------------------------------------------------------
-- Builder

local Builder = {}
Builder.__index = Builder

local function builder_fail(b, msg, level) error('indexed dataset builder: ' .. b.prefix .. ': ' .. msg, (level or 2) + 1) end

-- prefix: output prefix (writes prefix.bin, prefix.idx). options.dtype: a dtype name or code; else
-- options.vocab_size picks uint16 or int32 as Megatron does; else int32 (IndexedDatasetBuilder's default).
function M.builder(prefix, options)
  options = options or {}
  if type(prefix) ~= 'string' or prefix == '' then error('indexed dataset builder: expects an output prefix', 2) end
  local d
  if options.dtype ~= nil then
    d = M.DTYPES[options.dtype] or BY_NAME[options.dtype]
    if not d then error("indexed dataset builder: unknown dtype '" .. tostring(options.dtype) .. "'", 2) end
  else
    d = BY_NAME[M.optimal_dtype(options.vocab_size)]
  end
  local dir = pio.dirname(prefix)
  if not pio.is_dir(dir) then pio.mkdir_p(dir) end
  pio.remove_stale_temporaries(dir, pio.basename(prefix) .. '.')   -- a killed build's .bin/.idx temporaries
  local pid = C.pmp_getpid()
  local b = setmetatable({
    prefix = prefix, dtype_info = d, dtype = d.name, itemsize = d.size,
    bin_final = prefix .. '.bin', idx_final = prefix .. '.idx',
    bin_tmp = prefix .. '.bin.tmp.' .. pid,
    lengths = vec('int32_t'), docs = vec('int64_t'),
    staging = d.array_t(4096), staging_cap = 4096,
    bytes = 0, open = true,
  }, Builder)
  b.docs:push(0)
  b.fd = C.pmp_file_open_write(b.bin_tmp)
  if b.fd < 0 then error('indexed dataset builder: ' .. last_error(), 2) end
  -- An abandoned builder (never finalized) leaves no temporary file behind.
  b.guard = newproxy(true)
  getmetatable(b.guard).__gc = function() if b.open then b:abort() end end
  return b
end
M.IndexedDatasetBuilder = M.builder

local tensor_is = tensor.is_tensor

-- Writes tokens (a Lua table of integers, an integer tensor, or a cdata pointer with `count`) to the
-- .bin in the builder's dtype; returns the number of tokens written.
local function write_tokens(b, tokens, count, level)
  if not b.open then builder_fail(b, 'already finalized or aborted', level + 1) end
  local d = b.dtype_info
  local n, get
  if type(tokens) == 'table' then
    n = #tokens
  elseif tensor_is(tokens) then
    if tokens:dim() ~= 1 then builder_fail(b, 'tokens must be a 1-D tensor', level + 1) end
    local dt = tokens.dtype
    if dt ~= 'i64' and dt ~= 'i32' and dt ~= 'u8' and not d.float then
      builder_fail(b, 'tokens must be an integer tensor, got ' .. dt, level + 1)
    end
    tokens = tokens:to('cpu'):contiguous()
    if tokens.dtype ~= 'i64' then tokens = tokens:to('i64') end
    n = tokens:numel()
  elseif type(tokens) == 'cdata' then
    if type(count) ~= 'number' then builder_fail(b, 'a token pointer needs a count', level + 1) end
    n, get = count, tokens
  else
    builder_fail(b, 'tokens must be a table, a tensor or a pointer, got ' .. type(tokens), level + 1)
  end
  if n == 0 then return 0 end
  if n > b.staging_cap then
    local cap = b.staging_cap
    while cap < n do cap = cap * 2 end
    b.staging, b.staging_cap = d.array_t(cap), cap
  end
  local buf, lo, hi = b.staging, d.min, d.max
  -- the tensor's data is taken only now, after the staging allocation above: a converted copy has
  -- no other reference, and a collection in between could free it under the pointer
  if tensor_is(tokens) then get = ffi.cast('const int64_t *', tokens.ptr.data) end
  if get then
    for k = 0, n - 1 do
      local v = get[k]
      if not d.float and (v < lo or v > hi) then
        builder_fail(b, string.format('token %s at position %d does not fit %s', i64s(v), k + 1, d.name), level + 1)
      end
      buf[k] = v
    end
  else
    for k = 1, n do
      local v = tokens[k]
      if type(v) ~= 'number' or (not d.float and (v ~= math.floor(v) or v < lo or v > hi)) then
        builder_fail(b, string.format('token %s at position %d does not fit %s', tostring(v), k, d.name), level + 1)
      end
      buf[k - 1] = v
    end
  end
  if C.pmp_file_write(b.fd, buf, n * d.size, b.bin_tmp) ~= 0 then builder_fail(b, last_error(), level + 1) end
  b.bytes = b.bytes + n * d.size
  return n
end

-- One sequence, not yet closing a document (Megatron's add_item); follow with end_document().
function Builder:add_item(tokens, count)
  local n = write_tokens(self, tokens, count, 2)
  self.lengths:push(n)
end

-- A whole document: tokens, split into sequences of `lengths` (default: one sequence). An empty
-- document (no tokens, no lengths) repeats the last document index, as Megatron's builder does.
function Builder:add_document(tokens, lengths, count)
  local n = write_tokens(self, tokens, count, 2)
  if lengths == nil then
    if n > 0 then self.lengths:push(n) end
  else
    if type(lengths) ~= 'table' then builder_fail(self, 'lengths must be a table of integers') end
    local total = 0
    for k = 1, #lengths do
      local len = lengths[k]
      if type(len) ~= 'number' or len < 0 or len ~= math.floor(len) then
        builder_fail(self, 'lengths[' .. k .. '] is not a non-negative integer')
      end
      total = total + len
      self.lengths:push(len)
    end
    if total ~= n then builder_fail(self, string.format('lengths add up to %d but the document has %d tokens', total, n)) end
  end
  self.docs:push(self.lengths.n)
end

function Builder:end_document()
  if not self.open then builder_fail(self, 'already finalized or aborted') end
  self.docs:push(self.lengths.n)
end

-- Appends the dataset at other_prefix (same dtype): its sequences, its documents, its .bin bytes.
function Builder:add_index(other_prefix)
  if not self.open then builder_fail(self, 'already finalized or aborted') end
  local other = M.open(other_prefix)
  if other.dtype ~= self.dtype then
    local got = other.dtype
    other:close()
    builder_fail(self, string.format('cannot add %s: its dtype is %s, this builder writes %s', other_prefix, got, self.dtype))
  end
  local offset = self.lengths.n
  local S, D = other.sequence_count, other.document_count
  self.lengths:reserve(self.lengths.n + S)
  local lengths = other.lengths_ptr
  for i = 0, S - 1 do self.lengths:push(lengths[i]) end
  self.docs:reserve(self.docs.n + D)
  for k = 1, D - 1 do self.docs:push(offset + other.docs_ptr[k]) end
  local nbytes = other.num_tokens * other.itemsize
  if C.pmp_file_write(self.fd, other.bin_base, nbytes, self.bin_tmp) ~= 0 then
    other:close()
    builder_fail(self, last_error())
  end
  self.bytes = self.bytes + nbytes
  other:close()
end

-- Tokens and sequences written so far.
function Builder:counts() return self.bytes / self.itemsize, self.lengths.n, self.docs.n - 1 end

-- Writes prefix.idx and puts prefix.bin in place: both are written to temporary files, fsynced and
-- renamed, the .bin first, so a reader never sees a half-written file.
function Builder:finalize()
  if not self.open then builder_fail(self, 'already finalized or aborted') end
  self.open = false
  local fd = self.fd
  self.fd = -1
  if C.pmp_file_sync_close(fd, self.bin_tmp) ~= 0 then
    local msg = last_error()
    C.pmp_file_remove(self.bin_tmp)
    builder_fail(self, msg)
  end
  local S, D, itemsize = self.lengths.n, self.docs.n, self.itemsize
  local header = ffi.new('uint8_t[34]')
  ffi.copy(header, M.MAGIC, 9)
  ffi.cast('uint64_t *', header + 9)[0] = M.VERSION   -- unaligned stores are fine on x86-64 and arm64
  header[17] = self.dtype_info.code
  ffi.cast('uint64_t *', header + 18)[0] = S
  ffi.cast('uint64_t *', header + 26)[0] = D
  local pointers = ffi.new('int64_t[?]', math.max(S, 1))
  local at = 0
  for i = 0, S - 1 do
    pointers[i] = at
    at = at + self.lengths.data[i] * itemsize
  end
  local ok, err = pcall(pio.write_atomic, self.idx_final .. '.pending', function(w)
    w:write(header, 34)
    if S > 0 then
      w:write(self.lengths.data, 4 * S)
      w:write(pointers, 8 * S)
    end
    w:write(self.docs.data, 8 * D)
  end)
  if not ok then
    C.pmp_file_remove(self.bin_tmp)
    builder_fail(self, tostring(err))
  end
  if C.pmp_file_rename(self.bin_tmp, self.bin_final) ~= 0 or C.pmp_file_rename(self.idx_final .. '.pending', self.idx_final) ~= 0 then
    local msg = last_error()
    C.pmp_file_remove(self.bin_tmp)
    C.pmp_file_remove(self.idx_final .. '.pending')
    builder_fail(self, msg)
  end
  C.pmp_file_sync_dir(pio.dirname(self.prefix))
  return self.prefix
end

-- Discards everything written; prefix.bin and prefix.idx are left as they were.
function Builder:abort()
  if not self.open then return end
  self.open = false
  C.pmp_file_close(self.fd)
  self.fd = -1
  C.pmp_file_remove(self.bin_tmp)
end

-- Writes a whole dataset at once: documents is a list of documents, each a list of sequences (each a
-- list of tokens). For tests and small tools.
function M.write(prefix, documents, options)
  local b = M.builder(prefix, options)
  local ok, err = pcall(function()
    for _, doc in ipairs(documents) do
      for _, seq in ipairs(doc) do b:add_item(seq) end
      b:end_document()
    end
  end)
  if not ok then
    b:abort()
    error(err, 2)
  end
  return b:finalize()
end

return M
