--- The tensor type: a metatype over the engine's pmp_tensor, with creation functions, operators,
--- methods and pretty printing. Dimensions and positions are 1-based here (negative counts from the
--- end); tensors that hold indices (gather/index_select inputs, argmax results) hold 0-based values.
local ffi = require 'ffi'
local C = require('pmp.ffi').C

local M = {}            -- creation functions and helpers, merged into `pmp`
local Tensor = {}       -- methods: t:sum(), t:view(...), ...
local properties = {}   -- computed fields: t.shape, t.dtype, ...
M.methods = Tensor

---------------------------------------------------------------------------------------------------
-- Errors and memory

local function raise(level)
  error(ffi.string(C.pmp_last_error()), level or 3)
end

-- LuaJIT's collector does not see native memory: after the engine has handed out more bytes than
-- were live after the last collection (and at least GC_STEP), we collect, so loops that drop large
-- tensors run in bounded memory.
local cpu_stats = C.pmp_memory_stats_of(C.PMP_CPU)
local GC_STEP = 256 * 1024 * 1024
local collect_after = GC_STEP

-- Garbage tensors can hold up to this many bytes before a collection; smaller values free memory
-- sooner at the cost of more collections.
function M.set_gc_step(bytes)
  GC_STEP = bytes
  collect_after = math.min(collect_after, tonumber(cpu_stats.allocated) + bytes)
end

-- A tensor is a handle struct around the engine pointer: LuaJIT does pointer arithmetic on raw
-- pointers (p + 1, p - q) instead of calling metamethods, so the operators need a struct type.
ffi.cdef('typedef struct pmp_tensor_handle { pmp_tensor *ptr; } pmp_tensor_handle;')
local Handle  -- the metatype, set at the end of this file

-- A handle's raw pointer is no reference for the collector: once the last use of a handle precedes
-- the C call that takes its pointer, LuaJIT may collect it (and the finalizer release the tensor)
-- while the pointer is still to be used. Callers that made a handle just for a call (a reshape, a
-- number turned tensor) pass it after the result to wrap/check, a use after the call that keeps it.
local function wrap(ptr, ...)
  if ptr == nil then raise(4) end
  local t = Handle(ptr)
  if tonumber(cpu_stats.allocated) > collect_after then
    collectgarbage()
    local live = tonumber(cpu_stats.in_use)
    collect_after = tonumber(cpu_stats.allocated) + math.max(live, GC_STEP)
  end
  return t
end
M.wrap = wrap

local function check(rc, ...)   -- ...: handles kept alive through the call, as in wrap
  if rc ~= 0 then raise(4) end
end

local handle_ct = ffi.typeof('pmp_tensor_handle')
local function is_tensor(x) return type(x) == 'cdata' and ffi.istype(handle_ct, x) end
M.is_tensor = is_tensor

---------------------------------------------------------------------------------------------------
-- dtypes, devices, shapes, dims

local DTYPE_ALIASES = {
  float = 'f32', float32 = 'f32', double = 'f64', float64 = 'f64', bfloat16 = 'bf16', half = 'f16',
  float16 = 'f16', long = 'i64', int64 = 'i64', int = 'i32', int32 = 'i32', uint8 = 'u8', byte = 'u8', uint16 = 'u16',
}
local DTYPE_NAMES = {}
for id = 0, C.PMP_DTYPE_COUNT - 1 do DTYPE_NAMES[id] = ffi.string(C.pmp_dtype_name(id)) end

local function dtype_id(name, op)
  local id = C.pmp_dtype_from_name(DTYPE_ALIASES[name] or name)
  if type(name) ~= 'string' or id < 0 then
    error((op or 'pmp') .. ": unknown dtype '" .. tostring(name) .. "' (f64 f32 bf16 f16 i64 i32 u16 u8 bool)", 4)
  end
  return id
end

local function is_float_id(id) return id <= C.PMP_F16 end

local function parse_device(name, op)
  if name == nil or name == 'cpu' then return ffi.new('pmp_device', C.PMP_CPU, 0) end
  local index = type(name) == 'string' and (name == 'cuda' and '0' or name:match('^cuda:(%d+)$'))
  if index then return ffi.new('pmp_device', C.PMP_CUDA, tonumber(index)) end
  error((op or 'pmp') .. ": unknown device '" .. tostring(name) .. "' (cpu, cuda, cuda:N)", 4)
end

local function device_name(dev)
  if dev.type == C.PMP_CPU then return 'cpu' end
  return 'cuda:' .. dev.index
end

local function is_options(x)
  return type(x) == 'table' and x[1] == nil and not is_tensor(x)
end

-- Shapes come as varargs (2, 3) or one table {2, 3} ({} is the 0-d shape); an options table may come last.
local function is_shape_table(x)
  return type(x) == 'table' and (x[1] ~= nil or next(x) == nil)
end

