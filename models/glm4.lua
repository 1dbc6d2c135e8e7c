-- GLM-4 (HF model_type 'glm4', Glm4ForCausalLM: GLM-4-0414): models/glm.lua's block with GLM-4's
-- "sandwich" norms, RMSNorm over the attention output and over the MLP output before each residual add
-- (post_self_attn_layernorm and post_mlp_layernorm, the same names on both sides).
local glm = require 'models.glm'

local M = { model_type = 'glm4', architectures = { 'Glm4ForCausalLM' } }

M.mapping = {}
for _, entry in ipairs(glm.mapping) do
  M.mapping[#M.mapping + 1] = entry
  local pmp_name = entry[1]
  if pmp_name == 'decoder.layers.{L}.self_attention.linear_proj.weight' then
    M.mapping[#M.mapping + 1] = { 'decoder.layers.{L}.post_self_attn_layernorm.weight',
      'model.layers.{L}.post_self_attn_layernorm.weight' }
  elseif pmp_name == 'decoder.layers.{L}.mlp.linear_fc2.weight' then
    M.mapping[#M.mapping + 1] = { 'decoder.layers.{L}.post_mlp_layernorm.weight', 'model.layers.{L}.post_mlp_layernorm.weight' }
  end
end
M.ignore = glm.ignore

function M.config(read)
  local c = glm.base_config(read)
  c.post_self_attn_layernorm, c.post_mlp_layernorm = true, true
  return c
end

function M.hf_config(c)
  if not (c.post_self_attn_layernorm and c.post_mlp_layernorm) then
    error('glm4: the family normalizes the attention and MLP outputs (post_self_attn_layernorm, post_mlp_layernorm)', 0)
  end
  return glm.base_hf_config(c, 'glm4')
end

return M
