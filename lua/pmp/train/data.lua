--- Pretraining data from pmp.train.flags.data: a plain text file (tokenized here), Megatron indexed
--- datasets (`PREFIX`, or a blend `0.3 PREFIX_A 0.7 PREFIX_B` as tools/preprocess_data.lua makes them,
--- read through pmp.data.gpt_dataset), or the embedded corpus. Either way the data position is the
--- count of consumed samples, so a resumed run continues with the sample after the last one it trained on.
local json = require 'pmp.json'

local M = {}

-- The tokenizer of indexed data: the checkpoint's when resuming, else the one tools/preprocess_data.lua
-- recorded next to the data (PREFIX.tokenizer.json), else --tokenizer-model / --tokenizer-type byte.
local function indexed_tokenizer(opts, prefixes, tokenizer_state)
  local dataset_tokenizer = require 'pmp.data.dataset_tokenizer'
  if tokenizer_state then return dataset_tokenizer.from_state(tokenizer_state) end
  local state = dataset_tokenizer.load(prefixes[1])
  for k = 2, #prefixes do
    if json.encode(dataset_tokenizer.load(prefixes[k]) or {}) ~= json.encode(state or {}) then
      error('--data-path: ' .. prefixes[k] .. ' was tokenized differently from ' .. prefixes[1], 0)
    end
  end
  if state then return dataset_tokenizer.from_state(state) end
  if opts.tokenizer_model then return dataset_tokenizer.hf(opts.tokenizer_model) end
  if opts.tokenizer_type == 'byte' then return dataset_tokenizer.byte() end
  error('--data-path: ' .. prefixes[1] .. dataset_tokenizer.SUFFIX .. ' (written by tools/preprocess_data.lua) is ' ..
    'missing: give --tokenizer-model DIR, or --tokenizer-type byte for byte-level data', 0)
end

-- role 'valid' or 'test': a blend that serves that split only (Megatron's --valid-data-path,
-- --test-data-path), no training data.
local function indexed(opts, options, role)
  local gpt_dataset, indexed_files = require 'pmp.data.gpt_dataset', require 'pmp.data.indexed'
  local ok, prefixes = pcall(gpt_dataset.parse_blend, opts.data_path)
  if not ok then error('--data-path: ' .. tostring(prefixes):gsub('^gpt dataset: ', ''), 0) end
  for _, prefix in ipairs(prefixes) do
    if not indexed_files.exists(prefix) then error('--data-path: no indexed dataset ' .. prefix .. '.bin/.idx', 0) end
  end
  local tokenizer = indexed_tokenizer(opts, prefixes, options.tokenizer_state)
  local built = gpt_dataset.build(opts.data_path, {
    seq_length = opts.seq_length, seed = opts.seed, split = opts.split, cache_dir = opts.data_cache_path,
    -- the cache files' names are megatron-core's for the same command line
    tokenizer = require('pmp.data.dataset_tokenizer').megatron_identifiers(tokenizer:state(), opts.tokenizer_model),
    -- Megatron's train_val_test_num_samples, so each split's order is the one Megatron builds
    sizes = { train = (opts.train_samples or 0) > 0 and opts.train_samples or opts.train_iters * opts.global_batch_size,
              valid = (math.floor(opts.train_iters / math.max(opts.eval_interval, 1)) + 1) * opts.eval_iters * opts.global_batch_size,
              test = opts.eval_iters * opts.global_batch_size },
  })
  for _, warning in ipairs(built.warnings) do print(options.name .. ': warning: ' .. warning) end
  if not built.train and (role or 'train') == 'train' then error('--data-path: the --split ' .. opts.split .. ' leaves no training data', 0) end
  local total = 0
  for _, ds in ipairs(built.indexed) do total = total + ds.num_tokens end
  return { source = table.concat(opts.data_path, ' '), tokenizer = tokenizer, num_tokens = total,
    train = built.train, valid = built.valid, test = built.test,
    train_tokens = built.train and built.train:sample(0), valid_tokens = built.valid and built.valid:sample(0) }
end

