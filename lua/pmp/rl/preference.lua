--- Preference pairs (reward models, DPO) in TRL's formats, one JSON record per line:
---   {"prompt": "...", "chosen": "...", "rejected": "..."}                       strings
---   {"chosen": [messages...], "rejected": [messages...]}                        implicit prompt: the
---       messages the two share before they differ (TRL's conversational format)
---   {"prompt": [messages...], "chosen": [messages...], "rejected": [messages...]}  explicit prompt
--- Strings become a user turn and an assistant turn; the chat template (render) is applied to all.
---
---   local pairs = preference.load_jsonl(path, { tokenizer = tok, render = render })
---   local batch = preference.collate(pairs, pad_id)   -- chosen rows 1..B, rejected rows B+1..2B
local json = require 'pmp.json'
local sequences = require 'pmp.rl.sequences'

local M = {}

local function is_messages(v)
  if type(v) ~= 'table' or #v == 0 then return false end
  for _, m in ipairs(v) do
    if type(m) ~= 'table' or type(m.role) ~= 'string' or type(m.content) ~= 'string' then return false end
  end
  return true
end

local function same_message(a, b) return a.role == b.role and a.content == b.content end

-- record -> prompt messages, chosen messages, rejected messages (each answer: the turns after the prompt)
local function split(record)
  if type(record) ~= 'table' then error('not a JSON object', 0) end
  for _, key in ipairs({ 'chosen', 'rejected' }) do
    if record[key] == nil then error("missing field '" .. key .. "'", 0) end
  end
  local prompt, chosen, rejected = record.prompt, record.chosen, record.rejected
  if type(chosen) == 'string' and type(rejected) == 'string' then
    if type(prompt) ~= 'string' then error("missing field 'prompt' (a string, with string chosen/rejected)", 0) end
    return { { role = 'user', content = prompt } }, { { role = 'assistant', content = chosen } },
      { { role = 'assistant', content = rejected } }
  end
  if not is_messages(chosen) or not is_messages(rejected) then
    error("'chosen' and 'rejected' must both be strings or both be lists of {role, content} messages", 0)
  end
  if prompt ~= nil then
    if not is_messages(prompt) then error("'prompt' must be a list of {role, content} messages", 0) end
    return prompt, chosen, rejected
  end
  local shared = 0
  while shared < #chosen - 1 and shared < #rejected - 1 and same_message(chosen[shared + 1], rejected[shared + 1]) do
    shared = shared + 1
  end
  if shared == 0 then error("'chosen' and 'rejected' share no prompt messages", 0) end
  local function tail(list)
    local out = {}
    for k = shared + 1, #list do out[#out + 1] = list[k] end
    return out
  end
  return tail(chosen), tail(chosen), tail(rejected), shared
end

local function concat(a, b)
  local out = {}
  for _, m in ipairs(a) do out[#out + 1] = m end
  for _, m in ipairs(b) do out[#out + 1] = m end
  return out
end

--- One record -> { prompt = ids, chosen = ids, rejected = ids } (answers: the ids after the prompt).
--- opts.render(messages, add_generation_prompt) -> text, opts.tokenizer (encode). Errors say what is wrong.
function M.tokenize(record, opts)
  local prompt, chosen, rejected, shared = split(record)
  if shared then
    prompt = {}
    for k = 1, shared do prompt[k] = record.chosen[k] end
  end
  local prompt_text = opts.render(prompt, true)
  local out = { prompt = opts.tokenizer:encode(prompt_text) }
  for key, answer in pairs({ chosen = chosen, rejected = rejected }) do
    local text = ''
    for _, m in ipairs(answer) do text = text .. m.content end
    if not text:match('%S') then error("the '" .. key .. "' answer is empty", 0) end
    local full = opts.render(concat(prompt, answer), false)
    if full:sub(1, #prompt_text) ~= prompt_text then
      error('the chat template renders the prompt differently once the ' .. key .. ' answer follows', 0)
    end
    local ids = opts.tokenizer:encode(full:sub(#prompt_text + 1))
    if #ids == 0 then error("the '" .. key .. "' answer is empty", 0) end
    out[key] = ids
  end
  if #out.prompt == 0 then error('the prompt is empty', 0) end
  return out
end

--- Every record of a jsonl file, tokenized; an error names the file and line.
function M.load_jsonl(path, opts)
  if require('pmp.io').is_dir(path) then error('preference: ' .. path .. ' is a directory (give a jsonl file)', 0) end
  local file = io.open(path, 'r')
  if not file then error('preference: cannot read ' .. tostring(path), 0) end
  local out, number = {}, 0
  for line in file:lines() do
    number = number + 1
    if line:match('%S') then
      local ok, result = pcall(function() return M.tokenize(json.decode(line), opts) end)
      if not ok then
        file:close()
        error(string.format('%s:%d: %s', path, number, tostring(result)), 0)
      end
      out[#out + 1] = result
    end
  end
  file:close()
  if #out == 0 then error('preference: ' .. path .. ' holds no records', 2) end
  return out
end

--- pairs -> pmp.rl.sequences.collate's batch of 2B rows: chosen rows 1..B, then rejected rows B+1..2B.
function M.collate(pairs, pad_id, max_length)
  local rows = {}
  for _, key in ipairs({ 'chosen', 'rejected' }) do
    for _, p in ipairs(pairs) do rows[#rows + 1] = { p.prompt, p[key] } end
  end
  return sequences.collate(rows, pad_id, max_length)
end

return M
