--- pmp.tokenizer: Hugging Face tokenizer.json tokenizers (BPE models), giving the same ids as the
--- `tokenizers` package; also SentencePiece tokenizer.model files (pmp.tokenizer.sentencepiece, ids of
--- the `sentencepiece` package) and tiktoken ranks files (pmp.tokenizer.tiktoken, ids of `tiktoken`).
---
---   local tok = pmp.tokenizer.from_pretrained('path/to/model')   -- dir with tokenizer.json, tokenizer.model or *.tiktoken
---   local ids = tok:encode('Hello world')                     -- Lua list of 0-based token ids
---   tok:encode(text, {add_special_tokens = false})            -- no post-processor tokens (BOS ...)
---   tok:encode(text, {add_bos = true, add_eos = true})        -- force BOS first / EOS last
---   tok:decode(ids, {skip_special_tokens = true})             -- string
---   tok:encode_batch({'a', 'b'})                              -- list of id lists
---   tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id        -- ids are nil when absent
---   tok.base_vocab_size                                      -- without added tokens (tokenizer.json only)
---   tok:token_to_id('<|im_end|>'), tok:id_to_token(151645)
--   tok:normalize(text), tok:pre_tokenize(text)               -- the pipeline's intermediate strings
--
-- The pipeline is the reference's: added tokens are cut out of the raw text first (leftmost-longest;
-- single_word, lstrip, rstrip honoured; `normalized` ones are matched after normalization), each
-- remaining piece is normalized, pre-tokenized (Split regexes with PCRE2, ByteLevel, Metaspace, ...)
-- and BPE-encoded in C, then the post-processor adds its tokens when add_special_tokens is on (the
-- default). Which special tokens appear follows tokenizer.json's post_processor, as the `tokenizers`
-- package does; tokenizer_config.json supplies bos/eos/pad tokens and add_bos_token/add_eos_token
-- (reported as tok.add_bos_token / tok.add_eos_token; pass add_bos/add_eos to act on them).
-- decode skips ids that name no token, as the reference does. Truncation and padding in the file
-- apply as in the reference (tok.truncation / tok.padding; set them to nil to turn them off):
-- encode_batch pads to the longest text of the batch.
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local json = require 'pmp.json'
local pio = require 'pmp.io'
local comp = require 'pmp.tokenizer.components'
local shared = require 'pmp.tokenizer.shared'

local M = {}
--- A tokenizer made by pmp.tokenizer.from_pretrained: tok:encode(text), tok:decode(ids), tok.vocab_size.
local Tokenizer = {}
Tokenizer.__index = Tokenizer
M.Tokenizer = Tokenizer

local function last_error() return ffi.string(C.pmp_last_error()) end
local function is_null(v) return v == nil or v == json.null end

local count_box = ffi.new('int64_t[1]')
local char_ptr = ffi.typeof('const char *')

-- ---- the model ----

local function is_integer(x) return type(x) == 'number' and x == math.floor(x) and x >= 0 and x < 2 ^ 31 end

