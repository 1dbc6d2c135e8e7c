require 'busted.runner'()
-- pmp.tokenizer: ids equal to the Python `tokenizers` package on real tokenizer files (the shared
-- reference cases, and spec/fixtures/tokenizer_cases.jsonl from tools/make_tokenizer_cases.py, which
-- also holds small synthetic tokenizers), decode round trips, the API, and errors on bad input.
local json = require 'pmp.json'
local pio = require 'pmp.io'
local tokenizer = require 'pmp.tokenizer'
local fails_with = require('spec.support.expect').fails_with

local ROOT = package.loaded['pmp.root'] or '.'
local SHARED = ROOT .. '/../shared/tokenizers'
local FIXTURE = ROOT .. '/spec/fixtures/tokenizer_cases.jsonl'
local have_shared = pio.is_dir(SHARED)
local NAMES = { 'qwen3', 'llama3', 'deepseek_v3', 'sp32k' }

local loaded = {}
local function real(name)
  if not loaded[name] then loaded[name] = tokenizer.from_pretrained(SHARED .. '/' .. name) end
  return loaded[name]
end

local function read_jsonl(path)
  local out = {}
  for line in io.lines(path) do
    if line:match('%S') then out[#out + 1] = json.decode(line) end
  end
  return out
end

local function same(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do if a[i] ~= b[i] then return false end end
  return true
end

-- Runs encode cases ({text, add_special_tokens, ids}), batch cases ({batch, add_special_tokens, ids})
-- and decode cases ({ids, skip_special_tokens, decoded}); fails listing the first mismatches.
local function check_cases(tok, cases, label)
  local bad, shown = 0, {}
  for _, c in ipairs(cases) do
    local ok, got, want, what
    if c.batch then
      got = tok:encode_batch(c.batch, { add_special_tokens = c.add_special_tokens })
      ok = #got == #c.ids
      for i = 1, #c.ids do ok = ok and same(got[i], c.ids[i]) end
      local function rows(t)
        local r = {}
        for i, ids in ipairs(t) do r[i] = table.concat(ids, ',') end
        return table.concat(r, ' | ')
      end
      what, got, want = 'batch ' .. json.encode(c.batch), rows(got), rows(c.ids)
    elseif c.text then
      got = tok:encode(c.text, { add_special_tokens = c.add_special_tokens })
      ok = same(got, c.ids)
      what, got, want = string.format('%q', c.text), table.concat(got, ','), table.concat(c.ids, ',')
    else
      got = tok:decode(c.ids, { skip_special_tokens = c.skip_special_tokens })
      ok = got == c.decoded
      what, got, want = 'decode ' .. table.concat(c.ids, ','), string.format('%q', got), string.format('%q', c.decoded)
    end
    if not ok then
      bad = bad + 1
      if #shown < 3 then shown[#shown + 1] = string.format('%s\n    want %s\n    got  %s', what, want, got) end
    end
  end
  assert(bad == 0, string.format('%s: %d of %d cases differ:\n  %s', label, bad, #cases, table.concat(shown, '\n  ')))
  return #cases
end

describe('pmp.tokenizer on the shared reference cases', function()
  if not have_shared then
    pending('../shared/tokenizers is not here: reference cases skipped')
    return
  end
  local by_name = {}
  for _, c in ipairs(read_jsonl(SHARED .. '/cases.jsonl')) do
    by_name[c.tokenizer] = by_name[c.tokenizer] or {}
    table.insert(by_name[c.tokenizer], c)
  end
  for _, name in ipairs(NAMES) do
    it('reproduces every case of ' .. name, function()
      assert.is_true(by_name[name] ~= nil and #by_name[name] > 0, 'no cases for ' .. name)
      check_cases(real(name), by_name[name], name)
    end)
  end
end)

describe('pmp.tokenizer on tools/make_tokenizer_cases.py fixtures', function()
  local cases = read_jsonl(FIXTURE)
  local synthetic, by_name, order = {}, {}, {}
  for _, c in ipairs(cases) do
    if c.tokenizer_json then
      synthetic[c.tokenizer_name] = c.tokenizer_json
    else
      if not by_name[c.tokenizer] then order[#order + 1] = c.tokenizer end
      by_name[c.tokenizer] = by_name[c.tokenizer] or {}
      table.insert(by_name[c.tokenizer], c)
    end
  end
  for _, name in ipairs(order) do
    if synthetic[name] then
      it('matches the synthetic tokenizer ' .. name, function()
        local tok = tokenizer.from_json(json.decode(synthetic[name]), { path = name })
        check_cases(tok, by_name[name], name)
      end)
    elseif have_shared then
      it('matches the extra cases of ' .. name, function() check_cases(real(name), by_name[name], name) end)
    else
      pending('../shared/tokenizers is not here: extra cases of ' .. name .. ' skipped')
    end
  end
end)

describe('pmp.tokenizer round trips', function()
  if not have_shared then
    pending('../shared/tokenizers is not here')
    return
  end
  local texts = {
    'Hello, world! ', "  we've   got  spaces\n\n\ttabs\r\n", 'naïve café 0x7fffffff -42 1e-5', '你好，世界。日本語カタカナ',
    '😀 👨‍👩‍👧 🇨🇳', 'def f(x):\n    return x ** 2\n', 'Привет мир Ελληνικά עברית العربية हिन्दी', '', ' ', '\n',
    'a' .. string.rep('b', 500) .. ' ' .. string.rep('9', 300), '\u{FFFD}\u{10FFFF}\u{E000}',
  }
  for _, name in ipairs(NAMES) do
    it('decode(encode(x)) == x for ' .. name, function()
      local tok = real(name)
      for _, text in ipairs(texts) do
        local ids = tok:encode(text, { add_special_tokens = false })
        assert.equal(text, tok:decode(ids))   -- the texts are NFC already
        -- special tokens added by the post-processor disappear with skip_special_tokens
        assert.equal(text, tok:decode(tok:encode(text), { skip_special_tokens = true }))
      end
    end)
  end

  it('keeps special tokens in the text as single tokens', function()
    local q = real('qwen3')
    local ids = q:encode('<|im_start|>user\nhi<|im_end|>')
    assert.equal(151644, ids[1])
    assert.equal(151645, ids[#ids])
    assert.equal('<|im_start|>user\nhi<|im_end|>', q:decode(ids))
    assert.equal('user\nhi', q:decode(ids, { skip_special_tokens = true }))
  end)
end)

describe('pmp.tokenizer API', function()
  if not have_shared then
    pending('../shared/tokenizers is not here')
    return
  end

  it('reports vocabulary sizes and special ids from tokenizer_config.json', function()
    local expect = {
      qwen3 = { 151669, nil, 151645, 151643 },
      llama3 = { 128256, 128000, 128001, nil },
      deepseek_v3 = { 128815, 0, 1, 1 },
      sp32k = { 32000, 1, 2, nil },
    }
    for name, e in pairs(expect) do
      local tok = real(name)
      assert.equal(e[1], tok.vocab_size, name)
      assert.equal(e[2], tok.bos_id, name)
      assert.equal(e[3], tok.eos_id, name)
      assert.equal(e[4], tok.pad_id, name)
    end
    assert.is_true(real('deepseek_v3').add_bos_token)
    assert.is_false(real('qwen3').add_bos_token)
  end)

  it('maps tokens and ids both ways', function()
    local q = real('qwen3')
    assert.equal(151645, q:token_to_id('<|im_end|>'))
    assert.equal('<|im_end|>', q:id_to_token(151645))
    assert.equal(0, q:token_to_id('!'))
    assert.equal('Ġthe', q:id_to_token(q:token_to_id('Ġthe')))
    assert.is_nil(q:token_to_id('no such token'))
    assert.is_nil(q:id_to_token(10 ^ 9))
    local s = real('sp32k')
    assert.equal(13, s:token_to_id('<0x0A>'))
    assert.equal('<unk>', s:id_to_token(0))
  end)

  it('adds BOS through the post-processor, or on request', function()
    local s, l = real('sp32k'), real('llama3')
    assert.same({ 1, 22557 }, s:encode('Hello'))
    assert.same({ 22557 }, s:encode('Hello', { add_special_tokens = false }))
    local plain = l:encode('Hello')
    assert.are_not.equal(128000, plain[1])   -- this tokenizer.json's post-processor adds none
    local with = l:encode('Hello', { add_bos = true, add_eos = true })
    assert.equal(128000, with[1])
    assert.equal(128001, with[#with])
    assert.equal(#plain + 2, #with)
    assert.same(s:encode('Hello'), s:encode('Hello', { add_bos = true }))   -- no second BOS
    fails_with(function() real('qwen3'):encode('x', { add_bos = true }) end, 'no BOS')
  end)

  it('encodes batches like single texts', function()
    local q = real('qwen3')
    local texts = { 'one', 'two words', '', '<|endoftext|>three' }
    local batch = q:encode_batch(texts)
    assert.equal(#texts, #batch)
    for i, t in ipairs(texts) do assert.same(q:encode(t), batch[i]) end
    assert.same({}, q:encode(''))
  end)

  it('splits with \\p{L} etc. as the reference does, including letters newer than PCRE2 tables', function()
    local q = real('qwen3')
    -- U+1E4D8 (Nag Mundari, Unicode 15) is a letter for the reference: "'S" stays a contraction
    assert.same({ '\u{1E4D8}', "'S", 'ab' }, q:pre_tokenize("\u{1E4D8}'Sab"))
    assert.same({ 'Hello', ' world', '!' }, q:pre_tokenize('Hello world!'))
  end)

  it('encodes long inputs and keeps the cache transparent', function()
    local d = real('deepseek_v3')
    local text = string.rep('The quick brown fox, 12345 times. ', 2000)
    local cached = d:encode(text)
    d:set_cache(false)
    local fresh = d:encode(text)
    d:set_cache(true)
    assert.is_true(same(cached, fresh))
    assert.equal(text, d:decode(cached))
  end)
end)

describe('pmp.tokenizer errors', function()
  local tmp
  setup(function()
    tmp = string.format('%s/pmp_tok_spec.%d.%d', os.getenv('TMPDIR') or '/tmp', pio.getpid(), math.random(1e9))
    pio.mkdir_p(tmp)
  end)
  teardown(function() if tmp then pio.remove_tree(tmp) end end)

  local function tiny(edit)
    local spec = {
      version = '1.0',
      added_tokens = { { id = 3, content = '<s>', single_word = false, lstrip = false, rstrip = false,
        normalized = false, special = true } },
      normalizer = json.null, pre_tokenizer = json.null, post_processor = json.null, decoder = json.null,
      model = { type = 'BPE', vocab = { a = 0, b = 1, ab = 2, ['<s>'] = 3 }, merges = { { 'a', 'b' } } },
    }
    if edit then edit(spec) end
    return spec
  end
  local function write_dir(name, text)
    local dir = tmp .. '/' .. name
    pio.mkdir_p(dir)
    local f = assert(io.open(dir .. '/tokenizer.json', 'wb'))
    f:write(text)
    f:close()
    return dir
  end

  it('builds a tiny tokenizer', function()
    local tok = tokenizer.from_pretrained(write_dir('ok', json.encode(tiny())))
    assert.same({ 2, 3, 1, 0 }, tok:encode('ab<s>ba'))
    assert.equal('ab <s> b a', tok:decode({ 2, 3, 1, 0 }))   -- no decoder: tokens joined by spaces
    assert.equal('ab b a', tok:decode({ 2, 3, 1, 0 }, { skip_special_tokens = true }))
    assert.equal(4, tok.vocab_size)
    assert.is_nil(tok.bos_id)   -- no tokenizer_config.json and no post-processor BOS

  end)

  it('names a missing path or a directory without tokenizer.json', function()
    fails_with(function() tokenizer.from_pretrained(tmp .. '/nowhere') end, 'nowhere', 'does not exist')
    pio.mkdir_p(tmp .. '/empty')
    fails_with(function() tokenizer.from_pretrained(tmp .. '/empty') end, 'no tokenizer.json', 'empty')
    fails_with(function() tokenizer.from_pretrained(42) end, 'expects a directory path')
  end)

  it('names the file for malformed JSON', function()
    local dir = write_dir('broken', '{"model": {"type": "BPE", "vocab": {"a": 0}, ')
    fails_with(function() tokenizer.from_pretrained(dir) end, 'broken/tokenizer.json', 'invalid JSON')
    local dir2 = write_dir('array', '[1, 2]')
    fails_with(function() tokenizer.from_pretrained(dir2) end, 'array/tokenizer.json', 'expected a JSON object')
    local dir3 = write_dir('badconfig', json.encode(tiny()))
    local f = assert(io.open(dir3 .. '/tokenizer_config.json', 'wb'))
    f:write('{"bos_token": ')
    f:close()
    fails_with(function() tokenizer.from_pretrained(dir3) end, 'tokenizer_config.json', 'invalid JSON')
  end)

  it('names the key that is wrong', function()
    local cases = {
      { function(s) s.model.type = 'Unigram' end, 'model.type', "unsupported model type 'Unigram'" },
      { function(s) s.model = nil end, 'model', 'missing' },
      { function(s) s.model.vocab = { 1, 2 } end, 'model.vocab', 'expected an object' },
      { function(s) s.model.vocab.a = 'zero' end, 'model.vocab', 'non-negative integer' },
      { function(s) s.model.merges = { { 'a', 'c' } } end, 'model.merges[0]', '"c" is not in the vocabulary' },
      { function(s) s.model.merges = { 'a b c' } end, 'model.merges[0]', 'two tokens' },
      { function(s) s.model.merges = { { 'b', 'a' } } end, 'model.merges[0]', 'merged token "ba"' },
      { function(s) s.model.unk_token = '<unk>' end, 'model.unk_token', 'not in model.vocab' },
      { function(s) s.pre_tokenizer = { type = 'Split', pattern = { Regex = '(a' }, behavior = 'Isolated', invert = false } end,
        'pre_tokenizer.pattern.Regex', 'invalid regex' },
      { function(s) s.pre_tokenizer = { type = 'Split', pattern = { Regex = 'a' }, behavior = 'Sideways' } end,
        'pre_tokenizer.behavior', 'Isolated' },
      { function(s) s.pre_tokenizer = { type = 'Sequence', pretokenizers = { { type = 'UnicodeScripts' } } } end,
        'pre_tokenizer.pretokenizers[0].type', "unsupported pre-tokenizer type 'UnicodeScripts'" },
      { function(s) s.normalizer = { type = 'Precompiled', precompiled_charsmap = 'xx' } end, 'normalizer.type',
        "unsupported normalizer type 'Precompiled'" },
      { function(s) s.decoder = { type = 'CTC' } end, 'decoder.type', "unsupported decoder type 'CTC'" },
      { function(s) s.post_processor = { type = 'TemplateProcessing', single = { { SpecialToken = { id = '<x>' } } },
        special_tokens = {} } end, 'post_processor.special_tokens', "no entry for '<x>'" },
      { function(s) s.added_tokens[1].id = -1 end, 'added_tokens[0].id', 'non-negative integer' },
    }
    for i, c in ipairs(cases) do
      local dir = write_dir('bad' .. i, json.encode(tiny(c[1])))
      fails_with(function() tokenizer.from_pretrained(dir) end, 'bad' .. i .. '/tokenizer.json', c[2], c[3])
    end
  end)

  it('rejects text that is not valid UTF-8 and arguments of the wrong type', function()
    local tok = tokenizer.from_json(tiny())
    fails_with(function() tok:encode('ab\xff') end, 'not valid UTF-8', 'offset 2')
    fails_with(function() tok:encode('\xc3\x28') end, 'not valid UTF-8', 'offset 0')
    fails_with(function() tok:encode('\xed\xa0\x80') end, 'not valid UTF-8')   -- a surrogate
    fails_with(function() tok:encode(nil) end, 'encode expects a string')
    fails_with(function() tok:encode('a', 'x') end, 'options must be a table')
    fails_with(function() tok:encode_batch({ 'a', 5 }) end, 'item 2')
    fails_with(function() tok:encode_batch({ 'a', 'b\xff' }) end, 'item 2', 'UTF-8')
    fails_with(function() tok:decode('ab') end, 'decode expects a list')
    fails_with(function() tok:decode({ 0, 'x' }) end, 'ids[2]')
    fails_with(function() tok:decode({ 0, 1.5 }) end, 'ids[2]', 'not a token id')
    assert.equal('a b', tok:decode({ 0, 1, 999 }))   -- ids that name no token are skipped, as the reference does
  end)
end)
