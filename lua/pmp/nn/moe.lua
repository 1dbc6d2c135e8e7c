--- Mixture of experts in Megatron-Core's structure and parameter names (MoELayer), the mlp of the
--- decoder layers that config.moe_layer_freq marks:
---   mlp.router.weight                                       [num_moe_experts, hidden]
---   mlp.experts.local_experts.E.linear_fc1.weight           [2 x moe_ffn_hidden_size, hidden] ([gate; up])
---   mlp.experts.local_experts.E.linear_fc2.weight           [hidden, moe_ffn_hidden_size]
---   mlp.shared_experts.linear_fc1.weight / linear_fc2.weight (moe_shared_expert_intermediate_size)
---   mlp.shared_experts.gate_weight                          [1, hidden] (moe_shared_expert_gate: Qwen2-MoE's
---                                                            sigmoid gate on the shared experts' output)
--- Routing (Megatron's TopKRouter): softmax over all experts, the top moe_router_topk, renormalised to
--- sum to one unless moe_router_pre_softmax (Mixtral and Qwen3-MoE renormalise, Qwen2-MoE does not); or
--- DeepSeek-V3's moe_router_score_function 'sigmoid', the chosen scores normalised to sum to one, with
--- an optional expert_bias (moe_router_enable_expert_bias: aux-loss-free balancing, the bias only
--- steering the choice and moved by moe_router_bias_update_rate towards the mean load after each
--- step). Group-limited choice (moe_router_num_groups, moe_router_group_topk): experts only from the
--- groups with the highest sums of their top moe_router_group_score_topk scores (default, as Megatron:
--- topk / group_topk; DeepSeek-V2 uses 1, V3 2). moe_router_topk_scaling_factor multiplies the routing
--- probabilities.
--- Dropless: every token reaches its k experts, unless moe_expert_capacity_factor caps each expert at
--- ceil(tokens x k / experts x factor) tokens, keeping those it gives the highest probability
--- (moe_token_drop_policy 'probs', the default) or the first ones ('position'); a dropped token loses
--- that expert's share of its output, as in Megatron. Tokens are sorted by expert (index_select), each
--- expert's rows go through one GEMM of a grouped GEMM (grouped_matmul), and moe_unpermute weights
--- the rows by their routing probabilities and sums them back into token order. With experts split
--- over ranks, moe_shared_expert_overlap (Megatron's --moe-shared-expert-overlap) runs the shared
--- experts while the tokens' all-to-alls are in flight (pmp.nn.expert_parallel), with the same results.
--- While training, the load-balancing loss (moe_router_load_balancing_type 'aux_loss' over the micro
--- batch or 'seq_aux_loss' per sequence, moe_aux_loss_coeff) and the router z-loss (moe_z_loss_coeff)
--- add their gradients to the router as
--- Megatron's MoEAuxLossAutoScaler does: scaled by M.aux_loss_scale (the weight of this micro batch's
--- loss in the step's objective, which pmp.train.step sets), without changing the returned loss.
--- Experts split over ranks: pmp.nn.expert_parallel.
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local tensor = require 'pmp.tensor'
local Module = require 'pmp.nn.module'
local layers = require 'pmp.nn.layers'
local autograd = require 'pmp.autograd'
local F = require 'pmp.nn.functional'
local transformer = require 'pmp.nn.transformer'

local M = {}

-- Router math runs in f32 for bf16/f16 weights, as transformers and Megatron do (f64 stays f64).
local function widened(t) return (t.dtype == 'bf16' or t.dtype == 'f16') and t:float() or t end

local function check(ptr)
  if ptr == nil then error(ffi.string(C.pmp_last_error()), 3) end
  return tensor.wrap(ptr)
end

--- grouped_matmul(x [rows, in], w [E, out, in], counts): rows grouped by expert (counts[e] of them for
--- expert e, in order; counts a CPU integer tensor [E] or a Lua list), each group times w[e]^T.
function M.grouped_matmul(x, w, counts)
  if type(counts) == 'table' then counts = tensor.tensor(counts, { dtype = 'i64' }) end
  return check(C.pmp_grouped_matmul(x.ptr, w.ptr, counts.ptr))
end

--- unpermute(y [n, hidden], probs [n], rows [n], num_tokens) -> [num_tokens, hidden]: row t is the sum
--- of probs[i] * y[i] over the i with rows[i] = t (0-based token ids).
function M.unpermute(y, probs, rows, num_tokens)
  return check(C.pmp_moe_unpermute(y.ptr, probs.ptr, rows.ptr, num_tokens))
end

---------------------------------------------------------------------------------------------------
-- Configuration

local BALANCING = { aux_loss = true, seq_aux_loss = true, none = true }

--- true when decoder layer `layer` (1-based) has a MoE mlp: config.moe_layer_freq is Megatron's
--- --moe-layer-freq, an integer N (layers 0, N, 2N, ... counted from 0) or a list of 0/1 per layer.
function M.is_moe_layer(config, layer)
  if not config.num_moe_experts or config.num_moe_experts == 0 then return false end
  local freq = config.moe_layer_freq or 1
  if type(freq) == 'table' then return freq[layer] == 1 or freq[layer] == true end
  return (layer - 1) % freq == 0
end

--- Checks the MoE keys of a GPTModel config (errors name the key); fills in Megatron's defaults.
function M.check_config(c)
  local E = c.num_moe_experts
  if E == nil or E == 0 then return c end
  local function fail(message, ...) error('transformer config: ' .. string.format(message, ...), 0) end
  if E ~= math.floor(E) or E < 1 then fail('num_moe_experts must be a positive integer, got %s', tostring(E)) end
  c.moe_router_topk = c.moe_router_topk or 2
  local k = c.moe_router_topk
  if k ~= math.floor(k) or k < 1 or k > E then
    fail('moe_router_topk %s must be an integer from 1 to num_moe_experts %d', tostring(k), E)
  end
  c.moe_ffn_hidden_size = c.moe_ffn_hidden_size or c.ffn_hidden_size
  c.moe_router_load_balancing_type = c.moe_router_load_balancing_type or 'aux_loss'
  if not BALANCING[c.moe_router_load_balancing_type] then
    fail("moe_router_load_balancing_type '%s' is not supported (aux_loss, seq_aux_loss, none)",
      tostring(c.moe_router_load_balancing_type))
  end
  c.moe_router_score_function = c.moe_router_score_function or 'softmax'
  if c.moe_router_score_function ~= 'softmax' and c.moe_router_score_function ~= 'sigmoid' then
    fail("moe_router_score_function '%s' is not supported (softmax, sigmoid)", tostring(c.moe_router_score_function))
  end
  if c.moe_router_enable_expert_bias and c.moe_router_score_function ~= 'sigmoid' then
    fail("moe_router_enable_expert_bias needs moe_router_score_function 'sigmoid'")
  end
  c.moe_router_bias_update_rate = c.moe_router_bias_update_rate or 1e-3
  local groups, group_topk = c.moe_router_num_groups, c.moe_router_group_topk
  if (groups or group_topk) and not (groups and group_topk) then
    fail('moe_router_num_groups and moe_router_group_topk go together')
  end
  if groups then
    if E % groups ~= 0 then fail('num_moe_experts %d is not divisible by moe_router_num_groups %d', E, groups) end
    if group_topk < 1 or group_topk > groups then
      fail('moe_router_group_topk %d must be from 1 to moe_router_num_groups %d', group_topk, groups)
    end
    if k % group_topk ~= 0 and not c.moe_router_group_score_topk then
      fail('moe_router_topk %d is not divisible by moe_router_group_topk %d', k, group_topk)
    end
    if k > group_topk * E / groups then
      fail('moe_router_topk %d exceeds the %d experts of moe_router_group_topk %d groups', k, group_topk * E / groups, group_topk)
    end
    c.moe_router_group_score_topk = c.moe_router_group_score_topk or k / group_topk
    local per = c.moe_router_group_score_topk
    if per ~= math.floor(per) or per < 1 or per > E / groups then
      fail('moe_router_group_score_topk %s must be an integer from 1 to the %d experts of a group', tostring(per), E / groups)
    end
  end
  c.moe_aux_loss_coeff = c.moe_aux_loss_coeff or 0
  c.moe_z_loss_coeff = c.moe_z_loss_coeff or 0
  if c.activation ~= 'swiglu' and c.moe_grouped_gemm then fail("moe_grouped_gemm needs activation 'swiglu'") end
  if c.moe_grouped_gemm and c.add_mlp_bias then fail('moe_grouped_gemm has no expert biases (add_mlp_bias)') end
  local freq = c.moe_layer_freq or 1
  if type(freq) == 'table' then
    if #freq ~= c.num_layers then fail('moe_layer_freq lists %d layers for num_layers %d', #freq, c.num_layers) end
  elseif freq ~= math.floor(freq) or freq < 1 then
    fail('moe_layer_freq must be a positive integer or a list of 0/1 per layer, got %s', tostring(freq))
  end
  local factor = c.moe_expert_capacity_factor
  if factor ~= nil and (type(factor) ~= 'number' or factor <= 0) then
    fail('moe_expert_capacity_factor must be a positive number, got %s', tostring(factor))
  end
  c.moe_token_drop_policy = c.moe_token_drop_policy or 'probs'
  if c.moe_token_drop_policy ~= 'probs' and c.moe_token_drop_policy ~= 'position' then
    fail("moe_token_drop_policy '%s' is not supported (probs, position)", tostring(c.moe_token_drop_policy))
  end
  if c.moe_shared_expert_overlap and (c.moe_shared_expert_intermediate_size or 0) == 0 then
    fail('moe_shared_expert_overlap needs shared experts (moe_shared_expert_intermediate_size)')
  end
  local ep = c.expert_model_parallel_size or 1
  if E % ep ~= 0 then fail('num_moe_experts %d is not divisible by expert_model_parallel_size %d', E, ep) end
  return c
end

-- The config of an MLP of width `width` (experts, shared experts).
local function mlp_config(config, width)
  local out = {}
  for key, v in pairs(config) do out[key] = v end
  out.ffn_hidden_size = width
  return out
end

---------------------------------------------------------------------------------------------------
-- Aux-loss bookkeeping

--- The weight of the current micro batch's loss in the step's objective (1 / micro batches): the
--- scale of the auxiliary losses' gradients, as Megatron's MoEAuxLossAutoScaler.set_loss_scale.
M.aux_loss_scale = 1

-- name -> { [layer] = sum over micro batches of value x aux_loss_scale }
local tracked, load = {}, {}

local function track(name, layer, value)
  local per_layer = tracked[name] or {}
  tracked[name] = per_layer
  per_layer[layer] = (per_layer[layer] or 0) + value * M.aux_loss_scale
end

-- the most tokens any expert of the layer received over the mean, weighted per micro batch
local function track_load(layer, imbalance) load[layer] = (load[layer] or 0) + imbalance * M.aux_loss_scale end

--- The auxiliary losses since the last call, as Megatron logs them (each divided by its coefficient,
--- weighted per micro batch like the loss, averaged over the MoE layers): { load_balancing_loss =,
--- seq_load_balancing_loss =, z_loss = } (those computed), and expert_load_imbalance = { per MoE layer
--- in order: the most tokens an expert got over the mean }; nil when no MoE layer trained. Resets.
--- Also returns how many layers each average is over (what joining pipeline stages needs).
function M.take_aux_losses()
  local out, layers, any = {}, {}, false
  for name, per_layer in pairs(tracked) do
    local sum, count = 0, 0
    for _, v in pairs(per_layer) do sum, count = sum + v, count + 1 end
    out[name], layers[name], any = sum / count, count, true
  end
  local layers_seen = {}
  for layer in pairs(load) do layers_seen[#layers_seen + 1] = layer end
  table.sort(layers_seen)
  if #layers_seen > 0 then
    out.expert_load_imbalance, any = {}, true
    for k, layer in ipairs(layers_seen) do out.expert_load_imbalance[k] = load[layer] end
  end
  tracked, load = {}, {}
  if not any then return nil end
  return out, layers
end

-- Forward identity on x; backward also gives `loss` the gradient aux_loss_scale.
local function attach_loss(x, loss)
  local scale = M.aux_loss_scale
  return autograd.custom({ x, loss }, x:detach(), function(g)
    return { g, tensor.full({}, scale, { dtype = loss.dtype }) }
  end)
end

---------------------------------------------------------------------------------------------------
-- Modules

-- The k largest entries along the last dim of a tensor without gradient: values and 0-based ids
-- (i64), in descending order, ties to the lower id.
local function top(values, k)
  local n = values:size(-1)
  local ids, picked = {}, {}
  local positions = tensor.arange(0, n):long()
  for j = 1, k do
    local v, index = values:max(-1, true)
    picked[j], ids[j] = v, index
    if j < k then values = values:masked_fill(positions:eq(index), -math.huge) end
  end
  return tensor.cat(picked, -1), tensor.cat(ids, -1)
end

--- TopKRouter(config): logits = x router.weight^T, scores, top-k (see the header).
M.TopKRouter = Module:extend('TopKRouter')
function M.TopKRouter:init(config)
  self.topk, self.pre_softmax = config.moe_router_topk, config.moe_router_pre_softmax or false
  self.num_experts = config.num_moe_experts
  self.score_function = config.moe_router_score_function or 'softmax'
  self.num_groups, self.group_topk = config.moe_router_num_groups, config.moe_router_group_topk
  self.group_score_topk = config.moe_router_group_score_topk
  self.scaling_factor = config.moe_router_topk_scaling_factor
  self.weight = layers.normal_init({ config.num_moe_experts, config.hidden_size }, config.init_std, config.dtype, config.init)
  if config.moe_router_enable_expert_bias then
    self:register_buffer('expert_bias', tensor.zeros(config.num_moe_experts, { dtype = 'f32' }))
    rawset(self, 'tokens_per_expert', {})
  end
end

-- The chosen experts [N, k] for selection scores [N, E] (no gradient): the top k, or with groups the
-- top k among the experts of the best group_topk groups.
function M.TopKRouter:choose(selection)
  if not self.num_groups then
    local _, ids = top(selection, self.topk)
    return ids
  end
  local N, G = selection:size(1), self.num_groups
  local per_group = top(selection:view(N, G, self.num_experts / G), self.group_score_topk)
  local _, best = top(per_group:sum(-1), self.group_topk)
  local group_of = {}
  for e = 1, self.num_experts do group_of[e] = math.floor((e - 1) / (self.num_experts / G)) end
  group_of = tensor.tensor(group_of, { dtype = 'i64' })
  local allowed = group_of:eq(best:select(2, 1):unsqueeze(2))
  for j = 2, self.group_topk do allowed = allowed:logical_or(group_of:eq(best:select(2, j):unsqueeze(2))) end
  local _, ids = top(selection:masked_fill(allowed:logical_not(), -math.huge), self.topk)
  return ids
end

-- x [N, H] -> probabilities of the chosen experts [N, k], their ids [N, k] (i64), logits [N, E] and the
-- scores the load-balancing loss uses [N, E] (softmax, or sigmoid normalised per token).
function M.TopKRouter:forward(x)
  local logits = x:matmul(self.weight:t())
  local wide = widened(logits)
  local probs, chosen, aux_scores
  if self.score_function == 'sigmoid' then
    local scores = wide:sigmoid()
    local selection = scores:detach()
    if self.expert_bias then selection = selection + self.expert_bias:float() end
    chosen = self:choose(selection)
    probs = scores:gather(2, chosen)
    if self.topk > 1 then probs = probs / (probs:sum(-1, true) + 1e-20) end
    aux_scores = scores / (scores:sum(-1, true) + 1e-20)
  else
    local scores = wide:softmax(-1)
    -- softmax keeps the order within a token, but group sums differ: Megatron sums logits unless pre_softmax
    chosen = self:choose((self.pre_softmax and scores or wide):detach())
    probs = scores:gather(2, chosen)
    if not self.pre_softmax then probs = probs / probs:sum(-1, true) end
    aux_scores = scores
  end
  if self.scaling_factor then probs = probs * self.scaling_factor end
  return probs:to(x.dtype), chosen, logits, aux_scores
end
function M.TopKRouter:extra_repr()
  return string.format('experts=%d, topk=%d, %s%s%s%s', self.num_experts, self.topk, self.score_function,
    self.pre_softmax and ', pre-softmax' or '',
    self.num_groups and string.format(', %d of %d groups', self.group_topk, self.num_groups) or '',
    self.expert_bias and ', expert bias' or '')
end

--- SharedExpertMLP(config): an MLP of moe_shared_expert_intermediate_size, times sigmoid(x gate_weight^T)
--- with moe_shared_expert_gate.
M.SharedExpertMLP = transformer.MLP:extend('SharedExpertMLP')
function M.SharedExpertMLP:init(config)
  transformer.MLP.init(self, mlp_config(config, config.moe_shared_expert_intermediate_size))
  if config.moe_shared_expert_gate then
    self.gate_weight = layers.normal_init({ 1, config.hidden_size }, config.init_std, config.dtype, config.init)
  end
end
-- linear_fc2 of the activations h (MLP:hidden(x)), times the gate of x
function M.SharedExpertMLP:output(h, x)
  local y = self.linear_fc2(h)
  if self.gate_weight then y = y * x:matmul(self.gate_weight:t()):sigmoid() end
  return y
end
function M.SharedExpertMLP:forward(x) return self:output(self:hidden(x), x) end

--- ExpertList(experts, first): the experts a rank holds, named by their global index (first, first + 1,
--- ...) so that names mean the same expert whatever the expert-parallel layout.
M.ExpertList = Module:extend('ExpertList')
function M.ExpertList:init(experts, first)
  rawset(self, 'items', {})
  for k, expert in ipairs(experts) do
    self[tostring(first + k - 1)] = expert
    self.items[k] = expert
  end
end
function M.ExpertList:forward() error('ExpertList has no forward; iterate over its items', 2) end
function M.ExpertList:extra_repr() return tostring(#self.items) end

--- Experts(config, first, count, modules): count SwiGLU (or config.activation) MLPs from global expert
--- first (0-based), experts.local_experts.E; modules: existing MLPs to hold instead of new ones.
M.Experts = Module:extend('Experts')
function M.Experts:init(config, first, count, modules)
  local list = modules or {}
  if not modules then
    for e = 1, count do list[e] = transformer.MLP(mlp_config(config, config.moe_ffn_hidden_size)) end
  end
  self.local_experts = M.ExpertList(list, first)
  rawset(self, 'grouped', config.moe_grouped_gemm or false)
  rawset(self, 'first', first)
end
-- x [n, H] sorted by expert with counts[e] rows for local expert e (a Lua list) -> [n, H].
function M.Experts:forward(x, counts)
  local experts = self.local_experts.items
  if self.grouped then
    local fc1, fc2 = {}, {}
    for e, expert in ipairs(experts) do fc1[e], fc2[e] = expert.linear_fc1.weight, expert.linear_fc2.weight end
    local counts_tensor = tensor.tensor(counts, { dtype = 'i64' })
    local h = F.swiglu(M.grouped_matmul(x, tensor.stack(fc1, 1), counts_tensor))
    return M.grouped_matmul(h, tensor.stack(fc2, 1), counts_tensor)
  end
  -- Megatron's SequentialMLP: one expert after another over its rows
  local parts, start = {}, 1
  for e, expert in ipairs(experts) do
    if counts[e] > 0 then
      parts[#parts + 1] = expert(x:narrow(1, start, counts[e]))
      start = start + counts[e]
    end
  end
  if #parts == 0 then return x * 0 end
  return tensor.cat(parts, 1)
end
function M.Experts:extra_repr()
  return string.format('%d local experts from %d%s', #self.local_experts.items, self.first,
    self.grouped and ', grouped GEMM' or '')
end

--- MoELayer(config, layer): router, experts and optional shared experts; layer is 1-based.
M.MoELayer = Module:extend('MoELayer')
function M.MoELayer:init(config, layer)
  rawset(self, 'config', config)
  rawset(self, 'layer', layer)
  self.router = M.TopKRouter(config)
  self.experts = M.Experts(config, 0, config.num_moe_experts)
  if (config.moe_shared_expert_intermediate_size or 0) > 0 then self.shared_experts = M.SharedExpertMLP(config) end
end

-- Switch Transformer's load-balancing loss as Megatron writes it, over scores [B, T, E] and the
-- routed tokens per sequence and expert (counts[b][e]): per sequence E / (k T^2) sum_e (sum_t p_te) c_e,
-- averaged over the B sequences (B = 1 with every token as one sequence: aux_loss; B sequences:
-- seq_aux_loss). Under sequence parallelism scores holds this rank's slice of the sequences, counts and
-- T (tokens per sequence) are the whole sequences': the ranks' losses add up to the whole one.
local function balancing_loss(scores, counts, k, coeff, T)
  local B, E = scores:size(1), scores:size(3)
  local per_expert = scores:sum(2)
  return (per_expert * tensor.tensor(counts, { dtype = per_expert.dtype })):sum() * (E * coeff / (k * T * T * B))
end

-- Sums over the sequence-parallel group (nil: this rank alone) the lists of numbers in `lists`, in place,
-- with one all-reduce.
local function sum_over(group, lists)
  if not group then return end
  local flat = {}
  for _, list in ipairs(lists) do
    for _, v in ipairs(list) do flat[#flat + 1] = v end
  end
  local summed = group:all_reduce(tensor.tensor(flat, { dtype = 'f64' }), 'sum'):totable()
  local at = 0
  for _, list in ipairs(lists) do
    for i = 1, #list do list[i] = summed[at + i] end
    at = at + #list
  end
end

-- The auxiliary losses of one forward, attached to out for backward and tracked for the log. shape: the
-- layer input's [B, T, H]; counts: tokens routed to each expert (for the load imbalance). Under
-- sequence parallelism (self.sequence_parallel, set by pmp.nn.parallel.tensor_parallel) each rank holds
-- a slice of the sequences: as in Megatron the balancing loss takes the whole sequences' token counts,
-- the z-loss coefficient is divided by the group size, and what is logged is the whole layer's.
function M.MoELayer:aux_losses(out, logits, scores, counts, shape)
  local c = self.config
  local E, k = c.num_moe_experts, c.moe_router_topk
  local balancing, coeff = c.moe_router_load_balancing_type, c.moe_aux_loss_coeff
  local sp = rawget(self, 'sequence_parallel')
  local group, slices = sp and sp.group, sp and sp.group.size or 1
  local whole_counts = { unpack(counts, 1, E) }
  -- the numbers every rank needs the group's sums of: filled below, summed once
  local per_sequence, probability_sums, squares = {}, {}, { 0 }
  local B, T
  local balance = (balancing == 'aux_loss' or balancing == 'seq_aux_loss') and coeff > 0
  if balance then
    B = balancing == 'seq_aux_loss' and shape[1] or 1
    T = scores:size(1) / B
    -- Megatron counts the plain top-k of these scores (no expert bias, no groups)
    local _, ids = top(scores:detach(), k)
    for b = 1, B do
      for e = 1, E do per_sequence[(b - 1) * E + e] = 0 end
    end
    for slot, e in ipairs(ids:reshape(-1):totable()) do
      local at = math.floor((slot - 1) / (k * T)) * E + e + 1
      per_sequence[at] = per_sequence[at] + 1
    end
  end
  local z_loss
  if c.moe_z_loss_coeff > 0 then
    -- ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2
    local f = widened(logits)
    local top_logit = f:max(-1, true):detach()
    local lse = (f - top_logit):exp():sum(-1, true):log() + top_logit
    local mean = lse:square():mean()
    z_loss = mean * (c.moe_z_loss_coeff / slices)
    squares[1] = mean:item()
  end
  if group then
    if balance then probability_sums = scores:detach():view(B, T, E):sum(2):reshape(-1):totable() end
    sum_over(group, { per_sequence, probability_sums, squares, whole_counts })
  end
  if balance then
    local nested = {}
    for b = 1, B do nested[b] = { unpack(per_sequence, (b - 1) * E + 1, b * E) } end
    local aux_loss = balancing_loss(scores:view(B, T, E), nested, k, coeff, T * slices)
    local logged = aux_loss:item() / coeff
    if group then
      logged = 0
      for i, n in ipairs(per_sequence) do logged = logged + probability_sums[i] * n end
      logged = logged * E / (k * (T * slices) ^ 2 * B)
    end
    track(balancing == 'aux_loss' and 'load_balancing_loss' or 'seq_load_balancing_loss', self.layer, logged)
    out = attach_loss(out, aux_loss)
  end
  if z_loss then
    track('z_loss', self.layer, squares[1] / slices)
    out = attach_loss(out, z_loss)
  end
  counts = whole_counts
  local most, total = 0, 0
  for e = 1, E do most, total = math.max(most, counts[e]), total + counts[e] end
  if total > 0 then track_load(self.layer, most / (total / E)) end
  local seen = self.router.tokens_per_expert
  if seen then
    for e = 1, E do seen[e] = (seen[e] or 0) + counts[e] end
  end
  return out
end

-- Caps each expert's bucket of (token, choice) slots at the capacity (see the header), in place.
function M.MoELayer:drop(buckets, counts, probs, routed)
  local c = self.config
  local E = c.num_moe_experts
  local capacity = math.ceil(routed / E * c.moe_expert_capacity_factor)
  local p
  for e = 1, E do
    local bucket = buckets[e]
    if #bucket > capacity then
      if c.moe_token_drop_policy == 'probs' then
        p = p or probs:reshape(-1):totable()
        table.sort(bucket, function(a, b)
          if p[a + 1] ~= p[b + 1] then return p[a + 1] > p[b + 1] end
          return a < b
        end)
      end
      for i = #bucket, capacity + 1, -1 do bucket[i] = nil end
      table.sort(bucket)
      counts[e] = capacity
    end
  end
end

-- x [B, T, H] -> [B, T, H].
function M.MoELayer:forward(x)
  local shape = x.shape
  local H = shape[#shape]
  local flat = x:reshape(-1, H)
  local N = flat:size(1)
  local probs, chosen, logits, scores = self.router(flat)
  local k = probs:size(2)
  -- sort the N x k (token, expert) pairs by expert, tokens in order within an expert
  local ids = chosen:reshape(-1):totable()
  local E = self.config.num_moe_experts
  local counts, buckets = {}, {}
  for e = 1, E do counts[e], buckets[e] = 0, {} end
  for slot, e in ipairs(ids) do
    local b = buckets[e + 1]
    b[#b + 1] = slot - 1
    counts[e + 1] = counts[e + 1] + 1
  end
  -- under sequence parallelism each rank caps its own slice's tokens, as Megatron's router does
  if self.config.moe_expert_capacity_factor then self:drop(buckets, counts, probs, N * k) end
  local slots, rows = {}, {}
  for e = 1, E do
    for _, slot in ipairs(buckets[e]) do
      slots[#slots + 1] = slot
      rows[#rows + 1] = math.floor(slot / k)
    end
  end
  local rows_t = tensor.tensor(rows, { dtype = 'i64' })
  local sorted_probs = probs:reshape(-1):index_select(1, tensor.tensor(slots, { dtype = 'i64' }))
  local permuted = flat:index_select(1, rows_t)
  local out
  if self.expert_parallel and self.shared_experts and self.config.moe_shared_expert_overlap then
    out = require('pmp.nn.expert_parallel').dispatch_overlapping_shared_experts(self, permuted, counts, sorted_probs,
      rows_t, flat)
  else
    local y
    if self.expert_parallel then
      y = require('pmp.nn.expert_parallel').dispatch(self, permuted, counts)
    else
      y = self.experts(permuted, counts)
    end
    out = M.unpermute(y, sorted_probs, rows_t, N)
    if self.shared_experts then out = out + self.shared_experts(flat) end
  end
  if self.training and C.pmp_is_grad_enabled() ~= 0 then out = self:aux_losses(out, logits, scores, counts, shape) end
  return out:view(shape)
end
function M.MoELayer:extra_repr()
  local c = self.config
  return string.format('experts=%d, topk=%d, ffn=%d%s', c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size,
    self.shared_experts and (', shared ffn=' .. c.moe_shared_expert_intermediate_size) or '')
end

---------------------------------------------------------------------------------------------------
-- Aux-loss-free balancing

--- Aux-loss-free balancing (Megatron's finalize step): every router with an expert_bias moves it by
--- moe_router_bias_update_rate towards the mean load, up for experts that got fewer tokens than the
--- mean over the step's micro batches and data-parallel ranks, down for those that got more. Call it
--- once per step after the last backward (pmp.train.step.finish_grads does).
function M.update_expert_bias(model)
  local dist = require 'pmp.dist'
  for _, layer in ipairs(model.decoder and model.decoder.layers.items or {}) do
    local router = layer.mlp.router
    local seen = router and router.tokens_per_expert
    if seen and next(seen) then
      local counts = tensor.tensor(seen, { dtype = 'f64' })
      if dist.is_initialized() and dist.group('dp_cp').size > 1 then dist.group('dp_cp'):all_reduce(counts, 'sum') end
      local offset = counts:mean() - counts
      local rate = layer.mlp.config.moe_router_bias_update_rate
      -- the bias moves in steps of rate, which a bf16 bias could not hold: an f32 copy accumulates them
      -- (taken afresh from the buffer when something else has written it, such as a checkpoint load)
      local bias, master = router.expert_bias, rawget(router, 'expert_bias_master')
      if not master or (master:to(bias.dtype) - bias):abs():max():item() ~= 0 then master = bias:float() end
      master = master + offset:sign():float() * rate
      rawset(router, 'expert_bias_master', master)
      bias:copy_(master)
      rawset(router, 'tokens_per_expert', {})
    end
  end
end

return M
