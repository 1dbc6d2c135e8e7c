-- Run by the family specs (spec/zoo_alibi_dist_spec.lua, spec/zoo_rotary_dist_spec.lua) on every rank:
-- trains tiny checkpoints (spec/fixtures/FIXTURES/<name>) three AdamW steps split TP ways (with sequence
-- parallelism) and PP ways, or with each sequence split over a context-parallel group (gradients averaged
-- by DistributedDataParallel over 'dp_cp'), and, in the same script, as one process accumulating over the
-- same micro-batches (the reference). Three kinds of batches: 'pretrain' (every token a target),
-- 'padded' (the second row left-padded, its padding hidden by first_key and untrained) and 'packed'
-- (SFT: two samples per row, see pack_samples), so each rank's share of the heads (and of ALiBi's
-- slopes) meets the padding and per-document masks. The last pipeline stage's tensor-parallel rank 0
-- prints
--   LOSS name kind step parallel_loss reference_loss
-- Usage: family_dist_worker.lua FIXTURES TP PP NAME...   or   family_dist_worker.lua FIXTURES cp CP NAME...
local pipeline = require 'pmp.dist.pipeline'
local parallel = require 'pmp.nn.parallel'
local cp_lib = pmp.nn.context_parallel
local accumulate = require 'spec.support.accumulate'

local FIXTURES = package.loaded['pmp.root'] .. '/spec/fixtures/' .. arg[1] .. '/'
local context = arg[2] == 'cp'
local tp, pp = context and 1 or tonumber(arg[2]), context and 1 or tonumber(arg[3])
local layout = pmp.dist.init{ tp = tp, pp = pp, cp = context and tonumber(arg[3]) or 1 }
local reports = layout.tp_rank == 0 and pmp.dist.group('pp').rank == pp - 1 and pmp.dist.group('cp').rank == 0
local STEPS, MICRO, MB, T, PAD = 3, 2, 2, 16, 5

local function load(name)
  return pmp.models.from_pretrained(FIXTURES .. name, { make_vocab_size_divisible_by = 64, tensor_model_parallel_size = 2 })
end

-- eps 1e-6 keeps updates of near-zero gradients proportional to them (see spec/dist/tp_worker.lua)
local function optimizer(model)
  return pmp.optim.AdamW(model:parameters(), { lr = 1e-3, weight_decay = 0.1, eps = 1e-6 })
end

local function pad_second_row(mb)
  local targets = mb.targets:totable()
  local positions = {}
  for b = 1, MB do
    positions[b] = {}
    local pad = b == 2 and PAD or 0
    for t = 1, T do
      positions[b][t] = math.max(t - 1 - pad, 0)
      if t <= pad then targets[b][t] = -100 end
    end
  end
  mb.targets = pmp.tensor(targets, { dtype = 'i64' })
  mb.options = { first_key = pmp.tensor({ 0, PAD }, { dtype = 'i64' }), positions = pmp.tensor(positions, { dtype = 'i64' }) }
  return mb
end

-- SFT rows: two samples packed per row (FIRST and T - FIRST tokens), positions restarting and attention
-- kept inside each, the first PROMPT tokens of each sample untrained.
local FIRST, PROMPT = 7, 3
local function pack_samples(mb)
  local targets, positions, first_key = mb.targets:totable(), {}, {}
  for b = 1, MB do
    positions[b], first_key[b] = {}, {}
    for t = 1, T do
      local second = t > FIRST
      positions[b][t] = second and t - 1 - FIRST or t - 1
      first_key[b][t] = second and FIRST or 0
      if positions[b][t] < PROMPT or t == FIRST then targets[b][t] = -100 end
    end
  end
  mb.targets = pmp.tensor(targets, { dtype = 'i64' })
  mb.options = { first_key = pmp.tensor(first_key, { dtype = 'i64' }), positions = pmp.tensor(positions, { dtype = 'i64' }) }
  return mb
end

local SHAPE = { padded = pad_second_row, packed = pack_samples }

local function batches(vocab, kind)
  pmp.manual_seed(4321)
  local out = {}
  for step = 1, STEPS do
    out[step] = {}
    for k = 1, MICRO do
      local mb = { ids = pmp.randint(0, vocab, { MB, T }), targets = pmp.randint(0, vocab, { MB, T }) }
      out[step][k] = SHAPE[kind] and SHAPE[kind](mb) or mb
    end
  end
  return out
end

local function reference_losses(name, data)
  local model = load(name)
  local opt = optimizer(model)
  local losses = {}
  for step = 1, STEPS do
    losses[step] = accumulate.step(opt, data[step], function(mb) return model(mb.ids, mb.targets, mb.options) end)
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

-- This rank's part of every sequence; a per-row first_key [B] stays whole (it counts global key positions).
local function local_part(mb, group)
  local o = mb.options
  local options = o and { positions = cp_lib.split(o.positions, group),
    first_key = o.first_key:dim() == 2 and cp_lib.split(o.first_key, group) or o.first_key }
  return cp_lib.split(mb.ids, group), cp_lib.split(mb.targets, group), options
end

local function run_context_parallel(name, kind)
  local group = pmp.dist.group('cp')
  local model = parallel.context_parallel(load(name), { group = group })
  local data = batches(model.config.vocab_size, kind)
  local want = reference_losses(name, data)
  local ddp = pmp.dist.ddp.DistributedDataParallel(model, { overlap = false })
  local opt = optimizer(model)
  for step = 1, STEPS do
    ddp:zero_grad()
    local loss = accumulate.step(opt, data[step], function(mb) return model(local_part(mb, group)) end,
      function() ddp:finish_grad_sync() end)
    local mean = group:all_reduce(pmp.tensor({ loss }, { dtype = 'f64' }), 'avg'):item()
    if reports then print(string.format('LOSS %s %s %d %.10g %.10g', name, kind, step, mean, want[step])) end
  end
end

for k = 4, #arg do
  for _, kind in ipairs({ 'pretrain', 'padded', 'packed' }) do
    if context then run_context_parallel(arg[k], kind) else run(arg[k], kind) end
  end
end
