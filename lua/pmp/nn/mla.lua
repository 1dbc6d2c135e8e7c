--- Multi-latent attention (DeepSeek-V2/V3) in Megatron-Core's structure and names (MLASelfAttention),
--- the self_attention of every layer when config.multi_latent_attention is set:
---   linear_q_proj [heads x (qk_head_dim + qk_pos_emb_head_dim), hidden]       without q_lora_rank, else
---   linear_q_down_proj [q_lora_rank, hidden], q_layernorm, linear_q_up_proj   (queries through a low rank)
---   linear_kv_down_proj [kv_lora_rank + qk_pos_emb_head_dim, hidden]          the compressed latent and the
---                                                                            one rotary key all heads share
---   kv_layernorm [kv_lora_rank], linear_kv_up_proj [heads x (qk_head_dim + v_head_dim), kv_lora_rank]
---   linear_proj [hidden, heads x v_head_dim]
--- Each head's query and key are [qk_head_dim no-RoPE dims; qk_pos_emb_head_dim RoPE dims] (Megatron's
--- --qk-head-dim and --qk-pos-emb-head-dim, HF's qk_nope_head_dim and qk_rope_head_dim); the RoPE dims
--- rotate adjacent pairs unless config.mla_rope_interleaved is false. Scores are scaled by
--- 1/sqrt(qk_head_dim + qk_pos_emb_head_dim), times mscale^2 under YaRN with mscale_all_dim (pmp.nn.yarn).
--- Generation caches the normalised latent and the rotated shared key, not the per-head keys and values.
--- Tensor parallelism (pmp.nn.parallel.tensor_parallel) splits the heads as Megatron-Core does: the
--- down-projections and their norms whole on every rank, the up-projections (and linear_q_proj)
--- column-parallel, linear_proj row-parallel; the shared rotary key is used by every rank's heads, so
--- its gradient is summed over the group (gathered along the sequence under sequence parallelism, where
--- the down-projections run on this rank's slice of it).
local tensor = require 'pmp.tensor'
local Module = require 'pmp.nn.module'
local layers = require 'pmp.nn.layers'
local F = require 'pmp.nn.functional'
local yarn = require 'pmp.nn.yarn'

local M = {}

local function linear(config, inputs, outputs, std)
  return layers.Linear(inputs, outputs, { bias = false, init_std = std or config.init_std, dtype = config.dtype,
    init = config.init })
end

local function rms_norm(config, dim) return layers.RMSNorm(dim, { eps = config.norm_epsilon, dtype = config.dtype }) end

--- Checks the MLA keys of a GPTModel config, naming the key.
function M.check_config(c)
  if not c.multi_latent_attention then return c end
  for _, key in ipairs({ 'kv_lora_rank', 'qk_head_dim', 'qk_pos_emb_head_dim', 'v_head_dim' }) do
    local v = c[key]
    if type(v) ~= 'number' or v < 1 or v ~= math.floor(v) then
      error(string.format("transformer config: multi_latent_attention needs a positive integer '%s', got %s", key,
        tostring(v)), 0)
    end
  end
  if c.qk_pos_emb_head_dim % 2 ~= 0 then
    error(string.format('transformer config: qk_pos_emb_head_dim %d must be even (RoPE rotates pairs)', c.qk_pos_emb_head_dim), 0)
  end
  return c
end

M.MLASelfAttention = Module:extend('MLASelfAttention')
function M.MLASelfAttention:init(config)
  self.config = config
  self.num_heads = config.num_attention_heads   -- this rank's, under tensor parallelism
  local H, hidden = config.num_attention_heads, config.hidden_size
  local dn, dr, dv = config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim
  if config.q_lora_rank then
    self.linear_q_down_proj = linear(config, hidden, config.q_lora_rank)
    self.q_layernorm = rms_norm(config, config.q_lora_rank)
    self.linear_q_up_proj = linear(config, config.q_lora_rank, H * (dn + dr))
  else
    self.linear_q_proj = linear(config, hidden, H * (dn + dr))
  end
  self.linear_kv_down_proj = linear(config, hidden, config.kv_lora_rank + dr)
  self.kv_layernorm = rms_norm(config, config.kv_lora_rank)
  self.linear_kv_up_proj = linear(config, config.kv_lora_rank, H * (dn + dv))
  self.linear_proj = linear(config, H * dv, hidden, config.output_init_std)
end

-- The rotary tables for adjacent pairs: each frequency twice in a row, where the tables hold
-- [frequencies; frequencies].
local function pairwise(table_)
  local shape = table_.shape
  local half = shape[#shape] / 2
  local first = table_:narrow(#shape, 1, half):unsqueeze(#shape + 1)
  local expanded = {}
  for k, v in ipairs(shape) do expanded[k] = v end
  expanded[#shape] = half
  expanded[#shape + 1] = 2
  return first:expand(expanded):reshape(shape)
end

local function pad_last(t, size)
  local have = t:size(-1)
  if have == size then return t end
  local shape = t.shape
  shape[#shape] = size - have
  return tensor.cat({ t, tensor.zeros(shape, { dtype = t.dtype }) }, #shape)
end

function M.MLASelfAttention:forward(x, rope)
  local c = self.config
  if rope and rope.context_parallel then error('MLASelfAttention: context parallelism is not supported yet', 2) end
  local H, dn, dr, dv = self.num_heads, c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim
  local q = self.linear_q_proj and self.linear_q_proj(x)
    or self.linear_q_up_proj(self.q_layernorm(self.linear_q_down_proj(x)))
  local B, T = q:size(1), q:size(2)   -- the whole sequence, also when x is a sequence-parallel slice
  q = q:view(B, T, H, dn + dr):transpose(2, 3)
  local q_nope, q_rot = q:narrow(4, 1, dn), q:narrow(4, dn + 1, dr)
  local compressed = self.linear_kv_down_proj(x)
  local latent = self.kv_layernorm(compressed:narrow(3, 1, c.kv_lora_rank))
  local k_rot = compressed:narrow(3, c.kv_lora_rank + 1, dr)
  local tp = rawget(self, 'tensor_parallel')
  if tp then
    local parallel = require 'pmp.nn.parallel'
    k_rot = tp.sequence_parallel and parallel.gather_from_sequence_parallel_region(k_rot, tp.group)
      or parallel.copy_to_tensor_parallel_region(k_rot, tp.group)
  end
  k_rot = k_rot:unsqueeze(2)   -- [B, 1, T, dr]
  if rope then
    local interleaved = c.mla_rope_interleaved ~= false
    local cos, sin = rope.cos, rope.sin
    if interleaved then cos, sin = pairwise(cos), pairwise(sin) end
    q_rot = F.rope(q_rot, cos, sin, interleaved)
    k_rot = F.rope(k_rot, cos, sin, interleaved)
  end
  if rope and rope.cache then
    local past = rope.cache[self]
    if past then
      latent = tensor.cat({ past.latent, latent }, 2)
      k_rot = tensor.cat({ past.k_rot, k_rot }, 3)
    end
    rope.cache[self] = { latent = latent, k_rot = k_rot }
  end
  local kv = self.linear_kv_up_proj(latent)
  local S = kv:size(2)   -- the cached and new keys (the whole sequence under sequence parallelism)
  kv = kv:view(B, S, H, dn + dv):transpose(2, 3)
  local k = tensor.cat({ kv:narrow(4, 1, dn), k_rot:expand(B, H, S, dr) }, 4)
  local v = kv:narrow(4, dn + 1, dv)
  q = tensor.cat({ q_nope, q_rot }, 4)
  -- one head size for the attention kernel: zero dims change no score and no kept output
  local D = math.max(dn + dr, dv)
  local scale = yarn.softmax_scale_factor(c.rope_scaling) / math.sqrt(dn + dr)
  local o = F.attention(pad_last(q, D), pad_last(k, D), pad_last(v:contiguous(), D), { causal = true, scale = scale,
    first_key = rope and rope.first_key })
  o = o:narrow(4, 1, dv):transpose(2, 3):reshape(B, T, H * dv)
  return self.linear_proj(o)
end

function M.MLASelfAttention:extra_repr()
  local c = self.config
  return string.format('q_lora=%s, kv_lora=%d, qk=%d+%d, v=%d', tostring(c.q_lora_rank or 'none'), c.kv_lora_rank,
    c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim)
end

return M
