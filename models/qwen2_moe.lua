-- Qwen2-MoE / Qwen1.5-MoE (HF model_type 'qwen2_moe', Qwen2MoeForCausalLM): Qwen2's attention (q/k/v
-- biases) with a mixture of experts in the layers decoder_sparse_step and mlp_only_layers select (the
-- others keep a dense MLP of intermediate_size): a softmax router, the top num_experts_per_tok of
-- num_experts experts of moe_intermediate_size (renormalised only with norm_topk_prob), plus a shared
-- expert of shared_expert_intermediate_size scaled by sigmoid(shared_expert_gate(x)).
-- Qwen3-MoE reuses the expert entries and layer selection below (models/qwen3_moe.lua).
local json = require 'pmp.json'
local llama = require 'models.llama'
local qwen2 = require 'models.qwen2'

local M = { model_type = 'qwen2_moe', architectures = { 'Qwen2MoeForCausalLM' } }

-- The routed experts (every Qwen MoE family).
M.expert_mapping = {
  { 'decoder.layers.{L}.mlp.router.weight', 'model.layers.{L}.mlp.gate.weight' },
  { 'decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc1.weight',
    { 'model.layers.{L}.mlp.experts.{E}.gate_proj.weight', 'model.layers.{L}.mlp.experts.{E}.up_proj.weight' },
    pack = 'gate_up' },
  { 'decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc2.weight', 'model.layers.{L}.mlp.experts.{E}.down_proj.weight' },
}

-- A family's mapping: its dense table, then the entries of each list in `more`.
function M.joined(base, ...)
  local out = {}
  for _, list in ipairs({ base, ... }) do
    for _, entry in ipairs(list) do out[#out + 1] = entry end
  end
  return out
end

M.mapping = M.joined(llama.mapping, M.expert_mapping, {
  { 'decoder.layers.{L}.mlp.shared_experts.linear_fc1.weight',
    { 'model.layers.{L}.mlp.shared_expert.gate_proj.weight', 'model.layers.{L}.mlp.shared_expert.up_proj.weight' },
    pack = 'gate_up' },
  { 'decoder.layers.{L}.mlp.shared_experts.linear_fc2.weight', 'model.layers.{L}.mlp.shared_expert.down_proj.weight' },
  { 'decoder.layers.{L}.mlp.shared_experts.gate_weight', 'model.layers.{L}.mlp.shared_expert_gate.weight' },
})
M.ignore = llama.ignore

-- The routed-expert settings every Qwen MoE config shares: which layers are MoE (as
-- moe_layer_freq's list), the expert count and width, top-k and its renormalisation.
function M.read_experts(read, c)
  local experts = read:number('num_experts') or read:number('num_local_experts')
  if experts == nil then read:fail("missing key 'num_experts'") end
  if experts ~= math.floor(experts) or experts < 1 then read:fail('num_experts must be a positive integer') end
  local step = read:number('decoder_sparse_step', 1)
  if step ~= math.floor(step) or step < 1 then read:fail('decoder_sparse_step must be a positive integer') end
  local dense = {}
  for _, layer in ipairs(read('mlp_only_layers') or {}) do dense[layer] = true end
  local pattern = {}
  for i = 1, c.num_layers do pattern[i] = (not dense[i - 1] and i % step == 0) and 1 or 0 end
  c.num_moe_experts = experts
  c.moe_layer_freq = pattern
  c.moe_router_topk = read:positive_int('num_experts_per_tok')
  c.moe_ffn_hidden_size = read:positive_int('moe_intermediate_size')
  c.moe_router_pre_softmax = not read:bool('norm_topk_prob', false)
  if read:bool('output_router_logits', false) then c.moe_aux_loss_coeff = read:number('router_aux_loss_coef', 0.001) end
  return c
end

-- The inverse of read_experts, into hf.
function M.write_experts(hf, c)
  local moe = require 'pmp.nn.moe'
  local dense = {}
  for layer = 1, c.num_layers do
    if not moe.is_moe_layer(c, layer) then dense[#dense + 1] = layer - 1 end
  end
  hf.num_experts, hf.num_experts_per_tok = c.num_moe_experts, c.moe_router_topk
  hf.moe_intermediate_size = c.moe_ffn_hidden_size
  hf.norm_topk_prob = not c.moe_router_pre_softmax
  hf.decoder_sparse_step, hf.mlp_only_layers = 1, json.array(dense)
  return hf
end

function M.config(read)
  local c = llama.base_config(read)
  c.add_qkv_bias = read:bool('qkv_bias', true)
  if read:bool('use_sliding_window', false) and read('layer_types') == nil then
    read:fail('use_sliding_window without layer_types is not supported')
  end
  c.sliding_window = qwen2.read_windows(read, c.num_layers)
  M.read_experts(read, c)
  c.moe_shared_expert_intermediate_size = read:positive_int('shared_expert_intermediate_size')
  c.moe_shared_expert_gate = true
  return c
end

function M.hf_config(c)
  if c.add_proj_bias or c.add_mlp_bias then error('qwen2_moe: the family has q/k/v biases and no others', 0) end
  if (c.moe_shared_expert_intermediate_size or 0) == 0 or not c.moe_shared_expert_gate then
    error('qwen2_moe: the family has a gated shared expert (moe_shared_expert_intermediate_size, moe_shared_expert_gate)', 0)
  end
  local hf = qwen2.write_windows(llama.base_hf_config(c), c)
  hf.qkv_bias = c.add_qkv_bias and true or false
  hf.shared_expert_intermediate_size = c.moe_shared_expert_intermediate_size
  return M.write_experts(hf, c)
end

return M
