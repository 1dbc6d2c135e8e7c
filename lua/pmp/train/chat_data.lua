--- Supervised fine-tuning data: jsonl records of conversations (alpaca, sharegpt or messages, see
--- pmp.data.sft) tokenized with the model's chat template into samples, then packed or padded rows.
local json = require 'pmp.json'
local sft = require 'pmp.data.sft'

local M = {}

--- The lines of a file (one per line of the file, so that errors give its line numbers), read at
--- once; an error names the file when it cannot be read.
function M.lines(path)
  local file = io.open(path, 'r')
  if not file then error('cannot read --data-path ' .. path, 0) end
  local text = file:read('*a')
  file:close()
  if text:sub(-1) ~= '\n' then text = text .. '\n' end
  return text:gmatch('([^\n]*)\n')
end

-- The sample of one jsonl line, or an error (without position) saying what is wrong with it.
local function sample_of(line, options)
  local parsed, record = pcall(json.decode, line)
  if not parsed then error(tostring(record), 0) end
  local format = options.format ~= 'auto' and options.format or sft.detect_format(record)
  if not format then error('not an alpaca, sharegpt or messages record', 0) end
  local messages = sft.to_messages(record, format)
  local answers = 0
  for _, m in ipairs(messages) do if m.role == 'assistant' then answers = answers + 1 end end
  if answers == 0 and not options.train_on_prompt then error('the record has no assistant turn: nothing to train on', 0) end
  local tokenizer = options.tokenizer
  return sft.tokenize(messages, { tokenizer = tokenizer, render = options.render, train_on_prompt = options.train_on_prompt,
    end_of_turn_id = tokenizer.eos_id or tokenizer.eod })
end

--- Tokenizes every non-blank line of `lines` (an iterator of jsonl lines). options: tokenizer, render
--- (messages, add_generation_prompt) -> text, format ('auto' detects per record), train_on_prompt,
--- source (the file name for errors, which also give the line), skip_bad_records (a record that is not
--- valid JSON, not a known format, has fields of the wrong type or no assistant turn is skipped and
--- counted instead of stopping with an error). Returns the samples ({ids, mask}), the number of trained
--- tokens and the skipped records ({where = 'file:line', why = message}).
function M.samples(lines, options)
  local samples, trained_tokens, line_number, skipped = {}, 0, 0, {}
  for line in lines do
    line_number = line_number + 1
    if line:match('%S') then
      local where = string.format('%s:%d', tostring(options.source), line_number)
      local converted, sample = pcall(sample_of, line, options)
      if converted then
        samples[#samples + 1] = sample
        for _, m in ipairs(sample.mask) do if m then trained_tokens = trained_tokens + 1 end end
      else
        local why = tostring(sample):gsub('^[^:]*%.lua:%d+: ', '')
        if not options.skip_bad_records then error(where .. ': ' .. why, 0) end
        skipped[#skipped + 1] = { where = where, why = why }
      end
    end
  end
  if #samples == 0 then error(tostring(options.source) .. ' holds no samples', 0) end
  return samples, trained_tokens, skipped
end

--- Collates micro batches of rows as pmp.train.step takes them; also returns the tokens the step trains
--- on (its targets that are not ignored) and the tokens it reads.
function M.micro_batches(rows, count, micro_batch_size, pad_id)
  local batches, trained, tokens = {}, 0, 0
  for k = 1, count do
    local b = sft.collate(rows:take(micro_batch_size), pad_id)
    batches[k] = { ids = b.inputs, targets = b.targets, options = { positions = b.positions, first_key = b.first_key } }
    trained = trained + b.targets:ne(sft.IGNORE_INDEX):sum():item()
    tokens = tokens + b.inputs:numel()
  end
  return batches, trained, tokens
end

return M
