-- Python's operators on template values: truth, equality, ordering, `in`, iteration, len(), arithmetic
-- and slicing.
local V = require 'pmp.tokenizer.chat_template.values'
local S = require 'pmp.tokenizer.chat_template.strings'

local find, format, concat, rep = string.find, string.format, table.concat, string.rep
local floor = math.floor
local NONE, UndefMT, FloatMT, TupleMT, NamespaceMT, CallableMT, LoopMT =
  V.NONE, V.UndefMT, V.FloatMT, V.TupleMT, V.NamespaceMT, V.CallableMT, V.LoopMT
local throw, undefined_error, mkfloat, new_list, new_tuple, kind, is_undef, isfloat, tonum, py_type, dict_keys =
  V.throw, V.undefined_error, V.mkfloat, V.new_list, V.new_tuple, V.kind, V.is_undef, V.isfloat, V.tonum,
  V.py_type, V.dict_keys
local ulen, chars, py_str, py_repr = S.ulen, S.chars, S.py_str, S.py_repr

-- Truth, equality, ordering

local function truthy(v)
  local t = type(v)
  if t == 'boolean' then return v
  elseif t == 'string' then return v ~= ''
  elseif t == 'number' then return v ~= 0
  elseif v == NONE or v == nil then return false
  elseif t == 'table' then
    local mt = getmetatable(v)
    if mt == UndefMT then return false
    elseif mt == FloatMT then return v.n ~= 0
    elseif mt == NamespaceMT or mt == CallableMT or mt == LoopMT then return true
    end
    return next(v) ~= nil
  end
  return true
end

local function py_eq(a, b)
  if a == b then return true end
  local ka, kb = kind(a), kind(b)
  if (ka == 'number' or ka == 'boolean') and (kb == 'number' or kb == 'boolean') then return tonum(a) == tonum(b) end
  if ka ~= kb then return false end
  if ka == 'list' then
    if (getmetatable(a) == TupleMT) ~= (getmetatable(b) == TupleMT) or #a ~= #b then return false end
    for i = 1, #a do if not py_eq(a[i], b[i]) then return false end end
    return true
  elseif ka == 'dict' then
    local n = 0
    for key, x in pairs(a) do
      n = n + 1
      if b[key] == nil or not py_eq(x, b[key]) then return false end
    end
    for _ in pairs(b) do n = n - 1 end
    return n == 0
  elseif ka == 'undefined' then
    return true
  end
  return false
end

