-- Chat templates: an interpreter for the subset of Jinja2 that Hugging Face chat templates use, and
-- apply_chat_template.
--
--   local ct = pmp.chat_template
--   local t = ct.compile(source)                       -- syntax errors name the line
--   local text, spans = t:render({ messages = msgs, add_generation_prompt = true })
--   ct.apply('/path/to/tokenizer_dir', msgs, { add_generation_prompt = true, enable_thinking = false })
--   ct.builtin('chatml')                               -- also 'llama3', 'alpaca': template sources
--
-- Semantics follow jinja2 as transformers configures it (ImmutableSandboxedEnvironment with
-- trim_blocks=True, lstrip_blocks=True, the loopcontrols extension, keep_trailing_newline=False) and its
-- extras: raise_exception, strftime_now, namespace, dict, the `tojson` filter as
-- json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False), and the
-- {% generation %} block (render's second result lists the generated spans as {first, last} 1-based
-- inclusive byte positions).
--
-- Values: strings, numbers, booleans, json.null (None), Lua tables: a table marked with json.array,
-- or with a [1] entry, is a list; any other table is a dict (key order: json.keys(t) when set, e.g. by
-- json.decode(text, {ordered = true}); otherwise sorted). Python float-vs-int is tracked for values the
-- template computes (4/2 renders 2.0); numbers given by Lua are ints when integral.
-- Undefined values (missing variables, keys, attributes) are falsy, render as '', iterate as empty,
-- and raise an error when used in arithmetic or when an attribute of them is read, as in jinja2.
-- raise_exception(msg) raises a Lua error whose message is exactly msg; other errors read
-- 'chat_template: line N: ...'.
-- Not supported: extends/include/import/block, call blocks, recursive loops, macro varargs/kwargs/caller,
-- autoescape, Unicode case mapping in upper/lower/title (ASCII only), line statements.
local json = require 'pmp.json'

local M = {}

local byte, char, sub, find, format, concat, rep = string.byte, string.char, string.sub, string.find,
  string.format, table.concat, string.rep
local floor, huge, abs = math.floor, math.huge, math.abs
local unpack = unpack or table.unpack

---------------------------------------------------------------------------------------------------
-- Values

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
local function is_none(v) return v == NONE end

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

---------------------------------------------------------------------------------------------------
-- UTF-8 and Python string helpers

local function is_ascii(s) return not find(s, '[\128-\255]') end

local function ulen(s)
  if is_ascii(s) then return #s end
  local _, cont = s:gsub('[\128-\191]', '')
  return #s - cont
end

-- The characters (code points, as substrings) of s.
local function chars(s)
  local out, n, i, len = {}, 0, 1, #s
  if is_ascii(s) then
    for j = 1, len do out[j] = sub(s, j, j) end
    return out
  end
  while i <= len do
    local c = byte(s, i)
    local l = c >= 0xF0 and 4 or c >= 0xE0 and 3 or c >= 0xC0 and 2 or 1
    n = n + 1
    out[n] = sub(s, i, i + l - 1)
    i = i + l
  end
  return out
end

local function codepoint(ch)
  local c = byte(ch, 1)
  if c < 0x80 then return c end
  if c >= 0xF0 then
    return (c - 0xF0) * 0x40000 + (byte(ch, 2) - 0x80) * 0x1000 + (byte(ch, 3) - 0x80) * 0x40 + byte(ch, 4) - 0x80
  elseif c >= 0xE0 then
    return (c - 0xE0) * 0x1000 + (byte(ch, 2) - 0x80) * 0x40 + byte(ch, 3) - 0x80
  elseif c >= 0xC0 then
    return (c - 0xC0) * 0x40 + byte(ch, 2) - 0x80
  end
  return c
end

