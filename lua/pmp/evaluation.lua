--- Evaluating language models: perplexity over a token stream, and tasks in lm-evaluation-harness's
--- conventions (recipes/eval.lua is the command-line front end).
---
--- Task files are jsonl, one record per line, every record of a file of one kind:
---   multiple choice: {"context": "2 + 2 =", "choices": [" 4", " 5"], "gold": 0}
---     each choice is scored by the log-likelihood of its tokens after the context (the continuation's
---     tokens are those of encode(context .. choice) after encode(context)'s, as the harness splits
---     them); acc: the gold choice has the highest log-likelihood; acc_norm: the highest log-likelihood
---     per byte of the choice's text. Ties go to the first choice. gold is 0-based.
---   exact match (generation): {"prompt": "2 + 2 =", "answer": "4"} (answer: a string or a list of
---     accepted strings); greedy generation until a stop string or max_new_tokens; exact_match: the
---     completion, with surrounding whitespace removed, equals an answer with surrounding whitespace removed.
local json = require 'pmp.json'
local tensor = require 'pmp.tensor'

local M = {}

local function no_grad(fn, ...) return require('pmp').no_grad(fn, ...) end

--- The summed negative log-likelihood and the count of scored tokens over `tokens` (a Lua list of ids),
--- read in windows of seq_length inputs that start every `stride` tokens (default seq_length: windows
--- that do not overlap). Every token after the first is scored exactly once, in the first window that
--- predicts it, so with stride < seq_length each is predicted from at least seq_length - stride tokens
--- of context. options.batch_size windows of equal length run together (default 8);
--- options.on_window(scored_so_far, total) reports progress.
function M.perplexity(model, tokens, options)
  local seq_length = assert(options.seq_length, 'perplexity: seq_length is required')
  local stride = options.stride or seq_length
  if stride < 1 or stride > seq_length then
    error(string.format('perplexity: stride must be in 1..seq_length (%d), got %d', seq_length, stride), 2)
  end
  local n = #tokens
  if n < 2 then error('perplexity: need at least 2 tokens, got ' .. n, 2) end
  -- the windows: inputs tokens[start..stop] predict tokens[start+1..stop+1], those not scored before
  local windows, last_scored, start = {}, 1, 1
  while last_scored < n do
    local stop = math.min(start + seq_length - 1, n - 1)
    local ids, targets = {}, {}
    for k = start, stop do
      ids[#ids + 1] = tokens[k]
      targets[#targets + 1] = (k + 1 > last_scored) and tokens[k + 1] or -100
    end
    windows[#windows + 1] = { ids = ids, targets = targets, scored = stop + 1 - last_scored }
    last_scored = stop + 1
    start = start + stride
  end
  local batch_size = options.batch_size or 8
  local nll, count, first = 0, 0, 1
  while first <= #windows do
    local last = first
    while last < #windows and last - first + 1 < batch_size and #windows[last + 1].ids == #windows[first].ids do
      last = last + 1
    end
    local ids, targets = {}, {}
    for k = first, last do
      ids[#ids + 1], targets[#targets + 1] = windows[k].ids, windows[k].targets
      count = count + windows[k].scored
    end
    nll = nll + no_grad(function()
      return model(tensor.tensor(ids, { dtype = 'i64' }), tensor.tensor(targets, { dtype = 'i64' }), { reduction = 'sum' }):item()
    end)
    first = last + 1
    if options.on_window then options.on_window(count, n - 1) end
  end
  return { nll = nll, tokens = count, mean_nll = nll / count, perplexity = math.exp(nll / count) }
end

--- The log-likelihood of `continuation` (ids) after `context` (ids), the context cut from the left so
--- the input fits max_length.
function M.loglikelihood(model, context, continuation, max_length)
  local all = {}
  for _, id in ipairs(context) do all[#all + 1] = id end
  for _, id in ipairs(continuation) do all[#all + 1] = id end
  if #continuation == 0 then return 0 end
  if #context == 0 then error('loglikelihood: the context encodes to no tokens, so the first choice token has nothing to follow', 2) end
  if #continuation > max_length then
    error(string.format('loglikelihood: a continuation of %d tokens does not fit --seq-length %d', #continuation, max_length), 2)
  end
  local first = math.max(1, #all - max_length)       -- inputs all[first .. #all - 1]
  local ids, targets = {}, {}
  for k = first, #all - 1 do
    ids[#ids + 1] = all[k]
    targets[#targets + 1] = (k + 1 > #context) and all[k + 1] or -100
  end
  return -no_grad(function()
    return model(tensor.tensor({ ids }, { dtype = 'i64' }), tensor.tensor({ targets }, { dtype = 'i64' }),
      { reduction = 'sum' }):item()
  end)
end

--- The continuation's ids as the harness splits them: encode(context .. continuation) after the
--- length of encode(context), falling back to encode(continuation) when the joint encoding does not
--- start with the context's.
function M.split_pair(tokenizer, context, continuation)
  local ctx = tokenizer:encode(context)
  local whole = tokenizer:encode(context .. continuation)
  local prefix_ok = #whole > #ctx
  for k = 1, #ctx do
    if whole[k] ~= ctx[k] then prefix_ok = false break end
  end
  if not prefix_ok then return ctx, tokenizer:encode(continuation) end
  local cont = {}
  for k = #ctx + 1, #whole do cont[#cont + 1] = whole[k] end
  return ctx, cont
end

local function record_error(where, message) error(where .. ': ' .. message, 0) end

local function check_mc(record, where)
  if type(record.context) ~= 'string' then record_error(where, 'a multiple-choice record needs a string "context"') end
  if type(record.choices) ~= 'table' or #record.choices < 2 then
    record_error(where, '"choices" must be a list of at least 2 strings')
  end
  for k, c in ipairs(record.choices) do
    if type(c) ~= 'string' or c == '' then record_error(where, string.format('choice %d is not a non-empty string', k - 1)) end
  end
  local gold = record.gold
  if type(gold) ~= 'number' or gold ~= math.floor(gold) or gold < 0 or gold >= #record.choices then
    record_error(where, string.format('"gold" must be a 0-based index into the %d choices, got %s', #record.choices,
      json.encode(gold == nil and json.null or gold)))
  end
end

local function check_generation(record, where)
  if type(record.prompt) ~= 'string' then record_error(where, 'an exact-match record needs a string "prompt"') end
  local answer = record.answer
  if type(answer) == 'string' then return end
  if type(answer) == 'table' and #answer > 0 then
    for _, a in ipairs(answer) do
      if type(a) ~= 'string' then record_error(where, '"answer" must be a string or a list of strings') end
    end
    return
  end
  record_error(where, '"answer" must be a string or a list of strings')
end

--- Reads a task file: { name = basename without .jsonl, kind = 'multiple_choice' | 'exact_match',
--- records = {...} }. A bad line raises an error naming the file and line.
function M.read_task(path, limit)
  if require('pmp.io').is_dir(path) then error('task file ' .. path .. ' is a directory (give a jsonl file)', 0) end
  local file = io.open(path, 'r')
  if not file then error('cannot read task file ' .. path, 0) end
  local records, kind, line_number = {}, nil, 0
  for line in file:lines() do
    line_number = line_number + 1
    if line:match('%S') and not (limit and #records >= limit) then
      local where = path .. ':' .. line_number
      local ok, record = pcall(json.decode, line)
      if not ok then file:close() record_error(where, 'not valid JSON (' .. tostring(record) .. ')') end
      if type(record) ~= 'table' or record[1] ~= nil then
        file:close()
        record_error(where, 'expected a JSON object')
      end
      local this = record.choices ~= nil and 'multiple_choice' or (record.prompt ~= nil and 'exact_match') or nil
      local ok_record, why = pcall(function()
        if not this then record_error(where, 'expected "context"/"choices"/"gold" (multiple choice) or "prompt"/"answer" (exact match)') end
        if kind and this ~= kind then record_error(where, 'a ' .. this .. ' record in a ' .. kind .. ' task') end
        if this == 'multiple_choice' then check_mc(record, where) else check_generation(record, where) end
      end)
      if not ok_record then file:close() error(why, 0) end
      kind = this
      records[#records + 1] = record
    end
  end
  file:close()
  if #records == 0 then error('task file ' .. path .. ' has no records', 0) end
  local name = path:match('([^/]*)$'):gsub('%.jsonl$', '')
  return { name = name, kind = kind, records = records }
end

local function argmax(list)
  local best = 1
  for k = 2, #list do if list[k] > list[best] then best = k end end
  return best
end

--- acc and acc_norm over multiple-choice records; options.on_record(k) reports progress.
function M.multiple_choice(model, tokenizer, records, options)
  local correct, correct_norm, details = 0, 0, {}
  for k, record in ipairs(records) do
    local scores, normalized = {}, {}
    for c, choice in ipairs(record.choices) do
      local ctx, cont = M.split_pair(tokenizer, record.context, choice)
      scores[c] = M.loglikelihood(model, ctx, cont, options.seq_length)
      normalized[c] = scores[c] / #choice
    end
    local gold = record.gold + 1
    if argmax(scores) == gold then correct = correct + 1 end
    if argmax(normalized) == gold then correct_norm = correct_norm + 1 end
    details[k] = { loglikelihoods = json.array(scores), prediction = argmax(scores) - 1, prediction_norm = argmax(normalized) - 1 }
    if options.on_record then options.on_record(k) end
  end
  return { acc = correct / #records, acc_norm = correct_norm / #records, count = #records, details = details }
end

local function trim(s) return (s:gsub('^%s+', ''):gsub('%s+$', '')) end

--- exact_match over generation records: greedy, stopping at any of options.stop or the eos token.
function M.exact_match(model, tokenizer, records, options)
  local generate = require 'pmp.generate'
  local hits, details = 0, {}
  for k, record in ipairs(records) do
    local prompt = tokenizer:encode(record.prompt)
    if #prompt + options.max_new_tokens > options.seq_length then
      local keep = math.max(1, options.seq_length - options.max_new_tokens)
      local cut = {}
      for i = #prompt - keep + 1, #prompt do cut[#cut + 1] = prompt[i] end
      prompt = cut
    end
    local result = no_grad(generate, model, { prompt }, {
      max_new_tokens = options.max_new_tokens, temperature = 0, stop = options.stop, tokenizer = tokenizer,
      eos_ids = tokenizer.eos_id and { tokenizer.eos_id } or nil,
    })[1]
    local answers = type(record.answer) == 'string' and { record.answer } or record.answer
    local hit = false
    for _, a in ipairs(answers) do if trim(a) == trim(result.text) then hit = true end end
    if hit then hits = hits + 1 end
    details[k] = { completion = result.text, correct = hit }
    if options.on_record then options.on_record(k) end
  end
  return { exact_match = hits / #records, count = #records, details = details }
end

return M
