--- Generate text from a Hugging Face model directory or a pmp pretraining checkpoint.
---   pmp recipes/generate.lua --load DIR --prompt "Once upon a time" [--max-new-tokens 64 --temperature 0.8]
---   pmp recipes/generate.lua --load DIR --input-file prompts.jsonl --output-file out.jsonl   (offline batches)
--- --prompt runs pmp.generate. --input-file runs the continuous-batching engine (pmp.serve.engine, see
--- pmp.serve.batch_file for both jsonl formats): each line {"prompt": "...", "id", and optionally its own
--- max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, n, logprobs; the flags below are
--- the defaults};
--- results are written as they complete (--ordered: in input order), a rerun into the same output skips
--- the lines already there, and a bad line gets an error record while the rest run.
local FLAGS = {
  { '--load', nil, 'HF model directory (config.json) or pretraining checkpoint directory' },
  { '--prompt', nil, 'one prompt' },
  { '--input-file', nil, 'jsonl with a "prompt" field per line' },
  { '--output-file', nil, 'jsonl to write (default: print; required with --input-file)' },
  { '--max-new-tokens', 64, 'tokens to generate per prompt', integer = true, min = 1 },
  { '--temperature', 0.0, '0 for greedy', min = 0 },
  { '--top-k', 0, 'keep the k most likely tokens (0: all)', integer = true, min = 0 },
  { '--top-p', 1.0, 'nucleus sampling mass', above = 0, max = 1 },
  { '--repetition-penalty', 1.0, 'HF-style penalty on seen tokens', above = 0 },
  { '--seed', 1234, 'sampling seed (--input-file: a line without "seed" uses this plus its request number)', integer = true, min = 0 },
  { '--stop', nil, 'stop strings', multiple = true },
  { '--n', 1, 'samples per prompt (--input-file)', integer = true, min = 1 },
  { '--logprobs', false, 'write the log-prob of each generated token (--input-file)' },
  { '--max-batch', 32, 'sequences decoded together (--input-file)', integer = true, min = 1 },
  { '--block-size', 16, 'tokens per KV-cache block (--input-file)', integer = true, min = 1 },
  { '--kv-cache-tokens', 32768, 'KV-cache capacity in tokens, all sequences together (--input-file)', integer = true, min = 1 },
  { '--prefix-caching', true, 'reuse the cached blocks of shared prompt prefixes (--input-file)' },
  { '--ordered', false, 'write results in input order instead of as they complete (--input-file)' },
}

local opts = pmp.args.parse(arg, FLAGS, { usage = 'pmp recipes/generate.lua --load DIR (--prompt TEXT | --input-file FILE)' })
if not opts.load then error('--load DIR is required', 0) end
if not opts.prompt == not opts.input_file then error('give --prompt or --input-file (one of them)', 0) end

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

local eos_ids = {}
if tokenizer.eos_id then eos_ids[1] = tokenizer.eos_id end

if opts.input_file then
  if not opts.output_file then error('--input-file needs --output-file (results are appended there, and a rerun resumes)', 0) end
  local engine = require('pmp.serve.engine').new(model, {
    block_size = opts.block_size, num_blocks = math.ceil(opts.kv_cache_tokens / opts.block_size),
    max_batch = opts.max_batch, eos_ids = eos_ids, tokenizer = tokenizer, prefix_caching = opts.prefix_caching,
    seed = opts.seed,
  })
  local stats = require('pmp.serve.batch_file').run(engine, {
    input = opts.input_file, output = opts.output_file, tokenizer = tokenizer, ordered = opts.ordered,
    progress = io.stderr,
    defaults = { max_tokens = opts.max_new_tokens, temperature = opts.temperature, top_k = opts.top_k,
      top_p = opts.top_p, repetition_penalty = opts.repetition_penalty, stop = opts.stop, n = opts.n,
      logprobs = opts.logprobs or nil },
  })
  io.stderr:write(string.format('generate: %d requests, %d errors, %d skipped (already in %s); %d tokens in %.2f s ' ..
    '(%.1f tokens/s); peak %d of %d KV-cache blocks\n', stats.done, stats.errors, stats.skipped, opts.output_file,
    stats.generated_tokens, stats.seconds, stats.generated_tokens / math.max(stats.seconds, 1e-9), engine.blocks.peak,
    engine.blocks.num_blocks))
  return
end

local out = opts.output_file and io.open(opts.output_file, 'w')
if opts.output_file and not out then error('cannot write ' .. opts.output_file, 0) end
local clock = require 'pmp.clock'
local start = clock.now()
local ids = tokenizer:encode(opts.prompt)
local result = pmp.generate(model, { ids }, {
  max_new_tokens = opts.max_new_tokens, temperature = opts.temperature, top_k = opts.top_k, top_p = opts.top_p,
  repetition_penalty = opts.repetition_penalty, eos_ids = eos_ids, stop = opts.stop, tokenizer = tokenizer,
  seed = opts.seed + 1, pad_id = tokenizer.pad_id or 0,
})[1]
if out then
  out:write(pmp.json.encode({ prompt = opts.prompt, completion = result.text, tokens = pmp.json.array(result.tokens),
    finish_reason = result.finish_reason }), '\n')
  out:close()
else
  print(opts.prompt .. result.text)
end
local seconds = clock.now() - start
io.stderr:write(string.format('generate: 1 prompt, %d tokens in %.2f s (%.1f tokens/s)\n', #result.tokens, seconds,
  #result.tokens / math.max(seconds, 1e-9)))