local function shape_and_options(first, ...)
  if is_shape_table(first) then return first, (...) or {} end
  local args = { first, ... }
  local options = {}
  if is_options(args[#args]) then options = table.remove(args) end
  return args, options
end

local function shape_string(shape)
  local parts = {}
  for k = 1, #shape do parts[k] = tostring(shape[k]) end
  return '[' .. table.concat(parts, ',') .. ']'
end

-- A reusable buffer: the engine copies shapes before returning, so one buffer per argument suffices.
local shape_buffer = ffi.new('int64_t[8]')
local function c_shape(shape, op, allow_infer)
  local n = #shape
  if n > 8 then error(op .. ': at most 8 dims are supported, got ' .. n, 4) end
  local buf = shape_buffer
  for k = 1, n do
    local size = shape[k]
    if type(size) ~= 'number' or size ~= math.floor(size) then
      error(op .. ': shape entries must be integers, got ' .. tostring(size) .. ' at position ' .. k, 4)
    end
    if size < 0 and not (size == -1 and allow_infer) then
      error(string.format('%s: invalid size %d at position %d of shape %s', op, size, k, shape_string(shape)), 4)
    end
    buf[k - 1] = size
  end
  return buf, n
end

-- The sizes of view/reshape/expand, (t, B, T, -1) or (t, {B, T, -1}), straight into shape_buffer with
-- no loop, table or vararg: these run several times per layer, and LuaJIT cannot compile a trace that
-- leaves a vararg function or a loop's trace back into its caller, so everything after such a call ran
-- in the interpreter. Returns the number of dims, or nil for anything else (options, more than 8 dims,
-- a bad size), which c_shape then checks and reports.
local function put_size(k, size)
  if type(size) ~= 'number' or size ~= math.floor(size) or (size < 0 and size ~= -1) then return false end
  shape_buffer[k] = size
  return true
end

local function direct_sizes(s1, s2, s3, s4, s5, s6, s7, s8, s9)
  local n
  if type(s1) == 'table' and s2 == nil and s1[1] ~= nil then
    n = #s1
    s1, s2, s3, s4, s5, s6, s7, s8 = s1[1], s1[2], s1[3], s1[4], s1[5], s1[6], s1[7], s1[8]
  elseif s9 == nil then
    n = s2 == nil and 1 or s3 == nil and 2 or s4 == nil and 3 or s5 == nil and 4 or s6 == nil and 5
      or s7 == nil and 6 or s8 == nil and 7 or 8
  else
    return nil
  end
  if n > 8 or not put_size(0, s1)
    or n > 1 and not put_size(1, s2) or n > 2 and not put_size(2, s3)
    or n > 3 and not put_size(3, s4) or n > 4 and not put_size(4, s5)
    or n > 5 and not put_size(5, s6) or n > 6 and not put_size(6, s7)
    or n > 7 and not put_size(7, s8) then
    return nil
  end
  return n
end

-- 1-based (negative from the end) dim to the engine's 0-based one.
local function cdim(d, ndim, op)
  if type(d) ~= 'number' or d ~= math.floor(d) then
    error(op .. ': dimension must be an integer, got ' .. tostring(d), 4)
  end
  local n = math.max(ndim, 1)
  if d == 0 or d > n or d < -n then
    error(string.format('%s: dimension %d out of range for a tensor with %d dims (use 1..%d or -1..-%d)',
      op, d, ndim, n, n), 4)
  end
  return d > 0 and d - 1 or n + d
end

local function shape_of(t)
  local shape = {}
  for k = 0, t.ptr.ndim - 1 do shape[k + 1] = tonumber(t.ptr.sizes[k]) end
  return shape
end


---------------------------------------------------------------------------------------------------
-- Creation

local function creation_options(options, op, default_dtype)
  return dtype_id(options.dtype or default_dtype, op), parse_device(options.device, op)
end

local function finish(t, options)
  if options.requires_grad then check(C.pmp_set_requires_grad(t.ptr, 1)) end
  return t
end

--- pmp.empty(2, 3) or pmp.empty({2, 3}, {dtype =, device =, requires_grad =}): an uninitialized tensor.
function M.empty(...)
  local shape, options = shape_and_options(...)
  local dtype, dev = creation_options(options, 'empty', 'f32')
  local buf, n = c_shape(shape, 'empty')
  return finish(wrap(C.pmp_empty(buf, n, dtype, dev)), options)
end

local function filled(value, op, ...)
  local shape, options = shape_and_options(...)
  local dtype, dev = creation_options(options, op, 'f32')
  local buf, n = c_shape(shape, op)
  return finish(wrap(C.pmp_full(buf, n, value, dtype, dev)), options)
end

--- pmp.zeros(2, 3) or pmp.zeros({2, 3}, {dtype = 'f32', device = 'cpu', requires_grad = false}): zeros.
function M.zeros(...) return filled(0, 'zeros', ...) end
--- pmp.ones(shape, options): ones (shape and options as for pmp.zeros).
function M.ones(...) return filled(1, 'ones', ...) end

--- pmp.full({2, 3}, 7) or pmp.full(2, 3, 7), options last.
function M.full(...)
  local args = { ... }
  local options = is_options(args[#args]) and table.remove(args) or {}
  local value = table.remove(args)
  if type(value) ~= 'number' and type(value) ~= 'boolean' then
    error('full: the fill value must be a number, got ' .. type(value), 2)
  end
  if type(value) == 'boolean' then value = value and 1 or 0 end
  local shape = type(args[1]) == 'table' and args[1] or args
  local dtype, dev = creation_options(options, 'full', 'f32')
  local buf, n = c_shape(shape, 'full')
  return finish(wrap(C.pmp_full(buf, n, value, dtype, dev)), options)
end

local function is_integer(x) return type(x) == 'number' and x == math.floor(x) and x > -2^53 and x < 2^53 end

--- pmp.arange(n), (start, stop), (start, stop, step); integers give i64, like torch.
function M.arange(...)
  local args = { ... }
  local options = is_options(args[#args]) and table.remove(args) or {}
  local start, stop, step = args[1], args[2], args[3]
  if stop == nil then start, stop = 0, start end
  step = step or 1
  for _, v in ipairs({ start, stop, step }) do
    if type(v) ~= 'number' then error('arange: bounds and step must be numbers', 2) end
  end
  local default = (is_integer(start) and is_integer(stop) and is_integer(step)) and 'i64' or 'f32'
  local dtype, dev = creation_options(options, 'arange', default)
  return finish(wrap(C.pmp_arange(start, stop, step, dtype, dev)), options)
end

--- pmp.rand(shape, options): uniform samples in [0, 1) from pmp's seeded generator (see manual_seed).
function M.rand(...)
  local shape, options = shape_and_options(...)
  local dtype, dev = creation_options(options, 'rand', 'f32')
  local buf, n = c_shape(shape, 'rand')
  return finish(wrap(C.pmp_rand(buf, n, dtype, dev)), options)
end

--- pmp.randn(shape, options): standard normal samples from pmp's seeded generator (see manual_seed).
function M.randn(...)
  local shape, options = shape_and_options(...)
  local dtype, dev = creation_options(options, 'randn', 'f32')
  local buf, n = c_shape(shape, 'randn')
  return finish(wrap(C.pmp_randn(buf, n, dtype, dev)), options)
end

--- pmp.randint(low, high, shape) or pmp.randint(high, shape); values in [low, high).
function M.randint(a, b, ...)
  local low, high, rest
  if type(b) == 'number' then
    low, high, rest = a, b, { ... }
  else
    low, high, rest = 0, a, { b, ... }
  end
  if not is_integer(low) or not is_integer(high) then error('randint: low and high must be integers', 2) end
  local shape, options = shape_and_options(unpack(rest, 1, table.maxn(rest)))
  local dtype, dev = creation_options(options, 'randint', 'i64')
  local buf, n = c_shape(shape, 'randint')
  return wrap(C.pmp_randint(low, high, buf, n, dtype, dev))
end

--- Seeds the generator behind rand, randn, randint, dropout and sampling.
function M.manual_seed(seed)
  if not is_integer(seed) then error('manual_seed: seed must be an integer', 2) end
  C.pmp_manual_seed(seed < 0 and seed + 2^64 or seed)
end

-- Flattens nested tables, checking they are rectangular.
local function flatten(data, shape, depth, out, path)
  if type(data) ~= 'table' then
    if depth <= #shape then
      error('tensor: ragged nested table at ' .. path .. ' (expected a table of ' .. shape[depth] .. ' entries)', 4)
    end
    local v = data
    if type(v) == 'boolean' then v = v and 1 or 0 end
    if type(v) ~= 'number' then error('tensor: non-numeric value ' .. tostring(data) .. ' at ' .. path, 4) end
    out[#out + 1] = v
    return
  end
  local n = #data
  if depth > #shape then
    if #out > 0 then error('tensor: ragged nested table at ' .. path, 4) end
    shape[depth] = n
  elseif shape[depth] ~= n then
    error(string.format('tensor: ragged nested table at %s (%d entries, expected %d)', path, n, shape[depth]), 4)
  end
  for k = 1, n do flatten(data[k], shape, depth + 1, out, path .. '[' .. k .. ']') end
end

local function first_leaf(data)
  while type(data) == 'table' do data = data[1] end
  return data
end

--- pmp.tensor(nested_table_or_number, {dtype=, device=, requires_grad=}); f32 unless the data is
--- boolean (Lua does not tell 1 from 1.0, so integers need dtype='i64').
function M.tensor(data, options)
  options = options or {}
  if is_tensor(data) then
    local t = data:detach():to(options.dtype or data.dtype):clone()
    return finish(t, options)
  end
  local shape, values = {}, {}
  flatten(data, shape, 1, values, 'data')
  local default = type(first_leaf(data)) == 'boolean' and 'bool' or 'f32'
  local dtype, dev = creation_options(options, 'tensor', default)
  local buf, n = c_shape(shape, 'tensor')
  local src = ffi.new('double[?]', math.max(#values, 1), values)
  if not is_float_id(dtype) then
    local ints = ffi.new('int64_t[?]', math.max(#values, 1))
    for k = 1, #values do ints[k - 1] = values[k] end
    return finish(wrap(C.pmp_from_buffer(ints, C.PMP_I64, buf, n, dtype, dev)), options)
  end
  return finish(wrap(C.pmp_from_buffer(src, C.PMP_F64, buf, n, dtype, dev)), options)
end

---------------------------------------------------------------------------------------------------
-- Properties

function properties.shape(t) return shape_of(t) end
function properties.ndim(t) return t.ptr.ndim end
function properties.dtype(t) return DTYPE_NAMES[t.ptr.dtype_id] end
function properties.device(t) return device_name(t.ptr.dev) end
function properties.requires_grad(t) return t.ptr.needs_grad ~= 0 end
function properties.is_leaf(t) return t.ptr.grad_fn == nil end
function properties.grad(t)
  local g = t.ptr.grad_acc
  if g == nil then return nil end
  C.pmp_tensor_retain(g)
  return wrap(g)
end

local setters = {}
function setters.grad(t, g)
  if g ~= nil and not is_tensor(g) then error('grad: expected a tensor or nil', 3) end
  check(C.pmp_set_grad(t.ptr, g and g.ptr))
end
function setters.requires_grad(t, flag) check(C.pmp_set_requires_grad(t.ptr, flag and 1 or 0)) end

M.fields = { 'shape', 'dtype', 'device', 'grad', 'requires_grad', 'is_leaf', 'ndim' }

---------------------------------------------------------------------------------------------------
-- Inspection and conversion

--- t:size() is the shape as a Lua list; t:size(d) the size of dim d (1-based, negative from the end).
function Tensor.size(t, d)
  if d == nil then return shape_of(t) end
  return tonumber(t.ptr.sizes[cdim(d, t.ptr.ndim, 'size')])
end
--- The number of dims (also t.ndim).
function Tensor.dim(t) return t.ptr.ndim end
--- The number of elements.
function Tensor.numel(t) return tonumber(C.pmp_numel(t.ptr)) end
--- Whether the elements lie in row-major order without gaps.
function Tensor.is_contiguous(t) return C.pmp_is_contiguous(t.ptr) ~= 0 end
function Tensor.is_floating_point(t) return is_float_id(t.ptr.dtype_id) end
function Tensor.element_size(t) return C.pmp_dtype_size(t.ptr.dtype_id) end

local function is_device_name(x) return x == 'cpu' or x == 'cuda' or (type(x) == 'string' and x:match('^cuda:%d+$')) end

--- t:to('bf16'), t:to('cpu'), t:to(other_tensor), t:to({dtype=, device=})
function Tensor.to(t, target)
  local dtype, device
  if is_tensor(target) then
    dtype, device = target.dtype, target.device
  elseif type(target) == 'table' then
    dtype, device = target.dtype, target.device
  elseif is_device_name(target) then
    device = target
  else
    dtype = target
  end
  local out = t
  if device then
    local dev = parse_device(device, 'to')
    out = wrap(C.pmp_to_device(out.ptr, dev), out)
  end
  if dtype then
    local id = dtype_id(dtype, 'to')
    out = wrap(C.pmp_to_dtype(out.ptr, id), out)
  end
  return out
end
--- The tensor in f32 (t:double(), t:bf16(), t:half(), t:long(), t:int(), t:bool() likewise).
function Tensor.float(t) return t:to('f32') end
function Tensor.double(t) return t:to('f64') end
function Tensor.bf16(t) return t:to('bf16') end
function Tensor.half(t) return t:to('f16') end
function Tensor.long(t) return t:to('i64') end
function Tensor.int(t) return t:to('i32') end
function Tensor.bool(t) return t:to('bool') end
function Tensor.cpu(t) return t:to('cpu') end
function Tensor.cuda(t, index) return t:to('cuda:' .. (index or 0)) end
--- A copy with its own storage (autograd flows through it).
function Tensor.clone(t) return wrap(C.pmp_clone(t.ptr)) end
--- t itself when contiguous, else a row-major copy.
function Tensor.contiguous(t) return wrap(C.pmp_contiguous(t.ptr)) end
--- The same storage without autograd history.
function Tensor.detach(t) return wrap(C.pmp_detach(t.ptr)) end

local item_value = ffi.new('double[1]')
--- The value of a one-element tensor as a Lua number (boolean for bool).
function Tensor.item(t)
  check(C.pmp_item(t.ptr, item_value))
  if t.ptr.dtype_id == C.PMP_BOOL then return item_value[0] ~= 0 end
  if t.ptr.dtype_id == C.PMP_I64 then
    local exact = ffi.new('int64_t[1]')
    check(C.pmp_copy_to_buffer(t.ptr, exact, C.PMP_I64))
    return tonumber(exact[0])
  end
  return item_value[0]
end

-- All elements in row-major order as Lua numbers (booleans for bool tensors).
local function values_of(t)
  local n = t:numel()
  local is_bool = t.ptr.dtype_id == C.PMP_BOOL
  local integral = not is_float_id(t.ptr.dtype_id)
  local buf = ffi.new(integral and 'int64_t[?]' or 'double[?]', math.max(n, 1))
  check(C.pmp_copy_to_buffer(t.ptr, buf, integral and C.PMP_I64 or C.PMP_F64))
  local values = {}
  for k = 0, n - 1 do
    local v = tonumber(buf[k])
    if is_bool then v = v ~= 0 end
    values[k + 1] = v
  end
  return values
end

--- The elements as nested Lua tables (a number for a 0-d tensor).
function Tensor.totable(t)
  local values = values_of(t)
  local shape = shape_of(t)
  if #shape == 0 then return values[1] end
  local pos = 0
  local function build(d)
    local out = {}
    for k = 1, shape[d] do
      if d == #shape then
        pos = pos + 1
        out[k] = values[pos]
      else
        out[k] = build(d + 1)
      end
    end
    return out
  end
  return build(1)
end

---------------------------------------------------------------------------------------------------
-- Elementwise math and operators

-- A Lua number meets a tensor as a 0-d tensor of a dtype that does not widen the tensor (torch's rule).
local function scalar_dtype(t, v)
  local id = t.ptr.dtype_id
  if is_float_id(id) then return id end
  if not is_integer(v) then return C.PMP_F32 end
  return id == C.PMP_BOOL and C.PMP_I64 or id
end

local function as_tensor(x, like, op)
  if is_tensor(x) then return x end
  if type(x) == 'boolean' then x = x and 1 or 0 end
  if type(x) ~= 'number' then error(op .. ': expected a tensor or a number, got ' .. type(x), 4) end
  return wrap(C.pmp_full(nil, 0, x, scalar_dtype(like, x), like.ptr.dev))
end

local function binary(op, name)
  return function(a, b)
    local ta = is_tensor(a)
    if not ta and not is_tensor(b) then error(name .. ': expected a tensor operand', 2) end
    local like = ta and a or b
    local x, y = as_tensor(a, like, name), as_tensor(b, like, name)
    return wrap(C.pmp_binary(op, x.ptr, y.ptr), x, y)
  end
end

local function unary(op)
  return function(t) return wrap(C.pmp_unary(op, t.ptr)) end
end

--- Elementwise a + b with broadcasting; b may be a number (also the + operator). Likewise sub, mul, div,
--- pow, maximum, minimum, and the comparisons eq, ne, lt, le, gt, ge (bool results).
Tensor.add = binary(C.PMP_OP_ADD, 'add')
Tensor.sub = binary(C.PMP_OP_SUB, 'sub')
Tensor.mul = binary(C.PMP_OP_MUL, 'mul')
Tensor.div = binary(C.PMP_OP_DIV, 'div')
Tensor.pow = binary(C.PMP_OP_POW, 'pow')
Tensor.maximum = binary(C.PMP_OP_MAXIMUM, 'maximum')
Tensor.minimum = binary(C.PMP_OP_MINIMUM, 'minimum')
Tensor.eq = binary(C.PMP_OP_EQ, 'eq')
Tensor.ne = binary(C.PMP_OP_NE, 'ne')
Tensor.lt = binary(C.PMP_OP_LT, 'lt')
Tensor.le = binary(C.PMP_OP_LE, 'le')
Tensor.gt = binary(C.PMP_OP_GT, 'gt')
Tensor.ge = binary(C.PMP_OP_GE, 'ge')
Tensor.logical_and = binary(C.PMP_OP_LOGICAL_AND, 'logical_and')
Tensor.logical_or = binary(C.PMP_OP_LOGICAL_OR, 'logical_or')
Tensor.logical_not = unary(C.PMP_OP_LOGICAL_NOT)
Tensor.neg = unary(C.PMP_OP_NEG)
--- Elementwise exp; likewise neg, log, sqrt, rsqrt, abs, sin, cos, tanh, sigmoid, relu, silu, sign.
Tensor.exp = unary(C.PMP_OP_EXP)
Tensor.log = unary(C.PMP_OP_LOG)
Tensor.sqrt = unary(C.PMP_OP_SQRT)
Tensor.rsqrt = unary(C.PMP_OP_RSQRT)
Tensor.abs = unary(C.PMP_OP_ABS)
Tensor.sin = unary(C.PMP_OP_SIN)
Tensor.cos = unary(C.PMP_OP_COS)
Tensor.tanh = unary(C.PMP_OP_TANH)
Tensor.sigmoid = unary(C.PMP_OP_SIGMOID)
Tensor.relu = unary(C.PMP_OP_RELU)
Tensor.silu = unary(C.PMP_OP_SILU)
Tensor.sign = unary(C.PMP_OP_SIGN)
function Tensor.square(t) return t:mul(t) end

--- gelu(x) exact (erf); gelu(x, 'tanh') the tanh approximation (HF's gelu_new / gelu_pytorch_tanh).
function Tensor.gelu(t, approximate)
  if type(approximate) == 'table' then approximate = approximate.approximate end
  if approximate == 'tanh' then return wrap(C.pmp_unary(C.PMP_OP_GELU_TANH, t.ptr)) end
  if approximate ~= nil and approximate ~= 'none' then
    error("gelu: approximate must be 'none' or 'tanh', got " .. tostring(approximate), 2)
  end
  return wrap(C.pmp_unary(C.PMP_OP_GELU, t.ptr))
end

--- t:clamp(min, max) or t:clamp({min =, max =}): limits every element to [min, max] (nil: no bound).
function Tensor.clamp(t, min, max)
  if type(min) == 'table' then min, max = min.min, min.max end
  if min ~= nil and type(min) ~= 'number' or max ~= nil and type(max) ~= 'number' then
    error('clamp: bounds must be numbers or nil', 2)
  end
  return wrap(C.pmp_clamp(t.ptr, min or -math.huge, max or math.huge))
end

--- pmp.where(cond, a, b): a where cond is true, b elsewhere (tensors or numbers, broadcast).
function M.where(cond, a, b)
  local like = is_tensor(a) and a or is_tensor(b) and b or cond
  if not is_tensor(cond) then error('where: the condition must be a tensor', 2) end
  local x, y = as_tensor(a, like, 'where'), as_tensor(b, like, 'where')
  return wrap(C.pmp_where(cond.ptr, x.ptr, y.ptr), cond, x, y)
end
function Tensor.where(cond, a, b) return M.where(cond, a, b) end

---------------------------------------------------------------------------------------------------
-- Reductions

local dims_buffer = ffi.new('int[8]')

-- (dim or {dims} or nil, keepdim boolean or {keepdim=}) in the engine's form.
local function reduction_dims(t, dim, keepdim, op)
  if type(keepdim) == 'table' then keepdim = keepdim.keepdim end
  if type(dim) == 'table' and is_options(dim) then
    keepdim = dim.keepdim
    dim = dim.dim
  end
  local n = 0
  if type(dim) == 'number' then
    dims_buffer[0] = cdim(dim, t.ptr.ndim, op)
    n = 1
  elseif type(dim) == 'table' then
    for k, d in ipairs(dim) do dims_buffer[k - 1] = cdim(d, t.ptr.ndim, op) end
    n = #dim
  elseif dim ~= nil then
    error(op .. ': dim must be a number or a table of numbers', 4)
  end
  return dims_buffer, n, keepdim and 1 or 0
end

--- t:sum() of all elements, t:sum(dim) or t:sum({dims}) along dims; keepdim keeps them with size 1.
function Tensor.sum(t, dim, keepdim)
  local dims, n, keep = reduction_dims(t, dim, keepdim, 'sum')
  return wrap(C.pmp_sum(t.ptr, dims, n, keep))
end

--- t:mean(), t:mean(dim, keepdim): the mean, as sum.
function Tensor.mean(t, dim, keepdim)
  local dims, n, keep = reduction_dims(t, dim, keepdim, 'mean')
  return wrap(C.pmp_mean(t.ptr, dims, n, keep))
end

-- t:max() is the largest element; t:max(dim) gives values and (0-based) indices along dim.
local function extreme(c_fn, op)
  return function(t, dim, keepdim)
    if type(dim) == 'table' then dim, keepdim = dim.dim, dim.keepdim end
    if type(keepdim) == 'table' then keepdim = keepdim.keepdim end
    if dim == nil then
      local flat = t:reshape(-1)
      return wrap(c_fn(flat.ptr, 0, 0, nil), flat)
    end
    local indices = ffi.new('pmp_tensor *[1]')
    local values = c_fn(t.ptr, cdim(dim, t.ptr.ndim, op), keepdim and 1 or 0, indices)
    if values == nil then raise(3) end
    return wrap(values), wrap(indices[0])
  end
end
--- t:max() the largest element; t:max(dim, keepdim) its values and 0-based indices along dim (min too).
Tensor.max = extreme(C.pmp_max, 'max')
Tensor.min = extreme(C.pmp_min, 'min')

local function arg_extreme(c_fn, op)
  return function(t, dim, keepdim)
    if type(dim) == 'table' then dim, keepdim = dim.dim, dim.keepdim end
    if type(keepdim) == 'table' then keepdim = keepdim.keepdim end
    if dim == nil then
      local flat = t:reshape(-1)
      return wrap(c_fn(flat.ptr, 0, 0), flat)
    end
    return wrap(c_fn(t.ptr, cdim(dim, t.ptr.ndim, op), keepdim and 1 or 0))
  end
end
--- t:argmax(dim, keepdim): 0-based indices of the largest elements (argmin likewise); no dim: flat index.
Tensor.argmax = arg_extreme(C.pmp_argmax, 'argmax')
Tensor.argmin = arg_extreme(C.pmp_argmin, 'argmin')

--- Variance with Bessel's correction by default ({unbiased=false} or {correction=0} for the population one).
function Tensor.var(t, dim, options)
  if type(dim) == 'table' and is_options(dim) then dim, options = dim.dim, dim end
  if type(options) == 'boolean' then options = { keepdim = options } end
  options = options or {}
  local correction = options.correction or (options.unbiased == false and 0 or 1)
  local x = is_float_id(t.ptr.dtype_id) and t or t:float()
  local mean = x:mean(dim, true)
  local squares = (x - mean):square():sum(dim, options.keepdim)
  local count = x:numel() / math.max(squares:numel(), 1)
  return squares / math.max(count - correction, 0)
end
function Tensor.std(t, dim, options) return t:var(dim, options):sqrt() end

--- p-norm over all elements or over dim (p = 2 by default; math.huge for the max norm).
function Tensor.norm(t, p, dim, keepdim)
  if type(p) == 'table' then p, dim, keepdim = p.p, p.dim, p.keepdim end
  p = p or 2
  if p == 2 then return t:square():sum(dim, keepdim):sqrt() end
  if p == 1 then return t:abs():sum(dim, keepdim) end
  if p == math.huge then
    if dim == nil then return t:abs():max() end
    return (t:abs():max(dim, keepdim))
  end
  return t:abs():pow(p):sum(dim, keepdim):pow(1 / p)
end

function Tensor.all(t) return t:bool():logical_not():sum():item() == 0 end
function Tensor.any(t) return t:bool():sum():item() > 0 end

---------------------------------------------------------------------------------------------------
-- Linear algebra and nn ops

--- pmp.matmul(a, b) or a:matmul(b): matrix product, batched over leading dims with broadcasting.
function M.matmul(a, b)
  if not is_tensor(a) or not is_tensor(b) then error('matmul: expected two tensors', 2) end
  return wrap(C.pmp_matmul(a.ptr, b.ptr))
end
Tensor.matmul = M.matmul

--- t:softmax(dim): softmax along dim (the last by default).
function Tensor.softmax(t, dim) return wrap(C.pmp_softmax(t.ptr, cdim(dim or -1, t.ptr.ndim, 'softmax'))) end
--- t:log_softmax(dim): log of the softmax along dim (the last by default), computed stably.
function Tensor.log_softmax(t, dim) return wrap(C.pmp_log_softmax(t.ptr, cdim(dim or -1, t.ptr.ndim, 'log_softmax'))) end

---------------------------------------------------------------------------------------------------
-- Shape

-- view, reshape and expand name their size parameters (see direct_sizes): ten cover 8 dims, an
-- options table and one more, so that too many sizes are still reported. Returns the dim count of the
-- shape now in shape_buffer.
local function sizes_into_buffer(op, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10)
  return direct_sizes(s1, s2, s3, s4, s5, s6, s7, s8, s9)
    or select(2, c_shape(shape_and_options(s1, s2, s3, s4, s5, s6, s7, s8, s9, s10), op, true))
end

--- t:view(B, T, -1) or t:view({B, T, -1}): the same storage seen in a new shape (-1: inferred); needs a
--- layout that allows it (contiguous does); see reshape.
function Tensor.view(t, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10)
  return wrap(C.pmp_view(t.ptr, shape_buffer, sizes_into_buffer('view', s1, s2, s3, s4, s5, s6, s7, s8, s9, s10)))
end

--- t:reshape(B, T, -1): as view when the layout allows, else a copy.
function Tensor.reshape(t, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10)
  return wrap(C.pmp_reshape(t.ptr, shape_buffer, sizes_into_buffer('reshape', s1, s2, s3, s4, s5, s6, s7, s8, s9, s10)))
end

function Tensor.flatten(t) return t:reshape(-1) end

--- t:transpose(d0, d1): a view with dims d0 and d1 swapped.
function Tensor.transpose(t, d0, d1)
  return wrap(C.pmp_transpose(t.ptr, cdim(d0, t.ptr.ndim, 'transpose'), cdim(d1, t.ptr.ndim, 'transpose')))
end

--- The transpose of a matrix (Torch7's t:t()).
function Tensor.t(t)
  if t.ptr.ndim ~= 2 then error('t: expects a 2-D tensor, got shape ' .. shape_string(shape_of(t)), 2) end
  return t:transpose(1, 2)
end

--- t:permute(3, 1, 2): a view with the dims in the given order.
function Tensor.permute(t, ...)
  local dims = shape_and_options(...)
  if #dims ~= t.ptr.ndim then
    error(string.format('permute: %d dims given for a tensor with %d dims', #dims, t.ptr.ndim), 2)
  end
  local buf = ffi.new('int[8]')
  for k, d in ipairs(dims) do buf[k - 1] = cdim(d, t.ptr.ndim, 'permute') end
  return wrap(C.pmp_permute(t.ptr, buf, #dims))
end

--- t:unsqueeze(d): a view with a new dim of size 1 at position d.
function Tensor.unsqueeze(t, d) return wrap(C.pmp_unsqueeze(t.ptr, cdim(d, t.ptr.ndim + 1, 'unsqueeze'))) end

--- t:squeeze(d) removes dim d if its size is 1; t:squeeze() every dim of size 1.
function Tensor.squeeze(t, d)
  if d == nil then return wrap(C.pmp_squeeze(t.ptr, -1)) end
  return wrap(C.pmp_squeeze(t.ptr, cdim(d, t.ptr.ndim, 'squeeze')))
end

function Tensor.expand(t, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10)
  return wrap(C.pmp_expand(t.ptr, shape_buffer, sizes_into_buffer('expand', s1, s2, s3, s4, s5, s6, s7, s8, s9, s10)))
end
function Tensor.expand_as(t, other) return t:expand(other.shape) end

--- narrow(dim, start, length): start is 1-based (negative counts from the end).
function Tensor.narrow(t, dim, start, length)
  local d = cdim(dim, t.ptr.ndim, 'narrow')
  local size = tonumber(t.ptr.sizes[d])
  if type(start) ~= 'number' or type(length) ~= 'number' then error('narrow: start and length must be numbers', 2) end
  local first = start > 0 and start - 1 or size + start
  if start == 0 or first < 0 or length < 0 or first + length > size then
    error(string.format('narrow: start %d and length %d are out of range for dim %d of size %d (shape %s)',
      start, length, dim, size, shape_string(shape_of(t))), 2)
  end
  return wrap(C.pmp_narrow(t.ptr, d, first, length))
end

--- select(dim, i): the slice at 1-based position i, with dim removed.
function Tensor.select(t, dim, index)
  return t:narrow(dim, index, 1):squeeze(dim)
end

--- pmp.cat({a, b, ...}, dim): the tensors joined along dim (1 by default).
function M.cat(list, dim)
  dim = dim or 1
  if type(list) ~= 'table' or #list == 0 then error('cat: expects a non-empty list of tensors', 2) end
  local ptrs = ffi.new('pmp_tensor *[?]', #list)
  for k, t in ipairs(list) do
    if not is_tensor(t) then error('cat: element ' .. k .. ' is not a tensor', 2) end
    ptrs[k - 1] = t.ptr
  end
  return wrap(C.pmp_cat(ptrs, #list, cdim(dim, list[1].ptr.ndim, 'cat')))
end

local function same_shape(a, b)
  if a.ndim ~= b.ndim then return false end
  for k = 0, a.ndim - 1 do
    if a.sizes[k] ~= b.sizes[k] then return false end
  end
  return true
end

--- pmp.stack({a, b, ...}, dim): same-shaped tensors stacked along a new dim (1 by default).
function M.stack(list, dim)
  dim = dim or 1
  if type(list) ~= 'table' or #list == 0 then error('stack: expects a non-empty list of tensors', 2) end
  local first = is_tensor(list[1]) and list[1].ptr
  local parts = {}
  for k, t in ipairs(list) do
    if not is_tensor(t) then error('stack: element ' .. k .. ' is not a tensor', 2) end
    if not same_shape(t.ptr, first) then
      error(string.format('stack: tensor %d has shape %s, expected %s', k, shape_string(t.shape), shape_string(list[1].shape)), 2)
    end
    parts[k] = t:unsqueeze(dim)
  end
  return M.cat(parts, dim)
end

--- split(size, dim) into pieces of `size` (the last may be smaller), or split({sizes}, dim).
function Tensor.split(t, sizes, dim)
  dim = dim or 1
  local total = t:size(dim)
  local pieces, start = {}, 1
  if type(sizes) == 'number' then
    if sizes <= 0 then error('split: size must be positive', 2) end
    while start <= total do
      local len = math.min(sizes, total - start + 1)
      pieces[#pieces + 1] = t:narrow(dim, start, len)
      start = start + len
    end
    return pieces
  end
  local sum = 0
  for _, s in ipairs(sizes) do sum = sum + s end
  if sum ~= total then
    error(string.format('split: sizes add up to %d but dim %d has size %d', sum, dim, total), 2)
  end
  for k, len in ipairs(sizes) do
    pieces[k] = t:narrow(dim, start, len)
    start = start + len
  end
  return pieces
end

--- chunk(n, dim): n pieces of equal size (the last may be smaller), as torch.chunk.
function Tensor.chunk(t, n, dim)
  dim = dim or 1
  if type(n) ~= 'number' or n <= 0 then error('chunk: the number of chunks must be positive', 2) end
  return t:split(math.ceil(t:size(dim) / n), dim)
end

--- t:gather(dim, index): elements of t picked along dim by the 0-based integer tensor index.
function Tensor.gather(t, dim, index) return wrap(C.pmp_gather(t.ptr, cdim(dim, t.ptr.ndim, 'gather'), index.ptr)) end
function Tensor.scatter_add(t, dim, index, src) return wrap(C.pmp_scatter_add(t.ptr, cdim(dim, t.ptr.ndim, 'scatter_add'), index.ptr, src.ptr)) end
--- t:index_select(dim, index): the slices of t at the 0-based positions in index along dim.
function Tensor.index_select(t, dim, index) return wrap(C.pmp_index_select(t.ptr, cdim(dim, t.ptr.ndim, 'index_select'), index.ptr)) end
function Tensor.index_add(t, dim, index, src) return wrap(C.pmp_index_add(t.ptr, cdim(dim, t.ptr.ndim, 'index_add'), index.ptr, src.ptr)) end

--- t:masked_fill(mask, value): a copy with value where the bool tensor mask is true.
function Tensor.masked_fill(t, mask, value)
  if type(value) == 'boolean' then value = value and 1 or 0 end
  if type(value) ~= 'number' then error('masked_fill: the value must be a number', 2) end
  return wrap(C.pmp_masked_fill(t.ptr, mask.ptr, value))
end

function Tensor.tril(t, k) return wrap(C.pmp_tril(t.ptr, k or 0)) end
function Tensor.triu(t, k) return wrap(C.pmp_triu(t.ptr, k or 0)) end

---------------------------------------------------------------------------------------------------
-- In place (outside autograd: optimizer steps, loading weights)

--- t:copy_(src): copies src (a tensor, broadcast and converted, or a number) into t in place; returns t.
function Tensor.copy_(t, src)
  src = as_tensor(src, t, 'copy_')
  check(C.pmp_copy_(t.ptr, src.ptr), src)
  return t
end

--- t:fill_(value): sets every element to value in place; returns t.
function Tensor.fill_(t, value)
  if type(value) == 'boolean' then value = value and 1 or 0 end
  if type(value) ~= 'number' then error('fill_: the value must be a number', 2) end
  check(C.pmp_fill_(t.ptr, value))
  return t
end

function Tensor.zero_(t) return t:fill_(0) end

---------------------------------------------------------------------------------------------------
-- Autograd

--- t:requires_grad_(flag = true): marks a leaf tensor as a parameter whose .grad backward fills.
function Tensor.requires_grad_(t, flag)
  check(C.pmp_set_requires_grad(t.ptr, (flag == nil or flag) and 1 or 0))
  return t
end

--- backward([grad], {retain_graph=}); the options table may come first.
function Tensor.backward(t, grad, options)
  if is_options(grad) then grad, options = nil, grad end
  if grad ~= nil and not is_tensor(grad) then grad = as_tensor(grad, t, 'backward') end
  -- backward may run Lua (custom functions) and with it the collector: t and grad must outlive it
  check(C.pmp_backward(t.ptr, grad and grad.ptr, (options and options.retain_graph) and 1 or 0), t, grad)
end

--- Drops t.grad.
function Tensor.zero_grad(t) check(C.pmp_set_grad(t.ptr, nil)) end
-- Backward may call back into Lua (custom autograd functions); LuaJIT allows that only when the FFI
-- call was not made from compiled code.
jit.off(Tensor.backward)

---------------------------------------------------------------------------------------------------
-- Printing

local MAX_PRINTED = 1000   -- beyond this many elements only the edges of each dim are shown
local EDGE = 3

local function format_numbers(values, dtype)
  if dtype == 'bool' then
    local out = {}
    for k, v in ipairs(values) do out[k] = tostring(v) end
    return out
  end
  local integral = dtype ~= 'f64' and dtype ~= 'f32' and dtype ~= 'bf16' and dtype ~= 'f16'
  local fmt = '%d'
  if not integral then
    local big, all_whole = 0, true
    for _, v in ipairs(values) do
      if v == v and v ~= math.huge and v ~= -math.huge then
        big = math.max(big, math.abs(v))
        if v ~= math.floor(v) then all_whole = false end
      end
    end
    if all_whole and big < 1e8 then fmt = '%.0f.'
    elseif big >= 1e5 or (big < 1e-4 and big > 0) then fmt = '%.4e'
    else fmt = '%.4f' end
  end
  local out = {}
  for k, v in ipairs(values) do
    if v ~= v then out[k] = 'nan'
    elseif v == math.huge then out[k] = 'inf'
    elseif v == -math.huge then out[k] = '-inf'
    else out[k] = string.format(fmt, v) end
  end
  return out
end

-- Reads the elements to print: all of them, or the first and last EDGE of every dim.
local function printed_elements(t)
  local shape = shape_of(t)
  local truncate = t:numel() > MAX_PRINTED
  local elements = {}
  local function walk(d, offset)
    if d > #shape then
      elements[#elements + 1] = C.pmp_load_element(t.ptr, offset)
      return
    end
    local size = shape[d]
    local stride = tonumber(t.ptr.strides[d - 1])
    for k = 1, size do
      if truncate and size > 2 * EDGE and k == EDGE + 1 then elements[#elements + 1] = false end
      if not (truncate and size > 2 * EDGE and k > EDGE and k <= size - EDGE) then
        walk(d + 1, offset + (k - 1) * stride)
      end
    end
  end
  walk(1, 0)
  return elements, shape, truncate
end

local function render(t)
  local elements, shape, truncate = printed_elements(t)
  local numbers = {}
  for _, v in ipairs(elements) do
    if v then
      if t.ptr.dtype_id == C.PMP_BOOL then v = v ~= 0 end
      numbers[#numbers + 1] = v
    end
  end
  local text = format_numbers(numbers, DTYPE_NAMES[t.ptr.dtype_id])
  local width = 0
  for _, s in ipairs(text) do width = math.max(width, #s) end
  local next_number, next_element = 0, 0
  local function take()
    next_element = next_element + 1
    if elements[next_element] == false then return nil end
    next_number = next_number + 1
    return string.rep(' ', width - #text[next_number]) .. text[next_number]
  end
  local indent = 'tensor('
  local function build(d)
    if d > #shape then return take() end
    local parts = {}
    local size = shape[d]
    local k = 1
    while k <= size do
      if truncate and size > 2 * EDGE and k == EDGE + 1 then
        next_element = next_element + 1  -- the '...' marker
        parts[#parts + 1] = '...'
        k = size - EDGE + 1
      else
        parts[#parts + 1] = build(d + 1)
        k = k + 1
      end
    end
    local sep = d == #shape and ', ' or (',' .. string.rep('\n', #shape - d) .. string.rep(' ', #indent + d))
    return '[' .. table.concat(parts, sep) .. ']'
  end
  return build(1)
end

local function describe(t)
  local body = t.ptr.ndim == 0 and format_numbers({ t.ptr.dtype_id == C.PMP_BOOL and t:item() or C.pmp_load_element(t.ptr, 0) },
    DTYPE_NAMES[t.ptr.dtype_id])[1] or render(t)
  local extras = { 'shape=' .. shape_string(shape_of(t)), 'dtype=' .. DTYPE_NAMES[t.ptr.dtype_id] }
  if t.ptr.dev.type ~= C.PMP_CPU then extras[#extras + 1] = 'device=' .. device_name(t.ptr.dev) end
  if t.ptr.grad_fn ~= nil then
    extras[#extras + 1] = 'grad_fn=' .. ffi.string(C.pmp_op_name(C.pmp_node_op(t.ptr.grad_fn)))
  elseif t.ptr.needs_grad ~= 0 then
    extras[#extras + 1] = 'requires_grad=true'
  end
  return 'tensor(' .. body .. ', ' .. table.concat(extras, ', ') .. ')'
end

---------------------------------------------------------------------------------------------------
-- The metatype

local function number_or_tensor_op(method)
  return function(a, b)
    if is_tensor(a) then return method(a, b) end
    return method(as_tensor(a, b, 'operator'), b)
  end
end

Handle = ffi.metatype('pmp_tensor_handle', {
  __index = function(t, key)
    local method = Tensor[key]
    if method then return method end
    local property = properties[key]
    if property then return property(t) end
    return nil
  end,
  __newindex = function(t, key, value)
    local setter = setters[key]
    if not setter then error("tensor: cannot set field '" .. tostring(key) .. "'", 2) end
    setter(t, value)
  end,
  __add = number_or_tensor_op(Tensor.add),
  __sub = number_or_tensor_op(Tensor.sub),
  __mul = number_or_tensor_op(Tensor.mul),
  __div = number_or_tensor_op(Tensor.div),
  __pow = number_or_tensor_op(Tensor.pow),
  __unm = function(t) return t:neg() end,
  __len = function(t) return t.ptr.ndim > 0 and tonumber(t.ptr.sizes[0]) or 0 end,
  __tostring = describe,
  __gc = function(t) C.pmp_tensor_release(t.ptr) end,
})

return M
