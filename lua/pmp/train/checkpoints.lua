--- Checkpoint cadence for training loops: resume from --load, save every --save-interval iterations and
--- at the end, stop at --exit-interval, after --exit-duration-in-mins, or on SIGTERM / SIGINT
--- (--exit-signal-handler: the iteration under way finishes, is saved, and the run ends; a second Ctrl-C
--- ends it at once). The one place recipes reach pmp.checkpoint (every layout, one process included; a
--- checkpoint loads into any other layout, resharded).
---   local checkpoints = pmp.train.Checkpoints(opts, logger)
---   local iteration, state = checkpoints:load(opts.load, model, optimizer)
---   ... each iteration: checkpoints:save_if_due(iteration, model, optimizer, state_of)
---                       if checkpoints:exit_due(iteration) then break end
---   checkpoints:finish(iteration, model, optimizer, state_of)
--- state_of() returns the recipe's own state to store (data position, tokenizer, args...).
local checkpoint = require 'pmp.checkpoint'
local clock = require 'pmp.clock'
local megatron = require 'pmp.checkpoint.megatron'
local pio = require 'pmp.io'
local C = require('pmp.ffi').C

local Checkpoints = {}
Checkpoints.__index = Checkpoints

--- The info table (iteration, state, layout...) of the latest checkpoint in dir without reading any
--- tensor, or nil when dir (which may be nil) holds no checkpoint.
function Checkpoints.info(dir)
  if dir and megatron.is_checkpoint(dir) then
    error(dir .. ' is a Megatron-LM checkpoint, which only recipes/pretrain.lua and recipes/sft.lua --load take; convert it with ' ..
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

local function normal(path) return (path:gsub('/+$', '')) end

--- A fresh run (nothing to resume) that saves into a directory holding another run's checkpoint would
--- overwrite its iterations and move its tracker backwards: refused unless override. The directory must
--- also be writable now, not found unwritable at the first save after hours of training.
function Checkpoints.check_save_dir(save_dir, override)
  if save_dir == nil or save_dir == '' then return end
  if pio.exists(save_dir) and not pio.is_dir(save_dir) then error('--save ' .. save_dir .. ' is a file, not a directory', 0) end
  local held = checkpoint.latest_iteration(save_dir)
  if held and not override then
    error(string.format('--save %s already holds a checkpoint (iteration %s) of another run; pass --load %s to ' ..
      'resume it, or --override-checkpoint to start over and replace it', save_dir, tostring(held), save_dir), 0)
  end
  local ok, why = pcall(pio.mkdir_p, save_dir)
  local probe = pio.join(save_dir, string.format('.write_test.%d', pio.getpid()))
  local file = ok and io.open(probe, 'w')
  if not file then error('--save ' .. save_dir .. ' is not writable' .. (ok and '' or ': ' .. tostring(why)), 0) end
  file:close()
  os.remove(probe)
end

--- The info table of the checkpoint a run resumes from (--load dir), or nil for a fresh run: dir nil,
--- or dir the run's own --save directory with no checkpoint yet (Megatron scripts pass the same path
--- to both, so that a restarted job resumes). Any other dir without a checkpoint is an error naming it:
--- a typo must not start training from scratch and then save over the real checkpoint directory. For
--- the same reason a fresh run refuses a save_dir that holds a checkpoint unless override is true
--- (--override-checkpoint), and an unwritable save_dir is refused before any work. A Megatron-LM torch
--- checkpoint in dir is continued from (Checkpoints.megatron_info).
function Checkpoints.resume(dir, save_dir, override)
  local other_save_dir = save_dir and save_dir ~= '' and (dir == nil or normal(dir) ~= normal(save_dir))
  if dir ~= nil and megatron.is_checkpoint(dir) then
    if other_save_dir then Checkpoints.check_save_dir(save_dir, override) end
    return Checkpoints.megatron_info(dir)
  end
  if dir ~= nil and checkpoint.latest_iteration(dir) then
    if other_save_dir then Checkpoints.check_save_dir(save_dir, override) end
    return checkpoint.info(dir)
  end
  if dir ~= nil and (other_save_dir or not save_dir or save_dir == '' or pio.is_file(dir)) then
    error('--load ' .. dir .. ' ' .. not_a_checkpoint(dir), 0)
  end
  Checkpoints.check_save_dir(save_dir, override)
  return nil
end

--- A model rebuilt whole from a pretraining checkpoint of any layout, and its info table.
function Checkpoints.load_model(dir) return checkpoint.load_model(dir) end

