--- Supervised fine-tuning data: conversation formats, chat-template tokenization with prompt masking,
--- and packing several samples into one sequence without attention across them.
--
--   local messages = sft.to_messages(record)                 -- alpaca, sharegpt or messages format
--   local sample = sft.tokenize(messages, { tokenizer = tok, render = render })
--   local rows = sft.pack({ sample, ... }, seq_length)       -- or sft.pad for one sample per row
--   local batch = sft.collate(rows)                          -- tensors for GPTModel
--
-- render(messages, add_generation_prompt) -> text is the model's chat template (pmp.chat_template).
-- Only assistant turns are trained, end-of-turn tokens included; everything else is ignore_index.
local json = require 'pmp.json'
local tensor = require 'pmp.tensor'

local M = {}

M.IGNORE_INDEX = -100

-- 'alpaca' (instruction/input/output), 'sharegpt' (conversations of from/value) or 'messages'
-- (role/content); nil when the record is none of them.
function M.detect_format(record)
  if type(record) ~= 'table' then return nil end
  if type(record.messages) == 'table' then return 'messages' end
  if type(record.conversations) == 'table' then return 'sharegpt' end
  if record.instruction ~= nil and record.output ~= nil then return 'alpaca' end
  return nil
end

-- A decoded JSON value's type in JSON's words, for messages about records.
local function json_type(value)
  if value == nil then return 'nothing (the field is missing)' end
  if value == json.null then return 'null' end
  if type(value) == 'table' then return value[1] ~= nil and 'an array' or 'an object' end
  return 'a ' .. type(value)
end

local SHAREGPT_ROLES = { human = 'user', user = 'user', gpt = 'assistant', assistant = 'assistant', system = 'system',
  chatgpt = 'assistant', bing = 'assistant', bard = 'assistant' }

function M.to_messages(record, format)
  format = format or M.detect_format(record)
  if format == 'messages' then
    for k, m in ipairs(record.messages) do
      if type(m) ~= 'table' or m == json.null then error(string.format('sft: message %d is %s, not an object', k, json_type(m)), 2) end
      if type(m.role) ~= 'string' or type(m.content) ~= 'string' then
        error(string.format('sft: message %d needs string role and content, got role %s and content %s', k,
          json_type(m.role), json_type(m.content)), 2)
      end
    end
    return record.messages
  end
  if format == 'sharegpt' then
    local out = {}
    for k, turn in ipairs(record.conversations) do
      if type(turn) ~= 'table' or turn == json.null then
        error(string.format('sft: conversation turn %d is %s, not an object', k, json_type(turn)), 2)
      end
      local role = SHAREGPT_ROLES[turn.from]
      if not role or type(turn.value) ~= 'string' then
        error(string.format("sft: conversation turn %d has an unknown 'from' (%s) or a 'value' that is not a string (%s)", k,
          tostring(turn.from), json_type(turn.value)), 2)
      end
      out[k] = { role = role, content = turn.value }
    end
    if type(record.system) == 'string' and record.system ~= '' then table.insert(out, 1, { role = 'system', content = record.system }) end
    return out
  end
  if format == 'alpaca' then
    for _, field in ipairs({ 'instruction', 'output' }) do
      if type(record[field]) ~= 'string' then
        error(string.format("sft: alpaca field '%s' must be a string, got %s", field, json_type(record[field])), 2)
      end
    end
    for _, field in ipairs({ 'input', 'system' }) do   -- optional: absent, null or a string
      if record[field] ~= nil and record[field] ~= json.null and type(record[field]) ~= 'string' then
        error(string.format("sft: alpaca field '%s' must be a string or null, got %s", field, json_type(record[field])), 2)
      end
    end
    local prompt = record.instruction
    if type(record.input) == 'string' and record.input ~= '' then prompt = prompt .. '\n\n' .. record.input end
    local out = { { role = 'user', content = prompt }, { role = 'assistant', content = record.output } }
    if type(record.system) == 'string' and record.system ~= '' then table.insert(out, 1, { role = 'system', content = record.system }) end
    return out
  end
  error("sft: unknown record format (expected alpaca instruction/output, sharegpt conversations or messages)", 2)
end

local function slice(list, n)
  local out = {}
  for k = 1, n do out[k] = list[k] end
  return out
end

