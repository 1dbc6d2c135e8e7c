-- The filters (`x | name(args)`): f(value, args, kwargs, ctx).
local V = require 'pmp.tokenizer.chat_template.values'
local S = require 'pmp.tokenizer.chat_template.strings'
local O = require 'pmp.tokenizer.chat_template.operators'
local methods = require 'pmp.tokenizer.chat_template.methods'
local access = require 'pmp.tokenizer.chat_template.access'
local tojson = require 'pmp.tokenizer.chat_template.tojson'
local TESTS = require 'pmp.tokenizer.chat_template.tests'

local concat, rep = table.concat, string.rep
local floor, abs = math.floor, math.abs
local unpack = unpack or table.unpack
local throw, undef, mkfloat, new_list, new_tuple, kind, is_undef, isfloat, tonum, py_type =
  V.throw, V.undef, V.mkfloat, V.new_list, V.new_tuple, V.kind, V.is_undef, V.isfloat, V.tonum, V.py_type
local ulen, chars, py_strip, ascii_upper, ascii_lower, py_split, py_replace, py_str =
  S.ulen, S.chars, S.py_strip, S.ascii_upper, S.ascii_lower, S.py_split, S.py_replace, S.py_str
local truthy, py_eq, py_lt, iterate, length, binop, do_slice =
  O.truthy, O.py_eq, O.py_lt, O.iterate, O.length, O.binop, O.do_slice
local params, opt, STR_METHODS, DICT_METHODS = methods.params, methods.opt, methods.STR_METHODS, methods.DICT_METHODS
local get_attr, get_item = access.get_attr, access.get_item

local FILTERS = {}

