-- One optimizer step over micro-batches as gradient accumulation takes it, for the workers that compare
-- a parallel run with one process: the gradient is that of the mean of the micro-batches' losses.
local M = {}

-- Zeroes the gradients, runs backward on loss_of(mb) / #micro_batches for each micro-batch, calls
-- before_step (if any: e.g. a data-parallel gradient reduction), steps; returns the mean loss.
function M.step(optimizer, micro_batches, loss_of, before_step)
  optimizer:zero_grad()
  local sum = 0
  for _, mb in ipairs(micro_batches) do
    local loss = loss_of(mb)
    sum = sum + loss:item()
    ;(loss * (1 / #micro_batches)):backward()
  end
  if before_step then before_step() end
  optimizer:step()
  return sum / #micro_batches
end

return M
