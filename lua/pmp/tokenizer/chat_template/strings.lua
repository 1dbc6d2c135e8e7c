-- Strings as Python sees them: UTF-8 code points, the str methods' helpers, and str() / repr().
local V = require 'pmp.tokenizer.chat_template.values'

local byte, char, sub, find, format, concat, rep = string.byte, string.char, string.sub, string.find,
  string.format, table.concat, string.rep
local floor, huge, abs = math.floor, math.huge, math.abs
local TupleMT, throw, new_list, kind, isfloat, tonum, py_type, dict_keys =
  V.TupleMT, V.throw, V.new_list, V.kind, V.isfloat, V.tonum, V.py_type, V.dict_keys

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
  -- a sequence cut short by the end of the string (invalid UTF-8) stands for its first byte
  if #ch < (c >= 0xF0 and 4 or c >= 0xE0 and 3 or c >= 0xC0 and 2 or 1) then return c end
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

return {
  is_ascii = is_ascii, ulen = ulen, chars = chars, codepoint = codepoint, utf8_char = utf8_char,
  py_isspace = py_isspace, py_strip = py_strip, ascii_upper = ascii_upper, ascii_lower = ascii_lower,
  py_split = py_split, py_rsplit = py_rsplit, py_replace = py_replace, num_str = num_str, str_repr = str_repr,
  py_repr = py_repr, py_str = py_str,
}
