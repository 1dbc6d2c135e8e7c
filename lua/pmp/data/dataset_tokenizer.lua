--- The tokenizer that goes with an indexed dataset: what tools/preprocess_data.lua tokenizes with, and
--- what it records next to the data (<dataset prefix>.tokenizer.json) so that training on the data
--- gets the same vocabulary without extra flags.
--
--   local tok = dataset_tokenizer.hf(dir, {special_tokens = true})  -- pmp.tokenizer.from_pretrained(dir)
--   local tok = dataset_tokenizer.char(chars, eod) -- pmp.data.tokenizers char/byte, plus an EOD id
--   tok:encode(text) -> ids (Lua table), tok.eod, tok.vocab_size, tok:state()
--   dataset_tokenizer.save(prefix, state); dataset_tokenizer.load(prefix) -> state or nil
--   dataset_tokenizer.from_state(state) -> a tokenizer with vocab_size, type, encode, decode, state
--
-- States: {type = 'char', chars = {...}, eod = id} | {type = 'byte', eod = 0} |
--         {type = 'hf', model = dir, eod = id, vocab_size = n, special_tokens = bool} |
--         {type = 'gpt2_bpe', vocab_file = path, merge_file = path, eod = id, vocab_size = n}
-- EOD for the simple tokenizers: char vocabularies get one extra entry, EOD_TOKEN (a multi-character
-- string, so no input character ever encodes to it; it decodes to itself); the byte tokenizer has no
-- spare id, so it uses byte 0 (NUL) as EOD.
local json = require 'pmp.json'
local pio = require 'pmp.io'
local tokenizers = require 'pmp.data.tokenizers'

local M = {}

M.EOD_TOKEN = '<|endoftext|>'
M.SUFFIX = '.tokenizer.json'

function M.sidecar_path(prefix) return prefix .. M.SUFFIX end

function M.save(prefix, state)
  pio.write_atomic(M.sidecar_path(prefix), json.encode(state, { indent = 1 }) .. '\n')
end

function M.load(prefix)
  local path = M.sidecar_path(prefix)
  if not pio.is_file(path) then return nil end
  local ok, state = pcall(json.decode, pio.read_file(path))
  if not ok or type(state) ~= 'table' or type(state.type) ~= 'string' then
    error('dataset tokenizer: ' .. path .. ': not a tokenizer description' .. (ok and '' or ': ' .. tostring(state)), 2)
  end
  return state
end

local ffi = require 'ffi'
pcall(ffi.cdef, 'char *getcwd(char *buf, size_t size);')
function M.getcwd()
  local buf = ffi.new('char[?]', 4096)
  if ffi.C.getcwd(buf, 4096) == nil then return nil end
  return ffi.string(buf)
end

-- pmp.tokenizer, if this build has it.
local function hf_module()
  local ok, mod = pcall(require, 'pmp.tokenizer')
  if ok and type(mod) == 'table' and type(mod.from_pretrained) == 'function' then return mod end
  return nil, ok and 'pmp.tokenizer has no from_pretrained' or tostring(mod)
end
M.hf_available = function() return hf_module() ~= nil end

local function first_number(...)
  for _, v in ipairs({ ... }) do
    if type(v) == 'number' then return v end
  end
  return nil
end

local function try(obj, name, ...)
  local f = obj[name]
  if type(f) ~= 'function' then return nil end
  local ok, v = pcall(f, obj, ...)
  if ok then return v end
  return nil
end

-- An absolute path (recorded in states, so training finds the files from any directory).
local function absolute(path)
  if path:sub(1, 1) == '/' then return path end
  local cwd = M.getcwd()
  return cwd and (cwd .. '/' .. path) or path
end

-- Wraps an HF tokenizer from pmp.tokenizer; EOD is the id of the EOS token. options.special_tokens:
-- encode as Megatron's HF wrapper with include_special_tokens (its default: tokenizer(text).input_ids,
-- so the post-processor's tokens, e.g. a Llama-3 BOS, start every text); false: the text's tokens
-- only (--tokenizer-hf-no-include-special-tokens). A state without the field predates it: false.
function M.hf(dir, options)
  local special = (options or {}).special_tokens == true
  local mod, why = hf_module()
  if not mod then
    error('dataset tokenizer: --tokenizer-model needs pmp.tokenizer (HF tokenizer.json support), which is not ' ..
      'available in this build (' .. tostring(why):match('^[^\n]*') .. '); use --tokenizer-type char or byte', 2)
  end
  local tok = mod.from_pretrained(dir)
  local vocab = first_number(tok.vocab_size, try(tok, 'get_vocab_size', true), try(tok, 'vocab_size'))
  if not vocab then error('dataset tokenizer: cannot tell the vocabulary size of the tokenizer in ' .. dir, 0) end
  local eod = first_number(tok.eos_id, tok.eos_token_id, tok.eod, tok.eod_id)
  if not eod and type(tok.eos_token) == 'string' then eod = first_number(try(tok, 'token_to_id', tok.eos_token)) end
  -- base_vocab_size: without added tokens, what Pai-Megatron-Patch's --extra-vocab-size adds to
  local wrapper = { type = 'hf', model = dir, vocab_size = vocab, base_vocab_size = tok.base_vocab_size or vocab, eod = eod,
    inner = tok }
  function wrapper:encode(text)
    local ids = tok:encode(text, { add_special_tokens = special })
    if type(ids) == 'table' and type(ids.ids) == 'table' then ids = ids.ids end
    if type(ids) == 'cdata' then ids = ids:totable() end
    return ids
  end
  function wrapper:decode(ids) return tok:decode(ids) end
  local where = absolute(dir)
  function wrapper:state() return { type = 'hf', model = where, eod = eod, vocab_size = vocab, special_tokens = special } end
  return wrapper
