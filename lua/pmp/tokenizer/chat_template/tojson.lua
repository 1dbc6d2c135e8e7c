-- json.dumps as transformers' tojson filter calls it.
local V = require 'pmp.tokenizer.chat_template.values'
local S = require 'pmp.tokenizer.chat_template.strings'

local byte, format, concat, rep = string.byte, string.format, table.concat, string.rep
local floor, huge = math.floor, math.huge
local NONE, throw, kind, tonum, py_type, key_less, dict_keys =
  V.NONE, V.throw, V.kind, V.tonum, V.py_type, V.key_less, V.dict_keys
local is_ascii, chars, codepoint, num_str = S.is_ascii, S.chars, S.codepoint, S.num_str

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

return tojson
