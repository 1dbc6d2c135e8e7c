-- Run by spec/lora_spec.lua, under mpirun or as one process: LoRA adapters under tensor (and sequence)
-- and data parallelism. Loads spec/fixtures/hf/llama, splits it over the layout, gives it PEFT's
-- adapter spec/fixtures/lora/llama_all, and prints on world rank 0:
--   LOGITS max_abs_diff   the logits of the reference ids against PEFT's (every rank computes them)
--   GRAD key norm         the whole gradient of every adapter tensor of the loss of PEFT's reference (the
--                         two rows split over data-parallel ranks), under PEFT's names
--   LOSS step value       the loss on the same batch at each of three AdamW steps on the adapters
--   FROZEN max_abs_diff   how far any base weight moved during those steps
-- args: TP (tensor-parallel size; the data-parallel size is what is left) and 'sp' or 'nosp'.
local peft = require 'pmp.models.peft'
local parallel = require 'pmp.nn.parallel'
local sharding = require 'pmp.dist.sharding'
local step = pmp.train.step

local tp_size, sp = tonumber(arg[1]), arg[2] == 'sp'
local layout = pmp.dist.init({ tp = tp_size })
local root = package.loaded['pmp.root']
local fixture = root .. '/spec/fixtures/lora/llama_all'
local ref = pmp.json.read(fixture .. '/reference.json')

local model = pmp.models.from_pretrained(root .. '/spec/fixtures/hf/' .. ref.base, { tensor_model_parallel_size = tp_size })
parallel.tensor_parallel(model, { sequence_parallel = sp })
peft.load(model, fixture)
model:eval()   -- the reference has no dropout
local tp, dp = pmp.dist.group('tp'), pmp.dist.group('dp')
local function say(...) if layout.rank == 0 then print(...) end end

local ids = pmp.tensor(ref.input_ids, { dtype = 'i64' })
local T = ids:size(2)
local logits = pmp.no_grad(function() return model(ids) end)
local expected = pmp.safetensors.load(fixture .. '/reference.safetensors').logits
say('LOGITS', (logits - expected):abs():max():item())

-- Hugging Face's loss: each position predicts the next id; the last predicts nothing
local targets = pmp.cat({ ids:narrow(2, 2, T - 1), pmp.full({ 2, 1 }, -100, { dtype = 'i64' }) }, 2)
local rows = 2 / dp.size
local my_ids, my_targets = ids:narrow(1, 1 + dp.rank * rows, rows), targets:narrow(1, 1 + dp.rank * rows, rows)

local frozen = model.decoder.layers['0'].self_attention.linear_qkv.weight:clone()
local ddp = dp.size > 1 and pmp.dist.ddp.DistributedDataParallel(model) or nil
local optimizer = pmp.optim.AdamW(model:parameters(), { lr = 1e-2 })
for iteration = 1, 3 do
  step.zero_grad(optimizer, ddp)
  local loss = step.forward_backward(model, { { ids = my_ids, targets = my_targets } }, { ddp = ddp })
  step.finish_grads(model, ddp)
  say('LOSS', iteration, dp:all_reduce(pmp.tensor({ loss }, { dtype = 'f64' }), 'avg'):item())
  if iteration == 1 then
    for _, e in ipairs(model.lora.entries) do
      for _, slot in ipairs({ 'A', 'B' }) do
        local g = e.adapter[slot].grad
        local rule = sharding.rule(e.name .. '.' .. slot, model.config)
        if rule and tp.size > 1 then g = tp:all_gather(g, { dim = rule.dim }) end
        say('GRAD', e.key .. '.lora_' .. slot .. '.weight', g:double():pow(2):sum():sqrt():item())
      end
    end
  end
  optimizer:step()
end
say('FROZEN', (model.decoder.layers['0'].self_attention.linear_qkv.weight - frozen):abs():max():item())
