require 'busted.runner'()
-- tiktoken-format ranks files (Qwen 1's qwen.tiktoken): ids equal to the `tiktoken` package built from
-- the same ranks with Qwen 1's regex and special tokens, on a multilingual corpus
-- (spec/fixtures/tiktoken from tools/make_spm_fixtures.py); decoding; from_pretrained picking the
-- file; errors naming the file and line of a malformed ranks file.
local json = require 'pmp.json'
local pio = require 'pmp.io'
local tokenizer = require 'pmp.tokenizer'
local tiktoken = require 'pmp.tokenizer.tiktoken'
local fails_with = require('spec.support.expect').fails_with

local ROOT = package.loaded['pmp.root'] or '.'
local FIXTURES = ROOT .. '/spec/fixtures/tiktoken'
local RANKS = FIXTURES .. '/qwen.tiktoken'

local function list(ids) return table.concat(ids, ',') end

local function expect_none(bad, total, label)
  if #bad > 0 then
    error(string.format('%s: %d of %d cases differ from tiktoken, e.g.\n%s', label, #bad, total,
      table.concat(bad, '\n', 1, math.min(#bad, 4))), 2)
  end
end

local cases = {}
for line in io.lines(FIXTURES .. '/cases.jsonl') do cases[#cases + 1] = json.decode(line) end

local tok
local function qwen()
  tok = tok or tokenizer.from_pretrained(RANKS)
  return tok
end

describe('pmp.tokenizer.tiktoken against the tiktoken package', function()
  it('encodes the corpus with special tokens allowed, as Qwen 1 does (after NFC)', function()
    local bad = {}
    for _, c in ipairs(cases) do
      local ids = qwen():encode(c.text)
      if list(ids) ~= list(c.ids) then bad[#bad + 1] = string.format('%q: %s, want %s', c.text, list(ids), list(c.ids)) end
    end
    assert.is_true(#cases > 150)
    expect_none(bad, #cases, 'encode')
  end)

  it('encodes special tokens as text when asked (encode_ordinary)', function()
    local bad = {}
    for _, c in ipairs(cases) do
      local ids = qwen():encode(c.text, { split_special_tokens = true })
      if list(ids) ~= list(c.ordinary) then bad[#bad + 1] = string.format('%q: %s, want %s', c.text, list(ids), list(c.ordinary)) end
    end
    expect_none(bad, #cases, 'encode_ordinary')
  end)

  it('decodes as tiktoken does (bad UTF-8 -> U+FFFD)', function()
    local bad = {}
    for _, c in ipairs(cases) do
      local text = qwen():decode(c.ids)
      if text ~= c.decoded then bad[#bad + 1] = string.format('%s: %q, want %q', list(c.ids), text, c.decoded) end
    end
    expect_none(bad, #cases, 'decode')
    assert.equal('\239\191\189', qwen():decode({ 0xE4 }))   -- a lone lead byte (rank = byte here)
  end)

  it("has Qwen 1's special tokens and vocabulary size", function()
    local t = qwen()
    assert.equal('qwen', t.preset)
    assert.equal(151643, t:token_to_id('<|endoftext|>'))
    assert.equal(151645, t:token_to_id('<|im_end|>'))
    assert.equal(151643 + 207, t:token_to_id('<|extra_204|>'))
    assert.equal(151643 + 208, t.vocab_size)
    assert.equal(151643, t.eos_id)
    assert.equal('<|im_start|>', t:id_to_token(151644))
    local ids = t:encode('hi there')
    table.insert(ids, 1, 151644)
    assert.equal('hi there', t:decode(ids, { skip_special_tokens = true }))
    assert.equal('<|im_start|>hi there', t:decode(ids))
    -- ordinary tokens: id = rank, token = bytes
    assert.equal(65, t:token_to_id('A'))
    assert.equal('A', t:id_to_token(65))
    assert.is_nil(t:token_to_id('certainly not one token'))
  end)
end)

describe('pmp.tokenizer.tiktoken files', function()
  local tmp
  setup(function()
    tmp = string.format('%s/pmp_tik_spec.%d.%d', os.getenv('TMPDIR') or '/tmp', pio.getpid(), math.random(1e9))
    pio.mkdir_p(tmp)
  end)
  teardown(function() if tmp then pio.remove_tree(tmp) end end)

  -- The 256 single bytes (rank = byte value) plus extra lines.
  local function ranks_text(extra)
    local lines = {}
    local b64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
    for b = 0, 255 do
      local hi, lo = math.floor(b / 4), b % 4
      lines[#lines + 1] = b64:sub(hi + 1, hi + 1) .. b64:sub(lo * 16 + 1, lo * 16 + 1) .. '== ' .. b
    end
    for _, l in ipairs(extra or {}) do lines[#lines + 1] = l end
    return table.concat(lines, '\n') .. '\n'
  end

  it('from_pretrained finds the one *.tiktoken file of a directory', function()
    local dir = tmp .. '/qwen'
    pio.mkdir_p(dir)
    pio.write_atomic(dir .. '/qwen.tiktoken', pio.read_file(RANKS))
    local t = tokenizer.from_pretrained(dir)
    assert.equal(tiktoken.Tokenizer, getmetatable(t))
    assert.same(cases[1].ids, t:encode(cases[1].text))
    pio.write_atomic(dir .. '/other.tiktoken', ranks_text())
    fails_with(function() tokenizer.from_pretrained(dir) end, 'several tiktoken files', 'other.tiktoken')
  end)

  it('merges by rank, lowest first and leftmost among equals', function()
    -- "ab" = 256, "bc" = 257, "abc" = 258: "abc" -> a+b first (rank 256), then ab+c -> 258
    local t = tiktoken.from_bytes(ranks_text({ 'YWI= 256', 'YmM= 257', 'YWJj 258' }), { path = 'r', pattern = [[\S+]] })
    assert.same({ 258 }, t:encode('abc'))
    assert.same({ 256, 256 }, t:encode('abab'))
    -- without "abc": "abc" -> ab, c
    local u = tiktoken.from_bytes(ranks_text({ 'YWI= 256', 'YmM= 257' }), { path = 'r', pattern = [[\S+]] })
    assert.same({ 256, 99 }, u:encode('abc'))
    assert.same({ 98, 257 }, u:encode('bbc'))
    -- text the regex does not match is dropped, as tiktoken drops it
    assert.same({ 256, 256 }, u:encode('ab ab'))
  end)

  it('names the file and line of a bad line', function()
    local function load(extra) return function() tiktoken.from_bytes(ranks_text(extra), { path = 'bad.tiktoken', preset = 'qwen' }) end end
    fails_with(load({ 'YW*= 256' }), 'bad.tiktoken', 'line 257', 'not base64')
    fails_with(load({ 'YWJ 256' }), 'bad.tiktoken', 'line 257', 'multiple of 4')
    fails_with(load({ 'YWI=' }), 'bad.tiktoken', 'line 257', "expected 'base64-token rank'")
    fails_with(load({ 'YWI= 25x' }), 'bad.tiktoken', 'line 257')
    fails_with(load({ 'YWI= 256', 'YWI= 257' }), 'bad.tiktoken', 'line 258', 'listed twice')
    fails_with(load({ 'YWI= 255' }), 'bad.tiktoken', 'line 257', 'rank 255')
    fails_with(load({ 'YWI= 2000000000' }), 'bad.tiktoken', 'line 257', 'rank 2000000000 is not below')
    fails_with(function() tiktoken.from_bytes('QQ== 65\n', { path = 'few.tiktoken', preset = 'qwen' }) end,
      'few.tiktoken', 'byte 0x00 has no rank')
    fails_with(function() tiktoken.from_bytes(ranks_text(), { path = 'x.tiktoken' }) end, 'x.tiktoken', 'no split regex')
    fails_with(function() tiktoken.from_bytes(ranks_text({ 'YWI= 151643' }), { path = 'q.tiktoken', preset = 'qwen' }) end,
      'q.tiktoken', '<|endoftext|>', '151643')
  end)

  it('rejects text that is not UTF-8', function()
    fails_with(function() qwen():encode('ok\255') end, 'not valid UTF-8', 'offset 2')
  end)
end)
