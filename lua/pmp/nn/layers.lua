-- Basic layers: Linear, Embedding, RMSNorm, LayerNorm, Dropout, ModuleList.
local tensor = require 'pmp.tensor'
local Module = require 'pmp.nn.module'
local F = require 'pmp.nn.functional'

local M = {}

-- Megatron initializes weights from N(0, init_std^2) with init_std = 0.02 by default. init = false
-- leaves them uninitialized, for a model that a checkpoint fills next (no random values thrown away).
local function normal(shape, std, dtype, init)
  if init == false then return tensor.empty(shape, { dtype = dtype or 'f32' }):requires_grad_() end
  return (tensor.randn(shape, { dtype = 'f32' }) * std):to(dtype or 'f32'):requires_grad_()
end
M.normal_init = normal

--- Linear(in_features, out_features, options): y = x weight^T + bias.
--- weight [out, in] (and bias [out]); options: bias (true), init_std (0.02), dtype ('f32'), init (false:
--- the weight is left uninitialized, for loading).
M.Linear = Module:extend('Linear')
function M.Linear:init(in_features, out_features, options)
  options = options or {}
  self.in_features, self.out_features = in_features, out_features
  self.weight = normal({ out_features, in_features }, options.init_std or 0.02, options.dtype, options.init)
  if options.bias ~= false then self.bias = tensor.zeros(out_features, { dtype = options.dtype or 'f32' }):requires_grad_() end
end
function M.Linear:forward(x) return F.linear(x, self.weight, self.bias) end
function M.Linear:extra_repr()
  return string.format('%d -> %d%s', self.in_features, self.out_features, self.bias and '' or ', no bias')
end

--- Embedding(num_embeddings, dim, {init_std = 0.02, dtype = 'f32', init = false (uninitialized)}): rows of weight [num, dim] picked by
--- 0-based ids of any shape.
M.Embedding = Module:extend('Embedding')
function M.Embedding:init(num_embeddings, dim, options)
  options = options or {}
  self.num_embeddings, self.dim = num_embeddings, dim
  self.weight = normal({ num_embeddings, dim }, options.init_std or 0.02, options.dtype, options.init)
end
function M.Embedding:forward(ids) return F.embedding(ids, self.weight) end
function M.Embedding:extra_repr() return string.format('%d x %d', self.num_embeddings, self.dim) end

--- RMSNorm(dim, {eps = 1e-6, dtype = 'f32'}): x / rms(x) * weight over the last dim.
M.RMSNorm = Module:extend('RMSNorm')
function M.RMSNorm:init(dim, options)
  options = options or {}
  self.dim, self.eps = dim, options.eps or 1e-6
  self.weight = tensor.ones(dim, { dtype = options.dtype or 'f32' }):requires_grad_()
end
function M.RMSNorm:forward(x) return F.rms_norm(x, self.weight, self.eps) end
function M.RMSNorm:extra_repr() return string.format('%d, eps=%g', self.dim, self.eps) end

--- LayerNorm(dim, {eps = 1e-5, bias = true, dtype = 'f32'}): (x - mean) / std * weight + bias over the last dim.
M.LayerNorm = Module:extend('LayerNorm')
function M.LayerNorm:init(dim, options)
  options = options or {}
  self.dim, self.eps = dim, options.eps or 1e-5
  self.weight = tensor.ones(dim, { dtype = options.dtype or 'f32' }):requires_grad_()
  if options.bias ~= false then self.bias = tensor.zeros(dim, { dtype = options.dtype or 'f32' }):requires_grad_() end
end
function M.LayerNorm:forward(x) return F.layer_norm(x, self.weight, self.bias, self.eps) end
function M.LayerNorm:extra_repr() return string.format('%d, eps=%g', self.dim, self.eps) end

--- Dropout(p = 0.5): zeroes elements with probability p while training, scaling the rest by 1/(1-p).
M.Dropout = Module:extend('Dropout')
function M.Dropout:init(p) self.p = p or 0.5 end
function M.Dropout:forward(x) return F.dropout(x, self.p, self.training) end
function M.Dropout:extra_repr() return 'p=' .. self.p end

--- Children named 0, 1, ... as Megatron names its layers; iterate with ipairs(list.items).
M.ModuleList = Module:extend('ModuleList')
function M.ModuleList:init(modules)
  rawset(self, 'items', {})
  for _, m in ipairs(modules or {}) do self:append(m) end
end
function M.ModuleList:append(m)
  self[tostring(#self.items)] = m
  self.items[#self.items + 1] = m
  return self
end
function M.ModuleList:forward() error('ModuleList has no forward; iterate over its items', 2) end
function M.ModuleList:extra_repr() return tostring(#self.items) end

return M
