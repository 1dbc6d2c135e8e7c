require 'busted.runner'()
-- Megatron indexed datasets (.bin/.idx): reader, builder, validation, files written by megatron-core;
-- GPT samples (overlap, splits, blending, determinism, resume, megatron-core's exact order); numpy's
-- RandomState (core/tensor/random_numpy.c); preprocess_data; pretraining on them.
local ffi = require 'ffi'
local shell = require 'spec.support.shell'
local indexed = pmp.data.indexed
local fails_with = require('spec.support.expect').fails_with
local G = pmp.data.gpt_dataset

local FIXTURES = shell.root .. '/spec/fixtures/indexed'

local function read(path) return pmp.io.read_file(path) end
local function write(path, bytes) shell.write_file(path, bytes) end

-- Flattens a list of documents (lists of sequences) into sequences and document indices.
local function flatten(docs)
  local seqs, doc_idx = {}, { 0 }
  for _, d in ipairs(docs) do
    for _, s in ipairs(d) do seqs[#seqs + 1] = s end
    doc_idx[#doc_idx + 1] = #seqs
  end
  return seqs, doc_idx
end

local function assert_dataset(ds, docs, dtype)
  local seqs, doc_idx = flatten(docs)
  assert.are.equal(dtype, ds.dtype)
  assert.are.equal(#seqs, #ds)
  assert.are.same(doc_idx, ds.document_indices:totable())
  local lengths, pointers, at = {}, {}, 0
  for i, s in ipairs(seqs) do
    lengths[i], pointers[i] = #s, at
    at = at + #s * ds.itemsize
  end
  assert.are.same(lengths, ds.sequence_lengths:totable())
  assert.are.same(pointers, ds.sequence_pointers:totable())
  for i, s in ipairs(seqs) do
    assert.are.same(s, ds:get(i - 1):totable())
    assert.are.same(s, ds:totable(i - 1))
  end
end

describe('pmp.data.indexed', function()
  local dir
  before_each(function() dir = shell.temp_dir() end)
  after_each(function()
    collectgarbage()
    shell.remove_dir(dir)
  end)

  local DOCS = { { { 1, 2, 3 }, { 4, 5 } }, {}, { { 65535, 0 } }, { {}, { 7 } } }

  it('round-trips uint16 data (the dtype for vocabularies under 65500)', function()
    assert.are.equal('uint16', indexed.optimal_dtype(65499))
    assert.are.equal('int32', indexed.optimal_dtype(65500))
    indexed.write(dir .. '/u16', DOCS, { vocab_size = 32000 })
    local ds = indexed.open(dir .. '/u16')
    assert_dataset(ds, DOCS, 'uint16')
    assert.are.equal(8, ds.dtype_code)
    assert.are.equal(4, ds:num_documents())
    assert.are.same({ 4, 5 }, ds:get(1, 0, 2):totable())
    assert.are.same({ 2 }, ds:get(0, 1, 1):totable())
    assert.are.same({}, ds:get(0, 3, 0):totable())
    assert.are.same({ 3, 5 }, { ds:document(3) })
    assert.are.equal(4, ds:length(4) + ds:length(0) + ds:length(3))
    assert.are.equal(34 + 12 * 5 + 8 * 5, pmp.io.size(dir .. '/u16.idx'))
    assert.are.equal(2 * 8, pmp.io.size(dir .. '/u16.bin'))
  end)

  it('round-trips int32 data, including ids past 65535 and the int32 extremes', function()
    local docs = { { { 100000, -2147483648, 2147483647 } }, { { 70000 }, { 1, 2 } } }
    indexed.write(dir .. '/i32', docs, { vocab_size = 151000 })
    local ds = indexed.open(dir .. '/i32')
    assert_dataset(ds, docs, 'int32')
    assert.are.equal(4, ds.dtype_code)
    assert.are.equal('i32', ds:get(0).dtype)
  end)

  it('reads in place: int32 and uint16 sequences are views of the mapped .bin, pointers too', function()
    indexed.write(dir .. '/z', { { { 10, 11, 12 }, { 13, 14 } } }, { dtype = 'int32' })
    local live = ffi.C.pmp_mapping_live_count()
    local ds = indexed.open(dir .. '/z')
    assert.are.equal(live + 2, ffi.C.pmp_mapping_live_count())
    local v = ds:get(1)
    local base = ffi.cast('const char *', ds.bin_base)
    assert.are.equal(base + 12, ffi.cast('const char *', v.ptr.data))
    assert.are.equal(base + 16, ffi.cast('const char *', ds:get(1, 1, 1).ptr.data))
    -- the mapping is copy-on-write: writing into a view never reaches the file
    v:fill_(99)
    assert.are.same({ 99, 99 }, ds:get(1):totable())
    local again = indexed.open(dir .. '/z')
    assert.are.same({ 13, 14 }, again:get(1):totable())
    again:close()
    -- a view keeps the file mapped after the dataset is closed and collected
    ds:close()
    ds = nil
    collectgarbage()
    assert.are.same({ 99, 99 }, v:totable())
    v = nil
    collectgarbage()
    collectgarbage()
    assert.are.equal(live, ffi.C.pmp_mapping_live_count())
    -- uint16, the dtype preprocessing writes for small vocabularies, is a view too
    indexed.write(dir .. '/z16', { { { 10, 11, 12 }, { 13, 65535 } } }, { dtype = 'uint16' })
    local ds16 = indexed.open(dir .. '/z16')
    local v16 = ds16:get(1)
    assert.are.equal('u16', v16.dtype)
    assert.are.equal(ffi.cast('const char *', ds16.bin_base) + 6, ffi.cast('const char *', v16.ptr.data))
    assert.are.same({ 13, 65535 }, v16:totable())
    ds16:close()
    indexed.write(dir .. '/u', { { { 10, 11, 12 } } }, { dtype = 'uint16' })
    local u = indexed.open(dir .. '/u')
    local p, n = u:pointer(0, 1)
    assert.are.equal(2, n)
    assert.are.equal(ffi.cast('const char *', u.bin_base) + 2, ffi.cast('const char *', p))
    assert.are.equal(11, p[0])
  end)

  it('merges datasets with add_index, as megatron-core does', function()
    local a = { { { 1, 2 } }, { { 3 }, { 4, 5 } } }
    local b = { {}, { { 6, 7, 8 } } }
    indexed.write(dir .. '/a', a, { dtype = 'uint16' })
    indexed.write(dir .. '/b', b, { dtype = 'uint16' })
    local m = indexed.builder(dir .. '/m', { dtype = 'uint16' })
    m:add_index(dir .. '/a')
    m:add_document({ 9, 9, 9 }, { 1, 2 })
    m:add_index(dir .. '/b')
    m:add_index(dir .. '/a')
    m:finalize()
    local all = {}
    for _, list in ipairs({ a, { { { 9 }, { 9, 9 } } }, b, a }) do
      for _, d in ipairs(list) do all[#all + 1] = d end
    end
    assert_dataset(indexed.open(dir .. '/m'), all, 'uint16')
    indexed.write(dir .. '/c', a, { dtype = 'int32' })
    local bad = indexed.builder(dir .. '/bad', { dtype = 'uint16' })
    assert.has_error(function() bad:add_index(dir .. '/c') end,
      'indexed dataset builder: ' .. dir .. '/bad: cannot add ' .. dir .. '/c: its dtype is int32, this builder writes uint16')
    bad:abort()
  end)

  it('checks what the builder is given and leaves nothing behind when aborted', function()
    local b = indexed.builder(dir .. '/x', { dtype = 'uint16' })
    assert.has_error(function() b:add_document({ 1, 65536 }) end,
      'indexed dataset builder: ' .. dir .. '/x: token 65536 at position 2 does not fit uint16')
    assert.has_error(function() b:add_document({ 1, 2, 3 }, { 1, 1 }) end,
      'indexed dataset builder: ' .. dir .. '/x: lengths add up to 2 but the document has 3 tokens')
    b:add_document(pmp.tensor({ 4, 5 }, { dtype = 'i64' }))
    b:abort()
    assert.are.same({}, pmp.io.listdir(dir))
    local f = indexed.builder(dir .. '/y', { dtype = 'int32' })
    f:add_document(pmp.tensor({ 4, 5 }, { dtype = 'i32' }))
    f:finalize()
    assert.are.same({ 'y.bin', 'y.idx' }, pmp.io.listdir(dir))
    assert.has_error(function() f:add_document({ 1 }) end, 'indexed dataset builder: ' .. dir .. '/y: already finalized or aborted')
  end)

  it('reads the files megatron-core wrote (spec/fixtures/indexed)', function()
    local expected = pmp.json.decode(read(FIXTURES .. '/expected.json'))
    local n = 0
    for name, e in pairs(expected) do
      if type(e) == 'table' and e.sequences then
        n = n + 1
        local ds = indexed.open(FIXTURES .. '/' .. name)
        assert.are.equal(e.dtype, ds.dtype, name)
        assert.are.same(e.document_indices, ds.document_indices:totable(), name)
        assert.are.equal(#e.sequences, #ds, name)
        for i, s in ipairs(e.sequences) do assert.are.same(s, ds:get(i - 1):totable(), name) end
      end
    end
    assert.are.equal(3, n)
  end)

  describe('rejects malformed files with an error naming the file', function()
    local good_idx, good_bin
    before_each(function()
      indexed.write(dir .. '/g', { { { 1, 2, 3 }, { 4 } }, { { 5, 6 } } }, { dtype = 'int32' })
      good_idx, good_bin = read(dir .. '/g.idx'), read(dir .. '/g.bin')
    end)

    local function u64(n)
      local out = {}
      for k = 1, 8 do
        out[k] = string.char(n % 256)
        n = math.floor(n / 256)
      end
      return table.concat(out)
    end
    local function patch(s, at, bytes) return s:sub(1, at) .. bytes .. s:sub(at + #bytes + 1) end

    local function expect(idx, bin, pattern, culprit)
      write(dir .. '/bad.idx', idx)
      write(dir .. '/bad.bin', bin)
      local ok, err = pcall(indexed.open, dir .. '/bad')
      assert.is_false(ok)
      assert.matches('^indexed dataset: ', err)
      assert.is_truthy(err:find(dir .. '/bad.' .. (culprit or 'idx'), 1, true), err)
      assert.matches(pattern, err)
    end

    it('missing, short, foreign', function()
      local ok, err = pcall(indexed.open, dir .. '/nothing')
      assert.is_false(ok)
      assert.is_truthy(err:find(dir .. '/nothing.idx', 1, true), err)
      write(dir .. '/half.idx', good_idx)
      ok, err = pcall(indexed.open, dir .. '/half')
      assert.is_truthy(err:find(dir .. '/half.bin', 1, true), err)
      expect(good_idx:sub(1, 20), good_bin, 'shorter than the 34%-byte header')
      expect('', good_bin, 'shorter than the 34%-byte header')
      expect(patch(good_idx, 0, 'PKIDIDX'), good_bin, 'bad magic')
    end)

    it('wrong version or dtype code', function()
      expect(patch(good_idx, 9, u64(2)), good_bin, 'unsupported version 2')
      expect(patch(good_idx, 17, '\9'), good_bin, 'unknown dtype code 9')
      expect(patch(good_idx, 17, '\0'), good_bin, 'unknown dtype code 0')
      -- a valid code whose item size disagrees with the pointers
      expect(patch(good_idx, 17, '\8'), good_bin, 'sequence 1: pointer 12 but the lengths before it put it at byte 6')
    end)

    it('counts that do not match the file sizes', function()
      expect(good_idx:sub(1, #good_idx - 8), good_bin, 'truncated')
      expect(good_idx .. 'xyzxyzxyzxyz', good_bin, 'bytes too many')
      expect(patch(good_idx, 18, u64(2 ^ 60)), good_bin, 'absurdly large')
      expect(patch(good_idx, 18, u64(4)), good_bin, 'need')
      expect(good_idx, good_bin:sub(1, #good_bin - 4), 'truncated', 'bin')
      expect(good_idx, good_bin .. '\0\0\0\0', 'hold 24 bytes', 'bin')
    end)

    it('pointers, lengths and document indices that disagree', function()
      local S = 3
      local lengths_at, pointers_at, docs_at = 34, 34 + 4 * S, 34 + 12 * S
      expect(patch(good_idx, pointers_at + 8, u64(8)), good_bin, 'sequence 1: pointer 8')
      expect(patch(good_idx, lengths_at, '\255\255\255\255'), good_bin, 'negative length')
      expect(patch(good_idx, docs_at, u64(1)), good_bin, 'start with 1, not 0')
      expect(patch(good_idx, docs_at + 8, u64(4)), good_bin, 'decrease at entry 2 %(3 after 4%)')
      expect(patch(good_idx, docs_at + 16, u64(2)), good_bin, 'last document index is 2, not the sequence count 3')
    end)

    it('and reads through with an error, not a crash, on out-of-range requests', function()
      local ds = indexed.open(dir .. '/g')
      assert.has_error(function() ds:get(3) end, 'indexed dataset: ' .. dir .. '/g: sequence 3 out of range [0, 3)')
      assert.has_error(function() ds:get(0, 2, 2) end,
        'indexed dataset: ' .. dir .. '/g: tokens [2, 4) of sequence 0 are outside its 3 tokens')
      ds:close()
      assert.has_error(function() ds:get(0) end, 'indexed dataset: ' .. dir .. '/g: used after close()')
    end)
  end)
end)

describe('pmp.data.gpt_dataset', function()
  local dir
  before_each(function() dir = shell.temp_dir() end)
  after_each(function()
    collectgarbage()
    shell.remove_dir(dir)
  end)

  -- Documents of varied lengths whose tokens count up (so every token is distinct).
  local function make(name, ndocs, first, dtype)
    local docs, v = {}, first or 0
    for d = 1, ndocs do
      local s = {}
      for k = 1, (d * 7) % 13 + (d % 3 == 0 and 0 or 1) do
        s[k] = v
        v = v + 1
      end
      docs[d] = { s }
    end
    indexed.write(dir .. '/' .. name, docs, { dtype = dtype or 'int32' })
    return indexed.open(dir .. '/' .. name), docs
  end

  it('makes samples of seq_length + 1 tokens overlapping by one, covering an epoch in document-index order', function()
    local ds = make('a', 30)
    local g = G.GPTDataset(ds, { seq_length = 8, seed = 3, cache_dir = false })
    assert.are.equal(math.floor((g.tokens_per_epoch - 1) / 8), g.samples_per_epoch)
    assert.are.equal(g.samples_per_epoch, g.count)
    local idx = g:indices()
    local stream = {}
    for _, seqi in ipairs(idx.document_index:totable()) do
      for _, t in ipairs(ds:totable(seqi)) do stream[#stream + 1] = t end
    end
    assert.are.equal(g.tokens_per_epoch, #stream)
    local got = {}
    for j = 0, g.count - 1 do
      local s = g:raw_sample(j):totable()
      assert.are.equal(9, #s)
      if j > 0 then assert.are.equal(got[#got], s[1]) end   -- one-token overlap
      for k = j == 0 and 1 or 2, 9 do got[#got + 1] = s[k] end
    end
    for k = 1, #got do assert.are.equal(stream[k], got[k]) end
    assert.is_true(#stream - #got < 8)   -- drop_last leaves less than one sample
    -- every document once per epoch; the shuffle is a permutation
    local seen = {}
    for _, seqi in ipairs(idx.document_index:totable()) do seen[seqi] = (seen[seqi] or 0) + 1 end
    for k = 0, #ds - 1 do assert.are.equal(1, seen[k]) end
    local order = idx.shuffle_index:totable()
    table.sort(order)
    for k = 1, #order do assert.are.equal(k - 1, order[k]) end
    -- inputs and targets are the sample shifted by one
    local x, y = g:batch(2, 3)
    assert.are.same({ 3, 8 }, x.shape)
    local s2 = g:sample(2):totable()
    assert.are.same({ unpack(s2, 1, 8) }, x:select(1, 1):totable())
    assert.are.same({ unpack(s2, 2, 9) }, y:select(1, 1):totable())
  end)

  it('splits sequences as Megatron does (normalized weights, Python rounding)', function()
    local w = G.parse_split('969,30,1')
    assert.is_true(math.abs(w[1] - 0.969) < 1e-12)
    local r = G.split_ranges('969,30,1', 1000)
    assert.are.same({ 0, 969 }, r.train)
    assert.are.same({ 969, 999 }, r.valid)
    assert.are.same({ 999, 1000 }, r.test)
    r = G.split_ranges('1,1', 5)       -- 2.5 rounds to 2 (half to even)
    assert.are.same({ 0, 2 }, r.train)
    assert.are.same({ 2, 5 }, r.valid)
    assert.is_nil(r.test)
    r = G.split_ranges('1,1', 7)       -- 3.5 rounds to 4
    assert.are.same({ 0, 4 }, r.train)
    local ds = make('s', 40)
    local sets = G.build({ dir .. '/s' }, { seq_length = 4, split = '70,20,10', cache_dir = false })
    assert.are.same({ 0, 28 }, sets.train.range)
    assert.are.same({ 28, 36 }, sets.valid.range)
    assert.are.same({ 36, 40 }, sets.test.range)
    -- valid samples only hold valid-split tokens
    local valid_tokens = {}
    for k = 28, 35 do for _, t in ipairs(ds:totable(k)) do valid_tokens[t] = true end end
    for i = 0, sets.valid.count - 1 do
      for _, t in ipairs(sets.valid:sample(i):totable()) do assert.is_true(valid_tokens[t]) end
    end
  end)

  it('blends datasets by weight: each position goes to the dataset furthest below its share', function()
    make('a', 40, 0)
    make('b', 40, 100000)
    local sets = G.build({ '0.3', dir .. '/a', '0.7', dir .. '/b' }, { seq_length = 4, split = '1', cache_dir = false,
      sizes = { train = 1000 } })
    local bl = sets.train
    assert.are.equal(1000, bl.count)
    local counts = { 0, 0 }
    local firsts = {}
    for i = 0, 999 do
      local d, k = bl:source(i)
      assert.are.equal(counts[d], k)   -- each dataset's samples are taken in order
      counts[d] = counts[d] + 1
      if i < 6 then firsts[i + 1] = d end
      assert.is_true(math.abs(counts[1] - 0.3 * (i + 1)) <= 1.3)
    end
    assert.are.same({ 300, 700 }, counts)
    assert.are.same({ 2, 1, 2, 2, 1, 2 }, firsts)
    -- a sample from b holds b's tokens only
    for i = 0, 9 do
      local d = bl:source(i)
      local s = bl:sample(i):totable()
      assert.are.equal(d == 2, s[1] >= 100000)
    end
    -- without weights the datasets weigh by their samples per epoch
    local unweighted = G.build({ dir .. '/a', dir .. '/b' }, { seq_length = 4, split = '1', cache_dir = false })
    assert.are.equal(unweighted.train.weights[1], unweighted.train.weights[2])
  end)

  it('is deterministic per seed, and the seed changes the order', function()
    local ds = make('a', 50)
    local function first_samples(seed, cache)
      local g = G.GPTDataset(ds, { seq_length = 6, seed = seed, cache_dir = cache })
      local out = {}
      for i = 0, 9 do out[i + 1] = g:sample(i):totable() end
      return out
    end
    assert.are.same(first_samples(7, false), first_samples(7, dir .. '/cache'))
    assert.are.same(first_samples(7, false), first_samples(7, dir .. '/cache'))   -- now from the cache
    assert.are_not.same(first_samples(7, false), first_samples(8, false))
  end)

  it('resumes from a consumed-samples count with the same next samples, across epochs and cache reloads', function()
    local ds = make('a', 30)
    local g = G.GPTDataset(ds, { seq_length = 5, seed = 1, num_samples = 200, cache_dir = dir .. '/cache' })
    assert.is_false(g.from_cache)
    assert.is_true(g.num_epochs > 1)
    assert.is_true(g.count >= 200)
    local full = {}
    for step = 0, 19 do
      local x = g:batch(step * 8, 8)
      full[step] = x:totable()
    end
    -- a fresh process: indices from the cache, continuing at consumed = 96
    local r = G.GPTDataset(indexed.open(dir .. '/a'), { seq_length = 5, seed = 1, num_samples = 200, cache_dir = dir .. '/cache' })
    assert.is_true(r.from_cache)
    for step = 12, 19 do assert.are.same(full[step], r:batch(step * 8, 8):totable()) end
    -- the indices depend on the number of samples only through the epochs and the final-epoch split
    local same = G.GPTDataset(ds, { seq_length = 5, seed = 1, num_samples = 199, cache_dir = false })
    assert.are.equal(g.num_epochs, same.num_epochs)
    assert.are.equal(g.separate_final_epoch, same.separate_final_epoch)
    assert.are.same(g:indices().shuffle_index:totable(), same:indices().shuffle_index:totable())
    -- fewer samples: fewer epochs, another order (as Megatron); past the count is an error
    local small = G.GPTDataset(ds, { seq_length = 5, seed = 1, num_samples = 10, cache_dir = false })
    assert.are.equal(1, small.num_epochs)
    assert.are.equal(small.samples_per_epoch, small.count)
    fails_with(function() small:sample(small.count) end, 'sample ' .. small.count .. ' is past the ' .. small.count .. ' samples')
    fails_with(function() small:batch(small.count - 4, 8) end,
      string.format('samples [%d, %d) go past the %d samples', small.count - 4, small.count + 4, small.count))
    assert.are_not.same(g:indices().shuffle_index:totable(), small:indices().shuffle_index:totable())
    -- a damaged cache is rebuilt, not trusted
    for _, name in ipairs(pmp.io.listdir(dir .. '/cache')) do
      if name:match('shuffle_index%.npy$') then write(dir .. '/cache/' .. name, 'garbage') end
    end
    local rebuilt = G.GPTDataset(ds, { seq_length = 5, seed = 1, num_samples = 200, cache_dir = dir .. '/cache' })
    assert.is_false(rebuilt.from_cache)
    assert.are.same(full[3], rebuilt:batch(24, 8):totable())
  end)

  it("caches its indices where megatron-core does (<prefix>/cache/GPTDataset_indices) as .npy files", function()
    make('a', 20)
    G.build({ dir .. '/a' }, { seq_length = 4, split = '1' })
    local cache = dir .. '/a/cache/GPTDataset_indices'
    local names = pmp.io.listdir(cache)
    table.sort(names)
    assert.are.equal(4, #names)
    for _, name in ipairs(names) do assert.matches('^' .. string.rep('%x', 32) .. '%-GPTDataset%-train%-', name) end
    local npy = read(cache .. '/' .. names[2])   -- document_index
    assert.are.equal('\147NUMPY\1\0', npy:sub(1, 8))
    assert.are.equal(0, (10 + npy:byte(9) + 256 * npy:byte(10)) % 64)
    -- Megatron's dtypes (int32 documents, uint32 shuffle)
    assert.matches("'descr': '<i4'", npy)
    assert.matches("'descr': '<u4'", read(cache .. '/' .. names[4]))
    local desc = pmp.json.decode(read(cache .. '/' .. names[1]))
    assert.are.equal('GPTDataset', desc.class)
    assert.are.equal(dir .. '/a', desc.dataset_path)
  end)

  it('says which split is too small', function()
    make('tiny', 2)
    local ok, err = pcall(G.build, { dir .. '/tiny' }, { seq_length = 64, split = '1', cache_dir = false })
    assert.is_false(ok)
    assert.matches('the train split of .*tiny %(sequences %[0, 2%)%) has %d+ tokens, too few for one sample of 65', err)
  end)

  it('refuses seeds numpy.random.RandomState refuses', function()
    local ds = make('a', 10)
    local refused = 'seed must be an integer in [0, 2^32) (numpy.random.RandomState), got '
    fails_with(function() G.GPTDataset(ds, { seq_length = 4, seed = -1, cache_dir = false }) end, refused .. '-1')
    fails_with(function() G.GPTDataset(ds, { seq_length = 4, seed = 2 ^ 32, cache_dir = false }) end, refused .. '4294967296')
    fails_with(function() G.GPTDataset(ds, { seq_length = 4, seed = 1.5, cache_dir = false }) end, refused .. '1.5')
  end)

  -- spec/fixtures/gpt_dataset: what megatron-core's BlendedMegatronDatasetBuilder(GPTDataset, ...) built
  -- (tools/make_gpt_dataset_fixtures.py).
  local GPT_FIXTURES = shell.root .. '/spec/fixtures/gpt_dataset'
  local function gpt_expected() return pmp.json.decode(read(GPT_FIXTURES .. '/expected.json')) end

  local function assert_megatron_gpt(what, want, g)
    assert.are.equal(GPT_FIXTURES .. '/' .. want.prefix, g.path_prefix, what)
    assert.are.same(want.range, g.range, what)
    assert.are.equal(want.tokens_per_epoch, g.tokens_per_epoch, what)
    assert.are.equal(want.num_epochs, g.num_epochs, what .. ': epochs')
    assert.are.equal(want.separate_final_epoch, g.separate_final_epoch, what .. ': separate final epoch')
    assert.are.equal(want.count, g.count, what .. ': samples')
    local idx = g:indices()
    assert.are.same(want.document_index, idx.document_index:totable(), what .. ': document index')
    local flat = {}
    for _, row in ipairs(idx.sample_index:totable()) do flat[#flat + 1], flat[#flat + 2] = row[1], row[2] end
    assert.are.same(want.sample_index, flat, what .. ': sample index')
    assert.are.same(want.shuffle_index, idx.shuffle_index:totable(), what .. ': shuffle index')
    for _, s in ipairs(want.samples) do
      assert.are.same(s[2], g:sample(s[1]):totable(), what .. ': sample ' .. s[1])
    end
  end

  it("builds megatron-core's document, sample and shuffle indices and blends (spec/fixtures/gpt_dataset)", function()
    local expected = gpt_expected()
    assert.is_true(#expected.cases >= 10)
    for _, case in ipairs(expected.cases) do
      local list, weighted = {}, #case.data_path % 2 == 0 and tonumber(case.data_path[1]) ~= nil
      for i, p in ipairs(case.data_path) do
        list[i] = (weighted and i % 2 == 1) and p or (GPT_FIXTURES .. '/' .. p)
      end
      local sizes = {}
      for k, name in ipairs(G.SPLITS) do
        if case.sizes[k] ~= pmp.json.null then sizes[name] = case.sizes[k] end
      end
      local sets = G.build(list, { seq_length = case.seq_length, seed = case.seed, split = case.split, sizes = sizes,
        cache_dir = false })
      for _, name in ipairs(G.SPLITS) do
        local want, got, what = case.splits[name], sets[name], case.name .. ', ' .. name
        if not want then
          assert.is_nil(got, what)
        elseif want.kind == 'gpt' then
          assert.are.equal(want.num_samples ~= pmp.json.null and want.num_samples or nil, got.num_samples, what)
          assert_megatron_gpt(what, want, got)
        else
          assert.are.equal(#want.dataset_index, got.count, what .. ': blend size')
          assert.are.same(want.weights, got.weights, what .. ': blend weights')
          for i = 0, got.count - 1 do
            local d, k = got:source(i)
            if d - 1 ~= want.dataset_index[i + 1] or k ~= want.dataset_sample_index[i + 1] then
              error(string.format('%s: position %d takes sample %d of dataset %d, megatron-core sample %d of dataset %d',
                what, i, k, d - 1, want.dataset_sample_index[i + 1], want.dataset_index[i + 1]))
            end
          end
          fails_with(function() got:sample(got.count) end, 'sample ' .. got.count .. ' is past the ' .. got.count .. ' samples')
          for k, wd in ipairs(want.datasets) do
            assert_megatron_gpt(what .. ', dataset ' .. k, wd, got.datasets[k])
          end
          for _, s in ipairs(want.samples) do
            assert.are.same(s[2], got:sample(s[1]):totable(), what .. ': sample ' .. s[1])
          end
        end
      end
    end
  end)

  it('normalizes blend weights with numpy.sum (pairwise) arithmetic', function()
    -- numpy.sum of 1/k, k = 1..n, written by tools/make_gpt_dataset_fixtures.py
    local sums = pmp.json.decode(read(shell.root .. '/spec/fixtures/gpt_dataset/expected.json')).numpy_sums
    local a = {}
    for k = 1, 1000 do a[k] = 1 / k end
    local differs_from_a_loop = false
    for n, want in pairs(sums) do
      n = tonumber(n)
      assert.are.equal(want, G._numpy_sum(a, 1, n), 'n = ' .. n)
      local seq = 0
      for k = 1, n do seq = seq + a[k] end
      differs_from_a_loop = differs_from_a_loop or seq ~= want
    end
    assert.is_true(differs_from_a_loop, 'the fixture does not tell pairwise from sequential summation')
    assert.are.same({ 0.25, 0.75 }, G._normalize({ 1, 3 }))
  end)
end)

describe("numpy's legacy RandomState (core/tensor/random_numpy.c)", function()
  local C = require('pmp.ffi').C
  local fixtures = pmp.json.decode(read(shell.root .. '/spec/fixtures/gpt_dataset/expected.json')).numpy_random
  local function state(seed)
    local r = ffi.new('pmp_np_random')
    C.pmp_np_random_seed(r, seed)
    return r
  end

  it('is MT19937: the 10000th output from seed 5489 is 4123659995', function()
    local r = state(5489)
    local v
    for _ = 1, 10000 do v = C.pmp_np_random_next_u32(r) end
    assert.are.equal(4123659995, v)
  end)

  it("gives numpy's outputs for RandomState(seed), across twists", function()
    for seed, want in pairs(fixtures.mt19937_outputs) do
      local r = state(tonumber(seed))
      local got = {}
      for k = 1, 632 do
        local v = C.pmp_np_random_next_u32(r)
        if k <= 8 or k >= 631 then got[#got + 1] = v end
      end
      assert.are.same(want, got, 'seed ' .. seed)
    end
  end)

  it("shuffles as RandomState.shuffle, one generator through successive shuffles", function()
    for _, case in ipairs(fixtures.shuffles) do
      local r = state(case.seed)
      local a, b = ffi.new('int32_t[?]', case.n), ffi.new('int64_t[?]', case.n)
      for k = 0, case.n - 1 do a[k], b[k] = k, k end
      C.pmp_np_random_shuffle_i32(r, a, case.n)
      C.pmp_np_random_shuffle_i64(r, b, case.n)
      local ga, gb = {}, {}
      for k = 0, case.n - 1 do ga[k + 1], gb[k + 1] = a[k], tonumber(b[k]) end
      assert.are.same(case.int32_then_int64[1], ga, 'seed ' .. case.seed .. ', n ' .. case.n)
      assert.are.same(case.int32_then_int64[2], gb, 'seed ' .. case.seed .. ', n ' .. case.n)
    end
  end)

  it('draws in [0, max] past 32 bits from two outputs, the first as the high half', function()
    local case = fixtures.interval64
    local r = state(case.seed)
    for _, want in ipairs(case.values) do
      assert.are.equal(want, tonumber(C.pmp_np_random_interval(r, case.max)))
    end
    -- and bounds: [0, 0] takes no draw, [0, 1] takes one
    local x, y = state(1), state(1)
    assert.are.equal(0, tonumber(C.pmp_np_random_interval(x, 0)))
    assert.are.equal(C.pmp_np_random_next_u32(x), C.pmp_np_random_next_u32(y))
    assert.is_true(tonumber(C.pmp_np_random_interval(x, 1)) <= 1)
  end)
end)

describe('tools/preprocess_data.lua', function()
  local dir
  before_each(function() dir = shell.temp_dir() end)
  after_each(function() shell.remove_dir(dir) end)

  local TEXTS = { 'hello world', '', 'naïve café', 'abc', 'hello' }

  local function corpus(path, n)
    local lines = {}
    for k = 1, n do lines[k] = pmp.json.encode({ text = TEXTS[(k - 1) % #TEXTS + 1]:rep(k % 3 + 1), n = k }) end
    write(path, table.concat(lines, '\n') .. '\n')
  end

  local function preprocess(args)
    local words = { 'cd', shell.quote(shell.root), '&&', shell.quote(shell.pmp), 'tools/preprocess_data.lua' }
    for _, a in ipairs(args) do words[#words + 1] = shell.quote(a) end
    return shell.run(table.concat(words, ' '))
  end

  it('tokenizes JSONL into {prefix}_{key}_document.bin/.idx (char tokenizer, EOD), the same with workers', function()
    corpus(dir .. '/in.jsonl', 40)
    local _, err, status = preprocess({ '--input', dir .. '/in.jsonl', '--output-prefix', dir .. '/out/c', '--json-keys',
      'text', '--tokenizer-type', 'char', '--append-eod', '--log-interval', '0' })
    assert.are.equal(0, status, err)
    assert.matches('processed 40 documents %([%d.]+ docs/s, [%d.]+ MB/s%)', err)
    assert.matches('wrote .*/out/c_text_document.bin/.idx: 40 documents, 32 sequences, %d+ tokens %(uint16%)', err)
    local ds = indexed.open(dir .. '/out/c_text_document')
    local state = pmp.data.dataset_tokenizer.load(dir .. '/out/c_text_document')
    assert.are.equal('char', state.type)
    assert.are.equal('<|endoftext|>', state.chars[state.eod + 1])
    local tok = pmp.data.dataset_tokenizer.from_state(state)
    local doc_idx = ds.document_indices:totable()
    local seq = 0
    for k = 1, 40 do
      local text = TEXTS[(k - 1) % #TEXTS + 1]:rep(k % 3 + 1)
      if text == '' then
        assert.are.equal(doc_idx[k], doc_idx[k + 1])   -- an empty document: a repeated index
      else
        local ids = tok:encode(text)
        ids[#ids + 1] = state.eod
        assert.are.same(ids, ds:get(seq):totable())
        assert.are.equal(text .. '<|endoftext|>', tok:decode(ds:get(seq):totable()))
        seq = seq + 1
      end
    end
    assert.are.equal(seq, #ds)
    _, err, status = preprocess({ '--input', dir .. '/in.jsonl', '--output-prefix', dir .. '/w', '--tokenizer-type', 'char',
      '--append-eod', '--workers', '3' })
    assert.are.equal(0, status, err)
    assert.are.equal(read(dir .. '/out/c_text_document.bin'), read(dir .. '/w_text_document.bin'))
    assert.are.equal(read(dir .. '/out/c_text_document.idx'), read(dir .. '/w_text_document.idx'))
    local leftovers = pmp.io.listdir(dir)
    table.sort(leftovers)
    assert.are.same({ 'in.jsonl', 'out', 'w_text_document.bin', 'w_text_document.idx', 'w_text_document.tokenizer.json' }, leftovers)
  end)

  local QWEN3 = shell.root .. '/../shared/tokenizers/qwen3'
  local hf_ready = pmp.data.dataset_tokenizer.hf_available() and pmp.io.is_file(QWEN3 .. '/tokenizer.json')
  ;(hf_ready and it or pending)('tokenizes with an HF tokenizer (--tokenizer-model): no special tokens, EOS as EOD, int32 ids', function()
    write(dir .. '/in.jsonl', '{"text": "Hello world, pmp!"}\n{"text": ""}\n{"text": "naïve 日本"}\n')
    local _, err, status = preprocess({ '--input', dir .. '/in.jsonl', '--output-prefix', dir .. '/q', '--tokenizer-model', QWEN3,
      '--append-eod' })
    assert.are.equal(0, status, err)
    local ds = indexed.open(dir .. '/q_text_document')
    assert.are.equal('int32', ds.dtype)   -- a vocabulary of 151k
    local tok = pmp.tokenizer.from_pretrained(QWEN3)
    local ids = tok:encode('Hello world, pmp!', { add_special_tokens = false })
    ids[#ids + 1] = tok.eos_id
    assert.are.same(ids, ds:get(0):totable())
    assert.are.same({ 0, 1, 1, 2 }, ds.document_indices:totable())
    assert.are.equal('hf', pmp.data.dataset_tokenizer.load(dir .. '/q_text_document').type)
  end)

  it('reports a bad line by file and line number', function()
    write(dir .. '/bad.jsonl', '{"text": "ok"}\n{"text": oops}\n')
    local _, err, status = preprocess({ '--input', dir .. '/bad.jsonl', '--output-prefix', dir .. '/o', '--tokenizer-type', 'byte' })
    assert.are_not.equal(0, status)
    assert.is_truthy(err:find(dir .. '/bad.jsonl:2: not valid JSON', 1, true), err)
    write(dir .. '/nokey.jsonl', '{"body": "x"}\n')
    _, err, status = preprocess({ '--input', dir .. '/nokey.jsonl', '--output-prefix', dir .. '/o', '--tokenizer-type', 'byte' })
    assert.are_not.equal(0, status)
    assert.is_truthy(err:find(dir .. "/nokey.jsonl:1: key 'text' is missing", 1, true), err)
    assert.is_false(pmp.io.exists(dir .. '/o_text_document.bin'))
  end)
end)

describe('recipes/pretrain.lua on indexed data', function()
  local dir
  before_each(function() dir = shell.temp_dir() end)
  after_each(function() shell.remove_dir(dir) end)

  local TINY = { '--num-layers', '1', '--hidden-size', '32', '--num-attention-heads', '4', '--seq-length', '16',
    '--micro-batch-size', '4', '--global-batch-size', '8', '--log-interval', '1', '--eval-interval', '3',
    '--eval-iters', '1', '--sample-length', '8', '--lr-warmup-iters', '1', '--split', '90,10,0',
    -- indexed data brings Megatron's defaults: the flags it requires, and those whose default pmp lacks
    '--lr', '1e-3', '--max-position-embeddings', '16', '--swiglu', '--disable-bias-linear', '--attention-dropout', '0' }

  local function run(args)
    local words = { 'cd', shell.quote(shell.root), '&&', shell.quote(shell.pmp) }
    for _, a in ipairs(args) do words[#words + 1] = shell.quote(a) end
    return shell.run(table.concat(words, ' '))
  end
  local function pretrain(extra)
    local args = { 'recipes/pretrain.lua' }
    for _, a in ipairs(TINY) do args[#args + 1] = a end
    for _, a in ipairs(extra) do args[#args + 1] = a end
    return run(args)
  end
  local function losses(log)
    local out = {}
    for it, loss in log:gmatch('iteration%s+(%d+)/%s*%d+ |.-lm loss: ([%d.E+-]+) |') do out[tonumber(it)] = loss end
    return out
  end

  it('trains on a preprocessed prefix and on a blend, and resumes at the consumed-samples count', function()
    local lines = {}
    for k = 1, 150 do lines[k] = pmp.json.encode({ text = pmp.data.tiny_corpus.generate(3, k) }) end
    write(dir .. '/c.jsonl', table.concat(lines, '\n') .. '\n')
    local _, err, status = run({ 'tools/preprocess_data.lua', '--input', dir .. '/c.jsonl', '--output-prefix', dir .. '/c',
      '--tokenizer-type', 'char', '--append-eod' })
    assert.are.equal(0, status, err)
    local prefix = dir .. '/c_text_document'
    local full, err1, status1 = pretrain({ '--data-path', prefix, '--train-iters', '6', '--save', dir .. '/full', '--save-interval', '3' })
    assert.are.equal(0, status1, err1)
    assert.matches('pretrain: ' .. prefix:gsub('%p', '%%%0') .. ', %d+ tokens %(char tokenizer', full)
    assert.matches('consumed samples: +48 |', full)
    assert.matches('validation loss at iteration 6', full)
    assert.matches('\nsample: ', full)
    local _, err2, status2 = pretrain({ '--data-path', prefix, '--train-iters', '3', '--lr-decay-iters', '6',
      '--save', dir .. '/part', '--save-interval', '3' })
    assert.are.equal(0, status2, err2)
    local resumed, err3, status3 = pretrain({ '--data-path', prefix, '--train-iters', '6', '--save', dir .. '/part',
      '--save-interval', '3', '--load', dir .. '/part' })
    assert.are.equal(0, status3, err3)
    assert.matches('loaded checkpoint', resumed)
    local a, b = losses(full), losses(resumed)
    for it = 4, 6 do
      assert.is_not_nil(a[it])
      assert.are.equal(a[it], b[it])
    end
    -- a blend of the prefix with a second dataset (same tokenizer)
    _, err, status = run({ 'tools/preprocess_data.lua', '--input', dir .. '/c.jsonl', '--output-prefix', dir .. '/d',
      '--tokenizer-type', 'char', '--vocab-file', prefix .. '.tokenizer.json', '--append-eod' })
    assert.are.equal(0, status, err)
    local blended, err4, status4 = pretrain({ '--data-path', '0.3', prefix, '0.7', dir .. '/d_text_document',
      '--train-iters', '2', '--save', '' })
    assert.are.equal(0, status4, err4)
    assert.matches('consumed samples: +16 |', blended)
  end)
end)
