--- Supervised fine-tuning data: jsonl records of conversations (alpaca, sharegpt or messages, see
--- pmp.data.sft) tokenized with the model's chat template into samples (or samples tokenized before,
--- pmp.data.sft_indexed), then packed or padded rows.
local json = require 'pmp.json'
local sft = require 'pmp.data.sft'
local sft_indexed = require 'pmp.data.sft_indexed'

local M = {}

--- The lines of a file (one per line of the file, so that errors give its line numbers), read at
--- once; an error names the file when it cannot be read.
function M.lines(path)
  if require('pmp.io').is_dir(path) then error('--data-path ' .. path .. ' is a directory (give a jsonl file or a PREFIX)', 0) end
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

-- An error of sample_of without the position Lua put first.
local function reason(message) return (tostring(message):gsub('^[^:]*%.lua:%d+: ', '')) end

--- One jsonl record (a non-blank line) as a sample {ids, mask}; options as for samples. where: the
--- prefix of error messages ('file:line: ').
function M.sample(line, options, where)
  local converted, sample = pcall(sample_of, line, options)
  if not converted then error(where .. reason(sample), 0) end
  return sample
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
        local why = reason(sample)
        if not options.skip_bad_records then error(where .. ': ' .. why, 0) end
        skipped[#skipped + 1] = { where = where, why = why }
      end
    end
  end
  if #samples == 0 then error(tostring(options.source) .. ' holds no samples', 0) end
  return samples, trained_tokens, skipped
end

--- The samples of --data-path: pre-tokenized data (pmp.data.sft_indexed: PREFIX_text_document and
--- PREFIX_loss_mask_document) when path is such a prefix, else a jsonl file tokenized with options
--- (see samples; options.source is the path). Returns what samples returns.
function M.from_data_path(path, options)
  if sft_indexed.exists(path) then
    local samples, trained_tokens = sft_indexed.read(path)
    return samples, trained_tokens, {}
  end
  options.source = path
  return M.samples(M.lines(path), options)
end

--- Collates this rank's micro batches of a step from rows (a pmp.train.Epochs) as pmp.train.step takes
--- them; also returns the tokens the whole step trains on (its targets that are not ignored, summed
--- over the data-parallel ranks) and the tokens it reads. Every rank takes the step's count x
--- micro_batch_size x dp rows, so the order stays that of one process; micro-step k of data-parallel
--- rank r collates the rows at (k * dp + r) * micro_batch_size, as Megatron orders samples. layout:
--- pmp.train.parallel.init's, nil on one process; under a parallel layout every micro batch is padded
--- to `length` tokens (pipeline stages exchange activations of one shape, context parallelism cuts
--- equal chunks) and each context-parallel rank keeps its two chunks of every sequence, per-document
--- positions and first keys included.
function M.micro_batches(rows, count, micro_batch_size, pad_id, layout, length)
  local dp, dp_rank = layout and layout.dp or 1, layout and layout.dp_rank or 0
  local cp = require 'pmp.nn.context_parallel'
  local step_rows = rows:take(count * micro_batch_size * dp)
  local batches, trained, tokens = {}, 0, 0
  for k = 0, count - 1 do
    local first = (k * dp + dp_rank) * micro_batch_size
    local b = sft.collate({ unpack(step_rows, first + 1, first + micro_batch_size) }, pad_id, layout and length)
    trained = trained + b.targets:ne(sft.IGNORE_INDEX):sum():item()
    tokens = tokens + b.inputs:numel()
    local mine = layout and cp.split or function(x) return x end
    batches[k + 1] = { ids = mine(b.inputs), targets = mine(b.targets),
      options = { positions = mine(b.positions), first_key = mine(b.first_key) } }
  end
  if layout and dp > 1 then
    local counts = require('pmp.tensor').tensor({ trained, tokens }, { dtype = 'f64' })
    require('pmp.dist').group('dp'):all_reduce(counts, 'sum')
    trained, tokens = unpack(counts:totable())
  end
  return batches, trained, tokens
end

return M
