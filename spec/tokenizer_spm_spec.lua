require 'busted.runner'()
-- SentencePiece tokenizer.model files read natively: ids, normalized text and decoded text equal to the
-- `sentencepiece` package on a multilingual corpus, for small BPE and Unigram models it trained
-- (tools/make_spm_fixtures.py: byte fallback or not, nmt_nfkc / nmt_nfkc_cf / identity normalizers,
-- user-defined and control pieces, whitespace options); transformers' Llama legacy / non-legacy rules;
-- from_pretrained picking the file; and errors naming the file and byte for malformed models.
local json = require 'pmp.json'
local pio = require 'pmp.io'
local tokenizer = require 'pmp.tokenizer'
local spm = require 'pmp.tokenizer.sentencepiece'
local fails_with = require('spec.support.expect').fails_with

local ROOT = package.loaded['pmp.root'] or '.'
local FIXTURES = ROOT .. '/spec/fixtures/spm'
local MODELS = { 'bpe_nfkc', 'bpe_llama', 'unigram_nfkc_cf', 'unigram_bytes', 'unigram_noescape' }

local function read_jsonl(path)
  local out = {}
  for line in io.lines(path) do
    if line:match('%S') then out[#out + 1] = json.decode(line) end
  end
  return out
end

local function model_bytes(name) return pio.read_file(FIXTURES .. '/' .. name .. '.model') end

local loaded = {}
local function model(name)
  if not loaded[name] then loaded[name] = spm.from_bytes(model_bytes(name), { path = name .. '.model' }) end
  return loaded[name]
end

local function list(ids) return table.concat(ids, ',') end

-- Asserts that no case failed, showing the first few that did.
local function expect_none(bad, total, label)
  if #bad > 0 then
    error(string.format('%s: %d of %d cases differ from the reference, e.g.\n%s', label, #bad, total,
      table.concat(bad, '\n', 1, math.min(#bad, 4))), 2)
  end
end

local cases = read_jsonl(FIXTURES .. '/cases.jsonl')

describe('pmp.tokenizer.sentencepiece against the sentencepiece package', function()
  for _, name in ipairs(MODELS) do
    it(name .. ': normalized text, ids and decoded text on the multilingual corpus', function()
      local tok = model(name)
      local bad, total = {}, 0
      for _, c in ipairs(cases) do
        if c.model == name and c.text then
          total = total + 1
          local norm, ids, text = tok:normalize(c.text), tok:encode(c.text), tok:decode(c.ids)
          if norm ~= c.normalized then bad[#bad + 1] = string.format('normalize %q: %q, want %q', c.text, norm, c.normalized) end
          if list(ids) ~= list(c.ids) then bad[#bad + 1] = string.format('encode %q: %s, want %s', c.text, list(ids), list(c.ids)) end
          if text ~= c.decoded then bad[#bad + 1] = string.format('decode %s: %q, want %q', list(c.ids), text, c.decoded) end
        end
      end
      assert.is_true(total > 150)
      expect_none(bad, total, name)
    end)

    it(name .. ': decodes arbitrary ids (controls, unknowns, lone bytes) as the package does', function()
      local tok = model(name)
      local bad, total = {}, 0
      for _, c in ipairs(cases) do
        if c.model == name and c.decode_ids then
          total = total + 1
          local text = tok:decode(c.decode_ids)
          if text ~= c.decoded then bad[#bad + 1] = string.format('decode %s: %q, want %q', list(c.decode_ids), text, c.decoded) end
        end
      end
      assert.is_true(total > 0)
      expect_none(bad, total, name)
    end)
  end

  it('reads the pieces, model type and special ids from the file', function()
    local tok = model('bpe_nfkc')
    assert.equal('bpe', tok.model_type)
    assert.equal('unigram', model('unigram_bytes').model_type)
    assert.equal(0, tok.unk_id)
    assert.equal(1, tok.bos_id)
    assert.equal(2, tok.eos_id)
    assert.equal('<unk>', tok:id_to_token(0))
    assert.equal(tok:token_to_id('<tool>'), tok:encode('<tool>')[2])   -- a user-defined piece, never split
    assert.is_nil(tok:token_to_id('no such piece'))
    -- without a Llama config nothing is added unless asked for
    local plain = tok:encode('hello')
    assert.same({ 1 }, { tok:encode('hello', { add_bos = true })[1] })
    assert.equal(#plain + 2, #tok:encode('hello', { add_bos = true, add_eos = true }))
  end)
end)

describe('pmp.tokenizer.sentencepiece Llama rules (transformers LlamaTokenizer)', function()
  local tmp
  setup(function()
    tmp = string.format('%s/pmp_spm_spec.%d.%d', os.getenv('TMPDIR') or '/tmp', pio.getpid(), math.random(1e9))
    pio.mkdir_p(tmp)
  end)
  teardown(function() if tmp then pio.remove_tree(tmp) end end)

  local function llama_dir(legacy)
    local dir = tmp .. '/llama_' .. tostring(legacy)
    pio.mkdir_p(dir)
    pio.write_atomic(dir .. '/tokenizer.model', model_bytes('bpe_llama'))
    local config = json.decode(pio.read_file(FIXTURES .. '/llama_tokenizer_config.json'))
    config.legacy = legacy
    pio.write_atomic(dir .. '/tokenizer_config.json', json.encode(config))
    return dir
  end

  for _, legacy in ipairs({ true, false }) do
    it('legacy = ' .. tostring(legacy) .. ': special tokens in the text, leading spaces, BOS', function()
      local tok = tokenizer.from_pretrained(llama_dir(legacy))
      assert.equal(legacy, tok.legacy)
      local bad, total = {}, 0
      for _, c in ipairs(read_jsonl(FIXTURES .. '/llama_cases.jsonl')) do
        if c.legacy == legacy then
          total = total + 1
          local ids = tok:encode(c.text, { add_special_tokens = c.add_special_tokens })
          if list(ids) ~= list(c.ids) then bad[#bad + 1] = string.format('%q: %s, want %s', c.text, list(ids), list(c.ids)) end
        end
      end
      assert.is_true(total > 100)
      expect_none(bad, total, 'legacy ' .. tostring(legacy))
    end)
  end

  it("cuts the config's added tokens out of the text, beyond the model's pieces", function()
    local dir = llama_dir(false)
    local config = json.decode(pio.read_file(dir .. '/tokenizer_config.json'))
    config.added_tokens_decoder = { ['1200'] = { content = '<|im_end|>', special = true } }
    pio.write_atomic(dir .. '/tokenizer_config.json', json.encode(config))
    local tok = tokenizer.from_pretrained(dir)
    assert.equal(1201, tok.vocab_size)
    assert.equal(1200, tok:token_to_id('<|im_end|>'))
    local plain = tok:encode('Hello world', { add_special_tokens = false })
    local ids = tok:encode('Hello world<|im_end|>', { add_special_tokens = false })
    assert.same(plain, { unpack(ids, 1, #ids - 1) })
    assert.equal(1200, ids[#ids])
    assert.equal('Hello world<|im_end|>', tok:decode(ids))
    assert.equal('Hello world', tok:decode(ids, { skip_special_tokens = true }))
    config.added_tokens_decoder = { x = { content = 'y' } }
    pio.write_atomic(dir .. '/tokenizer_config.json', json.encode(config))
    fails_with(function() tokenizer.from_pretrained(dir) end, 'tokenizer_config.json', 'added_tokens_decoder', "'x'")
  end)

  it('from_pretrained prefers tokenizer.json to tokenizer.model', function()
    local dir = llama_dir(false)
    local tiny = { model = { type = 'BPE', vocab = { a = 0 }, merges = {} } }
    pio.write_atomic(dir .. '/tokenizer.json', json.encode(tiny))
    local tok = tokenizer.from_pretrained(dir)
    assert.equal(tokenizer.Tokenizer, getmetatable(tok))
    assert.equal(spm.Tokenizer, getmetatable(tokenizer.from_pretrained(dir .. '/tokenizer.model')))
  end)
end)

-- ---- malformed files ----

-- Protobuf encoding, to build small models by hand.
local function varint(n)
  local out = {}
  repeat
    local b = n % 128
    n = math.floor(n / 128)
    out[#out + 1] = string.char(n > 0 and b + 128 or b)
  until n == 0
  return table.concat(out)
end
local function field_len(number, payload) return varint(number * 8 + 2) .. varint(#payload) .. payload end
local function field_varint(number, v) return varint(number * 8) .. varint(v) end
local function piece(text, kind) return field_len(1, field_len(1, text) .. (kind and field_varint(3, kind) or '')) end

describe('pmp.tokenizer.sentencepiece errors', function()
  local good = piece('<unk>', 2) .. piece('a') .. piece('b') .. piece('ab') .. field_len(2, field_varint(3, 2))

  it('builds a hand-made BPE model', function()
    local tok = spm.from_bytes(good, { path = 'hand.model' })
    -- "abab" -> "\u{2581}abab": the dummy prefix is no piece (unknown), a+b merge twice
    assert.same({ 0, 3, 3 }, tok:encode('abab'))
    -- "\u{2581}ab\u{2581}c": the unknown "\u{2581}c" is one run, so one <unk>
    assert.same({ 0, 3, 0 }, tok:encode('ab c'))
  end)

  it('names the file and byte of a truncated model', function()
    local bytes = model_bytes('unigram_bytes')
    for _, cut in ipairs({ 1, 2, 100, math.floor(#bytes / 2), #bytes - 1 }) do
      fails_with(function() spm.from_bytes(bytes:sub(1, cut), { path = 'cut.model' }) end, 'cut.model', 'byte ')
    end
  end)

  it('names a field of the wrong wire type or an invalid one', function()
    fails_with(function() spm.from_bytes(good .. field_varint(1, 5), { path = 'x.model' }) end,
      'x.model', 'ModelProto.pieces', 'should be length-delimited')
    fails_with(function() spm.from_bytes(good .. '\15', { path = 'x.model' }) end, 'x.model', 'byte ' .. #good, 'wire type 7')
    fails_with(function() spm.from_bytes('', { path = 'empty.model' }) end, 'empty.model', 'no pieces')
  end)

  it('names what a model asks for that pmp cannot honour', function()
    fails_with(function() spm.from_bytes(piece('a') .. field_len(2, field_varint(3, 2)), { path = 'x.model' }) end,
      'x.model', 'UNKNOWN')
    fails_with(function() spm.from_bytes(good .. field_len(2, field_varint(3, 3)), { path = 'x.model' }) end,
      'x.model', 'model_type', 'word')
    fails_with(function() spm.from_bytes(good .. field_len(2, field_varint(24, 1)), { path = 'x.model' }) end,
      'x.model', 'treat_whitespace_as_suffix')
    fails_with(function() spm.from_bytes(good .. piece('a'), { path = 'x.model' }) end, 'x.model', "'a' is already defined")
    fails_with(function() spm.from_bytes(good .. piece('<0x41>', 6), { path = 'x.model' }) end, 'x.model', 'byte_fallback')
    local bad_map = field_len(3, field_len(2, '\64\0\0\0' .. 'short'))
    fails_with(function() spm.from_bytes(good .. bad_map, { path = 'x.model' }) end, 'x.model', 'precompiled_charsmap')
  end)

  it('rejects text that is not UTF-8', function()
    fails_with(function() model('bpe_nfkc'):encode('ok\255') end, 'not valid UTF-8', 'offset 2')
  end)

  it('reads f32 scores exactly, NaN included', function()
    local pb = require 'pmp.tokenizer.protobuf'
    assert.equal(1.0, pb.float32('\0\0\128\63'))
    assert.equal(-2.0, pb.float32('\0\0\0\192'))
    assert.equal(2 ^ -149, pb.float32('\1\0\0\0'))          -- the smallest subnormal
    assert.equal(-math.huge, pb.float32('\0\0\128\255'))
    local nan = pb.float32('\255\255\255\255')           -- a NaN with a payload: once a crash
    assert.is_true(nan ~= nan)
    local nan_score = field_len(1, field_len(1, 'c') .. '\21\255\255\255\255')
    local tok = spm.from_bytes(good .. nan_score, { path = 'nan.model' })
    assert.equal(5, #tok:encode('abcabc'))
  end)

  it('fails cleanly, naming the file, on randomly damaged models', function()
    math.randomseed(13)
    local bytes = model_bytes('unigram_nfkc_cf')
    for _ = 1, 40 do
      local s = bytes
      for _ = 1, math.random(1, 6) do
        local pos = math.random(1, #s)
        s = s:sub(1, pos - 1) .. string.char(math.random(0, 255)) .. s:sub(pos + 1)
      end
      local ok, tok = pcall(spm.from_bytes, s, { path = 'damaged.model' })
      if ok then
        local encoded, ids = pcall(tok.encode, tok, 'Hello ＡＢＣ ﬁ 你好 😀 <tool> naïve')
        assert(encoded or tostring(ids):find('damaged.model', 1, true), tostring(ids))
        if encoded then tok:decode(ids) end
      else
        assert(tostring(tok):find('pmp.tokenizer: damaged.model', 1, true), tostring(tok))
      end
    end
  end)
end)
