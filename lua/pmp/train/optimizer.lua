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

local function fail(text, ...) error(string.format(text, ...), 0) end

--- Megatron's sample-based training (--train-samples, --lr-decay-samples, --lr-warmup-samples) and
--- --lr-warmup-fraction: checks the flags agree as Megatron's validate_args does (given: the keys the
--- command line gave) and sets train_iters to train_samples // global batch, as update_train_iters
--- does. Call once the global batch is known (after pmp.train.parallel.init).
function M.resolve_samples(opts, given)
  local fraction = (opts.lr_warmup_fraction or 0) > 0
  if (opts.train_samples or 0) == 0 then
    if given.lr_decay_samples or given.lr_warmup_samples then fail('--lr-decay-samples/--lr-warmup-samples need --train-samples') end
    if fraction and given.lr_warmup_iters then fail('give either --lr-warmup-fraction or --lr-warmup-iters, not both') end
    if fraction then opts.lr_warmup_iters = 0 end
    return
  end
  for _, key in ipairs({ 'train_iters', 'lr_decay_iters', 'lr_warmup_iters', 'lr_wsd_decay_iters' }) do
    if given[key] then fail('--%s counts iterations: with --train-samples give samples', (key:gsub('_', '-'))) end
  end
  if fraction and given.lr_warmup_samples then fail('give either --lr-warmup-fraction or --lr-warmup-samples, not both') end
  if opts.lr_decay_style == 'WSD' then fail('--lr-decay-style WSD with --train-samples is not supported') end
  opts.train_iters = math.floor(opts.train_samples / opts.global_batch_size)
  if opts.train_iters == 0 then
    fail('--train-samples %d is less than one --global-batch-size %d', opts.train_samples, opts.global_batch_size)
  end
  opts.lr_warmup_iters = 0
end

--- The learning rate of each iteration, as Megatron's OptimizerParamScheduler counts its steps: in
--- samples, global batch by global batch. The decay spans --lr-decay-samples (with --train-samples,
--- else all of them) or --lr-decay-iters (else train_iters) global batches; the warmup
--- --lr-warmup-fraction of that, else --lr-warmup-samples or --lr-warmup-iters global batches.
--- Without a global batch (recipes that have none) a step is an iteration.
function M.schedule(opts, train_iters)
  local batch = opts.global_batch_size or 1
  local by_samples = (opts.train_samples or 0) > 0
  local decay
  if by_samples then
    decay = opts.lr_decay_samples > 0 and opts.lr_decay_samples or opts.train_samples
  else
    decay = (opts.lr_decay_iters > 0 and opts.lr_decay_iters or train_iters) * batch
  end
  local warmup
  if (opts.lr_warmup_fraction or 0) > 0 then
    warmup = opts.lr_warmup_fraction * decay
  else
    warmup = by_samples and opts.lr_warmup_samples or opts.lr_warmup_iters * batch
  end
  local lr_at_step = optim.schedule.new({
    max_lr = opts.lr, min_lr = opts.min_lr, warmup_iters = warmup, decay_iters = decay,
    style = opts.lr_decay_style:lower(), wsd_decay_iters = opts.lr_wsd_decay_iters * batch,
  })
  return function(iteration) return lr_at_step(iteration * batch) end
end

return M
