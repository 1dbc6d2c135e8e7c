-- LoRA against full fine-tuning: peak engine memory and step time of the same training steps, printed
-- as ratios from one run (not run by the tests).
--   pmp tools/bench_lora.lua [--steps 5] [--micro-batch-size 1] [--seq-length 256] [--lora-rank 8] ...
-- The model is tools/bench_generate.sh's: a random Llama with hidden 512, 8 layers, 8 heads, 4 KV heads,
-- ffn 1408, vocabulary 32000 (f32, or --bf16). Each mode builds its own model after the other's is
-- freed, resets the peak, and runs one warm-up step and --steps timed AdamW steps on a fixed random
-- batch; the peak covers the weights, gradients, optimizer state and activations. LoRA saves the
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
  { '--recompute-granularity', 'full', "'full': re-run each layer's forward in backward; 'none': keep activations" },
} }, { usage = 'pmp tools/bench_lora.lua [flags]' })

local CONFIG = { model_type = 'llama', hidden_size = opts.hidden_size, num_hidden_layers = opts.num_layers,
  num_attention_heads = 8, num_key_value_heads = 4, intermediate_size = math.floor(opts.hidden_size * 11 / 4),
  vocab_size = 32000, max_position_embeddings = 4096, rms_norm_eps = 1e-5, tie_word_embeddings = false }

local function measure(lora)
  collectgarbage()
  collectgarbage()
  pmp.memory.reset_peak()
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

local full = measure(false)
local lora = measure(true)
local MiB = 2 ^ 20
print(string.format('full fine-tuning: %.1f MiB peak, %.3f s/step, %d trained parameters', full.peak / MiB, full.seconds, full.trained))
print(string.format('LoRA rank %d:      %.1f MiB peak, %.3f s/step, %d trained parameters', opts.lora_rank, lora.peak / MiB,
  lora.seconds, lora.trained))
print(string.format('LoRA / full: peak memory %.3f, step time %.3f', lora.peak / full.peak, lora.seconds / full.seconds))
