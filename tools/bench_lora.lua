-- LoRA against full fine-tuning: peak engine memory and step time of the same training steps, printed
-- as ratios from one run (not run by the tests).
--   pmp tools/bench_lora.lua [--steps 5] [--micro-batch-size 1] [--seq-length 256] [--lora-rank 8] ...
-- The model is tools/bench_generate.sh's: a random Llama with hidden 512, 8 layers, 8 heads, 4 KV heads,
-- ffn 1408, vocabulary 32000 (f32, or --bf16). Each mode runs in a process of its own (this script with
-- --mode full or lora, so that nothing of one is still held during the other): it builds the model,
-- and runs one warm-up step and --steps timed AdamW steps on a fixed random batch; the peak covers the weights, gradients, optimizer state and activations. LoRA saves the
-- weights' gradients and optimizer state, not activations, so both modes recompute each layer in
-- backward by default (--recompute-granularity none keeps them), as memory-bound fine-tuning does.
local clock = require 'pmp.clock'
local peft = require 'pmp.models.peft'
local opts = pmp.train.flags.parse(arg, { {
  { '--steps', 5, 'timed steps per mode' },
  { '--micro-batch-size', 1, 'sequences per step' },
  { '--seq-length', 256, 'tokens per sequence' },
  { '--lora-rank', 8, 'LoRA rank' },
  { '--lora-target-modules', 'all-linear', 'PEFT module names' },
  { '--hidden-size', 512, 'model width' },
  { '--num-layers', 8, 'layers' },
  { '--bf16', false, 'bf16 weights (adapters too)' },
  { '--mode', nil, 'full or lora: measure that mode alone and print it as one RESULT line' },
  { '--recompute-granularity', 'full', "'full': re-run each layer's forward in backward; 'none': keep activations" },
} }, { usage = 'pmp tools/bench_lora.lua [flags]' })

local CONFIG = { model_type = 'llama', hidden_size = opts.hidden_size, num_hidden_layers = opts.num_layers,
  num_attention_heads = 8, num_key_value_heads = 4, intermediate_size = math.floor(opts.hidden_size * 11 / 4),
  vocab_size = 32000, max_position_embeddings = 4096, rms_norm_eps = 1e-5, tie_word_embeddings = false }

local function measure(lora)
  pmp.manual_seed(1)
  local model = pmp.models.from_config(CONFIG, { dtype = opts.bf16 and 'bf16' or 'f32',
    config = { recompute_granularity = opts.recompute_granularity ~= 'none' and opts.recompute_granularity or nil } })
  if lora then
    local targets = opts.lora_target_modules
    if targets ~= 'all-linear' then
      local list = {}
      for name in targets:gmatch('[^,]+') do list[#list + 1] = name end
      targets = list
    end
    peft.apply(model, { rank = opts.lora_rank, alpha = 2 * opts.lora_rank, targets = targets })
  end
  local optimizer = pmp.optim.AdamW(model:parameters(), { lr = 1e-4 })
  local ids = pmp.randint(0, CONFIG.vocab_size, { opts.micro_batch_size, opts.seq_length })
  local function train_step()
    optimizer:zero_grad()
    model(ids, ids):backward()
    optimizer:step()
  end
  train_step()
  local t0 = clock.now()
  for _ = 1, opts.steps do train_step() end
  local seconds = (clock.now() - t0) / opts.steps
  local peak = pmp.memory.stats().peak
  return { seconds = seconds, peak = peak, trained = model:num_parameters() }
end

if opts.mode then
  if opts.mode ~= 'full' and opts.mode ~= 'lora' then error('--mode must be full or lora', 0) end
  local r = measure(opts.mode == 'lora')
  print(string.format('RESULT %d %.6f %d', r.peak, r.seconds, r.trained))
  return
end

-- Each mode in a child process with these flags.
local function run(mode)
  local words = { pmp.io.join(package.loaded['pmp.root'], 'pmp'), arg[0] }
  for _, a in ipairs(arg) do words[#words + 1] = a end
  words[#words + 1], words[#words + 2] = '--mode', mode
  for k, w in ipairs(words) do words[k] = "'" .. w:gsub("'", "'\\''") .. "'" end
  local pipe = assert(io.popen(table.concat(words, ' ')))
  local text = pipe:read('*a')
  pipe:close()
  local peak, seconds, trained = text:match('RESULT (%d+) ([%d.]+) (%d+)')
  if not peak then error('bench_lora: the ' .. mode .. ' run printed no result:\n' .. text, 0) end
  return { peak = tonumber(peak), seconds = tonumber(seconds), trained = tonumber(trained) }
end

local full = run('full')
local lora = run('lora')
local MiB = 2 ^ 20
print(string.format('full fine-tuning: %.1f MiB peak, %.3f s/step, %d trained parameters', full.peak / MiB, full.seconds, full.trained))
print(string.format('LoRA rank %d:      %.1f MiB peak, %.3f s/step, %d trained parameters', opts.lora_rank, lora.peak / MiB,
  lora.seconds, lora.trained))
print(string.format('LoRA / full: peak memory %.3f, step time %.3f', lora.peak / full.peak, lora.seconds / full.seconds))
