--- JSON (RFC 8259) for config.json, tokenizer.json, safetensors headers and checkpoint indexes.
--
--   local json = require 'pmp.json'            -- also pmp.json
--   json.encode({b = 1, a = {1, 2.5, 'x'}})     --> {"a":[1,2.5,"x"],"b":1}
--   json.decode('{"a": [1, null]}')             --> {a = {1, json.null}}
--
-- Values: objects are tables with string keys, arrays are tables with keys 1..n, `json.null` stands
-- for null (nil cannot sit in a table). An empty table encodes as {} unless marked with json.array(t);
-- the decoder marks the arrays it makes, so [] survives a round trip.
--
-- encode(value, options): keys are sorted (deterministic output). options:
--   indent      number of spaces (or a string) per level: pretty output with ": " and newlines
--   key_order   list of keys that come first, in that order, in every object (the rest sorted)
--   json.ordered(t, keys) fixes the key order of one table (keys missing from the list follow, sorted)
-- Integers print without ".0"; other numbers print with the fewest digits (up to 17) that read back
-- to the same double. NaN, infinities, cycles, functions, non-string keys, and tables that mix array
-- entries with other keys are errors.
--
-- decode(text, options): errors name the byte offset (0-based, as in the file). options:
--   null            the value that stands for null (default json.null)
--   duplicate_keys  'last' (default: the last one wins, as most parsers do) or 'error'
--   ordered         true: remember each object's key order (json.keys(t) returns it; encode uses it)
-- Strings must be valid UTF-8; \uXXXX escapes (surrogate pairs included) become UTF-8.
local bit = require 'bit'
local ffi = require 'ffi'

local json = {}

local byte, char, sub, find, format, concat = string.byte, string.char, string.sub, string.find, string.format,
  table.concat
local floor, huge = math.floor, math.huge

json.null = setmetatable({}, {
  __tostring = function() return 'json.null' end,
  __newindex = function() error('json.null is read-only', 2) end,
})

local array_mt = { __jsontype = 'array' }
local key_orders = setmetatable({}, { __mode = 'k' })

-- Marks t (or a new table) as an array: it encodes as [] even when empty.
function json.array(t)
  t = t or {}
  local mt = getmetatable(t)
  if mt == nil then
    setmetatable(t, array_mt)
  elseif mt ~= array_mt then
    error('json.array: the table already has a metatable', 2)
  end
  return t
end

function json.is_array(t) return getmetatable(t) == array_mt end

-- Gives t an explicit key order for encoding; returns t.
function json.ordered(t, keys)
  if type(t) ~= 'table' or type(keys) ~= 'table' then error('json.ordered: expects a table and a list of keys', 2) end
  key_orders[t] = keys
  return t
end

-- The key order remembered for t (json.ordered, or decode with ordered = true), or nil.
function json.keys(t) return key_orders[t] end

---------------------------------------------------------------------------------------------------
-- UTF-8 validation (shared by the encoder and the decoder)

-- Returns nil when s is valid UTF-8, else the 1-based position of the first bad byte.
local function utf8_error(s, i, j)
  i, j = i or 1, j or #s
  while i <= j do
    local c = byte(s, i)
    if c < 0x80 then
      i = i + 1
    else
      local n, min
      if c >= 0xC2 and c <= 0xDF then n, min = 1, 0x80
      elseif c >= 0xE0 and c <= 0xEF then n, min = 2, 0x800
      elseif c >= 0xF0 and c <= 0xF4 then n, min = 3, 0x10000
      else return i end
      if i + n > j then return i end
      local cp = bit.band(c, bit.rshift(0x7F, n + 1))
      for k = 1, n do
        local cc = byte(s, i + k)
        if cc < 0x80 or cc > 0xBF then return i end
        cp = cp * 64 + (cc - 0x80)
      end
      if cp < min or cp > 0x10FFFF or (cp >= 0xD800 and cp <= 0xDFFF) then return i end
      i = i + n + 1
    end
  end
  return nil
end
json.utf8_error = utf8_error