--- opts: save (directory; nil or '' for none), save_interval (0: only at the end), exit_interval (0:
--- never), exit_duration_in_mins (0 or nil: no limit), exit_signal_handler (watch SIGTERM and SIGINT
--- until finish()). logger: a pmp.train.Logger (its line() prints on the logging rank).
function Checkpoints.new(opts, logger)
  local self = setmetatable({ dir = opts.save ~= '' and opts.save or nil, interval = opts.save_interval,
    exit_interval = opts.exit_interval or 0, exit_after = (opts.exit_duration_in_mins or 0) * 60,
    started = clock.now(), logger = logger, first_iteration = 0, saved_iteration = nil }, Checkpoints)
  -- an unwritable directory must stop the run now, not at its first save after the training it was to keep
  Checkpoints.check_save_dir(self.dir, true)
  if opts.exit_signal_handler then
    if C.pmp_stop_signals_watch(1, 1) ~= 0 then error(require('ffi').string(C.pmp_last_error()), 0) end
    self.watching_signals = true
  end
  return self
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
--- weights and, given an optimizer, its Adam state (pmp.checkpoint.megatron_optimizer: one process's
--- f32 run); the generators start fresh, as with Megatron's --no-load-rng.
--- optimizer nil leaves the optimizer fresh; options.rng = false the generators (pmp.checkpoint.load).
function Checkpoints:load(dir, model, optimizer, options)
  if megatron.is_checkpoint(dir) then
    local info = Checkpoints.megatron_info(dir)
    local ckpt = megatron.load_into(dir, model)
    local with_optimizer = optimizer and require('pmp.checkpoint.megatron_optimizer').load(ckpt, model, optimizer)
    if optimizer and not with_optimizer then optimizer:refresh_master() end
    self.first_iteration = info.iteration
    self.logger:line(string.format(' loaded Megatron-LM checkpoint from %s at iteration %d (%s; the random ' ..
      'generators start fresh)', dir, info.iteration, with_optimizer and "weights and Adam state" or
      'weights only: the optimizer state starts fresh'))
    for name, n in pairs(ckpt.report) do
      self.logger:line(string.format(' %s: %d object(s) of %s kept as inert placeholders (not rebuilt)', dir, n, name))
    end
    return info.iteration, info.state
  end
  local loaded = checkpoint.load(dir, model, optimizer, options)
  self.first_iteration = loaded.iteration
  self.logger:line(string.format(' loaded checkpoint from %s at iteration %d%s', dir, loaded.iteration,
    loaded.resharded and ' (resharded from another parallel layout)' or ''))
  return loaded.iteration, loaded.state
end

-- A diverged run must not replace a good checkpoint with NaN weights: every parameter this rank holds
-- is summed (NaN and Inf propagate through a sum; finite weights cannot overflow one) before saving.
local function check_finite(model, iteration)
  for _, chunk in ipairs(require('pmp.dist.pipeline').chunks(model)) do
    for _, pair in ipairs(chunk:named_parameters()) do
      local total = pair[2]:sum():item()
      if total ~= total or total == math.huge or total == -math.huge then
        error(string.format('not saving iteration %d: parameter %s holds NaN or Inf (the run diverged)', iteration,
          pair[1]), 0)
      end
    end
  end
end

function Checkpoints:save(iteration, model, optimizer, state)
  check_finite(model, iteration)
  checkpoint.save(self.dir, iteration, model, optimizer, state)
  self.saved_iteration = iteration
  self.logger:line(string.format(' saved checkpoint to %s at iteration %d', self.dir, iteration))
end

function Checkpoints:save_if_due(iteration, model, optimizer, state_of)
  if self.dir and self.interval > 0 and iteration % self.interval == 0 then
    self:save(iteration, model, optimizer, state_of())
  end
end

-- Whether a signal or the time limit stops the run here; under mpirun every rank gets the same answer
-- (a signal may reach some ranks first, clocks differ), so all stop after the same iteration.
local function stop_requested(self)
  -- nothing to agree on (the same on every rank): no collective on every iteration
  if not self.watching_signals and self.exit_after == 0 then return 0, 0 end
  local signal = self.watching_signals and C.pmp_stop_signal() or 0
  local overdue = (self.exit_after > 0 and clock.now() - self.started >= self.exit_after) and 1 or 0
  local dist = require 'pmp.dist'
  if dist.is_initialized() and dist.world_size() > 1 then
    local votes = require('pmp.tensor').tensor({ signal, overdue }, { dtype = 'f64' })
    dist.group('world'):all_reduce(votes, 'max')
    local both = votes:totable()
    signal, overdue = both[1], both[2]
  end
  return signal, overdue
end

local signal_names = { [2] = 'SIGINT', [15] = 'SIGTERM' }

--- Whether the run stops after this iteration (then says why): --exit-interval, a SIGTERM or SIGINT
--- received (--exit-signal-handler) or --exit-duration-in-mins elapsed. Call it on every rank.
function Checkpoints:exit_due(iteration)
  local signal, overdue = stop_requested(self)
  local why
  if signal ~= 0 then
    why = (signal_names[signal] or 'signal ' .. signal) .. ' received'
  elseif overdue ~= 0 then
    why = string.format('--exit-duration-in-mins %g elapsed', self.exit_after / 60)
  elseif self.exit_interval > 0 and iteration % self.exit_interval == 0 then
    why = string.format('--exit-interval %d', self.exit_interval)
  end
  if why then self.logger:line(string.format('%s: exiting at iteration %d (%s)', self.logger.name, iteration, why)) end
  return why ~= nil
end

--- The checkpoint at the end of a run that trained since it started, unless this iteration's is saved.
function Checkpoints:finish(iteration, model, optimizer, state_of)
  if self.watching_signals then
    C.pmp_stop_signals_release()
    self.watching_signals = false
  end
  if self.dir and iteration > self.first_iteration and self.saved_iteration ~= iteration then
    self:save(iteration, model, optimizer, state_of())
  end
end

return setmetatable(Checkpoints, { __call = function(_, ...) return Checkpoints.new(...) end })
