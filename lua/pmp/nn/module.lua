--- nn.Module: the base class of layers and models. Subclass it in plain Lua:
---
---   local MLP = nn.Module:extend('MLP')
---   function MLP:init(dim) self.fc = nn.Linear(dim, dim) end
---   function MLP:forward(x) return self.fc(x):relu() end
---   local m = MLP(16); m(x); m:named_parameters()
--
-- Assigning a tensor that requires grad to a field registers a parameter, assigning a module registers
-- a child; both keep their assignment order, so parameter names are stable and Megatron-shaped
-- (decoder.layers.0.self_attention.linear_qkv.weight).
local tensor = require 'pmp.tensor'
local is_tensor = tensor.is_tensor

local Module = { __name = 'Module' }

local function is_module(x) return type(x) == 'table' and rawget(x, '_parameters') ~= nil end
Module.is_module = is_module

local instance_index = function(self, key)
  local params = rawget(self, '_parameters')
  local p = params.values[key]
  if p ~= nil then return p end
  local m = rawget(self, '_modules').values[key]
  if m ~= nil then return m end
  local b = rawget(self, '_buffers').values[key]
  if b ~= nil then return b end
  return getmetatable(self).__class[key]
end

local function ordered_set(set, key, value)
  if set.values[key] == nil then set.names[#set.names + 1] = key end
  set.values[key] = value
end

local function ordered_remove(set, key)
  if set.values[key] == nil then return end
  set.values[key] = nil
  for k, name in ipairs(set.names) do
    if name == key then table.remove(set.names, k) break end
  end
end

local instance_newindex = function(self, key, value)
  local params, modules = rawget(self, '_parameters'), rawget(self, '_modules')
  if is_tensor(value) and value.requires_grad and value.is_leaf then
    ordered_remove(modules, key)
    ordered_set(params, key, value)
  elseif is_module(value) then
    ordered_remove(params, key)
    ordered_set(modules, key, value)
  elseif value == nil and (params.values[key] ~= nil or modules.values[key] ~= nil) then
    ordered_remove(params, key)
    ordered_remove(modules, key)
  else
    rawset(self, key, value)
  end
end

-- Creates a subclass; instances are made by calling the class: Class(...) runs Class:init(...).
-- Parameters, children, buffers and methods: what the REPL completes after `m.` or `m:`.
local function member_names(m)
  local names = {}
  for _, set in ipairs({ rawget(m, '_parameters'), rawget(m, '_modules'), rawget(m, '_buffers') }) do
    for _, name in ipairs(set.names) do names[#names + 1] = name end
  end
  local class = getmetatable(m).__class
  while class do
    for name, value in pairs(class) do
      if type(value) == 'function' and not name:match('^_') then names[#names + 1] = name end
    end
    class = rawget(class, '__super')
  end
  return names
end

local function instance_metatable(class)
  return {
    __index = instance_index,
    __newindex = instance_newindex,
    __call = function(m, ...) return m:forward(...) end,
    __tostring = function(m) return m:tree() end,
    __pmp_members = member_names,
    __class = class,
  }
end

--- Module:extend(name) -> a subclass; define Class:init(...) and Class:forward(...), build with Class(...).
function Module:extend(name)
  local class = setmetatable({ __name = name or 'Module', __super = self }, { __index = self, __call = function(c, ...) return c:new(...) end })
  class.__instance_mt = instance_metatable(class)
  return class
end

function Module:new(...)
  local instance = {
    _parameters = { names = {}, values = {} },
    _modules = { names = {}, values = {} },
    _buffers = { names = {}, values = {}, persistent = {} },
    training = true,
  }
  setmetatable(instance, self.__instance_mt)
  instance:init(...)
  return instance
end

function Module:init() end

--- m:forward(...), also m(...): the module's computation; subclasses define it.
function Module:forward()
  error(self.__name .. ':forward is not implemented', 2)
end

--- A non-trainable tensor that moves with the module; persistent buffers are part of state_dict.
function Module:register_buffer(name, value, persistent)
  local buffers = rawget(self, '_buffers')
  ordered_set(buffers, name, value)
  buffers.persistent[name] = persistent ~= false
end

--- The direct child modules, in assignment order.
function Module:children()
  local out = {}
  for _, name in ipairs(self._modules.names) do out[#out + 1] = self._modules.values[name] end
  return out
end

--- {name, module} of the direct children, in assignment order.
function Module:named_children()
  local out = {}
  for _, name in ipairs(self._modules.names) do out[#out + 1] = { name, self._modules.values[name] } end
  return out
end

--- Depth-first list of {name, tensor} with dotted names.
function Module:named_parameters(prefix, out)
  out = out or {}
  prefix = prefix or ''
  for _, name in ipairs(self._parameters.names) do out[#out + 1] = { prefix .. name, self._parameters.values[name] } end
  for _, name in ipairs(self._modules.names) do self._modules.values[name]:named_parameters(prefix .. name .. '.', out) end
  return out
end

--- Every parameter below the module, depth-first (the order of named_parameters).
function Module:parameters()
  local out = {}
  for k, pair in ipairs(self:named_parameters()) do out[k] = pair[2] end
  return out
end

--- The number of parameter elements below the module.
function Module:num_parameters()
  local n = 0
  for _, p in ipairs(self:parameters()) do n = n + p:numel() end
  return n
end

--- name -> tensor of parameters and persistent buffers. Tensors are shared, not copied.
function Module:state_dict(prefix, out)
  out = out or {}
  prefix = prefix or ''
  for _, name in ipairs(self._parameters.names) do out[prefix .. name] = self._parameters.values[name] end
  for _, name in ipairs(self._buffers.names) do
    if self._buffers.persistent[name] then out[prefix .. name] = self._buffers.values[name] end
  end
  for _, name in ipairs(self._modules.names) do self._modules.values[name]:state_dict(prefix .. name .. '.', out) end
  return out
end

local function shape_string(shape) return '[' .. table.concat(shape, ',') .. ']' end

--- Copies values in (dtype converted). strict (default) fails on missing or unexpected keys; a shape
--- mismatch always fails. The error lists every offending key.
function Module:load_state_dict(sd, options)
  local strict = not (options and options.strict == false)
  local own = self:state_dict()
  local missing, unexpected, misshaped = {}, {}, {}
  for name, t in pairs(own) do
    local given = sd[name]
    if given == nil then
      missing[#missing + 1] = name
    elseif shape_string(given.shape) ~= shape_string(t.shape) then
      misshaped[#misshaped + 1] = string.format('%s (checkpoint %s, model %s)', name, shape_string(given.shape), shape_string(t.shape))
    end
  end
  for name in pairs(sd) do
    if own[name] == nil then unexpected[#unexpected + 1] = name end
  end
  table.sort(missing)
  table.sort(unexpected)
  table.sort(misshaped)
  local problems = {}
  if strict and #missing > 0 then problems[#problems + 1] = 'missing keys: ' .. table.concat(missing, ', ') end
  if strict and #unexpected > 0 then problems[#problems + 1] = 'unexpected keys: ' .. table.concat(unexpected, ', ') end
  if #misshaped > 0 then problems[#problems + 1] = 'mis-shaped keys: ' .. table.concat(misshaped, ', ') end
  if #problems > 0 then error('load_state_dict: ' .. table.concat(problems, '; '), 2) end
  require('pmp').no_grad(function()
    for name, t in pairs(own) do
      if sd[name] ~= nil then t:copy_(sd[name]) end
    end
  end)
  return { missing = missing, unexpected = unexpected }
end

--- Calls fn(m) on every module below, children first; returns self.
function Module:apply(fn)
  for _, child in ipairs(self:children()) do child:apply(fn) end
  fn(self)
  return self
end

--- Sets training mode (true by default) on the module and its children: dropout is on; returns self.
function Module:train(mode)
  if mode == nil then mode = true end
  return self:apply(function(m) rawset(m, 'training', mode) end)
end

--- Sets evaluation mode (training = false) everywhere below; returns self.
function Module:eval() return self:train(false) end

--- Drops the .grad of every parameter.
function Module:zero_grad()
  for _, p in ipairs(self:parameters()) do p.grad = nil end
end

--- Casts every parameter and buffer to dtype (new leaves; optimizers must be created afterwards).
function Module:to(dtype)
  self:apply(function(m)
    for _, name in ipairs(m._parameters.names) do
      m._parameters.values[name] = m._parameters.values[name]:detach():to(dtype):contiguous():requires_grad_()
    end
    for _, name in ipairs(m._buffers.names) do
      local b = m._buffers.values[name]
      if b:is_floating_point() then m._buffers.values[name] = b:to(dtype) end
    end
  end)
  return self
end

local function human(n)
  if n >= 1e9 then return string.format('%.2fB', n / 1e9) end
  if n >= 1e6 then return string.format('%.2fM', n / 1e6) end
  if n >= 1e3 then return string.format('%.1fK', n / 1e3) end
  return tostring(n)
end

-- A readable tree: each module with its extra description and parameter count.
function Module:extra_repr() return '' end

--- The text printing a module shows: each module, its parameters with dtype and shape, and counts.
function Module:tree(indent)
  indent = indent or ''
  local extra = self:extra_repr()
  local head = string.format('%s(%s) %s params', self.__name, extra, human(self:num_parameters()))
  local lines = { head }
  for _, name in ipairs(self._parameters.names) do
    local p = self._parameters.values[name]
    lines[#lines + 1] = string.format('%s  %s: %s %s', indent, name, p.dtype, shape_string(p.shape))
  end
  for _, pair in ipairs(self:named_children()) do
    lines[#lines + 1] = string.format('%s  (%s): %s', indent, pair[1], pair[2]:tree(indent .. '  '))
  end
  return table.concat(lines, '\n')
end

Module.__instance_mt = instance_metatable(Module)

return setmetatable(Module, { __call = function(c, ...) return c:new(...) end })
