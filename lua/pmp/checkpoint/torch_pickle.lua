--- Python pickles as torch.save writes them (docs/formats.md §4.2), read without executing anything and
--- written for torch.load(weights_only = True).
---
---   local value, report = torch_pickle.load(bytes, {persistent_load = fn, source = 'path'})
---   local bytes = torch_pickle.dump(value, {persistent_id = fn})
---
--- Reading: a pickle names Python callables (GLOBAL) that the unpickler would call. Here only an
--- allow-list is rebuilt, as Lua values (the REBUILD table below): collections.OrderedDict, the torch
--- tensor rebuilders (through persistent_load, which gets each storage's persistent id), torch.Size,
--- torch dtypes, argparse.Namespace, numpy arrays, dtypes and scalars (RNG states), bytes, enum
--- members (a class of a module named *enums* called with one value), and the dataclasses of
--- torch.distributed.checkpoint's `.metadata` (M.RECORDS: kept as inert Records of their fields, never
--- constructed). Any other global becomes an inert Placeholder that records its name, arguments and
--- state; `report` lists the names of those met.
---
--- Python values in Lua: None -> M.None; bool, int (exact below 2^53, else int64/uint64 cdata),
--- float -> number; str -> string; bytes -> Bytes{data}; list -> List; tuple -> Tuple; dict and
--- OrderedDict -> Dict (keys kept in insertion order, see M.keys); Namespace -> Namespace (attributes as
--- fields); dtype -> Dtype{name}; enum member -> Enum{class, value}; numpy array -> NumpyArray{dtype,
--- shape, data}; an allow-listed dataclass -> Record{class, fields} (fields from a dict state) or
--- Record{class, state} (a tuple state, as TensorProperties pickles); anything else ->
--- Placeholder{global, args, state}. Records may be dict keys (MetadataIndex is).
---
--- Writing (protocol 2) takes the same kinds plus plain Lua tables (arrays -> list, others -> dict) and
--- M.float(x) for a float whose value is integral (3.0 would otherwise be written as the int 3), Records
--- and Enums (written as their class called), and M.call(module, name, args) for any other call.
local ffi = require 'ffi'
local bit = require 'bit'

local M = {}

local function kind(name)
  local mt = { __name = name }
  mt.__index = mt
  return mt
end

local NoneMT = { __tostring = function() return 'None' end }
M.None = setmetatable({}, NoneMT)
M.Dict, M.List, M.Tuple = kind('Dict'), kind('List'), kind('Tuple')
M.Namespace, M.Bytes, M.Dtype = kind('Namespace'), kind('Bytes'), kind('Dtype')
M.Enum, M.NumpyArray, M.Placeholder = kind('Enum'), kind('NumpyArray'), kind('Placeholder')
M.Float, M.Global = kind('Float'), kind('Global')
M.Record, M.Call = kind('Record'), kind('Call')

local order = setmetatable({}, { __mode = 'k' })   -- Dict -> its keys in insertion order

function M.kind_of(v)
  local mt = getmetatable(v)
  return mt and mt.__name
end

function M.dict(ordered)
  local d = setmetatable({}, M.Dict)
  order[d] = { ordered = ordered or false }
  return d
end

