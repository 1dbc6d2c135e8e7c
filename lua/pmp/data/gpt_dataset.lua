--- GPT pretraining samples from Megatron indexed datasets, built exactly as megatron.core's GPTDataset
--- and BlendedDataset build them (docs/formats.md §5.3), down to the shuffled order:
--
--   local sets = pmp.data.gpt_dataset.build({'0.3', 'a_text_document', '0.7', 'b_text_document'}, {
--     seq_length = 1024, seed = 1234, split = '969, 30, 1', sizes = {train = n, valid = m, test = k}})
--   sets.train.count, sets.train:batch(consumed, micro_batch) --> inputs, targets  (i64 [mb, seq])
--   sets.train:sample(i)                                      --> i64 [seq + 1]   (i is 0-based)
--
--   local ds = pmp.data.gpt_dataset.GPTDataset(indexed, {seq_length =, seed =, split = 'train',
--                                         split_string = '969, 30, 1', num_samples =, cache_dir =})
--   local bl = pmp.data.gpt_dataset.BlendedDataset({ds1, ds2}, {0.3, 0.7}, {size = n})
--
-- Given the same data, seq_length, seed, split and numbers of samples (Megatron's
-- train_val_test_num_samples), the samples come in the same order as megatron-core's (checked against
-- megatron-core 0.16 by spec/indexed_spec.lua on fixtures from tools/make_gpt_dataset_fixtures.py):
--  * The "documents" are the sequences of the indexed dataset. --split weights are normalized and the
--    split of N sequences is [round(lo * N), round(hi * N)) with Python's round (half to even).
--  * Epochs (gpt_dataset.py _get_num_epochs): the smallest E >= 1 with E * tokens_per_epoch >=
--    num_samples * seq_length + 1; one epoch when no number of samples is given.
--  * The document index lists the split's documents E times, shuffled by numpy's
--    RandomState(seed).shuffle (MT19937 and the shuffle of core/tensor/random_numpy.c). When E > 1 and the
--    final epoch supplies fewer than int(0.8 * samples_per_epoch) of the requested samples
--    (separate_final_epoch), the first E - 1 epochs are shuffled together and the last on its own.
--  * The sample index holds (position in the document index, token offset) for each sample boundary:
--    sample j is the seq_length + 1 tokens from boundary j through boundary j + 1 inclusive, so
--    consecutive samples overlap by one token (the last target of one is the first input of the next)
--    and samples run across document boundaries (helpers.cpp build_sample_idx, drop_last). There are
--    count = (E * tokens_per_epoch - 1) // seq_length samples, at least the number asked for.
--  * The shuffle index maps the position i in training order to a sample: arange(count) shuffled,
--    after the document index, by the same RandomState; with a separate final epoch the samples
--    before the final epoch and those after are shuffled as two parts. The data position is the
--    number of consumed samples: batch(consumed, n) is samples consumed .. consumed + n - 1.
--    Consequence (as in Megatron): the order depends on the number of samples asked for, through E and
--    separate_final_epoch. A run resumed with the same sizes (--train-iters, batch sizes) resumes
--    exactly at its consumed-samples count; asking for more samples may reorder all of them.
--  * Blends (--data-path 0.3 A 0.7 B): weights are normalized (numpy's pairwise sum), dataset k is built
--    with int(ceil(ceil(size * w_k) * 1.005)) samples (mid_level_dataset_surplus), and the blend has
--    sum_k ceil(size * w_k) positions; each position goes to the dataset whose achieved count falls
--    furthest below weight * max(position, 1), taking that dataset's next sample (helpers.cpp
--    build_blending_indices). Without weights each dataset gives one epoch, weighs by its sample
--    count, and the blend has min(size, total) positions, or, without a size, takes every sample
--    (build_exhaustive_blending_indices). A single weighted prefix is a blend of one, as in Megatron.
--
-- The cache is megatron-core's (pmp.data.megatron_cache; checked against megatron-core 0.16 by
-- spec/megatron_data_spec.lua on fixtures from tools/make_megatron_data_fixtures.py):
--  * <cache dir>/<md5>-GPTDataset-<split>-{description.txt,document_index.npy,sample_index.npy,
--    shuffle_index.npy}, and with a cache dir given (--data-cache-path) the blends'
--    <md5>-BlendedDataset-<split>-{description.txt,dataset_index.npy,dataset_sample_index.npy}; the
--    default cache dir of a GPT dataset is <prefix>/cache/GPTDataset_indices (a directory named as the
--    prefix), as megatron-core's. The description is the text megatron-core writes (class,
--    dataset_path as --data-path gave it, num_samples, split, seed, seq_length, the --split text, its
--    split matrix, the tokenizer's identifiers) and <md5> its MD5, so the same command line names the
--    same files, with the same bytes, on both sides.
--  * Reading, pmp takes the files of its exact description, else those of any description of the same
--    indices that names another tokenizer (megatron-core versions describe tokenizers differently),
--    and checks the .npy headers and that the indices fit the data as it is (every sample boundary
--    where the document lengths put it); a damaged or stale cache is rebuilt (megatron-core, which
--    knows the data by its path only, would trust it).
-- Refused as Megatron refuses them: a sample past the count (IndexError there), a blend that takes
-- more samples from a dataset than it has (the "oversamples" IndexError), a weight that is not
-- positive, and weights without a number of samples for the split.
-- Where pmp differs (none of it changes the samples of a Megatron-valid configuration):
--  * A valid/test split with no sequences, or too few tokens for a sample without a number of
--    samples, is left out (with a warning for the latter); megatron-core builds an empty dataset.
--  * No padding, loss masks or position resets: samples are always full (drop_last, also for the valid
--    split), and pmp's model takes (inputs, targets).
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local pio = require 'pmp.io'
local json = require 'pmp.json'
local tensor = require 'pmp.tensor'
local indexed = require 'pmp.data.indexed'
local mcache = require 'pmp.data.megatron_cache'

