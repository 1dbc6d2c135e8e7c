-- GLM (HF model_type 'glm', GlmForCausalLM: GLM-4-9B as transformers ships it): the Llama block with
-- rotary embeddings on interleaved pairs (2k, 2k + 1) of the first partial_rotary_factor of each head
-- (0.5 when the config does not say), a bias on q/k/v (attention_bias, default true; none on o_proj),
-- and the MLP's gate and up rows fused in one gate_up_proj, [gate; up] as Megatron's linear_fc1.
-- GLM-4 (models/glm4.lua) adds a norm after attention and after the MLP.
local llama = require 'models.llama'

local M = { model_type = 'glm', architectures = { 'GlmForCausalLM' } }

M.mapping = {
  { 'embedding.word_embeddings.weight', 'model.embed_tokens.weight', pack = 'vocab', tp = 'vocab' },
  { 'decoder.layers.{L}.input_layernorm.weight', 'model.layers.{L}.input_layernorm.weight' },
  { 'decoder.layers.{L}.self_attention.linear_qkv.weight',
    { 'model.layers.{L}.self_attn.q_proj.weight', 'model.layers.{L}.self_attn.k_proj.weight',
      'model.layers.{L}.self_attn.v_proj.weight' }, pack = 'qkv', tp = 'column' },
  { 'decoder.layers.{L}.self_attention.linear_qkv.bias',
    { 'model.layers.{L}.self_attn.q_proj.bias', 'model.layers.{L}.self_attn.k_proj.bias',
      'model.layers.{L}.self_attn.v_proj.bias' }, pack = 'qkv', tp = 'column' },
  { 'decoder.layers.{L}.self_attention.linear_proj.weight', 'model.layers.{L}.self_attn.o_proj.weight', tp = 'row' },
  { 'decoder.layers.{L}.pre_mlp_layernorm.weight', 'model.layers.{L}.post_attention_layernorm.weight' },
  { 'decoder.layers.{L}.mlp.linear_fc1.weight', 'model.layers.{L}.mlp.gate_up_proj.weight', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc2.weight', 'model.layers.{L}.mlp.down_proj.weight', tp = 'row' },
  { 'decoder.final_layernorm.weight', 'model.norm.weight' },
  { 'output_layer.weight', 'lm_head.weight', pack = 'vocab', tp = 'vocab', tied = true },
}

M.ignore = llama.ignore

-- transformers' GlmConfig defaults for keys a config.json may leave out
local DEFAULTS = { head_dim = 128, rms_norm_eps = 1.5625e-7, partial_rotary_factor = 0.5 }

-- Whether the config names a partial rotary factor in either spelling (see pmp.models.read_rope).
local function names_partial_rotary(read)
  local params = read('rope_parameters')
  local in_params = type(params) == 'table' and params.partial_rotary_factor ~= nil
  return in_params or read('partial_rotary_factor') ~= nil
end

-- The GPTModel config shared by glm and glm4.
function M.base_config(read)
  read:need('num_key_value_heads')   -- transformers' default (2) is GLM-4-9B's, not one to guess
  local c = llama.base_config(read, DEFAULTS)
  if not names_partial_rotary(read) then c.rotary_percent = DEFAULTS.partial_rotary_factor end
  c.rotary_interleaved = true
  c.add_qkv_bias = read:bool('attention_bias', true)
  return c
end

function M.base_hf_config(c, family)
  if not c.rotary_interleaved then error(family .. ': the family rotates interleaved pairs (rotary_interleaved)', 0) end
  if c.add_proj_bias or c.add_mlp_bias then error(family .. ': the family has biases on q/k/v only', 0) end
  local hf = llama.base_hf_config(c)
  hf.rope_parameters.partial_rotary_factor = c.rotary_percent or 1
  hf.attention_bias = c.add_qkv_bias and true or false
  return hf
end

M.config = M.base_config

function M.hf_config(c)
  if c.post_self_attn_layernorm or c.post_mlp_layernorm then
    error("glm: the family has no post-attention or post-MLP norms (model_type 'glm4' has)", 0)
  end
  return M.base_hf_config(c, 'glm')
end

return M