local function utf8_char(cp)
  if cp < 0x80 then return char(cp) end
  if cp < 0x800 then return char(0xC0 + floor(cp / 64), 0x80 + cp % 64) end
  if cp < 0x10000 then
    return char(0xE0 + floor(cp / 4096), 0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
  end
  return char(0xF0 + floor(cp / 262144), 0x80 + floor(cp / 4096) % 64, 0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
end

---------------------------------------------------------------------------------------------------
-- Encoder

local escapes = {
  ['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t',
}
for c = 0, 31 do
  local ch = char(c)
  if not escapes[ch] then escapes[ch] = format('\\u%04x', c) end
end

local function encode_string(s, path)
  local bad = utf8_error(s)
  if bad then error(format('json.encode: invalid UTF-8 at byte %d of the string at %s', bad, path), 0) end
  return '"' .. s:gsub('[%z\1-\31"\\]', escapes) .. '"'
end

local int64_ct, uint64_ct = ffi.typeof('int64_t'), ffi.typeof('uint64_t')

local function encode_number(x, path)
  if x ~= x or x == huge or x == -huge then
    error('json.encode: ' .. tostring(x) .. ' at ' .. path .. ' has no JSON form', 0)
  end
  if x == floor(x) and x > -2^53 and x < 2^53 then
    if x == 0 and 1 / x < 0 then return '-0' end
    return format('%d', x)
  end
  for digits = 15, 17 do
    local s = format('%.' .. digits .. 'g', x)
    if digits == 17 or tonumber(s) == x then return s end
  end
end

local function sorted_keys(t, path, options)
  local keys, n_string, max_int, n_int = {}, 0, 0, 0
  for k in pairs(t) do
    local tk = type(k)
    if tk == 'string' then
      n_string = n_string + 1
      keys[#keys + 1] = k
    elseif tk == 'number' and k >= 1 and k == floor(k) then
      n_int = n_int + 1
      if k > max_int then max_int = k end
    else
      error(format('json.encode: table at %s has a key of type %s (%s); object keys must be strings', path, tk,
        tostring(k)), 0)
    end
  end
  if n_int > 0 then
    if n_string > 0 then
      error(format('json.encode: table at %s mixes array entries with string keys (e.g. %q)', path, keys[1]), 0)
    end
    if max_int ~= n_int then
      error(format('json.encode: table at %s is a sparse array (%d entries, largest index %d)', path, n_int, max_int), 0)
    end
    return nil, n_int
  end
  local explicit = key_orders[t] or options.key_order
  if explicit then
    local rank = {}
    for i, k in ipairs(explicit) do if rank[k] == nil then rank[k] = i end end
    table.sort(keys, function(a, b)
      local ra, rb = rank[a], rank[b]
      if ra and rb then return ra < rb end
      if ra or rb then return ra ~= nil end
      return a < b
    end)
  else
    table.sort(keys)
  end
  return keys, 0
end

local encode_value

local function encode_table(t, path, options, depth, active, out)
  if active[t] then error('json.encode: cycle: the table at ' .. path .. ' contains itself', 0) end
  active[t] = true
  local keys, n = sorted_keys(t, path, options)
  local indent = options.indent_string
  local nl, inner, outer, colon = '', '', '', ':'
  if indent then
    nl = '\n'
    inner = string.rep(indent, depth + 1)
    outer = string.rep(indent, depth)
    colon = ': '
  end
  if keys == nil or (#keys == 0 and getmetatable(t) == array_mt) then
    if n == 0 then
      out[#out + 1] = '[]'
    else
      out[#out + 1] = '['
      for i = 1, n do
        if i > 1 then out[#out + 1] = ',' end
        out[#out + 1] = nl .. inner
        encode_value(t[i], path .. '[' .. i .. ']', options, depth + 1, active, out)
      end
      out[#out + 1] = nl .. outer .. ']'
    end
  elseif #keys == 0 then
    out[#out + 1] = '{}'
  else
    if getmetatable(t) == array_mt then
      error('json.encode: table at ' .. path .. ' is marked as an array but has string keys', 0)
    end
    out[#out + 1] = '{'
    for i, k in ipairs(keys) do
      if i > 1 then out[#out + 1] = ',' end
      out[#out + 1] = nl .. inner .. encode_string(k, path) .. colon
      encode_value(t[k], path .. '.' .. k, options, depth + 1, active, out)
    end
    out[#out + 1] = nl .. outer .. '}'
  end
  active[t] = nil
end

encode_value = function(v, path, options, depth, active, out)
  local tv = type(v)
  if v == json.null or v == nil then
    out[#out + 1] = 'null'
  elseif tv == 'string' then
    out[#out + 1] = encode_string(v, path)
  elseif tv == 'number' then
    out[#out + 1] = encode_number(v, path)
  elseif tv == 'boolean' then
    out[#out + 1] = v and 'true' or 'false'
  elseif tv == 'table' then
    if depth >= 1000 then error('json.encode: nesting deeper than 1000 levels at ' .. path, 0) end
    encode_table(v, path, options, depth, active, out)
  elseif tv == 'cdata' and (ffi.istype(int64_ct, v) or ffi.istype(uint64_ct, v)) then
    out[#out + 1] = (tostring(v):gsub('U?LL$', ''))
  else
    error('json.encode: cannot encode a ' .. tv .. ' (at ' .. path .. ')', 0)
  end
end

function json.encode(value, options)
  options = options or {}
  local indent = options.indent
  local opts = { key_order = options.key_order }
  if type(indent) == 'number' then
    opts.indent_string = indent > 0 and string.rep(' ', indent) or nil
  elseif type(indent) == 'string' then
    opts.indent_string = indent
  end
  local out = {}
  encode_value(value, '$', opts, 0, {}, out)
  return concat(out)
end

---------------------------------------------------------------------------------------------------
-- Decoder

local function decode_error(what, pos)
  error(format('json.decode: %s at byte %d', what, pos - 1), 0)
end

local unescape = { ['"'] = '"', ['\\'] = '\\', ['/'] = '/', b = '\b', f = '\f', n = '\n', r = '\r', t = '\t' }

local function skip_ws(s, pos)
  local _, e = find(s, '^[ \t\n\r]*', pos)
  return e + 1
end

local function hex4(s, pos)
  local h = sub(s, pos, pos + 3)
  if not find(h, '^%x%x%x%x$') then decode_error('invalid \\u escape (expected 4 hex digits)', pos) end
  return tonumber(h, 16)
end

local function decode_string(s, pos)
  -- pos is just after the opening quote
  local parts, np = nil, 0
  local start = pos
  while true do
    local q = find(s, '[%z\1-\31"\\]', pos)
    if not q then decode_error('unterminated string', start - 1) end
    local chunk = sub(s, pos, q - 1)
    if find(chunk, '[\128-\255]') then
      local bad = utf8_error(chunk)
      if bad then decode_error('invalid UTF-8 in string', pos + bad - 1) end
    end
    local c = byte(s, q)
    if c == 34 then -- "
      if not parts then return chunk, q + 1 end
      np = np + 1
      parts[np] = chunk
      return concat(parts), q + 1
    elseif c == 92 then -- backslash
      parts = parts or {}
      np = np + 1
      parts[np] = chunk
      local e = sub(s, q + 1, q + 1)
      if e == 'u' then
        local cp = hex4(s, q + 2)
        pos = q + 6
        if cp >= 0xD800 and cp <= 0xDBFF then
          if sub(s, pos, pos + 1) ~= '\\u' then decode_error('lone high surrogate in \\u escape', q) end
          local lo = hex4(s, pos + 2)
          if lo < 0xDC00 or lo > 0xDFFF then decode_error('high surrogate not followed by a low one', pos) end
          cp = 0x10000 + (cp - 0xD800) * 1024 + (lo - 0xDC00)
          pos = pos + 6
        elseif cp >= 0xDC00 and cp <= 0xDFFF then
          decode_error('lone low surrogate in \\u escape', q)
        end
        np = np + 1
        parts[np] = utf8_char(cp)
      else
        local u = unescape[e]
        if not u then decode_error('invalid escape \\' .. e, q) end
        np = np + 1
        parts[np] = u
        pos = q + 2
      end
    else
      decode_error(format('control character 0x%02x in string', c), q)
    end
  end
end

local decode_value

local function decode_array(s, pos, options, depth)
  local arr, n = setmetatable({}, array_mt), 0
  pos = skip_ws(s, pos)
  if byte(s, pos) == 93 then return arr, pos + 1 end
  while true do
    local v
    v, pos = decode_value(s, pos, options, depth)
    n = n + 1
    arr[n] = v
    pos = skip_ws(s, pos)
    local c = byte(s, pos)
    if c == 93 then return arr, pos + 1 end
    if c ~= 44 then decode_error(c and "expected ',' or ']' in array" or 'unexpected end inside an array', pos) end
    pos = skip_ws(s, pos + 1)
  end
end

local function decode_object(s, pos, options, depth)
  local obj, order = {}, nil
  if options.ordered then order = {} end
  pos = skip_ws(s, pos)
  if byte(s, pos) == 125 then
    if order then key_orders[obj] = order end
    return obj, pos + 1
  end
  local seen = options.duplicate_keys == 'error' and {} or nil
  while true do
    if byte(s, pos) ~= 34 then decode_error(byte(s, pos) and 'expected a string key' or 'unexpected end inside an object', pos) end
    local key_pos = pos
    local key
    key, pos = decode_string(s, pos + 1)
    pos = skip_ws(s, pos)
    if byte(s, pos) ~= 58 then decode_error("expected ':' after object key", pos) end
    pos = skip_ws(s, pos + 1)
    local v
    v, pos = decode_value(s, pos, options, depth)
    if obj[key] ~= nil then
      if seen then decode_error(format('duplicate key %q', key), key_pos) end
    elseif order then
      order[#order + 1] = key
    end
    obj[key] = v
    pos = skip_ws(s, pos)
    local c = byte(s, pos)
    if c == 125 then
      if order then key_orders[obj] = order end
      return obj, pos + 1
    end
    if c ~= 44 then decode_error(c and "expected ',' or '}' in object" or 'unexpected end inside an object', pos) end
    pos = skip_ws(s, pos + 1)
  end
end

decode_value = function(s, pos, options, depth)
  local c = byte(s, pos)
  if c == 123 then
    if depth >= 1000 then decode_error('nesting deeper than 1000 levels', pos) end
    return decode_object(s, pos + 1, options, depth + 1)
  elseif c == 91 then
    if depth >= 1000 then decode_error('nesting deeper than 1000 levels', pos) end
    return decode_array(s, pos + 1, options, depth + 1)
  elseif c == 34 then
    return decode_string(s, pos + 1)
  elseif c == 45 or (c and c >= 48 and c <= 57) then
    local _, e = find(s, '^-?%d+', pos)
    if not e then decode_error('invalid number', pos) end
    local int_start = byte(s, pos) == 45 and pos + 1 or pos
    if byte(s, int_start) == 48 and e > int_start then decode_error('leading zero in number', pos) end
    local e2
    if byte(s, e + 1) == 46 then
      _, e2 = find(s, '^%d+', e + 2)
      if not e2 then decode_error("invalid number (digits must follow '.')", e + 1) end
      e = e2
    end
    local x = byte(s, e + 1)
    if x == 101 or x == 69 then
      _, e2 = find(s, '^[+-]?%d+', e + 2)
      if not e2 then decode_error('invalid number (bad exponent)', e + 1) end
      e = e2
    end
    return tonumber(sub(s, pos, e)), e + 1
  elseif c == 116 then
    if sub(s, pos, pos + 3) == 'true' then return true, pos + 4 end
  elseif c == 102 then
    if sub(s, pos, pos + 4) == 'false' then return false, pos + 5 end
  elseif c == 110 then
    if sub(s, pos, pos + 3) == 'null' then return options.null, pos + 4 end
  elseif c == nil then
    decode_error('unexpected end of input (expected a value)', pos)
  end
  decode_error(format('unexpected character %q', char(c)), pos)
end

function json.decode(text, options)
  if type(text) ~= 'string' then error('json.decode: expects a string, got ' .. type(text), 2) end
  options = options or {}
  local opts = { duplicate_keys = options.duplicate_keys or 'last', ordered = options.ordered }
  if options.null ~= nil then opts.null = options.null else opts.null = json.null end
  local pos = skip_ws(text, 1)
  local value
  value, pos = decode_value(text, pos, opts, 0)
  pos = skip_ws(text, pos)
  if pos <= #text then decode_error('trailing characters after the JSON value', pos) end
  return value
end

-- Reads and decodes a file; errors name the file.
function json.read(path, options)
  local f, err = io.open(path, 'rb')
  if not f then error('json.read: cannot open ' .. tostring(err), 0) end
  local text = f:read('*a')
  f:close()
  local ok, value = pcall(json.decode, text, options)
  if not ok then error(path .. ': ' .. value, 0) end
  return value
end

return json
