--- SGD with momentum and (coupled) weight decay, as torch.optim.SGD with dampening 0.
local tensor = require 'pmp.tensor'

local SGD = {}
SGD.__index = SGD

--- SGD(params, {lr = 1e-3, momentum = 0, weight_decay = 0}); opt:step() after backward.
function SGD.new(params, options)
  options = options or {}
  return setmetatable({
    params = params,
    lr = options.lr or 1e-2,
    momentum = options.momentum or 0,
    weight_decay = options.weight_decay or 0,
    nesterov = options.nesterov or false,
    buffers = {},
  }, SGD)
end

function SGD:step()
  local pmp_no_grad = require('pmp').no_grad
  pmp_no_grad(function()
    for k, p in ipairs(self.params) do
      local g = p.grad
      if g then
        if self.weight_decay ~= 0 then g = g + p * self.weight_decay end
        if self.momentum ~= 0 then
          local buf = self.buffers[k]
          buf = buf and (buf * self.momentum + g) or g:clone()
          self.buffers[k] = buf
          g = self.nesterov and (g + buf * self.momentum) or buf
        end
        p:copy_(p - g * self.lr)
      end
    end
  end)
end

function SGD:zero_grad()
  for _, p in ipairs(self.params) do p.grad = nil end
end

function SGD:state_dict()
  return { lr = self.lr, momentum = self.momentum, weight_decay = self.weight_decay, buffers = self.buffers }
end

function SGD:load_state_dict(sd)
  self.lr, self.momentum, self.weight_decay = sd.lr, sd.momentum, sd.weight_decay
  self.buffers = {}
  for k, b in pairs(sd.buffers or {}) do self.buffers[k] = b:clone() end
end

return setmetatable(SGD, { __call = function(_, ...) return SGD.new(...) end, tensor = tensor })
