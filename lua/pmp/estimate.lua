--- Memory and FLOPs of a training step before running it: per-rank bytes of weights, gradients,
--- optimizer state and activations for a parallel layout, and the step's FLOPs (tools/estimate.lua
--- prints them; spec/estimate_spec.lua checks them against the engine's measured peak).
---
--- The activation terms count the tensors pmp's autograd keeps for backward, per token and layer
--- (Korthikanti et al.'s method, with pmp's own list; measured against pmp.memory.stats):
---   layer input and the pre-MLP residual (kept by the two RMSNorms), the two norm outputs (kept by the
---   QKV and FC1 matmuls; with sequence parallelism the norms keep 1/t slices and the matmuls the
---   gathered whole), the QKV projection output, q and k after RoPE, v, the attention output and its
---   [B, T, heads*d] copy (kept by the output projection): 4H + 4Q + 4KV, the last two groups split
---   over tensor-parallel ranks; the MLP's FC1 output and activation output: 3F (SwiGLU) or 2F, split
---   over TP ranks. In bf16 runs one more f32 tensor of H per token and layer is kept.
---   The last stage also keeps the final norm's input and output (2H) and the logits (V / t).
--- Pipeline stage p (0-based) of the 1F1B schedule holds the activations of min(pp - p, micro batches)
--- micro batches at once. With full recompute a layer keeps only its input.
---
--- What pmp holds in a step (the `peak`): the tensors of a forward have Lua handles, and the engine frees
--- a saved activation in backward only once its handle is finalized by the Lua collector, which runs
--- after max(live bytes, 256 MiB) of new allocations (pmp.memory.set_gc_step). Until then a micro
--- batch's activations stay through its backward, the gradients add on top, and the next micro batch
--- adds its own; with recompute the forward's dropped tensors and the re-run's wait likewise; under data
--- parallelism so do the gradients handed to the bucket hooks and the collectives' results. So the
--- peak is the weights, optimizer state and gradient buffers, plus the gradients, plus the lesser of
--- all those dropped bytes and what the collector lets pile up, plus the largest backward transient
--- (the gradient of the logits, and of FC1's output): `peak`, the first step's. `live_peak` is what the
--- step needs when every dropped tensor is freed at once (a lower bound, e.g. after collectgarbage()
--- between forward and backward); over a run, dropped tensors of earlier steps can still wait too, so
--- `run_peak` = live_peak + max(live_peak, 256 MiB) bounds it. Not counted: communication buffers and
--- the allocator's cache of free blocks.
local transformer = require 'pmp.nn.transformer'
local sharding = require 'pmp.dist.sharding'

local M = {}

local GC_STEP = 256 * 2^20   -- pmp.tensor's default collector step

--- Hugging Face configs of public model families, by the names people use.
M.FAMILIES = {
  ['llama-7b'] = { num_layers = 32, hidden_size = 4096, num_attention_heads = 32, ffn_hidden_size = 11008, vocab_size = 32000 },
  ['llama-13b'] = { num_layers = 40, hidden_size = 5120, num_attention_heads = 40, ffn_hidden_size = 13824, vocab_size = 32000 },
  ['llama-70b'] = { num_layers = 80, hidden_size = 8192, num_attention_heads = 64, num_query_groups = 8, ffn_hidden_size = 28672,
    vocab_size = 32000 },
  ['llama3-8b'] = { num_layers = 32, hidden_size = 4096, num_attention_heads = 32, num_query_groups = 8, ffn_hidden_size = 14336,
    vocab_size = 128256 },
  ['llama3-70b'] = { num_layers = 80, hidden_size = 8192, num_attention_heads = 64, num_query_groups = 8, ffn_hidden_size = 28672,
    vocab_size = 128256 },
  ['mistral-7b'] = { num_layers = 32, hidden_size = 4096, num_attention_heads = 32, num_query_groups = 8, ffn_hidden_size = 14336,
    vocab_size = 32000 },
  ['qwen2-0.5b'] = { num_layers = 24, hidden_size = 896, num_attention_heads = 14, num_query_groups = 2, ffn_hidden_size = 4864,
    vocab_size = 151936, add_qkv_bias = true, tie_embeddings = true },
  ['qwen2-1.5b'] = { num_layers = 28, hidden_size = 1536, num_attention_heads = 12, num_query_groups = 2, ffn_hidden_size = 8960,
    vocab_size = 151936, add_qkv_bias = true, tie_embeddings = true },
  ['qwen2-7b'] = { num_layers = 28, hidden_size = 3584, num_attention_heads = 28, num_query_groups = 4, ffn_hidden_size = 18944,
    vocab_size = 152064, add_qkv_bias = true },
  ['qwen3-0.6b'] = { num_layers = 28, hidden_size = 1024, num_attention_heads = 16, num_query_groups = 8, kv_channels = 128,
    ffn_hidden_size = 3072, vocab_size = 151936, qk_layernorm = true, tie_embeddings = true },
  ['qwen3-8b'] = { num_layers = 36, hidden_size = 4096, num_attention_heads = 32, num_query_groups = 8, kv_channels = 128,
    ffn_hidden_size = 12288, vocab_size = 151936, qk_layernorm = true },
}

local function family_names()
  local names = {}
  for name in pairs(M.FAMILIES) do names[#names + 1] = name end
  table.sort(names)
  return names
end

--- A filled-in transformer config from a family name, the path of an HF config.json, or a table of
--- GPTModel settings (Megatron's names, GPTModel's defaults). options.tp multiplies the vocabulary
--- padding as Megatron does.
function M.model_config(model, options)
  options = options or {}
  local config
  if type(model) == 'table' then
    config = {}
    for k, v in pairs(model) do config[k] = v end
  elseif type(model) == 'string' and M.FAMILIES[model:lower()] then
    config = {}
    for k, v in pairs(M.FAMILIES[model:lower()]) do config[k] = v end
    config.make_vocab_size_divisible_by = 128
    if config.tie_embeddings == nil then config.tie_embeddings = false end
  elseif type(model) == 'string' and model:match('%.json$') then
    local json = require 'pmp.json'
    local ok, hf = pcall(json.read, model)
    if not ok then error('estimate: cannot read ' .. model .. ': ' .. tostring(hf), 0) end
    config = require('pmp.models').config_from_hf(hf, {}, model)
  else
    error(string.format("estimate: unknown model '%s' (known: %s, or the path of an HF config.json)", tostring(model),
      table.concat(family_names(), ', ')), 0)
  end
  config.tensor_model_parallel_size = options.tp or config.tensor_model_parallel_size
  config.padded_vocab_size = nil
  return transformer.config(config)
end

-- Bytes the caching allocator hands out for a request: rounded up to 512 B, or to 1 MiB from 1 MiB on.
local function allocation(bytes)
  local unit = bytes < 2^20 and 512 or 2^20
  return math.ceil(bytes / unit) * unit
end

-- Gradient buffers and optimizer shards under data parallelism are one tensor per bucket (Megatron's
-- bucket size: max(4e7, 1e6 x data-parallel size) elements), each rounded by the allocator.
local function bucketed(elements, bytes_per_element, dp)
  local bucket = math.max(4e7, 1e6 * dp)
  local total, left = 0, elements
  while left > 0 do
    total = total + allocation(math.min(left, bucket) * bytes_per_element)
    left = left - bucket
  end
  return total
end

local function bytes_of(dtype)
  if dtype == 'bf16' or dtype == 'f16' then return 2 end
  if dtype == 'f32' then return 4 end
  error("estimate: dtype must be 'bf16' or 'f32', got '" .. tostring(dtype) .. "'", 0)
end

-- Parameter counts of one tensor-parallel rank: of each decoder layer (1-based) as { dense =, expert = }
-- (expert: this rank's routed experts, whose optimizer state the distributed optimizer shards over the
-- expert-data-parallel group), and of the embedding / output / final norm. A MoE layer stays whole on
-- every tensor-parallel rank (router, shared experts and experts: Megatron's expert-tensor-parallel size
-- 1, pmp.nn.parallel); its experts are split over the ep ranks. Multi-latent attention splits its
-- up-projections and output projection over tp and keeps the down-projections and their norms whole.
local function parameter_counts(c, tp, ep)
  local H = c.hidden_size
  local gated = c.activation == 'swiglu'
  local attention
  if c.multi_latent_attention then
    local heads, dn, dr, dv = c.num_attention_heads, c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim
    local q = c.q_lora_rank and (H * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * heads * (dn + dr) / tp)
      or H * heads * (dn + dr) / tp
    attention = q + H * (c.kv_lora_rank + dr) + c.kv_lora_rank + c.kv_lora_rank * heads * (dn + dv) / tp
      + heads * dv * H / tp
  else
    local Q, KV = c.num_attention_heads * c.kv_channels, c.num_query_groups * c.kv_channels
    attention = H * (Q + 2 * KV) / tp + Q * H / tp
    if c.add_qkv_bias then attention = attention + (Q + 2 * KV) / tp end
    if c.qk_layernorm then attention = attention + 2 * c.kv_channels end
  end
  if c.add_proj_bias then attention = attention + H end
  -- an MLP of width F split over `split` ranks
  local function mlp(F, split)
    local n = (H * F * (gated and 2 or 1) + F * H) / split
    if c.add_mlp_bias then n = n + F * (gated and 2 or 1) / split + H end
    return n
  end
  local norm = c.normalization == 'LayerNorm' and 2 * H or H   -- LayerNorm has a bias
  local norms = 2 + (c.post_self_attn_layernorm and 1 or 0) + (c.post_mlp_layernorm and 1 or 0)   -- GLM-4 has four
  local moe = require 'pmp.nn.moe'
  local layers = {}
  for l = 1, c.num_layers do
    local dense, expert = attention + norms * norm, 0
    if moe.is_moe_layer(c, l) then
      local E = c.num_moe_experts
      dense = dense + E * H                                                -- the router
      local shared = c.moe_shared_expert_intermediate_size or 0
      if shared > 0 then dense = dense + mlp(shared, 1) + (c.moe_shared_expert_gate and H or 0) end
      expert = E / ep * mlp(c.moe_ffn_hidden_size, 1)
    else
      dense = dense + mlp(c.ffn_hidden_size, tp)
    end
    layers[l] = { dense = dense, expert = expert }
  end
  local E = c.word_embedding_size or H
  local projection = E ~= H and E * H or 0   -- each of input_projection and output_projection, replicated
  return {
    layers = layers,
    embedding = c.padded_vocab_size * E / tp + projection + (c.word_embeddings_layernorm and norm or 0),
    output = c.padded_vocab_size * E / tp,
    final_norm = norm,
    output_projection = projection,
  }
end

--- layout: tp, pp, dp, cp, ep (1), micro_batch, global_batch, seq_length, dtype ('bf16' | 'f32'),
--- recompute ('full' | nil), distributed_optimizer, sequence_parallel, first_stage_layers, last_stage_layers.
--- Returns one entry per pipeline stage (what each of its ranks holds, in bytes) and the largest peak.
function M.memory(c, layout)
  local tp, pp, dp, cp, ep = layout.tp or 1, layout.pp or 1, layout.dp or 1, layout.cp or 1, layout.ep or 1
  local b, s = layout.micro_batch or 1, layout.seq_length
  local global = layout.global_batch or b * dp
  if global % (b * dp) ~= 0 then
    error(string.format('estimate: global batch %d is not a multiple of micro batch %d x data-parallel size %d', global, b, dp), 0)
  end
  if s % cp ~= 0 then error(string.format('estimate: sequence length %d is not divisible by context-parallel size %d', s, cp), 0) end
  local micro_batches = global / (b * dp)
  local ab = bytes_of(layout.dtype or 'f32')
  local sp = layout.sequence_parallel and tp > 1
  local counts = parameter_counts(c, tp, ep)
  local H, Q, KV, F, V = c.hidden_size, c.num_attention_heads * c.kv_channels, c.num_query_groups * c.kv_channels,
    c.ffn_hidden_size, c.vocab_size
  local n = b * s / cp                                      -- tokens of one micro batch on this rank

  -- the tensors one layer keeps for backward for one micro batch: {elements per token, bytes each}
  local hidden_t = sp and tp or 1
  -- the MLP's width per token: a MoE layer's top-k experts and its shared experts, whole on every
  -- tensor-parallel rank (the dense layers of --moe-layer-freq are counted like the MoE ones)
  local mlp_width = F / tp
  if (c.num_moe_experts or 0) > 0 then
    mlp_width = c.moe_router_topk * c.moe_ffn_hidden_size + (c.moe_shared_expert_intermediate_size or 0)
  end
  local kept_tensors = {
    { H / hidden_t, ab }, { H / hidden_t, ab },                  -- layer input, pre-MLP residual (norms)
    { H, ab }, { H, ab },                                        -- norm outputs (whole, gathered under SP)
    { (Q + 2 * KV) / tp, ab }, { Q / tp, ab }, { KV / tp, ab }, { KV / tp, ab },   -- qkv; q, k after RoPE; v
    { Q / tp, ab }, { Q / tp, ab },                              -- attention output and its copy
    { 2 * mlp_width, ab }, { mlp_width, ab },                     -- FC1 output, activation
  }
  if c.activation ~= 'swiglu' then kept_tensors[11][1] = mlp_width end
  if ab < 4 then kept_tensors[#kept_tensors + 1] = { H, 4 } end                -- an f32 copy in bf16 runs
  if cp > 1 then kept_tensors[#kept_tensors + 1] = { 2 * KV * (cp - 1) / tp, ab } end   -- gathered k and v
  -- tensor parallelism's mappings (pmp.nn.parallel) are Lua autograd functions: what they make forward
  -- (the row-parallel outputs and their reduced copies) and backward (gradients passed through them, the
  -- collectives' results) waits for the collector like the rest. Measured per token and layer (TP 2
  -- and 4): 9 tensors of H, or with sequence parallelism 14 of H and 6 of H / t.
  if tp > 1 then
    kept_tensors[#kept_tensors + 1] = { (sp and 14 or 9) * H, ab }
    if sp then kept_tensors[#kept_tensors + 1] = { 6 * H / tp, ab } end
  end
  local layer_bytes = 0
  for _, t in ipairs(kept_tensors) do layer_bytes = layer_bytes + allocation(n * t[1] * t[2]) end
  local layer_input = allocation(n * H / hidden_t * ab)
  -- the last stage: final norm input and output, the logits and the loss's f32 log-probabilities; the
  -- vocabulary-parallel loss keeps five f32 tensors of the rank's logits (shifted, exponentials, and
  -- the gradient's three steps), and the vocabulary-parallel embedding three of H
  local output_tensors = allocation(n * H * ab) * 2 + allocation(n * V / tp * ab) + allocation(n * V / tp * 4) * (tp > 1 and 5 or 1)
  local embedding_tensors = tp > 1 and 3 * allocation(n * H / hidden_t * ab) or 0

  local ddp = dp > 1 or cp > 1 or layout.distributed_optimizer
  -- the ranks holding the same experts: pmp.dist's 'edp' group, dp x cp / ep (expert-parallel groups
  -- are consecutive blocks of the data- and context-parallel ranks of one tensor-parallel rank, which
  -- each hold their experts whole)
  if (dp * cp) % ep ~= 0 then
    error(string.format('estimate: expert-parallel size %d does not divide data- x context-parallel size %d', ep, dp * cp), 0)
  end
  local edp = dp * cp / ep
  local split_ok, stages = pcall(sharding.stage_layers, c.num_layers, pp, layout.first_stage_layers, layout.last_stage_layers)
  if not split_ok then error('estimate: ' .. tostring(stages):gsub('^[^:]*:%d+: ', ''), 0) end
  local result = { stages = {}, micro_batches = micro_batches, peak = 0 }
  for p = 0, pp - 1 do
    local is_first, is_last = p == 0, p == pp - 1
    local layers = stages[p + 1].count
    local params, expert_params = 0, 0
    for l = stages[p + 1].first + 1, stages[p + 1].first + layers do
      params, expert_params = params + counts.layers[l].dense, expert_params + counts.layers[l].expert
    end
    if is_first then params = params + counts.embedding end
    if is_last then
      params = params + counts.final_norm + counts.output_projection
      if not c.tie_embeddings or pp > 1 then params = params + counts.output end
    end
    local dense_params = params
    params = params + expert_params
    local weights = params * ab
    -- gradients: f32 bucket buffers under data parallelism (persistent; the experts' buckets of their
    -- own), else .grad in the parameter dtype
    local grad_buffer = ddp and bucketed(dense_params, 4, dp * cp) + bucketed(expert_params, 4, edp) or 0
    local grads = ddp and grad_buffer or params * ab
    local optimizer, optimizer_params = nil, params
    if layout.distributed_optimizer then
      -- per bucket: f32 moments and master of this rank's shard, and its low-precision copy; the
      -- experts' shards are over the expert-data-parallel ranks
      local dense_shard, expert_shard = dense_params / (dp * cp), expert_params / edp
      optimizer_params = dense_shard + expert_shard
      optimizer = 3 * (bucketed(dense_shard, 4, 1) + bucketed(expert_shard, 4, 1))
        + (ab < 4 and bucketed(dense_shard, ab, 1) + bucketed(expert_shard, ab, 1) or 0)
    else
      optimizer = params * (8 + (ab < 4 and 4 or 0))             -- moments, and f32 master weights for bf16
    end
    local in_flight = math.min(pp - p, micro_batches)
    local output_bytes = (is_last and output_tensors or 0) + (is_first and embedding_tensors or 0)
    local per_micro = layers * layer_bytes + output_bytes
    -- what one micro batch leaves for the collector: with recompute, the forward's dropped tensors
    -- and the re-run's, else its saved activations (freed only once their handles are collected)
    local dropped = layout.recompute == 'full' and 2 * layers * layer_bytes + output_bytes or per_micro
    local kept = layout.recompute == 'full' and layers * layer_input + output_bytes or per_micro
    local static = weights + grad_buffer + optimizer
    local live = static + in_flight * kept
    local slack = math.max(live, GC_STEP)
    -- data parallel: each micro batch's gradients reach Lua as tensors (dropped once added to the
    -- bucket, from the second micro batch on through an f32 sum); the distributed optimizer's
    -- reduce-scatter returns the averaged shard as a new f32 tensor and its all-gather the parameters
    local ddp_dropped = 0
    if ddp then
      ddp_dropped = params * (micro_batches * ab + (micro_batches - 1) * 4)
      if layout.distributed_optimizer then ddp_dropped = ddp_dropped + bucketed(optimizer_params, 4, 1) + bucketed(params, ab, dp * cp) end
    end
    local activations = math.min(micro_batches * dropped + ddp_dropped, in_flight * kept + slack)
    local transient = n * ((is_last and V / tp or 0) + 2 * mlp_width) * ab
    local peak = static + activations + (ddp and 0 or grads) + transient
    local live_peak = static + in_flight * kept + (layout.recompute == 'full' and layer_bytes or 0) + (ddp and 0 or grads)
      + transient
    result.stages[p + 1] = {
      stage = p, layers = layers, parameters = params, expert_parameters = expert_params,
      optimizer_parameters = optimizer_params, weights = weights, gradients = grads, optimizer = optimizer,
      activations = activations, in_flight = in_flight, transient = transient, peak = peak,
      live_peak = live_peak,
      run_peak = live_peak + math.max(live_peak, GC_STEP),
    }
    result.peak = math.max(result.peak, peak)
  end
  return result
end

--- Model FLOPs of one step (forward and backward, matmuls and attention, as Megatron counts them) and
--- the hardware FLOPs (with full recompute the layers' forward runs twice).
function M.flops(c, layout)
  local s = layout.seq_length
  local H, Q, KV, F = c.hidden_size, c.num_attention_heads * c.kv_channels, c.num_query_groups * c.kv_channels, c.ffn_hidden_size
  local per_width = H * (c.activation == 'swiglu' and 3 or 2)   -- an MLP's matmul weights per unit of width
  local moe = require 'pmp.nn.moe'
  local layers_forward = 0
  for l = 1, c.num_layers do
    local mlp = per_width * F
    if moe.is_moe_layer(c, l) then   -- the router, each token's top-k experts and the shared experts
      mlp = H * c.num_moe_experts + per_width * (c.moe_router_topk * c.moe_ffn_hidden_size
        + (c.moe_shared_expert_intermediate_size or 0))
    end
    -- per token: weights, and QK^T plus AV
    layers_forward = layers_forward + 2 * (H * (Q + 2 * KV) + Q * H + mlp) + 4 * s * Q
  end
  local forward = layers_forward + 2 * c.vocab_size * H
  local per_token = 3 * forward
  local tokens = (layout.global_batch or (layout.micro_batch or 1) * (layout.dp or 1)) * s
  local hardware = per_token + (layout.recompute == 'full' and layers_forward or 0)
  local world = (layout.tp or 1) * (layout.pp or 1) * (layout.dp or 1) * (layout.cp or 1)
  return { per_token = per_token, tokens = tokens, model = per_token * tokens, hardware = hardware * tokens,
    per_rank = hardware * tokens / world, world = world }
end

return M
