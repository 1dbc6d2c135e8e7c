--- megatron-core's dataset index cache, so that a cache either side built is used by the other:
--
--   <cache dir>/<md5>-<Class>-<split>-description.txt   the dataset's unique description (JSON text)
--   <cache dir>/<md5>-<Class>-<split>-<name>.npy         its indices, numpy .npy v1.0
--
-- <md5> is the MD5 of the description text, which megatron-core writes with Python's
-- json.dumps(identifiers, indent=4): its spacing, its float repr (shortest round trip, 1.0 not 1),
-- ASCII-only strings. `describe` writes the same text from an ordered list of fields.
--
--   local cache = require 'pmp.data.megatron_cache'
--   cache.describe(cache.object{ {'class', 'GPTDataset'}, {'num_samples', cache.null}, {'w', cache.float(0.5)} })
--   cache.md5(text) -> 32 hex digits
--   cache.paths(dir, text, 'GPTDataset', 'train', {'document_index', ...}) -> {description =, document_index =, ...}
--   cache.write_npy(path, descr, shape, ptr, nbytes); cache.map_npy(path, descr, shape) -> mapping, pointer
--   cache.descriptions(dir, 'GPTDataset', 'train') -> {{path =, base =, fields =}, ...} (parsed, any hash)
local ffi = require 'ffi'
local bit = require 'bit'
local C = require('pmp.ffi').C
local pio = require 'pmp.io'
local json = require 'pmp.json'

local M = {}

local band, bor, bxor, bnot, rol, tobit = bit.band, bit.bor, bit.bxor, bit.bnot, bit.rol, bit.tobit

---------------------------------------------------------------------------------------------------
-- MD5 (RFC 1321)

local K, S = {}, {
  7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22,
  5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20,
  4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23,
  6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
}
for i = 0, 63 do K[i + 1] = tobit(math.floor(math.abs(math.sin(i + 1)) * 2 ^ 32)) end

local function le32(n)
  return string.char(band(n, 255), band(bit.rshift(n, 8), 255), band(bit.rshift(n, 16), 255), band(bit.rshift(n, 24), 255))
end

function M.md5(message)
  local len = #message
  local padded = message .. '\128' .. string.rep('\0', (55 - len) % 64)
  local bits = len * 8
  padded = padded .. le32(tobit(bits % 2 ^ 32)) .. le32(tobit(math.floor(bits / 2 ^ 32)))
  local a0, b0, c0, d0 = tobit(0x67452301), tobit(0xefcdab89), tobit(0x98badcfe), tobit(0x10325476)
  local w = {}
  for chunk = 1, #padded, 64 do
    for j = 0, 15 do
      local b1, b2, b3, b4 = padded:byte(chunk + 4 * j, chunk + 4 * j + 3)
      w[j] = tobit(b1 + b2 * 256 + b3 * 65536 + b4 * 16777216)
    end
    local a, b, c, d = a0, b0, c0, d0
    for i = 0, 63 do
      local f, g
      if i < 16 then
        f, g = bor(band(b, c), band(bnot(b), d)), i
      elseif i < 32 then
        f, g = bor(band(d, b), band(bnot(d), c)), (5 * i + 1) % 16
      elseif i < 48 then
        f, g = bxor(b, c, d), (3 * i + 5) % 16
      else
        f, g = bxor(c, bor(b, bnot(d))), (7 * i) % 16
      end
      f = tobit(f + a + K[i + 1] + w[g])
      a, d, c = d, c, b
      b = tobit(b + rol(f, S[i + 1]))
    end
    a0, b0, c0, d0 = tobit(a0 + a), tobit(b0 + b), tobit(c0 + c), tobit(d0 + d)
  end
  local out = {}
  for k, v in ipairs({ a0, b0, c0, d0 }) do
    out[k] = le32(v):gsub('.', function(ch) return string.format('%02x', ch:byte()) end)
  end
  return table.concat(out)
end

---------------------------------------------------------------------------------------------------
-- Python's json.dumps(value, indent=4)

local object_mt, float_mt = {}, {}
M.null = json.null

-- An object whose keys keep the given order: {{key, value}, ...}.
function M.object(pairs_list) return setmetatable(pairs_list, object_mt) end
-- A Python float (printed 1.0, 0.969, 1e-05), as opposed to an int.
function M.float(x) return setmetatable({ x }, float_mt) end

-- Python's repr of a finite float: the shortest digits that read back, positional for exponents
-- -4 .. 15, else d.ddde±XX.
local function float_repr(x)
  if x ~= x or x == math.huge or x == -math.huge then error('megatron cache: cannot describe ' .. tostring(x)) end
  if x == 0 then return (1 / x < 0) and '-0.0' or '0.0' end
  local text
  for p = 1, 17 do
    text = string.format('%.' .. (p - 1) .. 'e', x)
    if tonumber(text) == x then break end
  end
  local sign, int, frac, exp = text:match('^(%-?)(%d)%.?(%d*)e([-+]%d+)$')
  local digits, e = (int .. frac):gsub('0+$', ''), tonumber(exp)
  if digits == '' then digits = '0' end
  if e >= 16 or e < -4 then
    local mantissa = #digits > 1 and (digits:sub(1, 1) .. '.' .. digits:sub(2)) or digits
    return string.format('%s%se%s%02d', sign, mantissa, e < 0 and '-' or '+', math.abs(e))
  end
  if e < 0 then return sign .. '0.' .. string.rep('0', -e - 1) .. digits end
  if #digits <= e + 1 then return sign .. digits .. string.rep('0', e + 1 - #digits) .. '.0' end
  return sign .. digits:sub(1, e + 1) .. '.' .. digits:sub(e + 2)
end
M._float_repr = float_repr