local M = {}

local function fail(msg, level) error('gpt dataset: ' .. msg, (level or 1) + 1) end

---------------------------------------------------------------------------------------------------
-- NumPy arithmetic Megatron relies on

-- numpy.sum of float64 values: pairwise summation (blocks of 8 partial sums up to 128 elements,
-- halves beyond), so that normalized blend weights round as Megatron's do.
local function numpy_sum(a, first, n)
  if n < 8 then
    local s = 0.0
    for k = first, first + n - 1 do s = s + a[k] end
    return s
  elseif n <= 128 then
    local r = {}
    for j = 0, 7 do r[j] = a[first + j] end
    local i = 8
    while i < n - n % 8 do
      for j = 0, 7 do r[j] = r[j] + a[first + i + j] end
      i = i + 8
    end
    local s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    for k = i, n - 1 do s = s + a[first + k] end
    return s
  end
  local half = math.floor(n / 2)
  half = half - half % 8
  return numpy_sum(a, first, half) + numpy_sum(a, first + half, n - half)
end

-- megatron.core.datasets.utils.normalize: w / numpy.sum(w) in float64.
local function normalize(weights)
  local total = numpy_sum(weights, 1, #weights)
  local out = {}
  for k, w in ipairs(weights) do out[k] = w / total end
  return out
end
M._numpy_sum, M._normalize = numpy_sum, normalize

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
  if #w == 0 or #w > 3 then error("gpt dataset: bad --split '" .. tostring(split) .. "' (expected up to three weights, e.g. 969,30,1)", 0) end
  while #w < 3 do w[#w + 1] = 0 end
  local total = 0
  for k = 1, 3 do
    if not w[k] or w[k] < 0 then error("gpt dataset: bad --split '" .. tostring(split) .. "'", 0) end
    total = total + w[k]
  end
  if total <= 0 then error("gpt dataset: --split '" .. tostring(split) .. "' has no positive weight", 0) end
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

-- Megatron's split matrix: the bounds {lo, hi} of each split in [0, 1], false for an empty one
-- (convert_split_vector_to_split_matrix).
function M.split_matrix(split)
  local w = M.parse_split(split)
  local bounds = { 0, w[1], w[1] + w[2], w[1] + w[2] + w[3] }
  local out = {}
  for k = 1, 3 do out[k] = bounds[k + 1] > bounds[k] and { bounds[k], bounds[k + 1] } or false end
  return out
end

-- The sequence range [beg, end) of each split of n sequences (nil for an empty split), as
-- Megatron's split matrix and builder compute them.
function M.split_ranges(split, n)
  local out = {}
  for k, bounds in ipairs(M.split_matrix(split)) do
    if bounds then
      local beg, finish = round_half_even(bounds[1] * n), round_half_even(bounds[2] * n)
      if finish > beg then out[M.SPLITS[k]] = { beg, finish } end
    end
  end
  return out
end

---------------------------------------------------------------------------------------------------
-- GPTDataset

local GPT = {}
GPT.__index = GPT

local INT32_MAX, UINT32_MAX = 2147483647, 4294967295

-- Floor division of non-negative integers held in doubles (exact below 2^53).
local function idiv(a, b) return math.floor(a / b) end

-- The shape of Megatron's indices for num_samples (nil: one epoch): epochs E, whether the final
-- epoch is shuffled apart, the samples before the final epoch, and the sample count
-- (gpt_dataset.py _get_num_epochs and _build_document_sample_shuffle_indices).
local function plan(ds, num_samples)
  local T, seq = ds.tokens_per_epoch, ds.seq_length
  local E = 1
  if num_samples then
    local need = num_samples * seq + 1
    E = math.max(1, math.ceil(need / T))
    while E * T < need do E = E + 1 end
    while E > 1 and (E - 1) * T >= need do E = E - 1 end
  end
  local p = { num_samples = num_samples, num_epochs = E, separate_final_epoch = false, count = idiv(E * T - 1, seq) }
  if E > 1 then
    p.samples_before_final_epoch = idiv((E - 1) * T - 1, seq)
    local from_final = num_samples - p.samples_before_final_epoch
    if from_final < 0 or from_final > ds.samples_per_epoch + 1 then
      error('gpt dataset: internal error: ' .. from_final .. ' samples from the final epoch')
    end
    p.separate_final_epoch = from_final < math.floor(0.80 * ds.samples_per_epoch)
  end
  return p
end

-- Element types as Megatron's: the sample index is int32 unless the document index length or the
-- longest sequence of the whole dataset exceeds int32 (helpers.py build_sample_idx); the shuffle
-- index is uint32 unless the count reaches 2^32 - 2 (_build_shuffle_index).
local function index_types(ds, p)
  local sctype = math.max(p.num_epochs * ds.num_docs, ds.max_sequence_length) <= INT32_MAX and 'int32_t' or 'int64_t'
  local shctype = p.count >= UINT32_MAX - 1 and 'int64_t' or 'uint32_t'
  return sctype, shctype
end
local DESCR = { int32_t = '<i4', int64_t = '<i8', uint32_t = '<u4' }

-- RandomState.shuffle of arr[first .. first + n - 1] (a cdata array of 4- or 8-byte integers).
local function shuffle(rs, arr, ctype, first, n)
  if ffi.sizeof(ctype) == 4 then
    C.pmp_np_random_shuffle_i32(rs, ffi.cast('int32_t *', arr) + first, n)
  else
    C.pmp_np_random_shuffle_i64(rs, ffi.cast('int64_t *', arr) + first, n)
  end
end

-- Builds the three indices of plan p into plain cdata arrays, drawing from one RandomState(seed) in
-- Megatron's order: document index (one or two shuffles), then shuffle index (one or two).
local function build_indices(ds, p)
  local nd, seq, E, count = ds.num_docs, ds.seq_length, p.num_epochs, p.count
  local rs = ffi.new('pmp_np_random')
  C.pmp_np_random_seed(rs, ds.seed)
  -- document index (_build_document_index): the split's documents tiled E times, shuffled
  local docs = ffi.new('int32_t[?]', math.max(E * nd, 1))
  for e = 0, E - 1 do
    local first = e * nd
    for k = 0, nd - 1 do docs[first + k] = ds.range[1] + k end
  end
  if p.separate_final_epoch then
    shuffle(rs, docs, 'int32_t', 0, (E - 1) * nd)
    shuffle(rs, docs, 'int32_t', (E - 1) * nd, nd)
  else
    shuffle(rs, docs, 'int32_t', 0, E * nd)
  end
  -- sample index (helpers.cpp build_sample_idx with add_extra_token = 1, drop_last)
  local sctype, shctype = index_types(ds, p)
  local samples = ffi.new(sctype .. '[?]', 2 * (count + 1))
  local lengths = ds.lengths
  local last = E * nd - 1
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
  -- shuffle index (_build_shuffle_index): arange(count), shuffled in one part or two
  local order = ffi.new(shctype .. '[?]', math.max(count, 1))
  for i = 0, count - 1 do order[i] = i end
  local split_at = p.separate_final_epoch and p.samples_before_final_epoch or count
  shuffle(rs, order, shctype, 0, split_at)
  if split_at < count then shuffle(rs, order, shctype, split_at, count - split_at) end
  return docs, samples, order
end

-- megatron-core's MegatronDataset.unique_identifiers for this dataset and num_samples: the object
-- whose json.dumps(indent=4) text names and describes the cache (megatron_cache).
local function identifiers(ds, num_samples)
  local matrix = {}
  for k, bounds in ipairs(ds.split_matrix) do
    matrix[k] = bounds == false and mcache.null or { bounds[1] == 0 and 0 or mcache.float(bounds[1]), mcache.float(bounds[2]) }
  end
  return mcache.object({
    { 'class', 'GPTDataset' }, { 'dataset_path', ds.dataset_path },
    { 'num_samples', num_samples or mcache.null }, { 'index_split', ds.split },
    { 'random_seed', ds.seed }, { 'sequence_length', ds.seq_length }, { 'split', ds.split_string },
    { 'split_matrix', matrix }, { 'tokenizer', ds.tokenizer },
  })
end

local INDEX_NAMES = { 'document_index', 'sample_index', 'shuffle_index' }

-- Whether a cached description (parsed) is of a dataset with these indices: the same data path,
-- samples, split bounds, seed and length; the tokenizer, which does not shape the indices, may differ.
local function same_indices(ds, num_samples, fields)
  local bounds = type(fields.split_matrix) == 'table' and fields.split_matrix[ds.split_position]
  return fields.class == 'GPTDataset' and fields.dataset_path == ds.dataset_path and fields.index_split == ds.split
    and fields.num_samples == (num_samples or json.null) and fields.random_seed == ds.seed
    and fields.sequence_length == ds.seq_length and type(bounds) == 'table'
    and bounds[1] == ds.split_matrix[ds.split_position][1] and bounds[2] == ds.split_matrix[ds.split_position][2]
end

-- Whether cached indices fit the data as it is now (a description names the data by its path only,
-- so a dataset written anew under the same path would otherwise be read through stale indices): the
-- documents are the split's, and sample boundary j lies j * seq_length tokens into the document index.
local function consistent(ds, p, docs, samples)
  local n, seq, lengths = p.num_epochs * ds.num_docs, ds.seq_length, ds.lengths
  for i = 0, n - 1 do
    if docs[i] < ds.range[1] or docs[i] >= ds.range[2] then return false end
  end
  local at, before = 0, 0   -- a document index position and the tokens before it
  for j = 0, p.count do
    local d, offset = tonumber(samples[2 * j]), tonumber(samples[2 * j + 1])
    if d < at or d >= n then return false end
    while at < d do
      before = before + lengths[docs[at]]
      at = at + 1
    end
    -- (boundary 0 is (0, 0) even when the first document is empty)
    if offset < 0 or (offset > 0 and offset >= lengths[docs[d]]) or before + offset ~= j * seq then return false end
  end
  return true
end

-- Maps the cached indices of plan p: megatron-core's files for this exact description first, then
-- any other description of the same indices (another tokenizer or megatron-core version).
local function load_cache(ds, p)
  if not ds.cache_dir then return nil end
  local sctype, shctype = index_types(ds, p)
  local function try(files)
    local m1, p1 = mcache.map_npy(files.document_index, '<i4', { p.num_epochs * ds.num_docs })
    local m2, p2 = mcache.map_npy(files.sample_index, DESCR[sctype], { p.count + 1, 2 })
    local m3, p3 = mcache.map_npy(files.shuffle_index, DESCR[shctype], { p.count })
    if not (m1 and m2 and m3) then return nil end
    local docs, samples = ffi.cast('const int32_t *', p1), ffi.cast('const ' .. sctype .. ' *', p2)
    if not consistent(ds, p, docs, samples) then return nil end
    ds.cache_files = files
    return { m1, m2, m3 }, docs, samples, ffi.cast('const ' .. shctype .. ' *', p3)
  end
  local files = mcache.paths(ds.cache_dir, ds.description, 'GPTDataset', ds.split, INDEX_NAMES)
  if pio.is_file(files.description) and pio.read_file(files.description) == ds.description then
    local keep, docs, samples, order = try(files)
    if keep then return keep, docs, samples, order end
  end
  for _, found in ipairs(mcache.descriptions(ds.cache_dir, 'GPTDataset', ds.split)) do
    if same_indices(ds, p.num_samples, found.fields) then
      local other = { description = found.path }
      for _, name in ipairs(INDEX_NAMES) do other[name] = found.base .. name .. '.npy' end
      local keep, docs, samples, order = try(other)
      if keep then return keep, docs, samples, order end
    end
  end
end

-- Writes megatron-core's cache files (its names, its description text, numpy.save's bytes); the
-- description last, so that a cache interrupted halfway is not taken for a whole one by pmp.
local function save_cache(ds, p, docs, samples, order)
  if not ds.cache_dir then return end
  local ok, err = pcall(function()
    pio.mkdir_p(ds.cache_dir)
    local files = mcache.paths(ds.cache_dir, ds.description, 'GPTDataset', ds.split, INDEX_NAMES)
    local sctype, shctype = index_types(ds, p)
    local n = p.num_epochs * ds.num_docs
    mcache.write_npy(files.document_index, '<i4', { n }, docs, 4 * n)
    mcache.write_npy(files.sample_index, DESCR[sctype], { p.count + 1, 2 }, samples, ffi.sizeof(sctype) * 2 * (p.count + 1))
    mcache.write_npy(files.shuffle_index, DESCR[shctype], { p.count }, order, ffi.sizeof(shctype) * p.count)
    pio.write_atomic(files.description, ds.description)
    ds.cache_files = files
  end)
  if not ok then
    io.stderr:write('gpt dataset: warning: cannot cache the indices in ' .. ds.cache_dir .. ': ' .. tostring(err) .. '\n')
  end
