-- Checkpoints in Megatron-LM's directory layout:
--   DIR/latest_checkpointed_iteration.txt
--   DIR/iter_0000100/mp_rank_00/model_optim_rng.safetensors   (model.<name>, optimizer.<k>.<slot>)
--   DIR/iter_0000100/mp_rank_00/model_optim_rng.json          (iteration, args, RNG, data position, ...)
-- An iteration directory is filled under a temporary name and renamed, and the tracker file is
-- replaced atomically after it, so a kill at any moment leaves the previous checkpoint loadable.
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local io_ = require 'pmp.io'
local json = require 'pmp.json'
local safetensors = require 'pmp.safetensors'

local M = {}

-- The file naming the latest iteration (pmp.dist.checkpoint writes the same one).
local TRACKER = 'latest_checkpointed_iteration.txt'
M.TRACKER = TRACKER

function M.iteration_dir(dir, iteration)
  return io_.join(dir, string.format('iter_%07d', iteration), 'mp_rank_00')
end

-- The generator state as hex strings (JSON numbers cannot hold 64 bits).
function M.rng_state()
  local words = ffi.new('uint64_t[4]')
  C.pmp_rng_get_state(words)
  local out = {}
  for k = 0, 3 do out[k + 1] = require('bit').tohex(words[k], 16) end
  return out
end

function M.set_rng_state(hex_words)
  local words = ffi.new('uint64_t[4]')
  for k = 1, 4 do
    local v = ffi.new('uint64_t', 0)
    for digit in hex_words[k]:gmatch('%x') do v = v * 16 + tonumber(digit, 16) end
    words[k - 1] = v
  end
  C.pmp_rng_set_state(words)
end

-- Saves model (and optimizer) tensors plus a JSON-able `state` table for `iteration`.
function M.save(dir, iteration, model, optimizer, state)
  local tensors = {}
  for name, t in pairs(model:state_dict()) do tensors['model.' .. name] = t end
  local info = { iteration = iteration, rng = M.rng_state(), state = state or {} }
  if optimizer then
    local sd = optimizer:state_dict()
    info.optimizer = { lr = sd.lr, betas = sd.betas, eps = sd.eps, weight_decay = sd.weight_decay, steps = {} }
    for k, s in ipairs(sd.state) do
      info.optimizer.steps[k] = s.step
      tensors[string.format('optimizer.%d.exp_avg', k)] = s.exp_avg
      tensors[string.format('optimizer.%d.exp_avg_sq', k)] = s.exp_avg_sq
      if s.master then tensors[string.format('optimizer.%d.master', k)] = s.master end
    end
  end
  io_.mkdir_p(dir)
  local iter_root = io_.join(dir, string.format('iter_%07d', iteration))
  io_.replace_dir_atomic(iter_root, function(tmp)
    local rank_dir = io_.join(tmp, 'mp_rank_00')
    io_.mkdir_p(rank_dir)
    safetensors.save(io_.join(rank_dir, 'model_optim_rng.safetensors'), tensors, { format = 'pt' })
    io_.write_atomic(io_.join(rank_dir, 'model_optim_rng.json'), json.encode(info))
  end)
  io_.write_atomic(io_.join(dir, TRACKER), tostring(iteration) .. '\n')
  return iter_root
end

-- The iteration named by the tracker file, or nil when dir holds no checkpoint.
function M.latest_iteration(dir)
  local path = io_.join(dir, TRACKER)
  if not io_.exists(path) then return nil end
  local text = io_.read_file(path)
  local iteration = tonumber(text:match('^%s*(%d+)%s*$'))
  if not iteration then error(string.format("checkpoint: %s does not hold an iteration number: '%s'", path, text), 2) end
  return iteration
end

-- Loads into model (and optimizer), restores the RNG, and returns the JSON info table.
function M.load(dir, model, optimizer, iteration)
  iteration = iteration or M.latest_iteration(dir)
  if not iteration then error('checkpoint: no ' .. TRACKER .. ' in ' .. dir, 2) end
  local rank_dir = M.iteration_dir(dir, iteration)
  local info = json.decode(io_.read_file(io_.join(rank_dir, 'model_optim_rng.json')))
  local tensors = safetensors.load(io_.join(rank_dir, 'model_optim_rng.safetensors'))
  local model_sd = {}
  for name, t in pairs(tensors) do
    local key = name:match('^model%.(.*)$')
    if key then model_sd[key] = t end
  end
  model:load_state_dict(model_sd)
  if optimizer then
    if not info.optimizer then error('checkpoint: ' .. rank_dir .. ' has no optimizer state', 2) end
    local sd = { lr = info.optimizer.lr, betas = info.optimizer.betas, eps = info.optimizer.eps,
      weight_decay = info.optimizer.weight_decay, state = {} }
    for k, step in ipairs(info.optimizer.steps) do
      local function need(slot)
        local t = tensors[string.format('optimizer.%d.%s', k, slot)]
        if not t then error(string.format('checkpoint: %s lacks optimizer.%d.%s', rank_dir, k, slot), 3) end
        return t
      end
      sd.state[k] = { step = step, exp_avg = need('exp_avg'), exp_avg_sq = need('exp_avg_sq'),
        master = tensors[string.format('optimizer.%d.master', k)] }
    end
    optimizer:load_state_dict(sd)
  end
  M.set_rng_state(info.rng)
  return info
end

-- A GPTModel rebuilt from a checkpoint whose state records model_config (as recipes/pretrain.lua
-- writes), with its weights loaded, plus the checkpoint's info table.
-- A parallel run's checkpoint (pmp.dist.checkpoint: one directory per model-parallel rank) gives the
-- whole model, its parts joined.
function M.load_model(dir, iteration)
  iteration = iteration or M.latest_iteration(dir)
  if not iteration then error('checkpoint: no ' .. TRACKER .. ' in ' .. dir, 2) end
  local rank_dir = M.iteration_dir(dir, iteration)
  if not io_.exists(io_.join(rank_dir, 'model_optim_rng.json')) then
    local dcp = require 'pmp.dist.checkpoint'
    local info = dcp.info(dir, iteration)
    if type(info.layout.model_config) ~= 'table' then
      error('checkpoint: ' .. dcp.iteration_root(dir, iteration) .. ' does not record model_config', 2)
    end
    local model = require('pmp.nn').GPTModel(info.layout.model_config)
    dcp.load(dir, model, nil, iteration)
    return model, info
  end
  local info = json.decode(io_.read_file(io_.join(rank_dir, 'model_optim_rng.json')))
  if type(info.state) ~= 'table' or type(info.state.model_config) ~= 'table' then
    error('checkpoint: ' .. rank_dir .. ' does not record model_config', 2)
  end
  local model = require('pmp.nn').GPTModel(info.state.model_config)
  local probe = safetensors.load(io_.join(rank_dir, 'model_optim_rng.safetensors'),
    { names = { 'model.embedding.word_embeddings.weight' } })
  local dtype = probe['model.embedding.word_embeddings.weight'].dtype
  if dtype ~= 'f32' then model:to(dtype) end
  M.load(dir, model, nil, iteration)
  return model, info
end

return M
