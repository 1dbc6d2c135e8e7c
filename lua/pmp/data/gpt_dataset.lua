-- GPT pretraining samples from Megatron indexed datasets, built as megatron.core's GPTDataset and
-- BlendedDataset build them (FORMATS.md §5.3):
--
--   local sets = pmp.data.gpt_dataset.build({'0.3', 'a_text_document', '0.7', 'b_text_document'}, {
--     seq_length = 1024, seed = 1234, split = '969,30,1', sizes = {train = n, valid = m, test = k}})
--   sets.train.count, sets.train:batch(consumed, micro_batch) --> inputs, targets  (i64 [mb, seq])
--   sets.train:sample(i)                                      --> i64 [seq + 1]   (i is 0-based)
--
--   local ds = pmp.data.gpt_dataset.GPTDataset(indexed, {seq_length =, seed =, split = 'train',
--                                                       range = {beg, end}, num_samples =, cache_dir =})
--   local bl = pmp.data.gpt_dataset.BlendedDataset({ds1, ds2}, {0.3, 0.7}, {size = n})
--
-- What follows Megatron:
--  * The "documents" are the sequences of the indexed dataset. --split weights are normalized and the
--    split of N sequences is [round(lo * N), round(hi * N)) with Python's round (half to even).
--  * Epochs tile the split's documents; the number of epochs is the smallest that holds the requested
--    samples. The document index lists the documents of every epoch, each epoch shuffled.
--  * The sample index holds (position in the document index, token offset) for each sample boundary:
--    sample j is the seq_length + 1 tokens from boundary j through boundary j + 1 inclusive, so
--    consecutive samples overlap by one token (the last target of one is the first input of the next)
--    and samples run across document boundaries (helpers.cpp build_sample_idx, drop_last).
--  * A shuffle index maps the position i in training order to a sample. The data position is the
--    number of consumed samples: batch(consumed, n) is samples consumed .. consumed + n - 1.
--  * Blending picks, for each position, the dataset whose achieved count falls furthest below
--    weight * max(position, 1) (helpers.cpp build_blending_indices), taking that dataset's next sample.
--    Without weights, datasets weigh by their samples per epoch.
--
-- Where pmp differs (deliberately; the token content of every sample is Megatron's, the order is not):
--  * Random numbers come from pmp's own seeded generator (xorshift128 seeded through a murmur3 mix),
--    not numpy's RandomState, so the shuffled order is not Megatron's.
--  * Each epoch of the document index is shuffled on its own (Megatron shuffles the tiled array as a
--    whole, and separates only a short final epoch), and the shuffle index permutes blocks of one
--    epoch's worth of samples (P = (tokens_per_epoch - 1) // seq_length) on their own, block k with
--    its own seed. The number of samples is a whole number of blocks, E * P.
--    Consequence: samples never depend on how many were asked for. Asking for more (a longer run, a
--    resume with a larger --train-iters) extends the dataset by whole epochs and leaves every earlier
--    sample where it was, so a run resumes exactly at its consumed-samples count.
--  * The indices are cached next to the data in <prefix dir>/cache/GPTDataset_indices/
--    <hash>-pmpGPTDataset-<split>-{description.json,document_index.npy,sample_index.npy,
--    shuffle_index.npy} (NumPy .npy v1.0, readable with numpy.load; the names cannot collide with
--    Megatron's <md5>-GPTDataset-... files). A cache holding fewer epochs than needed is rebuilt.
--  * No padding, loss masks or position resets: samples are always full (drop_last), and pmp's
--    model takes (inputs, targets).
local ffi = require 'ffi'
local bit = require 'bit'
local C = require('pmp.ffi').C
local pio = require 'pmp.io'
local json = require 'pmp.json'
local tensor = require 'pmp.tensor'
local indexed = require 'pmp.data.indexed'

local M = {}

local function fail(msg, level) error('gpt dataset: ' .. msg, (level or 1) + 1) end

---------------------------------------------------------------------------------------------------
-- Random permutations (pmp's own generator; see the header)

-- 32-bit multiply mod 2^32 without losing bits in doubles.
local function mul32(a, b)
  a, b = a % 4294967296, b % 4294967296
  local lo = (a % 65536) * b
  local hi = math.floor(a / 65536) * b % 65536
  return (lo + hi * 65536) % 4294967296
end
local function fmix32(h)
  h = h % 4294967296
  h = bit.bxor(h, bit.rshift(h, 16)) % 4294967296
  h = mul32(h, 0x85ebca6b)
  h = bit.bxor(h, bit.rshift(h, 13)) % 4294967296
  h = mul32(h, 0xc2b2ae35)
  return bit.bxor(h, bit.rshift(h, 16)) % 4294967296
end

-- A generator for stream (seed, a, b): returns next() giving uniform integers in [0, 2^32).
local function generator(seed, a, b)
  local s = seed % 4294967296
  local x = fmix32(s + 0x9e3779b9)
  local y = fmix32(bit.bxor(x, fmix32(a + 0x632be5ab)) % 4294967296)
  local z = fmix32(bit.bxor(y, fmix32(b + 0x85157af5)) % 4294967296)
  local w = fmix32(bit.bxor(z, fmix32(math.floor(seed / 4294967296) + 0x1b873593)) % 4294967296)
  if x + y + z + w == 0 then w = 1 end
  x, y, z, w = bit.tobit(x), bit.tobit(y), bit.tobit(z), bit.tobit(w)
  return function()
    local t = bit.bxor(x, bit.lshift(x, 11))
    x, y, z = y, z, w
    w = bit.bxor(bit.bxor(w, bit.rshift(w, 19)), bit.bxor(t, bit.rshift(t, 8)))
    return w % 4294967296
  end
end

-- Uniform integer in [0, k) for 1 <= k <= 2^32, without modulo bias.
local function below(next_u32, k)
  local limit = 4294967296 - 4294967296 % k
  while true do
    local u = next_u32()
    if u < limit then return u % k end
  end
end

-- Fisher-Yates over arr[first .. first + n - 1] (a cdata array).
local function shuffle(arr, first, n, next_u32)
  for k = n - 1, 1, -1 do
    local j = below(next_u32, k + 1)
    arr[first + k], arr[first + j] = arr[first + j], arr[first + k]
  end
end
M._generator, M._shuffle = generator, shuffle

---------------------------------------------------------------------------------------------------
-- Splits

-- '969,30,1' (or a table) -> three normalized weights, as Megatron's parse_and_normalize_split.
function M.parse_split(split)
  local w = {}
  if type(split) == 'table' then
    for k, v in ipairs(split) do w[k] = tonumber(v) end
  else
    for v in tostring(split):gmatch('[.0-9]+') do w[#w + 1] = tonumber(v) end
  end
  if #w == 0 or #w > 3 then fail("bad --split '" .. tostring(split) .. "' (expected up to three weights, e.g. 969,30,1)", 2) end
  while #w < 3 do w[#w + 1] = 0 end
  local total = 0
  for k = 1, 3 do
    if not w[k] or w[k] < 0 then fail("bad --split '" .. tostring(split) .. "'", 2) end
    total = total + w[k]
  end
  if total <= 0 then fail("--split '" .. tostring(split) .. "' has no positive weight", 2) end
  for k = 1, 3 do w[k] = w[k] / total end
  return w
end

-- Python's round(): to nearest, ties to even.
local function round_half_even(x)
  local f = math.floor(x)
  local d = x - f
  if d > 0.5 then return f + 1 end
  if d < 0.5 then return f end
  return f % 2 == 0 and f or f + 1
end
M._round_half_even = round_half_even

M.SPLITS = { 'train', 'valid', 'test' }

-- The sequence range [beg, end) of each split of n sequences (nil for an empty split), as
-- Megatron's split matrix and builder compute them.
function M.split_ranges(split, n)
  local w = M.parse_split(split)
  local bounds = { 0, w[1], w[1] + w[2], w[1] + w[2] + w[3] }
  local out = {}
  for k = 1, 3 do
    if bounds[k + 1] > bounds[k] then
      local beg, finish = round_half_even(bounds[k] * n), round_half_even(bounds[k + 1] * n)
      if finish > beg then out[M.SPLITS[k]] = { beg, finish } end
    end
  end
  return out
end

---------------------------------------------------------------------------------------------------
-- NumPy .npy v1.0 files for the cache

local NPY_MAGIC = '\147NUMPY\1\0'

local function npy_header(descr, shape)
  local dims = #shape == 1 and string.format('(%d,)', shape[1]) or string.format('(%d, %d)', shape[1], shape[2])
  local dict = string.format("{'descr': '%s', 'fortran_order': False, 'shape': %s, }", descr, dims)
  local total = 10 + #dict + 1
  local pad = (64 - total % 64) % 64
  local header = dict .. string.rep(' ', pad) .. '\n'
  return NPY_MAGIC .. string.char(#header % 256, math.floor(#header / 256)) .. header
end

local function write_npy(path, descr, shape, ptr, nbytes)
  pio.write_atomic(path, function(w)
    w:write(npy_header(descr, shape))
    if nbytes > 0 then w:write(ptr, nbytes) end
  end)
end

-- Maps an .npy file; returns (mapping, data pointer) when its header is exactly descr/shape.
local function map_npy(path, descr, shape)
  local m = C.pmp_map_file(path)
  if m == nil then return nil end
  local size = tonumber(C.pmp_mapping_size(m))
  local base = ffi.cast('const uint8_t *', C.pmp_mapping_data(m))
  local expect = npy_header(descr, shape)
  local elem = descr:sub(3) == '4' and 4 or 8
  local count = shape[1] * (shape[2] or 1)
  if size ~= #expect + count * elem or ffi.string(base, #expect) ~= expect then
    C.pmp_mapping_release(m)
    return nil
  end
  return ffi.gc(m, C.pmp_mapping_release), base + #expect
end

-- FNV-1a 64 of a string, as 16 hex digits.
local function fnv1a64(s)
  local h = 0xcbf29ce484222325ULL
  for k = 1, #s do
    h = bit.bxor(h, s:byte(k)) * 0x100000001b3ULL
  end
  return bit.tohex(h)
end

---------------------------------------------------------------------------------------------------
-- GPTDataset

local GPT = {}
GPT.__index = GPT

local function int_type(max_value) return max_value < 2^31 and 'int32_t' or 'int64_t' end
local function descr_of(ctype) return ctype == 'int32_t' and '<i4' or '<i8' end

-- Builds the three indices for `epochs` epochs into plain cdata arrays.
local function build_indices(ds, epochs)
  local nd, P, seq = ds.num_docs, ds.samples_per_epoch, ds.seq_length
  local count = epochs * P
  -- document index: epoch e is the split's documents shuffled with stream (seed, e, 0)
  local docs = ffi.new('int32_t[?]', math.max(epochs * nd, 1))
  for e = 0, epochs - 1 do
    local first = e * nd
    for k = 0, nd - 1 do docs[first + k] = ds.range[1] + k end
    shuffle(docs, first, nd, generator(ds.seed, e, 0))
  end
  -- sample index (helpers.cpp build_sample_idx with add_extra_token = 1, drop_last)
  local max_offset = 0
  for k = ds.range[1], ds.range[2] - 1 do max_offset = math.max(max_offset, ds.lengths[k]) end
  local sctype = int_type(math.max(epochs * nd, max_offset))
  local samples = ffi.new(sctype .. '[?]', 2 * (count + 1))
  local lengths = ds.lengths
  local last = epochs * nd - 1
  local di, offset = 0, 0
  samples[0], samples[1] = 0, 0
  for j = 1, count do
    local remaining = seq + 1
    while remaining ~= 0 do
      local doc_len = lengths[docs[di]] - offset
      remaining = remaining - doc_len
      if remaining <= 0 then
        offset = offset + remaining + doc_len - 1
        remaining = 0
      else
        if di == last then error('gpt dataset: internal error: ran out of tokens building the sample index') end
        di = di + 1
        offset = 0
      end
    end
    samples[2 * j], samples[2 * j + 1] = di, offset
  end
  -- shuffle index: block k (one epoch's worth of samples) permuted with stream (seed, k, 1)
  local shctype = int_type(count)
  local order = ffi.new(shctype .. '[?]', math.max(count, 1))
  for i = 0, count - 1 do order[i] = i end
  for k = 0, epochs - 1 do shuffle(order, k * P, P, generator(ds.seed, k, 1)) end
  return docs, samples, order, sctype, shctype
end

local function describe(ds)
  return {
    class = 'pmp.GPTDataset', format = 1, path_prefix = ds.path_prefix, split = ds.split,
    idx_bytes = ds.idx_bytes, bin_bytes = ds.bin_bytes, sequence_count = #ds.indexed,
    document_count = ds.indexed.document_count, dtype = ds.indexed.dtype,
    range = json.array({ ds.range[1], ds.range[2] }), seq_length = ds.seq_length, seed = ds.seed,
    tokens_per_epoch = ds.tokens_per_epoch,
  }
end

local function cache_paths(ds)
  local desc = describe(ds)
  local key = fnv1a64(json.encode(desc))
  local base = pio.join(ds.cache_dir, key .. '-pmpGPTDataset-' .. ds.split .. '-')
  return desc, {
    description = base .. 'description.json', document_index = base .. 'document_index.npy',
    sample_index = base .. 'sample_index.npy', shuffle_index = base .. 'shuffle_index.npy',
  }
end

-- Uses the cached indices when they hold at least `epochs` epochs of this exact dataset.
local function load_cache(ds, epochs)
  if not ds.cache_dir then return false end
  local desc, paths = cache_paths(ds)
  if not pio.is_file(paths.description) then return false end
  local ok, cached = pcall(json.decode, pio.read_file(paths.description))
  if not ok or type(cached) ~= 'table' or type(cached.num_epochs) ~= 'number' or cached.num_epochs < epochs then return false end
  for key, value in pairs(desc) do
    if key == 'range' then
      if type(cached.range) ~= 'table' or cached.range[1] ~= value[1] or cached.range[2] ~= value[2] then return false end
    elseif cached[key] ~= value then
      return false
    end
  end
  local e = cached.num_epochs
  local count = e * ds.samples_per_epoch
  local sctype, shctype = cached.sample_index_type, cached.shuffle_index_type
  if (sctype ~= 'int32_t' and sctype ~= 'int64_t') or (shctype ~= 'int32_t' and shctype ~= 'int64_t') then return false end
  local m1, p1 = map_npy(paths.document_index, '<i4', { e * ds.num_docs })
  local m2, p2 = map_npy(paths.sample_index, descr_of(sctype), { count + 1, 2 })
  local m3, p3 = map_npy(paths.shuffle_index, descr_of(shctype), { count })
  if not (m1 and m2 and m3) then return false end
  ds.keep = { m1, m2, m3 }
  ds.document_index = ffi.cast('const int32_t *', p1)
  ds.sample_index = ffi.cast('const ' .. sctype .. ' *', p2)
  ds.shuffle_index = ffi.cast('const ' .. shctype .. ' *', p3)
  ds.num_epochs, ds.count, ds.from_cache = e, count, true
  return true
end

local function save_cache(ds, docs, samples, order, sctype, shctype)
  if not ds.cache_dir then return end
  local ok, err = pcall(function()
    pio.mkdir_p(ds.cache_dir)
    local desc, paths = cache_paths(ds)
    local e, count = ds.num_epochs, ds.count
    write_npy(paths.document_index, '<i4', { e * ds.num_docs }, docs, 4 * e * ds.num_docs)
    write_npy(paths.sample_index, descr_of(sctype), { count + 1, 2 }, samples, ffi.sizeof(sctype) * 2 * (count + 1))
    write_npy(paths.shuffle_index, descr_of(shctype), { count }, order, ffi.sizeof(shctype) * count)
    desc.num_epochs, desc.num_samples = e, count
    desc.sample_index_type, desc.shuffle_index_type = sctype, shctype
    pio.write_atomic(paths.description, json.encode(desc, { indent = 2 }) .. '\n')   -- written last: the marker
  end)
  if not ok then
    io.stderr:write('gpt dataset: warning: cannot cache the indices in ' .. ds.cache_dir .. ': ' .. tostring(err) .. '\n')
  end
end

local function materialize(ds, epochs)
  if load_cache(ds, epochs) then return end
  local docs, samples, order, sctype, shctype = build_indices(ds, epochs)
  ds.keep = { docs, samples, order }
  ds.document_index, ds.sample_index, ds.shuffle_index = docs, samples, order
  ds.num_epochs, ds.count, ds.from_cache = epochs, epochs * ds.samples_per_epoch, false
  save_cache(ds, docs, samples, order, sctype, shctype)
end

-- indexed: an open pmp.data.indexed dataset. options:
--   seq_length (required), seed (default 1234), split (name: 'train', 'valid', 'test'; default 'train'),
--   range = {beg, end} (the split's sequences, 0-based, end excluded; default all),
--   num_samples (samples to make available now; default one epoch; more are added on demand),
--   cache_dir (default <prefix dir>/cache/GPTDataset_indices; false: keep the indices in memory only).
function M.GPTDataset(ds_indexed, options)
  options = options or {}
  local seq = options.seq_length
  if type(seq) ~= 'number' or seq < 1 or seq ~= math.floor(seq) then fail('seq_length must be a positive integer', 2) end
  local S = #ds_indexed
  local range = options.range or { 0, S }
  if range[1] < 0 or range[2] > S or range[2] < range[1] then
    fail(string.format('range [%d, %d) is outside the %d sequences of %s', range[1], range[2], S, ds_indexed.path_prefix), 2)
  end
  local prefix = ds_indexed.path_prefix
  local ds = setmetatable({
    indexed = ds_indexed, path_prefix = prefix, seq_length = seq, seed = options.seed or 1234,
    split = options.split or 'train', range = { range[1], range[2] }, num_docs = range[2] - range[1],
    lengths = ds_indexed.lengths_ptr, pointers = ds_indexed.pointers_ptr, data = ds_indexed.data_ptr,
    itemsize = ds_indexed.itemsize,
  }, GPT)
  local tokens = 0
  for k = range[1], range[2] - 1 do tokens = tokens + ds.lengths[k] end
  ds.tokens_per_epoch = tokens
  ds.samples_per_epoch = math.floor((tokens - 1) / seq)
  if ds.samples_per_epoch < 1 then
    fail(string.format('the %s split of %s (sequences [%d, %d)) has %d tokens, too few for one sample of %d',
      ds.split, prefix, range[1], range[2], tokens, seq + 1), 2)
  end
  if options.cache_dir == nil then
    ds.cache_dir = pio.join(pio.dirname(prefix), 'cache/GPTDataset_indices')
  elseif options.cache_dir then
    ds.cache_dir = options.cache_dir
  end
  ds.idx_bytes = pio.size(ds_indexed.idx_path)
  ds.bin_bytes = pio.size(ds_indexed.bin_path)
  local want = options.num_samples or ds.samples_per_epoch
  materialize(ds, math.max(1, math.ceil(want / ds.samples_per_epoch)))
  return ds
end

-- Makes samples 0 .. n - 1 available (adds whole epochs; earlier samples do not move).
function GPT:ensure(n)
  if n <= self.count then return end
  local epochs = math.max(math.ceil(n / self.samples_per_epoch), self.num_epochs + 1)
  materialize(self, epochs)
end

-- Writes unshuffled sample j (seq_length + 1 tokens) into dst (int64_t *).
function GPT:raw_sample_into(j, dst)
  local si, di, lengths, pointers, data = self.sample_index, self.document_index, self.lengths, self.pointers, self.data
  local itemsize = self.itemsize
  local d0, o0 = tonumber(si[2 * j]), tonumber(si[2 * j + 1])
  local d1, o1 = tonumber(si[2 * j + 2]), tonumber(si[2 * j + 3])
  local n = 0
  for d = d0, d1 do
    local seqi = di[d]
    local first = d == d0 and o0 or 0
    local stop = d == d1 and o1 + 1 or lengths[seqi]
    local src = data + (tonumber(pointers[seqi]) / itemsize)
    for k = first, stop - 1 do
      dst[n] = src[k]
      n = n + 1
    end
  end
  if n ~= self.seq_length + 1 then
    error(string.format('gpt dataset: internal error: sample %d has %d tokens, not %d', j, n, self.seq_length + 1))
  end
end

-- Writes sample i in training order into dst (int64_t *).
function GPT:sample_into(i, dst)
  if self.indexed.closed then fail(self.path_prefix .. ': the indexed dataset was closed', 2) end
  if i >= self.count then self:ensure(i + 1) end
  self:raw_sample_into(tonumber(self.shuffle_index[i]), dst)
end

local function check_index(ds, i, what)
  if type(i) ~= 'number' or i < 0 or i ~= math.floor(i) then
    fail(what .. ': sample index must be a non-negative integer, got ' .. tostring(i), 3)
  end
end

-- Sample i (0-based, training order) as an i64 tensor of seq_length + 1 tokens.
function GPT:sample(i)
  check_index(self, i, 'sample')
  local t = tensor.empty({ self.seq_length + 1 }, { dtype = 'i64' })
  self:sample_into(i, ffi.cast('int64_t *', t.ptr.data))
  return t
end

-- Sample j in sample-index order (before the shuffle), for inspection and tests.
function GPT:raw_sample(j)
  check_index(self, j, 'raw_sample')
  if self.indexed.closed then fail(self.path_prefix .. ': the indexed dataset was closed', 2) end
  if j >= self.count then self:ensure(j + 1) end
  local t = tensor.empty({ self.seq_length + 1 }, { dtype = 'i64' })
  self:raw_sample_into(j, ffi.cast('int64_t *', t.ptr.data))
  return t
end

-- Samples first .. first + size - 1 (training order) as inputs and targets, each i64 [size, seq_length]
-- (the same interface as pmp.data.TextDataset).
local function batch(ds, first, size)
  check_index(ds, first, 'batch')
  local seq = ds.seq_length
  local block = tensor.empty({ size, seq + 1 }, { dtype = 'i64' })
  local base = ffi.cast('int64_t *', block.ptr.data)
  for k = 0, size - 1 do ds:sample_into(first + k, base + k * (seq + 1)) end
  return block:narrow(2, 1, seq), block:narrow(2, 2, seq)
end
GPT.batch = batch

-- The shuffle, sample and document indices as tensors (copies), for inspection and tests.
function GPT:indices()
  local function copy(ptr, n, ctype)
    local t = tensor.empty({ n }, { dtype = 'i64' })
    local dst = ffi.cast('int64_t *', t.ptr.data)
    for k = 0, n - 1 do dst[k] = ptr[k] end
    return t
  end
  return {
    document_index = copy(self.document_index, self.num_epochs * self.num_docs),
    sample_index = copy(self.sample_index, 2 * (self.count + 1)):view(self.count + 1, 2),
    shuffle_index = copy(self.shuffle_index, self.count),
  }
end

function GPT:__tostring()
  return string.format('GPTDataset(%s, %s split: sequences [%d, %d), %d tokens per epoch, %d samples of %d tokens in %d epochs%s)',
    self.path_prefix, self.split, self.range[1], self.range[2], self.tokens_per_epoch, self.count, self.seq_length + 1,
    self.num_epochs, self.from_cache and ', indices from cache' or '')
end

---------------------------------------------------------------------------------------------------
-- BlendedDataset

local Blended = {}
Blended.__index = Blended

-- datasets: GPT datasets (or anything with sample_into/ensure/seq_length); weights: positive numbers
-- (normalized here). options.size: positions to index now (more are added on demand).
function M.BlendedDataset(datasets, weights, options)
  options = options or {}
  if #datasets == 0 then fail('a blend needs at least one dataset', 2) end
  if #datasets > 32767 then fail('too many datasets in a blend', 2) end
  if #weights ~= #datasets then fail(string.format('%d datasets but %d weights', #datasets, #weights), 2) end
  local total = 0
  for k, w in ipairs(weights) do
    if type(w) ~= 'number' or w < 0 or w ~= w then fail('weight ' .. k .. ' is not a non-negative number', 2) end
    total = total + w
  end
  if total <= 0 then fail('the blend weights add up to 0', 2) end
  local seq = datasets[1].seq_length
  for k, ds in ipairs(datasets) do
    if ds.seq_length ~= seq then fail('all blended datasets need the same seq_length', 2) end
  end
  local normalized = {}
  for k, w in ipairs(weights) do normalized[k] = w / total end
  local b = setmetatable({
    datasets = datasets, weights = normalized, seq_length = seq, count = 0,
    dataset_index = indexed._vec('int16_t'), dataset_sample_index = indexed._vec('int64_t'),
    current = {},
  }, Blended)
  for k = 1, #datasets do b.current[k] = 0 end
  b:ensure(options.size or 1)
  -- Each dataset makes the samples the blend will take from it available up front.
  for k, ds in ipairs(datasets) do
    if ds.ensure then ds:ensure(b.current[k]) end
  end
  return b
end

-- Extends the blending indices to n positions (helpers.cpp build_blending_indices).
function Blended:ensure(n)
  if n <= self.count then return end
  local w, cur, nds = self.weights, self.current, #self.datasets
  local di, dsi = self.dataset_index, self.dataset_sample_index
  di:reserve(n)
  dsi:reserve(n)
  for i = self.count, n - 1 do
    local x = math.max(i, 1)
    local best, best_err = 1, w[1] * x - cur[1]
    for k = 2, nds do
      local err = w[k] * x - cur[k]
      if err > best_err then best, best_err = k, err end
    end
    di:push(best - 1)
    dsi:push(cur[best])
    cur[best] = cur[best] + 1
  end
  self.count = n
end

-- Which dataset (1-based) and which of its samples (0-based) position i takes.
function Blended:source(i)
  if i >= self.count then self:ensure(i + 1) end
  return self.dataset_index.data[i] + 1, tonumber(self.dataset_sample_index.data[i])
end

function Blended:sample_into(i, dst)
  local d, k = self:source(i)
  self.datasets[d]:sample_into(k, dst)
end

function Blended:sample(i)
  check_index(self, i, 'sample')
  local t = tensor.empty({ self.seq_length + 1 }, { dtype = 'i64' })
  self:sample_into(i, ffi.cast('int64_t *', t.ptr.data))
  return t
end

Blended.batch = batch

function Blended:__tostring()
  local parts = {}
  for k, ds in ipairs(self.datasets) do parts[k] = string.format('%.3g %s', self.weights[k], ds.path_prefix or '?') end
  return string.format('BlendedDataset(%d samples: %s)', self.count, table.concat(parts, ', '))
end

---------------------------------------------------------------------------------------------------
-- Building train/valid/test from --data-path

-- {'p'} or {'p1', 'p2'} (unweighted) or {'0.3', 'p1', '0.7', 'p2'} -> prefixes, weights (or nil).
function M.parse_blend(list)
  if type(list) == 'string' then list = { list } end
  if type(list) ~= 'table' or #list == 0 then fail('expected a list of dataset prefixes (with optional weights)', 2) end
  if #list % 2 == 0 then
    local weighted = true
    for k = 1, #list, 2 do if tonumber(list[k]) == nil then weighted = false end end
    if weighted then
      local prefixes, weights = {}, {}
      for k = 1, #list, 2 do
        weights[#weights + 1] = tonumber(list[k])
        prefixes[#prefixes + 1] = list[k + 1]
        if weights[#weights] < 0 then fail("negative weight '" .. list[k] .. "' for " .. list[k + 1], 2) end
      end
      return prefixes, weights
    end
  end
  local prefixes = {}
  for k, p in ipairs(list) do
    if tonumber(p) ~= nil and not indexed.exists(p) then
      fail("'" .. p .. "' looks like a weight: give a weight before every prefix or none at all", 2)
    end
    prefixes[k] = p
  end
  return prefixes, nil
end

-- blend: what --data-path gave (see parse_blend). options: seq_length, seed, split ('969,30,1'),
-- sizes = {train =, valid =, test =} (samples wanted now; default one epoch), cache_dir.
-- Returns {train =, valid =, test =, indexed = {open datasets}, warnings = {...}}; a split with no
-- sequences, or too few tokens for one sample in a valid/test split, is nil (with a warning for the latter).
function M.build(blend, options)
  options = options or {}
  local prefixes, weights = M.parse_blend(blend)
  local split = options.split or '969,30,1'
  M.parse_split(split)   -- fail early on a bad --split
  local sizes = options.sizes or {}
  local out = { indexed = {}, warnings = {} }
  local per_split = { train = {}, valid = {}, test = {} }
  local weight_total = 0
  for _, w in ipairs(weights or {}) do weight_total = weight_total + w end
  for k, prefix in ipairs(prefixes) do
    local ds = indexed.open(prefix)
    out.indexed[k] = ds
    local ranges = M.split_ranges(split, #ds)
    for _, name in ipairs(M.SPLITS) do
      local r = ranges[name]
      if r then
        local ok, result = pcall(M.GPTDataset, ds, {
          seq_length = options.seq_length, seed = options.seed, split = name, range = r,
          cache_dir = options.cache_dir,
          -- what the blend will take from this dataset (build_blending_indices stays within 1 of it)
          num_samples = sizes[name] and math.ceil(sizes[name] * (weights and weights[k] / weight_total or 1)) + 1 or nil,
        })
        if ok then
          per_split[name][k] = result
        elseif name == 'train' then
          error(result, 2)
        else
          out.warnings[#out.warnings + 1] = tostring(result):gsub('^gpt dataset: ', '') .. '; no ' .. name .. ' data from it'
        end
      end
    end
  end
  for _, name in ipairs(M.SPLITS) do
    local list, ws = {}, {}
    for k = 1, #prefixes do
      local ds = per_split[name][k]
      local w = weights and weights[k] or (ds and ds.samples_per_epoch)
      if ds and w > 0 then
        list[#list + 1] = ds
        ws[#ws + 1] = w
      end
    end
    if #prefixes == 1 or #list == 0 then
      out[name] = list[1]
      if list[1] and sizes[name] then list[1]:ensure(sizes[name]) end
    else
      out[name] = M.BlendedDataset(list, ws, { size = sizes[name] or list[1].count })
    end
  end
  return out
end

return M
