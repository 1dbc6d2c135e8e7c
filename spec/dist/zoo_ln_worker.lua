-- Run by spec/dist_zoo_ln_spec.lua on every rank: loads tiny checkpoints of the LayerNorm-era families
-- (spec/fixtures/zoo_ln), trains each three AdamW steps (with gradient clipping) split over the ranks,
-- and in the same script as one process on the same micro-batches (the reference).
--   zoo_ln_worker.lua TP PP SP NAME...     SP: 'sp' for sequence parallelism, '-' for none
-- Prints, from the last rank: LOSS name step loss reference_loss
-- With ZOO_LN_CHECKPOINTS=DIR each split model is also saved, before training, as a Megatron-layout
-- checkpoint DIR/<name> (iteration 1), which one process must load back to the checkpoint's weights.
local pipeline = require 'pmp.dist.pipeline'
local parallel = require 'pmp.nn.parallel'
local step = require 'pmp.train.step'

local tp, pp, sp = tonumber(arg[1]), tonumber(arg[2]), arg[3] == 'sp'
local layout = pmp.dist.init{ tp = tp, pp = pp }
local FIXTURES = package.loaded['pmp.root'] .. '/spec/fixtures/zoo_ln/'
local STEPS, MICRO, MB, T, VOCAB = 3, 4, 2, 8, 150

-- STEPS global batches of MICRO micro-batches of next-token targets; the same on every rank.
local function batches()
  pmp.manual_seed(1234)
  local out = {}
  for s = 1, STEPS do
    out[s] = {}
    for k = 1, MICRO do
      local tokens = pmp.randint(0, VOCAB, { MB, T + 1 })
      out[s][k] = { ids = tokens:narrow(2, 1, T):contiguous(), targets = tokens:narrow(2, 2, T):contiguous() }
    end
  end
  return out
end

local function train(model, data)
  local optimizer = pmp.optim.AdamW(model:parameters(), { lr = 1e-3, weight_decay = 0.1 })
  local losses = {}
  for s = 1, STEPS do
    step.zero_grad(optimizer)
    losses[s] = step.forward_backward(model, data[s])
    step.finish_grads(model)
    step.clip_grads(model, optimizer, 1.0)
    optimizer:step()
  end
  return losses
end

local data = batches()
for k = 4, #arg do
  local name = arg[k]
  local reference = train(pmp.models.from_pretrained(FIXTURES .. name), data)
  local model = pipeline.stage(pmp.models.from_pretrained(FIXTURES .. name))
  parallel.tensor_parallel(model, { sequence_parallel = sp })
  local checkpoints = os.getenv('ZOO_LN_CHECKPOINTS')
  if checkpoints then pmp.checkpoint.save(checkpoints .. '/' .. name, 1, model, nil, { model_config = model.config }) end
  local losses = train(model, data)
  if layout.rank == layout.world - 1 then
    for s = 1, STEPS do print(string.format('LOSS %s %d %.10g %.10g', name, s, losses[s], reference[s])) end
  end
end
