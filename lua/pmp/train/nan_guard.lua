--- A diverged step must not reach the weights: before the optimizer steps, a non-finite gradient norm
--- (a NaN or Inf loss makes it one) skips the update and is counted, Megatron's "number of nan
--- iterations"; after --max-nan-iterations-in-a-row such steps in a row the run stops with an error,
--- leaving the last checkpoint as it was. The norm is the global one, the same on every rank, so every
--- rank skips the same steps.
---   local guard = pmp.train.NanGuard(opts, logger)
---   local grad_norm = step.clip_grads(model, optimizer, opts.clip_grad)
---   if guard:finite(iteration, grad_norm) then optimizer:step() end
--- With --check-for-nan-in-loss-and-grad=false every step is applied, as before.
local NanGuard = {}
NanGuard.__index = NanGuard

function NanGuard.new(opts, logger)
  return setmetatable({ enabled = opts.check_for_nan_in_loss_and_grad ~= false,
    limit = opts.max_nan_iterations_in_a_row or 1, logger = logger, in_a_row = 0, total = 0 }, NanGuard)
end

local function is_finite(x) return x == x and x ~= math.huge and x ~= -math.huge end

--- Whether the optimizer may step on this gradient (grad_norm: the global norm before clipping).
function NanGuard:finite(iteration, grad_norm)
  if not self.enabled or is_finite(grad_norm) then
    self.in_a_row = 0
    return true
  end
  self.in_a_row, self.total = self.in_a_row + 1, self.total + 1
  self.logger:line(string.format(' iteration %d: gradient norm is %s; the update is skipped (%d in a row)', iteration,
    tostring(grad_norm), self.in_a_row))
  if self.in_a_row >= self.limit then
    error(string.format('stopping at iteration %d: %d iterations in a row had a non-finite loss or gradient ' ..
      '(--max-nan-iterations-in-a-row %d); the weights were not updated by them and no checkpoint was written from ' ..
      'them', iteration, self.in_a_row, self.limit), 0)
  end
  return false
end

return setmetatable(NanGuard, { __call = function(_, ...) return NanGuard.new(...) end })