end

-- Makes the indices Megatron builds for num_samples (nil: one epoch) this dataset's indices.
local function materialize(ds, num_samples)
  local p = plan(ds, num_samples)
  ds.identifiers = identifiers(ds, num_samples)
  ds.description = mcache.describe(ds.identifiers)
  local keep, docs, samples, order = load_cache(ds, p)
  ds.from_cache = keep ~= nil
  if not keep then
    docs, samples, order = build_indices(ds, p)
    keep = { docs, samples, order }
    save_cache(ds, p, docs, samples, order)
  end
  ds.keep, ds.document_index, ds.sample_index, ds.shuffle_index = keep, docs, samples, order
  ds.num_samples, ds.num_epochs, ds.separate_final_epoch, ds.count = num_samples, p.num_epochs, p.separate_final_epoch, p.count
end

-- indexed: an open pmp.data.indexed dataset. options:
--   seq_length (required), seed (default 1234; an integer in [0, 2^32)),
--   split (name: 'train', 'valid', 'test'; default 'train'),
--   split_string (the --split text, e.g. '969, 30, 1', whose bounds give the split's sequences;
--     default '1': all of them in the train split),
--   range = {beg, end} (the split's sequences, 0-based, end excluded) instead of split_string; such
--     a dataset has no Megatron description, so its indices are not cached,
--   num_samples (Megatron's num_samples for this dataset; default nil: one epoch),
--   dataset_path (the prefix as Megatron's --data-path gave it, for the description; default the
--     indexed dataset's), tokenizer (megatron_cache.object of the tokenizer's unique identifiers in
--     the description; default {}),
--   cache_dir (default <prefix>/cache/GPTDataset_indices, as megatron-core; false: keep the indices
--     in memory only).
function M.GPTDataset(ds_indexed, options)
  options = options or {}
  local seq = options.seq_length
  if type(seq) ~= 'number' or seq < 1 or seq ~= math.floor(seq) then fail('seq_length must be a positive integer', 2) end
  local seed = options.seed or 1234
  if type(seed) ~= 'number' or seed ~= math.floor(seed) or seed < 0 or seed > UINT32_MAX then
    fail('seed must be an integer in [0, 2^32) (numpy.random.RandomState), got ' .. tostring(seed), 2)
  end
  local num_samples = options.num_samples
  if num_samples ~= nil and (type(num_samples) ~= 'number' or num_samples < 0 or num_samples ~= math.floor(num_samples)) then
    fail('num_samples must be a non-negative integer, got ' .. tostring(num_samples), 2)
  end
  local S = #ds_indexed
  local split = options.split or 'train'
  local split_position
  for k, name in ipairs(M.SPLITS) do if name == split then split_position = k end end
  if not split_position then fail("split must be 'train', 'valid' or 'test', got " .. tostring(split), 2) end
  local split_string = options.split_string or (options.range == nil and '1' or nil)
  local range = options.range
  if split_string then
    range = range or M.split_ranges(split_string, S)[split]
    if not range then fail(string.format("--split '%s' gives the %s split no sequences", split_string, split), 2) end
  end
  if range[1] < 0 or range[2] > S or range[2] < range[1] then
    fail(string.format('range [%d, %d) is outside the %d sequences of %s', range[1], range[2], S, ds_indexed.path_prefix), 2)
  end
  local prefix = ds_indexed.path_prefix
  local ds = setmetatable({
    indexed = ds_indexed, path_prefix = prefix, seq_length = seq, seed = seed,
    split = split, split_position = split_position, split_string = split_string,
    split_matrix = split_string and M.split_matrix(split_string), dataset_path = options.dataset_path or prefix,
    tokenizer = options.tokenizer or mcache.object({}),
    range = { range[1], range[2] }, num_docs = range[2] - range[1],
    lengths = ds_indexed.lengths_ptr, pointers = ds_indexed.pointers_ptr, data = ds_indexed.data_ptr,
    itemsize = ds_indexed.itemsize,
  }, GPT)
  local tokens, longest = 0, 0
  for k = range[1], range[2] - 1 do tokens = tokens + ds.lengths[k] end
  for k = 0, S - 1 do longest = math.max(longest, ds.lengths[k]) end
  ds.tokens_per_epoch, ds.max_sequence_length = tokens, longest
  ds.samples_per_epoch = idiv(math.max(tokens - 1, 0), seq)
  -- as megatron-core, a split too small for one sample per epoch still gives num_samples over epochs
  if tokens == 0 or (num_samples == nil and ds.samples_per_epoch < 1) then
    fail(string.format('the %s split of %s (sequences [%d, %d)) has %d tokens, too few for one sample of %d',
      ds.split, prefix, range[1], range[2], tokens, seq + 1), 2)
  end
  if split_string and options.cache_dir == nil then
    ds.cache_dir = pio.join(prefix, 'cache', 'GPTDataset_indices')
  elseif split_string and options.cache_dir then
    ds.cache_dir = options.cache_dir
  end
  materialize(ds, num_samples)
  return ds
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

local function check_range(ds, i, level)
  if i >= ds.count then
    fail(string.format('sample %d is past the %d samples of %s (asked for %s); build it with num_samples > %d',
      i, ds.count, tostring(ds), ds.num_samples and tostring(ds.num_samples) or 'one epoch', i), level + 1)
  end
end

-- Writes sample i in training order into dst (int64_t *).
function GPT:sample_into(i, dst)
  if self.indexed.closed then fail(self.path_prefix .. ': the indexed dataset was closed', 2) end
  check_range(self, i, 2)
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
  check_range(self, i, 2)
  local t = tensor.empty({ self.seq_length + 1 }, { dtype = 'i64' })
  self:sample_into(i, ffi.cast('int64_t *', t.ptr.data))
  return t
end

-- Sample j in sample-index order (before the shuffle), for inspection and tests.
function GPT:raw_sample(j)
  check_index(self, j, 'raw_sample')
  if self.indexed.closed then fail(self.path_prefix .. ': the indexed dataset was closed', 2) end
  check_range(self, j, 2)
  local t = tensor.empty({ self.seq_length + 1 }, { dtype = 'i64' })
  self:raw_sample_into(j, ffi.cast('int64_t *', t.ptr.data))
  return t
end

-- Samples first .. first + size - 1 (training order) as inputs and targets, each i64 [size, seq_length]
-- (the same interface as pmp.data.TextDataset).
local function batch(ds, first, size)
  check_index(ds, first, 'batch')
  if size > 0 and first + size > ds.count then
    fail(string.format('batch: samples [%d, %d) go past the %d samples of %s', first, first + size, ds.count, tostring(ds)), 2)
  end
  local seq = ds.seq_length
  local block = tensor.empty({ size, seq + 1 }, { dtype = 'i64' })
  local base = ffi.cast('int64_t *', block.ptr.data)
  for k = 0, size - 1 do ds:sample_into(first + k, base + k * (seq + 1)) end
  return block:narrow(2, 1, seq), block:narrow(2, 2, seq)
end
GPT.batch = batch

-- The shuffle, sample and document indices as tensors (copies), for inspection and tests.
function GPT:indices()
  local function copy(ptr, n)
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
  return string.format('GPTDataset(%s, %s split: sequences [%d, %d), %d tokens per epoch, %d samples of %d tokens in %d epochs%s%s)',
    self.path_prefix, self.split, self.range[1], self.range[2], self.tokens_per_epoch, self.count or 0, self.seq_length + 1,
    self.num_epochs or 0, self.separate_final_epoch and ', final epoch shuffled apart' or '',
    self.from_cache and ', indices from cache' or '')
end

---------------------------------------------------------------------------------------------------
-- BlendedDataset

local Blended = {}
Blended.__index = Blended

local MID_LEVEL_DATASET_SURPLUS = 0.005   -- BlendedMegatronDatasetConfig.mid_level_dataset_surplus

local function push(b, k)
  b.dataset_index:push(k - 1)
  b.dataset_sample_index:push(b.current[k])
  b.current[k] = b.current[k] + 1
end

-- A blend that takes more samples from a dataset than it has fails, as megatron-core's BlendedDataset
-- does (an IndexError naming mid_level_dataset_surplus), rather than building that dataset anew.
local function check_datasets(b, split)
  for k, ds in ipairs(b.datasets) do
    if b.current[k] > ds.count then
      fail(string.format('the %s blend oversamples the contributing datasets and, for example, requests %d samples ' ..
        'from dataset %d (%s) in excess of its size %d (Megatron fails the same way; its ' ..
        'mid_level_dataset_surplus, %g, sets the margin)', split, b.current[k], k, ds.path_prefix or '?', ds.count,
        MID_LEVEL_DATASET_SURPLUS), 3)
    end
  end
end

-- The blending indices of n positions (helpers.cpp build_blending_indices).
local function blend(b, n)
  local w, cur, nds = b.weights, b.current, #b.datasets
  b.dataset_index:reserve(n)
  b.dataset_sample_index:reserve(n)
  for i = 0, n - 1 do
    local x = math.max(i, 1)
    local best, best_err = 1, w[1] * x - cur[1]
    for k = 2, nds do
      local err = w[k] * x - cur[k]
      if err > best_err then best, best_err = k, err end
    end
    push(b, best)
  end
  b.count = n
end

-- Every sample of every dataset, weights[k] from dataset k (helpers.cpp
-- build_exhaustive_blending_indices): among the datasets not yet spent, the one furthest below its
-- share, the first on ties.
local function exhaust(b)
  local sizes, cur, nds = b.weights, b.current, #b.datasets
  local total = 0
  for k = 1, nds do total = total + sizes[k] end
  local w, spent, left = {}, {}, nds
  for k = 1, nds do w[k] = sizes[k] / total end
  b.dataset_index:reserve(total)
  b.dataset_sample_index:reserve(total)
  local i = 0
  while left > 0 do
    local x = math.max(i, 1)
    local best, best_err = nil, -math.huge
    for k = 1, nds do
      if not spent[k] then
        local err = w[k] * x - cur[k]
        if err > best_err then best, best_err = k, err end
      end
    end
    push(b, best)
    if cur[best] == sizes[best] then
      spent[best] = true
      left = left - 1
    end
    i = i + 1
  end
  b.count = i
end

-- megatron-core's BlendedDataset description (nil when a dataset has none to give).
local function blend_description(b)
  local list = {}
  for k, ds in ipairs(b.datasets) do
    if not ds.identifiers then return nil end
    list[k] = ds.identifiers
  end
  local weights = {}
  for k, w in ipairs(b.weights) do weights[k] = b.size and mcache.float(w) or w end
  return mcache.describe(mcache.object({
    { 'class', 'BlendedDataset' }, { 'datasets', list }, { 'split', b.split }, { 'weights', weights },
    { 'size', b.size or mcache.null },
  }))
end

local BLEND_NAMES = { 'dataset_index', 'dataset_sample_index' }

-- Reads megatron-core's cached blending indices of this exact description into the blend.
local function load_blend_cache(b, dir)
  local description = blend_description(b)
  if not description then return false end
  local files = mcache.paths(dir, description, 'BlendedDataset', b.split, BLEND_NAMES)
  if not (pio.is_file(files.description) and pio.read_file(files.description) == description) then return false end
  local n = b.size
  if not n then
    n = 0
    for _, w in ipairs(b.weights) do n = n + w end
  end
  local m1, p1 = mcache.map_npy(files.dataset_index, '<i2', { n })
  local m2, p2 = mcache.map_npy(files.dataset_sample_index, '<i8', { n })
  if not (m1 and m2) then return false end
  local which, sample = ffi.cast('const int16_t *', p1), ffi.cast('const int64_t *', p2)
  for i = 0, n - 1 do
    local k = which[i] + 1
    if k < 1 or k > #b.datasets then return false end
    b.dataset_index:push(k - 1)
    b.dataset_sample_index:push(sample[i])
    b.current[k] = math.max(b.current[k], tonumber(sample[i]) + 1)
  end
  b.count, b.cache_files, b.from_cache = n, files, true
  return true
end

local function save_blend_cache(b, dir)
  local description = blend_description(b)
  if not description then return end
  local ok, err = pcall(function()
    pio.mkdir_p(dir)
    local files = mcache.paths(dir, description, 'BlendedDataset', b.split, BLEND_NAMES)
    mcache.write_npy(files.dataset_index, '<i2', { b.count }, b.dataset_index.data, 2 * b.count)
    mcache.write_npy(files.dataset_sample_index, '<i8', { b.count }, b.dataset_sample_index.data, 8 * b.count)
    pio.write_atomic(files.description, description)
    b.cache_files = files
  end)
  if not ok then
    io.stderr:write('gpt dataset: warning: cannot cache the blend indices in ' .. dir .. ': ' .. tostring(err) .. '\n')
  end
end

-- datasets: GPT datasets (or anything with sample_into, count, seq_length); weights: positive
-- numbers. options.size: the number of positions (Megatron's size), each going to a dataset by
-- build_blending_indices over the normalized weights. Without a size the blend is exhaustive
-- (build_exhaustive_blending_indices): the weights are whole sample counts, and dataset k gives
-- exactly weights[k] samples.
function M.BlendedDataset(datasets, weights, options)
  options = options or {}
  if #datasets == 0 then fail('a blend needs at least one dataset', 2) end
  if #datasets > 32766 then fail('too many datasets in a blend', 2) end
  if #weights ~= #datasets then fail(string.format('%d datasets but %d weights', #datasets, #weights), 2) end
  local size = options.size
  if size ~= nil and (type(size) ~= 'number' or size < 0 or size ~= math.floor(size)) then
    fail('the blend size must be a non-negative integer, got ' .. tostring(size), 2)
  end
  for k, w in ipairs(weights) do
    if type(w) ~= 'number' or not (w > 0) or w == math.huge then fail('weight ' .. k .. ' is not a positive number', 2) end
    if size == nil and w ~= math.floor(w) then
      fail('a blend without a size takes weights[k] samples from dataset k: weight ' .. k .. ' is not a whole number', 2)
    end
  end
  local seq = datasets[1].seq_length
  for _, ds in ipairs(datasets) do
    if ds.seq_length ~= seq then fail('all blended datasets need the same seq_length', 2) end
  end
  local b = setmetatable({
    datasets = datasets, weights = size and normalize(weights) or { unpack(weights) }, size = size,
    seq_length = seq, count = 0, current = {},
    dataset_index = indexed._vec('int16_t'), dataset_sample_index = indexed._vec('int64_t'),
  }, Blended)
  for k = 1, #datasets do b.current[k] = 0 end
  b.split = options.split or datasets[1].split or 'train'
  if not (options.cache_dir and load_blend_cache(b, options.cache_dir)) then
    if size then
      blend(b, size)
    else
      exhaust(b)
    end
    if options.cache_dir then save_blend_cache(b, options.cache_dir) end
  end
  check_datasets(b, options.split or datasets[1].split or 'train')
  return b
end

local function check_blend_range(b, i, level)
  if i >= b.count then fail(string.format('sample %d is past the %d samples of %s', i, b.count, tostring(b)), level + 1) end
end

-- Which dataset (1-based) and which of its samples (0-based) position i takes.
function Blended:source(i)
  check_blend_range(self, i, 2)
  return self.dataset_index.data[i] + 1, tonumber(self.dataset_sample_index.data[i])
end

function Blended:sample_into(i, dst)
  local d, k = self:source(i)
  self.datasets[d]:sample_into(k, dst)
end

function Blended:sample(i)
  check_index(self, i, 'sample')
  check_blend_range(self, i, 2)
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
        if not (weights[#weights] > 0) then
          fail("weight '" .. list[k] .. "' for " .. list[k + 1] .. ' is not positive (megatron-core refuses it: ' ..
            'BlendedDataset asserts every weight > 0)', 2)
        end
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

-- blend: what --data-path gave (see parse_blend). options: seq_length, seed, split (the --split
-- text; default Megatron's '969, 30, 1'), sizes = {train =, valid =, test =} (Megatron's
-- train_val_test_num_samples: the samples each split must provide; nil: one epoch), tokenizer (its
-- megatron_cache identifiers, see GPTDataset), cache_dir (--data-cache-path: the GPT datasets' and
-- the blends' indices go there; nil: each GPT dataset's in its default place, blends' nowhere, as
-- megatron-core does; false: nowhere).
-- Returns {train =, valid =, test =, indexed = {open datasets}, warnings = {...}}; a split with no
-- sequences, or too few tokens for one sample in a valid/test split, is nil (with a warning for the latter).
-- The datasets and sizes are megatron-core's BlendedMegatronDatasetBuilder's (see the header).
function M.build(blend, options)
  options = options or {}
  local prefixes, weights = M.parse_blend(blend)
  local split = options.split or '969, 30, 1'
  M.parse_split(split)   -- fail early on a bad --split
  local sizes = options.sizes or {}
  local out = { indexed = {}, warnings = {} }
  local per_split = { train = {}, valid = {}, test = {} }
  local normalized = weights and normalize(weights)
  -- Megatron's num_samples for dataset k in split `name` (_get_size_per_split_per_dataset)
  local function num_samples(k, name)
    local size = sizes[name]
    if not normalized then return #prefixes == 1 and size or nil end
    return size and math.ceil(math.ceil(size * normalized[k]) * (1 + MID_LEVEL_DATASET_SURPLUS))
  end
  for k, prefix in ipairs(prefixes) do
    local ds = indexed.open(prefix)
    out.indexed[k] = ds
    local ranges = M.split_ranges(split, #ds)
    for _, name in ipairs(M.SPLITS) do
      local r = ranges[name]
      if r then
        local ok, result = pcall(M.GPTDataset, ds, {
          seq_length = options.seq_length, seed = options.seed, split = name, split_string = split,
          dataset_path = prefix, tokenizer = options.tokenizer, cache_dir = options.cache_dir,
          num_samples = num_samples(k, name),
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
    local list, ws, counts, target = {}, {}, 0, 0
    for k = 1, #prefixes do
      local ds = per_split[name][k]
      if normalized and sizes[name] then target = target + math.ceil(sizes[name] * normalized[k]) end
      if ds then
        list[#list + 1] = ds
        ws[#ws + 1] = normalized and normalized[k] or ds.count
        counts = counts + ds.count
      end
    end
    if #list == 0 then
      out[name] = nil
    elseif not weights and #prefixes == 1 then
      out[name] = list[1]
    elseif normalized then
      if not sizes[name] then
        fail('--data-path gives weights but the ' .. name .. ' split has no number of samples: using ' ..
          'client-specified weights requires client-specified size (as megatron-core refuses it)', 2)
      end
      out[name] = M.BlendedDataset(list, ws, { size = target, split = name, cache_dir = options.cache_dir })
    else
      out[name] = M.BlendedDataset(list, ws, { size = sizes[name] and math.min(sizes[name], counts) or nil, split = name,
        cache_dir = options.cache_dir })
    end
  end
  return out
end

return M
