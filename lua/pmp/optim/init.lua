--- pmp.optim: optimizers, learning-rate schedules and gradient clipping.

--- Parameter groups as Megatron forms them: weight decay on matrices, none on norms and biases
--- (1-D parameters). Pass the result to an optimizer as its params.
local function decay_groups(model)
  local decay, no_decay = {}, {}
  for _, p in ipairs(model:parameters()) do
    if p:dim() >= 2 then decay[#decay + 1] = p else no_decay[#no_decay + 1] = p end
  end
  return { { params = decay }, { params = no_decay, weight_decay = 0 } }
end

return {
  decay_groups = decay_groups,
  AdamW = require 'pmp.optim.adamw',
  DistributedOptimizer = require 'pmp.optim.distributed',
  SGD = require 'pmp.optim.sgd',
  schedule = require 'pmp.optim.schedule',
  clip_grad_norm = require('pmp.optim.clip').clip_grad_norm,
  grad_norm = require('pmp.optim.clip').grad_norm,
}
