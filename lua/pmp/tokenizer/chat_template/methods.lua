-- The methods templates call on str, dict and list values and the attributes of loop objects, with
-- the reading of Python-style arguments they share with the filters and globals.
local V = require 'pmp.tokenizer.chat_template.values'
local S = require 'pmp.tokenizer.chat_template.strings'
local O = require 'pmp.tokenizer.chat_template.operators'

local sub, find, format, concat = string.sub, string.find, string.format, table.concat
local unpack = unpack or table.unpack
local NONE, CallableMT, throw, undefined_error, undef, new_list, new_tuple, kind, is_undef, tonum, py_type, dict_keys =
  V.NONE, V.CallableMT, V.throw, V.undefined_error, V.undef, V.new_list, V.new_tuple, V.kind, V.is_undef, V.tonum,
  V.py_type, V.dict_keys
local ulen, chars, py_isspace, py_strip, ascii_upper, ascii_lower, py_split, py_rsplit, py_replace, py_repr, py_str =
  S.ulen, S.chars, S.py_isspace, S.py_strip, S.ascii_upper, S.ascii_lower, S.py_split, S.py_rsplit, S.py_replace,
  S.py_repr, S.py_str
local truthy, py_eq, iterate, slice_indices = O.truthy, O.py_eq, O.iterate, O.slice_indices

local STR_METHODS, DICT_METHODS, LIST_METHODS = {}, {}, {}

-- Reads Python-style parameters: spec is a list of names; returns values (nil when not given).
local function params(args, kwargs, spec, fname)
  local vals = {}
  local n = #spec
  if #args > n then throw(format('%s() takes at most %d arguments (%d given)', fname, n, #args)) end
  for i = 1, #args do vals[i] = args[i] end
  if kwargs then
    for key, v in pairs(kwargs) do
      local found
      for i = 1, n do
        if spec[i] == key then
          if vals[i] ~= nil and i <= #args then throw(format("%s() got multiple values for argument '%s'", fname, key)) end
          vals[i] = v
          found = true
        end
      end
      if not found then throw(format("%s() got an unexpected keyword argument '%s'", fname, tostring(key))) end
    end
  end
  return unpack(vals, 1, n)
end

local function opt(v) if v == nil or v == NONE then return nil end return v end

local function need_str(v, what)
  if type(v) ~= 'string' then
    if is_undef(v) then undefined_error(v) end
    throw(format('%s must be str, not %s', what, py_type(v)))
  end
  return v
end

