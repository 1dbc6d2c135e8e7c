-- Run by spec/zoo_rotary_dist_spec.lua on every rank: trains each rotary family's tiny checkpoint
-- (spec/fixtures/zoo_rotary/<name>) three AdamW steps split TP ways (with sequence parallelism) and PP
-- ways, and in the same script as one process doing gradient accumulation over the same micro-batches
-- (the reference), on pretraining batches (every token a target) and on SFT batches (two samples
-- packed per row, positions restarting and attention kept inside each, prompt tokens not trained).
-- The last pipeline stage's tensor-parallel rank 0 prints
--   LOSS name kind step parallel_loss reference_loss        kind: pretrain or sft
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

-- Packed SFT rows: samples of FIRST and T - FIRST tokens, each with PROMPT untrained tokens.
local FIRST, PROMPT = 7, 3
local function sft_options()
  local positions, first_key = {}, {}
  for b = 1, MB do
    positions[b], first_key[b] = {}, {}
    for t = 1, T do
      local second = t > FIRST
      positions[b][t] = second and t - 1 - FIRST or t - 1
      first_key[b][t] = second and FIRST or 0
    end
  end
  return { positions = pmp.tensor(positions, { dtype = 'i64' }), first_key = pmp.tensor(first_key, { dtype = 'i64' }) }
end
local function sft_targets(targets)
  local rows = targets:totable()
  for b = 1, MB do
    for t = 1, T do
      local in_sample = t > FIRST and t - FIRST or t
      if in_sample <= PROMPT or t == FIRST or t == T then rows[b][t] = -100 end
    end
  end
  return pmp.tensor(rows, { dtype = 'i64' })
end

local function batches(vocab, kind)
  pmp.manual_seed(1234)
  local out = {}
  for step = 1, STEPS do
    out[step] = {}
    for k = 1, MICRO do
      local mb = { ids = pmp.randint(0, vocab, { MB, T }), targets = pmp.randint(0, vocab, { MB, T }) }
      if kind == 'sft' then mb.targets, mb.options = sft_targets(mb.targets), sft_options() end
      out[step][k] = mb
    end
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
      local loss = model(mb.ids, mb.targets, mb.options)
      sum = sum + loss:item()
      ;(loss * (1 / MICRO)):backward()
    end
    opt:step()
    losses[step] = sum / MICRO
  end
  return losses
end

local function run(name, kind)
  local model = pipeline.stage(load(name))
  local data = batches(model.config.vocab_size, kind)
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
    if reports then print(string.format('LOSS %s %s %d %.10g %.10g', name, kind, step, loss, want[step])) end
  end
end

for k = 3, #arg do
  run(arg[k], 'pretrain')
  run(arg[k], 'sft')
end
