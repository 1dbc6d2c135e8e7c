--- The global gradient norm of a model spread over ranks, and clipping by it, with the semantics of
--- pmp.optim.clip_grad_norm (the L2 norm of all gradients together; scale by max_norm / (norm + 1e-6)
--- when that is below 1; return the norm before clipping). Every parameter counts exactly once:
---   * tensor parallelism: a parameter sharded by pmp.dist.sharding's rules counts on every rank (each
---     holds its part); a replicated one (rule(name) == nil) on tp rank 0 only;
---   * pipeline parallelism: the stages' sums add up; the copy of a tied word embedding that the last
---     stage holds as output_layer.weight is not counted again; a pipeline.Chunks (virtual stages) counts
---     each chunk by its own place;
---   * the distributed optimizer: each data-parallel rank counts its shard of the reduced gradients.
--- Call it after the gradients are final (DistributedDataParallel:finish_grad_sync and, with TP/PP,
--- pmp.nn.parallel.finish_grads / pipeline.sync_embedding_grads), on every rank of the model.
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local tensor = require 'pmp.tensor'
local sharding = require 'pmp.dist.sharding'
local Module = require 'pmp.nn.module'
local pipeline = require 'pmp.dist.pipeline'

local M = {}

local sum_buffer = ffi.new('double[1]')

local function sum_squares(t)
  if C.pmp_sum_squares(t.ptr, sum_buffer) ~= 0 then error(ffi.string(C.pmp_last_error()), 3) end
  return sum_buffer[0]
end

-- What a target holds: pieces {name, gradient} to count; what clipping scales (the gradient shards
-- themselves, or the parameters whose .grad to scale); the model (for its parallel layout); and the
-- group the pieces are shards over (nil: every rank holds whole gradients).
local function resolve(target)
  if type(target) == 'table' and target.grad_shards then   -- a DistributedOptimizer
    local pieces, whole = target:grad_shards()
    return pieces, whole, target.ddp.model, target.group
  end
  local model = target
  if type(target) == 'table' and target.buckets and target.model then   -- a DistributedDataParallel
    if target.distributed_optimizer then
      error('pmp.dist.clip_grad_norm: this DistributedDataParallel reduce-scatters (distributed optimizer); ' ..
        'pass the DistributedOptimizer, which holds the reduced shards', 3)
    end
    target:finish_grad_sync()
    model = target.model
  end
  local pieces, whole = {}, {}
  if Module.is_module(model) then
    for _, pair in ipairs(model:named_parameters()) do
      local g = pair[2].grad
      if g then
        pieces[#pieces + 1] = { pair[1], g }
        whole[#whole + 1] = pair[2]
      end
    end
    return pieces, whole, model, nil
  end
  if type(target) ~= 'table' then
    error('pmp.dist.clip_grad_norm: expected a model, a DistributedDataParallel, a DistributedOptimizer or a list ' ..
      'of parameters, got ' .. type(target), 3)
  end
  for _, p in ipairs(target) do
    local g = p.grad
    if g then
      pieces[#pieces + 1] = { nil, g }
      whole[#whole + 1] = p
    end
  end
  return pieces, whole, nil, nil
end

-- Whether a parameter of this rank adds to the norm (see the header).
local function counter(model)
  if not model then return function() return true end end
  if pipeline.is_chunks(model) then
    -- virtual pipeline stages: names are 'model<v>.<name in chunk v>', each chunk with its own place
    local counts = {}
    for v, chunk in ipairs(model.items) do counts[v] = counter(chunk) end
    return function(name)
      local v, inner = name:match('^model(%d+)%.(.*)$')
      return counts[tonumber(v) + 1](inner)
    end
  end
  local tp = model.tensor_parallel
  local stage = model.pipeline
  local config = model.config or {}
  local tied_copy = stage and stage.is_last and not stage.is_first and config.tie_embeddings
  return function(name)
    if tied_copy and name == 'output_layer.weight' then return false end
    if tp and tp.group.rank ~= 0 and sharding.rule(name, config) == nil then return false end
    return true
  end
end

local function total_norm(pieces, model, shard_group, options)
  local counts = counter(model)
  local total = 0
  -- an expert-parallel model's experts differ between the ranks of its expert-parallel group (the
  -- chunks of virtual stages share one group; a stage without MoE layers has none). The distributed
  -- optimizer's expert shards split them over the expert-data-parallel ranks, which with the
  -- expert-parallel ones make up its data-parallel group: the sum over that counts each once.
  local ep
  for _, chunk in ipairs(model and pipeline.chunks(model) or {}) do ep = ep or rawget(chunk, 'expert_parallel') end
  if shard_group then ep = nil end
  local experts = 0
  for _, piece in ipairs(pieces) do
    if counts(piece[1]) then
      if ep and piece[1]:match('%.mlp%.experts%.') then
        experts = experts + sum_squares(piece[2])
      else
        total = total + sum_squares(piece[2])
      end
    end
  end
  if ep then
    local t = tensor.tensor({ experts }, { dtype = 'f64' })
    ep.group:all_reduce(t, 'sum')
    total = total + t:item()
  end
  local groups = {}
  if shard_group then groups[#groups + 1] = shard_group end
  local part = model and pipeline.chunks(model)[1]   -- the chunks of virtual stages share one layout
  if part and part.tensor_parallel then groups[#groups + 1] = part.tensor_parallel.group end
  if part and part.pipeline then groups[#groups + 1] = (options and options.pp_group) or require('pmp.dist').group('pp') end
  if options and options.group then groups[#groups + 1] = options.group end
  if #groups > 0 then
    local t = tensor.tensor({ total }, { dtype = 'f64' })
    for _, g in ipairs(groups) do g:all_reduce(t, 'sum') end
    total = t:item()
  end
  return math.sqrt(total)
end

-- target: a model (nn.Module; its parameter names and its tensor_parallel / pipeline fields give the
-- layout), a DistributedDataParallel (all-reduce mode; its gradient sync is finished first), a
-- DistributedOptimizer (its gradient shards), or a plain list of parameters (no layout: summed over
-- options.group if given). options: pp_group (default pmp.dist.group('pp') for a pipeline stage),
-- group (one more group to sum over).
function M.grad_norm(target, options)
  local pieces, _, model, shard_group = resolve(target)
  return total_norm(pieces, model, shard_group, options)
end

-- Scales every gradient of target (this rank's shards for a DistributedOptimizer) so that the global
-- norm is at most max_norm; returns the norm before.
function M.clip_grad_norm(target, max_norm, options)
  local pieces, scaled, model, shard_group = resolve(target)
  local norm = total_norm(pieces, model, shard_group, options)
  local factor = max_norm / (norm + 1e-6)
  if factor < 1 then
    for _, t in ipairs(scaled) do
      local g = t
      if not shard_group then
        -- a parameter: scale its gradient (made contiguous first, as pmp.optim.clip_grad_norm does)
        g = t.grad
        if not g:is_contiguous() then
          g = g:contiguous()
          t.grad = g
        end
      end
      if C.pmp_scale_(g.ptr, factor) ~= 0 then error(ffi.string(C.pmp_last_error()), 2) end
    end
  end
  return norm
end

return M
