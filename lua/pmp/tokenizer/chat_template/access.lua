-- Attribute and item access (obj.name, obj[key]) and calls, with Python's and jinja2's semantics: a
-- missing attribute or item is an Undefined that carries the error message.
local V = require 'pmp.tokenizer.chat_template.values'
local S = require 'pmp.tokenizer.chat_template.strings'
local methods = require 'pmp.tokenizer.chat_template.methods'

local sub, format = string.sub, string.format
local unpack = unpack or table.unpack
local NONE, CallableMT, throw, undefined_error, undef, kind, isfloat, tonum, py_type =
  V.NONE, V.CallableMT, V.throw, V.undefined_error, V.undef, V.kind, V.isfloat, V.tonum, V.py_type
local is_ascii, ulen, chars, py_repr = S.is_ascii, S.ulen, S.chars, S.py_repr
local STR_METHODS, DICT_METHODS, LIST_METHODS, loop_attr =
  methods.STR_METHODS, methods.DICT_METHODS, methods.LIST_METHODS, methods.loop_attr

local function bound(obj, fn, name)
  return setmetatable({ name = name, fn = function(args, kwargs) return fn(obj, args, kwargs) end }, CallableMT)
end

local function type_desc(v)
  if v == NONE then return "'None'" end
  return "'" .. py_type(v) .. " object'"
end

local function get_attr(obj, name)
  local k = kind(obj)
  if k == 'dict' then
    local m = DICT_METHODS[name]
    if m then return bound(obj, m, name) end
    local v = obj[name]
    if v ~= nil then return v end
  elseif k == 'string' then
    local m = STR_METHODS[name]
    if m then return bound(obj, m, name) end
  elseif k == 'list' then
    local m = LIST_METHODS[name]
    if m then return bound(obj, m, name) end
  elseif k == 'namespace' then
    local v = obj.vals[name]
    if v ~= nil then return v end
  elseif k == 'loop' then
    local v = loop_attr(obj, name)
    if v ~= nil then return v end
  elseif k == 'undefined' then
    undefined_error(obj)
  end
  return undef(format("%s has no attribute '%s'", type_desc(obj), name))
end

local function get_item(obj, key)
  local k = kind(obj)
  if k == 'dict' then
    local v = obj[key]
    if v ~= nil then return v end
    if type(key) == 'string' then return get_attr(obj, key) end
    local x = tonum(key)
    if x and type(key) ~= 'number' then v = obj[x]; if v ~= nil then return v end end
    return undef(format("%s has no element %s", type_desc(obj):sub(2, -2), py_repr(key)))
  elseif k == 'list' or k == 'string' then
    if type(key) == 'string' then return get_attr(obj, key) end
    local x = tonum(key)
    if x and not isfloat(key) then
      local n = k == 'list' and #obj or ulen(obj)
      if x < 0 then x = x + n end
      if x >= 0 and x < n then
        if k == 'list' then return obj[x + 1] end
        if is_ascii(obj) then return sub(obj, x + 1, x + 1) end
        return chars(obj)[x + 1]
      end
    end
    return undef(format("%s has no element %s", type_desc(obj):sub(2, -2), py_repr(key)))
  elseif k == 'undefined' then
    undefined_error(obj)
  elseif type(key) == 'string' then
    return get_attr(obj, key)
  end
  return undef(format("%s has no element %s", type_desc(obj):sub(2, -2), py_repr(key)))
end

-- args: list of positional values; kwargs: dict (ordered) of keyword values.
local function call_value(f, args, kwargs)
  local k = kind(f)
  if k == 'callable' then
    if type(f) == 'function' then return f(unpack(args, 1, #args)) end
    return f.fn(args, kwargs or {})
  elseif k == 'undefined' then
    undefined_error(f)
  end
  throw("'" .. py_type(f) .. "' object is not callable")
end

return { get_attr = get_attr, get_item = get_item, call_value = call_value }
