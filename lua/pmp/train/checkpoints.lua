--- Checkpoint cadence for training loops: resume from --load, save every --save-interval iterations and
--- at the end, stop at --exit-interval. The one place recipes reach pmp.checkpoint (every layout, one
--- process included; a checkpoint loads into any other layout, resharded).
---   local checkpoints = pmp.train.Checkpoints(opts, logger)
---   local iteration, state = checkpoints:load(opts.load, model, optimizer)
---   ... each iteration: checkpoints:save_if_due(iteration, model, optimizer, state_of)
---                       if checkpoints:exit_due(iteration) then break end
---   checkpoints:finish(iteration, model, optimizer, state_of)
--- state_of() returns the recipe's own state to store (data position, tokenizer, args...).
local checkpoint = require 'pmp.checkpoint'
local megatron = require 'pmp.checkpoint.megatron'
local pio = require 'pmp.io'

local Checkpoints = {}
Checkpoints.__index = Checkpoints

--- The info table (iteration, state, layout...) of the latest checkpoint in dir without reading any
--- tensor, or nil when dir (which may be nil) holds no checkpoint.
function Checkpoints.info(dir)
  if dir and megatron.is_checkpoint(dir) then
    error(dir .. ' is a Megatron-LM checkpoint, which only recipes/pretrain.lua --load takes; convert it with ' ..
      'pmp tools/checkpoint/convert.lua --loader mcore --saver hf (or pmp)', 0)
  end
  if not dir or not checkpoint.latest_iteration(dir) then return nil end
  return checkpoint.info(dir)
end

-- Why dir holds no checkpoint, in the words a user who typed it needs.
local function not_a_checkpoint(dir)
  if not pio.exists(dir) then return 'does not exist' end
  if not pio.is_dir(dir) then return 'is a file, not a checkpoint directory' end
  if pio.basename(dir):match('^iter_%d+$') then
    return 'is one iteration of a checkpoint: pass the directory above it (the one holding ' .. checkpoint.TRACKER .. ')'
  end
  if pio.is_file(pio.join(dir, 'config.json')) then
    return 'holds a Hugging Face model (config.json), not a pmp checkpoint to resume'
  end
  return 'holds no checkpoint (no ' .. checkpoint.TRACKER .. ')'
end

--- The info table of the checkpoint a run resumes from (--load dir), or nil for a fresh run: dir nil,
--- or dir the run's own --save directory with no checkpoint yet (Megatron scripts pass the same path
--- to both, so that a restarted job resumes). Any other dir without a checkpoint is an error naming it:
--- a typo must not start training from scratch and then save over the real checkpoint directory.
function Checkpoints.resume(dir, save_dir)
  if dir == nil then return nil end
  if megatron.is_checkpoint(dir) then return Checkpoints.megatron_info(dir) end
  if checkpoint.latest_iteration(dir) then return checkpoint.info(dir) end
  local function normal(path) return (path:gsub('/+$', '')) end
  local own_save_dir = save_dir and save_dir ~= '' and normal(dir) == normal(save_dir)
  if own_save_dir and not pio.is_file(dir) then return nil end
  error('--load ' .. dir .. ' ' .. not_a_checkpoint(dir), 0)
end

--- A model rebuilt whole from a pretraining checkpoint of any layout, and its info table.
function Checkpoints.load_model(dir) return checkpoint.load_model(dir) end

--- opts: save (directory; nil or '' for none), save_interval (0: only at the end), exit_interval (0:
--- never). logger: a pmp.train.Logger (its line() prints on the logging rank).
function Checkpoints.new(opts, logger)
  return setmetatable({ dir = opts.save ~= '' and opts.save or nil, interval = opts.save_interval,
    exit_interval = opts.exit_interval or 0, logger = logger, first_iteration = 0,
    saved_iteration = nil }, Checkpoints)
end

--- The info of a Megatron-LM torch checkpoint (pmp.checkpoint.megatron) to continue from: its
--- iteration (0 for a release) and the samples its args record as consumed; it brings weights only.
function Checkpoints.megatron_info(dir)
  local ckpt = megatron.open(dir)
  local consumed = ckpt.args and tonumber(ckpt.args.consumed_train_samples) or 0
  local iteration = ckpt.iteration == 'release' and 0 or (tonumber(ckpt.saved_iteration) or ckpt.iteration)
  return { megatron = true, iteration = iteration, state = { consumed_samples = consumed } }
end

--- Loads the latest checkpoint in dir into model and optimizer, restoring the random generators;
--- returns its iteration and the recipe state saved with it. A Megatron-LM torch checkpoint gives its
--- weights only (the optimizer and generators start fresh, as Megatron's --no-load-optim --no-load-rng).
function Checkpoints:load(dir, model, optimizer)
  if megatron.is_checkpoint(dir) then
    local info = Checkpoints.megatron_info(dir)
    local ckpt = megatron.load_into(dir, model)
    self.first_iteration = info.iteration
    self.logger:line(string.format(' loaded Megatron-LM checkpoint from %s at iteration %d (weights only: the ' ..
      'optimizer state and random generators start fresh)', dir, info.iteration))
    for name, n in pairs(ckpt.report) do
      self.logger:line(string.format(' %s: %d object(s) of %s kept as inert placeholders (not rebuilt)', dir, n, name))
    end
    return info.iteration, info.state
  end
  local loaded = checkpoint.load(dir, model, optimizer)
  self.first_iteration = loaded.iteration
  self.logger:line(string.format(' loaded checkpoint from %s at iteration %d%s', dir, loaded.iteration,
    loaded.resharded and ' (resharded from another parallel layout)' or ''))
  return loaded.iteration, loaded.state
end

function Checkpoints:save(iteration, model, optimizer, state)
  checkpoint.save(self.dir, iteration, model, optimizer, state)
  self.saved_iteration = iteration
  self.logger:line(string.format(' saved checkpoint to %s at iteration %d', self.dir, iteration))
end

function Checkpoints:save_if_due(iteration, model, optimizer, state_of)
  if self.dir and self.interval > 0 and iteration % self.interval == 0 then
    self:save(iteration, model, optimizer, state_of())
  end
end

--- Whether --exit-interval stops the run after this iteration (then says so).
function Checkpoints:exit_due(iteration)
  if self.exit_interval > 0 and iteration % self.exit_interval == 0 then
    self.logger:line(string.format('%s: exiting at iteration %d (--exit-interval %d)', self.logger.name, iteration,
      self.exit_interval))
    return true
  end
  return false
end

--- The checkpoint at the end of a run that trained since it started, unless this iteration's is saved.
function Checkpoints:finish(iteration, model, optimizer, state_of)
  if self.dir and iteration > self.first_iteration and self.saved_iteration ~= iteration then
    self:save(iteration, model, optimizer, state_of())
  end
end

return setmetatable(Checkpoints, { __call = function(_, ...) return Checkpoints.new(...) end })
