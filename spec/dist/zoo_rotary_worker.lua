-- Run by spec/zoo_rotary_dist_spec.lua on every rank: trains each rotary family's tiny checkpoint
-- (spec/fixtures/zoo_rotary/<name>) three AdamW steps split TP ways (with sequence parallelism) and PP
-- ways, and in the same script as one process doing gradient accumulation over the same micro-batches
-- (the reference); the last pipeline stage's tensor-parallel rank 0 prints
--   LOSS name step parallel_loss reference_loss
--   zoo_rotary_worker.lua TP PP NAME...
local pipeline = require 'pmp.dist.pipeline'
local parallel = require 'pmp.nn.parallel'

local tp, pp = tonumber(arg[1]), tonumber(arg[2])
local layout = pmp.dist.init{ tp = tp, pp = pp }
local reports = layout.tp_rank == 0 and pmp.dist.group('pp').rank == pp - 1
local FIXTURES = package.loaded['pmp.root'] .. '/spec/fixtures/zoo_rotary/'
local STEPS, MICRO, MB, T = 3, 2, 2, 16

local function load(name)
  return pmp.models.from_pretrained(FIXTURES .. name, { make_vocab_size_divisible_by = 64, tensor_model_parallel_size = 2 })
end

-- See spec/dist/tp_worker.lua: eps 1e-6 keeps updates of near-zero gradients proportional to them, so
-- the summation order that tensor parallelism changes cannot pick them.
local function optimizer(model)
  return pmp.optim.AdamW(model:parameters(), { lr = 1e-3, weight_decay = 0.1, eps = 1e-6 })
end

local function batches(vocab)
  pmp.manual_seed(1234)
  local out = {}
  for step = 1, STEPS do
    out[step] = {}
    for k = 1, MICRO do out[step][k] = { ids = pmp.randint(0, vocab, { MB, T }), targets = pmp.randint(0, vocab, { MB, T }) } end
  end
  return out
end

local function reference_losses(name, data)
  local model = load(name)
  local opt = optimizer(model)
  local losses = {}
  for step = 1, STEPS do
    opt:zero_grad()
    local sum = 0
    for _, mb in ipairs(data[step]) do
      local loss = model(mb.ids, mb.targets)
      sum = sum + loss:item()
      ;(loss * (1 / MICRO)):backward()
    end
    opt:step()
    losses[step] = sum / MICRO
  end
  return losses
end

for k = 3, #arg do
  local name = arg[k]
  local model = pipeline.stage(load(name))
  local data = batches(model.config.vocab_size)
  local want = reference_losses(name, data)
  local chunks = pipeline.chunks(model)
  for _, chunk in ipairs(chunks) do parallel.tensor_parallel(chunk, { sequence_parallel = tp > 1 }) end
  local opt = optimizer(model)
  for step = 1, STEPS do
    opt:zero_grad()
    local loss = pipeline.forward_backward(model, data[step])
    for _, chunk in ipairs(chunks) do parallel.finish_grads(chunk) end
    pipeline.sync_embedding_grads(model)
    opt:step()
    if reports then print(string.format('LOSS %s %d %.10g %.10g', name, step, loss, want[step])) end
  end
end
