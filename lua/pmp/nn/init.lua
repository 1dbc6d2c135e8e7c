--- pmp.nn: modules (subclass nn.Module in Lua), layers, the GPT model, and the functional ops.
local nn = {
  functional = require 'pmp.nn.functional',
  Module = require 'pmp.nn.module',
  parallel = require 'pmp.nn.parallel',
  context_parallel = require 'pmp.nn.context_parallel',
  moe = require 'pmp.nn.moe',
  expert_parallel = require 'pmp.nn.expert_parallel',
}
for name, layer in pairs(require 'pmp.nn.layers') do nn[name] = layer end
for name, layer in pairs(require 'pmp.nn.transformer') do nn[name] = layer end
return nn
