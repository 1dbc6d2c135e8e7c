--- Tensor and sequence parallelism in Megatron-LM's form (Shoeybi et al. 2019, Korthikanti et al. 2022).
--
--   pmp.dist.init{tp = 2}
--   pmp.manual_seed(1234)
--   local model = pmp.nn.GPTModel(config)     -- every rank builds the whole model with the same seed
--   parallel.tensor_parallel(model, {sequence_parallel = true})
--   local loss = model(ids, targets)           -- the same ids and targets on every rank of the group
--   loss:backward()
--   parallel.finish_grads(model)               -- after the last backward of the step, before the optimizer
--
-- Linear layers split their weights across the 'tp' group, attention keeps whole heads (and whole KV
-- groups) per rank, and the vocabulary is split in rows so no rank ever holds full-vocabulary logits.
-- The collectives sit in autograd functions (the "mappings" below) whose backward issues the
-- conjugate collective. Hidden states are [B, T, H]; with sequence parallelism each rank keeps T/tp of
-- the sequence between the attention and MLP blocks (norms, dropout and residuals run on that slice),
-- gathering the whole sequence before column-parallel layers and reduce-scattering after row-parallel
-- ones.
local tensor = require 'pmp.tensor'
local Module = require 'pmp.nn.module'
local layers = require 'pmp.nn.layers'
local F = require 'pmp.nn.functional'
local autograd = require 'pmp.autograd'
local sharding = require 'pmp.dist.sharding'

local M = {}

local SEQUENCE = 2   -- hidden states are [B, T, H]

local function tp_group(group) return group or require('pmp.dist').group('tp') end

local function shape_string(shape) return '[' .. table.concat(shape, ',') .. ']' end

local function check_sequence(x, group, what)
  local T = x:size(SEQUENCE)
  if T % group.size ~= 0 then
    error(string.format("%s: sequence parallelism needs the sequence length (%d) divisible by the size %d of group '%s'",
      what, T, group.size, group.name), 3)
  end
end

-- This rank's slice of x along dim (a copy of the slice for the backward of a gather).
local function own_slice(x, dim, group)
  local n = x:size(dim) / group.size
  return x:narrow(dim, 1 + group.rank * n, n):contiguous()
end

---------------------------------------------------------------------------------------------------
-- Mappings: autograd functions over the group (default: pmp.dist.group('tp')). Each is the identity
-- on a group of one. The forward works on detached tensors so nothing but the mapping is recorded;
-- gradients reaching a backward may be shared with other nodes, so they are never reduced in place.

-- Forward identity, backward all-reduce: the input of a column-parallel layer.
function M.copy_to_tensor_parallel_region(x, group)
  group = tp_group(group)
  if group.size == 1 then return x end
  return autograd.custom({ x }, x:detach(), function(g) return { group:all_reduce(g:clone()) } end)
end

-- Forward all-reduce, backward identity: the output of a row-parallel layer.
function M.reduce_from_tensor_parallel_region(x, group)
  group = tp_group(group)
  if group.size == 1 then return x end
  return autograd.custom({ x }, group:all_reduce(x:detach():clone()), function(g) return { g } end)
end

-- Forward all-gather along the last dim, backward this rank's slice: ColumnParallelLinear's gather_output.
function M.gather_from_tensor_parallel_region(x, group)
  group = tp_group(group)
  if group.size == 1 then return x end
  return autograd.custom({ x }, group:all_gather(x:detach(), { dim = -1 }), function(g)
    return { own_slice(g, g:dim(), group) }
  end)
end

-- Forward this rank's slice of the last dim, backward all-gather: RowParallelLinear's whole input.
function M.scatter_to_tensor_parallel_region(x, group)
  group = tp_group(group)
  if group.size == 1 then return x end
  local last = x:dim()
  if x:size(last) % group.size ~= 0 then
    error(string.format("scatter_to_tensor_parallel_region: last dim %d is not divisible by the size %d of group '%s'",
      x:size(last), group.size, group.name), 2)
  end
  return autograd.custom({ x }, own_slice(x:detach(), last, group), function(g)
    return { group:all_gather(g, { dim = -1 }) }
  end)
end

