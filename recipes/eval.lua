--- Evaluate a language model: perplexity on a text file or an indexed dataset, and accuracy on
--- multiple-choice and exact-match tasks (jsonl, lm-evaluation-harness's conventions).
---   pmp recipes/eval.lua --load checkpoints/pretrain --data-path text.txt --seq-length 128 --stride 64
---   pmp recipes/eval.lua --load HF_DIR --data-path corpus_text_document --task mc.jsonl qa.jsonl \
---       --output results.json
--- --load: a pmp checkpoint directory or a Hugging Face model directory (config.json). With no arguments
--- it evaluates checkpoints/pretrain (what `pmp recipes/pretrain.lua` saves) if it is there, else a small
--- random model, on an embedded held-out text and three small embedded tasks (grammar, sums).
---
--- Task files, one JSON object per line, all of one kind per file (the file's name names the task):
---   multiple choice: {"context": "2 + 2 =", "choices": [" 4.", " 5."], "gold": 0}     -> acc, acc_norm
---     (log-likelihood of each choice's tokens after the context; acc_norm divides it by the choice's
---     length in bytes; gold is 0-based)
---   exact match:     {"prompt": "2 + 2 =", "answer": "4"}  (or "answer": ["4", "four"])  -> exact_match
---     (greedy generation until a --stop string or --max-new-tokens; compared with whitespace trimmed)
--- Progress goes to stderr; the results table to stdout; --output writes them as JSON.
local evaluation = pmp.evaluation

local FLAGS = {
  { '--load', nil, 'pmp checkpoint directory or HF model directory (default: checkpoints/pretrain or a random model)' },
  { '--tokenizer-model', nil, 'HF tokenizer directory (tokenizer.json) to use instead of the model\'s own' },
  { '--data-path', nil, 'text file or indexed dataset prefix to compute perplexity on' },
  { '--seq-length', 0, 'tokens per window (0: the checkpoint\'s training --seq-length, else 128)', integer = true, min = 0 },
  { '--stride', 0, 'tokens between window starts (0: --seq-length, windows that do not overlap)', integer = true, min = 0 },
  { '--max-tokens', 0, 'evaluate only the first this many tokens of --data-path (0: all)', integer = true, min = 0 },
  { '--micro-batch-size', 8, 'perplexity windows per forward', integer = true, min = 1 },
  { '--task', nil, 'task jsonl files', multiple = true },
  { '--limit', 0, 'records per task (0: all)', integer = true, min = 0 },
  { '--max-new-tokens', 16, 'exact-match tasks: tokens to generate at most', integer = true, min = 1 },
  { '--stop', nil, 'exact-match tasks: stop strings (default: a newline)', multiple = true },
  { '--output', nil, 'write the results here as JSON' },
}

local opts = pmp.args.parse(arg, FLAGS, { usage = 'pmp recipes/eval.lua [--load DIR] [--data-path P] [--task F ...]' })
-- the results need a place before the evaluation they record is run
if opts.output then
  local probe = string.format('%s.tmp.%d', opts.output, pmp.io.getpid())
  local file, why = io.open(probe, 'w')
  if not file then error('--output ' .. opts.output .. ' is not writable: ' .. tostring(why), 0) end
  file:close()
  os.remove(probe)
end

---------------------------------------------------------------------------------------------------
-- Model, tokenizer and what to evaluate on

local model, tokenizer, trained_seq_length, model_name
local default_run = opts.load == nil and opts.data_path == nil and opts.task == nil
local load = opts.load or (pmp.checkpoint.latest_iteration('checkpoints/pretrain') and 'checkpoints/pretrain')
if load and pmp.io.is_file(pmp.io.join(load, 'config.json')) then
  model = pmp.models.from_pretrained(load)
  tokenizer = not opts.tokenizer_model and pmp.data.dataset_tokenizer.hf(load)
elseif load then
  if not pmp.checkpoint.latest_iteration(load) then
    error('--load ' .. load .. ' has neither config.json nor latest_checkpointed_iteration.txt', 0)
  end
  local info
  model, info = pmp.checkpoint.load_model(load)
  tokenizer = pmp.data.dataset_tokenizer.from_state(info.state.tokenizer)
  trained_seq_length = info.state.args and info.state.args.seq_length
else
  -- no checkpoint: a small random model over the embedded corpus's characters, so the run still shows
  -- every metric (its perplexity is about the vocabulary size, its accuracy chance)
  tokenizer = pmp.data.tokenizers.char_from_text(pmp.data.tiny_corpus.generate())
  pmp.manual_seed(1234)
  model = pmp.nn.GPTModel({ num_layers = 2, hidden_size = 64, num_attention_heads = 4, vocab_size = tokenizer.vocab_size })
end
if opts.tokenizer_model then tokenizer = pmp.data.dataset_tokenizer.hf(opts.tokenizer_model) end
if tokenizer.vocab_size > model.config.vocab_size then
  error(string.format('the tokenizer has %d ids but the model a vocabulary of %d: give the model\'s own tokenizer',
    tokenizer.vocab_size, model.config.vocab_size), 0)
end
model_name = load or 'a random model (no checkpoints/pretrain here)'
model:eval()
local seq_length = opts.seq_length > 0 and opts.seq_length or trained_seq_length or 128
local stride = opts.stride > 0 and opts.stride or seq_length

-- The embedded default: text the pretraining recipe did not train on (another seed of its grammar);
-- sentences of that grammar whose right ending (an adverb) is among wrong ones, as multiple choice;
-- sums "a + b =" as multiple choice (the right sum among near misses) and as exact match.
local function embedded_tasks()
  local nouns, verbs = { 'cat', 'dog', 'king', 'sailor', 'river' }, { 'sees', 'follows', 'carries', 'finds' }
  local grammar, mc, em = {}, {}, {}
  for k = 1, 20 do
    local noun, verb = nouns[k % #nouns + 1], verbs[k % #verbs + 1]
    local choices = { ' slowly.', ' ' .. verb .. '.', ' the.', ' ' .. noun .. ' ' .. noun .. '.' }
    local gold = k % 4
    choices[1], choices[gold + 1] = choices[gold + 1], choices[1]
    grammar[k] = { context = string.format('the old %s %s a %s', noun, verb, nouns[(k + 2) % #nouns + 1]),
      choices = choices, gold = gold }
  end
  for k = 1, 40 do
    local a, b = (k * 17) % 50, (k * 29 + 3) % 50
    local right = a + b
    local choices = { right, right + 1, right + 10, right > 0 and right - 1 or right + 2 }
    local gold = k % 4
    choices[1], choices[gold + 1] = choices[gold + 1], choices[1]
    for c, value in ipairs(choices) do choices[c] = ' ' .. value .. '.' end
    mc[k] = { context = string.format('%d + %d =', a, b), choices = choices, gold = gold }
    if k <= 20 then em[k] = { prompt = string.format('%d + %d =', a, b), answer = tostring(right) } end
  end
  return { { name = 'grammar_choice', kind = 'multiple_choice', records = grammar },
           { name = 'sums_choice', kind = 'multiple_choice', records = mc },
           { name = 'sums_exact', kind = 'exact_match', records = em } }
end

local text_tokens, text_source
if opts.data_path and pmp.data.indexed.exists(opts.data_path) then
  local ds = pmp.data.indexed.open(opts.data_path)
  text_tokens = {}
  for i = 0, #ds - 1 do
    for _, id in ipairs(ds:totable(i)) do text_tokens[#text_tokens + 1] = id end
    if opts.max_tokens > 0 and #text_tokens >= opts.max_tokens then break end
  end
  ds:close()
  text_source = opts.data_path .. ' (indexed)'
elseif opts.data_path then
  if pmp.io.is_dir(opts.data_path) then
    error('--data-path ' .. opts.data_path .. ' is a directory (give a text file or an indexed dataset PREFIX)', 0)
  end
  local file = io.open(opts.data_path, 'rb')
  if not file then error('cannot read --data-path ' .. opts.data_path .. ' (neither a text file nor an indexed dataset prefix)', 0) end
  text_tokens = tokenizer:encode(file:read('*a'))
  file:close()
  text_source = opts.data_path
elseif default_run then
  text_tokens = tokenizer:encode(pmp.data.tiny_corpus.generate(150, 99))
  text_source = 'the embedded held-out text'
end
if text_tokens and opts.max_tokens > 0 then
  for k = #text_tokens, opts.max_tokens + 1, -1 do text_tokens[k] = nil end
end

local tasks = {}
for _, path in ipairs(opts.task or {}) do tasks[#tasks + 1] = evaluation.read_task(path, opts.limit > 0 and opts.limit or nil) end
if default_run then
  tasks = embedded_tasks()
  if opts.limit > 0 then
    for _, task in ipairs(tasks) do
      for k = #task.records, opts.limit + 1, -1 do task.records[k] = nil end
    end
  end
end
if not text_tokens and #tasks == 0 then error('nothing to evaluate: give --data-path and/or --task', 0) end

print(string.format('eval: %s (%s); windows of %d tokens every %d', model_name, tostring(model):match('^[^\n]*'),
  seq_length, stride))

---------------------------------------------------------------------------------------------------
-- Evaluation

local results = { model = model_name, seq_length = seq_length, stride = stride, tasks = {} }
local rows = {}   -- the printed table: task, metric, value, over what

if text_tokens then
  local bar = pmp.progress.new({ total = #text_tokens - 1, label = 'perplexity', unit = 'tokens' })
  local r = evaluation.perplexity(model, text_tokens, { seq_length = seq_length, stride = stride,
    batch_size = opts.micro_batch_size, on_window = function(done) bar:update(done) end })
  bar:finish()
  results.perplexity = { source = text_source, perplexity = r.perplexity, mean_nll = r.mean_nll, tokens = r.tokens }
  rows[#rows + 1] = { text_source, 'perplexity', r.perplexity, r.tokens .. ' tokens' }
end

local stop = opts.stop or { '\n' }
for _, task in ipairs(tasks) do
  local bar = pmp.progress.new({ total = #task.records, label = task.name, unit = 'records' })
  local options = { seq_length = seq_length, max_new_tokens = opts.max_new_tokens, stop = stop,
    on_record = function(k) bar:update(k) end }
  local r
  if task.kind == 'multiple_choice' then
    r = evaluation.multiple_choice(model, tokenizer, task.records, options)
    rows[#rows + 1] = { task.name, 'acc', r.acc, r.count .. ' records' }
    rows[#rows + 1] = { task.name, 'acc_norm', r.acc_norm, r.count .. ' records' }
  else
    r = evaluation.exact_match(model, tokenizer, task.records, options)
    rows[#rows + 1] = { task.name, 'exact_match', r.exact_match, r.count .. ' records' }
  end
  bar:finish()
  r.kind = task.kind
  results.tasks[task.name] = r
end

print(string.format('%-32s %-12s %12s  %s', 'task', 'metric', 'value', 'over'))
for _, row in ipairs(rows) do print(string.format('%-32s %-12s %12.4f  %s', row[1], row[2], row[3], row[4])) end
if opts.output then
  pmp.io.write_atomic(opts.output, pmp.json.encode(results) .. '\n')
  print('eval: results written to ' .. opts.output)
end
