-- The parts of a tokenizer.json pipeline other than the model: normalizers, pre-tokenizer steps,
-- post-processors and decoders. Each builder takes the JSON object and a `where(key)` function that
-- turns a key path into an error prefix naming the file; anything malformed or unsupported raises a
-- Lua error through it.
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local json = require 'pmp.json'

local M = {}

local len_box = ffi.new('int64_t[2]')

local function last_error() return ffi.string(C.pmp_last_error()) end

local function is_null(v) return v == nil or v == json.null end

-- Reads an optional field with a type check.
local function field(obj, key, kind, default, where, path)
  local v = obj[key]
  if is_null(v) then return default end
  if type(v) ~= kind then
    error(where(path .. '.' .. key) .. 'expected a ' .. kind .. ', got ' .. (type(v) == 'table' and 'a table' or tostring(v)), 0)
  end
  return v
end
M.field = field

local function need_object(v, where, path)
  if type(v) ~= 'table' or v == json.null then error(where(path) .. 'expected an object', 0) end
  return v
end

local function need_list(v, where, path)
  if type(v) ~= 'table' or v == json.null or (next(v) ~= nil and v[1] == nil) then
    error(where(path) .. 'expected a list', 0)
  end
  return v
end

-- A {"String": s} or {"Regex": r} pattern.
local function pattern_of(obj, where, path)
  local p = need_object(obj.pattern, where, path .. '.pattern')
  if type(p.String) == 'string' then return p.String, true end
  if type(p.Regex) == 'string' then return p.Regex, false end
  error(where(path .. '.pattern') .. 'expected {"String": ...} or {"Regex": ...}', 0)
end

-- Wraps a C function that returns text in a per-thread buffer.
local function c_text(fn, ...)
  local extra = { ... }
  return function(s)
    local p
    if #extra == 0 then p = fn(s, #s, len_box) else p = fn(s, #s, extra[1], len_box) end
    if p == nil then error('pmp.tokenizer: ' .. last_error(), 0) end
    return ffi.string(p, len_box[0])
  end
end

-- ---- regex helpers (Replace normalizer and decoder) ----

