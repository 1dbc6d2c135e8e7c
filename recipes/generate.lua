--- Generate text from a Hugging Face model directory or a pmp pretraining checkpoint.
---   pmp recipes/generate.lua --load DIR --prompt "Once upon a time" [--max-new-tokens 64 --temperature 0.8]
---   pmp recipes/generate.lua --load DIR --input-file prompts.jsonl --output out.jsonl   (offline batches)
--- prompts.jsonl has one {"prompt": "..."} per line; out.jsonl gets {"prompt", "completion", "tokens",
--- "finish_reason"} per line. Prints tokens per second.
local FLAGS = {
  { '--load', nil, 'HF model directory (config.json) or pretraining checkpoint directory' },
  { '--prompt', nil, 'one prompt' },
  { '--input-file', nil, 'jsonl with a "prompt" field per line' },
  { '--output', nil, 'jsonl to write (default: print)' },
  { '--max-new-tokens', 64, 'tokens to generate per prompt', integer = true, min = 1 },
  { '--temperature', 0.0, '0 for greedy', min = 0 },
  { '--top-k', 0, 'keep the k most likely tokens (0: all)', integer = true, min = 0 },
  { '--top-p', 1.0, 'nucleus sampling mass', above = 0, max = 1 },
  { '--repetition-penalty', 1.0, 'HF-style penalty on seen tokens', above = 0 },
  { '--micro-batch-size', 8, 'prompts generated together', integer = true, min = 1 },
  { '--seed', 1234, 'sampling seed', integer = true, min = 0 },
  { '--stop', nil, 'stop strings', multiple = true },
}

local opts = pmp.args.parse(arg, FLAGS, { usage = 'pmp recipes/generate.lua --load DIR (--prompt TEXT | --input-file FILE)' })
if not opts.load then error('--load DIR is required', 0) end
if not opts.prompt and not opts.input_file then error('give --prompt or --input-file', 0) end

-- A model and tokenizer from either kind of directory.
local function load(dir)
  if pmp.io.is_file(pmp.io.join(dir, 'config.json')) then
    return pmp.models.from_pretrained(dir), pmp.tokenizer.from_pretrained(dir)
  end
  if not pmp.checkpoint.latest_iteration(dir) then error(dir .. ' has neither config.json nor latest_checkpointed_iteration.txt', 0) end
  local model, info = pmp.checkpoint.load_model(dir)
  return model, pmp.data.dataset_tokenizer.from_state(info.state.tokenizer)
end

local model, tokenizer = load(opts.load)

local prompts = {}
if opts.prompt then prompts[1] = opts.prompt end
if opts.input_file then
  local file = io.open(opts.input_file, 'r')
  if not file then error('cannot read ' .. opts.input_file, 0) end
  local line_number = 0
  for line in file:lines() do
    line_number = line_number + 1
    if line:match('%S') then
      local okj, record = pcall(pmp.json.decode, line)
      if not okj or type(record) ~= 'table' or type(record.prompt) ~= 'string' then
        error(string.format('%s:%d: expected a JSON object with a string "prompt"', opts.input_file, line_number), 0)
      end
      prompts[#prompts + 1] = record.prompt
    end
  end
  file:close()
end

local eos_ids = {}
if tokenizer.eos_id then eos_ids[1] = tokenizer.eos_id end
local out = opts.output and io.open(opts.output, 'w')
if opts.output and not out then error('cannot write ' .. opts.output, 0) end
local clock = require 'pmp.clock'
local start, generated = clock.now(), 0

for first = 1, #prompts, opts.micro_batch_size do
  local batch, ids = {}, {}
  for k = first, math.min(first + opts.micro_batch_size - 1, #prompts) do
    batch[#batch + 1] = prompts[k]
    ids[#ids + 1] = tokenizer:encode(prompts[k])
  end
  local results = pmp.generate(model, ids, {
    max_new_tokens = opts.max_new_tokens, temperature = opts.temperature, top_k = opts.top_k, top_p = opts.top_p,
    repetition_penalty = opts.repetition_penalty, eos_ids = eos_ids, stop = opts.stop, tokenizer = tokenizer,
    seed = opts.seed + first, pad_id = tokenizer.pad_id or 0,
  })
  for k, result in ipairs(results) do
    generated = generated + #result.tokens
    if out then
      out:write(pmp.json.encode({ prompt = batch[k], completion = result.text, tokens = pmp.json.array(result.tokens),
        finish_reason = result.finish_reason }), '\n')
    else
      print(batch[k] .. result.text)
    end
  end
end
if out then out:close() end
local seconds = clock.now() - start
io.stderr:write(string.format('generate: %d prompts, %d tokens in %.2f s (%.1f tokens/s)\n', #prompts, generated, seconds,
  generated / math.max(seconds, 1e-9)))
