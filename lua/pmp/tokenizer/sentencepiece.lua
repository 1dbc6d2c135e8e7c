-- SentencePiece tokenizer.model files (a protobuf ModelProto), read natively and run as the
-- `sentencepiece` library runs them: the normalizer the file carries (precompiled charsmap such as
-- nmt_nfkc, add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces), the BPE or Unigram model,
-- user-defined pieces, byte fallback (<0xNN> pieces). The C side (core/tokenizer/tokenizer_spm.c) does
-- the per-character work; this file reads the protobuf and applies transformers' LlamaTokenizer rules
-- when tokenizer_config.json names that class (or Baichuan's, which has the legacy ones):
--   legacy = true   every stretch of text between special tokens gets the dummy prefix;
--   legacy = false  only the text's start does (after U+2581 -> space), and a stretch that starts with
--                   a space is encoded as if it followed other text.
-- Without a Llama config, encode gives what SentencePieceProcessor.encode gives (special tokens are
-- plain text; add_bos_token / add_eos_token from tokenizer_config.json are honoured).
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local shared = require 'pmp.tokenizer.shared'
local pb = require 'pmp.tokenizer.protobuf'
local json = require 'pmp.json'

local M = {}
local Tokenizer = {}
Tokenizer.__index = Tokenizer
M.Tokenizer = Tokenizer

local PIECE_TYPES = { 'normal', 'unknown', 'control', 'user_defined', 'unused', 'byte' }
local MODEL_TYPES = { [1] = 'unigram', [2] = 'bpe', [3] = 'word', [4] = 'char' }
local SPACE_SYMBOL = '\226\150\129'   -- U+2581
-- tokenizer_class values whose tokenizers follow LlamaTokenizer's rules; 'legacy': only its legacy ones
-- (Baichuan's own tokenizer class encodes every stretch between special tokens with sentencepiece).
local LLAMA_CLASSES = { LlamaTokenizer = true, LlamaTokenizerFast = true, CodeLlamaTokenizer = true,
  CodeLlamaTokenizerFast = true, BaichuanTokenizer = 'legacy' }

local function last_error() return ffi.string(C.pmp_last_error()) end
local function is_null(v) return v == nil or v == json.null end

-- ---- ModelProto ----

local function parse_piece(s, r, fail)
  local piece = { score = 0, type = 1 }
  for number, wire, value, at in pb.fields(s, r.first, r.last, fail) do
    if number == 1 then
      pb.expect(wire, pb.LEN, number, at, fail, 'SentencePiece.piece')
      piece.piece = s:sub(value.first, value.last)
    elseif number == 2 then
      pb.expect(wire, pb.FIXED32, number, at, fail, 'SentencePiece.score')
      piece.score = pb.float32(value)
    elseif number == 3 then
      pb.expect(wire, pb.VARINT, number, at, fail, 'SentencePiece.type')
      piece.type = value
    end
  end
  return piece
end

-- The fields of a sub-message that matter here: numbers -> {name, kind} with kind 'bool', 'int' or 'bytes'.
local TRAINER_FIELDS = { [3] = { 'model_type', 'int' }, [24] = { 'treat_whitespace_as_suffix', 'bool' },
  [35] = { 'byte_fallback', 'bool' }, [44] = { 'unk_surface', 'bytes' } }
local NORMALIZER_FIELDS = { [1] = { 'name', 'bytes' }, [2] = { 'precompiled_charsmap', 'bytes' },
  [3] = { 'add_dummy_prefix', 'bool' }, [4] = { 'remove_extra_whitespaces', 'bool' },
  [5] = { 'escape_whitespaces', 'bool' } }

local function parse_spec(s, r, known, out, fail, what)
  for number, wire, value, at in pb.fields(s, r.first, r.last, fail) do
    local f = known[number]
    if f then
      local kind = f[2]
      pb.expect(wire, kind == 'bytes' and pb.LEN or pb.VARINT, number, at, fail, what .. '.' .. f[1])
      if kind == 'bytes' then out[f[1]] = s:sub(value.first, value.last)
      elseif kind == 'bool' then out[f[1]] = value ~= 0
      else out[f[1]] = value end
    end
  end
  return out
end

--- Parses the bytes of a tokenizer.model; path names the file in errors.
function M.parse(s, path)
  local function fail(offset, msg)
    error(string.format('pmp.tokenizer: %s: byte %d: %s', path, offset, msg), 0)
  end
  local model = {
    pieces = {},
    trainer = { model_type = 1, treat_whitespace_as_suffix = false, byte_fallback = false, unk_surface = ' \226\129\135 ' },
    normalizer = { name = '', precompiled_charsmap = '', add_dummy_prefix = true, remove_extra_whitespaces = true,
      escape_whitespaces = true },
    denormalizer = { precompiled_charsmap = '' },
  }
  for number, wire, value, at in pb.fields(s, 1, #s, fail) do
    if number == 1 then
      pb.expect(wire, pb.LEN, number, at, fail, 'ModelProto.pieces')
      local piece = parse_piece(s, value, fail)
      if not piece.piece then fail(at, 'piece ' .. #model.pieces .. ' has no text') end
      model.pieces[#model.pieces + 1] = piece
    elseif number == 2 then
      pb.expect(wire, pb.LEN, number, at, fail, 'ModelProto.trainer_spec')
      parse_spec(s, value, TRAINER_FIELDS, model.trainer, fail, 'trainer_spec')
    elseif number == 3 then
      pb.expect(wire, pb.LEN, number, at, fail, 'ModelProto.normalizer_spec')
      parse_spec(s, value, NORMALIZER_FIELDS, model.normalizer, fail, 'normalizer_spec')
    elseif number == 5 then
      pb.expect(wire, pb.LEN, number, at, fail, 'ModelProto.denormalizer_spec')
      parse_spec(s, value, NORMALIZER_FIELDS, model.denormalizer, fail, 'denormalizer_spec')
    end
  end
  if #model.pieces == 0 then fail(#s, 'no pieces: not a SentencePiece model') end
  return model
end

-- ---- construction ----

local function build(model, path)
  local function where(msg) return 'pmp.tokenizer: ' .. path .. ': ' .. msg end
  local kind = MODEL_TYPES[model.trainer.model_type] or tostring(model.trainer.model_type)
  if kind ~= 'unigram' and kind ~= 'bpe' then
    error(where("trainer_spec.model_type is '" .. kind .. "' (pmp reads Unigram and BPE models)"), 0)
  end
  if model.trainer.treat_whitespace_as_suffix then
    error(where('trainer_spec.treat_whitespace_as_suffix is set, which pmp does not implement'), 0)
  end
  local m = C.pmp_tok_spm_new(model.trainer.model_type, model.trainer.byte_fallback and 1 or 0)
  if m == nil then error(where(last_error()), 0) end
  m = ffi.gc(m, C.pmp_tok_spm_free)
  for i, p in ipairs(model.pieces) do
    if C.pmp_tok_spm_add_piece(m, p.piece, #p.piece, p.score, p.type) ~= 0 then error(where(last_error()), 0) end
    p.kind = PIECE_TYPES[p.type]
    p.id = i - 1
  end
  local norm = model.normalizer
  C.pmp_tok_spm_set_normalizer(m, norm.add_dummy_prefix and 1 or 0, norm.remove_extra_whitespaces and 1 or 0,
    norm.escape_whitespaces and 1 or 0)
  if C.pmp_tok_spm_set_charsmap(m, norm.precompiled_charsmap, #norm.precompiled_charsmap) ~= 0 then
    error(where('normalizer_spec (' .. norm.name .. '): ' .. last_error()), 0)
  end
  if C.pmp_tok_spm_finish(m) ~= 0 then error(where(last_error()), 0) end
  return m
end

local function token_name(v)
  if type(v) == 'string' then return v end
  if type(v) == 'table' and type(v.content) == 'string' then return v.content end
end

--- Builds a tokenizer from the bytes of a tokenizer.model. opts.path names the file in errors;
--- opts.config is the decoded tokenizer_config.json (optional), opts.config_path its name in errors.
function M.from_bytes(bytes, opts)
  opts = opts or {}
  local path = opts.path or 'tokenizer.model'
  local model = M.parse(bytes, path)
  local self = setmetatable({ path = path, _model = model, _spm = build(model, path) }, Tokenizer)
  self._out = ffi.gc(C.pmp_tok_ids_new(), C.pmp_tok_ids_free)
  self._pieces, self._by_piece = model.pieces, {}
  for _, p in ipairs(model.pieces) do
    self._by_piece[p.piece] = p.id
    if p.kind == 'unknown' then self.unk_id, self.unk_token = p.id, p.piece end
  end
  self.vocab_size = #model.pieces
  self.model_type = MODEL_TYPES[model.trainer.model_type]

  local config = opts.config or {}
  local rules = LLAMA_CLASSES[config.tokenizer_class]
  local llama = rules ~= nil
  self.llama = llama
  self.legacy = llama and (rules == 'legacy' or config.legacy ~= false)
  self.add_prefix_space = config.add_prefix_space ~= false
  self.add_bos_token = config.add_bos_token == true or (llama and config.add_bos_token == nil)
  self.add_eos_token = config.add_eos_token == true
  local function special(key, default)
    local name = token_name(config[key])
    if name == nil then name = default end
    if name == nil then return nil, nil end
    return name, self:token_to_id(name)
  end
  -- the library's own names (trainer_spec bos/eos pieces are <s> and </s> unless set otherwise)
  local bos_default = self._by_piece['<s>'] and '<s>' or nil
  local eos_default = self._by_piece['</s>'] and '</s>' or nil
  if not is_null(config.added_tokens_decoder) then
    -- tokens transformers adds beyond (or over) the model's pieces, by id
    local where = 'pmp.tokenizer: ' .. (opts.config_path or 'tokenizer_config.json') .. ': added_tokens_decoder'
    if type(config.added_tokens_decoder) ~= 'table' then error(where .. ': expected an object', 0) end
    self._added, self._added_by_content = {}, {}
    for key, t in pairs(config.added_tokens_decoder) do
      local id = tonumber(key)
      if not id or id < 0 or id ~= math.floor(id) then error(where .. ": key '" .. tostring(key) .. "' is not a token id", 0) end
      if type(t) ~= 'table' or type(t.content) ~= 'string' then error(where .. '.' .. key .. ': expected {"content": ...}', 0) end
      self._added[id], self._added_by_content[t.content] = t.content, id
      if id >= self.vocab_size then self.vocab_size = id + 1 end
    end
  end
  self.bos_token, self.bos_id = special('bos_token', bos_default)
  self.eos_token, self.eos_id = special('eos_token', eos_default)
  self.pad_token, self.pad_id = special('pad_token', nil)
  if llama then self:_build_special_split() end
  return self
end

-- Llama mode: special tokens (unk, bos, eos and the config's added tokens) are cut out of the text.
function Tokenizer:_build_special_split()
  local trie = ffi.gc(C.pmp_tok_added_new(), C.pmp_tok_added_free)
  local seen = {}
  local function add(name)
    if not name or seen[name] then return end
    local id = self:token_to_id(name)
    if not id then return end
    seen[name] = true
    if C.pmp_tok_added_add(trie, name, #name, id, 0, 0, 0) ~= 0 then error('pmp.tokenizer: ' .. last_error(), 0) end
  end
  add(self.unk_token); add(self.bos_token); add(self.eos_token)
  if self._added then
    local ids = {}
    for id in pairs(self._added) do ids[#ids + 1] = id end
    table.sort(ids)
    for _, id in ipairs(ids) do add(self._added[id]) end
  end
  self._special_split, self._special = trie, seen
end

-- ---- encoding ----

local char_ptr = ffi.typeof('const char *')
local count_box = ffi.new('int64_t[1]')

local check_text = shared.check_text

-- Appends the ids of s to self._out; dummy: whether to add the dummy prefix.
local function spm_encode(self, s, dummy)
  if C.pmp_tok_spm_encode(self._spm, s, #s, dummy and 1 or 0, self._out) ~= 0 then
    error('pmp.tokenizer: ' .. self.path .. ': encode: ' .. last_error(), 0)
  end
end

local function take(self, ids, from)
  local out, data = self._out, self._out.data
  for i = from, tonumber(out.len) - 1 do ids[#ids + 1] = data[i] end
  out.len = 0
end

-- One stretch of text between special tokens, Llama rules.
local function llama_chunk(self, chunk, ids)
  if self.legacy then
    spm_encode(self, chunk, self._model.normalizer.add_dummy_prefix)
    return take(self, ids, 0)
  end
  if chunk:sub(1, 1) ~= ' ' and chunk:sub(1, 3) ~= SPACE_SYMBOL then
    spm_encode(self, chunk, false)
    return take(self, ids, 0)
  end
  -- as if the chunk followed other text: encode it after the unknown token's text, then drop that
  spm_encode(self, self.unk_token, false)
  local skip = tonumber(self._out.len)
  self._out.len = 0
  spm_encode(self, self.unk_token .. chunk, false)
  if tonumber(self._out.len) < skip then skip = 0 end
  take(self, ids, skip)
end

local function llama_encode(self, text)
  local ids = {}
  if text == '' then return ids end
  if not self.legacy then
    text = text:gsub(SPACE_SYMBOL, ' ')
    if self.add_prefix_space then text = SPACE_SYMBOL .. text end
  end
  for _, sp in ipairs(shared.spans(self._special_split, text)) do
    if sp[3] >= 0 then ids[#ids + 1] = sp[3]
    elseif sp[2] > sp[1] then llama_chunk(self, text:sub(sp[1] + 1, sp[2]), ids) end
  end
  -- a lone prefix space before a special token at the start goes, as transformers drops it
  if not self.legacy and #ids > 1 and self:id_to_token(ids[1]) == SPACE_SYMBOL and self._special[self:id_to_token(ids[2])] then
    table.remove(ids, 1)
  end
  return ids
end

--- tok:encode(text, {add_special_tokens = true, add_bos =, add_eos =}) -> a list of 0-based ids.
function Tokenizer:encode(text, opts)
  check_text(text, 'encode')
  if opts ~= nil and type(opts) ~= 'table' then error('pmp.tokenizer: encode: options must be a table', 2) end
  opts = opts or {}
  local ids
  if self.llama then
    ids = llama_encode(self, text)
  else
    self._out.len = 0
    spm_encode(self, text, self._model.normalizer.add_dummy_prefix)
    ids = {}
    take(self, ids, 0)
  end
  local special = opts.add_special_tokens ~= false
  if (special and self.add_bos_token) or (opts.add_bos and ids[1] ~= self.bos_id) then
    if not self.bos_id then error('pmp.tokenizer: encode: a BOS token is asked for, but the tokenizer has none', 2) end
    table.insert(ids, 1, self.bos_id)
  end
  if (special and self.add_eos_token) or (opts.add_eos and ids[#ids] ~= self.eos_id) then
    if not self.eos_id then error('pmp.tokenizer: encode: an EOS token is asked for, but the tokenizer has none', 2) end
    ids[#ids + 1] = self.eos_id
  end
  return ids
end

--- The normalized text (what the model segments), as SentencePieceProcessor.normalize gives it.
function Tokenizer:normalize(text)
  check_text(text, 'normalize')
  local p = C.pmp_tok_spm_normalize(self._spm, text, #text, self._model.normalizer.add_dummy_prefix and 1 or 0, count_box)
  if p == nil then error('pmp.tokenizer: ' .. self.path .. ': normalize: ' .. last_error(), 2) end
  return ffi.string(ffi.cast(char_ptr, p), count_box[0])
end

Tokenizer.encode_batch = shared.encode_batch

-- ---- decoding: SentencePieceProcessor.decode ----

-- Bytes as UTF-8 where valid; each byte that starts no valid character becomes U+FFFD.
local function bytes_to_text(s)
  local out = {}
  while #s > 0 do
    local bad = tonumber(C.pmp_tok_utf8_check(s, #s))
    if bad < 0 then out[#out + 1] = s; break end
    out[#out + 1] = s:sub(1, bad) .. '\239\191\189'
    s = s:sub(bad + 2)
  end
  return table.concat(out)
end

--- tok:decode(ids, {skip_special_tokens}) -> text, as SentencePieceProcessor.decode gives it: control
--- pieces decode to nothing, unknown ones to trainer_spec.unk_surface, byte pieces to their bytes;
--- the leading space the normalizer added is taken off. Added tokens from tokenizer_config.json
--- beyond the model's pieces decode to their text unless skip_special_tokens.
function Tokenizer:decode(ids, opts)
  if type(ids) ~= 'table' then error('pmp.tokenizer: decode expects a list of ids, got ' .. type(ids), 2) end
  if self._model.denormalizer.precompiled_charsmap ~= '' then
    error('pmp.tokenizer: ' .. self.path .. ': decode: denormalizer_spec carries a precompiled_charsmap, which pmp does not apply', 2)
  end
  local norm = self._model.normalizer
  local strip_space = norm.add_dummy_prefix or norm.remove_extra_whitespaces
  local skip = opts ~= nil and opts.skip_special_tokens == true
  local parts, bytes = {}, {}
  local at_start, space_seen, empty = true, false, true
  local function add(s)
    if s ~= '' then parts[#parts + 1] = s; empty = false end
  end
  local function flush()
    if #bytes > 0 then add(bytes_to_text(table.concat(bytes))); bytes = {} end
  end
  for i = 1, #ids do
    local id = tonumber(ids[i])
    local p = id and self._pieces[id + 1]
    if p and p.kind == 'byte' then
      bytes[#bytes + 1] = string.char(tonumber(p.piece:sub(4, 5), 16))
    else
      flush()
      if space_seen or not empty then at_start = false end
      space_seen = false
      if not p then
        local added = id and self._added and self._added[id]
        if not added then error('pmp.tokenizer: decode: ids[' .. i .. '] = ' .. tostring(ids[i]) .. ' is not a token id', 2) end
        if not skip then add(added) end
      elseif p.kind == 'unknown' then
        add(self._model.trainer.unk_surface)
      elseif p.kind ~= 'control' then
        local s = p.piece
        if at_start and strip_space and s:sub(1, 3) == SPACE_SYMBOL then
          s = s:sub(4)
          space_seen = not norm.remove_extra_whitespaces
        end
        add((s:gsub(SPACE_SYMBOL, ' ')))
      end
    end
  end
  flush()
  return table.concat(parts)
end

Tokenizer.decode_batch = shared.decode_batch

-- ---- vocabulary ----

function Tokenizer:token_to_id(token)
  if type(token) ~= 'string' then return nil end
  local id = self._by_piece[token]
  if id ~= nil then return id end
  return self._added_by_content and self._added_by_content[token]
end

function Tokenizer:id_to_token(id)
  id = tonumber(id)
  if id == nil then return nil end
  local p = self._pieces[id + 1]
  if p then return p.piece end
  return self._added and self._added[id]
end

function Tokenizer:set_cache() end

function Tokenizer:__tostring()
  return string.format('SentencePieceTokenizer(%s, %s, vocab_size=%d)', self.path, self.model_type, self.vocab_size)
end

return M
