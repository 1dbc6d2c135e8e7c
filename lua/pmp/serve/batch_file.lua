--- pmp.serve.batch_file: offline generation from a jsonl file of requests into a jsonl file of results,
--- through a pmp.serve.engine.
---
---   batch_file.run(engine, {
---     input = 'prompts.jsonl', output = 'out.jsonl', tokenizer = tok,
---     defaults = { max_tokens = 64, temperature = 0, ... },   -- for fields a line leaves out
---     ordered = false,     -- true: results in input order (else as they complete)
---     progress = io.stderr, interval = 10,                   -- a progress line every interval seconds
---   }) -> { done, errors, skipped, generated_tokens, seconds }
---
--- Input: one JSON object per line: "prompt" (text), optional "id" and the engine's request fields
--- (max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, n, logprobs). Output: one
--- object per input line, {"line", "id" (if given), "prompt", "completion", "tokens", "finish_reason",
--- "logprobs" (if asked)}, with "samples": [{"completion", "tokens", "finish_reason", "logprobs"}, ...]
--- instead when n > 1, or {"line", "id", "error"} for a line that cannot run (bad JSON, empty prompt, a
--- prompt longer than the context, an unknown field): the other lines go on.
---
--- Resuming: lines already in the output (by "id" when the line has one, else by line number) are
--- skipped; a last line cut short by a kill is dropped first (the file rewritten atomically). Each
--- result is one write, flushed, so a kill loses at most the lines in flight.
local json = require 'pmp.json'
local clock = require 'pmp.clock'
local pio = require 'pmp.io'

local M = {}

local function key_of(id, line) return id ~= nil and ('id ' .. json.encode(id)) or ('line ' .. line) end

-- The keys of the results already in path, after dropping a torn last line.
local function finished_keys(path)
  local done = {}
  if not pio.is_file(path) then return done end
  local lines = {}
  for line in (pio.read_file(path) .. '\n'):gmatch('([^\n]*)\n') do lines[#lines + 1] = line end
  while #lines > 0 and lines[#lines] == '' do lines[#lines] = nil end
  local kept = {}
  for k, text in ipairs(lines) do
    local ok, record = pcall(json.decode, text)
    if not ok or type(record) ~= 'table' or type(record.line) ~= 'number' then
      if k < #lines then error(string.format('%s:%d: not a result line; cannot resume into this file', path, k), 0) end
    else
      kept[#kept + 1] = text
      done[key_of(record.id, record.line)] = true
    end
  end
  if #kept < #lines then pio.write_atomic(path, #kept > 0 and table.concat(kept, '\n') .. '\n' or '') end
  return done
end

local function sample_record(sample)
  return { completion = sample.text, tokens = json.array(sample.tokens), finish_reason = sample.finish_reason,
    logprobs = sample.logprobs and json.array(sample.logprobs) or nil }
end

local function result_record(line, item, result)
  local record = { line = line, id = item.id, prompt = item.prompt }
  if #result.samples == 1 then
    for k, v in pairs(sample_record(result.samples[1])) do record[k] = v end
  else
    record.samples = {}
    for k, sample in ipairs(result.samples) do record.samples[k] = sample_record(sample) end
    json.array(record.samples)
  end
  return record
end

-- The engine request of one input line, or raises the reason it cannot run.
local function request_of(text, tokenizer, defaults)
  local ok, record = pcall(json.decode, text)
  if not ok then error('not valid JSON: ' .. tostring(record):gsub('^[^:]+:%d+: ', ''), 0) end
  if type(record) ~= 'table' or json.is_array(record) then error('expected a JSON object', 0) end
  if type(record.prompt) ~= 'string' then error('expected a string "prompt"', 0) end
  if record.prompt == '' then error('the prompt is empty', 0) end
  local request = {}
  for k, v in pairs(defaults or {}) do request[k] = v end
  for k, v in pairs(record) do request[k] = v end
  request.prompt = tokenizer:encode(record.prompt)
  if request.stop and type(request.stop) ~= 'table' then request.stop = { request.stop } end
  return request, record
end

local function strip_location(message) return (tostring(message):gsub('^[^:]+%.lua:%d+: ', '')) end

function M.run(engine, options)
  local tokenizer = options.tokenizer or error('batch_file.run: options.tokenizer is required', 2)
  local input = io.open(options.input, 'r')
  if not input then error('batch_file: cannot read ' .. tostring(options.input), 2) end
  local done = finished_keys(options.output)
  local out = io.open(options.output, 'a')
  if not out then input:close() error('batch_file: cannot write ' .. tostring(options.output), 2) end

  local stats = { done = 0, errors = 0, skipped = 0, generated_tokens = 0 }
  local order, pending, next_out = {}, {}, 1   -- lines to write, in input order; records waiting for their turn
  local items = {}                               -- engine number -> { line, id, prompt }
  local function emit(position, record)
    if record.error then stats.errors = stats.errors + 1 else stats.done = stats.done + 1 end
    if not options.ordered then
      out:write(json.encode(record), '\n')
      out:flush()
      return
    end
    pending[position] = record
    while pending[next_out] do
      out:write(json.encode(pending[next_out]), '\n')
      pending[next_out] = nil
      next_out = next_out + 1
    end
    out:flush()
  end

  local line = 0
  for text in input:lines() do
    line = line + 1
    if text:match('%S') then
      local peek_ok, peek = pcall(json.decode, text)
      local id = peek_ok and type(peek) == 'table' and peek.id or nil
      if done[key_of(id, line)] then
        stats.skipped = stats.skipped + 1
      else
        order[#order + 1] = line
        local position = #order
        local ok, err = pcall(function()
          local request, record = request_of(text, tokenizer, options.defaults)
          request.id = nil   -- the engine's results are matched by number; the id goes into the record
          engine:add(request)
          items[engine.requests_added] = { line = line, id = record.id, prompt = record.prompt, position = position }
        end)
        if not ok then emit(position, { line = line, id = id, error = strip_location(err) }) end
      end
    end
  end
  input:close()

  local stream, interval = options.progress, options.interval or 10
  local start, last_report = clock.now(), clock.now()
  local generated_before = engine.stats.generated_tokens
  local function report(final)
    if not stream then return end
    local seconds = math.max(clock.now() - start, 1e-9)
    local tokens = engine.stats.generated_tokens - generated_before
    stream:write(string.format('generate: %d/%d requests done (%d errors, %d skipped), %.2f requests/s, %.1f tokens/s%s\n',
      stats.done + stats.errors, #order, stats.errors, stats.skipped, stats.done / seconds, tokens / seconds,
      final and string.format(' in %.1f s', seconds) or ''))
    stream:flush()
  end
  while engine:busy() do
    for _, result in ipairs(engine:step()) do
      local item = items[result.number]
      emit(item.position, result_record(item.line, item, result))
    end
    if clock.now() - last_report >= interval then
      report(false)
      last_report = clock.now()
    end
  end
  out:close()
  report(true)
  stats.generated_tokens = engine.stats.generated_tokens - generated_before
  stats.seconds = clock.now() - start
  return stats
end

return M
