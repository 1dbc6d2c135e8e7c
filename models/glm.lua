-- GLM (HF model_type 'glm', GlmForCausalLM: GLM-4-9B as transformers ships it): the Llama block with
-- rotary embeddings on interleaved pairs (2k, 2k + 1) of the first partial_rotary_factor of each head
-- (0.5 when the config does not say), a bias on q/k/v (attention_bias, default true; none on o_proj),
-- and the MLP's gate and up rows fused in one gate_up_proj, [gate; up] as Megatron's linear_fc1.
-- GLM-4 (models/glm4.lua) adds a norm after attention and after the MLP.
local llama = require 'models.llama'

local M = { model_type = 'glm', architectures = { 'GlmForCausalLM' } }

-- Llama's table with the MLP's gate and up rows in one tensor and without the biases GLM never has.
M.mapping = {}
for _, entry in ipairs(llama.mapping) do
  local pmp_name = entry[1]
  if pmp_name == 'decoder.layers.{L}.mlp.linear_fc1.weight' then
    M.mapping[#M.mapping + 1] = { pmp_name, 'model.layers.{L}.mlp.gate_up_proj.weight', tp = 'column' }
  elseif not pmp_name:match('linear_proj%.bias$') and not pmp_name:match('linear_fc[12]%.bias$') then
    M.mapping[#M.mapping + 1] = entry
  end
end

M.ignore = llama.ignore

-- transformers' GlmConfig defaults for keys a config.json may leave out
local DEFAULTS = { head_dim = 128, rms_norm_eps = 1.5625e-7, partial_rotary_factor = 0.5 }

-- Whether the config names a partial rotary factor in either spelling (see pmp.models.read_rope).
local function names_partial_rotary(read)
  local params = read('rope_parameters')
  local in_params = type(params) == 'table' and type(params.partial_rotary_factor) == 'number'
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
