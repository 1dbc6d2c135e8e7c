-- DeepSeek-V3 (HF model_type 'deepseek_v3', DeepseekV3ForCausalLM): multi-latent attention
-- (pmp.nn.mla: q through q_lora_rank or directly, keys and values through the kv_lora_rank latent, RoPE
-- on qk_rope_head_dim dims shared by all heads' keys, interleaved pairs with rope_interleave) and, after
-- first_k_dense_replace dense layers, a mixture of experts: sigmoid scores with e_score_correction_bias
-- steering the choice (pmp's router expert_bias), the best topk_group of n_group groups, the chosen
-- scores normalised and times routed_scaling_factor, plus n_shared_experts always-on experts.
-- The multi-token-prediction layers (num_nextn_predict_layers) are not part of the causal LM.
local llama = require 'models.llama'
local qwen2_moe = require 'models.qwen2_moe'
local models = require 'pmp.models'

local M = { model_type = 'deepseek_v3', architectures = { 'DeepseekV3ForCausalLM' } }

local attention = {
  { 'decoder.layers.{L}.self_attention.linear_q_proj.weight', 'model.layers.{L}.self_attn.q_proj.weight' },
  { 'decoder.layers.{L}.self_attention.linear_q_down_proj.weight', 'model.layers.{L}.self_attn.q_a_proj.weight' },
  { 'decoder.layers.{L}.self_attention.q_layernorm.weight', 'model.layers.{L}.self_attn.q_a_layernorm.weight' },
  { 'decoder.layers.{L}.self_attention.linear_q_up_proj.weight', 'model.layers.{L}.self_attn.q_b_proj.weight' },
  { 'decoder.layers.{L}.self_attention.linear_kv_down_proj.weight', 'model.layers.{L}.self_attn.kv_a_proj_with_mqa.weight' },
  { 'decoder.layers.{L}.self_attention.kv_layernorm.weight', 'model.layers.{L}.self_attn.kv_a_layernorm.weight' },
  { 'decoder.layers.{L}.self_attention.linear_kv_up_proj.weight', 'model.layers.{L}.self_attn.kv_b_proj.weight' },
}

-- Llama's table without its q/k/v entries, then the MLA, router-bias and shared-expert entries.
local dense = {}
for _, entry in ipairs(llama.mapping) do
  if not entry[1]:find('linear_qkv', 1, true) then dense[#dense + 1] = entry end
end
M.mapping = qwen2_moe.joined(dense, attention, qwen2_moe.expert_mapping, {
  { 'decoder.layers.{L}.mlp.router.expert_bias', 'model.layers.{L}.mlp.gate.e_score_correction_bias' },
  { 'decoder.layers.{L}.mlp.shared_experts.linear_fc1.weight',
    { 'model.layers.{L}.mlp.shared_experts.gate_proj.weight', 'model.layers.{L}.mlp.shared_experts.up_proj.weight' },
    pack = 'gate_up' },
  { 'decoder.layers.{L}.mlp.shared_experts.linear_fc2.weight', 'model.layers.{L}.mlp.shared_experts.down_proj.weight' },
})
M.ignore = llama.ignore

local YARN_KEYS = { 'factor', 'original_max_position_embeddings', 'beta_fast', 'beta_slow', 'mscale', 'mscale_all_dim',
  'attention_factor' }

-- RoPE base and scaling: DeepSeek's YaRN (pmp.nn.yarn) here, the other kinds as every family reads them.
local function read_rope(read)
  local params = read('rope_parameters') or read('rope_scaling')
  if type(params) ~= 'table' or (params.rope_type or params.type) ~= 'yarn' then return models.read_rope(read, 10000) end
  local scaling = { type = 'yarn' }
  if params.truncate == false then scaling.truncate = false end
  for _, key in ipairs(YARN_KEYS) do
    local v = params[key]
    if key == 'original_max_position_embeddings' and v == nil then v = read:number('max_position_embeddings') end
    if v ~= nil and type(v) ~= 'number' then read:fail(string.format("rope scaling 'yarn': '%s' must be a number", key)) end
    scaling[key] = v
  end
  if not scaling.factor then read:fail("rope scaling 'yarn' needs the number 'factor'") end
  return (type(params.rope_theta) == 'number' and params.rope_theta) or read:number('rope_theta', 10000), scaling
end

-- What DeepSeek-V2 and V3 share: multi-latent attention, YaRN, first_k_dense_replace dense layers,
-- n_routed_experts experts of moe_intermediate_size, n_shared_experts ungated shared experts, and
-- routed_scaling_factor (models/deepseek_v2.lua reuses this).
function M.base_config(read)
  local act = read('hidden_act') or 'silu'
  if act ~= 'silu' then read:fail(string.format("hidden_act '%s' is not supported (only silu)", tostring(act))) end
  if read:bool('attention_bias', false) then read:fail('attention_bias is not supported') end
  local base, scaling = read_rope(read)
  local layers = read:positive_int('num_hidden_layers')
  local first_dense = read:number('first_k_dense_replace', 3)
  local pattern = {}
  for i = 1, layers do pattern[i] = (i - 1) >= first_dense and 1 or 0 end
  local rope_dim = read:positive_int('qk_rope_head_dim')
  return {
    num_layers = layers,
    hidden_size = read:positive_int('hidden_size'),
    ffn_hidden_size = read:positive_int('intermediate_size'),
    num_attention_heads = read:positive_int('num_attention_heads'),
    kv_channels = rope_dim,
    vocab_size = read:positive_int('vocab_size'),
    max_position_embeddings = read:number('max_position_embeddings'),
    normalization = 'RMSNorm',
    norm_epsilon = read:number('rms_norm_eps', 1e-6),
    activation = 'swiglu',
    rotary_base = base,
    rope_scaling = scaling,
    tie_embeddings = read:bool('tie_word_embeddings', false),
    multi_latent_attention = true,
    q_lora_rank = read:number('q_lora_rank'),
    kv_lora_rank = read:positive_int('kv_lora_rank'),
    qk_head_dim = read:positive_int('qk_nope_head_dim'),
    qk_pos_emb_head_dim = rope_dim,
    v_head_dim = read:positive_int('v_head_dim'),
    num_moe_experts = read:positive_int('n_routed_experts'),
    moe_layer_freq = pattern,
    moe_router_topk = read:positive_int('num_experts_per_tok'),
    moe_ffn_hidden_size = read:positive_int('moe_intermediate_size'),
    moe_shared_expert_intermediate_size = read:number('n_shared_experts', 0) * read:positive_int('moe_intermediate_size'),
    moe_router_topk_scaling_factor = read:number('routed_scaling_factor', 1),
  }
end

function M.config(read)
  local c = M.base_config(read)
  if not read:bool('norm_topk_prob', true) then read:fail('norm_topk_prob false is not supported (sigmoid routing normalises)') end
  c.mla_rope_interleaved = read:bool('rope_interleave', true)
  c.moe_router_score_function = 'sigmoid'
  c.moe_router_enable_expert_bias = true
  -- transformers scores a group by its two best experts
  c.moe_router_num_groups, c.moe_router_group_topk = read:number('n_group', 1), read:number('topk_group', 1)
  c.moe_router_group_score_topk = 2
  return c
end

-- The inverse of base_config: the keys DeepSeek-V2 and V3 share.
function M.base_hf_config(c, family)
  if not c.multi_latent_attention then error(family .. ': the family uses multi-latent attention', 0) end
  local moe = require 'pmp.nn.moe'
  local first_dense = 0
  while first_dense < c.num_layers and not moe.is_moe_layer(c, first_dense + 1) do first_dense = first_dense + 1 end
  for layer = first_dense + 1, c.num_layers do
    if not moe.is_moe_layer(c, layer) then error(family .. ': dense layers come first, then only MoE layers', 0) end
  end
  local shared = c.moe_shared_expert_intermediate_size or 0
  if shared % c.moe_ffn_hidden_size ~= 0 or c.moe_shared_expert_gate then
    error(family .. ': the shared experts are ungated multiples of moe_ffn_hidden_size', 0)
  end
  local hf = llama.base_hf_config(c)
  for key, value in pairs({
    head_dim = c.qk_pos_emb_head_dim,   -- transformers' rotary width for this family
    attention_bias = false,
    q_lora_rank = c.q_lora_rank or require('pmp.json').null,
    kv_lora_rank = c.kv_lora_rank,
    qk_nope_head_dim = c.qk_head_dim,
    qk_rope_head_dim = c.qk_pos_emb_head_dim,
    v_head_dim = c.v_head_dim,
    n_routed_experts = c.num_moe_experts,
    num_experts_per_tok = c.moe_router_topk,
    moe_intermediate_size = c.moe_ffn_hidden_size,
    n_shared_experts = shared / c.moe_ffn_hidden_size,
    first_k_dense_replace = first_dense,
    n_group = c.moe_router_num_groups or 1,
    topk_group = c.moe_router_group_topk or 1,
    routed_scaling_factor = c.moe_router_topk_scaling_factor or 1,
  }) do hf[key] = value end
  local s = c.rope_scaling
  if s and s.type == 'yarn' then
    hf.rope_parameters = { rope_type = 'yarn', rope_theta = c.rotary_base, truncate = s.truncate }
    for _, key in ipairs(YARN_KEYS) do hf.rope_parameters[key] = s[key] end
  end
  return hf
end

function M.hf_config(c)
  if c.moe_router_score_function ~= 'sigmoid' or not c.moe_router_enable_expert_bias then
    error('deepseek_v3: the router scores by sigmoid with an expert bias', 0)
  end
  if (c.moe_router_group_score_topk or 2) ~= 2 then error('deepseek_v3: groups are scored by their two best experts', 0) end
  local hf = M.base_hf_config(c, 'deepseek_v3')
  hf.rope_interleave = c.mla_rope_interleaved ~= false
  hf.norm_topk_prob = true
  hf.num_nextn_predict_layers = 0
  return hf
end

return M
