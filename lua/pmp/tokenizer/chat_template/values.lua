-- The template's values: what Python type each Lua value stands for. Strings, numbers, booleans and
-- json.null (None) are themselves; tables are lists (json.array or a [1] entry), dicts, or boxes marked
-- by a metatable (floats with integral values, tuples, namespaces, callables, loop objects, Undefined).
local json = require 'pmp.json'

local floor, huge = math.floor, math.huge

local NONE = json.null
local UndefMT = { __name = 'Undefined' }
local FloatMT = { __name = 'float' }
local TupleMT = { __name = 'tuple' }
local NamespaceMT = { __name = 'Namespace' }
local CallableMT = { __name = 'function' }
local LoopMT = { __name = 'LoopContext' }
local ErrorMT = {}

local function undef(msg) return setmetatable({ msg = msg }, UndefMT) end

-- Errors thrown while rendering: tables, turned into strings (with the line) by render.
local function throw(msg, raised) error(setmetatable({ msg = msg, raised = raised }, ErrorMT), 0) end

local function undefined_error(u) throw(u.msg or 'undefined value') end

local function mkfloat(x)
  if x == floor(x) and x > -huge and x < huge then return setmetatable({ n = x }, FloatMT) end
  return x
end

local function new_list(t) return json.array(t or {}) end
local function new_tuple(t) return setmetatable(t or {}, TupleMT) end
local function new_dict()
  local order = {}
  return json.ordered({}, order), order
end

local function kind(v)
  local t = type(v)
  if t == 'string' then return 'string'
  elseif t == 'number' then return 'number'
  elseif t == 'boolean' then return 'boolean'
  elseif v == NONE or v == nil then return 'none'
  elseif t == 'table' then
    local mt = getmetatable(v)
    if mt == UndefMT then return 'undefined'
    elseif mt == FloatMT then return 'number'
    elseif mt == TupleMT then return 'list'
    elseif mt == NamespaceMT then return 'namespace'
    elseif mt == CallableMT then return 'callable'
    elseif mt == LoopMT then return 'loop'
    elseif json.is_array(v) or rawget(v, 1) ~= nil then return 'list'
    end
    return 'dict'
  elseif t == 'function' then return 'callable'
  end
  return 'other'
end

local function is_undef(v) return type(v) == 'table' and getmetatable(v) == UndefMT end

local function isfloat(v)
  if type(v) == 'number' then return v ~= floor(v) or v == huge or v == -huge end
  return type(v) == 'table' and getmetatable(v) == FloatMT
end

-- Number value of a number, a float box or a boolean (Python bools are ints); nil otherwise.
local function tonum(v)
  local t = type(v)
  if t == 'number' then return v
  elseif t == 'boolean' then return v and 1 or 0
  elseif t == 'table' and getmetatable(v) == FloatMT then return v.n
  end
  return nil
end

local function py_type(v)
  local k = kind(v)
  if k == 'string' then return 'str'
  elseif k == 'number' then return isfloat(v) and 'float' or 'int'
  elseif k == 'boolean' then return 'bool'
  elseif k == 'none' then return 'NoneType'
  elseif k == 'list' then return getmetatable(v) == TupleMT and 'tuple' or 'list'
  elseif k == 'dict' then return 'dict'
  elseif k == 'undefined' then return 'Undefined'
  elseif k == 'namespace' then return 'Namespace'
  elseif k == 'loop' then return 'LoopContext'
  end
  return 'function'
end

local function key_less(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then return ta < tb end
  if ta == 'number' or ta == 'string' then return a < b end
  return tostring(a) < tostring(b)
end

local function dict_keys(d)
  local order = json.keys(d)
  local out, seen = {}, {}
  if order then
    for _, k in ipairs(order) do
      if d[k] ~= nil and not seen[k] then seen[k] = true; out[#out + 1] = k end
    end
  end
  local extra
  for k in pairs(d) do
    if not seen[k] then extra = extra or {}; extra[#extra + 1] = k end
  end
  if extra then
    table.sort(extra, key_less)
    for _, k in ipairs(extra) do out[#out + 1] = k end
  end
  return out
end

return {
  NONE = NONE, UndefMT = UndefMT, FloatMT = FloatMT, TupleMT = TupleMT, NamespaceMT = NamespaceMT,
  CallableMT = CallableMT, LoopMT = LoopMT, ErrorMT = ErrorMT,
  undef = undef, throw = throw, undefined_error = undefined_error, mkfloat = mkfloat, new_list = new_list,
  new_tuple = new_tuple, new_dict = new_dict, kind = kind, is_undef = is_undef, isfloat = isfloat, tonum = tonum,
  py_type = py_type, key_less = key_less, dict_keys = dict_keys,
}
