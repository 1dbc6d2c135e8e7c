--- Expert parallelism in Megatron-Core's form: each MoE layer's experts are split over the 'ep' group in
--- consecutive blocks, tokens reach the ranks holding their experts by all-to-all (Megatron's alltoall
--- token dispatcher) and come back the same way; expert gradients are averaged over the ranks that hold
--- the same experts ('edp') instead of the data-parallel group.
---   pmp.dist.init{ep = 2}; local model = pmp.nn.GPTModel(config)      -- the same seed on every rank
---   expert_parallel.expert_parallel(model, {data_size = dp x cp})      -- keeps this rank's experts
---   ... backward ...; expert_parallel.finish_expert_grads(model)     -- pmp.train.step.finish_grads does
local tensor = require 'pmp.tensor'
local autograd = require 'pmp.autograd'
local moe = require 'pmp.nn.moe'

local M = {}

-- All-to-all over the expert-parallel group as an autograd function: rows go to the ranks by
-- send_splits, gradients come back by the same counts the other way.
local function all_to_all(x, group, send_splits, recv_splits)
  local out = group:all_to_all(x:detach(), send_splits, recv_splits)
  return autograd.custom({ x }, out, function(g) return { group:all_to_all(g, recv_splits, send_splits) } end)
end

-- Megatron's alltoall token dispatcher: rows sorted by global expert go to the ranks holding their
-- experts, are regrouped there by local expert (from every source rank in turn), pass through the
-- local experts, and return the same way. counts: this rank's rows per global expert.
function M.dispatch(layer, rows, counts)
  local group = layer.expert_parallel.group
  local P, r = group.size, group.rank
  local E = #counts
  local L = E / P
  local all = group:all_gather(tensor.tensor(counts, { dtype = 'i64' })):totable()   -- [P x E], rank-major
  local function count(source, e) return all[source * E + e + 1] end
  local send, recv = {}, {}
  for j = 1, P do
    send[j], recv[j] = 0, 0
    for l = 0, L - 1 do
      send[j] = send[j] + counts[(j - 1) * L + l + 1]
      recv[j] = recv[j] + count(j - 1, r * L + l)
    end
  end
  local received = all_to_all(rows, group, send, recv)
  -- received: for each source rank, its rows of local expert 0, 1, ...; regroup by local expert
  local offsets, at = {}, 0
  for s = 0, P - 1 do
    offsets[s] = {}
    for l = 0, L - 1 do
      offsets[s][l] = at
      at = at + count(s, r * L + l)
    end
  end
  local order, local_counts = {}, {}
  for l = 0, L - 1 do
    local_counts[l + 1] = 0
    for s = 0, P - 1 do
      local n = count(s, r * L + l)
      for i = 1, n do order[#order + 1] = offsets[s][l] + i - 1 end
      local_counts[l + 1] = local_counts[l + 1] + n
    end
  end
  local inverse = {}
  for position, row in ipairs(order) do inverse[row + 1] = position - 1 end
  local y = received
  if #order > 0 then
    y = layer.experts(received:index_select(1, tensor.tensor(order, { dtype = 'i64' })), local_counts)
    y = y:index_select(1, tensor.tensor(inverse, { dtype = 'i64' }))
  end
  return all_to_all(y, group, recv, send)
end

--- Whether model (a GPTModel or one pipeline stage or chunk of one) holds a MoE layer.
function M.has_moe_layer(model)
  for _, layer in ipairs(model.decoder and model.decoder.layers.items or {}) do
    if layer.mlp.router then return true end
  end
  return false
end

local function is_expert_parameter(name) return name:match('%.mlp%.experts%.') ~= nil end
M.is_expert_parameter = is_expert_parameter

--- Keeps this rank's experts of every MoE layer: the group (default pmp.dist.group('ep')) splits each
--- layer's num_moe_experts into consecutive blocks, rank r holding block r, as Megatron does. Every rank
--- built the whole model from the same seed, so the experts are the single-process model's. A group of
--- one leaves the model as it is. data_size: the data- and context-parallel ranks the expert gradients
--- are averaged over (pmp.dist's dp x cp; default 1), of which the group takes consecutive blocks.
function M.expert_parallel(model, options)
  options = options or {}
  local dist = require 'pmp.dist'
  local group = options.group or dist.group('ep')
  if group.size == 1 then return model end
  local found = false
  for k, layer in ipairs(model.decoder.layers.items) do
    local mlp = layer.mlp
    if mlp.router then
      local E = mlp.config.num_moe_experts
      if E % group.size ~= 0 then
        error(string.format("expert_parallel: layer %d's %d experts are not divisible by the size %d of group '%s'",
          k - 1, E, group.size, group.name), 2)
      end
      local per_rank = E / group.size
      local first = group.rank * per_rank
      local keep = {}
      for e = 1, per_rank do keep[e] = mlp.experts.local_experts.items[first + e] end
      mlp.experts = moe.Experts(mlp.config, first, per_rank, keep)
      rawset(mlp, 'expert_parallel', { group = group })
      found = true
    end
  end
  if not found then error('expert_parallel: the model has no MoE layer (num_moe_experts)', 2) end
  rawset(model, 'expert_parallel', { group = group, data_group = options.data_group or dist.group('edp'),
    data_size = options.data_size or 1 })
  return model
end

--- Leaves the expert gradients of model (if expert parallel) to its DistributedDataParallel, which
--- reduces them over the expert-data-parallel group itself (the distributed optimizer's expert buckets):
--- finish_expert_grads then does nothing.
function M.reduced_elsewhere(model)
  local ep = rawget(model, 'expert_parallel')
  if ep then ep.reduced_elsewhere = true end
end

--- Completes the expert gradients of an expert-parallel model after the step's last backward: each
--- expert's gradient already sums the losses of its expert-parallel group's tokens (the all-to-all's
--- backward); it is summed over the expert-data-parallel ranks holding the same experts and divided
--- by the data-parallel size, which makes it the average the other parameters get from the
--- data-parallel reduction. A no-op on other models.
function M.finish_expert_grads(model)
  local ep = rawget(model, 'expert_parallel')
  if not ep or ep.reduced_elsewhere then return end
  for _, pair in ipairs(model:named_parameters()) do
    local g = pair[2].grad
    if g and is_expert_parameter(pair[1]) then
      if ep.data_group.size > 1 then ep.data_group:all_reduce(g, 'sum') end
      if ep.data_size ~= 1 then g:copy_(g * (1 / ep.data_size)) end
    end
  end
end

return M