local function text(opts, options)
  local source, content
  if opts.data_path then
    source = opts.data_path[1]
    if require('pmp.io').is_dir(source) then
      error('--data-path ' .. source .. ' is a directory (give a text file or an indexed dataset PREFIX)', 0)
    end
    local file = io.open(source, 'rb')
    if not file then error('cannot read --data-path ' .. source .. ' (neither a text file nor an indexed dataset prefix)', 0) end
    content = file:read('*a')
    file:close()
    if content == '' then error('--data-path ' .. source .. ' is empty', 0) end
  else
    source = 'the embedded corpus'
    content = require('pmp.data.tiny_corpus').generate()
  end

  local dataset_tokenizer, tokenizers = require 'pmp.data.dataset_tokenizer', require 'pmp.data.tokenizers'
  local tokenizer
  if options.tokenizer_state then
    tokenizer = dataset_tokenizer.from_state(options.tokenizer_state)
  elseif opts.tokenizer_model then
    tokenizer = dataset_tokenizer.hf(opts.tokenizer_model)
  elseif opts.tokenizer_type == 'char' then
    tokenizer = tokenizers.char_from_text(content)
  elseif opts.tokenizer_type == 'byte' then
    tokenizer = tokenizers.byte()
  else
    error("--tokenizer-type must be char or byte, got '" .. tostring(opts.tokenizer_type) .. "'", 0)
  end

  local TextDataset = require('pmp.data').TextDataset
  local tokens = require('pmp.tensor').tensor(tokenizer:encode(content), { dtype = 'i64' })
  local train_tokens, valid_tokens, test_tokens = TextDataset.split(tokens, opts.split)
  if not train_tokens or train_tokens:numel() <= opts.seq_length then
    error(string.format('%s: the --split %s leaves %d training tokens, fewer than --seq-length %d + 1',
      opts.data_path and '--data-path ' .. source or source, opts.split, train_tokens and train_tokens:numel() or 0, opts.seq_length), 0)
  end
  return { source = source, tokenizer = tokenizer, num_tokens = tokens:numel(),
    train = TextDataset(train_tokens, opts.seq_length, opts.seed),
    valid = valid_tokens and valid_tokens:numel() > opts.seq_length and TextDataset(valid_tokens, opts.seq_length, opts.seed + 1) or nil,
    test = test_tokens and test_tokens:numel() > opts.seq_length and TextDataset(test_tokens, opts.seq_length, opts.seed + 2) or nil,
    train_tokens = train_tokens, valid_tokens = valid_tokens }
end

-- Megatron's --train-data-path, --valid-data-path and --test-data-path: each blend is wholly its
-- split's, as a --split that gives that split everything makes it.
local function per_split(opts, options)
  local function one(flag, paths, split, role)
    local copy = setmetatable({ data_path = paths, split = split }, { __index = opts })
    local ok, result = pcall(indexed, copy, options, role)
    if not ok then error((tostring(result):gsub('^%-%-data%-path', flag)), 0) end
    return result
  end
  local data = one('--train-data-path', opts.train_data_path, '1,0,0', 'train')
  for _, split in ipairs({ { '--valid-data-path', opts.valid_data_path, '0,1,0', 'valid', 'validation' },
                           { '--test-data-path', opts.test_data_path, '0,0,1', 'test', 'test' } }) do
    local flag, paths, weights, role, name = unpack(split)
    if paths then
      local part = one(flag, paths, weights, role)
      if json.encode(part.tokenizer:state()) ~= json.encode(data.tokenizer:state()) then
        error(flag .. ': ' .. part.source .. ' was tokenized differently from --train-data-path ' .. data.source, 0)
      end
      data[role] = part[role]
      if role == 'valid' then data.valid_tokens = part.valid_tokens end
      data.source = data.source .. ' (' .. name .. ': ' .. part.source .. ')'
    end
  end
  return data
end

--- Whether opts name Megatron indexed data in --data-path (a blend, or one PREFIX with .bin/.idx files).
function M.is_indexed(opts)
  if not opts.data_path then return false end
  return #opts.data_path > 1 or require('pmp.data.indexed').exists(opts.data_path[1])
end

--- The data of a pretraining run: {source (what was read, for the log), tokenizer, num_tokens, train
--- valid and test (datasets with :batch(start, n) and .count; valid and test may be nil), train_tokens, valid_tokens
--- (the first sample's / split's token ids, for a sample prompt)}. options: tokenizer_state (a
--- resumed checkpoint's tokenizer, which wins over the flags), name (the recipe, for warnings).
function M.pretraining(opts, options)
  options = options or {}
  if opts.train_data_path then return per_split(opts, options) end
  if M.is_indexed(opts) then return indexed(opts, options) end
  return text(opts, options)
end

--- This data-parallel rank's share of `count` micro batches from sample `first` on, in Megatron's
--- order: micro-step k of data-parallel rank r reads the micro batch at first + (k * dp + r) *
--- micro_batch_size (wrapping around the dataset with wrap). Each context-parallel rank keeps its two
--- chunks of every sequence. documents (optional): {eod, eod_mask_loss, reset_position_ids,
--- reset_attention_mask} marks document boundaries as pmp.train.documents does.
function M.micro_batches(dataset, first, count, micro_batch_size, layout, wrap, documents)
  local context_parallel = require 'pmp.nn.context_parallel'
  local list = {}
  for k = 0, count - 1 do
    local start = first + (k * layout.dp + layout.dp_rank) * micro_batch_size
    if wrap then start = start % dataset.count end
    local x, y = dataset:batch(start, micro_batch_size)
    local options
    if documents then
      y, options = require('pmp.train.documents').apply(x, y, documents.eod, documents)
      for key, value in pairs(options or {}) do options[key] = context_parallel.split(value) end
    end
    list[#list + 1] = { ids = context_parallel.split(x), targets = context_parallel.split(y), options = options }
  end
  return list
end

return M
