--- Context parallelism (Megatron-LM's --context-parallel-size): the ranks of the 'cp' group each hold a
--- part of every sequence, and only attention looks at the other parts.
--
--   pmp.dist.init{cp = 2}
--   pmp.manual_seed(1234)
--   local model = pmp.nn.GPTModel(config)                -- every rank builds the whole model, same seed
--   pmp.nn.parallel.tensor_parallel(model)                -- optional, before or after
--   pmp.nn.parallel.context_parallel(model)
--   local ddp = pmp.dist.ddp.DistributedDataParallel(model)   -- averages gradients over 'dp_cp'
--   local cp = pmp.nn.context_parallel
--   local loss = model(cp.split(ids), cp.split(targets))  -- the same whole batch cut on every cp rank
--   loss:backward()
--   ddp:finish_grad_sync()
--
-- Layout (Megatron-Core's load balancing for causal attention): a sequence of T tokens is cut into
-- 2 cp chunks of L = T / (2 cp) tokens; cp rank r holds chunk r followed by chunk 2 cp - 1 - r. Under
-- causal attention a query of chunk g attends to g + 1 chunks of keys, so every rank gets the same
-- work: (r + 1) + (2 cp - r) chunk pairs. Embedding, norms, MLP and loss run on the 2L local tokens;
-- RoPE uses their global positions.
--
-- Attention gathers the keys and values of the whole sequence from the group (one all-gather, whose
-- backward reduce-scatters: each rank's K/V gradient is the sum of what every rank's queries sent
-- it), then runs the fused causal attention once per local query chunk g on keys 0 .. (g + 1) L - 1,
-- which the engine treats as queries at the last L positions of those keys: exactly chunk g's global
-- positions, so windows and per-query first keys keep their meaning. Megatron passes K/V around a ring
-- of point-to-point exchanges overlapped with the chunk computations; the all-gather (Llama 3's
-- choice) computes the same numbers with one collective and is simpler.
--
-- Loss: with the default mean reduction each rank returns cp x (the sum of its tokens' losses) / (the
-- tokens counted on the whole group), so the average over the group, which DistributedDataParallel
-- takes of the gradients and a recipe takes of the logged losses, is the mean over the whole
-- sequences even when ignored targets are not spread evenly (Megatron's loss_func does the same).
local tensor = require 'pmp.tensor'
local F = require 'pmp.nn.functional'
local autograd = require 'pmp.autograd'

local M = {}

local SEQUENCE = 2   -- ids, targets and hidden states are [B, T, ...]
local KEYS = 3       -- keys and values are [B, heads, T, D]

local function cp_group(group) return group or require('pmp.dist').group('cp') end

-- The global (0-based) chunks rank r of a group of `size` holds, in its order.
local function chunks_of(r, size) return r, 2 * size - 1 - r end

local function check_length(T, group, what, level)
  if T % (2 * group.size) ~= 0 then
    error(string.format("%s: context parallelism over group '%s' (size %d) cuts sequences into %d chunks, so their " ..
      'length must be divisible by %d, got %d', what, group.name, group.size, 2 * group.size, 2 * group.size, T),
      level + 1)
  end
end

-- A local length (two chunks of a sequence) must be even.
local function check_local(length, group, what, level)
  if length % 2 ~= 0 then
    error(string.format("%s: a context-parallel rank (group '%s') holds two chunks of each sequence " ..
      '(context_parallel.split), so its length must be even, got %d', what, group.name, length), level + 1)
  end
end

-- The global positions (0-based, i64 [2T / (2 cp)]) of the tokens this rank holds of a sequence of
-- length T: chunk r then chunk 2 cp - 1 - r.
function M.positions(T, group, options)
  group = cp_group(group)
  check_length(T, group, 'context_parallel.positions', 2)
  local L = T / (2 * group.size)
  local list = {}
  for _, g in ipairs({ chunks_of(group.rank, group.size) }) do
    for t = 0, L - 1 do list[#list + 1] = g * L + t end
  end
  return tensor.tensor(list, { dtype = 'i64', device = options and options.device })
end

-- This rank's part of x [B, T, ...] (ids, targets, positions, per-query first keys, hidden states): a
-- copy of [B, 2T / (2 cp), ...]. The whole x on a group of one.
function M.split(x, group)
  group = cp_group(group)
  if group.size == 1 then return x end
  check_length(x:size(SEQUENCE), group, 'context_parallel.split', 2)
  return x:index_select(SEQUENCE, M.positions(x:size(SEQUENCE), group, { device = x.device }))
end

-- RoPE's cos/sin tables [2L, rotary_dim] for the global positions of this rank's local_length = 2L
-- tokens (each chunk's from rotary's cache).
function M.rotary_tables(rotary, local_length, group, dtype)
  check_local(local_length, group, 'GPTModel', 3)
  local L = local_length / 2
  local first, second = chunks_of(group.rank, group.size)
  local cos_a, sin_a = rotary(L, first * L, dtype)
  local cos_b, sin_b = rotary(L, second * L, dtype)
  return tensor.cat({ cos_a, cos_b }, 1), tensor.cat({ sin_a, sin_b }, 1)
end

-- Gathered position j (0-based; rank j // 2, its first or second chunk) of each global chunk g, and
-- the inverse: the global chunk at each gathered position.
local function chunk_orders(size, device)
  local to_global, to_ranks = {}, {}
  for r = 0, size - 1 do
    local first, second = chunks_of(r, size)
    to_ranks[2 * r + 1], to_ranks[2 * r + 2] = first, second
    to_global[first + 1], to_global[second + 1] = 2 * r, 2 * r + 1
  end
  local options = { dtype = 'i64', device = device }
  return tensor.tensor(to_global, options), tensor.tensor(to_ranks, options)
end

-- Moves the 2 cp chunks of x along dim (each of length L) into the order of index.
local function reorder_chunks(x, dim, index, chunks)
  local shape, split = x.shape, {}
  for d = 1, #shape do
    if d == dim then
      split[#split + 1] = chunks
      split[#split + 1] = shape[d] / chunks
    else
      split[#split + 1] = shape[d]
    end
  end
  return x:contiguous():view(split):index_select(dim, index):view(shape)
end

-- x [B, heads, 2L, D] (this rank's chunks) -> [B, heads, T, D], the whole sequence in global order.
-- Backward: the gradient put back in the ranks' order and reduce-scattered (summed) over the group.
function M.gather_sequence(x, group)
  group = cp_group(group)
  if group.size == 1 then return x end
  local chunks = 2 * group.size
  local to_global, to_ranks = chunk_orders(group.size, x.device)
  local gathered = group:all_gather(x:detach(), { dim = KEYS })
  return autograd.custom({ x }, reorder_chunks(gathered, KEYS, to_global, chunks), function(g)
    return { group:reduce_scatter(reorder_chunks(g, KEYS, to_ranks, chunks), 'sum', { dim = KEYS }) }
  end)
end

-- Causal attention of this rank's queries q [B, Hq, 2L, D] over the whole sequence, given this rank's
-- keys and values k, v [B, Hkv, 2L, D] (rotated with their global positions). options: window,
-- first_key ([B], or [B, 2L] for this rank's queries, in global key positions), scale, alibi_slopes,
-- alibi_hf_falcon_scale (as F.attention's).
function M.attention(q, k, v, group, options)
  group = cp_group(group)
  options = options or {}
  local local_length = q:size(KEYS)
  check_local(local_length, group, 'context_parallel.attention', 2)
  local L = local_length / 2
  local groups = k:size(2)
  local kv = M.gather_sequence(tensor.cat({ k, v }, 2), group)
  local keys, values = kv:narrow(2, 1, groups), kv:narrow(2, groups + 1, groups)
  local first_key = options.first_key
  local per_query = first_key and first_key:dim() == 2
  local out = {}
  for c, g in ipairs({ chunks_of(group.rank, group.size) }) do
    local S = (g + 1) * L
    out[c] = F.attention(q:narrow(KEYS, 1 + (c - 1) * L, L), keys:narrow(KEYS, 1, S), values:narrow(KEYS, 1, S), {
      causal = true, window = options.window, scale = options.scale, alibi_slopes = options.alibi_slopes,
      alibi_hf_falcon_scale = options.alibi_hf_falcon_scale,
      first_key = per_query and first_key:narrow(2, 1 + (c - 1) * L, L):contiguous() or first_key })
  end
  return tensor.cat(out, KEYS)
end

-- Makes a GPTModel (or a pipeline stage of one, or its tensor-parallel part) run on this rank's part of
-- every sequence, in place, and returns it: forward then takes split(ids), split(targets) (and split
-- options.positions / options.first_key when given; otherwise positions are the global ones of the
-- local tokens). options: group (default pmp.dist.group('cp')). Parameters are untouched (the same on
-- every cp rank, like data-parallel replicas: average their gradients over 'dp_cp' with
-- DistributedDataParallel). On a group of one the model is returned untouched.
function M.context_parallel(model, options)
  options = options or {}
  local group = cp_group(options.group)
  if group.size == 1 then return model end
  if model.context_parallel then error('context_parallel: the model is already context parallel', 2) end
  model.context_parallel = { group = group }
  return model
end

-- The loss of a context-parallel model from its ranks' summed token losses (see the header): `sum`
-- (this rank's tokens, reduction 'sum') times cp / the tokens counted over the group.
function M.mean_loss(sum, targets, ignore_index, group)
  local counted = tensor.tensor({ targets:ne(ignore_index or -100):sum():item() }, { dtype = 'f64' })
  group:all_reduce(counted, 'sum')
  return sum * (group.size / counted:item())
end

return M
