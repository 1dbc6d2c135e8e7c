--- Tokenize a JSONL corpus into Megatron indexed datasets, as Megatron-LM's tools/preprocess_data.py
--- (same flags, same meanings, the same bytes for the same command line):
---
---   pmp tools/preprocess_data.lua --input corpus.jsonl --output-prefix out/corpus --json-keys text \
---       --tokenizer-type HuggingFaceTokenizer --tokenizer-model path/to/hf_tokenizer_dir --append-eod --workers 8
---   pmp tools/preprocess_data.lua --input corpus.jsonl --output-prefix out/corpus --tokenizer-type char --append-eod
---
--- Writes {output-prefix}_{key}_document.bin/.idx per JSON key (one sequence per document; uint16 when
--- the vocabulary is under 65500, else int32), or _sentence with --split-sentences (one sequence per
--- sentence), and {output-prefix}_{key}_{level}.tokenizer.json, which tells pmp's training recipes
--- which tokenizer made the data.
---
--- Per document (one JSON object per line; blank lines are skipped): the key's text is tokenized (every
--- sentence on its own with --split-sentences; empty sentences are dropped); a document with no tokens
--- is an empty document; with --append-eod a non-empty document gets the EOD token at its end.
--- Tokenizers: --tokenizer-model DIR (an HF tokenizer through pmp.tokenizer, when this build has it;
--- EOD = the EOS token; as Megatron's HF wrapper, the tokenizer's special tokens are included, i.e.
--- what tokenizer(text).input_ids gives: Llama-3-style post-processors put a BOS first in every text,
--- Qwen's add nothing; --tokenizer-hf-no-include-special-tokens tokenizes the text alone), also
--- spelled as Pai-Megatron-Patch's --patch-tokenizer-type NAME --load DIR; --tokenizer-type
--- GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt (GPT-2's byte-level BPE, EOD =
--- '<|endoftext|>'); or --tokenizer-type char (the
--- distinct characters of the input, found in a first pass, or of --vocab-file; EOD = an extra
--- '<|endoftext|>' entry) or byte (256 ids; EOD = 0).
---
--- --split-sentences splits with the simple rule of pmp.data.sentences (NLTK punkt's model is not
--- available here; --lang is accepted and ignored), --keep-newlines keeps the whitespace between
--- sentences. Unlike Megatron (which stops after writing the split file when --partitions is 1),
--- the split and the tokenization are one run, and no *_ss.jsonl file is left behind.
---
--- --partitions N (Megatron's meaning): --input is a glob (files in sorted order; .gz read through
--- gzip); its lines are dealt to N partitions round robin, or with --keep-sequential-samples in runs
--- of ceil(lines / N); the partitions are tokenized one after the other (--workers / N processes each)
--- and joined in partition order, so the documents come in Megatron's order. The partition files live
--- in a scratch directory next to the output and are removed.
---
--- --log-interval N prints "Processed K documents (... docs/s, ... MB/s)." every N documents.
--- Streaming: the input is read line by line, so memory stays bounded whatever its size (the index
--- grows by 12 bytes per document). --workers N > 1 splits the input into N byte ranges (each starts
--- at the first line beginning in it), tokenizes them in N pmp processes, then concatenates their
--- outputs in order (IndexedDatasetBuilder.add_index), so the result is byte-identical to one process.
---
--- --sft: the lines are fine-tuning records (alpaca, sharegpt or messages, detected per record unless
--- --format says) rendered with the chat template of --tokenizer-model (or --chat-template) and
--- tokenized exactly as recipes/sft.lua does; writes PREFIX_text_document (one document of ids per
--- sample) and the aligned PREFIX_loss_mask_document (1 for the tokens trained: assistant turns, or all
--- with --train-on-prompt), which `pmp recipes/sft.lua --data-path PREFIX` trains from.
local FLAGS = {
  { '--input', nil, 'input JSONL file (a glob with --partitions > 1)' },
  { '--output-prefix', nil, 'output prefix: writes PREFIX_KEY_document.bin/.idx' },
  { '--json-keys', nil, 'keys to extract from each JSON object (default: text)', multiple = true },
  { '--tokenizer-type', nil, 'HuggingFaceTokenizer (with --tokenizer-model), GPT2BPETokenizer, char or byte' },
  { '--tokenizer-model', nil, 'HF tokenizer directory (tokenizer.json), loaded with pmp.tokenizer' },
  { '--tokenizer-hf-no-include-special-tokens', false, "HF tokenizer: leave out the post-processor's special tokens (BOS ...)" },
  { '--patch-tokenizer-type', nil, "Pai-Megatron-Patch's spelling: an HF tokenizer (from --load)" },
  { '--load', nil, "Pai-Megatron-Patch's spelling of --tokenizer-model" },
  { '--vocab-file', nil, 'GPT2BPETokenizer: vocab.json; char: a text file whose characters are the vocabulary, or a saved tokenizer JSON' },
  { '--merge-file', nil, 'GPT2BPETokenizer: merges.txt' },
  { '--append-eod', false, 'append the end-of-document token to every non-empty document' },
  { '--split-sentences', false, 'one sequence per sentence (writes PREFIX_KEY_sentence; see pmp.data.sentences)' },
  { '--keep-newlines', false, 'with --split-sentences: keep the whitespace between sentences' },
  { '--lang', 'english', "NLTK punkt's language (accepted; pmp's sentence rule is language-independent)" },
  { '--workers', 1, 'processes to tokenize with' },
  { '--partitions', 1, 'deal the input lines to this many partitions, joined in order (Megatron)' },
  { '--keep-sequential-samples', false, 'with --partitions: consecutive runs of lines per partition, not round robin' },
  { '--log-interval', 1000, 'documents between progress lines' },
  { '--sft', false, 'fine-tuning records: write token ids and the aligned loss mask (see above)' },
  { '--format', 'auto', '--sft: auto, alpaca, sharegpt or messages' },
  { '--chat-template', nil, '--sft: a built-in template (chatml, llama3, alpaca) instead of the tokenizer\'s' },
  { '--train-on-prompt', false, '--sft: also train on system/user tokens' },
  { '--_range-start', -1, '(internal) worker: first byte of its range' },
  { '--_range-end', -1, '(internal) worker: end of its range' },
  { '--_tokenizer-state', nil, '(internal) worker: the tokenizer, as a saved state' },
  { '--_progress-file', nil, '(internal) worker: where to report progress' },
}

local ffi = require 'ffi'
local json = pmp.json
local pio = pmp.io
local indexed = pmp.data.indexed
local dataset_tokenizer = require 'pmp.data.dataset_tokenizer'
local tokenizers = require 'pmp.data.tokenizers'
local clock = require 'pmp.clock'
local sentences = require 'pmp.data.sentences'

local scratch_dirs = {}   -- removed by die as well

local function die(message)
  io.stderr:write('preprocess_data: ' .. message .. '\n')
  for dir in pairs(scratch_dirs) do pmp.io.remove_tree(dir) end
  os.exit(1, true)   -- closing the Lua state frees what the tokenizer holds in C (LeakSanitizer sees it otherwise)
end

local ok, opts = pcall(pmp.args.parse, arg, FLAGS, {
  usage = 'pmp tools/preprocess_data.lua --input X.jsonl --output-prefix OUT [--json-keys text] ' ..
    '(--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR | --tokenizer-type char|byte) [--append-eod] ' ..
    '[--split-sentences] [--workers N] [--partitions N]',
  description = 'Tokenize JSONL into Megatron indexed datasets (.bin/.idx).',
})
if not ok then
  io.stderr:write('preprocess_data: ' .. tostring(opts) .. '\n')
  os.exit(2)
end
if not opts.input then die('--input is required') end
if not opts.output_prefix then die('--output-prefix is required') end
if opts.load then
  if opts.tokenizer_model and opts.tokenizer_model ~= opts.load then die('give --load or --tokenizer-model, not both') end
  opts.tokenizer_model = opts.load
end
if opts.patch_tokenizer_type and not opts.tokenizer_model then die('--patch-tokenizer-type needs --load DIR (an HF tokenizer)') end
local partitions = math.floor(opts.partitions)
if partitions < 1 then die('--partitions must be at least 1') end
if partitions == 1 and not pio.is_file(opts.input) then die('cannot read --input ' .. opts.input) end
local keys = opts.json_keys or { 'text' }
local sft_indexed = require 'pmp.data.sft_indexed'
if opts.sft then
  if opts.json_keys then die('--sft writes the keys ' .. table.concat(sft_indexed.KEYS, ' and ') .. '; drop --json-keys') end
  if not opts.tokenizer_model then die('--sft needs --tokenizer-model DIR (its chat template renders the records)') end
  if opts.append_eod then die('--sft: the chat template ends each turn; drop --append-eod') end
  if opts.split_sentences then die('--sft: a sample is one sequence; drop --split-sentences') end
  keys = sft_indexed.KEYS
end
local level = opts.split_sentences and 'sentence' or 'document'
local worker_mode = opts._range_start >= 0

local function human_bytes(n)
  if n >= 2^30 then return string.format('%.2f GB', n / 2^30) end
  if n >= 2^20 then return string.format('%.1f MB', n / 2^20) end
  return string.format('%.1f kB', n / 2^10)
end

---------------------------------------------------------------------------------------------------
-- Reading a byte range of the input line by line

-- Calls fn(line, line_number_or_nil, byte_offset) for each line that starts in [start, stop);
-- progress(bytes_done) every so often.
local function for_lines(path, start, stop, fn, progress)
  local file, err = io.open(path, 'rb')
  if not file then die('cannot open ' .. tostring(err)) end
  file:setvbuf('full', 1048576)
  if start > 0 then
    file:seek('set', start - 1)
    local c = file:read(1)
    if c ~= '\n' then file:read('*l') end   -- the line in progress belongs to the previous range
  end
  local line_number = start == 0 and 0 or nil
  local count = 0
  while true do
    local pos = file:seek()
    if pos >= stop then break end
    local line = file:read('*l')
    if not line then break end
    if line_number then line_number = line_number + 1 end
    fn(line, line_number, pos)
    count = count + 1
    if progress and count % 64 == 0 then progress(file:seek() - start) end
  end
  local done = math.min(file:seek(), stop) - start
  file:close()
  if progress then progress(done, true) end
end

local function where(path, line_number, offset)
  return path .. (line_number and (':' .. line_number) or (': line at byte ' .. offset))
end

-- The texts of a line, one per key (nil for a blank line).
local function texts_of(path, line, line_number, offset)
  if not line:find('%S') then return nil end
  local okj, obj = pcall(json.decode, line)
  if not okj then die(where(path, line_number, offset) .. ': not valid JSON: ' .. tostring(obj):gsub('^json%.decode: ', '')) end
  if type(obj) ~= 'table' then die(where(path, line_number, offset) .. ': not a JSON object') end
  local out = {}
  for k, key in ipairs(keys) do
    local text = obj[key]
    if type(text) ~= 'string' then
      die(where(path, line_number, offset) .. ": key '" .. key .. "' is " .. (text == nil and 'missing' or 'not a string'))
    end
    out[k] = text
  end
  return out
end

---------------------------------------------------------------------------------------------------
-- The tokenizer

-- The distinct characters of the inputs' texts, sorted.
local function sorted_chars_of(paths)
  local seen, chars, bytes = {}, {}, 0
  local start = clock.now()
  for _, path in ipairs(paths) do
    local size = pio.size(path)
    bytes = bytes + size
    for_lines(path, 0, size, function(line, n, offset)
      local texts = texts_of(path, line, n, offset)
      if texts then
        for _, text in ipairs(texts) do tokenizers.add_chars(text, seen, chars) end
      end
    end)
  end
  table.sort(chars)
  io.stderr:write(string.format('preprocess_data: char vocabulary: %d characters (scanned %s in %.1f s)\n', #chars,
    human_bytes(bytes), clock.now() - start))
  return chars
end

local function make_tokenizer(inputs)
  if opts._tokenizer_state then
    return dataset_tokenizer.from_state(json.decode(pio.read_file(opts._tokenizer_state)))
  end
  local kind = opts.tokenizer_type
  if opts.tokenizer_model and (kind == nil or kind == 'HuggingFaceTokenizer' or kind == 'hf') then
    local okt, tok = pcall(dataset_tokenizer.hf, opts.tokenizer_model,
      { special_tokens = not opts.tokenizer_hf_no_include_special_tokens })
    if not okt then die(tostring(tok):gsub('^dataset tokenizer: ', '')) end
    if opts.append_eod and not tok.eod then die('--append-eod: the tokenizer in ' .. opts.tokenizer_model .. ' has no EOS token') end
    return tok
  end
  if kind == 'GPT2BPETokenizer' then
    if not (opts.vocab_file and opts.merge_file) then die('--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file') end
    local okt, tok = pcall(dataset_tokenizer.gpt2_bpe, opts.vocab_file, opts.merge_file)
    if not okt then die(tostring(tok):gsub('^dataset tokenizer: ', '')) end
    if opts.append_eod and not tok.eod then die('--append-eod: ' .. opts.vocab_file .. " has no '<|endoftext|>'") end
    return tok
  end
  if kind == 'char' then
    local chars
    if opts.vocab_file then
      local text = pio.read_file(opts.vocab_file)
      local okj, state = pcall(json.decode, text)
      if okj and type(state) == 'table' and type(state.chars) == 'table' then
        chars = state.chars
      else
        local seen = {}
        chars = {}
        for c in text:gmatch('[%z\1-\127\194-\244][\128-\191]*') do
          if not seen[c] then
            seen[c] = true
            chars[#chars + 1] = c
          end
        end
        table.sort(chars)
      end
    else
      chars = sorted_chars_of(inputs)
    end
    return dataset_tokenizer.char(chars, opts.append_eod)
  elseif kind == 'byte' then
    return dataset_tokenizer.byte()
  elseif kind == nil then
    die('give --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR, or --tokenizer-type char|byte')
  end
  if kind == 'HuggingFaceTokenizer' then die('--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR') end
  die("unsupported --tokenizer-type '" .. tostring(kind) .. "' (HuggingFaceTokenizer with --tokenizer-model, " ..
    'GPT2BPETokenizer with --vocab-file and --merge-file, char, or byte)')
end

local function output_prefix_of(base, key) return base .. '_' .. key .. '_' .. level end

-- The values a key's dataset holds: token ids, or 0 and 1 for --sft's loss mask (the smallest dtype).
local function vocab_size_of(key, tokenizer)
  if opts.sft and key == 'loss_mask' then return 2 end
  return tokenizer.vocab_size
end

---------------------------------------------------------------------------------------------------
-- Tokenizing one byte range of a file into builders (the whole job with one worker)

-- --sft: a line's sample {ids, mask} as recipes/sft.lua makes it (pmp.train.chat_data), nil for a
-- blank line.
local sft_options
local function sample_of(tokenizer, path, line, line_number, offset)
  if not line:find('%S') then return nil end
  local chat_data = require 'pmp.train.chat_data'
  if not sft_options then
    local renderer = require('pmp.train.base_model').chat_renderer
    local okr, render = pcall(renderer, tokenizer.inner, opts.tokenizer_model, opts.chat_template, opts.tokenizer_model)
    if not okr then die(tostring(render)) end
    sft_options = { tokenizer = tokenizer.inner, render = render, format = opts.format, train_on_prompt = opts.train_on_prompt }
  end
  local oks, sample = pcall(chat_data.sample, line, sft_options, where(path, line_number, offset) .. ': ')
  if not oks then die(tostring(sample)) end
  return sample
end

-- The ids and sequence lengths of one text (Megatron's Encoder.encode for one key).
local function encode_text(tokenizer, text, eod)
  local pieces = opts.split_sentences and sentences.split(text, opts.keep_newlines) or { text }
  local ids, lengths = {}, {}
  for _, piece in ipairs(pieces) do
    local piece_ids = tokenizer:encode(piece)
    if #piece_ids > 0 then
      for _, id in ipairs(piece_ids) do ids[#ids + 1] = id end
      lengths[#lengths + 1] = #piece_ids
    end
  end
  if #ids > 0 and eod then
    ids[#ids + 1] = eod
    lengths[#lengths] = lengths[#lengths] + 1
  end
  return ids, lengths
end

local function tokenize_range(tokenizer, path, out_base, start, stop, report)
  local builders = {}
  for k, key in ipairs(keys) do
    builders[k] = indexed.builder(output_prefix_of(out_base, key), { vocab_size = vocab_size_of(key, tokenizer) })
  end
  local docs, tokens = 0, 0
  local eod = opts.append_eod and tokenizer.eod or nil
  local function process(line, n, offset)
    if opts.sft then
      local sample = sample_of(tokenizer, path, line, n, offset)
      if not sample then return end
      builders[1]:add_document(sample.ids, { #sample.ids })
      builders[2]:add_document(sft_indexed.mask_document(sample), { #sample.ids })
      docs, tokens = docs + 1, tokens + #sample.ids
      return
    end
    local texts = texts_of(path, line, n, offset)
    if not texts then return end
    for k, text in ipairs(texts) do
      local okt, ids, lengths = pcall(encode_text, tokenizer, text, eod)
      if not okt then die(where(path, n, offset) .. ': ' .. tostring(ids)) end
      builders[k]:add_document(ids, lengths)
      tokens = tokens + #ids
    end
    docs = docs + 1
    report(nil, docs, tokens)
  end
  local okr, err = pcall(for_lines, path, start, stop, process, function(bytes, final) report(bytes, docs, tokens, final) end)
  if not okr then
    for _, b in ipairs(builders) do b:abort() end
    error(err, 0)
  end
  for _, b in ipairs(builders) do b:finalize() end
  return docs, tokens, builders
end

---------------------------------------------------------------------------------------------------
-- Worker mode: one byte range, progress to a file

if worker_mode then
  local tokenizer = make_tokenizer()
  local last = 0
  local function report(bytes, docs, tokens, final)
    if not bytes then return end
    local now = clock.now()
    if not final and now - last < 0.2 then return end
    last = now
    local f = io.open(opts._progress_file .. '.tmp', 'w')
    if f then
      f:write(string.format('%d %d %d %s\n', bytes, docs, tokens, final and 'done' or 'running'))
      f:close()
      os.rename(opts._progress_file .. '.tmp', opts._progress_file)
    end
  end
  tokenize_range(tokenizer, opts.input, opts.output_prefix, opts._range_start,
    math.min(opts._range_end, pio.size(opts.input)), report)
  os.exit(0, true)
end

---------------------------------------------------------------------------------------------------
-- Progress: Megatron's line every --log-interval documents, then a summary

local start_time = clock.now()
local log_interval = math.floor(opts.log_interval)
local logged = 0   -- documents up to the last progress line

local function log_progress(docs, bytes)
  if log_interval <= 0 or docs < logged + log_interval then return end
  logged = docs - docs % log_interval
  local elapsed = math.max(clock.now() - start_time, 1e-9)
  io.stderr:write(string.format('Processed %d documents (%.1f docs/s, %.2f MB/s).\n', docs, docs / elapsed,
    bytes / elapsed / 2^20))
end

local function summary(docs, bytes)
  local elapsed = math.max(clock.now() - start_time, 1e-9)
  io.stderr:write(string.format('processed %d documents (%.1f docs/s, %.2f MB/s), %s in %s\n', docs, docs / elapsed,
    bytes / elapsed / 1e6, human_bytes(bytes), pmp.progress.duration(elapsed)))
end

---------------------------------------------------------------------------------------------------
-- Tokenizing one file into {out_base}_{key}_{level}, with one process or several

pcall(ffi.cdef, 'int poll(void *fds, unsigned long nfds, int timeout);')
local function q(text) return "'" .. tostring(text):gsub("'", [['\'']]) .. "'" end

-- Concatenates the outputs under the prefixes, in order, into out_base's (add_index).
local function join_outputs(tokenizer, prefixes, out_base)
  for _, key in ipairs(keys) do
    local builder = indexed.builder(output_prefix_of(out_base, key), { vocab_size = vocab_size_of(key, tokenizer) })
    local okm, err = pcall(function()
      for _, prefix in ipairs(prefixes) do builder:add_index(output_prefix_of(prefix, key)) end
    end)
    if not okm then
      builder:abort()
      die(tostring(err))
    end
    builder:finalize()
  end
end

-- Returns the number of documents. docs_before / bytes_before: what earlier partitions did, for the
-- progress lines.
local function tokenize_file(tokenizer, path, out_base, workers, docs_before, bytes_before)
  local size = pio.size(path)
  if workers == 1 then
    local last_bytes = 0
    local docs = tokenize_range(tokenizer, path, out_base, 0, size, function(bytes, docs)
      if bytes then last_bytes = bytes end
      log_progress(docs_before + docs, bytes_before + last_bytes)
    end)
    return docs
  end
  -- Worker processes over byte ranges, in a scratch directory next to the output.
  local scratch = out_base .. '.workers.' .. pio.getpid()
  pio.remove_tree(scratch)
  pio.mkdir_p(scratch)
  scratch_dirs[scratch] = true
  local state_path = pio.join(scratch, 'tokenizer.json')
  pio.write_atomic(state_path, json.encode(tokenizer:state()))
  local pmp_exe = package.loaded['pmp.root'] .. '/pmp'
  local parts = {}
  for k = 1, workers do
    local a, b = math.floor(size * (k - 1) / workers), math.floor(size * k / workers)
    local part = { prefix = pio.join(scratch, 'part' .. k), progress = pio.join(scratch, 'part' .. k .. '.progress'),
      rc = pio.join(scratch, 'part' .. k .. '.rc'), log = pio.join(scratch, 'part' .. k .. '.log') }
    parts[k] = part
    local words = { q(pmp_exe), q(arg[0]), '--input', q(path), '--output-prefix', q(part.prefix),
      '--_range-start', a, '--_range-end', b, '--_tokenizer-state', q(state_path), '--_progress-file', q(part.progress) }
    if opts.sft then
      for _, w in ipairs({ '--sft', '--tokenizer-model', q(opts.tokenizer_model), '--format', q(opts.format) }) do words[#words + 1] = w end
      if opts.chat_template then words[#words + 1], words[#words + 2] = '--chat-template', q(opts.chat_template) end
      if opts.train_on_prompt then words[#words + 1] = '--train-on-prompt' end
    else
      words[#words + 1] = '--json-keys'
      for _, key in ipairs(keys) do words[#words + 1] = q(key) end
    end
    for _, switch in ipairs({ 'append_eod', 'split_sentences', 'keep_newlines' }) do
      if opts[switch] then words[#words + 1] = '--' .. (switch:gsub('_', '-')) end
    end
    local command = string.format('( %s 2>%s; echo $? >%s.tmp; mv %s.tmp %s ) </dev/null >/dev/null 2>&1 &',
      table.concat(words, ' '), q(part.log), q(part.rc), q(part.rc), q(part.rc))
    local started = os.execute(command)
    if started ~= 0 and started ~= true then die('cannot start worker ' .. k) end
  end
  io.stderr:write(string.format('preprocess_data: %d workers over %s\n', workers, human_bytes(size)))
  local function read_progress(part)
    local f = io.open(part.progress, 'r')
    if not f then return 0, 0, 0 end
    local text = f:read('*a') or ''
    f:close()
    local b, d, t = text:match('^(%d+) (%d+) (%d+)')
    return tonumber(b) or 0, tonumber(d) or 0, tonumber(t) or 0
  end
  while true do
    local finished = 0
    for _, part in ipairs(parts) do
      if pio.is_file(part.rc) then finished = finished + 1 end
    end
    local bytes, docs = 0, 0
    for _, part in ipairs(parts) do
      local b, d = read_progress(part)
      bytes, docs = bytes + b, docs + d
    end
    if finished == #parts then break end
    log_progress(docs_before + docs, bytes_before + bytes)
    ffi.C.poll(nil, 0, 50)
  end
  local total_docs = 0
  for k, part in ipairs(parts) do
    local rc = tonumber((pio.read_file(part.rc):match('%d+')))
    if rc ~= 0 then
      local log = pio.is_file(part.log) and pio.read_file(part.log) or ''
      die(string.format('worker %d failed (exit status %s):\n%s', k, tostring(rc), log))
    end
    local _, d = read_progress(part)
    total_docs = total_docs + d
  end
  local part_prefixes = {}
  for k, part in ipairs(parts) do part_prefixes[k] = part.prefix end
  join_outputs(tokenizer, part_prefixes, out_base)
  pio.remove_tree(scratch)
  scratch_dirs[scratch] = nil
  return total_docs
end

---------------------------------------------------------------------------------------------------
-- Partitions (--partitions N): the input lines dealt to N files, as Megatron deals them

-- The files a glob names (wildcards in the last component only), sorted.
local function expand_glob(pattern)
  if not pattern:find('[%*%?%[]') then return pio.is_file(pattern) and { pattern } or {} end
  local dir, name = pattern:match('^(.*)/([^/]*)$')
  if not dir then dir, name = '.', pattern end
  if dir:find('[%*%?%[]') then die('--input ' .. pattern .. ': wildcards only in the file name') end
  local lua_pattern = '^' .. name:gsub('[%^%$%(%)%%%.%+%-]', '%%%0'):gsub('%*', '.*'):gsub('%?', '.') .. '$'
  local out = {}
  if pio.is_dir(dir) then
    for _, entry in ipairs(pio.listdir(dir)) do
      local path = dir == '.' and entry or pio.join(dir, entry)
      if entry:match(lua_pattern) and pio.is_file(path) then out[#out + 1] = path end
    end
  end
  table.sort(out)
  return out
end

-- Calls fn(line) for every line (with its newline) of the files, .gz ones through gzip.
local function each_line(paths, fn)
  for _, path in ipairs(paths) do
    local file = path:match('%.gz$') and io.popen('gzip -dc ' .. q(path), 'r') or io.open(path, 'rb')
    if not file then die('cannot read ' .. path) end
    for line in file:lines('*L') do fn(line) end
    file:close()
  end
end

-- Writes the partition files into dir; returns their paths.
local function deal_lines(paths, n, dir)
  local size
  if opts.keep_sequential_samples then
    local lines = 0
    each_line(paths, function() lines = lines + 1 end)
    size = math.max(1, math.ceil(lines / n))
  end
  local files, outs = {}, {}
  for k = 1, n do
    files[k] = pio.join(dir, 'partition_' .. (k - 1) .. '.jsonl')
    outs[k] = assert(io.open(files[k], 'wb'))
  end
  local i = 0
  each_line(paths, function(line)
    local k = size and math.floor(i / size) or i % n
    outs[math.min(k, n - 1) + 1]:write(line)
    i = i + 1
  end)
  for _, f in ipairs(outs) do f:close() end
  return files
end

local total_docs, total_bytes = 0, 0

-- The summary lines and, next to each output, the tokenizer that made it.
local function finish(tokenizer)
  summary(total_docs, total_bytes)
  for _, key in ipairs(keys) do
    local prefix = output_prefix_of(opts.output_prefix, key)
    local ds = indexed.open(prefix)
    io.stderr:write(string.format('wrote %s.bin/.idx: %d documents, %d sequences, %d tokens (%s)\n', prefix,
      ds:num_documents(), #ds, ds.num_tokens, ds.dtype))
    ds:close()
    dataset_tokenizer.save(prefix, tokenizer:state())
  end
end

---------------------------------------------------------------------------------------------------
-- Main

local out_dir = pio.dirname(opts.output_prefix)
if not pio.is_dir(out_dir) then pio.mkdir_p(out_dir) end
local workers = math.max(1, math.floor(opts.workers))

if partitions == 1 then
  local tokenizer = make_tokenizer({ opts.input })
  total_docs = tokenize_file(tokenizer, opts.input, opts.output_prefix, workers, 0, 0)
  total_bytes = pio.size(opts.input)
  finish(tokenizer)
else
  local inputs = expand_glob(opts.input)
  if #inputs == 0 then die('--input ' .. opts.input .. ' names no file') end
  local scratch = opts.output_prefix .. '.partitions.' .. pio.getpid()
  pio.remove_tree(scratch)
  pio.mkdir_p(scratch)
  scratch_dirs[scratch] = true
  local okp, err = pcall(function()
    local files = deal_lines(inputs, partitions, scratch)
    local tokenizer = make_tokenizer(files)
    local per_partition = math.max(1, math.floor(workers / partitions))
    local outputs = {}
    for k, file in ipairs(files) do
      outputs[k] = pio.join(scratch, 'out_' .. (k - 1))
      local docs = tokenize_file(tokenizer, file, outputs[k], per_partition, total_docs, total_bytes)
      total_docs, total_bytes = total_docs + docs, total_bytes + pio.size(file)
    end
    join_outputs(tokenizer, outputs, opts.output_prefix)
    finish(tokenizer)
  end)
  pio.remove_tree(scratch)
  scratch_dirs[scratch] = nil
  if not okp then error(err, 0) end
end