local function utf8_char(cp)
  if cp < 0x80 then return char(cp)
  elseif cp < 0x800 then return char(0xC0 + floor(cp / 0x40), 0x80 + cp % 0x40)
  elseif cp < 0x10000 then
    return char(0xE0 + floor(cp / 0x1000), 0x80 + floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
  end
  return char(0xF0 + floor(cp / 0x40000), 0x80 + floor(cp / 0x1000) % 0x40, 0x80 + floor(cp / 0x40) % 0x40,
    0x80 + cp % 0x40)
end

-- Python str.isspace for one character.
local function py_isspace(ch)
  local cp = codepoint(ch)
  return (cp >= 9 and cp <= 13) or (cp >= 28 and cp <= 32) or cp == 0x85 or cp == 0xA0 or cp == 0x1680
    or (cp >= 0x2000 and cp <= 0x200A) or cp == 0x2028 or cp == 0x2029 or cp == 0x202F or cp == 0x205F
    or cp == 0x3000
end

-- Python str.strip/lstrip/rstrip; chars_arg nil means whitespace.
local function py_strip(s, chars_arg, left, right)
  local test
  if chars_arg == nil then
    test = py_isspace
  else
    local set = {}
    for _, ch in ipairs(chars(chars_arg)) do set[ch] = true end
    test = function(ch) return set[ch] end
  end
  if is_ascii(s) then
    local i, j = 1, #s
    if left then while i <= j and test(sub(s, i, i)) do i = i + 1 end end
    if right then while j >= i and test(sub(s, j, j)) do j = j - 1 end end
    return sub(s, i, j)
  end
  local cs = chars(s)
  local i, j = 1, #cs
  if left then while i <= j and test(cs[i]) do i = i + 1 end end
  if right then while j >= i and test(cs[j]) do j = j - 1 end end
  return concat(cs, '', i, j)
end

local function ascii_upper(s) return (s:gsub('%l', string.upper)) end
local function ascii_lower(s) return (s:gsub('%u', string.lower)) end

-- Python str.split(sep, maxsplit).
local function py_split(s, sep, maxsplit)
  local out = new_list()
  maxsplit = maxsplit or -1
  if sep == nil then
    local cs = chars(s)
    local i, n = 1, #cs
    while true do
      while i <= n and py_isspace(cs[i]) do i = i + 1 end
      if i > n then break end
      if maxsplit >= 0 and #out >= maxsplit then
        -- the rest, with trailing whitespace stripped
        local j = n
        while j >= i and py_isspace(cs[j]) do j = j - 1 end
        out[#out + 1] = concat(cs, '', i, j)
        break
      end
      local j = i
      while j <= n and not py_isspace(cs[j]) do j = j + 1 end
      out[#out + 1] = concat(cs, '', i, j - 1)
      i = j
    end
    return out
  end
  if sep == '' then throw('empty separator') end
  local pos = 1
  while true do
    if maxsplit >= 0 and #out >= maxsplit then break end
    local a, b = find(s, sep, pos, true)
    if not a then break end
    out[#out + 1] = sub(s, pos, a - 1)
    pos = b + 1
  end
  out[#out + 1] = sub(s, pos)
  return out
end

local function py_rsplit(s, sep, maxsplit)
  if maxsplit == nil or maxsplit < 0 then return py_split(s, sep, maxsplit) end
  if sep == nil then
    -- rare: split fully then rejoin the head with single spaces is not exact; do it by characters
    local cs = chars(s)
    local parts, j = {}, #cs
    while true do
      while j >= 1 and py_isspace(cs[j]) do j = j - 1 end
      if j < 1 then break end
      if #parts >= maxsplit then
        local i = 1
        while i <= j and py_isspace(cs[i]) do i = i + 1 end
        table.insert(parts, 1, concat(cs, '', i, j))
        break
      end
      local i = j
      while i >= 1 and not py_isspace(cs[i]) do i = i - 1 end
      table.insert(parts, 1, concat(cs, '', i + 1, j))
      j = i
    end
    return new_list(parts)
  end
  local parts, stop = {}, #s
  while #parts < maxsplit do
    local found
    local pos = 1
    while true do
      local a = find(s, sep, pos, true)
      if not a or a + #sep - 1 > stop then break end
      found = a
      pos = a + 1
    end
    if not found then break end
    table.insert(parts, 1, sub(s, found + #sep, stop))
    stop = found - 1
  end
  table.insert(parts, 1, sub(s, 1, stop))
  return new_list(parts)
end

local function py_replace(s, old, new, count)
  count = count or -1
  if old == '' then
    local cs, out = chars(s), {}
    local n = 0
    for i = 1, #cs + 1 do
      if count < 0 or n < count then out[#out + 1] = new; n = n + 1 end
      if cs[i] then out[#out + 1] = cs[i] end
    end
    return concat(out)
  end
  local out, pos, n = {}, 1, 0
  while count < 0 or n < count do
    local a, b = find(s, old, pos, true)
    if not a then break end
    out[#out + 1] = sub(s, pos, a - 1)
    out[#out + 1] = new
    pos = b + 1
    n = n + 1
  end
  out[#out + 1] = sub(s, pos)
  return concat(out)
end

---------------------------------------------------------------------------------------------------
-- str() and repr() as Python prints them

local function int_str(x)
  if x == floor(x) and abs(x) < 2 ^ 63 then return format('%d', x) end
  return format('%.0f', x)
end

local function float_repr(x)
  if x ~= x then return 'nan' end
  if x == huge then return 'inf' elseif x == -huge then return '-inf' end
  if x == 0 then return (1 / x < 0) and '-0.0' or '0.0' end
  local s
  for p = 1, 17 do
    s = format('%.' .. (p - 1) .. 'e', x)
    if tonumber(s) == x then break end
  end
  local sign, mant, e = s:match('^(-?)([%d%.]+)e([-+]%d+)$')
  local digits = mant:gsub('%.', '')
  digits = digits:gsub('0+$', '')
  if digits == '' then digits = '0' end
  e = tonumber(e)
  local n = #digits
  if e < -4 or e >= 16 then
    local m = sub(digits, 1, 1)
    if n > 1 then m = m .. '.' .. sub(digits, 2) end
    return sign .. m .. 'e' .. (e < 0 and '-' or '+') .. format('%02d', abs(e))
  elseif e >= 0 then
    if n <= e + 1 then return sign .. digits .. rep('0', e + 1 - n) .. '.0' end
    return sign .. sub(digits, 1, e + 1) .. '.' .. sub(digits, e + 2)
  end
  return sign .. '0.' .. rep('0', -e - 1) .. digits
end

local function num_str(v)
  if isfloat(v) then return float_repr(tonum(v)) end
  return int_str(v)
end

local function str_repr(s)
  local q = "'"
  if find(s, "'", 1, true) and not find(s, '"', 1, true) then q = '"' end
  local body = s:gsub('[%z\1-\31\127\\\'"]', function(c)
    if c == '\\' then return '\\\\'
    elseif c == '\n' then return '\\n'
    elseif c == '\r' then return '\\r'
    elseif c == '\t' then return '\\t'
    elseif c == q then return '\\' .. c
    elseif c == "'" or c == '"' then return c
    end
    return format('\\x%02x', byte(c))
  end)
  return q .. body .. q
end

local py_str

local function py_repr(v)
  local k = kind(v)
  if k == 'string' then return str_repr(v) end
  if k == 'undefined' then return 'Undefined' end
  return py_str(v)
end

py_str = function(v)
  local k = kind(v)
  if k == 'string' then return v
  elseif k == 'number' then return num_str(v)
  elseif k == 'boolean' then return v and 'True' or 'False'
  elseif k == 'none' then return 'None'
  elseif k == 'undefined' then return ''
  elseif k == 'list' then
    local parts = {}
    for i = 1, #v do parts[i] = py_repr(v[i]) end
    if getmetatable(v) == TupleMT then
      if #v == 1 then return '(' .. parts[1] .. ',)' end
      return '(' .. concat(parts, ', ') .. ')'
    end
    return '[' .. concat(parts, ', ') .. ']'
  elseif k == 'dict' then
    local parts = {}
    for _, key in ipairs(dict_keys(v)) do parts[#parts + 1] = py_repr(key) .. ': ' .. py_repr(v[key]) end
    return '{' .. concat(parts, ', ') .. '}'
  elseif k == 'namespace' then
    local parts = {}
    for _, key in ipairs(dict_keys(v.vals)) do parts[#parts + 1] = py_repr(key) .. ': ' .. py_repr(v.vals[key]) end
    return '<Namespace {' .. concat(parts, ', ') .. '}>'
  end
  return '<' .. py_type(v) .. '>'
end

---------------------------------------------------------------------------------------------------
-- json.dumps as transformers' tojson calls it

local function json_string(s, ensure_ascii)
  local body = s:gsub('[%z\1-\31\\"]', function(c)
    if c == '\\' then return '\\\\'
    elseif c == '"' then return '\\"'
    elseif c == '\n' then return '\\n'
    elseif c == '\r' then return '\\r'
    elseif c == '\t' then return '\\t'
    elseif c == '\b' then return '\\b'
    elseif c == '\f' then return '\\f'
    end
    return format('\\u%04x', byte(c))
  end)
  if ensure_ascii and not is_ascii(body) then
    local out = {}
    for _, ch in ipairs(chars(body)) do
      if #ch == 1 then
        out[#out + 1] = ch
      else
        local cp = codepoint(ch)
        if cp >= 0x10000 then
          cp = cp - 0x10000
          out[#out + 1] = format('\\u%04x\\u%04x', 0xD800 + floor(cp / 0x400), 0xDC00 + cp % 0x400)
        else
          out[#out + 1] = format('\\u%04x', cp)
        end
      end
    end
    body = concat(out)
  end
  return '"' .. body .. '"'
end

local function json_number(v)
  local x = tonum(v)
  if x ~= x then return 'NaN' elseif x == huge then return 'Infinity' elseif x == -huge then return '-Infinity' end
  return num_str(v)
end

local function dumps(v, o, level, out)
  local k = kind(v)
  if k == 'string' then out[#out + 1] = json_string(v, o.ensure_ascii)
  elseif k == 'number' then out[#out + 1] = json_number(v)
  elseif k == 'boolean' then out[#out + 1] = v and 'true' or 'false'
  elseif k == 'none' then out[#out + 1] = 'null'
  elseif k == 'list' or k == 'dict' then
    local keys
    if k == 'dict' then
      keys = dict_keys(v)
      if o.sort_keys then table.sort(keys, key_less) end
    end
    local n = k == 'list' and #v or #keys
    local open, close = k == 'list' and '[' or '{', k == 'list' and ']' or '}'
    if n == 0 then out[#out + 1] = open .. close; return end
    out[#out + 1] = open
    local nl_in, nl_out
    if o.indent then
      nl_in = '\n' .. rep(o.indent, level + 1)
      nl_out = '\n' .. rep(o.indent, level)
    end
    for i = 1, n do
      if i > 1 then out[#out + 1] = o.item_sep end
      if nl_in then out[#out + 1] = nl_in end
      if k == 'list' then
        dumps(v[i], o, level + 1, out)
      else
        local key = keys[i]
        local ks
        local kk = kind(key)
        if kk == 'string' then ks = key
        elseif kk == 'number' then ks = json_number(key)
        elseif kk == 'boolean' then ks = key and 'true' or 'false'
        elseif kk == 'none' then ks = 'null'
        else throw('keys must be str, int, float, bool or None, not ' .. py_type(key)) end
        out[#out + 1] = json_string(ks, o.ensure_ascii)
        out[#out + 1] = o.key_sep
        dumps(v[key], o, level + 1, out)
      end
    end
    if nl_out then out[#out + 1] = nl_out end
    out[#out + 1] = close
  else
    throw('Object of type ' .. py_type(v) .. ' is not JSON serializable')
  end
end

-- tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)
local function tojson(v, ensure_ascii, indent, separators, sort_keys)
  local o = { ensure_ascii = ensure_ascii and ensure_ascii ~= NONE, sort_keys = sort_keys and sort_keys ~= NONE }
  if indent ~= nil and indent ~= NONE then
    if type(indent) == 'string' then o.indent = indent else o.indent = rep(' ', tonum(indent)) end
    o.item_sep, o.key_sep = ',', ': '
  else
    o.item_sep, o.key_sep = ', ', ': '
  end
  if separators ~= nil and separators ~= NONE then o.item_sep, o.key_sep = separators[1], separators[2] end
  local out = {}
  dumps(v, o, 0, out)
  return concat(out)
end
M.tojson = tojson

---------------------------------------------------------------------------------------------------
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

---------------------------------------------------------------------------------------------------
-- Arithmetic

local function arith_fail(op, a, b)
  if is_undef(a) then undefined_error(a) elseif is_undef(b) then undefined_error(b) end
  throw(format("unsupported operand type(s) for %s: '%s' and '%s'", op, py_type(a), py_type(b)))
end

local function num_result(x, a, b)
  if isfloat(a) or isfloat(b) then return mkfloat(x) end
  return x
end

local function to_int_arg(v, what)
  local x = tonum(v)
  if not x or isfloat(v) then throw(what) end
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

---------------------------------------------------------------------------------------------------
-- Slicing and item access

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

local STR_METHODS, DICT_METHODS, LIST_METHODS = {}, {}, {}

local function bound(obj, fn, name)
  return setmetatable({ name = name, fn = function(args, kwargs) return fn(obj, args, kwargs) end }, CallableMT)
end

local function type_desc(v)
  if v == NONE then return "'None'" end
  return "'" .. py_type(v) .. " object'"
end

local loop_attr

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

---------------------------------------------------------------------------------------------------
-- Calls

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

---------------------------------------------------------------------------------------------------
-- Loop objects

loop_attr = function(l, name)
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

---------------------------------------------------------------------------------------------------
-- Lexer

local SyntaxMT = {}
local function syntax_error(msg, line) error(setmetatable({ msg = msg, line = line }, SyntaxMT), 0) end

local OPERATORS2 = { ['//'] = true, ['**'] = true, ['=='] = true, ['!='] = true, ['>='] = true, ['<='] = true }
local OPERATORS1 = {}
for c in ('+-/*%~[](){}><=.:|,;'):gmatch('.') do OPERATORS1[c] = true end
local CLOSE = { [')'] = '(', [']'] = '[', ['}'] = '{' }
local OPEN = { ['('] = ')', ['['] = ']', ['{'] = '}' }

-- Python string-literal escapes, as jinja2 decodes them ('unicode-escape').
local function unescape(s, line)
  if not find(s, '\\', 1, true) then return s end
  local out, i, n = {}, 1, #s
  while i <= n do
    local a = find(s, '\\', i, true)
    if not a then out[#out + 1] = sub(s, i); break end
    out[#out + 1] = sub(s, i, a - 1)
    local c = sub(s, a + 1, a + 1)
    i = a + 2
    if c == 'n' then out[#out + 1] = '\n'
    elseif c == 't' then out[#out + 1] = '\t'
    elseif c == 'r' then out[#out + 1] = '\r'
    elseif c == '\\' then out[#out + 1] = '\\'
    elseif c == "'" then out[#out + 1] = "'"
    elseif c == '"' then out[#out + 1] = '"'
    elseif c == 'a' then out[#out + 1] = '\a'
    elseif c == 'b' then out[#out + 1] = '\b'
    elseif c == 'f' then out[#out + 1] = '\f'
    elseif c == 'v' then out[#out + 1] = '\v'
    elseif c == '\n' then -- line continuation
    elseif c == 'x' or c == 'u' or c == 'U' then
      local len = c == 'x' and 2 or c == 'u' and 4 or 8
      local hex = sub(s, i, i + len - 1)
      if #hex ~= len or find(hex, '%X') then syntax_error('truncated \\' .. c .. ' escape in a string', line) end
      out[#out + 1] = utf8_char(tonumber(hex, 16))
      i = i + len
    elseif c:match('[0-7]') then
      local oct = s:match('^[0-7][0-7]?[0-7]?', a + 1)
      out[#out + 1] = utf8_char(tonumber(oct, 8))
      i = a + 1 + #oct
    else
      out[#out + 1] = '\\' .. c
    end
  end
  return concat(out)
end

-- Returns a list of items: {t='data', v=}, {t='var'|'block', toks=, line=}.
local function lex(src)
  src = src:gsub('\r\n', '\n'):gsub('\r', '\n')
  if sub(src, -1) == '\n' then src = sub(src, 1, -2) end
  local items = {}
  local len = #src
  local pos = 1
  local line_pos, line_no = 1, 1
  local function line_at(p)
    if p < line_pos then line_pos, line_no = 1, 1 end
    while true do
      local a = find(src, '\n', line_pos, true)
      if not a or a >= p then break end
      line_no = line_no + 1
      line_pos = a + 1
    end
    return line_no
  end
  local function push_data(text, at)
    if text ~= '' then
      items[#items + 1] = { t = 'data', v = text }
      items.last_line = line_at(at)
    end
  end
  local function lstrip_text(text, start, sign, is_var)
    if sign == '-' then return (py_strip(text, nil, false, true)) end
    if sign ~= '+' and not is_var then
      local nl = 0
      local p = 0
      while true do
        local a = find(text, '\n', p + 1, true)
        if not a then break end
        nl, p = a, a
      end
      if nl > 0 or start == 1 or sub(src, start - 1, start - 1) == '\n' then
        local tail = sub(text, nl + 1)
        if tail ~= '' and find(tail, '^%s+$') then return sub(text, 1, nl) end
      end
    end
    return text
  end
  -- Position after a block end (p at '%}' or '-%}' or '+%}'), or nil.
  local function block_end(p, closer)
    local c = sub(src, p, p)
    if c == '+' and sub(src, p + 1, p + 2) == closer then return p + 3 end
    if c == '-' and sub(src, p + 1, p + 2) == closer then
      local q = p + 3
      local _, e = find(src, '^%s+', q)
      return e and e + 1 or q
    end
    if sub(src, p, p + 1) == closer then
      if closer == '%}' and sub(src, p + 2, p + 2) == '\n' then return p + 3 end
      return p + 2
    end
    return nil
  end

  while pos <= len do
    local s = find(src, '{[{%%#]', pos)
    if not s then push_data(sub(src, pos), pos); break end
    local kc = sub(src, s + 1, s + 1)
    local sign = sub(src, s + 2, s + 2)
    if sign ~= '-' and sign ~= '+' then sign = '' end
    local text = sub(src, pos, s - 1)
    local tagline = line_at(s)
    local body_start = s + 2 + #sign
    if kc == '#' then
      push_data(lstrip_text(text, pos, sign, false), pos)
      local e = find(src, '#}', body_start, true)
      if not e then syntax_error('Missing end of comment tag', tagline) end
      local before = e > body_start and sub(src, e - 1, e - 1) or ''
      if before == '-' then
        local _, we = find(src, '^%s+', e + 2)
        pos = we and we + 1 or e + 2
      elseif before == '+' then
        pos = e + 2
      else
        pos = e + 2
        if sub(src, pos, pos) == '\n' then pos = pos + 1 end
      end
    elseif kc == '%' and find(src, '^%s*raw%s*[-]?%%}', body_start) then
      push_data(lstrip_text(text, pos, sign, false), pos)
      local _, e = find(src, '^%s*raw%s*[-]?%%}', body_start)
      local rawstart = e + 1
      if sub(src, e - 2, e - 2) == '-' then
        local _, we = find(src, '^%s+', rawstart)
        rawstart = we and we + 1 or rawstart
      end
      local p = rawstart
      local found
      while true do
        local a = find(src, '{%', p, true)
        if not a then syntax_error('Missing end of raw directive', tagline) end
        local esign = sub(src, a + 2, a + 2)
        if esign ~= '-' and esign ~= '+' then esign = '' end
        local _, ee = find(src, '^%s*endraw%s*', a + 2 + #esign)
        if ee then
          local after = block_end(ee + 1, '%}')
          if after then
            local body = sub(src, rawstart, a - 1)
            push_data(lstrip_text(body, rawstart, esign, false), rawstart)
            pos = after
            found = true
            break
          end
        end
        p = a + 2
      end
      assert(found)
    else
      local is_var = kc == '{'
      push_data(lstrip_text(text, pos, sign, is_var), pos)
      local closer = is_var and '}}' or '%}'
      local toks, stack = {}, {}
      local p = body_start
      while true do
        if p > len then
          syntax_error('unexpected end of template, expected ' .. (is_var and "'end of print statement'" or
            "'end of statement block'"), tagline)
        end
        if #stack == 0 then
          local after
          if is_var then
            if sub(src, p, p + 2) == '-}}' then
              local _, we = find(src, '^%s+', p + 3)
              after = we and we + 1 or p + 3
            elseif sub(src, p, p + 1) == '}}' then
              after = p + 2
            end
          else
            after = block_end(p, '%}')
          end
          if after then items.last_line = line_at(p); pos = after; break end
        end
        local c = sub(src, p, p)
        local tl = line_at(p)
        local _, we = find(src, '^%s+', p)
        if we then
          p = we + 1
        elseif c:match('%d') then
          local num_end
          local _, ie = find(src, '^%d[%d_]*', p)
          local isflt = false
          num_end = ie
          if sub(src, p - 1, p - 1) ~= '.' then
            local _, fe = find(src, '^%.%d[%d_]*', ie + 1)
            if fe then num_end = fe; isflt = true end
            local _, ee = find(src, '^[eE][-+]?%d[%d_]*', num_end + 1)
            if ee then num_end = ee; isflt = true end
          end
          local text_num = sub(src, p, num_end):gsub('_', '')
          local v = tonumber(text_num)
          toks[#toks + 1] = { t = isflt and 'float' or 'integer', v = isflt and mkfloat(v) or v, line = tl }
          p = num_end + 1
        elseif c:match('[%a_]') then
          local _, ne = find(src, '^[%w_]+', p)
          toks[#toks + 1] = { t = 'name', v = sub(src, p, ne), line = tl }
          p = ne + 1
        elseif c == '"' or c == "'" then
          local q = p + 1
          while true do
            local a = find(src, '[\\' .. c .. ']', q)
            if not a then syntax_error('unexpected char ' .. str_repr(c) .. ' (unterminated string)', tl) end
            if sub(src, a, a) == '\\' then q = a + 2 else q = a; break end
          end
          toks[#toks + 1] = { t = 'string', v = unescape(sub(src, p + 1, q - 1), tl), line = tl }
          p = q + 1
        else
          local two = sub(src, p, p + 1)
          local op
          if OPERATORS2[two] then op = two elseif OPERATORS1[c] then op = c end
          if not op then syntax_error('unexpected char ' .. str_repr(c), tl) end
          if OPEN[op] then
            stack[#stack + 1] = OPEN[op]
          elseif CLOSE[op] then
            if #stack == 0 then syntax_error("unexpected '" .. op .. "'", tl) end
            local want = table.remove(stack)
            if want ~= op then syntax_error("unexpected '" .. op .. "', expected '" .. want .. "'", tl) end
          end
          toks[#toks + 1] = { t = 'op', v = op, line = tl }
          p = p + #op
        end
      end
      items[#items + 1] = { t = is_var and 'var' or 'block', toks = toks, line = tagline }
    end
  end
  return items
end

---------------------------------------------------------------------------------------------------
-- Parser

local Cursor = {}
Cursor.__index = Cursor

local function cursor(toks, line) return setmetatable({ toks = toks, k = 1, line = line }, Cursor) end
function Cursor:peek(o) return self.toks[self.k + (o or 0)] end
function Cursor:cur_line() local t = self.toks[self.k] or self.toks[#self.toks]; return t and t.line or self.line end
function Cursor:next()
  local t = self.toks[self.k]
  self.k = self.k + 1
  return t
end
function Cursor:at_end() return self.toks[self.k] == nil end
function Cursor:is_op(op) local t = self.toks[self.k]; return t ~= nil and t.t == 'op' and t.v == op end
function Cursor:is_name(n) local t = self.toks[self.k]; return t ~= nil and t.t == 'name' and t.v == n end
function Cursor:fail(msg) syntax_error(msg, self:cur_line()) end
local function describe(t)
  if not t then return 'end of statement block' end
  if t.t == 'string' then return 'string' end
  if t.t == 'op' then return "'" .. t.v .. "'" end
  return "'" .. py_str(t.v) .. "'"
end
function Cursor:accept_op(op) if self:is_op(op) then return self:next() end end
function Cursor:accept_name(n) if self:is_name(n) then return self:next() end end
function Cursor:expect_op(op)
  if not self:is_op(op) then self:fail("expected token '" .. op .. "', got " .. describe(self:peek())) end
  return self:next()
end
function Cursor:expect_name(what)
  local t = self:peek()
  if not t or t.t ~= 'name' then self:fail('expected ' .. (what or 'name') .. ', got ' .. describe(t)) end
  return self:next().v
end
function Cursor:expect_end()
  if not self:at_end() then self:fail('expected end of statement block, got ' .. describe(self:peek())) end
end

local FILTERS, TESTS = {}, {}

local parse_expression, parse_unary, parse_primary, parse_postfix

local function parse_call_args(c)
  c:expect_op('(')
  local args, kwargs, korder = {}, nil, nil
  while not c:is_op(')') do
    if #args > 0 or kwargs then c:expect_op(',') end
    if c:is_op(')') then break end
    local t, t2 = c:peek(), c:peek(1)
    if t and t.t == 'name' and t2 and t2.t == 'op' and t2.v == '=' then
      c:next(); c:next()
      kwargs = kwargs or {}
      korder = korder or {}
      kwargs[t.v] = parse_expression(c)
      korder[#korder + 1] = t.v
    else
      if kwargs then c:fail('positional argument follows keyword argument') end
      args[#args + 1] = parse_expression(c)
    end
  end
  c:expect_op(')')
  return args, kwargs, korder
end

-- A tuple, or one expression (jinja2's parse_tuple).
local function parse_tuple(c, no_condexpr, end_names, explicit_parens)
  local items, is_tuple = {}, false
  local line = c:cur_line()
  while true do
    if #items > 0 then c:expect_op(',') end
    local t = c:peek()
    if not t or (t.t == 'op' and t.v == ')') or (t.t == 'name' and end_names and end_names[t.v]) then break end
    items[#items + 1] = no_condexpr and c:parse_or() or parse_expression(c)
    if c:is_op(',') then is_tuple = true else break end
  end
  if not is_tuple then
    if #items > 0 then return items[1] end
    if not explicit_parens then c:fail('Expected an expression, got ' .. describe(c:peek())) end
  end
  return { t = 'tuple', items = items, line = line }
end

parse_expression = function(c)
  local e = c:parse_or()
  while c:is_name('if') do
    local line = c:next().line
    local test = c:parse_or()
    local no
    if c:accept_name('else') then no = parse_expression(c) end
    e = { t = 'cond', test = test, yes = e, no = no, line = line }
  end
  return e
end

function Cursor:parse_or()
  local e = self:parse_and()
  while self:is_name('or') do
    local line = self:next().line
    e = { t = 'or', l = e, r = self:parse_and(), line = line }
  end
  return e
end

function Cursor:parse_and()
  local e = self:parse_not()
  while self:is_name('and') do
    local line = self:next().line
    e = { t = 'and', l = e, r = self:parse_not(), line = line }
  end
  return e
end

function Cursor:parse_not()
  if self:is_name('not') then
    local line = self:next().line
    return { t = 'not', e = self:parse_not(), line = line }
  end
  return self:parse_compare()
end

local CMP = { ['=='] = true, ['!='] = true, ['<'] = true, ['<='] = true, ['>'] = true, ['>='] = true }

function Cursor:parse_compare()
  local line = self:cur_line()
  local e = self:parse_math1()
  local ops
  while true do
    local t = self:peek()
    local op
    if t and t.t == 'op' and CMP[t.v] then self:next(); op = t.v
    elseif self:is_name('in') then self:next(); op = 'in'
    elseif self:is_name('not') and self:peek(1) and self:peek(1).t == 'name' and self:peek(1).v == 'in' then
      self:next(); self:next(); op = 'notin'
    else break end
    ops = ops or {}
    ops[#ops + 1] = { op = op, e = self:parse_math1() }
  end
  if not ops then return e end
  return { t = 'cmp', first = e, ops = ops, line = line }
end

function Cursor:parse_math1()
  local e = self:parse_concat()
  while self:is_op('+') or self:is_op('-') do
    local t = self:next()
    e = { t = 'bin', op = t.v, l = e, r = self:parse_concat(), line = t.line }
  end
  return e
end

function Cursor:parse_concat()
  local e = self:parse_math2()
  if not self:is_op('~') then return e end
  local items = { e }
  local line = self:cur_line()
  while self:accept_op('~') do items[#items + 1] = self:parse_math2() end
  return { t = 'concat', items = items, line = line }
end

function Cursor:parse_math2()
  local e = self:parse_pow()
  while self:is_op('*') or self:is_op('/') or self:is_op('//') or self:is_op('%') do
    local t = self:next()
    e = { t = 'bin', op = t.v, l = e, r = self:parse_pow(), line = t.line }
  end
  return e
end

function Cursor:parse_pow()
  local e = parse_unary(self, true)
  while self:is_op('**') do
    local t = self:next()
    e = { t = 'bin', op = '**', l = e, r = parse_unary(self, true), line = t.line }
  end
  return e
end

local function parse_filter_expr(c, e)
  while true do
    if c:is_op('|') then
      local line = c:next().line
      local name = c:expect_name('filter name')
      if not FILTERS[name] then syntax_error("No filter named '" .. name .. "'.", line) end
      local args, kwargs, korder = {}, nil, nil
      if c:is_op('(') then args, kwargs, korder = parse_call_args(c) end
      e = { t = 'filter', o = e, name = name, args = args, kwargs = kwargs, korder = korder, line = line }
    elseif c:is_name('is') then
      local line = c:next().line
      local neg = c:accept_name('not') ~= nil
      local name = c:expect_name('test name')
      if not TESTS[name] then syntax_error("No test named '" .. name .. "'.", line) end
      local args, kwargs = {}, nil
      local t = c:peek()
      if c:is_op('(') then
        args, kwargs = parse_call_args(c)
      elseif t and (t.t == 'name' or t.t == 'string' or t.t == 'integer' or t.t == 'float' or
          (t.t == 'op' and (t.v == '[' or t.v == '{'))) and
          not (t.t == 'name' and (t.v == 'else' or t.v == 'or' or t.v == 'and' or t.v == 'is')) then
        args = { parse_postfix(c, parse_primary(c)) }
      end
      e = { t = 'test', o = e, name = name, args = args, kwargs = kwargs, neg = neg, line = line }
    elseif c:is_op('(') then
      local line = c:cur_line()
      local args, kwargs, korder = parse_call_args(c)
      e = { t = 'call', f = e, args = args, kwargs = kwargs, korder = korder, line = line }
    else
      return e
    end
  end
end

parse_unary = function(c, with_filter)
  local e
  if c:is_op('-') then
    local line = c:next().line
    e = { t = 'neg', e = parse_unary(c, false), line = line }
  elseif c:is_op('+') then
    c:next()
    e = parse_unary(c, false)
  else
    e = parse_primary(c)
  end
  e = parse_postfix(c, e)
  if with_filter then e = parse_filter_expr(c, e) end
  return e
end

local CONSTS = { ['true'] = true, ['True'] = true, ['false'] = false, ['False'] = false }

parse_primary = function(c)
  local t = c:peek()
  if not t then c:fail('unexpected end of expression') end
  if t.t == 'name' then
    c:next()
    if CONSTS[t.v] ~= nil then return { t = 'const', v = CONSTS[t.v], line = t.line } end
    if t.v == 'none' or t.v == 'None' then return { t = 'const', v = NONE, line = t.line } end
    return { t = 'name', n = t.v, line = t.line }
  elseif t.t == 'string' then
    c:next()
    local parts = { t.v }
    while c:peek() and c:peek().t == 'string' do parts[#parts + 1] = c:next().v end
    return { t = 'const', v = concat(parts), line = t.line }
  elseif t.t == 'integer' or t.t == 'float' then
    c:next()
    return { t = 'const', v = t.v, line = t.line }
  elseif t.t == 'op' and t.v == '(' then
    c:next()
    local e = parse_tuple(c, false, nil, true)
    c:expect_op(')')
    return e
  elseif t.t == 'op' and t.v == '[' then
    c:next()
    local items = {}
    while not c:is_op(']') do
      if #items > 0 then c:expect_op(',') end
      if c:is_op(']') then break end
      items[#items + 1] = parse_expression(c)
    end
    c:expect_op(']')
    return { t = 'list', items = items, line = t.line }
  elseif t.t == 'op' and t.v == '{' then
    c:next()
    local pairs_ = {}
    while not c:is_op('}') do
      if #pairs_ > 0 then c:expect_op(',') end
      if c:is_op('}') then break end
      local k = parse_expression(c)
      c:expect_op(':')
      pairs_[#pairs_ + 1] = { k, parse_expression(c) }
    end
    c:expect_op('}')
    return { t = 'dict', pairs = pairs_, line = t.line }
  end
  c:fail('unexpected ' .. describe(t))
end

parse_postfix = function(c, e)
  while true do
    if c:is_op('.') then
      local line = c:next().line
      local t = c:next()
      if t and t.t == 'name' then
        e = { t = 'getattr', o = e, name = t.v, line = line }
      elseif t and t.t == 'integer' then
        e = { t = 'getitem', o = e, key = { t = 'const', v = t.v }, line = line }
      else
        syntax_error('expected name or number', line)
      end
    elseif c:is_op('[') then
      local line = c:next().line
      -- subscript: expression or slice
      local parts, is_slice = { nil, nil, nil }, false
      local idx = 1
      while not c:is_op(']') do
        if c:is_op(':') then
          c:next()
          is_slice = true
          idx = idx + 1
          if idx > 3 then c:fail('invalid slice') end
        else
          if parts[idx] then c:fail("expected ']'") end
          parts[idx] = parse_expression(c)
          if c:is_op(',') then c:fail('tuple subscripts are not supported') end
        end
      end
      c:expect_op(']')
      if is_slice then
        e = { t = 'slice', o = e, a = parts[1], b = parts[2], c = parts[3], line = line }
      else
        if not parts[1] then syntax_error('expected subscript expression', line) end
        e = { t = 'getitem', o = e, key = parts[1], line = line }
      end
    elseif c:is_op('(') then
      local line = c:cur_line()
      local args, kwargs, korder = parse_call_args(c)
      e = { t = 'call', f = e, args = args, kwargs = kwargs, korder = korder, line = line }
    else
      return e
    end
  end
end

-- Assignment targets: name, name.attr (namespace), or a tuple of names.
local function parse_target(c, end_names, allow_attr)
  local line = c:cur_line()
  local names, comma = {}, false
  while true do
    local n = c:expect_name('assignment target')
    if allow_attr and #names == 0 and c:is_op('.') then
      c:next()
      local attr = c:expect_name('attribute name')
      return { t = 'nsattr', ns = n, attr = attr, line = line }
    end
    names[#names + 1] = n
    if not c:accept_op(',') then break end
    comma = true
    local t = c:peek()
    if not t or (t.t == 'name' and end_names and end_names[t.v]) or (t.t == 'op' and t.v == '=') then break end
  end
  if not comma then return { t = 'name', n = names[1], line = line } end
  return { t = 'tuple', names = names, line = line }
end

local parse_body

local function block_cursor(item)
  local c = cursor(item.toks, item.line)
  return c
end

local STATEMENTS = {}

STATEMENTS['if'] = function(p, c, line)
  local node = { t = 'if', conds = {}, line = line }
  local test = parse_tuple(c, false)
  c:expect_end()
  while true do
    local body, tag, ec = parse_body(p, { elif = true, ['else'] = true, endif = true })
    node.conds[#node.conds + 1] = { test, body }
    if tag == 'elif' then
      test = parse_tuple(ec, false)
      ec:expect_end()
    elseif tag == 'else' then
      ec:expect_end()
      node.else_body = parse_body(p, { endif = true })
      return node
    else
      return node
    end
  end
end

STATEMENTS['for'] = function(p, c, line)
  local target = parse_target(c, { ['in'] = true }, false)
  if not c:accept_name('in') then c:fail("expected 'in'") end
  local iter = parse_tuple(c, true, { recursive = true, ['if'] = true })
  local cond
  if c:accept_name('if') then cond = parse_expression(c) end
  if c:accept_name('recursive') then c:fail('recursive for loops are not supported') end
  c:expect_end()
  local body, tag, ec = parse_body(p, { endfor = true, ['else'] = true }, true)
  ec:expect_end()
  local else_body
  if tag == 'else' then
    else_body = parse_body(p, { endfor = true })
  end
  return { t = 'for', target = target, iter = iter, cond = cond, body = body, else_body = else_body, line = line }
end

STATEMENTS['set'] = function(p, c, line)
  local target = parse_target(c, nil, true)
  if c:accept_op('=') then
    local e = parse_tuple(c, false)
    c:expect_end()
    return { t = 'set', target = target, e = e, line = line }
  end
  -- block set, with optional filters
  local filters = {}
  local fe = parse_filter_expr(c, { t = 'blockval' })
  c:expect_end()
  filters = fe
  local body, _, ec = parse_body(p, { endset = true })
  ec:expect_end()
  return { t = 'setblock', target = target, body = body, filter = filters, line = line }
end

STATEMENTS['macro'] = function(p, c, line)
  local name = c:expect_name('macro name')
  c:expect_op('(')
  local ps = {}
  while not c:is_op(')') do
    if #ps > 0 then c:expect_op(',') end
    if c:is_op(')') then break end
    local pname = c:expect_name('parameter name')
    local default
    if c:accept_op('=') then default = parse_expression(c) end
    ps[#ps + 1] = { pname, default }
  end
  c:expect_op(')')
  c:expect_end()
  local body, _, ec = parse_body(p, { endmacro = true })
  if ec:is_name(name) then ec:next() end
  ec:expect_end()
  return { t = 'macro', name = name, params = ps, body = body, line = line }
end

STATEMENTS['break'] = function(p, c, line)
  if not p.in_loop or p.in_loop == 0 then syntax_error("'break' outside of a loop", line) end
  c:expect_end()
  return { t = 'break', line = line }
end

STATEMENTS['continue'] = function(p, c, line)
  if not p.in_loop or p.in_loop == 0 then syntax_error("'continue' outside of a loop", line) end
  c:expect_end()
  return { t = 'continue', line = line }
end

STATEMENTS['generation'] = function(p, c, line)
  c:expect_end()
  local body, _, ec = parse_body(p, { endgeneration = true })
  ec:expect_end()
  return { t = 'generation', body = body, line = line }
end

STATEMENTS['filter'] = function(p, c, line)
  local fe = parse_filter_expr(cursor({ { t = 'op', v = '|', line = line }, unpack(c.toks, c.k) }, line),
    { t = 'blockval' })
  local body, _, ec = parse_body(p, { endfilter = true })
  ec:expect_end()
  return { t = 'filterblock', filter = fe, body = body, line = line }
end

-- Parses items until one of end_tags; returns body, the end tag's name and a cursor after it.
parse_body = function(p, end_tags, loop_body)
  local body = {}
  if loop_body then p.in_loop = (p.in_loop or 0) + 1 end
  while true do
    local item = p.items[p.i]
    if not item then
      if end_tags then
        local want = {}
        for k in pairs(end_tags) do want[#want + 1] = "'" .. k .. "'" end
        table.sort(want)
        syntax_error('Unexpected end of template. Jinja was looking for the following tags: ' ..
          concat(want, ' or ') .. '.', p.eof_line or p.last_line)
      end
      return body
    end
    p.i = p.i + 1
    p.last_line = item.line or p.last_line
    if item.t == 'data' then
      body[#body + 1] = { t = 'data', v = item.v }
    elseif item.t == 'var' then
      local c = block_cursor(item)
      if c:at_end() then syntax_error('Expected an expression, got end of print statement', item.line) end
      local e = parse_tuple(c, false)
      if not c:at_end() then c:fail("expected token 'end of print statement', got " .. describe(c:peek())) end
      body[#body + 1] = { t = 'output', e = e, line = item.line }
    else
      local c = block_cursor(item)
      local t = c:next()
      if not t or t.t ~= 'name' then syntax_error('tag name expected', item.line) end
      if end_tags and end_tags[t.v] then
        if loop_body then p.in_loop = p.in_loop - 1 end
        return body, t.v, c
      end
      local st = STATEMENTS[t.v]
      if not st then
        local msg = "Encountered unknown tag '" .. t.v .. "'."
        if end_tags then
          local want = {}
          for k in pairs(end_tags) do want[#want + 1] = "'" .. k .. "'" end
          table.sort(want)
          msg = msg .. ' Jinja was looking for the following tags: ' .. concat(want, ' or ') .. '.'
        end
        syntax_error(msg, item.line)
      end
      local saved = p.in_loop
      if t.v == 'macro' then p.in_loop = 0 end
      body[#body + 1] = st(p, c, item.line)
      p.in_loop = saved
    end
  end
end

---------------------------------------------------------------------------------------------------
-- Evaluator

local GLOBALS = {}

local function lookup(frame, name, ctx)
  local f = frame
  while f do
    local v = f.vars[name]
    if v ~= nil then return v end
    f = f.parent
  end
  local v = ctx.vars[name]
  if v ~= nil then return v end
  v = GLOBALS[name]
  if v ~= nil then return v end
  return undef("'" .. name .. "' is undefined")
end

local eval

local function eval_args(node, frame, ctx)
  local args = {}
  for i, a in ipairs(node.args) do args[i] = eval(a, frame, ctx) end
  local kwargs
  if node.kwargs then
    kwargs = json.ordered({}, node.korder or {})
    for k, a in pairs(node.kwargs) do kwargs[k] = eval(a, frame, ctx) end
  end
  return args, kwargs
end

local EVAL = {}

eval = function(node, frame, ctx)
  ctx.line = node.line or ctx.line
  return EVAL[node.t](node, frame, ctx)
end

EVAL.const = function(node) return node.v end
EVAL.name = function(node, frame, ctx) return lookup(frame, node.n, ctx) end
EVAL.blockval = function(_, _, ctx) return ctx.blockval end
EVAL.list = function(node, frame, ctx)
  local out = new_list()
  for i, e in ipairs(node.items) do out[i] = eval(e, frame, ctx) end
  return out
end
EVAL.tuple = function(node, frame, ctx)
  local out = new_tuple()
  for i, e in ipairs(node.items) do out[i] = eval(e, frame, ctx) end
  return out
end
EVAL.dict = function(node, frame, ctx)
  local d, order = new_dict()
  for _, kv in ipairs(node.pairs) do
    local k = eval(kv[1], frame, ctx)
    if type(k) == 'table' then throw("unhashable type: '" .. py_type(k) .. "'") end
    if d[k] == nil then order[#order + 1] = k end
    d[k] = eval(kv[2], frame, ctx)
  end
  return d
end
EVAL.getattr = function(node, frame, ctx) return get_attr(eval(node.o, frame, ctx), node.name) end
EVAL.getitem = function(node, frame, ctx)
  local o = eval(node.o, frame, ctx)
  return get_item(o, eval(node.key, frame, ctx))
end
EVAL.slice = function(node, frame, ctx)
  local o = eval(node.o, frame, ctx)
  local a = node.a and opt(eval(node.a, frame, ctx))
  local b = node.b and opt(eval(node.b, frame, ctx))
  local c = node.c and opt(eval(node.c, frame, ctx))
  return do_slice(o, a, b, c)
end
EVAL.call = function(node, frame, ctx)
  local f = eval(node.f, frame, ctx)
  local args, kwargs = eval_args(node, frame, ctx)
  local line = node.line
  local r = call_value(f, args, kwargs)
  ctx.line = line
  if r == nil then return NONE end
  return r
end
EVAL.filter = function(node, frame, ctx)
  local v = eval(node.o, frame, ctx)
  local args, kwargs = eval_args(node, frame, ctx)
  ctx.line = node.line
  return FILTERS[node.name](v, args, kwargs, ctx)
end
EVAL.test = function(node, frame, ctx)
  local v = eval(node.o, frame, ctx)
  local args, kwargs = eval_args(node, frame, ctx)
  ctx.line = node.line
  local r = truthy(TESTS[node.name](v, args, kwargs, ctx))
  if node.neg then return not r end
  return r
end
EVAL['not'] = function(node, frame, ctx) return not truthy(eval(node.e, frame, ctx)) end
EVAL['and'] = function(node, frame, ctx)
  local l = eval(node.l, frame, ctx)
  if not truthy(l) then return l end
  return eval(node.r, frame, ctx)
end
EVAL['or'] = function(node, frame, ctx)
  local l = eval(node.l, frame, ctx)
  if truthy(l) then return l end
  return eval(node.r, frame, ctx)
end
EVAL.neg = function(node, frame, ctx)
  local v = eval(node.e, frame, ctx)
  local x = tonum(v)
  if not x then
    if is_undef(v) then undefined_error(v) end
    throw("bad operand type for unary -: '" .. py_type(v) .. "'")
  end
  if isfloat(v) then return mkfloat(-x) end
  return -x
end
EVAL.bin = function(node, frame, ctx)
  local a = eval(node.l, frame, ctx)
  local b = eval(node.r, frame, ctx)
  ctx.line = node.line
  return binop(node.op, a, b)
end
EVAL.concat = function(node, frame, ctx)
  local parts = {}
  for i, e in ipairs(node.items) do parts[i] = py_str(eval(e, frame, ctx)) end
  return concat(parts)
end
EVAL.cmp = function(node, frame, ctx)
  local a = eval(node.first, frame, ctx)
  for _, o in ipairs(node.ops) do
    local b = eval(o.e, frame, ctx)
    local r
    if o.op == 'in' then r = contains(b, a)
    elseif o.op == 'notin' then r = not contains(b, a)
    else r = compare(o.op, a, b) end
    if not r then return false end
    a = b
  end
  return true
end
EVAL.cond = function(node, frame, ctx)
  if truthy(eval(node.test, frame, ctx)) then return eval(node.yes, frame, ctx) end
  if node.no then return eval(node.no, frame, ctx) end
  return undef('the inline if-expression on line ' .. tostring(node.line) .. ' evaluated to false and no else section was defined.')
end

local exec_body

local function emit(ctx, s)
  if s == '' then return end
  local n = ctx.n + 1
  ctx.n = n
  ctx.out[n] = s
  ctx.len = ctx.len + #s
end

-- Renders body into a string (own output buffer).
local function capture(body, frame, ctx)
  local out, n, len = ctx.out, ctx.n, ctx.len
  ctx.out, ctx.n, ctx.len = {}, 0, 0
  local ok, err = pcall(exec_body, body, frame, ctx)
  local s = concat(ctx.out, '', 1, ctx.n)
  ctx.out, ctx.n, ctx.len = out, n, len
  if not ok then error(err, 0) end
  return s
end

local function assign(target, value, frame)
  if target.t == 'name' then
    frame.vars[target.n] = value
  else
    local items = iterate(value)
    if #items ~= #target.names then
      throw(format('not enough values to unpack (expected %d, got %d)', #target.names, #items))
    end
    for i, n in ipairs(target.names) do frame.vars[n] = items[i] end
  end
end

local EXEC = {}

EXEC.data = function(node, _, ctx) emit(ctx, node.v) end
EXEC.output = function(node, frame, ctx) emit(ctx, py_str(eval(node.e, frame, ctx))) end
EXEC['if'] = function(node, frame, ctx)
  for _, cb in ipairs(node.conds) do
    if truthy(eval(cb[1], frame, ctx)) then return exec_body(cb[2], frame, ctx) end
  end
  if node.else_body then return exec_body(node.else_body, frame, ctx) end
end
EXEC['for'] = function(node, frame, ctx)
  local items = iterate(eval(node.iter, frame, ctx))
  if node.cond then
    local kept = {}
    for _, item in ipairs(items) do
      local f = { vars = {}, parent = frame }
      assign(node.target, item, f)
      if truthy(eval(node.cond, f, ctx)) then kept[#kept + 1] = item end
    end
    items = kept
  end
  local n = #items
  if n == 0 then
    if node.else_body then return exec_body(node.else_body, frame, ctx) end
    return
  end
  local loop = setmetatable({ i = 0, n = n, items = items }, LoopMT)
  for i = 1, n do
    loop.i = i
    local f = { vars = { loop = loop }, parent = frame }
    assign(node.target, items[i], f)
    local sig = exec_body(node.body, f, ctx)
    if sig == 'break' then break end
  end
end
EXEC.set = function(node, frame, ctx)
  local v = eval(node.e, frame, ctx)
  local target = node.target
  if target.t == 'nsattr' then
    local ns = lookup(frame, target.ns, ctx)
    if kind(ns) ~= 'namespace' then throw('cannot assign attribute on non-namespace object') end
    ns.vals[target.attr] = v
  else
    assign(target, v, frame)
  end
end
EXEC.setblock = function(node, frame, ctx)
  local s = capture(node.body, frame, ctx)
  ctx.blockval = s
  local v = eval(node.filter, frame, ctx)
  local target = node.target
  if target.t == 'nsattr' then
    local ns = lookup(frame, target.ns, ctx)
    if kind(ns) ~= 'namespace' then throw('cannot assign attribute on non-namespace object') end
    ns.vals[target.attr] = v
  else
    assign(target, v, frame)
  end
end
EXEC.filterblock = function(node, frame, ctx)
  ctx.blockval = capture(node.body, frame, ctx)
  emit(ctx, py_str(eval(node.filter, frame, ctx)))
end
EXEC.generation = function(node, frame, ctx)
  local s = capture(node.body, frame, ctx)
  local start = ctx.len
  emit(ctx, s)
  ctx.spans[#ctx.spans + 1] = { start + 1, start + #s }
end
EXEC['break'] = function() return 'break' end
EXEC['continue'] = function() return 'continue' end
EXEC.macro = function(node, frame, ctx)
  local def_frame = frame
  local m = setmetatable({ name = node.name }, CallableMT)
  m.fn = function(args, kwargs)
    if #args > #node.params then
      throw(format("macro '%s' takes not more than %d argument(s)", node.name, #node.params))
    end
    local f = { vars = {}, parent = def_frame }
    for i, pdef in ipairs(node.params) do
      local v = args[i]
      if v == nil and kwargs then v = kwargs[pdef[1]] end
      if v == nil then
        if pdef[2] then v = eval(pdef[2], f, ctx) else v = undef("parameter '" .. pdef[1] .. "' was not provided") end
      end
      f.vars[pdef[1]] = v
    end
    if kwargs then
      for k in pairs(kwargs) do
        local ok = false
        for _, pdef in ipairs(node.params) do if pdef[1] == k then ok = true end end
        if not ok then throw(format("macro '%s' takes no keyword argument '%s'", node.name, k)) end
      end
    end
    local line = ctx.line
    local s = capture(node.body, f, ctx)
    ctx.line = line
    return s
  end
  frame.vars[node.name] = m
end

exec_body = function(body, frame, ctx)
  for i = 1, #body do
    local node = body[i]
    if node.line then ctx.line = node.line end
    local sig = EXEC[node.t](node, frame, ctx)
    if sig then return sig end
  end
end

---------------------------------------------------------------------------------------------------
-- Globals

local function fn(name, f) return setmetatable({ name = name, fn = f }, CallableMT) end

GLOBALS.range = fn('range', function(args)
  local a, b, s = 0, nil, 1
  for i = 1, #args do
    if not tonum(args[i]) or isfloat(args[i]) then throw("'" .. py_type(args[i]) .. "' object cannot be interpreted as an integer") end
  end
  if #args == 1 then b = tonum(args[1])
  elseif #args >= 2 then a, b, s = tonum(args[1]), tonum(args[2]), args[3] and tonum(args[3]) or 1
  else throw('range expected at least 1 argument, got 0') end
  if s == 0 then throw('range() arg 3 must not be zero') end
  local out = new_list()
  local i = a
  if s > 0 then while i < b do out[#out + 1] = i; i = i + s end
  else while i > b do out[#out + 1] = i; i = i + s end end
  return out
end)

GLOBALS.namespace = fn('namespace', function(args, kwargs)
  local vals, order = new_dict()
  for _, a in ipairs(args) do
    if kind(a) ~= 'dict' then throw('namespace() positional argument must be a mapping') end
    for _, k in ipairs(dict_keys(a)) do if vals[k] == nil then order[#order + 1] = k end vals[k] = a[k] end
  end
  if kwargs then
    for _, k in ipairs(dict_keys(kwargs)) do
      if type(k) == 'string' and sub(k, 1, 1) == '_' then
        throw('Chat templates cannot store underscore-prefixed attributes on a namespace, but got ' .. str_repr(k) .. '.')
      end
      if vals[k] == nil then order[#order + 1] = k end
      vals[k] = kwargs[k]
    end
  end
  return setmetatable({ vals = vals }, NamespaceMT)
end)

GLOBALS.dict = fn('dict', function(args, kwargs)
  local d, order = new_dict()
  for _, a in ipairs(args) do
    if kind(a) == 'dict' then
      for _, k in ipairs(dict_keys(a)) do if d[k] == nil then order[#order + 1] = k end d[k] = a[k] end
    else
      for _, pair in ipairs(iterate(a)) do
        if d[pair[1]] == nil then order[#order + 1] = pair[1] end
        d[pair[1]] = pair[2]
      end
    end
  end
  if kwargs then
    for _, k in ipairs(dict_keys(kwargs)) do if d[k] == nil then order[#order + 1] = k end d[k] = kwargs[k] end
  end
  return d
end)

GLOBALS.raise_exception = fn('raise_exception', function(args)
  throw(py_str(args[1] == nil and '' or args[1]), true)
end)

GLOBALS.strftime_now = fn('strftime_now', function(args)
  return os.date(need_str(args[1], 'strftime_now() argument'))
end)

---------------------------------------------------------------------------------------------------
-- Filters: f(value, args, kwargs, ctx)

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

---------------------------------------------------------------------------------------------------
-- Tests: t(value, args, kwargs, ctx)

TESTS.defined = function(v) return not is_undef(v) end
TESTS.undefined = function(v) return is_undef(v) end
TESTS.none = function(v) return v == NONE end
TESTS.boolean = function(v) return type(v) == 'boolean' end
TESTS['true'] = function(v) return v == true end
TESTS['false'] = function(v) return v == false end
TESTS.integer = function(v) return type(v) == 'number' and not isfloat(v) end
TESTS.float = function(v) return isfloat(v) end
TESTS.number = function(v) return tonum(v) ~= nil end
TESTS.string = function(v) return type(v) == 'string' end
TESTS.mapping = function(v) return kind(v) == 'dict' end
TESTS.sequence = function(v) local k = kind(v) return k == 'string' or k == 'list' or k == 'dict' end
TESTS.iterable = function(v) local k = kind(v) return k == 'string' or k == 'list' or k == 'dict' or k == 'undefined' end
TESTS.callable = function(v) return kind(v) == 'callable' end
TESTS.sameas = function(v, args)
  local o = args[1]
  if type(v) == 'table' and getmetatable(v) == FloatMT then return false end
  return v == o
end
TESTS.eq = function(v, args) return py_eq(v, args[1]) end
TESTS.equalto = TESTS.eq
TESTS['=='] = TESTS.eq
TESTS.ne = function(v, args) return not py_eq(v, args[1]) end
TESTS['!='] = TESTS.ne
TESTS.lt = function(v, args) return py_lt(v, args[1]) end
TESTS.lessthan = TESTS.lt
TESTS.le = function(v, args) return compare('<=', v, args[1]) end
TESTS.gt = function(v, args) return py_lt(args[1], v) end
TESTS.greaterthan = TESTS.gt
TESTS.ge = function(v, args) return compare('>=', v, args[1]) end
TESTS['in'] = function(v, args) return contains(args[1], v) end
TESTS.odd = function(v) return (tonum(v) or throw('odd: a number is required')) % 2 == 1 end
TESTS.even = function(v) return (tonum(v) or throw('even: a number is required')) % 2 == 0 end
TESTS.divisibleby = function(v, args) return tonum(v) % tonum(args[1]) == 0 end
TESTS.lower = function(v) local s = py_str(v) return ascii_lower(s) == s end
TESTS.upper = function(v) local s = py_str(v) return ascii_upper(s) == s end

---------------------------------------------------------------------------------------------------
-- Templates

local Template = {}
Template.__index = Template

-- Compiles a template source; errors name the line ('chat_template: syntax error, line N: ...').
function M.compile(source, name)
  if type(source) ~= 'string' then error('chat_template.compile: expects a string, got ' .. type(source), 2) end
  local ok, res = pcall(function()
    local items = lex(source)
    local p = { items = items, i = 1, last_line = 1, eof_line = items.last_line }
    return parse_body(p, nil)
  end)
  if not ok then
    if type(res) == 'table' and getmetatable(res) == SyntaxMT then
      error(format('chat_template: syntax error%s, line %d: %s', name and (' in ' .. name) or '', res.line or 0,
        res.msg), 2)
    end
    error(res, 0)
  end
  return setmetatable({ body = res, source = source, name = name }, Template)
end

-- Renders with vars (a table of template variables). Returns the text and the {% generation %} spans
-- ({first, last} 1-based inclusive byte positions in the text).
function Template:render(vars)
  local ctx = { vars = vars or {}, out = {}, n = 0, len = 0, spans = {}, line = 1 }
  local root = { vars = {} }
  local ok, err = pcall(exec_body, self.body, root, ctx)
  if not ok then
    if type(err) == 'table' and getmetatable(err) == ErrorMT then
      if err.raised then error(err.msg, 0) end
      error(format('chat_template: %sline %d: %s', self.name and (self.name .. ', ') or '', ctx.line or 0, err.msg), 0)
    end
    error(format('chat_template: %sline %d: %s', self.name and (self.name .. ', ') or '', ctx.line or 0,
      tostring(err)), 0)
  end
  return concat(ctx.out, '', 1, ctx.n), ctx.spans
end

local cache = setmetatable({}, { __mode = 'v' })
local function compile_cached(source)
  local t = cache[source]
  if not t then
    t = M.compile(source)
    cache[source] = t
  end
  return t
end

-- Compiles and renders in one call.
function M.render(source, vars) return compile_cached(source):render(vars) end

---------------------------------------------------------------------------------------------------
-- Built-in templates for models without one

local BUILTIN = {
  -- the ChatML template transformers used as its default (Qwen, many fine-tunes)
  chatml = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + " ..
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
  -- Meta-Llama-3-Instruct's template (BOS is '<|begin_of_text|>' when bos_token is not given)
  llama3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = " ..
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + " ..
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = (bos_token if bos_token is defined and bos_token " ..
    "is not none else '<|begin_of_text|>') + content %}{% endif %}{{ content }}{% endfor %}" ..
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
  -- Stanford Alpaca's prompt; a leading system message replaces the preamble; eos_token ends responses
  alpaca = "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}" ..
    "{% set loop_messages = messages[1:] %}{% else %}{{ 'Below is an instruction that describes a task. " ..
    "Write a response that appropriately completes the request.\\n\\n' }}{% set loop_messages = messages %}" ..
    "{% endif %}{% for message in loop_messages %}{% if message['role'] == 'user' %}" ..
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}" ..
    "{{ '### Response:\\n' + message['content'] + (eos_token if eos_token is defined and eos_token is not none " ..
    "else '') + '\\n\\n' }}{% else %}{{ raise_exception('alpaca template: unsupported role ' + message['role']) }}" ..
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}",
}

-- The source of a built-in template: 'chatml', 'llama3' or 'alpaca'.
function M.builtin(name)
  local s = BUILTIN[name]
  if not s then error("chat_template.builtin: unknown template '" .. tostring(name) .. "' (chatml, llama3, alpaca)", 2) end
  return s
end

M.builtins = { 'alpaca', 'chatml', 'llama3' }

---------------------------------------------------------------------------------------------------
-- apply_chat_template

local function token_text(v)
  if type(v) == 'string' then return v end
  if type(v) == 'table' and type(v.content) == 'string' then return v.content end
  return nil
end

local function load_config(cfg)
  if type(cfg) == 'table' then return cfg, nil end
  if type(cfg) ~= 'string' then error('chat_template.apply: expects a tokenizer_config table or a path', 3) end
  local pio = require 'pmp.io'
  local dir, file = cfg, nil
  if pio.is_dir(cfg) then
    file = pio.join(cfg, 'tokenizer_config.json')
  else
    file, dir = cfg, pio.dirname(cfg)
  end
  local config = pio.exists(file) and json.read(file, { ordered = true }) or {}
  local jinja_file = pio.join(dir, 'chat_template.jinja')
  local jinja
  if pio.exists(jinja_file) then jinja = pio.read_file(jinja_file) end
  return config, jinja
end

local function pick_template(config, jinja, opts)
  local t = opts.chat_template
  if t ~= nil then
    if BUILTIN[t] then return BUILTIN[t] end
    if type(config.chat_template) == 'table' then
      for _, e in ipairs(config.chat_template) do if e.name == t then return e.template end end
    end
    return t
  end
  if jinja then return jinja end
  local ct = config.chat_template
  if type(ct) == 'string' then return ct end
  if type(ct) == 'table' then
    local byname = {}
    for _, e in ipairs(ct) do byname[e.name] = e.template end
    if opts.tools ~= nil and opts.tools ~= NONE and byname.tool_use then return byname.tool_use end
    if byname.default then return byname.default end
    error('chat_template.apply: the model has several chat templates and none is named default', 3)
  end
  local fb = opts.fallback
  if fb == false then error('chat_template.apply: the tokenizer config has no chat_template', 3) end
  return M.builtin(fb or 'chatml')
end

local REASONING = { 'reasoning_content', 'thinking', 'reasoning' }

-- Copies messages as transformers does: keys whose value is null are dropped, and a message's reasoning
-- (reasoning_content, thinking or reasoning) is also given as thinking and reasoning_content.
local function normalize_messages(messages)
  local out = new_list()
  for i, m in ipairs(messages) do
    if type(m) ~= 'table' then error('chat_template.apply: message ' .. i .. ' is not a table', 3) end
    local keys = dict_keys(m)
    local copy, order = new_dict()
    local reasoning
    for _, field in ipairs(REASONING) do
      if m[field] ~= nil and m[field] ~= NONE then reasoning = m[field]; break end
    end
    if reasoning ~= nil then copy.thinking = reasoning; order[#order + 1] = 'thinking' end
    for _, k in ipairs(keys) do
      local v = m[k]
      if v ~= NONE then
        if copy[k] == nil then order[#order + 1] = k end
        copy[k] = v
      end
    end
    if reasoning ~= nil then
      if copy.reasoning_content == nil then order[#order + 1] = 'reasoning_content' end
      copy.reasoning_content = reasoning
    end
    out[i] = copy
  end
  return out
end

local OPT_KEYS = { chat_template = true, fallback = true }

-- Renders messages with the model's chat template, as transformers' apply_chat_template(tokenize=False).
-- config: a tokenizer_config table, or a tokenizer directory / tokenizer_config.json path (a
-- chat_template.jinja file next to it takes precedence). opts: add_generation_prompt, tools, documents,
-- and any template variable (enable_thinking, bos_token, ...); chat_template = a source or a builtin name
-- to use instead; fallback = builtin name used when the model has no template (default 'chatml';
-- false: error). Returns the text and the {% generation %} spans.
function M.apply(config, messages, opts)
  opts = opts or {}
  local cfg, jinja = load_config(config)
  local source = pick_template(cfg, jinja, opts)
  if type(messages) ~= 'table' or #messages == 0 then
    error('chat_template.apply: Cannot apply chat template to an empty conversation. Provide at least one message.', 2)
  end
  local vars = {}
  for _, k in ipairs({ 'bos_token', 'eos_token', 'unk_token', 'pad_token' }) do
    local v = token_text(cfg[k])
    if v then vars[k] = v end
  end
  for k, v in pairs(opts) do
    if not OPT_KEYS[k] then vars[k] = v end
  end
  vars.messages = normalize_messages(messages)
  if vars.tools == nil then vars.tools = NONE end
  if vars.documents == nil then vars.documents = NONE end
  if vars.add_generation_prompt == nil then vars.add_generation_prompt = false end
  return compile_cached(source):render(vars)
end

-- Exposed for tests and tools.
M.py_str = py_str
M.NONE = NONE

return M