local function compile(pattern, literal, where, path)
  local re = C.pmp_tok_regex_new(pattern, #pattern, literal and 1 or 0)
  if re == nil then error(where(path) .. last_error(), 0) end
  return ffi.gc(re, C.pmp_tok_regex_free)
end
M.compile = compile

-- Replaces every match of re in s (iterating as the reference does) by content.
local function regex_replace(re, s, content)
  local out, prev, last_end, last_match_end = {}, 0, 0, -1
  local n = #s
  while last_end <= n do
    local rc = C.pmp_tok_regex_find(re, s, n, last_end, len_box, len_box + 1)
    if rc < 0 then error('pmp.tokenizer: ' .. last_error(), 0) end
    if rc == 0 then break end
    local a, b = tonumber(len_box[0]), tonumber(len_box[1])
    if a == b and last_match_end == b then
      if last_end < n then
        local c = s:byte(last_end + 1)
        last_end = last_end + (c < 0x80 and 1 or c < 0xE0 and 2 or c < 0xF0 and 3 or 4)
      else
        last_end = last_end + 1
      end
    else
      last_end, last_match_end = b, b
      out[#out + 1] = s:sub(prev + 1, a)
      out[#out + 1] = content
      prev = b
    end
  end
  if prev == 0 then return s end
  out[#out + 1] = s:sub(prev + 1)
  return table.concat(out)
end

local function plain_replace(s, from, to)
  if from == '' then return s end
  local out, pos = {}, 1
  while true do
    local a, b = s:find(from, pos, true)
    if not a then break end
    out[#out + 1] = s:sub(pos, a - 1)
    out[#out + 1] = to
    pos = b + 1
  end
  if pos == 1 then return s end
  out[#out + 1] = s:sub(pos)
  return table.concat(out)
end
M.plain_replace = plain_replace

local function replacer(obj, where, path)
  local pattern, literal = pattern_of(obj, where, path)
  local content = field(obj, 'content', 'string', nil, where, path)
  if content == nil then error(where(path .. '.content') .. 'missing', 0) end
  if literal then return function(s) return plain_replace(s, pattern, content) end end
  local re = compile(pattern, false, where, path .. '.pattern.Regex')
  return function(s) return regex_replace(re, s, content) end
end

-- ---- byte-level character tables ----

local byte_to_char, char_to_byte = {}, {}
for b = 0, 255 do
  local cp = C.pmp_tok_byte_to_unicode(b)
  local ch = cp < 0x80 and string.char(cp) or string.char(0xC0 + bit.rshift(cp, 6), 0x80 + bit.band(cp, 0x3F))
  byte_to_char[b] = ch
  char_to_byte[ch] = string.char(b)
end
M.byte_to_char, M.char_to_byte = byte_to_char, char_to_byte

-- ---- normalizers: each is a function(string) -> string ----

local normalizer_builders = {}

local function build_normalizer(obj, where, path)
  need_object(obj, where, path)
  local kind = obj.type
  if type(kind) ~= 'string' then error(where(path .. '.type') .. 'missing normalizer type', 0) end
  local builder = normalizer_builders[kind]
  if not builder then error(where(path .. '.type') .. "unsupported normalizer type '" .. kind .. "'", 0) end
  return builder(obj, where, path)
end

local function nf(form)
  local f = c_text(C.pmp_tok_normalize, form)
  return function()
    return function(s)
      if not s:find('[\128-\255]') then return s end
      return f(s)
    end
  end
end
normalizer_builders.NFC = nf(0)
normalizer_builders.NFD = nf(1)
normalizer_builders.NFKC = nf(2)
normalizer_builders.NFKD = nf(3)
normalizer_builders.Lowercase = function() return c_text(C.pmp_tok_lowercase) end
normalizer_builders.StripAccents = function() return c_text(C.pmp_tok_strip_accents) end
normalizer_builders.Strip = function(obj, where, path)
  local left = field(obj, 'strip_left', 'boolean', true, where, path)
  local right = field(obj, 'strip_right', 'boolean', true, where, path)
  local box = ffi.new('int64_t[2]')
  return function(s)
    C.pmp_tok_strip_space(s, #s, left and 1 or 0, right and 1 or 0, box, box + 1)
    return s:sub(tonumber(box[0]) + 1, tonumber(box[1]))
  end
end
normalizer_builders.Prepend = function(obj, where, path)
  local prefix = field(obj, 'prepend', 'string', nil, where, path)
  if prefix == nil then error(where(path .. '.prepend') .. 'missing', 0) end
  return function(s) if s == '' then return s end return prefix .. s end
end
normalizer_builders.Replace = function(obj, where, path) return replacer(obj, where, path) end
normalizer_builders.ByteLevel = function()
  return function(s) return (s:gsub('.', function(c) return byte_to_char[c:byte()] end)) end
end
normalizer_builders.Sequence = function(obj, where, path)
  local list = need_list(obj.normalizers, where, path .. '.normalizers')
  local fns = {}
  for i, sub in ipairs(list) do fns[i] = build_normalizer(sub, where, path .. '.normalizers[' .. (i - 1) .. ']') end
  if #fns == 0 then return nil end
  if #fns == 1 then return fns[1] end
  return function(s)
    for i = 1, #fns do s = fns[i](s) end
    return s
  end
end

-- nil when the normalizer does nothing.
function M.normalizer(obj, where)
  if is_null(obj) then return nil end
  return build_normalizer(obj, where, 'normalizer')
end

-- ---- pre-tokenizers: flattened into a list of steps for the C pipeline ----

local behaviors = { Removed = 0, Isolated = 1, MergedWithPrevious = 2, MergedWithNext = 3, Contiguous = 4 }
-- These follow the reference's character tests: Unicode White_Space, numeric, and punctuation
-- (ASCII punctuation or a P* category).
local PUNCT = '[\\p{P}!-/:-@\\[-`{-~]'

local function split_step(pattern, literal, behavior, invert)
  return { kind = 'split', pattern = pattern, literal = literal, behavior = behavior, invert = invert }
end

local function flatten_pre(obj, where, path, steps)
  need_object(obj, where, path)
  local kind = obj.type
  if type(kind) ~= 'string' then error(where(path .. '.type') .. 'missing pre-tokenizer type', 0) end
  if kind == 'Sequence' then
    local list = need_list(obj.pretokenizers, where, path .. '.pretokenizers')
    for i, sub in ipairs(list) do flatten_pre(sub, where, path .. '.pretokenizers[' .. (i - 1) .. ']', steps) end
  elseif kind == 'Split' then
    local pattern, literal = pattern_of(obj, where, path)
    local b = field(obj, 'behavior', 'string', nil, where, path)
    if b == nil or behaviors[b] == nil then
      error(where(path .. '.behavior') .. 'expected one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous', 0)
    end
    local st = split_step(pattern, literal, behaviors[b], field(obj, 'invert', 'boolean', false, where, path))
    st.path = path .. (literal and '.pattern.String' or '.pattern.Regex')
    steps[#steps + 1] = st
  elseif kind == 'ByteLevel' then
    steps[#steps + 1] = {
      kind = 'byte_level', path = path,
      add_prefix_space = field(obj, 'add_prefix_space', 'boolean', true, where, path),
      use_regex = field(obj, 'use_regex', 'boolean', true, where, path),
    }
  elseif kind == 'Metaspace' then
    local rep = field(obj, 'replacement', 'string', '\u{2581}', where, path)
    local scheme = field(obj, 'prepend_scheme', 'string', 'always', where, path)
    local schemes = { always = 0, first = 1, never = 2 }
    if schemes[scheme] == nil then error(where(path .. '.prepend_scheme') .. 'expected always, first or never', 0) end
    if obj.add_prefix_space == false then
      if scheme ~= 'never' and obj.prepend_scheme ~= nil then
        error(where(path .. '.add_prefix_space') .. 'does not match the declared prepend_scheme', 0)
      end
      scheme = 'never'
    end
    steps[#steps + 1] = {
      kind = 'metaspace', path = path, replacement = rep, prepend_scheme = schemes[scheme],
      split = field(obj, 'split', 'boolean', true, where, path),
    }
  elseif kind == 'Whitespace' then
    steps[#steps + 1] = split_step('\\w+|[^\\w\\s]+', false, behaviors.Removed, true)
  elseif kind == 'WhitespaceSplit' then
    steps[#steps + 1] = split_step('\\s', false, behaviors.Removed, false)
  elseif kind == 'Digits' then
    local individual = field(obj, 'individual_digits', 'boolean', false, where, path)
    steps[#steps + 1] = split_step('\\p{N}', false, individual and behaviors.Isolated or behaviors.Contiguous, false)
  elseif kind == 'Punctuation' then
    local b = field(obj, 'behavior', 'string', 'Isolated', where, path)
    if behaviors[b] == nil then error(where(path .. '.behavior') .. 'unknown behavior ' .. b, 0) end
    steps[#steps + 1] = split_step(PUNCT, false, behaviors[b], false)
  elseif kind == 'BertPreTokenizer' then
    steps[#steps + 1] = split_step('\\s', false, behaviors.Removed, false)
    steps[#steps + 1] = split_step(PUNCT, false, behaviors.Isolated, false)
  elseif kind == 'CharDelimiterSplit' then
    local d = field(obj, 'delimiter', 'string', nil, where, path)
    if d == nil then error(where(path .. '.delimiter') .. 'missing', 0) end
    steps[#steps + 1] = split_step(d, true, behaviors.Removed, false)
  else
    error(where(path .. '.type') .. "unsupported pre-tokenizer type '" .. kind .. "'", 0)
  end
end

-- The flattened steps ({} when there is no pre-tokenizer).
function M.pre_steps(obj, where)
  local steps = {}
  if not is_null(obj) then flatten_pre(obj, where, 'pre_tokenizer', steps) end
  return steps
end

-- Builds the C pipeline. byte_level_model: the model keys raw bytes, so the last ByteLevel step
-- does not map bytes to characters.
function M.build_pipeline(steps, byte_level_model, where)
  local p = C.pmp_tok_pre_new()
  if p == nil then error(where('pre_tokenizer') .. last_error(), 0) end
  p = ffi.gc(p, C.pmp_tok_pre_free)
  for i, st in ipairs(steps) do
    local rc
    if st.kind == 'split' then
      rc = C.pmp_tok_pre_add_split(p, st.pattern, #st.pattern, st.literal and 1 or 0, st.behavior, st.invert and 1 or 0)
    elseif st.kind == 'byte_level' then
      local map = not (byte_level_model and i == #steps)
      rc = C.pmp_tok_pre_add_byte_level(p, st.add_prefix_space and 1 or 0, st.use_regex and 1 or 0, map and 1 or 0)
    else
      rc = C.pmp_tok_pre_add_metaspace(p, st.replacement, #st.replacement, st.prepend_scheme, st.split and 1 or 0)
    end
    if rc ~= 0 then error(where(st.path or 'pre_tokenizer') .. last_error(), 0) end
  end
  return p
end

-- ---- post-processors: function(ids, add_special_tokens) -> ids ----

local function template_piece(item, where, path)
  need_object(item, where, path)
  if item.SpecialToken then
    local id = item.SpecialToken.id
    if type(id) ~= 'string' then error(where(path .. '.SpecialToken.id') .. 'expected a string', 0) end
    return { special = id }
  elseif item.Sequence then
    local id = item.Sequence.id
    if id ~= 'A' and id ~= 'B' then error(where(path .. '.Sequence.id') .. 'expected "A" or "B"', 0) end
    return { sequence = id }
  end
  error(where(path) .. 'expected {"SpecialToken": ...} or {"Sequence": ...}', 0)
end

local processor_builders = {}
processor_builders.TemplateProcessing = function(obj, where, path)
  local single = need_list(obj.single, where, path .. '.single')
  local specials = need_object(obj.special_tokens or {}, where, path .. '.special_tokens')
  local before, after, seen = {}, {}, false
  for i, item in ipairs(single) do
    local piece = template_piece(item, where, path .. '.single[' .. (i - 1) .. ']')
    if piece.sequence then
      if piece.sequence ~= 'A' then error(where(path .. '.single') .. 'a single template uses only $A', 0) end
      seen = true
    else
      local sp = specials[piece.special]
      if type(sp) ~= 'table' or type(sp.ids) ~= 'table' then
        error(where(path .. '.special_tokens') .. "no entry for '" .. piece.special .. "'", 0)
      end
      local dst = seen and after or before
      for _, id in ipairs(sp.ids) do
        if type(id) ~= 'number' then error(where(path .. '.special_tokens.' .. piece.special .. '.ids') .. 'expected numbers', 0) end
        dst[#dst + 1] = id
      end
    end
  end
  return { before = before, after = after }
end
local function cls_sep(obj, where, path)
  local function pair(key)
    local v = obj[key]
    if type(v) ~= 'table' or type(v[2]) ~= 'number' then error(where(path .. '.' .. key) .. 'expected [token, id]', 0) end
    return v[2]
  end
  return { before = { pair('cls') }, after = { pair('sep') } }
end
processor_builders.BertProcessing = cls_sep
processor_builders.RobertaProcessing = cls_sep
processor_builders.ByteLevel = function() return { before = {}, after = {} } end

local function build_processor(obj, where, path, out)
  need_object(obj, where, path)
  local kind = obj.type
  if kind == 'Sequence' then
    local list = need_list(obj.processors, where, path .. '.processors')
    for i, sub in ipairs(list) do build_processor(sub, where, path .. '.processors[' .. (i - 1) .. ']', out) end
    return
  end
  local builder = type(kind) == 'string' and processor_builders[kind]
  if not builder then error(where(path .. '.type') .. "unsupported post-processor type '" .. tostring(kind) .. "'", 0) end
  local r = builder(obj, where, path)
  -- processors applied in sequence wrap the ids: later ones go outside
  for i = #r.before, 1, -1 do table.insert(out.before, 1, r.before[i]) end
  for _, id in ipairs(r.after) do out.after[#out.after + 1] = id end
end

-- {before = {ids}, after = {ids}} added around the encoding when add_special_tokens.
function M.post_processor(obj, where)
  local out = { before = {}, after = {} }
  if not is_null(obj) then build_processor(obj, where, 'post_processor', out) end
  return out
end

-- ---- decoders: function(list of token strings) -> list of strings ----

local decoder_builders = {}

local function build_decoder(obj, where, path)
  need_object(obj, where, path)
  local kind = obj.type
  local builder = type(kind) == 'string' and decoder_builders[kind]
  if not builder then error(where(path .. '.type') .. "unsupported decoder type '" .. tostring(kind) .. "'", 0) end
  return builder(obj, where, path)
end

local lossy = c_text(C.pmp_tok_utf8_lossy)

decoder_builders.ByteLevel = function()
  local cache = {}   -- token string -> bytes (bounded by the vocabulary)
  local function bytes_of(tok)
    local b = cache[tok]
    if b then return b end
    local ok = true
    b = tok:gsub('[%z\1-\127\192-\255][\128-\191]*', function(ch)
      local r = char_to_byte[ch]
      if not r then ok = false end
      return r
    end)
    if not ok then b = tok end
    cache[tok] = b
    return b
  end
  return function(tokens)
    local parts = {}
    for i = 1, #tokens do parts[i] = bytes_of(tokens[i]) end
    local s = table.concat(parts)
    if C.pmp_tok_utf8_check(s, #s) >= 0 then s = lossy(s) end
    return { s }
  end
end

decoder_builders.Metaspace = function(obj, where, path)
  local rep = field(obj, 'replacement', 'string', '\u{2581}', where, path)
  local scheme = field(obj, 'prepend_scheme', 'string', 'always', where, path)
  if obj.add_prefix_space == false then scheme = 'never' end
  return function(tokens)
    local out = {}
    for i, tok in ipairs(tokens) do
      out[i] = plain_replace(tok, rep, (i == 1 and scheme ~= 'never') and '' or ' ')
    end
    return out
  end
end

decoder_builders.Replace = function(obj, where, path)
  local f = replacer(obj, where, path)
  return function(tokens)
    local out = {}
    for i, tok in ipairs(tokens) do out[i] = f(tok) end
    return out
  end
end

decoder_builders.ByteFallback = function()
  local function flush(bytes, out)
    if #bytes == 0 then return end
    local chars = {}
    for i = 1, #bytes do chars[i] = string.char(bytes[i]) end
    local s = table.concat(chars)
    if C.pmp_tok_utf8_check(s, #s) < 0 then
      out[#out + 1] = s
    else
      for _ = 1, #bytes do out[#out + 1] = '\u{FFFD}' end
    end
    for i = #bytes, 1, -1 do bytes[i] = nil end
  end
  return function(tokens)
    local out, bytes = {}, {}
    for _, tok in ipairs(tokens) do
      local hex = #tok == 6 and tok:match('^<0x(%x%x)>$')
      if hex then
        bytes[#bytes + 1] = tonumber(hex, 16)
      else
        flush(bytes, out)
        out[#out + 1] = tok
      end
    end
    flush(bytes, out)
    return out
  end
end

decoder_builders.Fuse = function()
  return function(tokens) return { table.concat(tokens) } end
end

decoder_builders.Strip = function(obj, where, path)
  local content = field(obj, 'content', 'string', ' ', where, path)
  local start = field(obj, 'start', 'number', 0, where, path)
  local stop = field(obj, 'stop', 'number', 0, where, path)
  return function(tokens)
    local out = {}
    for i, tok in ipairs(tokens) do
      local chars = {}
      for ch in tok:gmatch('[%z\1-\127\192-\255][\128-\191]*') do chars[#chars + 1] = ch end
      local a, b = 1, #chars
      for k = 1, math.min(start, #chars) do
        if chars[k] == content then a = k + 1 else break end
      end
      for k = 0, stop - 1 do
        local idx = #chars - k
        if idx < 1 or chars[idx] ~= content then break end
        b = idx - 1
      end
      out[i] = table.concat(chars, '', a, math.max(b, a - 1))
    end
    return out
  end
end

decoder_builders.BPEDecoder = function(obj, where, path)
  local suffix = field(obj, 'suffix', 'string', '</w>', where, path)
  return function(tokens)
    local out = {}
    for i, tok in ipairs(tokens) do out[i] = plain_replace(tok, suffix, i == #tokens and '' or ' ') end
    return out
  end
end

decoder_builders.Sequence = function(obj, where, path)
  local list = need_list(obj.decoders, where, path .. '.decoders')
  local fns = {}
  for i, sub in ipairs(list) do fns[i] = build_decoder(sub, where, path .. '.decoders[' .. (i - 1) .. ']') end
  return function(tokens)
    for i = 1, #fns do tokens = fns[i](tokens) end
    return tokens
  end
end

-- function(list of token strings) -> string; nil when the file has no decoder.
function M.decoder(obj, where)
  if is_null(obj) then return nil end
  local chain = build_decoder(obj, where, 'decoder')
  return function(tokens) return table.concat(chain(tokens)) end
end

return M
