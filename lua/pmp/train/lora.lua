--- LoRA fine-tuning in the recipes (sft, rm, dpo, ppo, grpo): the flags, and the adapters put on the model
--- before training and written after it (pmp.models.peft, Hugging Face PEFT's format).
---   local opts = flags.parse(arg, { ..., train.lora.flags })
---   train.lora.setup(model, opts)            -- before the optimizer is made: freezes, adds adapters
---   ... train ...
---   train.lora.finish(model, opts, base_dir)  -- --save-lora, then --merge-lora (before --save-hf)
--- Under mpirun: setup after the model is split (pmp.train.parallel.split) and before data parallelism
--- wraps it; every rank calls finish (the adapters are gathered, world rank 0 writes them).
local peft = require 'pmp.models.peft'

local M = {}

M.flags = {
  { '--lora-rank', 0, 'train LoRA adapters of this rank on the frozen model (0: fine-tune every weight)', integer = true, min = 0 },
  { '--lora-alpha', 16, 'LoRA scaling numerator: the adapters are scaled by alpha / rank', above = 0 },
  { '--lora-dropout', 0.0, 'dropout on the adapters\' input', min = 0, below = 1 },
  { '--lora-target-modules', 'all-linear', 'comma-separated PEFT module names (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj) or all-linear' },
  { '--load-lora', nil, 'start from this PEFT adapter directory (its own rank, alpha and targets)' },
  { '--save-lora', nil, 'write the trained adapters here in PEFT\'s format (adapter_config.json + adapter_model.safetensors)' },
  { '--merge-lora', false, 'add the adapters into the weights before --save-hf writes the model' },
}

--- Whether the flags ask for adapters.
function M.enabled(opts) return (opts.lora_rank or 0) > 0 or opts.load_lora ~= nil end

-- The targets of --lora-target-modules: 'all-linear' or a list of names.
local function targets(text)
  if text == 'all-linear' then return text end
  local out = {}
  for name in text:gmatch('[^,%s]+') do out[#out + 1] = name end
  return out
end

local SETTINGS = { 'lora_rank', 'lora_alpha', 'lora_dropout', 'lora_target_modules', 'load_lora' }

--- Checks the flags against each other; call it before any work. save_hf: the recipe's --save-hf (nil:
--- the recipe writes no Hugging Face model). resumed_args: the flags of the checkpoint a run resumes;
--- when they trained adapters and opts names none, opts takes their LoRA settings (the checkpoint holds
--- the adapters only, which need the same frozen model and targets).
function M.check(opts, save_hf, resumed_args)
  if resumed_args and M.enabled(resumed_args) and not M.enabled(opts) then
    for _, key in ipairs(SETTINGS) do opts[key] = resumed_args[key] end
  end
  if not M.enabled(opts) then
    for _, flag in ipairs({ 'save_lora', 'merge_lora' }) do
      if opts[flag] then error('--' .. flag:gsub('_', '-') .. ' needs --lora-rank N or --load-lora DIR', 0) end
    end
    return
  end
  if opts.merge_lora and not save_hf then error('--merge-lora needs --save-hf DIR (where the merged model goes)', 0) end
  if save_hf and not opts.merge_lora then
    error('--save-hf with LoRA writes the merged model: add --merge-lora (or write the adapters alone with --save-lora DIR)', 0)
  end
end

--- Freezes the model and gives it the adapters the flags ask for (--load-lora's, or fresh ones of
--- --lora-rank on --lora-target-modules); does nothing without them. model_type: the family of a model
--- that pmp.models did not load (a pretraining checkpoint's: 'llama'). Returns whether it did.
function M.setup(model, opts, model_type)
  if not M.enabled(opts) then return false end
  if opts.load_lora then
    peft.load(model, opts.load_lora, { model_type = model_type })
  else
    peft.apply(model, { rank = opts.lora_rank, alpha = opts.lora_alpha, dropout = opts.lora_dropout,
      targets = targets(opts.lora_target_modules), model_type = model_type, source = '--lora-target-modules' })
  end
  return true
end

--- After training: --save-lora writes the adapters (base_dir recorded as their base model), and
--- --merge-lora adds them into the weights so that save_pretrained writes the merged model.
function M.finish(model, opts, base_dir)
  if not M.enabled(opts) then return end
  if opts.save_lora then
    peft.save(model, opts.save_lora, { base = base_dir })
    if require('pmp.dist').rank() == 0 then print('lora: saved the adapters to ' .. opts.save_lora) end
  end
  if opts.merge_lora then peft.merge(model) end
end

return M