-- A JSON string as Python writes it (ensure_ascii: non-ASCII as \uXXXX, surrogate pairs beyond the BMP).
local ESCAPES = { ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t', ['\b'] = '\\b', ['\f'] = '\\f' }
local function string_repr(s)
  local out = {}
  for ch in s:gmatch('[%z\1-\127\192-\255][\128-\191]*') do
    local b = ch:byte()
    if ESCAPES[ch] then
      out[#out + 1] = ESCAPES[ch]
    elseif b < 32 then
      out[#out + 1] = string.format('\\u%04x', b)
    elseif b < 128 then
      out[#out + 1] = ch
    else
      local cp = b >= 240 and band(b, 7) or b >= 224 and band(b, 15) or band(b, 31)
      for k = 2, #ch do cp = cp * 64 + band(ch:byte(k), 63) end
      if cp >= 0x10000 then
        cp = cp - 0x10000
        out[#out + 1] = string.format('\\u%04x\\u%04x', 0xD800 + math.floor(cp / 1024), 0xDC00 + cp % 1024)
      else
        out[#out + 1] = string.format('\\u%04x', cp)
      end
    end
  end
  return '"' .. table.concat(out) .. '"'
end

local function dump(v, depth, out)
  local pad, inner = string.rep(' ', 4 * depth), string.rep(' ', 4 * (depth + 1))
  local mt = getmetatable(v)
  if v == M.null or v == nil then
    out[#out + 1] = 'null'
  elseif type(v) == 'boolean' then
    out[#out + 1] = v and 'true' or 'false'
  elseif type(v) == 'string' then
    out[#out + 1] = string_repr(v)
  elseif type(v) == 'number' then
    if v ~= math.floor(v) or math.abs(v) >= 2 ^ 53 then error('megatron cache: ' .. v .. ' is not an int: wrap floats with float()') end
    out[#out + 1] = string.format('%d', v)
  elseif mt == float_mt then
    out[#out + 1] = float_repr(v[1])
  elseif mt == object_mt then
    if #v == 0 then out[#out + 1] = '{}' return end
    out[#out + 1] = '{\n'
    for k, kv in ipairs(v) do
      out[#out + 1] = inner .. string_repr(kv[1]) .. ': '
      dump(kv[2], depth + 1, out)
      out[#out + 1] = k < #v and ',\n' or '\n'
    end
    out[#out + 1] = pad .. '}'
  elseif type(v) == 'table' then
    if #v == 0 then out[#out + 1] = '[]' return end
    out[#out + 1] = '[\n'
    for k, item in ipairs(v) do
      out[#out + 1] = inner
      dump(item, depth + 1, out)
      out[#out + 1] = k < #v and ',\n' or '\n'
    end
    out[#out + 1] = pad .. ']'
  else
    error('megatron cache: cannot describe a ' .. type(v))
  end
end

function M.describe(value)
  local out = {}
  dump(value, 0, out)
  return table.concat(out)
end

---------------------------------------------------------------------------------------------------
-- Files

-- The cache files of a description: description.txt and one .npy per name.
function M.paths(dir, description, class, split, names)
  local base = pio.join(dir, M.md5(description) .. '-' .. class .. '-' .. split .. '-')
  local out = { description = base .. 'description.txt' }
  for _, name in ipairs(names) do out[name] = base .. name .. '.npy' end
  return out
end

-- The parsed descriptions of one class and split in dir, whatever their hash (so a cache whose
-- description differs only in what does not shape the indices, such as the tokenizer, is found).
function M.descriptions(dir, class, split)
  local out = {}
  if not pio.is_dir(dir) then return out end
  local suffix = '%-' .. class .. '%-' .. split .. '%-description%.txt$'
  local names = pio.listdir(dir)
  table.sort(names)
  for _, name in ipairs(names) do
    if name:match('^%x+' .. suffix) then
      local path = pio.join(dir, name)
      local ok, fields = pcall(json.decode, pio.read_file(path))
      if ok and type(fields) == 'table' then
        out[#out + 1] = { path = path, base = path:sub(1, -#'description.txt' - 1), fields = fields }
      end
    end
  end
  return out
end

local NPY_MAGIC = '\147NUMPY\1\0'

-- numpy.save's header for a C-order array: the dict padded with spaces to a multiple of 64 bytes.
local function npy_header(descr, shape)
  local dims = #shape == 1 and string.format('(%d,)', shape[1]) or string.format('(%d, %d)', shape[1], shape[2])
  local dict = string.format("{'descr': '%s', 'fortran_order': False, 'shape': %s, }", descr, dims)
  local total = 10 + #dict + 1
  local pad = (64 - total % 64) % 64
  local header = dict .. string.rep(' ', pad) .. '\n'
  return NPY_MAGIC .. string.char(#header % 256, math.floor(#header / 256)) .. header
end

function M.write_npy(path, descr, shape, ptr, nbytes)
  pio.write_atomic(path, function(w)
    w:write(npy_header(descr, shape))
    if nbytes > 0 then w:write(ptr, nbytes) end
  end)
end

-- Maps an .npy file; returns (mapping, data pointer) when its header is exactly descr/shape.
function M.map_npy(path, descr, shape)
  local m = C.pmp_map_file(path)
  if m == nil then return nil end
  local size = tonumber(C.pmp_mapping_size(m))
  local base = ffi.cast('const uint8_t *', C.pmp_mapping_data(m))
  local expect = npy_header(descr, shape)
  local elem = tonumber(descr:sub(3))
  local count = shape[1] * (shape[2] or 1)
  if size ~= #expect + count * elem or ffi.string(base, #expect) ~= expect then
    C.pmp_mapping_release(m)
    return nil
  end
  return ffi.gc(m, C.pmp_mapping_release), base + #expect
end

return M
