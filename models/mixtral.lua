-- Mixtral (HF model_type 'mixtral', MixtralForCausalLM): Mistral's attention (GQA, optional sliding
-- window) with a mixture of experts in every layer: a softmax router over num_local_experts SwiGLU
-- experts (w1 gate, w3 up, w2 down), the top num_experts_per_tok renormalised to sum to one.
local llama = require 'models.llama'
local mistral = require 'models.mistral'

local M = { model_type = 'mixtral', architectures = { 'MixtralForCausalLM' } }

M.mapping = {}
for _, entry in ipairs(llama.mapping) do M.mapping[#M.mapping + 1] = entry end
for _, entry in ipairs({
  { 'decoder.layers.{L}.mlp.router.weight', 'model.layers.{L}.block_sparse_moe.gate.weight' },
  { 'decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc1.weight',
    { 'model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight', 'model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight' },
    pack = 'gate_up' },
  { 'decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc2.weight',
    'model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight' },
}) do M.mapping[#M.mapping + 1] = entry end
M.ignore = llama.ignore

function M.config(read)
  local c = mistral.config(read)
  if (read:number('router_jitter_noise', 0) or 0) ~= 0 then
    read:fail('router_jitter_noise > 0 (noise on the router input) is not supported')
  end
  c.num_moe_experts = read:positive_int('num_local_experts')
  c.moe_router_topk = read:positive_int('num_experts_per_tok')
  c.moe_ffn_hidden_size = c.ffn_hidden_size
  if read:bool('output_router_logits', false) then c.moe_aux_loss_coeff = read:number('router_aux_loss_coef', 0.001) end
  return c
end

function M.hf_config(c)
  local hf = mistral.hf_config(c)
  local moe = require 'pmp.nn.moe'
  for layer = 1, c.num_layers do
    if not moe.is_moe_layer(c, layer) then error('mixtral: every layer is a mixture of experts; layer ' .. (layer - 1) .. ' is dense', 0) end
  end
  if c.moe_router_pre_softmax then error('mixtral: the router renormalises the top-k probabilities (no moe_router_pre_softmax)', 0) end
  if (c.moe_shared_expert_intermediate_size or 0) > 0 then error('mixtral: the family has no shared experts', 0) end
  hf.intermediate_size = c.moe_ffn_hidden_size
  hf.num_local_experts, hf.num_experts_per_tok = c.num_moe_experts, c.moe_router_topk
  hf.router_jitter_noise = 0
  return hf
end

return M