local function attr_getter(spec)
  if spec == nil then return function(x) return x end end
  local parts = {}
  if type(spec) == 'string' then
    for part in spec:gmatch('[^.]+') do parts[#parts + 1] = part:match('^%d+$') and tonumber(part) or part end
  else
    parts[1] = spec
  end
  return function(x)
    for _, part in ipairs(parts) do x = get_item(x, part) end
    return x
  end
end

local function run_test(name, v, args, ctx)
  local t = TESTS[name]
  if not t then throw("No test named '" .. tostring(name) .. "'.") end
  return truthy(t(v, args or {}, nil, ctx))
end

local function run_filter(name, v, args, kwargs, ctx)
  local f = FILTERS[name]
  if not f then throw("No filter named '" .. tostring(name) .. "'.") end
  return f(v, args or {}, kwargs, ctx)
end

local function select_impl(v, args, ctx, by_attr, want)
  local seq = iterate(v)
  local get, tname, targs
  if by_attr then
    if args[1] == nil then throw('Missing parameter for attribute name') end
    get = attr_getter(args[1])
    tname = args[2]
    targs = { unpack(args, 3) }
  else
    get = function(x) return x end
    tname = args[1]
    targs = { unpack(args, 2) }
  end
  local out = new_list()
  for _, item in ipairs(seq) do
    local x = get(item)
    local ok
    if tname == nil then ok = truthy(x) else ok = run_test(tname, x, targs, ctx) end
    if ok == want then out[#out + 1] = item end
  end
  return out
end

FILTERS.selectattr = function(v, args, _, ctx) return select_impl(v, args, ctx, true, true) end
FILTERS.rejectattr = function(v, args, _, ctx) return select_impl(v, args, ctx, true, false) end
FILTERS.select = function(v, args, _, ctx) return select_impl(v, args, ctx, false, true) end
FILTERS.reject = function(v, args, _, ctx) return select_impl(v, args, ctx, false, false) end

FILTERS.map = function(v, args, kwargs, ctx)
  local seq = iterate(v)
  local out = new_list()
  if kwargs and kwargs.attribute ~= nil then
    local get = attr_getter(kwargs.attribute)
    local default = kwargs.default
    for i, item in ipairs(seq) do
      local x = get(item)
      if is_undef(x) and default ~= nil then x = default end
      out[i] = x
    end
    return out
  end
  local name = args[1]
  if name == nil then return new_list(seq) end
  local rest = { unpack(args, 2) }
  for i, item in ipairs(seq) do out[i] = run_filter(name, item, rest, kwargs, ctx) end
  return out
end

FILTERS.tojson = function(v, args, kwargs)
  local ensure_ascii, indent, separators, sort_keys = params(args, kwargs,
    { 'ensure_ascii', 'indent', 'separators', 'sort_keys' }, 'tojson')
  return tojson(v, ensure_ascii, indent, separators, sort_keys)
end

FILTERS.trim = function(v, args, kwargs)
  local chars_arg = params(args, kwargs, { 'chars' }, 'trim')
  return py_strip(py_str(v), opt(chars_arg), true, true)
end
FILTERS.length = function(v) return length(v) end
FILTERS.count = FILTERS.length
FILTERS.upper = function(v) return ascii_upper(py_str(v)) end
FILTERS.lower = function(v) return ascii_lower(py_str(v)) end
FILTERS.capitalize = function(v) return STR_METHODS.capitalize(py_str(v)) end
FILTERS.title = function(v) return STR_METHODS.title(py_str(v)) end
FILTERS.string = function(v) return py_str(v) end
FILTERS.safe = function(v) return v end
FILTERS.escape = function(v)
  if type(v) ~= 'string' then v = py_str(v) end
  return (v:gsub('[&<>"\']', { ['&'] = '&amp;', ['<'] = '&lt;', ['>'] = '&gt;', ['"'] = '&#34;', ["'"] = '&#39;' }))
end
FILTERS.e = FILTERS.escape
FILTERS.default = function(v, args, kwargs)
  local default, boolean = params(args, kwargs, { 'default_value', 'boolean' }, 'default')
  if default == nil then default = '' end
  if is_undef(v) or (truthy(boolean) and not truthy(v)) then return default end
  return v
end
FILTERS.d = FILTERS.default
FILTERS.join = function(v, args, kwargs)
  local sep, attribute = params(args, kwargs, { 'd', 'attribute' }, 'join')
  local get = attr_getter(opt(attribute))
  local parts = {}
  for i, item in ipairs(iterate(v)) do parts[i] = py_str(get(item)) end
  return concat(parts, sep ~= nil and py_str(sep) or '')
end
FILTERS.first = function(v)
  if type(v) == 'string' then return chars(v)[1] or undef('No first item, sequence was empty.') end
  local items = iterate(v)
  if #items == 0 then return undef('No first item, sequence was empty.') end
  return items[1]
end
FILTERS.last = function(v)
  local items = iterate(v)
  if #items == 0 then return undef('No last item, sequence was empty.') end
  return items[#items]
end
FILTERS.list = function(v) return new_list(iterate(v)) end
FILTERS.items = function(v)
  if is_undef(v) then return new_list() end
  if kind(v) ~= 'dict' then throw('Can only get item pairs from a mapping.') end
  return DICT_METHODS.items(v)
end
FILTERS.replace = function(v, args, kwargs)
  local old, new, count = params(args, kwargs, { 'old', 'new', 'count' }, 'replace')
  return py_replace(py_str(v), py_str(old), py_str(new), opt(count) and tonum(count))
end
FILTERS.reverse = function(v)
  if type(v) == 'string' then return do_slice(v, nil, nil, -1) end
  local items = iterate(v)
  local out = new_list()
  for i = #items, 1, -1 do out[#out + 1] = items[i] end
  return out
end
FILTERS.int = function(v, args, kwargs)
  local default = params(args, kwargs, { 'default', 'base' }, 'int')
  if default == nil then default = 0 end
  local x = tonum(v)
  if x then return x >= 0 and floor(x) or -floor(-x) end
  if type(v) == 'string' then
    local s = py_strip(v, nil, true, true):gsub('_', '')
    x = tonumber(s:match('^[-+]?%d+$') and s or '')
    if x then return x end
    x = tonumber(s)
    if x and s:match('^[-+]?[%d.]+[eE]?[-+]?%d*$') then return x >= 0 and floor(x) or -floor(-x) end
  end
  return default
end
FILTERS.float = function(v, args, kwargs)
  local default = params(args, kwargs, { 'default' }, 'float')
  local x = tonum(v)
  if not x and type(v) == 'string' then x = tonumber(py_strip(v, nil, true, true)) end
  if x then return mkfloat(x) end
  if default == nil then return mkfloat(0) end
  return default
end
FILTERS.abs = function(v)
  local x = tonum(v)
  if not x then throw("bad operand type for abs(): '" .. py_type(v) .. "'") end
  if isfloat(v) then return mkfloat(abs(x)) end
  return abs(x)
end
FILTERS.round = function(v, args, kwargs)
  local precision, method = params(args, kwargs, { 'precision', 'method' }, 'round')
  local x = tonum(v) or throw('round: a number is required')
  local p = precision and tonum(precision) or 0
  local m = 10 ^ p
  method = method or 'common'
  local r
  if method == 'ceil' then r = math.ceil(x * m) / m
  elseif method == 'floor' then r = floor(x * m) / m
  else r = (x >= 0 and floor(x * m + 0.5) or -floor(-x * m + 0.5)) / m end
  return mkfloat(r)
end
FILTERS.sum = function(v, args, kwargs)
  local attribute, start = params(args, kwargs, { 'attribute', 'start' }, 'sum')
  local get = attr_getter(opt(attribute))
  local total = start or 0
  for _, item in ipairs(iterate(v)) do total = binop('+', total, get(item)) end
  return total
end
local function sort_key(case_sensitive)
  return function(x)
    if type(x) == 'string' and not case_sensitive then return ascii_lower(x) end
    return x
  end
end
FILTERS.sort = function(v, args, kwargs)
  local reverse, case_sensitive, attribute = params(args, kwargs, { 'reverse', 'case_sensitive', 'attribute' }, 'sort')
  local get = attr_getter(opt(attribute))
  local key = sort_key(truthy(case_sensitive))
  local items = iterate(v)
  local decorated = {}
  for i, item in ipairs(items) do decorated[i] = { key(get(item)), i, item } end
  table.sort(decorated, function(a, b)
    if py_eq(a[1], b[1]) then return a[2] < b[2] end
    if truthy(reverse) then return py_lt(b[1], a[1]) end
    return py_lt(a[1], b[1])
  end)
  local out = new_list()
  for i, d in ipairs(decorated) do out[i] = d[3] end
  return out
end
FILTERS.unique = function(v, args, kwargs)
  local case_sensitive, attribute = params(args, kwargs, { 'case_sensitive', 'attribute' }, 'unique')
  local get = attr_getter(opt(attribute))
  local key = sort_key(truthy(case_sensitive))
  local out, seen = new_list(), {}
  for _, item in ipairs(iterate(v)) do
    local k = key(get(item))
    local dup = false
    for _, s in ipairs(seen) do if py_eq(s, k) then dup = true; break end end
    if not dup then seen[#seen + 1] = k; out[#out + 1] = item end
  end
  return out
end
local function minmax(v, args, kwargs, want_max)
  local case_sensitive, attribute = params(args, kwargs, { 'case_sensitive', 'attribute' }, want_max and 'max' or 'min')
  local get = attr_getter(opt(attribute))
  local key = sort_key(truthy(case_sensitive))
  local best, bestk
  for _, item in ipairs(iterate(v)) do
    local k = key(get(item))
    if best == nil or (want_max and py_lt(bestk, k)) or (not want_max and py_lt(k, bestk)) then best, bestk = item, k end
  end
  if best == nil then return undef('No aggregated item, sequence was empty.') end
  return best
end
FILTERS.max = function(v, args, kwargs) return minmax(v, args, kwargs, true) end
FILTERS.min = function(v, args, kwargs) return minmax(v, args, kwargs, false) end
FILTERS.dictsort = function(v, args, kwargs)
  local case_sensitive, by, reverse = params(args, kwargs, { 'case_sensitive', 'by', 'reverse' }, 'dictsort')
  local pairs_ = DICT_METHODS.items(v)
  local idx = (by == 'value') and 2 or 1
  local key = sort_key(truthy(case_sensitive))
  table.sort(pairs_, function(a, b)
    if truthy(reverse) then return py_lt(key(b[idx]), key(a[idx])) end
    return py_lt(key(a[idx]), key(b[idx]))
  end)
  return pairs_
end
FILTERS.indent = function(v, args, kwargs)
  local width, first, blank = params(args, kwargs, { 'width', 'first', 'blank' }, 'indent')
  local pad = width == nil and '    ' or type(width) == 'string' and width or rep(' ', tonum(width))
  local s = py_str(v)
  local lines = py_split(s, '\n')
  local out = {}
  for i, l in ipairs(lines) do
    if i == 1 then
      out[i] = truthy(first) and pad .. l or l
    elseif l == '' and not truthy(blank) then
      out[i] = l
    else
      out[i] = pad .. l
    end
  end
  if #lines == 1 and not truthy(first) then return s end
  return concat(out, '\n')
end
FILTERS.attr = function(v, args) return get_attr(v, args[1]) end
FILTERS.format = function(v, args, kwargs)
  if #args > 0 and kwargs and next(kwargs) then throw("can't handle positional and keyword arguments at the same time") end
  if kwargs and next(kwargs) then return binop('%', py_str(v), kwargs) end
  return binop('%', py_str(v), new_tuple(args))
end
FILTERS.wordcount = function(v)
  local n = 0
  for _ in py_str(v):gmatch('%w+') do n = n + 1 end
  return n
end
FILTERS.center = function(v, args)
  local s = py_str(v)
  local width = args[1] and tonum(args[1]) or 80
  local n = ulen(s)
  if n >= width then return s end
  local total = width - n
  local left = floor(total / 2) + ((total % 2 == 1 and width % 2 == 1) and 1 or 0)
  return rep(' ', left) .. s .. rep(' ', total - left)
end
FILTERS.batch = function(v, args)
  local size, fill = tonum(args[1]), args[2]
  local out, cur = new_list(), nil
  for _, item in ipairs(iterate(v)) do
    if not cur or #cur == size then cur = new_list(); out[#out + 1] = cur end
    cur[#cur + 1] = item
  end
  if cur and fill ~= nil then while #cur < size do cur[#cur + 1] = fill end end
  return out
end

return FILTERS
