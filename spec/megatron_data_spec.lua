require 'busted.runner'()
-- Data pipeline parity with Megatron-LM: tools/preprocess_data.lua's bytes against megatron-core's
-- (spec/fixtures/megatron_data, written by tools/make_megatron_data_fixtures.py).
local shell = require 'spec.support.shell'
local indexed = pmp.data.indexed

local FIXTURES = shell.root .. '/spec/fixtures/megatron_data'
local TOKENIZERS = shell.root .. '/../shared/tokenizers'
local expected = pmp.json.decode(pmp.io.read_file(FIXTURES .. '/expected.json'))

local function sha256_of(path)
  local out = shell.run('sha256sum ' .. shell.quote(path))
  return out:match('^(%x+)')
end

local function preprocess(args)
  return shell.run_pmp({ shell.root .. '/tools/preprocess_data.lua', unpack(args) })
end

-- The documents of an indexed dataset as lists of sequences of token ids, as the fixture lists them.
local function documents_of(prefix)
  local ds = indexed.open(prefix)
  local di, docs = ds.document_indices:totable(), {}
  for d = 1, #di - 1 do
    local doc = {}
    for s = di[d], di[d + 1] - 1 do doc[#doc + 1] = ds:totable(s) end
    docs[d] = doc
  end
  ds:close()
  return docs
end

-- A document (a list of sequences) as text: [[1,2],[3]].
local function show(doc)
  if doc == nil then return 'none' end
  local parts = {}
  for k, s in ipairs(doc) do parts[k] = '[' .. table.concat(s, ',') .. ']' end
  return '[' .. table.concat(parts, ',') .. ']'
end

-- The first document where got and want differ, for a readable failure.
local function first_difference(got, want)
  for d = 1, math.max(#got, #want) do
    if show(got[d]) ~= show(want[d]) then
      return string.format('document %d: pmp %s, Megatron %s', d - 1, show(got[d]), show(want[d]))
    end
  end
end

local function assert_megatron_output(prefix, want)
  local docs = documents_of(prefix)
  assert.is_nil(first_difference(docs, want.documents))
  assert.are.equal(want.bin_sha256, sha256_of(prefix .. '.bin'), prefix .. '.bin')
  assert.are.equal(want.idx_sha256, sha256_of(prefix .. '.idx'), prefix .. '.idx')
end

local hf_ready = pmp.data.dataset_tokenizer.hf_available() and pmp.io.is_file(TOKENIZERS .. '/llama3/tokenizer.json')
  and pmp.io.is_file(TOKENIZERS .. '/qwen3/tokenizer.json')

describe("tools/preprocess_data.lua against Megatron-LM's preprocess_data.py", function()
  local dir
  setup(function()
    dir = shell.temp_dir()
    if not hf_ready then return end
    -- llama3 with Meta's BOS post-processor, as the fixture script makes it
    -- (spliced into the text: decoding and re-encoding 9 MB of JSON would take seconds)
    local text = pmp.io.read_file(TOKENIZERS .. '/llama3/tokenizer.json')
    local key_at, _, open_at = text:find('"post_processor":%s*()')
    local close_at = text:find('}', open_at, true)
    assert(key_at and text:sub(open_at, close_at):match('^{[^{}]*}$'), 'llama3 post_processor is not a flat object')
    pmp.io.mkdir_p(dir .. '/llama3_bos')
    shell.write_file(dir .. '/llama3_bos/tokenizer.json',
      text:sub(1, open_at - 1) .. pmp.json.encode(expected.bos_post_processor) .. text:sub(close_at + 1))
    shell.write_file(dir .. '/llama3_bos/tokenizer_config.json', pmp.io.read_file(TOKENIZERS .. '/llama3/tokenizer_config.json'))
  end)
  teardown(function() shell.remove_dir(dir) end)

  local function tokenizer_dir(name)
    return name == 'llama3_bos' and dir .. '/llama3_bos' or TOKENIZERS .. '/' .. name
  end

  for n, case in ipairs(expected.preprocess) do
    local test = hf_ready and it or pending
    test('writes the bytes megatron-core writes: ' .. case.name, function()
      local prefix = dir .. '/case' .. n
      local args = { '--input', FIXTURES .. '/corpus.jsonl', '--output-prefix', prefix, '--json-keys' }
      for _, key in ipairs(case.json_keys) do args[#args + 1] = key end
      for _, flag in ipairs(case.flags) do args[#args + 1] = flag end
      local spelled = {
        megatron = { '--tokenizer-type', 'HuggingFaceTokenizer', '--tokenizer-model', tokenizer_dir(case.tokenizer) },
        pai = { '--patch-tokenizer-type', 'Qwen2Tokenizer', '--load', tokenizer_dir(case.tokenizer) },
        gpt2 = { '--tokenizer-type', 'GPT2BPETokenizer', '--vocab-file', FIXTURES .. '/gpt2/vocab.json',
          '--merge-file', FIXTURES .. '/gpt2/merges.txt' },
      }
      for _, word in ipairs(spelled[case.spelling]) do args[#args + 1] = word end
      local _, err, status = preprocess(args)
      assert.are.equal(0, status, err)
      for _, key in ipairs(case.json_keys) do
        assert_megatron_output(prefix .. '_' .. key .. case.suffix, case.outputs[key])
      end
      assert.are.same({}, (shell.run('ls ' .. shell.quote(dir) .. ' | grep -E "partition|workers|_ss"')):match('%S') and
        { 'scratch files left' } or {})
    end)
  end

  local function case_named(name)
    for _, case in ipairs(expected.preprocess) do if case.name == name then return case end end
    error('no fixture case ' .. name)
  end

  ;(hf_ready and it or pending)('deals the lines of a glob of files (.gz too) to --partitions in file-name order', function()
    -- the corpus cut in two, the second half gzipped: dealt as one stream, as Megatron deals them
    local lines = {}
    for line in pmp.io.read_file(FIXTURES .. '/corpus.jsonl'):gmatch('[^\n]*\n') do lines[#lines + 1] = line end
    pmp.io.mkdir_p(dir .. '/parts')
    shell.write_file(dir .. '/parts/corpus_1.jsonl', table.concat(lines, '', 1, 4))
    shell.write_file(dir .. '/parts/corpus_2.jsonl', table.concat(lines, '', 5))
    assert.are.equal(0, select(3, shell.run('gzip ' .. shell.quote(dir .. '/parts/corpus_2.jsonl'))))
    local case = case_named('qwen3 --partitions 3 (round robin)')
    local _, err, status = preprocess({ '--input', dir .. '/parts/corpus_*', '--output-prefix', dir .. '/glob',
      '--tokenizer-type', 'HuggingFaceTokenizer', '--tokenizer-model', tokenizer_dir(case.tokenizer), unpack(case.flags) })
    assert.are.equal(0, status, err)
    assert_megatron_output(dir .. '/glob_text_document', case.outputs.text)
  end)

  it('prints Megatron\'s progress line every --log-interval documents', function()
    local _, err, status = preprocess({ '--input', FIXTURES .. '/corpus.jsonl', '--output-prefix', dir .. '/log',
      '--tokenizer-type', 'byte', '--log-interval', '4' })
    assert.are.equal(0, status, err)
    local counts = {}
    for n in err:gmatch('Processed (%d+) documents %([%d.]+ docs/s, [%d.]+ MB/s%)%.') do counts[#counts + 1] = tonumber(n) end
    assert.are.same({ 4, 8 }, counts)   -- 9 documents
  end)
end)

describe("dataset index caches shared with megatron-core (spec/fixtures/megatron_data/cache)", function()
  local G, mcache = pmp.data.gpt_dataset, require 'pmp.data.megatron_cache'
  local ffi = require 'ffi'
  pcall(ffi.cdef, 'int chdir(const char *path);')
  local GPT_FIXTURES = shell.root .. '/spec/fixtures/gpt_dataset'
  local home = pmp.data.dataset_tokenizer.getcwd()
  local dir

  -- A scratch directory holding data/a and data/b (and, with_cache, megatron-core's cache files
  -- where it wrote them), made the current directory, as the fixture script's was.
  local function scratch(with_cache)
    dir = shell.temp_dir()
    pmp.io.mkdir_p(dir .. '/data')
    for _, name in ipairs({ 'a.bin', 'a.idx', 'b.bin', 'b.idx' }) do
      shell.write_file(dir .. '/data/' .. name, pmp.io.read_file(GPT_FIXTURES .. '/' .. name))
    end
    if with_cache then
      for _, case in ipairs(expected.cache) do
        for _, f in ipairs(case.files) do
          pmp.io.mkdir_p(pmp.io.dirname(dir .. '/' .. f))
          shell.write_file(dir .. '/' .. f, pmp.io.read_file(FIXTURES .. '/cache/' .. f))
        end
      end
    end
    assert(ffi.C.chdir(dir) == 0)
  end
  after_each(function()
    ffi.C.chdir(home)
    collectgarbage()
    if dir then shell.remove_dir(dir) end
    dir = nil
  end)

  local function files_under(path)
    local out = shell.run('cd ' .. shell.quote(path) .. ' && find . -type f | sort')
    return out
  end

  local qwen3 = pmp.data.dataset_tokenizer.megatron_identifiers({ type = 'hf' }, 'qwen3')

  local function build(case, tokenizer)
    local sizes = {}
    for k, name in ipairs(G.SPLITS) do
      if case.sizes[k] ~= pmp.json.null then sizes[name] = case.sizes[k] end
    end
    return G.build(case.data_path, { seq_length = case.seq_length, seed = case.seed, split = case.split,
      sizes = sizes, tokenizer = tokenizer or qwen3, cache_dir = case.cache ~= pmp.json.null and case.cache or nil })
  end

  local function gpt_parts(ds)
    return ds.datasets or { ds }
  end

  it("describes the HF tokenizer as megatron-core's build_tokenizer does", function()
    local want = pmp.json.decode(pmp.io.read_file(FIXTURES .. '/expected.json'), { ordered = true }).cache_tokenizer
    local pairs_list = {}
    for _, key in ipairs(pmp.json.keys(want)) do pairs_list[#pairs_list + 1] = { key, want[key] } end
    assert.are.equal(mcache.describe(mcache.object(pairs_list)), mcache.describe(qwen3))
  end)

  it("uses the indices megatron-core cached (its names, its .npy files) and gives its first batches", function()
    scratch(true)
    local before = files_under(dir)
    for _, case in ipairs(expected.cache) do
      local sets = build(case)
      for name, want in pairs(case.splits) do
        local ds = sets[name]
        if want.count == 0 then
          assert.is_nil(ds, case.name .. ': ' .. name)
        else
          assert.are.equal(want.count, ds.count, case.name .. ': ' .. name)
          for _, g in ipairs(gpt_parts(ds)) do assert.is_true(g.from_cache, case.name .. ': ' .. tostring(g)) end
          if ds.datasets then assert.are.equal(case.cache ~= pmp.json.null, ds.from_cache == true, case.name) end
          for i, tokens in ipairs(want.first_samples) do
            assert.are.same(tokens, ds:sample(i - 1):totable(), case.name .. ': ' .. name .. ' sample ' .. (i - 1))
          end
        end
      end
    end
    assert.are.equal(before, files_under(dir))   -- nothing rebuilt
  end)

  it('finds a megatron-core cache whose description names another tokenizer', function()
    scratch(true)
    local before = files_under(dir)
    local case = expected.cache[1]
    local sets = build(case, mcache.object({ { 'class', 'pmp.byte' } }))
    assert.is_true(sets.train.from_cache)
    assert.are.same(case.splits.train.first_samples[1], sets.train:sample(0):totable())
    assert.are.equal(before, files_under(dir))
  end)

  it('rebuilds rather than reading a cache through data written anew under the same path', function()
    scratch(true)
    -- data/a with its first two sequences swapped: the same sequences and tokens, other lengths in place
    local a = indexed.open('data/a')
    local docs = {}
    for k = 0, #a - 1 do docs[k + 1] = { a:totable(k) } end
    a:close()
    docs[1], docs[2] = docs[2], docs[1]
    indexed.write('data/a', docs, { dtype = 'int32' })
    local sets = build(expected.cache[1])
    assert.is_false(sets.train.from_cache)
    assert.is_true(sets.valid.from_cache)   -- its sequences did not move
  end)

  it('writes the cache files megatron-core writes, byte for byte, so megatron-core uses them', function()
    scratch(false)
    for _, case in ipairs(expected.cache) do
      build(case)
      for _, f in ipairs(case.files) do
        local split = f:match('%-GPTDataset%-(%a+)%-') or f:match('%-BlendedDataset%-(%a+)%-')
        if case.splits[split] and case.splits[split].count > 0 then
          assert.is_true(pmp.io.is_file(dir .. '/' .. f), case.name .. ': ' .. f)
          assert.are.equal(pmp.io.read_file(FIXTURES .. '/cache/' .. f), pmp.io.read_file(dir .. '/' .. f), f)
        end
      end
    end
  end)

  it('pretraining data caches under --data-cache-path with megatron-core names (pmp.train.data)', function()
    scratch(false)
    local data = require('pmp.train.data').pretraining({ data_path = { 'data/a' }, data_cache_path = 'mycache',
      split = '90, 8, 2', seq_length = 8, seed = 1234, train_iters = 5, global_batch_size = 4, eval_interval = 5,
      eval_iters = 1, tokenizer_type = 'byte' }, { name = 'spec' })
    assert.is_false(data.train.from_cache)
    local names = pmp.io.listdir('mycache')
    table.sort(names)
    assert.are.equal(12, #names)   -- train, valid, test: description + 3 indices each
    local description = pmp.io.read_file('mycache/' .. names[1])
    assert.matches('^' .. string.rep('%x', 32) .. '%-GPTDataset%-%a+%-description%.txt$', names[1])
    assert.are.equal(names[1]:sub(1, 32), mcache.md5(description))
    assert.matches('"dataset_path": "data/a",\n    "num_samples": %d+,', description)
    assert.matches('"tokenizer": {\n        "class": "pmp.byte"\n    }\n}$', description)
  end)

  it('refuses what megatron-core refuses: zero weights, weights without sizes, samples past the end, oversampling blends', function()
    scratch(false)
    local r = {}
    for _, c in ipairs(expected.refusals.cases) do r[c.name] = c end
    local base = { split = '90, 8, 2', seed = 1, seq_length = 8, cache = false }
    local function with(data_path, sizes)
      local c = {}
      for k, v in pairs(base) do c[k] = v end
      c.data_path, c.sizes = data_path, sizes
      return c
    end
    local function outcome(fn)
      local ok, err = pcall(fn)
      return ok and 'accepted' or tostring(err)
    end
    local null = pmp.json.null
    local function check(name, fn, phrase)
      local got = outcome(fn)
      if r[name].raises == null then
        assert.are.equal('accepted', got, name)
      else
        assert.is_truthy(got:find(phrase, 1, true), name .. ': ' .. got)
      end
    end
    check('zero weight', function() build(with({ '0', 'data/a', '1', 'data/b' }, { 50, 5, 2 })) end, 'is not positive')
    check('positive weights (control)', function() build(with({ '1', 'data/a', '1', 'data/b' }, { 50, 5, 2 })) end)
    check('weights without sizes', function() build(with({ '1', 'data/a', '1', 'data/b' }, { null, null, null })) end,
      'requires client-specified size')
    local single = build(with({ 'data/a' }, { 20, null, null })).train
    assert.are.equal(expected.refusals.single_count, single.count)
    check('last sample (control)', function() single:sample(single.count - 1) end)
    check('sample past the end', function() single:sample(single.count) end, 'is past the ' .. single.count .. ' samples')
    local a = build(with({ 'data/a' }, { 10, null, null })).train
    local b = build(with({ 'data/b' }, { 10, null, null })).train
    assert.are.same(expected.refusals.blend_counts, { a.count, b.count })
    check('blend within its datasets (control)', function()
      G.BlendedDataset({ a, b }, { 0.5, 0.5 }, { size = expected.refusals.blend_fits })
    end)
    check('blend oversampling a dataset', function()
      G.BlendedDataset({ a, b }, { 0.5, 0.5 }, { size = 2 * math.max(a.count, b.count) + 2 })
    end, 'the train blend oversamples the contributing datasets and, for example, requests 129 samples from dataset 1')
  end)
end)
