--- The pieces of a training step that every layout shares, in the order a loop calls them:
---   step.zero_grad(optimizer, ddp)
---   local loss = step.forward_backward(model, micro_batches, { ddp = ddp })
---   step.finish_grads(model, ddp)
---   local grad_norm = step.clip_grads(model, optimizer, opts.clip_grad)
---   optimizer:step()
--- A micro batch is {ids = [mb, T] i64, targets = [mb, T] i64, options = GPTModel forward options or nil}
--- (pmp.dist.pipeline's convention). ddp is a pmp.dist.ddp.DistributedDataParallel or nil.
local pipeline = require 'pmp.dist.pipeline'
local parallel = require 'pmp.nn.parallel'
local grad_norm = require 'pmp.dist.grad_norm'

local M = {}

function M.zero_grad(optimizer, ddp)
  optimizer:zero_grad()
  if ddp then ddp:zero_grad() end
end

local function is_pipeline_stage(model) return pipeline.chunks(model)[1].pipeline ~= nil end

--- Forward and backward over the micro batches (forwards only without recording the graph when
--- options.forward_only: validation); a pipeline stage runs pmp.dist.pipeline's schedule (1F1B, or the
--- interleaved one over virtual stages). With options.ddp only the last micro batch's backward reduces
--- gradients. The gradient is that of the mean of the micro batches' losses, or with
--- options.loss_divisor = N that of their summed token losses over N (a per-token mean over the whole
--- step, N = the trained tokens of the global batch, counted over every rank). Under data or context
--- parallelism ddp averages the gradients of its ranks, so each rank divides its own token losses by
--- N / ranks; its returned loss is then its share, which pmp.train.parallel.mean_loss turns into the
--- global one. Returns the mean loss (the summed, divided one with loss_divisor) on the last pipeline
--- stage, nil on the others. options.grad_scale (--fp16's loss scale) multiplies what backward starts
--- from, not the returned loss.
function M.forward_backward(model, batches, options)
  options = options or {}
  local ddp, forward_only, divisor = options.ddp, options.forward_only, options.loss_divisor
  local grad_scale = options.grad_scale or 1
  if divisor and ddp then divisor = divisor / ddp.group.size end
  -- the MoE auxiliary losses weigh in as each micro batch's loss does (Megatron's MoEAuxLossAutoScaler)
  require('pmp.nn.moe').aux_loss_scale = divisor and 1 / divisor or 1 / #batches
  if ddp and not forward_only then ddp:set_sync(false) end
  if is_pipeline_stage(model) then
    if divisor then
      for _, mb in ipairs(batches) do
        mb.options = mb.options or {}
        mb.options.reduction = 'sum'
      end
    end
    local loss = pipeline.forward_backward(model, batches, { forward_only = forward_only,
      loss_scale = (divisor and 1 / divisor or 1 / #batches) * grad_scale, before_last_backward = ddp and function() ddp:set_sync(true) end })
    -- the pipeline returns the mean of the micro batches' (summed) losses
    if loss and divisor then loss = loss * #batches / divisor end
    return loss
  end
  local total = 0
  for k, mb in ipairs(batches) do
    local forward_options = mb.options
    if divisor then
      forward_options = forward_options or {}
      forward_options.reduction = 'sum'
    end
    if forward_only then
      total = total + require('pmp').no_grad(function() return model(mb.ids, mb.targets, forward_options):item() end)
    elseif divisor then
      if ddp then ddp:set_sync(k == #batches) end
      local loss = model(mb.ids, mb.targets, forward_options) / divisor
      ;(grad_scale == 1 and loss or loss * grad_scale):backward()
      total = total + loss:item()
    else
      if ddp then ddp:set_sync(k == #batches) end
      local loss = model(mb.ids, mb.targets, forward_options)
      -- one micro batch needs no scaling (x / 1 is x, forward and backward), so no extra ops
      local scale = grad_scale / #batches
      ;(scale == 1 and loss or loss * scale):backward()
      total = total + loss:item()
    end
  end
  if divisor then return total end
  return total / #batches
end

--- Completes the gradients: the data-parallel buckets, then the sums over tensor-parallel ranks
--- (sequence-parallel norms) and over the pipeline's two copies of a tied embedding. Call it after the
--- step's last backward, on every rank.
function M.finish_grads(model, ddp)
  if ddp then ddp:finish_grad_sync() end
  for _, chunk in ipairs(pipeline.chunks(model)) do
    parallel.finish_grads(chunk)
    require('pmp.nn.expert_parallel').finish_expert_grads(chunk)
    require('pmp.nn.moe').update_expert_bias(chunk)
  end
  pipeline.sync_embedding_grads(model)
end

--- The global gradient norm, each gradient counted once whatever the layout (pmp.dist.grad_norm: the
--- distributed optimizer's shards, a model spread over ranks, or one process's parameters); with
--- max_norm > 0 the gradients are first scaled so that it is at most max_norm. Returns the norm before.
function M.clip_grads(model, optimizer, max_norm)
  local target = optimizer.grad_shards and optimizer or model
  if max_norm > 0 then return grad_norm.clip_grad_norm(target, max_norm) end
  return grad_norm.grad_norm(target)
end

--- The validation loss over the micro batches, averaged over data- and context-parallel ranks
--- (pmp.train.parallel.mean_loss); nil on ranks that hold no loss. Leaves the model in training mode.
function M.evaluate(model, batches, layout)
  model:eval()
  local loss = M.forward_backward(model, batches, { forward_only = true })
  model:train()
  return require('pmp.train.parallel').mean_loss(loss, layout)
end

return M
