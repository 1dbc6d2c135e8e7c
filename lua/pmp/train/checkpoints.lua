-- Checkpoint cadence for training loops: resume from --load, save every --save-interval iterations and
-- at the end, stop at --exit-interval. The only place recipes reach pmp.checkpoint (one process) and
-- pmp.dist.checkpoint (one directory per model-parallel rank under mpirun; loads any layout's
-- checkpoint, resharding it).
--   local checkpoints = pmp.train.Checkpoints(opts, layout, logger)
--   local iteration, state = checkpoints:load(opts.load, info, model, optimizer)
--   ... each iteration: checkpoints:save_if_due(iteration, model, optimizer, state_of)
--                       if checkpoints:exit_due(iteration) then break end
--   checkpoints:finish(iteration, model, optimizer, state_of)
-- state_of() returns the recipe's own state to store (data position, tokenizer, args...).
local checkpoint = require 'pmp.checkpoint'
local dist_checkpoint = require 'pmp.dist.checkpoint'

local Checkpoints = {}
Checkpoints.__index = Checkpoints

-- The info table (iteration, state, layout...) of the latest checkpoint in dir without reading any
-- tensor, or nil when dir holds no checkpoint.
function Checkpoints.info(dir)
  if not dir or not checkpoint.latest_iteration(dir) then return nil end
  return dist_checkpoint.info(dir)
end

-- A model rebuilt from a pretraining checkpoint (any layout, joined) and its info table.
function Checkpoints.load_model(dir) return checkpoint.load_model(dir) end

-- opts: save (directory; nil or '' for none), save_interval (0: only at the end), exit_interval (0:
-- never). layout: pmp.dist's (world). logger: a pmp.train.Logger (its line() prints on the logging rank).
function Checkpoints.new(opts, layout, logger)
  return setmetatable({ dir = opts.save ~= '' and opts.save or nil, interval = opts.save_interval,
    exit_interval = opts.exit_interval or 0, layout = layout, logger = logger, first_iteration = 0,
    saved_iteration = nil }, Checkpoints)
end

-- Loads the checkpoint described by info (Checkpoints.info(dir)) into model and optimizer, restoring
-- the random generators; returns its iteration and the recipe state saved with it.
function Checkpoints:load(dir, info, model, optimizer)
  local sharded = self.layout.world > 1 or not info.layout.single_process
  local loaded = sharded and dist_checkpoint.load(dir, model, optimizer) or checkpoint.load(dir, model, optimizer)
  self.first_iteration = loaded.iteration
  self.logger:line(string.format(' loaded checkpoint from %s at iteration %d%s', dir, loaded.iteration,
    loaded.resharded and ' (resharded from another parallel layout)' or ''))
  return loaded.iteration, loaded.state
end

function Checkpoints:save(iteration, model, optimizer, state)
  if self.layout.world > 1 then
    dist_checkpoint.save(self.dir, iteration, model, optimizer, state)
  else
    checkpoint.save(self.dir, iteration, model, optimizer, state)
  end
  self.saved_iteration = iteration
  self.logger:line(string.format(' saved checkpoint to %s at iteration %d', self.dir, iteration))
end

function Checkpoints:save_if_due(iteration, model, optimizer, state_of)
  if self.dir and self.interval > 0 and iteration % self.interval == 0 then
    self:save(iteration, model, optimizer, state_of())
  end
end

-- Whether --exit-interval stops the run after this iteration (then says so).
function Checkpoints:exit_due(iteration)
  if self.exit_interval > 0 and iteration % self.exit_interval == 0 then
    self.logger:line(string.format('%s: exiting at iteration %d (--exit-interval %d)', self.logger.name, iteration,
      self.exit_interval))
    return true
  end
  return false
end

-- The checkpoint at the end of a run that trained since it started, unless this iteration's is saved.
function Checkpoints:finish(iteration, model, optimizer, state_of)
  if self.dir and iteration > self.first_iteration and self.saved_iteration ~= iteration then
    self:save(iteration, model, optimizer, state_of())
  end
end

return setmetatable(Checkpoints, { __call = function(_, ...) return Checkpoints.new(...) end })
