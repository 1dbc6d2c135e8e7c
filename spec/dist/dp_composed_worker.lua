-- Run by spec/dist_dp_spec.lua on every rank: data parallelism composed with pipeline stages (1F1B,
-- tied embeddings) and tensor parallelism. Three steps of a tiny GPTModel, each data-parallel rank on
-- its part of the global batch in two micro-batches, gradient clipping on, against one process on the
-- whole global batch computed in the same script.
--   dp_composed_worker.lua TP PP ddp|distopt
-- Prints from every rank:
--   LOSS step loss reference    NORM step norm reference    PARAM name max_abs_diff (this rank's part)
local pipeline = require 'pmp.dist.pipeline'
local parallel = require 'pmp.nn.parallel'
local sharding = require 'pmp.dist.sharding'

local tp, pp, mode = tonumber(arg[1]), tonumber(arg[2]), arg[3]
local layout = pmp.dist.init{ tp = tp, pp = pp }
local dp = pmp.dist.group('dp')

local STEPS, MICRO, MB, T, VOCAB, MAX_NORM = 3, 2, 2, 16, 60, 0.5
local GLOBAL = MB * MICRO * dp.size
local config = { num_layers = 4, hidden_size = 32, num_attention_heads = 4, num_query_groups = 2,
  ffn_hidden_size = 64, vocab_size = VOCAB, padded_vocab_size = 64, dtype = 'f32', tie_embeddings = true }
local function optimizer_options() return { lr = 1e-3, weight_decay = 0.1 } end

pmp.manual_seed(1234)
local data = {}
for step = 1, STEPS do
  data[step] = { ids = pmp.randint(0, VOCAB, { GLOBAL, T }), targets = pmp.randint(0, VOCAB, { GLOBAL, T }) }
end

local reference = require('spec.support.reference_run').train(config, data,
  { seed = 7, adam = optimizer_options(), max_norm = MAX_NORM })
local ref, ref_opt, initial = reference.model, reference.optimizer, reference.initial
local ref_losses, ref_norms = reference.losses, reference.norms

local model = pmp.nn.GPTModel(config)
model:load_state_dict(initial)
pipeline.stage(model)
parallel.tensor_parallel(model)
local ddp = pmp.dist.ddp.DistributedDataParallel(model, { bucket_size = 3000, distributed_optimizer = mode == 'distopt' })
local opt
if mode == 'distopt' then
  local options = optimizer_options()
  options.ddp = ddp
  opt = pmp.optim.DistributedOptimizer(pmp.optim.decay_groups(model), options)
else
  opt = pmp.optim.AdamW(pmp.optim.decay_groups(model), optimizer_options())
end

for step = 1, STEPS do
  opt:zero_grad()
  local micro_batches = {}
  for k = 1, MICRO do
    local first = (dp.rank * MICRO + k - 1) * MB + 1
    micro_batches[k] = { ids = data[step].ids:narrow(1, first, MB), targets = data[step].targets:narrow(1, first, MB) }
  end
  ddp:set_sync(false)
  local loss = pipeline.forward_backward(model, micro_batches,
    { before_last_backward = function() ddp:set_sync(true) end })
  ddp:finish_grad_sync()
  parallel.finish_grads(model)
  pipeline.sync_embedding_grads(model)
  local norm = pmp.dist.clip_grad_norm(mode == 'distopt' and opt or model, MAX_NORM)
  opt:step()
  local mean = pmp.tensor({ pipeline.broadcast_loss(loss) }, { dtype = 'f64' })
  dp:all_reduce(mean, 'avg')
  print(string.format('LOSS %d %.10g %.10g', step, mean:item(), ref_losses[step]))
  print(string.format('NORM %d %.10g %.10g', step, norm, ref_norms[step]))
end

local reference = ref:state_dict()
local offset = model.pipeline and model.pipeline.layer_offset or 0
for _, pair in ipairs(model:named_parameters()) do
  local name = sharding.shift_layer(pair[1], offset)
  if name == 'output_layer.weight' and config.tie_embeddings then name = 'embedding.word_embeddings.weight' end
  local expected = sharding.shard(name, reference[name], config, layout.tp, layout.tp_rank)
  print(string.format('PARAM %s %.3g', name, (pair[2] - expected):abs():max():item()))
end