end

-- GPT-2's byte-level BPE from a vocab.json and a merges.txt, as Megatron's GPT2BPETokenizer
-- (--vocab-file/--merge-file; the HF GPT-2 tokenizer megatron-core builds from them): GPT-2's
-- pre-tokenizer regex, no prefix space, '<|endoftext|>' a special token and the EOD.
function M.gpt2_bpe(vocab_file, merge_file)
  local mod, why = hf_module()
  if not mod then error('dataset tokenizer: GPT2BPETokenizer needs pmp.tokenizer (' .. tostring(why):match('^[^\n]*') .. ')', 2) end
  local okv, vocab = pcall(json.decode, pio.read_file(vocab_file))
  if not okv or type(vocab) ~= 'table' then error('dataset tokenizer: ' .. vocab_file .. ': not a JSON vocabulary (token -> id)', 2) end
  local merges = {}
  for line in pio.read_file(merge_file):gmatch('[^\n]+') do
    if not line:match('^#version') and line:find('%S') then merges[#merges + 1] = line:gsub('\r$', '') end
  end
  local eod_token = '<|endoftext|>'
  local added = json.array({})
  if vocab[eod_token] then
    added[1] = { id = vocab[eod_token], content = eod_token, special = true, normalized = false, single_word = false,
      lstrip = false, rstrip = false }
  end
  local tok = mod.from_json({
    model = { type = 'BPE', vocab = vocab, merges = merges },
    pre_tokenizer = { type = 'ByteLevel', add_prefix_space = false, trim_offsets = true, use_regex = true },
    decoder = { type = 'ByteLevel', add_prefix_space = true, trim_offsets = true, use_regex = true },
    added_tokens = added,
  }, { path = vocab_file, config = { eos_token = eod_token, bos_token = eod_token, unk_token = eod_token } })
  local wrapper = { type = 'gpt2_bpe', vocab_size = tok.vocab_size, eod = tok.eos_id, inner = tok }
  function wrapper:encode(text) return tok:encode(text) end
  function wrapper:decode(ids) return tok:decode(ids) end
  local state = { type = 'gpt2_bpe', vocab_file = absolute(vocab_file), merge_file = absolute(merge_file), eod = tok.eos_id,
    vocab_size = tok.vocab_size }
  function wrapper:state() return state end
  return wrapper
end

-- The tokenizer's part of megatron-core's dataset cache descriptions (pmp.data.megatron_cache):
-- for an HF tokenizer, what megatron-core 0.16's build_tokenizer records for --tokenizer-type
-- HuggingFaceTokenizer --tokenizer-model PATH with Megatron-LM's default tokenizer flags for training
-- (PATH as the command line gave it, model_path; whatever preprocessing used); pmp's own tokenizers
-- have no Megatron counterpart.
function M.megatron_identifiers(state, model_path)
  local mcache = require 'pmp.data.megatron_cache'
  if state.type ~= 'hf' then return mcache.object({ { 'class', 'pmp.' .. tostring(state.type) } }) end
  return mcache.object({
    { 'class', 'megatron.core.tokenizers.text.models.default_tokenizer.DefaultTokenizerText' },
    { 'tokenizer_path', model_path or state.model }, { 'vocab_file', 'None' }, { 'merges_file', 'None' },
    { 'additional_special_tokens', '[]' }, { 'use_fast', 'True' }, { 'trust_remote_code', 'False' },
    { 'include_special_tokens', 'True' },
  })
end

-- A char tokenizer over `chars` (sorted by the caller); with_eod adds EOD_TOKEN as the last id.
function M.char(chars, with_eod)
  local list = {}
  for k, c in ipairs(chars) do
    if c ~= M.EOD_TOKEN then list[#list + 1] = c end
  end
  local eod
  if with_eod then
    list[#list + 1] = M.EOD_TOKEN
    eod = #list - 1
  end
  local tok = tokenizers.char(list)
  tok.eod = eod
  local state = tok.state
  function tok:state()
    local s = state(self)
    s.eod = eod
    return s
  end
  return tok
end

function M.byte()
  local tok = tokenizers.byte()
  tok.eod = 0
  function tok:state() return { type = 'byte', eod = 0 } end
  return tok
end

-- A tokenizer from a recorded state (a dataset's sidecar or a checkpoint's tokenizer state).
function M.from_state(state)
  if state.type == 'char' then
    local tok = tokenizers.char(state.chars)
    if state.eod then
      tok.eod = state.eod
      local base = tok.state
      function tok:state()
        local s = base(self)
        s.eod = state.eod
        return s
      end
    end
    return tok
  elseif state.type == 'byte' then
    return M.byte()
  elseif state.type == 'hf' then
    return M.hf(state.model, { special_tokens = state.special_tokens == true })
  elseif state.type == 'gpt2_bpe' then
    return M.gpt2_bpe(state.vocab_file, state.merge_file)
  end
  error("dataset tokenizer: unknown tokenizer type '" .. tostring(state.type) .. "'", 2)
end

return M
