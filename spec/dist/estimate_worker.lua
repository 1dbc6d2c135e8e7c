-- Run by spec/estimate_spec.lua on every rank: one training step of a small GPTModel split over
-- tensor- and pipeline-parallel ranks the way recipes/pretrain.lua splits it, measuring the engine's
-- peak memory over the step.
--   estimate_worker.lua TP PP MICRO_BATCH MICRO_BATCHES SEQ LAYERS [sp]
-- Prints PEAK pipeline_rank tensor_rank bytes (the peak over the step above what was in use before
-- the model was built).
local tp, pp, micro_batch, micro_batches, seq, layers = tonumber(arg[1]), tonumber(arg[2]), tonumber(arg[3]),
  tonumber(arg[4]), tonumber(arg[5]), tonumber(arg[6])
local sequence_parallel = arg[7] == 'sp'
local layout = pmp.dist.init({ tp = tp, pp = pp })
local SETTINGS = { num_layers = layers, hidden_size = 128, num_attention_heads = 4, ffn_hidden_size = 256, vocab_size = 500,
  tie_embeddings = true }

local batches = {}
pmp.manual_seed(7)
for k = 1, micro_batches do
  local ids = pmp.randint(0, SETTINGS.vocab_size, { micro_batch, seq })
  batches[k] = { ids = ids, targets = ids }
end

local function fresh_collector_window()
  pmp.memory.set_gc_step(0)
  pmp.memory.set_gc_step(256 * 2^20)
  collectgarbage()
  collectgarbage()
  pmp.zeros(1)
end

fresh_collector_window()
local base = pmp.memory.stats().in_use
local config = {}
for k, v in pairs(SETTINGS) do config[k] = v end
config.tensor_model_parallel_size = tp
pmp.manual_seed(1)
local model = pmp.dist.pipeline.stage(pmp.nn.GPTModel(config))
pmp.nn.parallel.tensor_parallel(model, { sequence_parallel = sequence_parallel })
local optimizer = pmp.optim.AdamW(pmp.optim.decay_groups(model), { lr = 1e-3 })
fresh_collector_window()
pmp.memory.reset_peak()

optimizer:zero_grad()
pmp.dist.pipeline.forward_backward(model, batches)
pmp.nn.parallel.finish_grads(model)
pmp.dist.pipeline.sync_embedding_grads(model)
optimizer:step()
print(string.format('PEAK %d %d %d', layout.pp_rank, layout.tp_rank, pmp.memory.stats().peak - base))
