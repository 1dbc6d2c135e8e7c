--- The training loop recipes/rm.lua and dpo.lua share: --train-iters AdamW steps over global batches of
--- --batch-size preference pairs drawn in a seeded order, each data-parallel rank stepping on its share
--- (pmp.rl.recipe.data_parallel); the metrics, averaged over the ranks, go to Megatron-style log lines
--- and TensorBoard (--tensorboard-dir); checkpoints go to --save, and a --save that holds one resumes
--- bit-exactly (weights, optimizer, random generators and the pair order).
---   local trainer = pair_training.new(opts, { name =, model =, layout =, ddp =, pairs =, metrics = })
---   if not trainer.resuming then state.before = ... end
---   trainer:train(function(pairs) return loss, { more metric values } end, state)
local train = require 'pmp.train'
local recipe = require 'pmp.rl.recipe'
local clock = require 'pmp.clock'

local Trainer = {}
Trainer.__index = Trainer

local M = {}

--- run: name (the recipe's), model, layout and ddp (pmp.rl.recipe.data_parallel), pairs (the training
--- list), metrics ({label, format} per logged value, the loss first). trainer.logger prints on the
--- logging rank; trainer.resuming says whether --save holds a checkpoint that train() continues.
function M.new(opts, run)
  local self = setmetatable({ opts = opts, run = run }, Trainer)
  self.logger = train.Logger(opts, { name = run.name, enabled = run.layout.is_logger, train_iters = opts.train_iters })
  self.optimizer = train.optimizer.adamw(run.model, opts, run.ddp)
  self.checkpoints = train.Checkpoints(opts, self.logger)
  self.resuming = train.Checkpoints.info(self.checkpoints.dir) ~= nil
  self.next_batch, self.position = recipe.batches(run.pairs, opts.batch_size, opts.seed)
  return self
end

--- Trains to --train-iters. loss_of(pairs) -> the loss tensor over this rank's pairs and a list of the
--- other metrics' values. state: JSON-able fields saved with each checkpoint and restored into it on resume.
function Trainer:train(loss_of, state)
  local opts, run, logger, optimizer, position = self.opts, self.run, self.logger, self.optimizer, self.position
  local step = train.step
  local lr_at = train.optimizer.schedule(opts, opts.train_iters)
  local function checkpoint_state()
    return { model_config = run.model.config, args = opts, pair_order = position.order, pair_cursor = position.cursor,
      recipe = state }
  end
  local iteration = 0
  if self.resuming then   -- after everything that draws random numbers: the restored generators are the ones used
    local saved
    iteration, saved = self.checkpoints:load(self.checkpoints.dir, run.model, optimizer)
    position.order, position.cursor = saved.pair_order, saved.pair_cursor
    for k, v in pairs(saved.recipe or {}) do state[k] = v end
  end
  local first_iteration = iteration
  local sums, count, start = {}, 0, clock.now()
  while iteration < opts.train_iters do
    iteration = iteration + 1
    logger:begin_iteration(iteration)
    optimizer.lr = lr_at(iteration)
    local pairs = recipe.rank_share(self.next_batch(), run.layout)
    step.zero_grad(optimizer, run.ddp)
    local loss, others = loss_of(pairs)
    loss:backward()
    step.finish_grads(run.model, run.ddp)
    local grad_norm = step.clip_grads(run.model, optimizer, opts.clip_grad)
    optimizer:step()
    local values = recipe.mean_over_ranks({ loss:item(), unpack(others) }, run.layout)
    local tagged = { ['learning-rate'] = optimizer.lr, ['grad-norm'] = grad_norm }
    for k, v in ipairs(values) do
      sums[k] = (sums[k] or 0) + v
      tagged[run.metrics[k][1]] = v
    end
    recipe.scalars(logger, iteration, tagged)
    count = count + 1
    if iteration % opts.log_interval == 0 or iteration == opts.train_iters then
      local now = clock.now()
      local fields = { string.format(' iteration %8d/%8d | elapsed time per iteration (ms): %.1f | learning rate: %.6E |',
        iteration, opts.train_iters, (now - start) * 1000 / count, optimizer.lr) }
      for k, metric in ipairs(run.metrics) do
        fields[#fields + 1] = string.format(' %s: ' .. metric[2] .. ' |', metric[1], sums[k] / count)
      end
      fields[#fields + 1] = string.format(' grad norm: %.3f |', grad_norm)
      logger:line(table.concat(fields))
      sums, count, start = {}, 0, now
    end
    self.checkpoints:save_if_due(iteration, run.model, optimizer, checkpoint_state)
    if self.checkpoints:exit_due(iteration) then break end
  end
  self.checkpoints:finish(iteration, run.model, optimizer, checkpoint_state)
  logger:finish(iteration - first_iteration)
end

return M