local function append(ids, mask, new_ids, trained)
  for _, id in ipairs(new_ids) do
    ids[#ids + 1] = id
    mask[#mask + 1] = trained
  end
end

local function is_prefix(prefix, text) return text:sub(1, #prefix) == prefix end

-- Templates that render a turn differently once later turns follow (Qwen3 drops the empty thinking
-- block of earlier answers): tokenize the whole conversation, and train each assistant answer from
-- the end of its prompt (the conversation before it plus the generation prompt, which must be a
-- prefix of the whole text) through the next end-of-turn token.
local function tokenize_by_prompts(messages, options, full)
  local tok, render = options.tokenizer, options.render
  local end_of_turn = options.end_of_turn_id
  if not end_of_turn then
    error('sft: the chat template rewrites earlier turns, and no end_of_turn_id was given to find where answers end', 3)
  end
  local ids = tok:encode(full, { add_special_tokens = false })
  local mask = {}
  for k = 1, #ids do mask[k] = options.train_on_prompt == true end
  for i, m in ipairs(messages) do
    if m.role == 'assistant' then
      local prompt = render(slice(messages, i - 1), true)
      if not is_prefix(prompt, full) then
        error(string.format('sft: the chat template does not render the prompt of answer %d as a prefix of the conversation', i), 3)
      end
      local k = #tok:encode(prompt, { add_special_tokens = false }) + 1
      while k <= #ids do
        mask[k] = true
        if ids[k] == end_of_turn then break end
        k = k + 1
      end
    end
  end
  return { ids = ids, mask = mask }
end

-- Tokens of a conversation and, per token, whether it is trained. The template is rendered after each
-- message; when each rendering extends the previous one, the text a message adds is tokenized on its
-- own (turn boundaries are special tokens, so this equals tokenizing the whole text). Otherwise the
-- answers are located by their prompts (tokenize_by_prompts).
-- options: tokenizer, render, train_on_prompt (false), end_of_turn_id (for the second way).
function M.tokenize(messages, options)
  local tok, render = options.tokenizer, options.render
  local ids, mask = {}, {}
  local previous = ''
  for i = 1, #messages do
    local next_message = messages[i + 1]
    local text = render(slice(messages, i), next_message ~= nil and next_message.role == 'assistant')
    if not is_prefix(previous, text) then return tokenize_by_prompts(messages, options, render(messages, false)) end
    local trained = messages[i].role == 'assistant' or options.train_on_prompt == true
    append(ids, mask, tok:encode(text:sub(#previous + 1), { add_special_tokens = false }), trained)
    previous = text
  end
  return { ids = ids, mask = mask }
end

-- One training row from one sample: inputs, targets shifted by one with untrained targets ignored,
-- positions from 0, and the first key of every query (0: a single document).
local function row_from(samples, seq_length)
  local row = { inputs = {}, targets = {}, positions = {}, first_key = {} }
  for _, s in ipairs(samples) do
    local start = #row.inputs
    local n = math.min(#s.ids - 1, seq_length - start)
    for t = 1, n do
      row.inputs[start + t] = s.ids[t]
      row.targets[start + t] = s.mask[t + 1] and s.ids[t + 1] or M.IGNORE_INDEX
      row.positions[start + t] = t - 1
      row.first_key[start + t] = start
    end
  end
  return row
end

-- Greedy packing in order: samples share a row while they fit in seq_length tokens (a sample of n
-- tokens uses n - 1 positions); longer samples are truncated. No padding inside a row.
function M.pack(samples, seq_length)
  local rows, current, used = {}, {}, 0
  for _, s in ipairs(samples) do
    local need = math.min(#s.ids - 1, seq_length)
    if need > 0 then
      if used + need > seq_length and #current > 0 then
        rows[#rows + 1] = row_from(current, seq_length)
        current, used = {}, 0
      end
      current[#current + 1] = s
      used = used + need
    end
  end
  if #current > 0 then rows[#rows + 1] = row_from(current, seq_length) end
  return rows
end

-- One sample per row (the unpacked layout).
function M.pad(samples, seq_length)
  local rows = {}
  for _, s in ipairs(samples) do
    if #s.ids > 1 then rows[#rows + 1] = row_from({ s }, seq_length) end
  end
  return rows
end

-- Tensors for a list of rows, right-padded to the longest: inputs, targets, positions [B, T] and
-- first_key [B, T] for GPTModel(inputs, targets, {positions=, first_key=}). Padding is ignored.
-- length: pad to at least this many tokens.
function M.collate(rows, pad_id, length)
  local T = length or 0
  for _, r in ipairs(rows) do T = math.max(T, #r.inputs) end
  local inputs, targets, positions, first_key = {}, {}, {}, {}
  for b, r in ipairs(rows) do
    inputs[b], targets[b], positions[b], first_key[b] = {}, {}, {}, {}
    for t = 1, T do
      local real = t <= #r.inputs
      inputs[b][t] = real and r.inputs[t] or (pad_id or 0)
      targets[b][t] = real and r.targets[t] or M.IGNORE_INDEX
      positions[b][t] = real and r.positions[t] or 0
      first_key[b][t] = real and r.first_key[t] or (t - 1)
    end
  end
  local i64 = { dtype = 'i64' }
  return {
    inputs = tensor.tensor(inputs, i64), targets = tensor.tensor(targets, i64),
    positions = tensor.tensor(positions, i64), first_key = tensor.tensor(first_key, i64),
  }
end

return M