-- Forward all-gather along the sequence, backward reduce-scatter: before a column-parallel layer with
-- sequence parallelism (each rank's gradient covers only its vocabulary/heads/ffn slice, so the
-- sequence gradient is summed over the group as well as cut).
function M.gather_from_sequence_parallel_region(x, group)
  group = tp_group(group)
  if group.size == 1 then return x end
  return autograd.custom({ x }, group:all_gather(x:detach(), { dim = SEQUENCE }), function(g)
    return { group:reduce_scatter(g, 'sum', { dim = SEQUENCE }) }
  end)
end

-- Forward reduce-scatter along the sequence, backward all-gather: after a row-parallel layer (and the
-- vocabulary-parallel embedding) with sequence parallelism.
function M.reduce_scatter_to_sequence_parallel_region(x, group)
  group = tp_group(group)
  if group.size == 1 then return x end
  check_sequence(x, group, 'reduce_scatter_to_sequence_parallel_region')
  return autograd.custom({ x }, group:reduce_scatter(x:detach(), 'sum', { dim = SEQUENCE }), function(g)
    return { group:all_gather(g, { dim = SEQUENCE }) }
  end)
end

-- Forward this rank's slice of the sequence, backward all-gather: replicated hidden states entering a
-- sequence-parallel region.
function M.scatter_to_sequence_parallel_region(x, group)
  group = tp_group(group)
  if group.size == 1 then return x end
  check_sequence(x, group, 'scatter_to_sequence_parallel_region')
  return autograd.custom({ x }, own_slice(x:detach(), SEQUENCE, group), function(g)
    return { group:all_gather(g, { dim = SEQUENCE }) }
  end)
end

