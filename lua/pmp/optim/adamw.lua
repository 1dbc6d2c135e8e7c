--- AdamW with decoupled weight decay (PyTorch's formula), one fused pass per parameter.
-- Parameters in bf16/f16 keep an f32 master copy; the moments are f32 as well.
local C = require('pmp.ffi').C
local tensor = require 'pmp.tensor'

--- AdamW(params, options): the optimizer; opt:zero_grad(), loss:backward(), opt:step(); opt.lr may change.
local AdamW = {}
AdamW.__index = AdamW

--- params: a list of tensors, or of groups {params = {...}, weight_decay = ..., lr_scale = ...}.
--- options: lr (1e-3), betas ({0.9, 0.999}), eps (1e-8), weight_decay (0.01).
function AdamW.new(params, options)
  options = options or {}
  local self = setmetatable({
    lr = options.lr or 1e-3,
    betas = options.betas or { 0.9, 0.999 },
    eps = options.eps or 1e-8,
    weight_decay = options.weight_decay or 0.01,
    groups = {},
    state = {},   -- per parameter: {step, exp_avg, exp_avg_sq, master}
  }, AdamW)
  local plain = {}
  for _, entry in ipairs(params) do
    if tensor.is_tensor(entry) then plain[#plain + 1] = entry else self.groups[#self.groups + 1] = entry end
  end
  if #plain > 0 then table.insert(self.groups, 1, { params = plain }) end
  for _, group in ipairs(self.groups) do
    for _, p in ipairs(group.params) do
      local low_precision = p.dtype == 'bf16' or p.dtype == 'f16'
      local state_dtype = low_precision and 'f32' or p.dtype
      self.state[#self.state + 1] = {
        param = p,
        step = 0,
        exp_avg = tensor.zeros(p.shape, { dtype = state_dtype }),
        exp_avg_sq = tensor.zeros(p.shape, { dtype = state_dtype }),
        master = low_precision and p:detach():float():contiguous() or nil,
        group = group,
      }
    end
  end
  return self
end

local function check(rc)
  if rc ~= 0 then error(require('ffi').string(C.pmp_last_error()), 3) end
end

--- One update from the parameters' current .grad (parameters without a gradient are skipped).
-- The gradient is read from the engine's tensor rather than through t.grad and t:contiguous(), which
-- would make two tensor handles per parameter per step for the collector to finalize.
function AdamW:step()
  local b1, b2 = self.betas[1], self.betas[2]
  for _, s in ipairs(self.state) do
    local param = s.param.ptr
    local grad = param.grad_acc
    if grad ~= nil then
      s.step = s.step + 1
      local group = s.group
      local lr = self.lr * (group.lr_scale or 1)
      local wd = group.weight_decay or self.weight_decay
      local dense   -- keeps a contiguous copy of a strided gradient alive through the call
      if C.pmp_is_contiguous(grad) == 0 then
        dense = tensor.wrap(C.pmp_contiguous(grad))
        grad = dense.ptr
      end
      check(C.pmp_adamw_step_(param, grad, s.exp_avg.ptr, s.exp_avg_sq.ptr,
        s.master and s.master.ptr or nil, lr, b1, b2, self.eps, wd, s.step))
    end
  end
end

--- Makes the f32 master weights of bf16/f16 parameters the parameters' values: after weights were
--- loaded into the model without the optimizer state that holds their masters.
function AdamW:refresh_master()
  for _, s in ipairs(self.state) do
    if s.master then s.master:copy_(s.param:detach()) end
  end
end

--- Drops the .grad of every parameter.
function AdamW:zero_grad()
  for _, s in ipairs(self.state) do s.param.grad = nil end
end

--- The state as tensors and numbers, in parameter order, for checkpoints.
function AdamW:state_dict()
  local out = { lr = self.lr, betas = { self.betas[1], self.betas[2] }, eps = self.eps,
    weight_decay = self.weight_decay, state = {} }
  for k, s in ipairs(self.state) do
    out.state[k] = { step = s.step, exp_avg = s.exp_avg, exp_avg_sq = s.exp_avg_sq, master = s.master }
  end
  return out
end

--- Restores what state_dict returned (same parameters in the same order).
function AdamW:load_state_dict(sd)
  if #sd.state ~= #self.state then
    error(string.format('AdamW.load_state_dict: %d parameter states given, the optimizer has %d', #sd.state, #self.state), 2)
  end
  self.lr, self.eps, self.weight_decay = sd.lr, sd.eps, sd.weight_decay
  self.betas = { sd.betas[1], sd.betas[2] }
  for k, s in ipairs(self.state) do
    local saved = sd.state[k]
    s.step = saved.step
    s.exp_avg:copy_(saved.exp_avg)
    s.exp_avg_sq:copy_(saved.exp_avg_sq)
    if s.master then
      if not saved.master then error('AdamW.load_state_dict: master weights missing for parameter ' .. k, 2) end
      s.master:copy_(saved.master)
    end
  end
end

return setmetatable(AdamW, { __call = function(_, ...) return AdamW.new(...) end })
