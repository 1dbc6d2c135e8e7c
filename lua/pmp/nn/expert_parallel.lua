--- Expert parallelism in Megatron-Core's form: each MoE layer's experts are split over the 'ep' group in
--- consecutive blocks, tokens reach the ranks holding their experts by all-to-all (Megatron's alltoall
--- token dispatcher) and come back the same way; expert gradients are averaged over the ranks that hold
--- the same experts ('edp') instead of the data-parallel group.
---   pmp.dist.init{ep = 2}; local model = pmp.nn.GPTModel(config)      -- the same seed on every rank
---   expert_parallel.expert_parallel(model, {data_size = dp x cp})      -- keeps this rank's experts
---   ... backward ...; expert_parallel.finish_expert_grads(model)     -- pmp.train.step.finish_grads does
--- The all-to-alls are non-blocking (pmp.dist's async handles); with moe_shared_expert_overlap the shared
--- experts compute while they are in flight. Local experts do not start on the rows this rank routes to
--- itself before the dispatch finishes: their grouped GEMM and its weight gradients would then be split
--- into two sums, whose rounding differs from the blocking path's.
local tensor = require 'pmp.tensor'
local autograd = require 'pmp.autograd'
local moe = require 'pmp.nn.moe'
local clock = require 'pmp.clock'
local C = require('pmp.ffi').C

local M = {}

-- Time callers spent blocked on the token all-to-alls, for M.all_to_all_stats.
local waited = 0

-- Starts an all-to-all of x's rows over group and returns a function that waits for it (timed).
local function start_all_to_all(group, x, send_splits, recv_splits)
  local handle = group:all_to_all(x, send_splits, recv_splits, { async = true })
  return function()
    local start = clock.now()
    local out = handle:wait()
    waited = waited + clock.now() - start
    return out
  end
end

-- All-to-all over the expert-parallel group as an autograd function: rows go to the ranks by
-- send_splits, gradients come back by the same counts the other way.
local function all_to_all(x, group, send_splits, recv_splits)
  local out = start_all_to_all(group, x:detach(), send_splits, recv_splits)()
  return autograd.custom({ x }, out, function(g) return { start_all_to_all(group, g, recv_splits, send_splits)() } end)
end

-- The plan of Megatron's alltoall token dispatcher for one layer: rows sorted by global expert go to
-- the ranks holding their experts (send[j] to rank j - 1, recv[j] from it), are regrouped there by
-- local expert (from every source rank in turn: order, with local_counts rows per local expert, and
-- its inverse), pass through the local experts, and return the same way. counts: this rank's rows per
-- global expert.
local function plan(group, counts)
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
  return { send = send, recv = recv, order = order, inverse = inverse, local_counts = local_counts }
end

-- The local experts on the received rows, the outputs in the order the rows came.
local function local_experts(layer, received, p)
  if #p.order == 0 then return received end
  local y = layer.experts(received:index_select(1, tensor.tensor(p.order, { dtype = 'i64' })), p.local_counts)
  return y:index_select(1, tensor.tensor(p.inverse, { dtype = 'i64' }))
end

--- The routed experts of layer for rows sorted by global expert (counts: rows per global expert), over
--- the expert-parallel group: the outputs of the rows, in their order.
function M.dispatch(layer, rows, counts)
  local group = layer.expert_parallel.group
  local p = plan(group, counts)
  local received = all_to_all(rows, group, p.send, p.recv)
  return all_to_all(local_experts(layer, received, p), group, p.recv, p.send)
end

--- Megatron's --moe-shared-expert-overlap: layer's routed experts as M.dispatch, combined by
--- moe.unpermute(routed, probs, token_rows, #tokens), plus its shared experts of tokens [N, H], where
--- the shared experts run while the all-to-alls are in flight: forward, linear_fc1 and the activation
--- during the dispatch and linear_fc2 (and the gate) during the combine; backward, linear_fc2's during
--- the combine's and linear_fc1's during the dispatch's. The shared experts are graphs of their own,
--- backpropagated from the two all-to-alls' autograd functions; the arithmetic is the blocking
--- path's, op for op, and every gradient reaches tokens' producer in an order that sums to the same
--- bits (the router's first, then both shared experts' summed as the blocking path sums them, then the
--- routed rows'), so results are bit-identical to MoELayer without the overlap.
function M.dispatch_overlapping_shared_experts(layer, rows, counts, probs, token_rows, tokens)
  local group, shared = layer.expert_parallel.group, layer.shared_experts
  local p = plan(group, counts)
  local grad = C.pmp_is_grad_enabled() ~= 0
  local function leaf(t)
    local d = t:detach()
    if grad then d:requires_grad_() end
    return d
  end
  local function backward(t, g) if t.requires_grad then t:backward(g) end end

  local shared_input = leaf(tokens)
  local dispatched = start_all_to_all(group, rows:detach(), p.send, p.recv)
  local hidden = shared:hidden(shared_input)
  local hidden_grad   -- from the combine's backward for the dispatch's
  local received = autograd.custom({ rows, tokens }, dispatched(), function(g)
    local returned = start_all_to_all(group, g, p.recv, p.send)
    if hidden_grad then backward(hidden, hidden_grad) end
    return { returned(), shared_input.grad }
  end)

  local routed_local = local_experts(layer, received, p)
  local combined = start_all_to_all(group, routed_local:detach(), p.recv, p.send)
  local shared_hidden = leaf(hidden)
  local shared_out = shared:output(shared_hidden, shared_input)
  local routed_rows, routed_probs = leaf(combined()), leaf(probs)
  local routed = moe.unpermute(routed_rows, routed_probs, token_rows, tokens:size(1))
  local out = routed:detach() + shared_out:detach()
  return autograd.custom({ routed_local, probs }, out, function(g)
    backward(routed, g)
    local returned = start_all_to_all(group, routed_rows.grad, p.send, p.recv)
    backward(shared_out, g)
    hidden_grad = shared_hidden.grad
    return { returned(), routed_probs.grad }
  end)
end

--- The token all-to-alls since the last call: wait_seconds (callers blocked on them), comm_seconds
--- (the communication thread's time in them, pmp.dist.stats) and hidden_fraction (1 - wait / comm: the
--- part of the all-to-all time spent behind compute). Resets.
local comm_at_last_take = 0
function M.all_to_all_stats()
  local comm = require('pmp.dist').stats().all_to_all_seconds - comm_at_last_take
  if comm < 0 then comm = require('pmp.dist').stats().all_to_all_seconds end   -- pmp.dist.reset_stats ran
  local out = { wait_seconds = waited, comm_seconds = comm,
    hidden_fraction = comm > 0 and math.max(0, math.min(1, 1 - waited / comm)) or 0 }
  waited, comm_at_last_take = 0, require('pmp.dist').stats().all_to_all_seconds
  return out
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