---------------------------------------------------------------------------------------------------
-- Layers. Built standalone they initialise the whole weight from the shared seed and keep their part
-- (Megatron's CPU initialisation), so the same seed gives the single-process layer's weights;
-- options.weight / options.bias take parts that are already cut instead (no random numbers drawn).

local function parameter(options, key, shape, make)
  local given = options[key]
  if given == nil then return make() end
  if shape_string(given.shape) ~= shape_string(shape) then
    error(string.format('%s: %s must be this rank\'s part %s, got %s', options.what, key, shape_string(shape),
      shape_string(given.shape)), 4)
  end
  return given
end

local function part_size(what, key, size, group)
  if size % group.size ~= 0 then
    error(string.format("%s: %s (%d) is not divisible by the size %d of group '%s'", what, key, size, group.size,
      group.name), 4)
  end
  return size / group.size
end

local function init_part(options, shape, dim, group)
  local full = layers.normal_init(shape, options.init_std or 0.02, options.dtype)
  return own_slice(full:detach(), dim, group):clone():requires_grad_()
end

-- x (whole, or this rank's slice of the sequence with sequence_parallel) -> F.linear with this rank's
-- rows of the weight: [..., out/tp], or [..., out] gathered with options.gather_output.
function M.column_parallel_linear(x, weight, bias, options)
  local group = tp_group(options.group)
  if options.sequence_parallel then
    x = M.gather_from_sequence_parallel_region(x, group)
  else
    x = M.copy_to_tensor_parallel_region(x, group)
  end
  local y = F.linear(x, weight, bias)
  if options.gather_output then y = M.gather_from_tensor_parallel_region(y, group) end
  return y
end

-- weight [out/tp, in], bias [out/tp]. options: bias (true), init_std, dtype, group, gather_output,
-- sequence_parallel (input is a slice of the sequence; incompatible with gather_output), weight, bias.
M.ColumnParallelLinear = Module:extend('ColumnParallelLinear')
function M.ColumnParallelLinear:init(in_features, out_features, options)
  options = options or {}
  local group = tp_group(options.group)
  local what = 'ColumnParallelLinear'
  if options.gather_output and options.sequence_parallel then
    error(what .. ': gather_output and sequence_parallel cannot be combined', 3)
  end
  local local_out = part_size(what, 'out_features', out_features, group)
  self.group = group
  self.in_features, self.out_features = in_features, out_features
  self.gather_output, self.sequence_parallel = options.gather_output or false, options.sequence_parallel or false
  local checked = { weight = options.weight, bias = options.bias, what = what }
  self.weight = parameter(checked, 'weight', { local_out, in_features }, function()
    return init_part(options, { out_features, in_features }, 1, group)
  end)
  if options.bias ~= false then
    self.bias = parameter(checked, 'bias', { local_out }, function()
      return tensor.zeros(local_out, { dtype = options.dtype or 'f32' }):requires_grad_()
    end)
  end
end
function M.ColumnParallelLinear:forward(x) return M.column_parallel_linear(x, self.weight, self.bias, self) end
function M.ColumnParallelLinear:extra_repr()
  return string.format('%d -> %d/%d%s%s%s', self.in_features, self.out_features, self.group.size,
    self.bias and '' or ', no bias', self.gather_output and ', gather output' or '',
    self.sequence_parallel and ', sequence parallel' or '')
end

-- weight [out, in/tp], bias [out] (whole on every rank, added after the reduction). options: bias,
-- init_std, dtype, group, input_is_parallel (x is already [..., in/tp]; else this rank cuts its slice),
-- sequence_parallel (reduce-scatter the output along the sequence instead of all-reducing it).
M.RowParallelLinear = Module:extend('RowParallelLinear')
function M.RowParallelLinear:init(in_features, out_features, options)
  options = options or {}
  local group = tp_group(options.group)
  local what = 'RowParallelLinear'
  if options.sequence_parallel and not options.input_is_parallel then
    error(what .. ': sequence_parallel needs input_is_parallel', 3)
  end
  local local_in = part_size(what, 'in_features', in_features, group)
  self.group = group
  self.in_features, self.out_features = in_features, out_features
  self.input_is_parallel, self.sequence_parallel = options.input_is_parallel or false, options.sequence_parallel or false
  local checked = { weight = options.weight, bias = options.bias, what = what }
  self.weight = parameter(checked, 'weight', { out_features, local_in }, function()
    return init_part(options, { out_features, in_features }, 2, group)
  end)
  if options.bias ~= false then
    self.bias = parameter(checked, 'bias', { out_features }, function()
      return tensor.zeros(out_features, { dtype = options.dtype or 'f32' }):requires_grad_()
    end)
  end
end
function M.RowParallelLinear:forward(x)
  local group = self.group
  if not self.input_is_parallel then x = M.scatter_to_tensor_parallel_region(x, group) end
  local y = x:matmul(self.weight:t())
  if self.sequence_parallel then
    y = M.reduce_scatter_to_sequence_parallel_region(y, group)
  else
    y = M.reduce_from_tensor_parallel_region(y, group)
  end
  if self.bias then y = y + self.bias end
  return y
end
function M.RowParallelLinear:extra_repr()
  return string.format('%d/%d -> %d%s%s', self.in_features, self.group.size, self.out_features,
    self.bias and '' or ', no bias', self.sequence_parallel and ', sequence parallel' or '')
end

-- Rows vocab_start .. vocab_start + num_embeddings/tp - 1 of the (padded) vocabulary, vocab_start =
-- rank * num_embeddings/tp. Ids held by another rank give zero rows here; the sum over the group (an
-- all-reduce, or a reduce-scatter along the sequence with sequence_parallel) is the whole lookup.
-- options: init_std, dtype, group, sequence_parallel, weight.
M.VocabParallelEmbedding = Module:extend('VocabParallelEmbedding')
function M.VocabParallelEmbedding:init(num_embeddings, dim, options)
  options = options or {}
  local group = tp_group(options.group)
  local rows = part_size('VocabParallelEmbedding', 'num_embeddings', num_embeddings, group)
  self.group = group
  self.num_embeddings, self.dim = num_embeddings, dim
  self.vocab_start = group.rank * rows
  self.sequence_parallel = options.sequence_parallel or false
  self.weight = parameter({ weight = options.weight, what = 'VocabParallelEmbedding' }, 'weight', { rows, dim }, function()
    return init_part(options, { num_embeddings, dim }, 1, group)
  end)
end
function M.VocabParallelEmbedding:forward(ids)
  local group = self.group
  if group.size == 1 then return F.embedding(ids, self.weight) end
  if ids:numel() > 0 then
    local lowest, highest = ids:min():item(), ids:max():item()
    if lowest < 0 or highest >= self.num_embeddings then
      error(string.format('VocabParallelEmbedding: token id %d is out of range for a vocabulary of %d',
        lowest < 0 and lowest or highest, self.num_embeddings), 2)
    end
  end
  local start, rows = self.vocab_start, self.weight:size(1)
  local mine = ids:ge(start):logical_and(ids:lt(start + rows))
  local shape = ids.shape
  shape[#shape + 1] = self.dim
  local looked_up = self.weight:index_select(1, tensor.where(mine, ids - start, 0):reshape(-1)):view(shape)
  local partial = looked_up * mine:unsqueeze(-1):to(looked_up.dtype)
  if self.sequence_parallel then return M.reduce_scatter_to_sequence_parallel_region(partial, group) end
  return M.reduce_from_tensor_parallel_region(partial, group)
end
function M.VocabParallelEmbedding:extra_repr()
  return string.format('%d/%d x %d%s', self.num_embeddings, self.group.size, self.dim,
    self.sequence_parallel and ', sequence parallel' or '')
end

---------------------------------------------------------------------------------------------------
-- Cross-entropy over vocabulary-parallel logits.

-- logits [..., V/tp] (this rank's columns), targets [...] (0-based global class ids, the same on every
-- rank). options: group, ignore_index (-100), reduction ('mean' over the targets that are not ignored,
-- 'sum' or 'none', as F.cross_entropy), vocab_start (the global id of this rank's first column; default
-- rank * V/tp), vocab_size (columns from this global id on are vocabulary padding and never get any
-- probability; default: none). Two all-reduces over the group, the row maxima and then the sums of
-- exponentials together with the targets' logits, and no rank ever holds a whole row of logits. The
-- gradient is softmax - onehot on this rank's columns.
function M.vocab_parallel_cross_entropy(logits, targets, options)
  options = options or {}
  local group = tp_group(options.group)
  local ignore_index = options.ignore_index or -100
  local reduction = options.reduction or 'mean'
  if reduction ~= 'mean' and reduction ~= 'sum' and reduction ~= 'none' then
    error("vocab_parallel_cross_entropy: reduction must be 'mean', 'sum' or 'none', got " .. tostring(reduction), 2)
  end
  local expected = logits.shape
  local columns = table.remove(expected)
  if shape_string(targets.shape) ~= shape_string(expected) then
    error(string.format('vocab_parallel_cross_entropy: targets of shape %s do not match logits of shape %s',
      shape_string(targets.shape), shape_string(logits.shape)), 2)
  end
  local vocab_start = options.vocab_start or group.rank * columns
  local vocab_size = options.vocab_size or columns * group.size
  local t = targets:reshape(-1)
  local counted = t:ne(ignore_index)
  local out_of_range = counted:logical_and(t:lt(0):logical_or(t:ge(vocab_size)))
  if out_of_range:any() then
    local bad = tensor.where(out_of_range, t, 0)
    local value = bad:min():item() < 0 and bad:min():item() or bad:max():item()
    error(string.format('vocab_parallel_cross_entropy: target %d is out of range for a vocabulary of %d', value,
      vocab_size), 2)
  end

  local x = logits:detach():reshape(-1, columns):float()
  if vocab_start + columns > vocab_size then
    local padding = tensor.arange(vocab_start, vocab_start + columns):ge(vocab_size)
    x = tensor.where(padding, -math.huge, x)
  end
  local max = x:max(2, true)
  group:all_reduce(max, 'max')
  local shifted = x - max
  local exp = shifted:exp()
  local mine = counted:logical_and(t:ge(vocab_start)):logical_and(t:lt(vocab_start + columns))
  local index = tensor.where(mine, t - vocab_start, 0):unsqueeze(2)
  local target_logit = tensor.where(mine:unsqueeze(2), shifted:gather(2, index), 0)
  -- one reduction for both sums: [sum of exp(x - max), logit of the target - max]
  local sums = group:all_reduce(tensor.cat({ exp:sum(2, true), target_logit }, 2))
  local sum_exp = sums:narrow(2, 1, 1)
  local losses = tensor.where(counted, (sum_exp:log() - sums:narrow(2, 2, 1)):view(-1), 0)
  losses = losses:to(logits.dtype):view(targets.shape)

  losses = autograd.custom({ logits }, losses, function(g)
    local scale = tensor.where(counted, g:reshape(-1):float(), 0):unsqueeze(2)
    local grad = (exp / sum_exp) * scale
    grad = grad:scatter_add(2, index, tensor.where(mine:unsqueeze(2), -scale, 0))
    return { grad:to(logits.dtype):view(logits.shape) }
  end)
  if reduction == 'none' then return losses end
  if reduction == 'sum' then return losses:sum() end
  return losses:sum() / counted:sum():item()
end

---------------------------------------------------------------------------------------------------
-- GPTModel

-- The logits or loss of a tensor-parallel GPTModel from its final hidden states (GPTModel:forward calls
-- this). The output projection is column-parallel over the vocabulary (tied: the embedding's part);
-- without targets the logits are gathered and the padding cut, as the single-process model returns.
function M.gpt_output(model, x, targets, options)
  local tp, config = model.tensor_parallel, model.config
  local weight = model.output_layer and model.output_layer.weight or model.embedding.word_embeddings.weight
  if config.norm_head then weight = F.normalize(weight) end   -- per row, so each rank normalises its own rows
  local logits = M.column_parallel_linear(x, weight, nil, tp)
  if targets == nil then
    logits = M.gather_from_tensor_parallel_region(logits, tp.group)
    if config.padded_vocab_size ~= config.vocab_size then logits = logits:narrow(-1, 1, config.vocab_size) end
    return logits
  end
  -- an f16 loss overflows under --fp16's loss scaling: Megatron takes the loss of f32 logits
  if logits.dtype == 'f16' then logits = logits:float() end
  return M.vocab_parallel_cross_entropy(logits, targets, { group = tp.group, vocab_size = config.vocab_size,
    ignore_index = options and options.ignore_index, reduction = options and options.reduction })
end

-- Turns a GPTModel (or a pipeline stage of one) that every rank of the group built whole, with the same
-- seed, into this rank's tensor-parallel part, in place, and returns it. options: group (default
-- pmp.dist.group('tp')), sequence_parallel. Parameter names do not change, so model:state_dict() is
-- this rank's Megatron checkpoint shard (pmp.dist.sharding's rules cut every weight). On a group of one
-- the model is returned untouched (Megatron, too, turns sequence parallelism off at TP=1).
-- options.unfilled: the model's weights are not read (a model built uninitialized that a checkpoint
-- fills next, pmp.models.from_pretrained's split): the parts are left uninitialized too.
-- After each step's backward, call finish_grads(model).
function M.tensor_parallel(model, options)
  options = options or {}
  local group = tp_group(options.group)
  if group.size == 1 then return model end
  if model.tensor_parallel then error('tensor_parallel: the model is already tensor parallel', 2) end
  local config = model.config
  local ok, problem = pcall(sharding.check_config, config, group.size)
  if not ok then error(string.format("tensor_parallel (group '%s'): %s", group.name, problem), 2) end
  local sp = options.sequence_parallel or false
  local tp, rank = group.size, group.rank
  -- a fresh copy: a narrowed view would keep the whole weight alive
  local function cut(name, p)
    if options.unfilled then
      return tensor.empty(sharding.shard_shape(name, p.shape, config, tp), { dtype = p.dtype }):requires_grad_()
    end
    return sharding.shard(name, p:detach(), config, tp, rank):clone():requires_grad_()
  end
  local function column(linear, name)
    return M.ColumnParallelLinear(linear.in_features, linear.out_features, { group = group, sequence_parallel = sp,
      weight = cut(name .. '.weight', linear.weight), bias = linear.bias and cut(name .. '.bias', linear.bias) or false })
  end
  local function row(linear, name)
    return M.RowParallelLinear(linear.in_features, linear.out_features, { group = group, sequence_parallel = sp,
      input_is_parallel = true, weight = cut(name .. '.weight', linear.weight), bias = linear.bias or false })
  end

  if model.embedding then
    local embedding = model.embedding.word_embeddings
    model.embedding.word_embeddings = M.VocabParallelEmbedding(embedding.num_embeddings, embedding.dim, { group = group,
      sequence_parallel = sp, weight = cut('embedding.word_embeddings.weight', embedding.weight) })
  end
  for k, layer in ipairs(model.decoder.layers.items) do
    local prefix = 'decoder.layers.' .. (k - 1) .. '.'
    local attention, mlp = layer.self_attention, layer.mlp
    -- a MoE layer stays whole on every rank (pmp.dist.sharding, Megatron's expert-tensor-parallel size
    -- 1), seeing every token of the sequence, or with sequence parallelism its rank's slice of it, which
    -- it routes and dispatches by itself as Megatron-Core does (no gather along the sequence); the
    -- replicated weights' gradients are then summed over the group by finish_grads
    local moe = mlp.router ~= nil
    if moe and sp then rawset(mlp, 'sequence_parallel', { group = group }) end
    if not moe and not mlp.linear_fc1 then
      error(string.format('tensor_parallel: layer %d has no mlp.linear_fc1 (only dense MLPs are split)', k - 1), 2)
    end
    local name = prefix .. 'self_attention.'
    if config.multi_latent_attention then   -- pmp.nn.mla: the down-projections stay whole
      for _, up in ipairs({ 'linear_q_proj', 'linear_q_up_proj', 'linear_kv_up_proj' }) do
        if attention[up] then attention[up] = column(attention[up], name .. up) end
      end
      rawset(attention, 'tensor_parallel', { group = group, sequence_parallel = sp })
    else
      attention.linear_qkv = column(attention.linear_qkv, name .. 'linear_qkv')
      attention.num_query_groups = attention.num_query_groups / tp
    end
    attention.linear_proj = row(attention.linear_proj, name .. 'linear_proj')
    attention.num_heads = attention.num_heads / tp
    if attention.alibi_slopes then   -- this rank's heads, as linear_qkv's rows hold them
      rawset(attention, 'alibi_slopes', attention.alibi_slopes:narrow(1, 1 + rank * attention.num_heads, attention.num_heads):contiguous())
    end
    if not moe then
      mlp.linear_fc1 = column(mlp.linear_fc1, prefix .. 'mlp.linear_fc1')
      mlp.linear_fc2 = row(mlp.linear_fc2, prefix .. 'mlp.linear_fc2')
    end
  end
  if model.output_layer then model.output_layer = column(model.output_layer, 'output_layer') end
  model.tensor_parallel = { group = group, sequence_parallel = sp }
  return model
end

-- Context parallelism (pmp.nn.context_parallel, a concept of its own) converts a model the same way:
-- parallel.context_parallel(model, {group = pmp.dist.group('cp')}), before or after tensor_parallel.
M.context_parallel = require('pmp.nn.context_parallel').context_parallel

-- Sums over the tensor-parallel group the gradients that each rank holds only part of: with sequence
-- parallelism every replicated parameter (norms, row-parallel biases: each rank saw its slice of the
-- sequence), and always q_layernorm/k_layernorm (each rank saw its heads). Call it once per step, after
-- the last backward and before clipping or the optimizer; a no-op on a model that is not tensor
-- parallel. One all-reduce over all these gradients together.
function M.finish_grads(model)
  local tp = model.tensor_parallel
  if not tp then return end
  local grads, flat = {}, {}
  for _, pair in ipairs(model:named_parameters()) do
    local name, p = pair[1], pair[2]
    -- (multi-latent attention's q_layernorm normalises the whole low-rank query, before the heads split)
    local per_head_norm = name:match('[qk]_layernorm%.') and not model.config.multi_latent_attention
    local partial = sharding.rule(name, model.config) == nil and (tp.sequence_parallel or per_head_norm)
    local g = partial and p.grad
    if g then
      grads[#grads + 1] = g
      flat[#flat + 1] = g:reshape(-1)
    end
  end
  if #grads == 0 then return end
  local summed = tp.group:all_reduce(tensor.cat(flat, 1))
  local offset = 0
  for _, g in ipairs(grads) do
    local n = g:numel()
    g:copy_(summed:narrow(1, offset + 1, n):view(g.shape))
    offset = offset + n
  end
end

return M
