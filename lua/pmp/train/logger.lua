--- Megatron-LM's training log: a timestamped line every --log-interval iterations (and at the last), validation
--- lines between dashes, TensorBoard scalars under Megatron's tags, the op profiler over
--- --profile-step-start..end, and the end-of-run summary. Only the logging rank prints.
---   local logger = pmp.train.Logger(opts, { name = 'pretrain', enabled = layout.is_logger, train_iters = n })
---   each iteration: logger:begin_iteration(it); ...; logger:iteration(it, { lr =, loss =, grad_norm =, tokens = })
---   logger:validation(it, evaluate); logger:finish(iterations_run)
local clock = require 'pmp.clock'

local Logger = {}
Logger.__index = Logger

--- hh:mm:ss
function Logger.duration(seconds)
  seconds = math.max(0, math.floor(seconds + 0.5))
  return string.format('%02d:%02d:%02d', math.floor(seconds / 3600), math.floor(seconds / 60) % 60, seconds % 60)
end

--- opts: the parsed flags (log_interval, global_batch_size, tensorboard_dir, profile*). options: name
--- (the recipe, prefixing its own lines), enabled (this rank prints; default true), train_iters,
--- flops_per_token and peak_flops (then lines show MFU and ETA), consumed (lines show consumed samples),
--- world_size (processes, for --log-throughput's TFLOP/s per process).
function Logger.new(opts, options)
  local self = setmetatable({ opts = opts, name = options.name, enabled = options.enabled ~= false,
    train_iters = options.train_iters, flops_per_token = options.flops_per_token, peak_flops = options.peak_flops,
    consumed = options.consumed, world_size = options.world_size or 1, loss_sum = 0, steps = 0, loss_steps = 0, skipped = 0, nan = 0, tokens = 0 }, Logger)
  if self.enabled and opts.tensorboard_dir then
    local ok, writer = pcall(require('pmp.tensorboard').writer, opts.tensorboard_dir)
    if not ok then error('--tensorboard-dir ' .. opts.tensorboard_dir .. ': ' .. tostring(writer), 0) end
    self.tensorboard = writer
  end
  return self
end

function Logger:line(text)
  if self.enabled then print(text) end
end

--- Starts the clocks on the first iteration, and the profiler on --profile-step-start.
function Logger:begin_iteration(iteration)
  if not self.run_start then self.run_start, self.interval_start = clock.now(), clock.now() end
  if self.opts.profile and iteration == self.opts.profile_step_start then require('pmp.profile').start() end
end

local function scalar(self, tag, value, iteration)
  if self.tensorboard then self.tensorboard:add_scalar(tag, value, iteration) end
end

--- step: lr, loss (nil on ranks without one: other pipeline stages), grad_norm, tokens (trained this
--- step), consumed (samples so far, when the logger shows them), skipped (true when pmp.train.NanGuard
--- or the --fp16 loss scaler kept the optimizer from stepping: its loss stays out of the line's mean, and
--- it counts as a nan iteration when its loss is not finite, as in Megatron), loss_scale (--fp16's scale
--- after the step; 1 without).
function Logger:iteration(iteration, step)
  self.steps, self.tokens = self.steps + 1, self.tokens + step.tokens
  if step.skipped then
    self.skipped = self.skipped + 1
    local loss = step.loss
    if loss and (loss ~= loss or math.abs(loss) == math.huge) then self.nan = self.nan + 1 end
  elseif step.loss then
    self.loss_sum, self.loss_steps = self.loss_sum + step.loss, self.loss_steps + 1
  end
  -- MoE auxiliary losses (pmp.nn.moe.take_aux_losses), averaged over the interval like the loss
  self.aux_sums = self.aux_sums or {}
  for name, value in pairs(step.aux_losses or {}) do
    if type(value) == 'table' then   -- per layer
      local sums = self.aux_sums[name] or {}
      for k, v in ipairs(value) do sums[k] = (sums[k] or 0) + v end
      self.aux_sums[name] = sums
    else
      self.aux_sums[name] = (self.aux_sums[name] or 0) + value
      scalar(self, name, value, iteration)
    end
  end
  if step.loss and not step.skipped then
    scalar(self, 'lm loss', step.loss, iteration)
    scalar(self, 'learning-rate', step.lr, iteration)
    scalar(self, 'grad-norm', step.grad_norm, iteration)
  end
  if iteration % self.opts.log_interval == 0 or iteration == self.train_iters then
    local now = clock.now()
    local per_iteration = (now - self.interval_start) / self.steps
    local throughput = self.tokens / (now - self.interval_start)
    -- Megatron's training_log starts the line with the local wall-clock time (datetime.now())
    local fields = { string.format(' [%s] iteration %8d/%8d |', os.date('%Y-%m-%d %H:%M:%S'), iteration, self.train_iters) }
    if self.consumed then fields[#fields + 1] = string.format(' consumed samples: %12d |', step.consumed) end
    fields[#fields + 1] = string.format(' elapsed time per iteration (ms): %.1f |', per_iteration * 1000)
    if self.opts.log_throughput and self.flops_per_token then
      fields[#fields + 1] = string.format(' throughput per GPU (TFLOP/s/GPU): %.3f |',
        throughput * self.flops_per_token / self.world_size / 1e12)
    end
    -- loss scale: --fp16's, 1.0 for f32 and bf16 runs (no loss scaling)
    fields[#fields + 1] = string.format(' learning rate: %.6E | global batch size: %5d | lm loss: %.6E | loss scale: ' ..
      '%.1f | grad norm: %.3f | number of skipped iterations: %3d | number of nan iterations: %3d | tokens per second: ' ..
      '%.0f |', step.lr, self.opts.global_batch_size,
      self.loss_steps > 0 and self.loss_sum / self.loss_steps or 0 / 0, step.loss_scale or 1, step.grad_norm,
      self.skipped, self.nan, throughput)
    for _, name in ipairs({ 'load_balancing_loss', 'seq_load_balancing_loss', 'z_loss' }) do
      if self.aux_sums[name] then fields[#fields + 1] = string.format(' %s: %.6E |', name, self.aux_sums[name] / self.steps) end
    end
    local imbalance = self.aux_sums.expert_load_imbalance
    if imbalance then
      local per_layer = {}
      for k, v in ipairs(imbalance) do per_layer[k] = string.format('%.2f', v / self.steps) end
      fields[#fields + 1] = ' expert load max/mean per MoE layer: ' .. table.concat(per_layer, ' ') .. ' |'
    end
    self.aux_sums = {}
    if self.flops_per_token then
      fields[#fields + 1] = string.format(' MFU: %.1f%% | ETA: %s |', 100 * throughput * self.flops_per_token /
        self.peak_flops, Logger.duration(per_iteration * (self.train_iters - iteration)))
    end
    self:line(table.concat(fields))
    scalar(self, 'throughput', throughput, iteration)
    self.interval_start, self.loss_sum, self.steps, self.loss_steps, self.skipped, self.nan, self.tokens = now, 0, 0, 0, 0, 0, 0
  end
  if self.opts.profile and iteration == self.opts.profile_step_end then
    local profile = require 'pmp.profile'
    profile.stop()
    self:line(string.format(' engine ops over iterations %d-%d:\n%s', self.opts.profile_step_start, iteration,
      profile.report()))
  end
end

--- Runs evaluate() (the validation loss; nil on ranks without one) and logs it; its time does not count
--- as training time. split: nil during training; 'validation' or 'test' for Megatron's evaluations at the
--- end of training ('validation loss at iteration N on test set'), the test loss staying out of TensorBoard.
function Logger:validation(iteration, evaluate, split)
  local start = clock.now()
  local loss = evaluate() or 0
  local text = string.format(' validation loss at iteration %d%s | lm loss value: %.6E | lm loss PPL: %.6E |',
    iteration, split and ' on ' .. split .. ' set' or '', loss, math.exp(math.min(loss, 20)))
  self:line(string.rep('-', #text))
  self:line(text)
  self:line(string.rep('-', #text))
  if split ~= 'test' then scalar(self, 'lm loss validation', loss, iteration) end
  self.interval_start = self.interval_start + (clock.now() - start)
end

local function peak_resident_mib()
  local status = io.open('/proc/self/status', 'r')
  local text = status and status:read('*a') or ''
  if status then status:close() end
  return (tonumber(text:match('VmHWM:%s*(%d+)')) or 0) / 1024
end

--- The end-of-run summary (iterations run, wall time, peak memory); closes the TensorBoard file.
function Logger:finish(iterations)
  if self.tensorboard then self.tensorboard:close() end
  self:line(string.format('%s: %d iterations in %s | peak engine memory: %.1f MiB | peak resident memory: %.1f MiB',
    self.name, iterations, Logger.duration(clock.now() - (self.run_start or clock.now())),
    require('pmp').memory.stats().peak / 2^20, peak_resident_mib()))
end

return setmetatable(Logger, { __call = function(_, ...) return Logger.new(...) end })
