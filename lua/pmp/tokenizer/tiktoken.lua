-- tiktoken-format BPE files: lines of "base64-token rank" (Qwen 1's qwen.tiktoken), encoded as the
-- `tiktoken` package encodes them: special tokens are cut out of the text first (all of them are
-- allowed, as Qwen's tokenizer allows them), the rest is split with the regex and each piece is
-- byte-pair merged by rank (core/tokenizer/tokenizer_tiktoken.c); an ordinary token's id is its rank.
-- The ranks file carries neither regex nor special tokens: they come from a preset, chosen by the
-- file name (qwen.tiktoken -> 'qwen') or given as opts.preset / opts.pattern + opts.special_tokens.
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local shared = require 'pmp.tokenizer.shared'

local M = {}
local Tokenizer = {}
Tokenizer.__index = Tokenizer
M.Tokenizer = Tokenizer

local function last_error() return ffi.string(C.pmp_last_error()) end

-- Qwen 1 (tokenization_qwen.py): its split regex, and its 208 special tokens from id 151643 on
-- whatever the ranks file holds. Its tokenizer NFC-normalizes text first.
local function qwen_preset()
  local specials = { '<|endoftext|>', '<|im_start|>', '<|im_end|>' }
  for i = 0, 204 do specials[#specials + 1] = '<|extra_' .. i .. '|>' end
  local ids = {}
  for i, name in ipairs(specials) do ids[name] = 151643 + i - 1 end
  return {
    pattern = [[(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+]],
    special_tokens = ids, nfc = true, eos_token = '<|endoftext|>', pad_token = '<|endoftext|>',
  }
end
M.presets = { qwen = qwen_preset }

--- Which preset a ranks file's name implies (nil when none).
function M.preset_for(path)
  local name = path:match('([^/]+)$')
  if name == 'qwen.tiktoken' then return 'qwen' end
  return nil
end

--- Builds a tokenizer from the text of a ranks file. opts.path names the file in errors; opts.preset
--- ('qwen') or opts.pattern and opts.special_tokens ({text = id}) give the rest.
function M.from_bytes(data, opts)
  opts = opts or {}
  local path = opts.path or 'ranks.tiktoken'
  local function where(msg) return 'pmp.tokenizer: ' .. path .. ': ' .. msg end
  local preset = opts.preset or M.preset_for(path)
  local spec
  if preset then
    if not M.presets[preset] then error(where("unknown tiktoken preset '" .. tostring(preset) .. "'"), 0) end
    spec = M.presets[preset]()
  elseif opts.pattern then
    spec = { pattern = opts.pattern, special_tokens = opts.special_tokens or {} }
  else
    error(where('a tiktoken ranks file holds no split regex: name a preset (qwen) or pass pattern'), 0)
  end
  local t = C.pmp_tok_tiktoken_new(spec.pattern, #spec.pattern)
  if t == nil then error(where('split regex: ' .. last_error()), 0) end
  t = ffi.gc(t, C.pmp_tok_tiktoken_free)
  if C.pmp_tok_tiktoken_load(t, data, #data) ~= 0 then error(where(last_error()), 0) end
  local self = setmetatable({ path = path, _t = t, _nfc = spec.nfc == true, preset = preset }, Tokenizer)
  self._out = ffi.gc(C.pmp_tok_ids_new(), C.pmp_tok_ids_free)
  self._special_by_id, self._special = {}, spec.special_tokens
  local split = ffi.gc(C.pmp_tok_added_new(), C.pmp_tok_added_free)
  local max_id = C.pmp_tok_tiktoken_size(t) - 1
  for name, id in pairs(spec.special_tokens) do
    if C.pmp_tok_tiktoken_token(t, id, ffi.new('int64_t[1]')) ~= nil then
      error(where('special token ' .. name .. ' has id ' .. id .. ', which the ranks file gives to a token'), 0)
    end
    if C.pmp_tok_added_add(split, name, #name, id, 0, 0, 0) ~= 0 then error(where(last_error()), 0) end
    self._special_by_id[id] = name
    if id > max_id then max_id = id end
  end
  self._split = C.pmp_tok_added_count(split) > 0 and split or nil
  self.vocab_size = max_id + 1
  self.eos_token = spec.eos_token
  self.eos_id = spec.eos_token and spec.special_tokens[spec.eos_token]
  self.pad_token = spec.pad_token
  self.pad_id = spec.pad_token and spec.special_tokens[spec.pad_token]
  self.add_bos_token, self.add_eos_token = false, false
  return self
end

-- ---- encoding ----

local count_box = ffi.new('int64_t[1]')

local function ordinary(self, s, ids)
  local out = self._out
  out.len = 0
  if C.pmp_tok_tiktoken_encode_ordinary(self._t, s, #s, out) ~= 0 then
    error('pmp.tokenizer: ' .. self.path .. ': encode: ' .. last_error(), 0)
  end
  local data = out.data
  for i = 0, tonumber(out.len) - 1 do ids[#ids + 1] = data[i] end
end

--- tok:encode(text, {add_special_tokens, add_eos =}) -> ids. Special tokens in the text are
--- recognised (tiktoken's allowed_special='all'); opts.split_special_tokens = true treats them as text.
function Tokenizer:encode(text, opts)
  shared.check_text(text, 'encode')
  opts = opts or {}
  if self._nfc then text = ffi.string(C.pmp_tok_normalize(text, #text, 0, count_box), count_box[0]) end
  local ids = {}
  if not self._split or opts.split_special_tokens then
    ordinary(self, text, ids)
  else
    for _, sp in ipairs(shared.spans(self._split, text)) do
      if sp[3] >= 0 then ids[#ids + 1] = sp[3]
      elseif sp[2] > sp[1] then ordinary(self, text:sub(sp[1] + 1, sp[2]), ids) end
    end
  end
  if opts.add_eos and ids[#ids] ~= self.eos_id then
    if not self.eos_id then error('pmp.tokenizer: encode: add_eos asked for, but the tokenizer has no EOS token', 2) end
    ids[#ids + 1] = self.eos_id
  end
  return ids
end

Tokenizer.encode_batch = shared.encode_batch

-- ---- decoding ----

local len_box = ffi.new('int64_t[1]')

--- tok:decode(ids, {skip_special_tokens}) -> text; bytes that are not UTF-8 become U+FFFD, as
--- tiktoken's decode(errors='replace') gives them.
function Tokenizer:decode(ids, opts)
  if type(ids) ~= 'table' then error('pmp.tokenizer: decode expects a list of ids, got ' .. type(ids), 2) end
  local skip = opts ~= nil and opts.skip_special_tokens == true
  local parts = {}
  for i = 1, #ids do
    local id = tonumber(ids[i])
    local p = id and C.pmp_tok_tiktoken_token(self._t, id, len_box)
    if p ~= nil then
      parts[#parts + 1] = ffi.string(p, len_box[0])
    elseif id and self._special_by_id[id] then
      if not skip then parts[#parts + 1] = self._special_by_id[id] end
    else
      error('pmp.tokenizer: decode: ids[' .. i .. '] = ' .. tostring(ids[i]) .. ' is not a token id', 2)
    end
  end
  local s = table.concat(parts)
  return ffi.string(C.pmp_tok_utf8_lossy(s, #s, len_box), len_box[0])
end

Tokenizer.decode_batch = shared.decode_batch

-- ---- vocabulary ----

function Tokenizer:token_to_id(token)
  if type(token) ~= 'string' then return nil end
  if self._special[token] then return self._special[token] end
  local rank = C.pmp_tok_tiktoken_rank(self._t, token, #token)
  if rank >= 0 then return rank end
  return nil
end

--- The token of an id: its bytes (which need not be UTF-8), or the special token's text.
function Tokenizer:id_to_token(id)
  id = tonumber(id)
  if id == nil then return nil end
  local p = C.pmp_tok_tiktoken_token(self._t, id, len_box)
  if p ~= nil then return ffi.string(p, len_box[0]) end
  return self._special_by_id[id]
end

function Tokenizer:set_cache() end

function Tokenizer:__tostring()
  return string.format('TiktokenTokenizer(%s, vocab_size=%d)', self.path, self.vocab_size)
end

return M