local function build_bpe(model, where, byte_level)
  local kind = model.type
  if kind == nil and model.merges ~= nil then kind = 'BPE' end
  if kind ~= 'BPE' then
    error(where('model.type') .. "unsupported model type '" .. tostring(kind) .. "' (pmp.tokenizer supports BPE)", 0)
  end
  local vocab = model.vocab
  if type(vocab) ~= 'table' or vocab == json.null or json.is_array(vocab) then
    error(where('model.vocab') .. 'expected an object of token -> id', 0)
  end
  local merges = model.merges
  if type(merges) ~= 'table' or merges == json.null or (next(merges) ~= nil and merges[1] == nil) then
    error(where('model.merges') .. 'expected a list', 0)
  end
  local F = comp.field
  local prefix = F(model, 'continuing_subword_prefix', 'string', '', where, 'model')
  local suffix = F(model, 'end_of_word_suffix', 'string', '', where, 'model')
  local unk = F(model, 'unk_token', 'string', nil, where, 'model')
  local unk_id = -1
  if unk ~= nil then
    unk_id = vocab[unk]
    if not is_integer(unk_id) then error(where('model.unk_token') .. "'" .. unk .. "' is not in model.vocab", 0) end
  end
  local dropout = F(model, 'dropout', 'number', nil, where, 'model')
  if dropout and (dropout < 0 or dropout > 1) then error(where('model.dropout') .. 'must be in [0, 1]', 0) end
  local m = C.pmp_tok_bpe_new(byte_level and 1 or 0, F(model, 'ignore_merges', 'boolean', false, where, 'model') and 1 or 0,
    F(model, 'byte_fallback', 'boolean', false, where, 'model') and 1 or 0,
    F(model, 'fuse_unk', 'boolean', false, where, 'model') and 1 or 0, unk_id, prefix, suffix)
  if m == nil then error(where('model') .. last_error(), 0) end
  m = ffi.gc(m, C.pmp_tok_bpe_free)
  local id_to_token = {}
  for token, id in pairs(vocab) do
    if not is_integer(id) then error(where('model.vocab') .. "id of '" .. tostring(token) .. "' is not a non-negative integer", 0) end
    if C.pmp_tok_bpe_add_token(m, token, #token, id) ~= 0 then error(where('model.vocab') .. last_error(), 0) end
    id_to_token[id] = token
  end
  for i = 1, #merges do
    local mg, a, b = merges[i], nil, nil
    if type(mg) == 'string' then
      if mg:sub(1, 8) ~= '#version' then
        local sp = mg:find(' ', 1, true)
        if not sp or mg:find(' ', sp + 1, true) then
          error(where('model.merges[' .. (i - 1) .. ']') .. "expected 'a b' (two tokens and one space), got '" .. mg .. "'", 0)
        end
        a, b = mg:sub(1, sp - 1), mg:sub(sp + 1)
      end
    elseif type(mg) == 'table' and type(mg[1]) == 'string' and type(mg[2]) == 'string' and mg[3] == nil then
      a, b = mg[1], mg[2]
    else
      error(where('model.merges[' .. (i - 1) .. ']') .. 'expected a pair of strings', 0)
    end
    if a then
      if C.pmp_tok_bpe_add_merge(m, a, #a, b, #b) ~= 0 then
        error(where('model.merges[' .. (i - 1) .. ']') .. last_error(), 0)
      end
    end
  end
  C.pmp_tok_bpe_finish(m)
  return m, vocab, id_to_token
end

-- ---- added tokens ----

local function build_added(list, where, normalizer)
  if is_null(list) then list = {} end
  if type(list) ~= 'table' or (next(list) ~= nil and list[1] == nil) then error(where('added_tokens') .. 'expected a list', 0) end
  local raw = ffi.gc(C.pmp_tok_added_new(), C.pmp_tok_added_free)
  local normed = ffi.gc(C.pmp_tok_added_new(), C.pmp_tok_added_free)
  local by_id, by_content, special_contents = {}, {}, {}
  for i, t in ipairs(list) do
    local path = 'added_tokens[' .. (i - 1) .. ']'
    if type(t) ~= 'table' then error(where(path) .. 'expected an object', 0) end
    if not is_integer(t.id) then error(where(path .. '.id') .. 'expected a non-negative integer', 0) end
    if type(t.content) ~= 'string' then error(where(path .. '.content') .. 'expected a string', 0) end
    local function flag(key, default)
      local v = t[key]
      if is_null(v) then return default end
      if type(v) ~= 'boolean' then error(where(path .. '.' .. key) .. 'expected true or false', 0) end
      return v
    end
    local special = flag('special', false)
    local entry = {
      id = t.id, content = t.content, special = special, normalized = flag('normalized', not special),
      single_word = flag('single_word', false), lstrip = flag('lstrip', false), rstrip = flag('rstrip', false),
    }
    entry.decode_form = t.content
    if t.content ~= '' then
      local trie, pattern = raw, t.content
      if entry.normalized then
        trie = normed
        if normalizer then pattern = normalizer(t.content) end
        entry.decode_form = pattern
      end
      if C.pmp_tok_added_add(trie, pattern, #pattern, t.id, entry.single_word and 1 or 0, entry.lstrip and 1 or 0,
          entry.rstrip and 1 or 0) ~= 0 then
        error(where(path) .. last_error(), 0)
      end
      by_content[t.content] = t.id
      if special then special_contents[t.content] = true end
    end
    by_id[t.id] = entry
  end
  return {
    raw = C.pmp_tok_added_count(raw) > 0 and raw or nil,
    normed = C.pmp_tok_added_count(normed) > 0 and normed or nil,
    by_id = by_id, by_content = by_content, special_contents = special_contents,
  }
end

-- ---- truncation and padding, as the file asks (the reference applies them in encode) ----

local function direction(v, where, key)
  if is_null(v) then return 'Right' end
  if v ~= 'Right' and v ~= 'Left' then error(where(key) .. 'expected "Right" or "Left"', 0) end
  return v
end

function M.parse_truncation(t, where)
  if is_null(t) then return nil end
  if type(t) ~= 'table' then error(where('truncation') .. 'expected an object or null', 0) end
  if not is_integer(t.max_length) then error(where('truncation.max_length') .. 'expected a non-negative integer', 0) end
  return { max_length = t.max_length, direction = direction(t.direction, where, 'truncation.direction') }
end

function M.parse_padding(p, where)
  if is_null(p) then return nil end
  if type(p) ~= 'table' then error(where('padding') .. 'expected an object or null', 0) end
  local out = { direction = direction(p.direction, where, 'padding.direction'), pad_id = p.pad_id or 0 }
  if not is_integer(out.pad_id) then error(where('padding.pad_id') .. 'expected a non-negative integer', 0) end
  if p.strategy == 'BatchLongest' or is_null(p.strategy) then
    out.fixed = nil
  elseif type(p.strategy) == 'table' and is_integer(p.strategy.Fixed) then
    out.fixed = p.strategy.Fixed
  else
    error(where('padding.strategy') .. 'expected "BatchLongest" or {"Fixed": n}', 0)
  end
  if not is_null(p.pad_to_multiple_of) then
    if not is_integer(p.pad_to_multiple_of) then error(where('padding.pad_to_multiple_of') .. 'expected an integer', 0) end
    out.multiple = p.pad_to_multiple_of
  end
  return out
end

-- Pads every list in `lists` to the same length (the fixed one, or the longest).
local function pad_lists(lists, params)
  local target = params.fixed
  if not target then
    target = 0
    for _, ids in ipairs(lists) do target = math.max(target, #ids) end
  end
  if params.multiple and params.multiple > 0 and target % params.multiple > 0 then
    target = target + params.multiple - target % params.multiple
  end
  for _, ids in ipairs(lists) do
    local n = #ids
    if n < target then
      if params.direction == 'Right' then
        for i = n + 1, target do ids[i] = params.pad_id end
      else
        for i = n, 1, -1 do ids[i + target - n] = ids[i] end
        for i = 1, target - n do ids[i] = params.pad_id end
      end
    end
  end
end

-- ---- construction ----

local function token_name(v)
  if type(v) == 'string' then return v end
  if type(v) == 'table' and type(v.content) == 'string' then return v.content end
  return nil
end

--- Builds a tokenizer from a decoded tokenizer.json. opts.path names the file in errors; opts.config is
--- the decoded tokenizer_config.json (optional).
function M.from_json(spec, opts)
  opts = opts or {}
  local path = opts.path or 'tokenizer.json'
  local function where(key) return 'pmp.tokenizer: ' .. path .. ': ' .. key .. ': ' end
  if type(spec) ~= 'table' or json.is_array(spec) then error('pmp.tokenizer: ' .. path .. ': expected a JSON object', 0) end
  if type(spec.model) ~= 'table' or spec.model == json.null then error(where('model') .. 'missing or not an object', 0) end
  local self = setmetatable({}, Tokenizer)
  self.truncation, self.padding = M.parse_truncation(spec.truncation, where), M.parse_padding(spec.padding, where)
  self.path = path
  self._normalizer = comp.normalizer(spec.normalizer, where)
  local steps = comp.pre_steps(spec.pre_tokenizer, where)
  local model = spec.model
  local plain_subwords = (is_null(model.continuing_subword_prefix) or model.continuing_subword_prefix == '')
    and (is_null(model.end_of_word_suffix) or model.end_of_word_suffix == '')
  local byte_level = #steps > 0 and steps[#steps].kind == 'byte_level' and plain_subwords
  self._bpe, self._vocab, self._id_to_token = build_bpe(model, where, byte_level)
  self._pre = comp.build_pipeline(steps, byte_level, where)
  self._byte_level = byte_level
  self._added = build_added(spec.added_tokens, where, self._normalizer)
  self._post = comp.post_processor(spec.post_processor, where)
  self._decoder = comp.decoder(spec.decoder, where)
  self._out = ffi.gc(C.pmp_tok_ids_new(), C.pmp_tok_ids_free)

  local max_id = -1
  for id in pairs(self._id_to_token) do if id > max_id then max_id = id end end
  -- the model's own vocabulary, without added tokens (transformers' tokenizer.vocab_size)
  self.base_vocab_size = max_id + 1
  for id in pairs(self._added.by_id) do if id > max_id then max_id = id end end
  self.vocab_size = max_id + 1

  local config = opts.config or {}
  local function special(key)
    local name = token_name(config[key])
    if name == nil then return nil, nil end
    return name, self:token_to_id(name)
  end
  self.bos_token, self.bos_id = special('bos_token')
  self.eos_token, self.eos_id = special('eos_token')
  self.pad_token, self.pad_id = special('pad_token')
  self.unk_token, self.unk_id = special('unk_token')
  if config.bos_token == nil and #self._post.before == 1 then
    -- no tokenizer_config.json entry: the token the post-processor puts first is the BOS
    self.bos_id = self._post.before[1]
    self.bos_token = self:id_to_token(self.bos_id)
  end
  self.add_bos_token = config.add_bos_token == true
  self.add_eos_token = config.add_eos_token == true
  return self
end

local function read_json(file, what)
  local f, err = io.open(file, 'rb')
  if not f then error('pmp.tokenizer: cannot read ' .. what .. ': ' .. tostring(err), 0) end
  local text = f:read('*a')
  f:close()
  local ok, value = pcall(json.decode, text)
  if not ok then error('pmp.tokenizer: ' .. file .. ': invalid JSON: ' .. tostring(value), 0) end
  return value
end

local function read_config(config_file)
  if not pio.is_file(config_file) then return nil end
  local config = read_json(config_file, config_file)
  if type(config) ~= 'table' or json.is_array(config) then
    error('pmp.tokenizer: ' .. config_file .. ': expected a JSON object', 0)
  end
  return config
end

-- A tokenizer.model is a SentencePiece protobuf, or (Llama 3's original files) tiktoken ranks text.
local function looks_like_ranks(data)
  return data:match('^[A-Za-z0-9+/]+=*[ \t]+%d+\r?\n') ~= nil
end

local function from_model_file(file, config, config_path)
  local data = pio.read_file(file)
  if looks_like_ranks(data) then
    return require('pmp.tokenizer.tiktoken').from_bytes(data, { path = file })
  end
  return require('pmp.tokenizer.sentencepiece').from_bytes(data, { path = file, config = config, config_path = config_path })
end

local function from_tiktoken_file(file)
  return require('pmp.tokenizer.tiktoken').from_bytes(pio.read_file(file), { path = file })
end

local function tiktoken_files(dir)
  local found = {}
  for _, name in ipairs(pio.listdir(dir)) do
    if name:match('%.tiktoken$') then found[#found + 1] = name end
  end
  table.sort(found)
  return found
end

--- dir: a directory holding one of (in this order of preference) tokenizer.json, a SentencePiece
--- tokenizer.model, or a tiktoken ranks file (*.tiktoken, e.g. Qwen 1's qwen.tiktoken); or the path
--- of such a file. tokenizer_config.json beside it is read when present.
function M.from_pretrained(dir)
  if type(dir) ~= 'string' then error('pmp.tokenizer.from_pretrained: expects a directory path, got ' .. type(dir), 2) end
  local kind = pio.kind(dir)
  local file, config_file
  if kind == 'directory' then
    config_file = pio.join(dir, 'tokenizer_config.json')
    file = pio.join(dir, 'tokenizer.json')
    if not pio.is_file(file) then
      local model = pio.join(dir, 'tokenizer.model')
      if pio.is_file(model) then return from_model_file(model, read_config(config_file), config_file) end
      local ranks = tiktoken_files(dir)
      if #ranks == 1 then return from_tiktoken_file(pio.join(dir, ranks[1])) end
      if #ranks > 1 then
        error('pmp.tokenizer.from_pretrained: ' .. dir .. ' holds several tiktoken files (' .. table.concat(ranks, ', ') ..
          '): pass the path of one', 0)
      end
      error('pmp.tokenizer.from_pretrained: no tokenizer.json, tokenizer.model or *.tiktoken in ' .. dir, 0)
    end
  elseif kind == 'file' then
    file = dir
    config_file = pio.join(pio.dirname(dir), 'tokenizer_config.json')
    if file:match('%.tiktoken$') then return from_tiktoken_file(file) end
    if file:match('%.model$') then return from_model_file(file, read_config(config_file), config_file) end
  else
    error('pmp.tokenizer.from_pretrained: ' .. dir .. ' does not exist', 0)
  end
  return M.from_json(read_json(file, file), { path = file, config = read_config(config_file) })
end

M.from_file = M.from_pretrained

-- ---- encoding ----

local check_text = shared.check_text

local function encode_piece(self, s, offset, n, at_start)
  if C.pmp_tok_encode_piece(self._pre, self._bpe, ffi.cast(char_ptr, s) + offset, n, at_start and 1 or 0, self._out) ~= 0 then
    error('pmp.tokenizer: encode: ' .. last_error(), 0)
  end
end

local function push(self, id)
  if C.pmp_tok_ids_push(self._out, id) ~= 0 then error('pmp.tokenizer: encode: ' .. last_error(), 0) end
end

-- One stretch of text between non-normalized added tokens: normalize, then cut out the normalized
-- added tokens, then pre-tokenize and BPE the rest.
local function encode_segment(self, text, a, b)
  local norm, normed = self._normalizer, self._added.normed
  if not norm and not normed then return encode_piece(self, text, a, b - a, a == 0) end
  local s = text:sub(a + 1, b)
  if norm then s = norm(s) end
  if not normed then return encode_piece(self, s, 0, #s, a == 0) end
  for _, sp in ipairs(shared.spans(normed, s)) do
    if sp[3] >= 0 then push(self, sp[3]) else encode_piece(self, s, sp[1], sp[2] - sp[1], a == 0 and sp[1] == 0) end
  end
end

local function encode_into(self, text)
  local raw = self._added.raw
  if not raw then return encode_segment(self, text, 0, #text) end
  for _, sp in ipairs(shared.spans(raw, text)) do
    if sp[3] >= 0 then push(self, sp[3]) else encode_segment(self, text, sp[1], sp[2]) end
  end
end

local function encode_checked(self, text, opts, fname, batch)
  local add_special, add_bos, add_eos = true, false, false
  if opts ~= nil then
    if type(opts) ~= 'table' then error('pmp.tokenizer: ' .. fname .. ': options must be a table', 3) end
    if opts.add_special_tokens == false then add_special = false end
    add_bos, add_eos = opts.add_bos == true, opts.add_eos == true
  end
  self._out.len = 0
  encode_into(self, text)
  local ids, k = {}, 0
  if add_special then
    for _, id in ipairs(self._post.before) do k = k + 1; ids[k] = id end
  end
  local out = self._out
  local data = out.data
  local first, last = 0, tonumber(out.len) - 1
  local trunc = self.truncation
  if trunc then
    local n_added = #self._post.before + #self._post.after
    local limit = trunc.max_length
    if add_special and n_added > 0 then limit = math.max(0, limit - n_added) end
    if last - first + 1 > limit then
      if trunc.direction == 'Right' then last = first + limit - 1 else first = last - limit + 1 end
    end
  end
  for i = first, last do
    k = k + 1
    ids[k] = data[i]
  end
  if add_special then
    for _, id in ipairs(self._post.after) do k = k + 1; ids[k] = id end
  end
  if add_bos then
    if not self.bos_id then error('pmp.tokenizer: ' .. fname .. ': add_bos asked for, but the tokenizer has no BOS token', 3) end
    if ids[1] ~= self.bos_id then table.insert(ids, 1, self.bos_id) end
  end
  if add_eos then
    if not self.eos_id then error('pmp.tokenizer: ' .. fname .. ': add_eos asked for, but the tokenizer has no EOS token', 3) end
    if ids[#ids] ~= self.eos_id then ids[#ids + 1] = self.eos_id end
  end
  if self.padding and not batch then pad_lists({ ids }, self.padding) end
  return ids
end

--- tok:encode(text, {add_special_tokens = true, add_bos =, add_eos =}) -> a list of 0-based token ids.
function Tokenizer:encode(text, opts)
  check_text(text, 'encode')
  return encode_checked(self, text, opts, 'encode')
end

--- tok:encode_batch({texts}, opts) -> a list of id lists (padded when the file asks for padding).
function Tokenizer:encode_batch(texts, opts)
  if type(texts) ~= 'table' then error('pmp.tokenizer: encode_batch expects a list of strings, got ' .. type(texts), 2) end
  local out = {}
  for i = 1, #texts do
    local text = texts[i]
    if type(text) ~= 'string' then
      error('pmp.tokenizer: encode_batch: item ' .. i .. ' is a ' .. type(text) .. ', not a string', 2)
    end
    local bad = C.pmp_tok_utf8_check(text, #text)
    if bad >= 0 then
      error(string.format('pmp.tokenizer: encode_batch: item %d is not valid UTF-8 (offset %d)', i, tonumber(bad)), 2)
    end
    out[i] = encode_checked(self, text, opts, 'encode_batch', true)
  end
  if self.padding then pad_lists(out, self.padding) end
  return out
end

-- ---- decoding ----

--- tok:decode(ids, {skip_special_tokens = false}) -> the text of a list of ids.
function Tokenizer:decode(ids, opts)
  if type(ids) ~= 'table' then error('pmp.tokenizer: decode expects a list of ids, got ' .. type(ids), 2) end
  local skip = opts ~= nil and opts.skip_special_tokens == true
  local added, specials, vocab_r = self._added.by_id, self._added.special_contents, self._id_to_token
  local tokens, k = {}, 0
  for i = 1, #ids do
    local id = ids[i]
    if type(id) ~= 'number' and type(id) ~= 'cdata' then
      error('pmp.tokenizer: decode: ids[' .. i .. '] is a ' .. type(id) .. ', not an integer', 2)
    end
    id = tonumber(id)
    if id ~= math.floor(id) or id < 0 then error('pmp.tokenizer: decode: ids[' .. i .. '] = ' .. id .. ' is not a token id', 2) end
    local t
    local a = added[id]
    if a then
      t = a.decode_form
      if skip and a.special then t = nil end
    else
      t = vocab_r[id]
      if t and skip and specials[t] then t = nil end
    end
    if t then
      k = k + 1
      tokens[k] = t
    end
  end
  if self._decoder then return self._decoder(tokens) end
  return table.concat(tokens, ' ')
end


Tokenizer.decode_batch = shared.decode_batch

-- ---- vocabulary ----

--- The id of a token string, or nil.
function Tokenizer:token_to_id(token)
  if type(token) ~= 'string' then return nil end
  local id = self._added.by_content[token]
  if id ~= nil then return id end
  return self._vocab[token]
end

--- The token string of an id, or nil.
function Tokenizer:id_to_token(id)
  id = tonumber(id)
  if id == nil then return nil end
  local a = self._added.by_id[id]
  if a then return a.content end
  return self._id_to_token[id]
end

-- ---- inspection ----

function Tokenizer:normalize(text)
  check_text(text, 'normalize')
  if not self._normalizer then return text end
  return self._normalizer(text)
end

-- The pre-tokens of a text taken as one piece at the start of the input (after normalization;
-- added tokens are not cut out). Byte-level models show raw bytes, not GPT-2 characters.
function Tokenizer:pre_tokenize(text)
  check_text(text, 'pre_tokenize')
  local s = self._normalizer and self._normalizer(text) or text
  local n = C.pmp_tok_pre_run(self._pre, s, #s, 1)
  if n < 0 then error('pmp.tokenizer: pre_tokenize: ' .. last_error(), 2) end
  local out = {}
  for i = 0, tonumber(n) - 1 do
    local p = C.pmp_tok_pre_piece(self._pre, i, count_box)
    out[#out + 1] = ffi.string(p, count_box[0])
  end
  return out
end

-- Turns the pre-token result cache of the BPE model on or off (it never changes the ids).
function Tokenizer:set_cache(enabled) C.pmp_tok_bpe_set_cache(self._bpe, enabled and 1 or 0) end

function Tokenizer:__tostring()
  return string.format('Tokenizer(%s, vocab_size=%d)', self.path, self.vocab_size)
end

return M
