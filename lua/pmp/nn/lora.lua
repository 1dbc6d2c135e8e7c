--- Low-rank adapters (LoRA, Hu et al. 2021) on linear layers whose weights stay frozen:
---   y = x W^T + b + scaling * dropout(x) A^T B^T,   A [rank, in], B [out, rank], scaling = alpha / rank
---   (alpha / sqrt(rank) with rslora), A ~ U(-1/sqrt(in), 1/sqrt(in)) and B = 0 as PEFT initialises them.
--- A fused layer (Megatron's linear_qkv = q, k, v rows grouped per KV head; linear_fc1 = [gate; up])
--- carries one adapter per piece, each with the shape of the unfused layer it stands for, so the
--- adapters are those of the unfused model (see pmp.models.peft for the names).
---
---   lora.attach(linear, {pieces = {{name = 'q_proj', out = n, adapt = true}, ...}, pack = 'qkv', rank = 8,
---     alpha = 16, per_group = 2, kv_channels = 64})
---
--- The frozen weight and bias become non-persistent buffers (lora.freeze): they leave the module's
--- parameters and its state_dict, so optimizers, data-parallel buckets, gradient norms and checkpoints
--- see the adapters only. Works on Linear and on pmp.nn.parallel's Column/RowParallelLinear: a
--- column-parallel layer's adapters keep A whole and split B by rows like the weight; a row-parallel
--- one's split A by columns and keep B whole; the collective that makes the low-rank activations whole sits between A and B,
--- so every replicated factor gets a whole gradient (sequence parallelism: a slice of it, which
--- pmp.nn.parallel.finish_grads sums like the norms').
local tensor = require 'pmp.tensor'
local Module = require 'pmp.nn.module'
local F = require 'pmp.nn.functional'
local autograd = require 'pmp.autograd'

local M = {}

--- PEFT's initial A [rank, in_features] (kaiming-uniform with a = sqrt(5)), in dtype.
function M.initial_A(rank, in_features, dtype)
  return ((tensor.rand({ rank, in_features }, { dtype = 'f32' }) * 2 - 1) / math.sqrt(in_features)):to(dtype or 'f32')
end

--- LoRA(in_features, out_features, {rank, alpha, dropout (0), rslora, dtype, A, B}): one adapter; A
--- and B given take the place of the initial values (already this rank's parts under tensor
--- parallelism). forward(x) -> the low-rank activations x A^T [..., rank]; up(h) -> scaling * h B^T.
M.LoRA = Module:extend('LoRA')
function M.LoRA:init(in_features, out_features, options)
  local rank = options.rank
  self.rank, self.dropout = rank, options.dropout or 0
  self.scaling = options.alpha / (options.rslora and math.sqrt(rank) or rank)
  local dtype = options.dtype or 'f32'
  self.A = (options.A or M.initial_A(rank, in_features, dtype)):requires_grad_()
  self.B = (options.B or tensor.zeros({ out_features, rank }, { dtype = dtype })):requires_grad_()
end
function M.LoRA:forward(x) return F.dropout(x, self.dropout, self.training):matmul(self.A:t()) end
-- (scaled before B: what the product keeps for backward is then [..., rank], not [..., out])
function M.LoRA:up(h) return (h * self.scaling):matmul(self.B:t()) end
--- scaling * B A: what the adapter adds to the weight [out, in].
function M.LoRA:delta() return self.B:detach():matmul(self.A:detach()) * self.scaling end
function M.LoRA:extra_repr()
  return string.format('rank=%d, scaling=%g%s', self.rank, self.scaling, self.dropout > 0 and ', dropout=' .. self.dropout or '')
end

-- The pieces' outputs [..., out_i] (nil: a piece without an adapter, zeros) put together along the last
-- dim in the fused layer's row order. qkv: per KV group, its q heads then k then v (pieces q, k, v with
-- per_group, 1, 1 heads of kv_channels rows per group).
local function assemble(layer, outputs, total)
  local pieces = layer.pieces
  local sample
  for i = 1, #pieces do sample = sample or outputs[i] end
  local lead = sample.shape
  lead[#lead] = nil
  local function zeros(n)
    local shape = { unpack(lead) }
    shape[#shape + 1] = n
    return tensor.zeros(shape, { dtype = sample.dtype })
  end
  if layer.pack ~= 'qkv' then
    local parts = {}
    for i, piece in ipairs(pieces) do parts[i] = outputs[i] or zeros(piece.out) end
    return #parts == 1 and parts[1] or tensor.cat(parts, #lead + 1)
  end
  local d, counts = layer.kv_channels, { layer.per_group, 1, 1 }
  local groups = total / ((layer.per_group + 2) * d)
  local parts = {}
  for i = 1, 3 do
    local shape = { unpack(lead) }
    shape[#shape + 1], shape[#shape + 2], shape[#shape + 3] = groups, counts[i], d
    parts[i] = (outputs[i] or zeros(groups * counts[i] * d)):view(shape)
  end
  local flat = { unpack(lead) }
  flat[#flat + 1] = total
  return tensor.cat(parts, #lead + 2):reshape(flat)
end

-- The low-rank activations of every adapter of the layer, each passed through `region` (a collective
-- of pmp.nn.parallel, or nil), and their sum as the layer's output rows.
local function adapters_output(layer, x, region, total)
  local outputs, any = {}, false
  for i, piece in ipairs(layer.pieces) do
    local adapter = layer.lora[piece.name]
    if adapter then
      local h = adapter(x)
      if region then h = region(h, layer.group) end
      outputs[i] = adapter:up(h)
      any = true
    end
  end
  if not any then return nil end
  return assemble(layer, outputs, total)
end

-- y + delta, through a node that keeps neither operand for backward (the engine's add keeps both: two
-- [..., out] activations per adapted layer that its gradient never reads).
local function plus(y, delta)
  if not delta then return y end
  return autograd.custom({ y, delta }, y:detach() + delta:detach(), function(g) return { g, g } end)
end

-- The forwards of adapted layers, one per kind of linear layer (the base computation as the layer's own
-- forward does it, with the adapters' rows added before any reduction of the output).
local FORWARDS = {}
function FORWARDS.Linear(layer, x)
  return plus(F.linear(x, layer.weight, layer.bias), adapters_output(layer, x, nil, layer.weight:size(1)))
end
function FORWARDS.ColumnParallelLinear(layer, x)
  local parallel = require 'pmp.nn.parallel'
  local region = layer.sequence_parallel and parallel.gather_from_sequence_parallel_region or parallel.copy_to_tensor_parallel_region
  local whole = region(x, layer.group)
  local y = plus(F.linear(whole, layer.weight, layer.bias), adapters_output(layer, x, region, layer.weight:size(1)))
  if layer.gather_output then y = parallel.gather_from_tensor_parallel_region(y, layer.group) end
  return y
end
function FORWARDS.RowParallelLinear(layer, x)
  local parallel = require 'pmp.nn.parallel'
  if not layer.input_is_parallel then x = parallel.scatter_to_tensor_parallel_region(x, layer.group) end
  local reduce = layer.sequence_parallel and parallel.reduce_scatter_to_sequence_parallel_region or parallel.reduce_from_tensor_parallel_region
  local y = plus(reduce(x:matmul(layer.weight:t()), layer.group), adapters_output(layer, x, reduce, layer.weight:size(1)))
  if layer.bias then y = y + layer.bias end
  return y
end

local function move(from, to, name, value)
  from.values[name] = nil
  for k, n in ipairs(from.names) do
    if n == name then table.remove(from.names, k) break end
  end
  to.names[#to.names + 1] = name
  to.values[name] = value
end

--- Turns the module's own parameters (not its children's) into non-persistent buffers holding the same
--- storage without a gradient: they still compute, but leave parameters() and state_dict().
function M.freeze(module)
  local params, buffers = rawget(module, '_parameters'), rawget(module, '_buffers')
  local frozen = rawget(module, 'frozen') or {}
  for _, name in ipairs({ unpack(params.names) }) do
    move(params, buffers, name, params.values[name]:detach())
    buffers.persistent[name] = false
    frozen[#frozen + 1] = name
  end
  rawset(module, 'frozen', frozen)
end

--- Undoes freeze: the frozen tensors are trainable parameters again.
function M.unfreeze(module)
  local params, buffers = rawget(module, '_parameters'), rawget(module, '_buffers')
  for _, name in ipairs(rawget(module, 'frozen') or {}) do
    buffers.persistent[name] = nil
    move(buffers, params, name, buffers.values[name]:requires_grad_())
  end
  rawset(module, 'frozen', nil)
end

--- Whether a linear layer carries adapters (lora.attach).
function M.is_adapted(linear) return rawget(linear, 'pieces') ~= nil end

--- Freezes linear (a Linear, ColumnParallelLinear or RowParallelLinear) and gives it adapters.
--- spec: pieces (the unfused layers in row order: {name, out = their rows on this rank, A, B (optional
--- initial values)}; pieces without `adapt` set get no adapter), pack (nil, 'gate_up' or 'qkv'),
--- per_group and kv_channels (qkv), rank, alpha, dropout, rslora. in_features is the layer's input on
--- this rank. Returns the LoRA modules by piece name.
function M.attach(linear, spec)
  local kind = linear.__name
  if not FORWARDS[kind] then error('lora.attach: cannot adapt a ' .. tostring(kind), 2) end
  if M.is_adapted(linear) then error('lora.attach: the layer already has adapters', 2) end
  M.freeze(linear)
  local dtype = linear.weight.dtype
  local container = Module()
  for _, piece in ipairs(spec.pieces) do
    if piece.adapt then
      container[piece.name] = M.LoRA(linear.weight:size(2), piece.out, { rank = spec.rank, alpha = spec.alpha,
        dropout = spec.dropout, rslora = spec.rslora, dtype = dtype, A = piece.A, B = piece.B })
    end
  end
  linear.lora = container
  rawset(linear, 'pieces', spec.pieces)
  rawset(linear, 'pack', spec.pack)
  rawset(linear, 'per_group', spec.per_group)
  rawset(linear, 'kv_channels', spec.kv_channels)
  rawset(linear, 'forward', FORWARDS[kind])
  return container
end

--- The adapters' contribution to the layer's weight (this rank's part) [out, in], in its row order.
function M.weight_delta(linear)
  local deltas = {}
  for i, piece in ipairs(linear.pieces) do
    local adapter = linear.lora[piece.name]
    -- rows of the delta are outputs: assembled as [in, out] and turned back
    if adapter then deltas[i] = adapter:delta():t() end
  end
  return assemble(linear, deltas, linear.weight:size(1)):t()
end

--- Adds the adapters into the frozen weight and removes them: the layer is a plain trainable layer
--- again (its parameters unfrozen), computing what it computed with them.
function M.merge(linear)
  if not M.is_adapted(linear) then error('lora.merge: the layer has no adapters', 2) end
  require('pmp').no_grad(function()
    local w = linear.weight
    w:copy_(w:float() + M.weight_delta(linear):float())
  end)
  linear.lora = nil
  for _, key in ipairs({ 'pieces', 'pack', 'per_group', 'kv_channels', 'forward' }) do rawset(linear, key, nil) end
  M.unfreeze(linear)
end

return M