-- str methods
local function affix_test(s, args, kwargs, name, at_end)
  local prefix, start, stop = params(args, kwargs, { 'prefix', 'start', 'end' }, name)
  local cs
  if opt(start) or opt(stop) then
    cs = chars(s)
    s = concat(cs, '', 1, #cs) -- normalise
    local a, b = slice_indices(#cs, opt(start), opt(stop), nil)
    s = concat(cs, '', a + 1, b)
  end
  local list = kind(prefix) == 'list' and prefix or { prefix }
  for _, p in ipairs(list) do
    need_str(p, name .. ' arg')
    if at_end then
      if p == '' or sub(s, -#p) == p then return true end
    elseif sub(s, 1, #p) == p then
      return true
    end
  end
  return false
end

STR_METHODS.startswith = function(s, args, kwargs) return affix_test(s, args, kwargs, 'startswith', false) end
STR_METHODS.endswith = function(s, args, kwargs) return affix_test(s, args, kwargs, 'endswith', true) end
STR_METHODS.strip = function(s, args, kwargs) return py_strip(s, opt(params(args, kwargs, { 'chars' }, 'strip')), true, true) end
STR_METHODS.lstrip = function(s, args, kwargs) return py_strip(s, opt(params(args, kwargs, { 'chars' }, 'lstrip')), true, false) end
STR_METHODS.rstrip = function(s, args, kwargs) return py_strip(s, opt(params(args, kwargs, { 'chars' }, 'rstrip')), false, true) end
STR_METHODS.split = function(s, args, kwargs)
  local sep, maxsplit = params(args, kwargs, { 'sep', 'maxsplit' }, 'split')
  return py_split(s, opt(sep), opt(maxsplit) and tonum(maxsplit))
end
STR_METHODS.rsplit = function(s, args, kwargs)
  local sep, maxsplit = params(args, kwargs, { 'sep', 'maxsplit' }, 'rsplit')
  return py_rsplit(s, opt(sep), opt(maxsplit) and tonum(maxsplit))
end
STR_METHODS.splitlines = function(s, args, kwargs)
  local keepends = params(args, kwargs, { 'keepends' }, 'splitlines')
  local out, pos = new_list(), 1
  while pos <= #s do
    local a, b = find(s, '\r?\n', pos)
    local a2 = find(s, '\r', pos, true)
    if a2 and (not a or a2 < a) and sub(s, a2 + 1, a2 + 1) ~= '\n' then a, b = a2, a2 end
    if not a then out[#out + 1] = sub(s, pos); break end
    out[#out + 1] = sub(s, pos, truthy(keepends) and b or a - 1)
    pos = b + 1
  end
  return out
end
STR_METHODS.replace = function(s, args, kwargs)
  local old, new, count = params(args, kwargs, { 'old', 'new', 'count' }, 'replace')
  return py_replace(s, need_str(old, 'replace() argument 1'), need_str(new, 'replace() argument 2'),
    opt(count) and tonum(count))
end
STR_METHODS.upper = function(s) return ascii_upper(s) end
STR_METHODS.lower = function(s) return ascii_lower(s) end
STR_METHODS.title = function(s)
  return (s:gsub('(%a)(%a*)', function(a, b) return a:upper() .. b:lower() end))
end
STR_METHODS.capitalize = function(s) return sub(s, 1, 1):upper() .. ascii_lower(sub(s, 2)) end
STR_METHODS.find = function(s, args, kwargs)
  local sub_s = need_str(params(args, kwargs, { 'sub' }, 'find'), 'find() argument')
  local a = find(s, sub_s, 1, true)
  if not a then return -1 end
  return ulen(sub(s, 1, a - 1))
end
STR_METHODS.rfind = function(s, args, kwargs)
  local sub_s = need_str(params(args, kwargs, { 'sub' }, 'rfind'), 'rfind() argument')
  local last, pos = nil, 1
  while true do
    local a = find(s, sub_s, pos, true)
    if not a then break end
    last, pos = a, a + 1
  end
  if not last then return -1 end
  return ulen(sub(s, 1, last - 1))
end
STR_METHODS.count = function(s, args, kwargs)
  local sub_s = need_str(params(args, kwargs, { 'sub' }, 'count'), 'count() argument')
  if sub_s == '' then return ulen(s) + 1 end
  local n, pos = 0, 1
  while true do
    local a, b = find(s, sub_s, pos, true)
    if not a then return n end
    n, pos = n + 1, b + 1
  end
end
STR_METHODS.join = function(s, args, kwargs)
  local items = iterate(params(args, kwargs, { 'iterable' }, 'join'))
  for i = 1, #items do need_str(items[i], 'sequence item') end
  return concat(items, s)
end
STR_METHODS.isdigit = function(s) return s ~= '' and not find(s, '%D') end
STR_METHODS.isalpha = function(s) return s ~= '' and not find(s, '%A') end
STR_METHODS.isalnum = function(s) return s ~= '' and not find(s, '%W') end
STR_METHODS.isspace = function(s)
  if s == '' then return false end
  for _, ch in ipairs(chars(s)) do if not py_isspace(ch) then return false end end
  return true
end
STR_METHODS.islower = function(s) return find(s, '%l') ~= nil and not find(s, '%u') end
STR_METHODS.isupper = function(s) return find(s, '%u') ~= nil and not find(s, '%l') end
STR_METHODS.format = function(s, args, kwargs)
  local auto = 0
  return (s:gsub('{([^{}]*)}', function(field)
    local v
    if field == '' then v = args[auto + 1]; auto = auto + 1
    elseif field:match('^%d+$') then v = args[tonumber(field) + 1]
    else v = kwargs and kwargs[field] end
    if v == nil then throw('format: missing argument for {' .. field .. '}') end
    return py_str(v)
  end):gsub('{{', '{'):gsub('}}', '}'))
end

DICT_METHODS.get = function(d, args, kwargs)
  local key, default = params(args, kwargs, { 'key', 'default' }, 'get')
  local v = d[key]
  if v ~= nil then return v end
  if default == nil then return NONE end
  return default
end
DICT_METHODS.items = function(d)
  local out = new_list()
  for i, key in ipairs(dict_keys(d)) do out[i] = new_tuple({ key, d[key] }) end
  return out
end
DICT_METHODS.keys = function(d) return new_list(dict_keys(d)) end
DICT_METHODS.values = function(d)
  local out = new_list()
  for i, key in ipairs(dict_keys(d)) do out[i] = d[key] end
  return out
end

LIST_METHODS.index = function(l, args, kwargs)
  local x = params(args, kwargs, { 'value' }, 'index')
  for i = 1, #l do if py_eq(l[i], x) then return i - 1 end end
  throw(py_repr(x) .. ' is not in list')
end
LIST_METHODS.count = function(l, args, kwargs)
  local x = params(args, kwargs, { 'value' }, 'count')
  local n = 0
  for i = 1, #l do if py_eq(l[i], x) then n = n + 1 end end
  return n
end

-- Loop objects


local function loop_attr(l, name)
  local i, n = l.i, l.n
  if name == 'index' then return i
  elseif name == 'index0' then return i - 1
  elseif name == 'first' then return i == 1
  elseif name == 'last' then return i == n
  elseif name == 'length' then return n
  elseif name == 'revindex' then return n - i + 1
  elseif name == 'revindex0' then return n - i
  elseif name == 'depth' then return 1
  elseif name == 'depth0' then return 0
  elseif name == 'previtem' then
    if i > 1 then return l.items[i - 1] end
    return undef('there is no previous item')
  elseif name == 'nextitem' then
    if i < n then return l.items[i + 1] end
    return undef('there is no next item')
  elseif name == 'cycle' then
    return setmetatable({ name = 'cycle', fn = function(args)
      if #args == 0 then throw('no items for cycling given') end
      return args[(i - 1) % #args + 1]
    end }, CallableMT)
  elseif name == 'changed' then
    return setmetatable({ name = 'changed', fn = function(args)
      local key = new_list(args)
      if l.last_changed ~= nil and py_eq(l.last_changed, key) then return false end
      l.last_changed = key
      return true
    end }, CallableMT)
  end
  return nil
end

return {
  params = params, opt = opt, need_str = need_str, STR_METHODS = STR_METHODS, DICT_METHODS = DICT_METHODS,
  LIST_METHODS = LIST_METHODS, loop_attr = loop_attr,
}