local function py_lt(a, b, op)
  local x, y = tonum(a), tonum(b)
  if x and y then return x < y end
  local ka, kb = kind(a), kind(b)
  if ka == 'string' and kb == 'string' then return a < b end
  if ka == 'list' and kb == 'list' then
    for i = 1, math.min(#a, #b) do
      if not py_eq(a[i], b[i]) then return py_lt(a[i], b[i], op) end
    end
    return #a < #b
  end
  if ka == 'undefined' then undefined_error(a) elseif kb == 'undefined' then undefined_error(b) end
  throw(format("'%s' not supported between instances of '%s' and '%s'", op or '<', py_type(a), py_type(b)))
end

local function compare(op, a, b)
  if op == '==' then return py_eq(a, b)
  elseif op == '!=' then return not py_eq(a, b)
  elseif op == '<' then return py_lt(a, b, op)
  elseif op == '>' then return py_lt(b, a, op)
  elseif op == '<=' then return py_eq(a, b) or py_lt(a, b, op)
  elseif op == '>=' then return py_eq(a, b) or py_lt(b, a, op)
  end
end

local function contains(container, item)
  local k = kind(container)
  if k == 'string' then
    if type(item) ~= 'string' then
      if is_undef(item) then undefined_error(item) end
      throw("'in <string>' requires string as left operand, not " .. py_type(item))
    end
    return find(container, item, 1, true) ~= nil
  elseif k == 'list' then
    for i = 1, #container do if py_eq(container[i], item) then return true end end
    return false
  elseif k == 'dict' then
    if container[item] ~= nil then return true end
    local x = tonum(item)
    if x and type(item) ~= 'number' then return container[x] ~= nil end
    return false
  elseif k == 'undefined' then
    return false
  end
  throw("argument of type '" .. py_type(container) .. "' is not iterable")
end

-- The items a for loop (or list()) sees.
local function iterate(v)
  local k = kind(v)
  if k == 'list' then
    local out = {}
    for i = 1, #v do out[i] = v[i] end
    return out
  elseif k == 'dict' then return dict_keys(v)
  elseif k == 'string' then return chars(v)
  elseif k == 'undefined' then return {}
  end
  throw("'" .. py_type(v) .. "' object is not iterable")
end

local function length(v)
  local k = kind(v)
  if k == 'string' then return ulen(v)
  elseif k == 'list' then return #v
  elseif k == 'dict' then return #dict_keys(v)
  elseif k == 'undefined' then return 0
  end
  throw("object of type '" .. py_type(v) .. "' has no len()")
end

-- Arithmetic

local function arith_fail(op, a, b)
  if is_undef(a) then undefined_error(a) elseif is_undef(b) then undefined_error(b) end
  throw(format("unsupported operand type(s) for %s: '%s' and '%s'", op, py_type(a), py_type(b)))
end

local function num_result(x, a, b)
  if isfloat(a) or isfloat(b) then return mkfloat(x) end
  return x
end

local function seq_repeat(seq, n)
  if type(seq) == 'string' then
    if n <= 0 then return '' end
    return rep(seq, n)
  end
  local out = getmetatable(seq) == TupleMT and new_tuple() or new_list()
  for _ = 1, n do for i = 1, #seq do out[#out + 1] = seq[i] end end
  return out
end

local function binop(op, a, b)
  local x, y = tonum(a), tonum(b)
  if op == '+' then
    if x and y then return num_result(x + y, a, b) end
    local ka, kb = kind(a), kind(b)
    if ka == 'string' and kb == 'string' then return a .. b end
    if ka == 'list' and kb == 'list' and (getmetatable(a) == TupleMT) == (getmetatable(b) == TupleMT) then
      local out = getmetatable(a) == TupleMT and new_tuple() or new_list()
      for i = 1, #a do out[#out + 1] = a[i] end
      for i = 1, #b do out[#out + 1] = b[i] end
      return out
    end
    arith_fail(op, a, b)
  elseif op == '-' then
    if x and y then return num_result(x - y, a, b) end
    arith_fail(op, a, b)
  elseif op == '*' then
    if x and y then return num_result(x * y, a, b) end
    local ka, kb = kind(a), kind(b)
    if (ka == 'string' or ka == 'list') and y and not isfloat(b) then return seq_repeat(a, y) end
    if (kb == 'string' or kb == 'list') and x and not isfloat(a) then return seq_repeat(b, x) end
    arith_fail(op, a, b)
  elseif op == '/' then
    if x and y then
      if y == 0 then throw('division by zero') end
      return mkfloat(x / y)
    end
    arith_fail(op, a, b)
  elseif op == '//' then
    if x and y then
      if y == 0 then throw('integer division or modulo by zero') end
      return num_result(floor(x / y), a, b)
    end
    arith_fail(op, a, b)
  elseif op == '%' then
    if x and y then
      if y == 0 then throw('integer division or modulo by zero') end
      return num_result(x % y, a, b)
    end
    if type(a) == 'string' then
      -- printf-style formatting: %s %r %d %i %f %%
      local args = kind(b) == 'list' and getmetatable(b) == TupleMT and b or { b }
      local i = 0
      return (a:gsub('%%([-+ #0]*%d*%.?%d*)([sdifr%%])', function(flags, conv)
        if conv == '%' then return '%' end
        i = i + 1
        local v = args[i]
        if v == nil then throw('not enough arguments for format string') end
        if conv == 's' then return format('%' .. flags .. 's', py_str(v))
        elseif conv == 'r' then return format('%' .. flags .. 's', py_repr(v))
        elseif conv == 'f' then return format('%' .. flags .. 'f', tonum(v) or throw('a real number is required'))
        end
        return format('%' .. flags .. 'd', floor(tonum(v) or throw('%d format: a real number is required')))
      end))
    end
    arith_fail(op, a, b)
  elseif op == '**' then
    if x and y then
      local r = x ^ y
      if isfloat(a) or isfloat(b) or y < 0 then return mkfloat(r) end
      return r
    end
    arith_fail(op, a, b)
  end
end

-- Slicing

-- Python slice.indices(len) for step ~= 0; returns start, stop, step (0-based, stop exclusive).
local function slice_indices(n, a, b, c)
  local step = c and tonum(c) or 1
  if step == 0 then throw('slice step cannot be zero') end
  local start, stop
  if step > 0 then
    start = a and tonum(a) or 0
    stop = b and tonum(b) or n
    if start < 0 then start = math.max(start + n, 0) elseif start > n then start = n end
    if stop < 0 then stop = math.max(stop + n, 0) elseif stop > n then stop = n end
  else
    start = a and tonum(a) or n - 1
    stop = b and tonum(b) or -1
    if a then
      if start < 0 then start = math.max(start + n, -1) elseif start >= n then start = n - 1 end
    end
    if b then
      if stop < 0 then stop = math.max(stop + n, -1) elseif stop >= n then stop = n - 1 end
    end
  end
  return start, stop, step
end

local function do_slice(v, a, b, c)
  local k = kind(v)
  if k == 'undefined' then undefined_error(v) end
  if k ~= 'string' and k ~= 'list' then throw("'" .. py_type(v) .. "' object is not subscriptable") end
  local items = k == 'string' and chars(v) or v
  local start, stop, step = slice_indices(#items, a, b, c)
  local out = {}
  local i = start
  if step > 0 then
    while i < stop do out[#out + 1] = items[i + 1]; i = i + step end
  else
    while i > stop do out[#out + 1] = items[i + 1]; i = i + step end
  end
  if k == 'string' then return concat(out) end
  if getmetatable(v) == TupleMT then return new_tuple(out) end
  return new_list(out)
end

return {
  truthy = truthy, py_eq = py_eq, py_lt = py_lt, compare = compare, contains = contains, iterate = iterate,
  length = length, binop = binop, slice_indices = slice_indices, do_slice = do_slice,
}