function M.set(d, key, value)
  local keys = order[d]
  if rawget(d, key) == nil then keys[#keys + 1] = key end
  rawset(d, key, value)
end

-- The keys of a Dict in insertion order (of a plain table: sorted, strings before numbers).
function M.keys(d)
  local keys = order[d]
  if keys then return { unpack(keys) } end
  local out = {}
  for k in pairs(d) do out[#out + 1] = k end
  table.sort(out, function(a, b)
    if type(a) ~= type(b) then return type(a) == 'string' end
    return a < b
  end)
  return out
end

function M.is_ordered(d) return order[d] ~= nil and order[d].ordered end

function M.list(items) return setmetatable(items or {}, M.List) end
function M.tuple(items) return setmetatable(items or {}, M.Tuple) end
function M.float(x) return setmetatable({ value = x }, M.Float) end
function M.dtype(name) return setmetatable({ name = name }, M.Dtype) end
function M.namespace(fields) return setmetatable(fields or {}, M.Namespace) end
function M.bytes(data) return setmetatable({ data = data }, M.Bytes) end
function M.record(class, fields) return setmetatable({ class = class, fields = fields or {} }, M.Record) end
function M.enum(class, value) return setmetatable({ class = class, value = value }, M.Enum) end
function M.call(module, name, args) return setmetatable({ module = module, name = name, args = args }, M.Call) end

-- Dataclasses of torch.distributed.checkpoint's metadata, rebuilt as Records.
local DCP = 'torch.distributed.checkpoint.'
M.RECORDS = {}
for _, name in ipairs({ 'metadata.Metadata', 'metadata.TensorStorageMetadata', 'metadata.ChunkStorageMetadata',
  'metadata.TensorProperties', 'metadata.BytesStorageMetadata', 'metadata.MetadataIndex', 'metadata.StorageMeta',
  'filesystem._StorageInfo', 'planner.SavePlan', 'planner.WriteItem', 'planner.TensorWriteData' }) do
  M.RECORDS[DCP .. name] = true
end
-- Their enums: a class called with one value.
local RECORD_ENUMS = { [DCP .. 'metadata._MEM_FORMAT_ENCODING'] = true, [DCP .. 'planner.WriteItemType'] = true,
  ['torch.serialization._get_layout'] = true }

---------------------------------------------------------------------------------------------------
-- Reading

local function int_of(bytes)
  -- little-endian two's complement of any length: exact as a number below 2^53, else int64/uint64 cdata
  local n = #bytes
  if n == 0 then return 0 end
  local negative = bytes:byte(n) >= 128
  if n <= 6 then
    local v = 0
    for i = n, 1, -1 do v = v * 256 + bytes:byte(i) end
    if negative then v = v - 2 ^ (8 * n) end
    return v
  end
  if n <= 8 then
    local v = ffi.new('uint64_t', 0)
    for i = n, 1, -1 do v = v * 256 + bytes:byte(i) end
    if not negative then return v <= 2 ^ 53 and tonumber(v) or v end
    local s = ffi.cast('int64_t', v)
    if n < 8 then s = s - bit.lshift(ffi.new('int64_t', 1), 8 * n) end
    return s >= -2 ^ 53 and tonumber(s) or s
  end
  return setmetatable({ global = 'int', args = M.tuple({ M.bytes(bytes) }) }, M.Placeholder)
end

local function global(module, name) return setmetatable({ module = module, name = name }, M.Global) end
local function full_name(g) return g.module .. '.' .. g.name end

-- Torch dtypes by their Python names (GLOBAL torch <name>).
local TORCH_DTYPES = {}
for _, n in ipairs({ 'float32', 'float', 'float64', 'double', 'float16', 'half', 'bfloat16', 'int64', 'long', 'int32',
  'int', 'int16', 'short', 'int8', 'uint8', 'bool', 'complex64', 'complex128', 'float8_e4m3fn', 'float8_e5m2',
  'uint16', 'uint32', 'uint64' }) do TORCH_DTYPES[n] = true end

local NUMPY_MODULES = { ['numpy.core.multiarray'] = true, ['numpy._core.multiarray'] = true }

local function numpy_reconstruct() return setmetatable({ shape = {}, dtype = nil, data = nil }, M.NumpyArray) end

-- Calls of allow-listed globals: name -> function(args, reader) returning the Lua value. persistent
-- loads and tensors are handled by the caller's persistent_load and the torch rebuilders below.
local REBUILD = {
  ['collections.OrderedDict'] = function() return M.dict(true) end,
  ['builtins.dict'] = function() return M.dict(false) end,
  ['torch.Size'] = function(args) return M.tuple({ unpack(args[1] or {}) }) end,
  ['argparse.Namespace'] = function() return M.namespace() end,
  ['_codecs.encode'] = function(args, r)
    local text, encoding = args[1], args[2]
    if type(text) ~= 'string' or (encoding ~= 'latin1' and encoding ~= 'latin-1') then
      r:fail('_codecs.encode with ' .. tostring(encoding) .. ' encoding')
    end
    -- the str holds one code point per byte, as UTF-8: back to the bytes
    local out, i = {}, 1
    while i <= #text do
      local c = text:byte(i)
      if c < 0x80 then
        out[#out + 1] = string.char(c)
        i = i + 1
      else
        local next_byte = text:byte(i + 1) or 0
        if (c ~= 0xc2 and c ~= 0xc3) or next_byte < 0x80 or next_byte > 0xbf then
          r:fail('_codecs.encode of a str that is not latin-1 (a code point above 255)')
        end
        out[#out + 1] = string.char(bit.bor(bit.lshift(bit.band(c, 0x1f), 6), bit.band(next_byte, 0x3f)))
        i = i + 2
      end
    end
    return M.bytes(table.concat(out))
  end,
  ['numpy.dtype'] = function(args) return setmetatable({ name = args[1] }, M.Dtype) end,
}
for module in pairs(NUMPY_MODULES) do
  REBUILD[module .. '._reconstruct'] = numpy_reconstruct
  REBUILD[module .. '.scalar'] = function(args)
    local dtype, data = args[1], args[2]
    local code = dtype and dtype.name
    local raw = data and data.data
    local cast = ({ f8 = 'double', f4 = 'float', i8 = 'int64_t', i4 = 'int32_t', u8 = 'uint64_t', u4 = 'uint32_t', b1 = 'bool' })[
      code and code:gsub('^[<>=|]', '')]
    if not cast or type(raw) ~= 'string' or #raw ~= ffi.sizeof(cast) then
      return setmetatable({ global = module .. '.scalar', args = M.tuple(args) }, M.Placeholder)
    end
    local v = ffi.new(cast .. '[1]')
    ffi.copy(v, raw, #raw)
    local value = v[0]
    if type(value) == 'cdata' and value >= -2 ^ 53 and value <= 2 ^ 53 then value = tonumber(value) end
    return value
  end
end

local Reader = {}
Reader.__index = Reader

function Reader:fail(msg)
  error(string.format('torch_pickle: %s: byte %d: %s', self.source, self.pos - 1, msg), 0)
end

function Reader:read(n)
  local pos = self.pos
  if pos + n - 1 > #self.data then self:fail('the pickle ends early') end
  self.pos = pos + n
  return self.data:sub(pos, pos + n - 1)
end

function Reader:u8()
  local pos = self.pos
  if pos > #self.data then self:fail('the pickle ends early') end
  self.pos = pos + 1
  return self.data:byte(pos)
end

function Reader:uint(n)
  local s = self:read(n)
  local v = 0
  for i = n, 1, -1 do v = v * 256 + s:byte(i) end
  return v
end

function Reader:line()
  local stop = self.data:find('\n', self.pos, true)
  if not stop then self:fail('a text argument has no end of line') end
  local s = self.data:sub(self.pos, stop - 1)
  self.pos = stop + 1
  return s
end

function Reader:pop_mark()
  local marks = self.marks
  if #marks == 0 then self:fail('no MARK on the stack') end
  local at = table.remove(marks)
  local stack = self.stack
  local items = {}
  for i = at + 1, #stack do items[#items + 1] = stack[i] end
  for i = #stack, at + 1, -1 do stack[i] = nil end
  return items
end

function Reader:pop()
  local stack = self.stack
  if #stack == 0 or (#self.marks > 0 and #stack <= self.marks[#self.marks]) then self:fail('the stack is empty') end
  local v = stack[#stack]
  stack[#stack] = nil
  return v
end

function Reader:top()
  local v = self.stack[#self.stack]
  if v == nil then self:fail('the stack is empty') end
  return v
end

function Reader:push(v) self.stack[#self.stack + 1] = v end

function Reader:placeholder(name, args)
  self.report[name] = (self.report[name] or 0) + 1
  return setmetatable({ global = name, args = args }, M.Placeholder)
end

-- The call of a global (REDUCE or NEWOBJ).
function Reader:call(callable, args)
  if M.kind_of(callable) ~= 'Global' then
    if M.kind_of(callable) == 'Placeholder' then return self:placeholder(callable.global, args) end
    self:fail('a call of something that is not a global (' .. tostring(M.kind_of(callable) or type(callable)) .. ')')
  end
  if M.kind_of(args) ~= 'Tuple' then self:fail('the arguments of ' .. full_name(callable) .. ' are not a tuple') end
  local name = full_name(callable)
  local torch_rebuild = self.torch_rebuild[name]
  if torch_rebuild then return torch_rebuild(args, self) end
  local rebuild = REBUILD[name]
  if rebuild then return rebuild(args, self) end
  if M.RECORDS[name] then
    if #args > 0 then self:fail(name .. ' called with arguments (a dataclass pickles without)') end
    return M.record(name)
  end
  if RECORD_ENUMS[name] and #args == 1 then return M.enum(name, args[1]) end
  -- enum members pickle as their class called with the value
  if (callable.module:match('%.enums$') or callable.module:match('^enum')) and #args == 1
      and (type(args[1]) == 'number' or type(args[1]) == 'string') then
    return setmetatable({ class = name, value = args[1] }, M.Enum)
  end
  return self:placeholder(name, args)
end

-- BUILD: the state of an object made by a call.
function Reader:build(obj, state)
  local k = M.kind_of(obj)
  if k == 'Namespace' then
    if M.kind_of(state) ~= 'Dict' then self:fail('the state of an argparse.Namespace is not a dict') end
    for _, key in ipairs(M.keys(state)) do rawset(obj, key, state[key]) end
  elseif k == 'Dict' then
    -- OrderedDict's state: its attributes (a state_dict's _metadata), not items
  elseif k == 'NumpyArray' then
    -- (version, shape, dtype, is_fortran, raw bytes)
    if M.kind_of(state) ~= 'Tuple' or #state < 5 then self:fail('a numpy array state is not a 5-tuple') end
    obj.shape, obj.dtype, obj.fortran = { unpack(state[2]) }, state[3], state[4]
    local raw = state[5]
    obj.data = M.kind_of(raw) == 'Bytes' and raw.data or raw
  elseif k == 'Dtype' then
    -- numpy dtype state: (version, byte order, ...)
    if M.kind_of(state) == 'Tuple' and type(state[2]) == 'string' then obj.byteorder = state[2] end
  elseif k == 'Record' then
    -- a dataclass: its __dict__, (None, slots) with __slots__, or its own __getstate__ tuple
    if M.kind_of(state) == 'Tuple' and #state == 2 and state[1] == M.None and M.kind_of(state[2]) == 'Dict' then
      state = state[2]
    end
    if M.kind_of(state) == 'Dict' then
      for _, key in ipairs(M.keys(state)) do obj.fields[key] = state[key] end
    else
      obj.state = state
    end
  elseif k == 'Placeholder' then
    obj.state = state
  elseif type(obj) == 'cdata' then
    -- a tensor subclass's python attributes: nothing pmp keeps
  else
    self:fail('BUILD on a ' .. tostring(k or type(obj)))
  end
end

-- Globals left as values (never called) become placeholders too, wherever they sit.
function Reader:settle_globals(v, seen)
  if type(v) ~= 'table' or seen[v] then return v end
  seen[v] = true
  if M.kind_of(v) == 'Global' then return self:placeholder(full_name(v)) end
  for k, x in pairs(v) do
    if type(x) == 'table' then rawset(v, k, self:settle_globals(x, seen)) end
  end
  return v
end

local OPS = {}
local function op(char, fn) OPS[type(char) == 'number' and char or char:byte()] = fn end

op(0x80, function(r) r.protocol = r:u8() end)                        -- PROTO
op(0x95, function(r) r:read(8) end)                                  -- FRAME
op('(', function(r) r.marks[#r.marks + 1] = #r.stack end)            -- MARK
op('N', function(r) r:push(M.None) end)
op(0x88, function(r) r:push(true) end)
op(0x89, function(r) r:push(false) end)
op('K', function(r) r:push(r:u8()) end)                              -- BININT1
op('M', function(r) r:push(r:uint(2)) end)                           -- BININT2
op('J', function(r) r:push(int_of(r:read(4))) end)                   -- BININT
op(0x8a, function(r) r:push(int_of(r:read(r:u8()))) end)             -- LONG1
op(0x8b, function(r) r:push(int_of(r:read(r:uint(4)))) end)          -- LONG4
op('I', function(r)                                                  -- INT (protocol 0)
  local s = r:line()
  if s == '01' then r:push(true) elseif s == '00' then r:push(false) else r:push(tonumber(s) or r:fail('INT ' .. s)) end
end)
op('L', function(r) r:push(tonumber((r:line():gsub('L$', ''))) or r:fail('bad LONG')) end)
op('F', function(r) r:push(tonumber(r:line()) or r:fail('bad FLOAT')) end)
op('G', function(r)                                                  -- BINFLOAT, big-endian
  local s = r:read(8)
  local d = ffi.new('double[1]')
  local b = ffi.cast('uint8_t *', d)
  for i = 0, 7 do b[i] = s:byte(8 - i) end
  r:push(d[0])
end)
op('X', function(r) r:push(r:read(r:uint(4))) end)                   -- BINUNICODE
op(0x8c, function(r) r:push(r:read(r:u8())) end)                     -- SHORT_BINUNICODE
op(0x8d, function(r) r:push(r:read(r:uint(8))) end)                  -- BINUNICODE8
op('U', function(r) r:push(r:read(r:u8())) end)                      -- SHORT_BINSTRING
op('T', function(r) r:push(r:read(r:uint(4))) end)                   -- BINSTRING
op('C', function(r) r:push(M.bytes(r:read(r:u8()))) end)             -- SHORT_BINBYTES
op('B', function(r) r:push(M.bytes(r:read(r:uint(4)))) end)          -- BINBYTES
op(0x8e, function(r) r:push(M.bytes(r:read(r:uint(8)))) end)         -- BINBYTES8
op('}', function(r) r:push(M.dict(false)) end)
op(']', function(r) r:push(M.list()) end)
op(')', function(r) r:push(M.tuple()) end)
op('t', function(r) r:push(M.tuple(r:pop_mark())) end)
op(0x85, function(r) r:push(M.tuple({ r:pop() })) end)
op(0x86, function(r)
  local b = r:pop()
  r:push(M.tuple({ r:pop(), b }))
end)
op(0x87, function(r)
  local c, b = r:pop(), r:pop()
  r:push(M.tuple({ r:pop(), b, c }))
end)
op('l', function(r) r:push(M.list(r:pop_mark())) end)                -- LIST
op('d', function(r)                                                  -- DICT
  local items, d = r:pop_mark(), M.dict(false)
  for i = 1, #items, 2 do M.set(d, items[i], items[i + 1]) end
  r:push(d)
end)
local function setitems(r, d, items)
  if M.kind_of(d) ~= 'Dict' then r:fail('SETITEM(S) on a ' .. tostring(M.kind_of(d) or type(d))) end
  for i = 1, #items, 2 do
    local key = items[i]
    if type(key) ~= 'string' and type(key) ~= 'number' and type(key) ~= 'boolean' and M.kind_of(key) ~= 'Record' then
      r:fail('a dict key of kind ' .. tostring(M.kind_of(key) or type(key)) .. ' (only str, int, bool and Record keys are read)')
    end
    M.set(d, key, items[i + 1])
  end
end
op('s', function(r)
  local v = r:pop()
  local k = r:pop()
  setitems(r, r:top(), { k, v })
end)
op('u', function(r)
  local items = r:pop_mark()
  setitems(r, r:top(), items)
end)
local function appends(r, list, items)
  if M.kind_of(list) ~= 'List' then r:fail('APPEND(S) on a ' .. tostring(M.kind_of(list) or type(list))) end
  for _, v in ipairs(items) do list[#list + 1] = v end
end
op('a', function(r)
  local v = r:pop()
  appends(r, r:top(), { v })
end)
op('e', function(r)
  local items = r:pop_mark()
  appends(r, r:top(), items)
end)
op('q', function(r) r.memo[r:u8()] = r:top() end)                    -- BINPUT
op('r', function(r) r.memo[r:uint(4)] = r:top() end)                 -- LONG_BINPUT
op(0x94, function(r) r.memo[r.memo_count] = r:top(); r.memo_count = r.memo_count + 1 end)   -- MEMOIZE
op('p', function(r) r.memo[tonumber(r:line()) or r:fail('bad PUT')] = r:top() end)
local function get(r, i)
  local v = r.memo[i]
  if v == nil then r:fail('memo entry ' .. i .. ' was never stored') end
  r:push(v)
end
op('h', function(r) get(r, r:u8()) end)
op('j', function(r) get(r, r:uint(4)) end)
op('g', function(r) get(r, tonumber(r:line()) or r:fail('bad GET')) end)
op('c', function(r)                                                  -- GLOBAL
  local module = r:line()
  r:push(global(module, r:line()))
end)
op(0x93, function(r)                                                 -- STACK_GLOBAL
  local name = r:pop()
  local module = r:pop()
  if type(module) ~= 'string' or type(name) ~= 'string' then r:fail('STACK_GLOBAL of non-strings') end
  r:push(global(module, name))
end)
op('R', function(r)
  local args = r:pop()
  r:push(r:call(r:pop(), args))
end)
op(0x81, function(r)                                                 -- NEWOBJ
  local args = r:pop()
  r:push(r:call(r:pop(), args))
end)
op('b', function(r)
  local state = r:pop()
  r:build(r:top(), state)
end)
op('Q', function(r)                                                  -- BINPERSID
  local pid = r:pop()
  if not r.persistent_load then r:fail('a persistent id, and no persistent_load was given') end
  r:push(r.persistent_load(pid, r))
end)
op('0', function(r) r:pop() end)                                     -- POP
op('1', function(r) r:pop_mark() end)                                -- POP_MARK
op('2', function(r) r:push(r:top()) end)                             -- DUP

-- After the stack effect of a global that was pushed as a value (not called): torch dtypes and the
-- storage classes are values, everything else stays a Global until called.
local function settle(r, v)
  if M.kind_of(v) == 'Global' and v.module == 'torch' and TORCH_DTYPES[v.name] then return M.dtype(v.name) end
  return v
end

--- The value of pickle `data` (a string). options: persistent_load(pid, reader) for BINPERSID,
--- torch_rebuild (name -> function(args, reader)) for tensor rebuilders, source (names the file in
--- errors). Returns the value and the report: global name -> count of the placeholders made.
function M.load(data, options)
  options = options or {}
  local r = setmetatable({ data = data, pos = 1, stack = {}, marks = {}, memo = {}, memo_count = 0, report = {},
    source = options.source or 'pickle', persistent_load = options.persistent_load,
    torch_rebuild = options.torch_rebuild or {} }, Reader)
  while true do
    local code = r:u8()
    if code == 0x2e then break end   -- STOP
    local fn = OPS[code]
    if not fn then r:fail(string.format('opcode 0x%02x (%q) is not supported', code, string.char(code))) end
    fn(r)
    local n = #r.stack
    if n > 0 then r.stack[n] = settle(r, r.stack[n]) end
  end
  if #r.stack ~= 1 then r:fail(string.format('the pickle ends with %d values on the stack', #r.stack)) end
  return r:settle_globals(r.stack[1], {}), r.report
end

---------------------------------------------------------------------------------------------------
-- Writing (protocol 2)

local Writer = {}
Writer.__index = Writer

function Writer:put(s) self.parts[#self.parts + 1] = s end

local function u32(n)
  return string.char(n % 256, math.floor(n / 256) % 256, math.floor(n / 65536) % 256, math.floor(n / 16777216) % 256)
end

function Writer:global(module, name) self:put('c' .. module .. '\n' .. name .. '\n') end

function Writer:int(v)
  if v >= 0 and v < 256 then return self:put('K' .. string.char(v)) end
  if v >= 0 and v < 65536 then return self:put('M' .. string.char(v % 256, math.floor(v / 256))) end
  if v >= -2 ^ 31 and v < 2 ^ 31 then return self:put('J' .. u32(v < 0 and v + 2 ^ 32 or v)) end
  self:long(ffi.new('int64_t', v))
end

-- LONG1 of an int64 or uint64: little-endian two's complement (a ninth byte keeps a uint64 positive).
function Writer:long(v)
  local unsigned = ffi.istype('uint64_t', v)
  local x = ffi.new('uint64_t', v)
  local b = {}
  for i = 1, 8 do
    b[i] = tonumber(bit.band(x, 0xff))
    x = bit.rshift(x, 8)
  end
  if unsigned and b[8] >= 128 then b[9] = 0 end
  self:put('\138' .. string.char(#b) .. string.char(unpack(b)))
end

function Writer:float(v)
  local d = ffi.new('double[1]', v)
  local b = ffi.cast('uint8_t *', d)
  local s = {}
  for i = 0, 7 do s[8 - i] = b[i] end
  self:put('G' .. string.char(unpack(s)))
end

function Writer:string(s) self:put('X' .. u32(#s) .. s) end

function Writer:items(d)
  local keys = {}
  for _, key in ipairs(M.keys(d)) do
    if d[key] ~= nil then keys[#keys + 1] = key end   -- a key set to nil was removed
  end
  for start = 1, #keys, 1000 do
    self:put('(')
    for i = start, math.min(start + 999, #keys) do
      self:save(keys[i])
      self:save(d[keys[i]])
    end
    self:put('u')
  end
end

function Writer:sequence(items, close)
  self:put('(')
  for i = 1, #items do self:save(items[i]) end
  self:put(close)
end

function Writer:save(v)
  local t = type(v)
  if t == 'boolean' then return self:put(v and '\136' or '\137') end
  if t == 'number' then
    if v == math.floor(v) and math.abs(v) < 2 ^ 53 then return self:int(v) end
    return self:float(v)
  end
  if t == 'string' then return self:string(v) end
  if t == 'cdata' and (ffi.istype('int64_t', v) or ffi.istype('uint64_t', v)) then return self:long(v) end
  if self.persistent_id then
    local pid = self.persistent_id(v)
    if pid ~= nil then
      self:save(pid)
      return self:put('Q')
    end
  end
  if self.reduce then
    local callable, args = self.reduce(v)
    if callable then
      self:global(callable[1], callable[2])
      self:save(args)
      return self:put('R')
    end
  end
  local k = M.kind_of(v)
  if v == M.None then return self:put('N') end
  if k == 'Float' then return self:float(v.value) end
  if k == 'Dtype' then return self:global('torch', v.name) end
  if k == 'Global' then return self:global(v.module, v.name) end
  if k == 'Record' then
    self:global(v.class:match('^(.*)%.([^.]*)$'))
    self:put(')\129')
    if v.state ~= nil then
      self:save(v.state)
    else
      local state = M.dict(false)
      for _, key in ipairs(M.keys(v.fields)) do M.set(state, key, v.fields[key]) end
      self:save(state)
    end
    return self:put('b')
  end
  if k == 'Enum' then
    self:global(v.class:match('^(.*)%.([^.]*)$'))
    self:save(M.tuple({ v.value }))
    return self:put('R')
  end
  if k == 'Call' then
    self:global(v.module, v.name)
    self:save(v.args)
    return self:put('R')
  end
  if k == 'Tuple' then
    if #v == 0 then return self:put(')') end
    return self:sequence(v, 't')
  end
  if k == 'List' then
    self:put(']')
    if #v > 0 then self:sequence(v, 'e') end
    return
  end
  if k == 'Namespace' then
    self:global('argparse', 'Namespace')
    self:put(')\129}')
    self:items(v)
    return self:put('b')
  end
  if k == 'Dict' and M.is_ordered(v) then
    self:global('collections', 'OrderedDict')
    self:put(')R')
    return self:items(v)
  end
  if k == 'Dict' or (t == 'table' and k == nil) then
    if k == nil and #v > 0 then
      self:put(']')
      return self:sequence(v, 'e')
    end
    self:put('}')
    return self:items(v)
  end
  error('torch_pickle.dump: cannot write a ' .. tostring(k or t) .. ' (' .. tostring(v) .. ')', 0)
end

--- The protocol-2 pickle of value. options: persistent_id(v) -> the persistent id value (a Tuple) for
--- values stored outside the pickle (tensor storages), or nil; reduce(v) -> {module, name}, args for
--- values written as a call (tensors), or nil.
function M.dump(value, options)
  options = options or {}
  local w = setmetatable({ parts = { '\128\2' }, persistent_id = options.persistent_id, reduce = options.reduce }, Writer)
  w:save(value)
  w:put('.')
  return table.concat(w.parts)
end

return M
