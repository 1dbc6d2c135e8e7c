--- Megatron-LM's --fp16 loss scaling. An f16 model's gradients underflow where f32 ones would not, so
--- the loss is multiplied by a large scale before backward; the gradients are then made f32 "main"
--- gradients divided by the scale, and a step whose gradients overflowed (an Inf or NaN anywhere) is
--- skipped. Megatron's scalers (megatron/core/optimizer/grad_scaler.py):
---   constant (--loss-scale S): the scale is always S;
---   dynamic (the default): from --initial-loss-scale (2^32), every overflow takes one of --hysteresis
---     (2) lives and, with none left, halves the scale (not below --min-loss-scale, 1); after
---     --loss-scale-window (1000) clean steps in a row the scale doubles and the lives are restored.
---   local scaler = pmp.train.LossScaler(opts)
---   backward of loss * scaler.scale; scaler.main_grads(model, scaler.scale); norm = clip...
---   if scaler:update(not finite(norm)) then optimizer:step() end   -- false: an overflow, skipped
local LossScaler = {}
LossScaler.__index = LossScaler

local GROWTH_FACTOR, BACKOFF_FACTOR = 2, 0.5

local function fail(text, ...) error(string.format(text, ...), 0) end

--- opts: loss_scale (a constant scale when above 0), initial_loss_scale, min_loss_scale,
--- loss_scale_window, hysteresis (Megatron's flag names).
function LossScaler.new(opts)
  if (opts.loss_scale or 0) > 0 then
    return setmetatable({ scale = opts.loss_scale, dynamic = false }, LossScaler)
  end
  if opts.min_loss_scale <= 0 then fail('--min-loss-scale %g must be above 0', opts.min_loss_scale) end
  if opts.min_loss_scale > opts.initial_loss_scale then
    fail('--min-loss-scale %g is above --initial-loss-scale %g', opts.min_loss_scale, opts.initial_loss_scale)
  end
  return setmetatable({ scale = opts.initial_loss_scale, dynamic = true, min_scale = opts.min_loss_scale,
    window = opts.loss_scale_window, hysteresis = opts.hysteresis, growth_tracker = 0,
    hysteresis_tracker = opts.hysteresis }, LossScaler)
end

--- Moves the scale after a step; found_inf: its gradients overflowed. Returns whether the optimizer may
--- step (false on an overflow, whatever the scaler).
function LossScaler:update(found_inf)
  if not self.dynamic then return not found_inf end
  if found_inf then
    self.growth_tracker = 0
    self.hysteresis_tracker = self.hysteresis_tracker - 1
    if self.hysteresis_tracker <= 0 then self.scale = math.max(self.scale * BACKOFF_FACTOR, self.min_scale) end
    return false
  end
  self.growth_tracker = self.growth_tracker + 1
  if self.growth_tracker == self.window then
    self.growth_tracker, self.hysteresis_tracker = 0, self.hysteresis
    self.scale = self.scale * GROWTH_FACTOR
  end
  return true
end

--- The state a checkpoint keeps (Megatron's grad_scaler state_dict).
function LossScaler:state()
  return { scale = self.scale, growth_tracker = self.growth_tracker, hysteresis_tracker = self.hysteresis_tracker }
end

function LossScaler:load(state)
  if type(state) ~= 'table' or type(state.scale) ~= 'number' then fail('checkpoint: the loss scaler state lacks its scale') end
  self.scale = state.scale
  if self.dynamic then
    self.growth_tracker, self.hysteresis_tracker = state.growth_tracker or 0, state.hysteresis_tracker or self.hysteresis
  end
end

--- Replaces every gradient of the model by its f32 main gradient divided by scale (Megatron's unscaling
--- of main_grad), so clipping and the optimizer see true f32 gradients; an overflow stays Inf or NaN.
function LossScaler.main_grads(model, scale)
  local inverse = 1 / scale
  require('pmp').no_grad(function()
    for _, chunk in ipairs(require('pmp.dist.pipeline').chunks(model)) do
      for _, p in ipairs(chunk:parameters()) do
        local g = p.grad
        if g then p.grad = g:float() * inverse end
      end
    end
  end)
end

return setmetatable(LossScaler, { __call = function(_, ...) return LossScaler.new(...) end })
