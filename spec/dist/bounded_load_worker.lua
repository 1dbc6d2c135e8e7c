-- Run by spec/checkpoint_bounded_spec.lua, under mpirun or as one process: loads checkpoints into
-- another layout and measures the engine allocator's peak (pmp.memory) during the load.
--   bounded_load_worker.lua save DIR TP PP     saves the reference model cut for TP x PP (iteration 1)
--   bounded_load_worker.lua load DIR TP PP     loads DIR into the model cut for TP x PP, built
--                                              uninitialized before the measurement starts
--   bounded_load_worker.lua whole DIR          pmp.checkpoint.read_whole_model(DIR) in one process
--   bounded_load_worker.lua megatron DIR       pmp.checkpoint.megatron.load_model(DIR) in one process
-- Prints, per rank:
--   PEAK rank extra_bytes model_bytes largest_tensor_bytes
--       extra_bytes: the allocator's peak during the load above what was in use before it; model_bytes:
--       the bytes of the rank's part of the model (all of it for whole and megatron); largest: of its
--       largest parameter
--   DIFFER rank name        (save/load) a loaded parameter that is not bit for bit the reference's part
local expect = require 'spec.support.expect'
local sharding = require 'pmp.dist.sharding'
local pipeline = require 'pmp.dist.pipeline'
local parallel = require 'pmp.nn.parallel'

local mode, dir = arg[1], arg[2]
local CONFIG = { num_layers = 4, hidden_size = 64, num_attention_heads = 4, num_query_groups = 2, ffn_hidden_size = 256,
  vocab_size = 1000, padded_vocab_size = 1024, add_qkv_bias = true, dtype = 'f32' }

local function sizes(model)
  local total, largest = 0, 0
  for _, p in ipairs(model:parameters()) do
    local n = p:numel() * p:element_size()
    total, largest = total + n, math.max(largest, n)
  end
  return total, largest
end

-- measure(fn): runs fn, returns its result and the allocator's peak during it above what was in use
local function measure(fn)
  collectgarbage()
  local before = pmp.memory.stats().in_use
  pmp.memory.reset_peak()
  local result = fn()
  return result, pmp.memory.stats().peak - before
end

local function reference()
  pmp.manual_seed(7)
  return pmp.nn.GPTModel(CONFIG)
end

-- The reference cut for the layout, or a model of that layout's shapes left uninitialized.
local function part(unfilled)
  local model
  if unfilled then
    local build = {}
    for k, v in pairs(CONFIG) do build[k] = v end
    build.init = false
    model = pmp.nn.GPTModel(build)
    model.config.init = nil
  else
    model = reference()
  end
  model = pipeline.stage(model, { unfilled = unfilled })
  return parallel.tensor_parallel(model, { unfilled = unfilled })
end

if mode == 'save' or mode == 'load' then
  local layout = pmp.dist.init{ tp = tonumber(arg[3]), pp = tonumber(arg[4]) }
  local model = part(mode == 'load')
  if mode == 'save' then return pmp.checkpoint.save(dir, 1, model, nil, { model_config = CONFIG }) end
  local _, extra = measure(function() return pmp.checkpoint.load(dir, model, nil, { rng = false }) end)
  local total, largest = sizes(model)
  print(string.format('PEAK %d %d %d %d', layout.rank, extra, total, largest))
  local want, whole = reference(), nil
  whole = want:state_dict()
  local offset = model.pipeline and model.pipeline.layer_offset or 0
  for name, p in pairs(model:state_dict()) do
    local global = sharding.shift_layer(name, offset)
    local full = whole[global] or (global == 'output_layer.weight' and whole['embedding.word_embeddings.weight'])
    if not expect.same_bits(sharding.shard(global, full, want.config, layout.tp, layout.tp_rank), p) then
      print(string.format('DIFFER %d %s', layout.rank, global))
    end
  end
elseif mode == 'whole' or mode == 'megatron' then
  local model, extra = measure(function()
    if mode == 'whole' then return (pmp.checkpoint.read_whole_model(dir)) end
    return (require('pmp.checkpoint.megatron').load_model(dir))
  end)
  local total, largest = sizes(model)
  print(string.format('PEAK 0 %d %d %d', extra, total, largest))
else
  error('bounded_load_worker: unknown mode ' .. tostring(mode))
end
