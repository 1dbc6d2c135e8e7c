--- AdamW and its learning-rate schedule from pmp.train.flags.optimizer.
local optim = require 'pmp.optim'

local M = {}

--- AdamW over the model's parameters, without weight decay on norms and biases (1-D parameters), as
--- Megatron does; with a DistributedDataParallel that reduce-scatters (--use-distributed-optimizer),
--- the DistributedOptimizer over its shards.
function M.adamw(model, opts, ddp)
  local options = {
    lr = opts.lr, betas = { opts.adam_beta1, opts.adam_beta2 }, eps = opts.adam_eps, weight_decay = opts.weight_decay,
  }
  if ddp and ddp.distributed_optimizer then
    options.ddp = ddp
    return optim.DistributedOptimizer(optim.decay_groups(model), options)
  end
  return optim.AdamW(optim.decay_groups(model), options)
end

--- The learning rate of each iteration; the decay spans --lr-decay-iters, else train_iters.
function M.schedule(opts, train_iters)
  return optim.schedule.new({
    max_lr = opts.lr, min_lr = opts.min_lr, warmup_iters = opts.lr_warmup_iters,
    decay_iters = opts.lr_decay_iters > 0 and opts.lr_decay_iters or train_iters,
    style = opts.lr_decay_style:lower(), wsd_decay_iters = opts.lr_wsd_decay_iters,
  })
end

return M
