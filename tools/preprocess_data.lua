--- Tokenize a JSONL corpus into Megatron indexed datasets, as Megatron-LM's tools/preprocess_data.py:
---
---   pmp tools/preprocess_data.lua --input corpus.jsonl --output-prefix out/corpus --json-keys text \
---       --tokenizer-model path/to/hf_tokenizer_dir --append-eod --workers 8
---   pmp tools/preprocess_data.lua --input corpus.jsonl --output-prefix out/corpus --tokenizer-type char --append-eod
---
--- Writes {output-prefix}_{key}_document.bin/.idx per JSON key (one sequence per document; uint16 when
--- the vocabulary is under 65500, else int32), and {output-prefix}_{key}_document.tokenizer.json, which
--- tells pmp's training recipes which tokenizer made the data.
---
--- Per document (one JSON object per line): the key's text is tokenized; an empty result is an empty
--- document; with --append-eod a non-empty document gets the EOD token.
--- Tokenizers: --tokenizer-model DIR (an HF tokenizer through pmp.tokenizer, when this build has it;
--- EOD = the EOS token; as Megatron's HF wrapper, the tokenizer's special tokens are included, i.e.
--- what tokenizer(text).input_ids gives: Llama-3-style post-processors put a BOS first in every text,
--- Qwen's add nothing; --tokenizer-hf-no-include-special-tokens tokenizes the text alone), or --tokenizer-type char (the distinct characters of the input, found in a
--- first pass, or of --vocab-file; EOD = an extra '<|endoftext|>' entry) or byte (256 ids; EOD = 0).
---
--- Streaming: the input is read line by line, so memory stays bounded whatever its size (the index
--- grows by 12 bytes per document). --workers N > 1 splits the input into N byte ranges (each starts
--- at the first line beginning in it), tokenizes them in N pmp processes, then concatenates their
--- outputs in order (IndexedDatasetBuilder.add_index), so the result is byte-identical to one process.
local FLAGS = {
  { '--input', nil, 'input JSONL file (one JSON object per line)' },
  { '--output-prefix', nil, 'output prefix: writes PREFIX_KEY_document.bin/.idx' },
  { '--json-keys', nil, 'keys to extract from each JSON object (default: text)', multiple = true },
  { '--tokenizer-type', nil, 'char, byte, or HuggingFaceTokenizer (with --tokenizer-model)' },
  { '--tokenizer-model', nil, 'HF tokenizer directory (tokenizer.json), loaded with pmp.tokenizer' },
  { '--tokenizer-hf-no-include-special-tokens', false, "HF tokenizer: leave out the post-processor's special tokens (BOS ...)" },
  { '--vocab-file', nil, 'char tokenizer: a text file whose characters are the vocabulary, or a saved tokenizer JSON' },
  { '--append-eod', false, 'append the end-of-document token to every non-empty document' },
  { '--workers', 1, 'processes to tokenize with' },
  { '--log-interval', 1.0, 'seconds between progress lines' },
  { '--split-sentences', false, 'not supported (Megatron splits with NLTK punkt)' },
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

local function die(message)
  io.stderr:write('preprocess_data: ' .. message .. '\n')
  os.exit(1)
end

local ok, opts = pcall(pmp.args.parse, arg, FLAGS, {
  usage = 'pmp tools/preprocess_data.lua --input X.jsonl --output-prefix OUT [--json-keys text] ' ..
    '(--tokenizer-model DIR | --tokenizer-type char|byte) [--append-eod] [--workers N]',
  description = 'Tokenize JSONL into Megatron indexed datasets (.bin/.idx).',
})
if not ok then
  io.stderr:write('preprocess_data: ' .. tostring(opts) .. '\n')
  os.exit(2)
end
if not opts.input then die('--input is required') end
if not opts.output_prefix then die('--output-prefix is required') end
if opts.split_sentences then die('--split-sentences is not supported (documents are one sequence each)') end
if not pio.is_file(opts.input) then die('cannot read --input ' .. opts.input) end
local keys = opts.json_keys or { 'text' }
local worker_mode = opts._range_start >= 0
local input_size = pio.size(opts.input)

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

local function where(line_number, offset)
  return opts.input .. (line_number and (':' .. line_number) or (': line at byte ' .. offset))
end

-- The texts of a line, one per key (nil for a blank line).
local function texts_of(line, line_number, offset)
  if not line:find('%S') then return nil end
  local okj, obj = pcall(json.decode, line)
  if not okj then die(where(line_number, offset) .. ': not valid JSON: ' .. tostring(obj):gsub('^json%.decode: ', '')) end
  if type(obj) ~= 'table' then die(where(line_number, offset) .. ': not a JSON object') end
  local out = {}
  for k, key in ipairs(keys) do
    local text = obj[key]
    if type(text) ~= 'string' then
      die(where(line_number, offset) .. ": key '" .. key .. "' is " .. (text == nil and 'missing' or 'not a string'))
    end
    out[k] = text
  end
  return out
end

---------------------------------------------------------------------------------------------------
-- The tokenizer

local function sorted_chars_of_input()
  local seen, chars = {}, {}
  local start = clock.now()
  for_lines(opts.input, 0, input_size, function(line, n, offset)
    local texts = texts_of(line, n, offset)
    if texts then
      for _, text in ipairs(texts) do tokenizers.add_chars(text, seen, chars) end
    end
  end)
  table.sort(chars)
  io.stderr:write(string.format('preprocess_data: char vocabulary: %d characters (scanned %s in %.1f s)\n', #chars,
    human_bytes(input_size), clock.now() - start))
  return chars
end

local function make_tokenizer()
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
      chars = sorted_chars_of_input()
    end
    return dataset_tokenizer.char(chars, opts.append_eod)
  elseif kind == 'byte' then
    return dataset_tokenizer.byte()
  elseif kind == nil then
    die('give --tokenizer-model DIR or --tokenizer-type char|byte')
  end
  die("unknown --tokenizer-type '" .. tostring(kind) .. "' (char, byte, or HuggingFaceTokenizer with --tokenizer-model)")
end

local function output_prefix_of(base, key) return base .. '_' .. key .. '_document' end

---------------------------------------------------------------------------------------------------
-- Tokenizing one byte range into builders (the whole job with one worker)

local function tokenize_range(tokenizer, out_base, start, stop, report)
  local builders = {}
  for k, key in ipairs(keys) do
    builders[k] = indexed.builder(output_prefix_of(out_base, key), { vocab_size = tokenizer.vocab_size })
  end
  local docs, tokens = 0, 0
  local eod = opts.append_eod and tokenizer.eod or nil
  local function process(line, n, offset)
    local texts = texts_of(line, n, offset)
    if not texts then return end
    for k, text in ipairs(texts) do
      local okt, ids = pcall(tokenizer.encode, tokenizer, text)
      if not okt then die(where(n, offset) .. ': ' .. tostring(ids)) end
      if #ids > 0 and eod then ids[#ids + 1] = eod end
      builders[k]:add_document(ids, #ids > 0 and { #ids } or {})
      tokens = tokens + #ids
    end
    docs = docs + 1
  end
  local okr, err = pcall(for_lines, opts.input, start, stop, process, function(bytes, final) report(bytes, docs, tokens, final) end)
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
  tokenize_range(tokenizer, opts.output_prefix, opts._range_start, math.min(opts._range_end, input_size), report)
  os.exit(0)
end

---------------------------------------------------------------------------------------------------
-- Main

local tokenizer = make_tokenizer()
local out_dir = pio.dirname(opts.output_prefix)
if not pio.is_dir(out_dir) then pio.mkdir_p(out_dir) end
local start_time = clock.now()

-- Progress over the input's bytes (a bar on a terminal, plain lines otherwise), then a summary line.
local bar = pmp.progress.new({ total = input_size, label = 'processing', unit = 'B', interval = opts.log_interval,
  clock = clock.now })
local function progress_line(bytes, docs, final)
  bar:update(bytes, docs .. ' documents')
  if not final then return end
  bar:finish(docs .. ' documents')
  local elapsed = math.max(clock.now() - start_time, 1e-9)
  io.stderr:write(string.format('processed %d documents (%.1f docs/s, %.2f MB/s), %s in %s\n', docs, docs / elapsed,
    bytes / elapsed / 1e6, human_bytes(bytes), pmp.progress.duration(elapsed)))
end

local workers = math.max(1, math.floor(opts.workers))
local total_docs, total_tokens = 0, 0

local function dataset_summary(key)
  local prefix = output_prefix_of(opts.output_prefix, key)
  local ds = indexed.open(prefix)
  local line = string.format('wrote %s.bin/.idx: %d documents, %d sequences, %d tokens (%s)', prefix, ds:num_documents(),
    #ds, ds.num_tokens, ds.dtype)
  ds:close()
  dataset_tokenizer.save(prefix, tokenizer:state())
  return line
end

if workers == 1 then
  local docs, tokens = tokenize_range(tokenizer, opts.output_prefix, 0, input_size, function(bytes, docs, _, final)
    if not final then progress_line(bytes, docs) end
  end)
  total_docs, total_tokens = docs, tokens
  progress_line(input_size, total_docs, true)
else
  -- Worker processes over byte ranges, in a scratch directory next to the output.
  ffi.cdef('int poll(void *fds, unsigned long nfds, int timeout);')
  local pid = pio.getpid()
  local scratch = opts.output_prefix .. '.workers.' .. pid
  pio.remove_tree(scratch)
  pio.mkdir_p(scratch)
  local function cleanup() pio.remove_tree(scratch) end
  local state_path = pio.join(scratch, 'tokenizer.json')
  pio.write_atomic(state_path, json.encode(tokenizer:state()))
  local pmp_exe = package.loaded['pmp.root'] .. '/pmp'
  local function q(s) return "'" .. tostring(s):gsub("'", [['\'']]) .. "'" end
  local parts = {}
  for k = 1, workers do
    local a, b = math.floor(input_size * (k - 1) / workers), math.floor(input_size * k / workers)
    local part = { prefix = pio.join(scratch, 'part' .. k), progress = pio.join(scratch, 'part' .. k .. '.progress'),
      rc = pio.join(scratch, 'part' .. k .. '.rc'), log = pio.join(scratch, 'part' .. k .. '.log') }
    parts[k] = part
    local words = { q(pmp_exe), q(arg[0]), '--input', q(opts.input), '--output-prefix', q(part.prefix),
      '--_range-start', a, '--_range-end', b, '--_tokenizer-state', q(state_path), '--_progress-file', q(part.progress),
      '--json-keys' }
    for _, key in ipairs(keys) do words[#words + 1] = q(key) end
    if opts.append_eod then words[#words + 1] = '--append-eod' end
    local command = string.format('( %s 2>%s; echo $? >%s.tmp; mv %s.tmp %s ) </dev/null >/dev/null 2>&1 &',
      table.concat(words, ' '), q(part.log), q(part.rc), q(part.rc), q(part.rc))
    local started = os.execute(command)
    if started ~= 0 and started ~= true then
      cleanup()
      die('cannot start worker ' .. k)
    end
  end
  io.stderr:write(string.format('preprocess_data: %d workers over %s\n', workers, human_bytes(input_size)))
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
    progress_line(bytes, docs)
    ffi.C.poll(nil, 0, 50)
  end
  for k, part in ipairs(parts) do
    local rc = tonumber((pio.read_file(part.rc):match('%d+')))
    if rc ~= 0 then
      local log = pio.is_file(part.log) and pio.read_file(part.log) or ''
      cleanup()
      die(string.format('worker %d failed (exit status %s):\n%s', k, tostring(rc), log))
    end
    local _, d, t = read_progress(part)
    total_docs, total_tokens = total_docs + d, total_tokens + t
  end
  -- Concatenate the parts in order.
  for _, key in ipairs(keys) do
    local builder = indexed.builder(output_prefix_of(opts.output_prefix, key), { vocab_size = tokenizer.vocab_size })
    local okm, err = pcall(function()
      for _, part in ipairs(parts) do builder:add_index(output_prefix_of(part.prefix, key)) end
    end)
    if not okm then
      builder:abort()
      cleanup()
      die(tostring(err))
    end
    builder:finalize()
  end
  cleanup()
  progress_line(input_size, total_docs, true)
end

for _, key in ipairs(keys) do io.stderr:write(dataset_summary(key) .. '\n') end
