-- Qwen3 (HF model_type 'qwen3', Qwen3ForCausalLM): the Llama block with RMSNorm over each query and key
-- head (q_norm / k_norm, weight [head_dim], applied before RoPE), an explicit head_dim (transformers'
-- default 128 when absent), optional attention_bias (q/k/v/o), and Qwen2's sliding-window settings.
local llama = require 'models.llama'
local qwen2 = require 'models.qwen2'

local M = { model_type = 'qwen3', architectures = { 'Qwen3ForCausalLM' } }

-- Llama's table plus the per-head norms.
M.mapping = {}
for _, entry in ipairs(llama.mapping) do M.mapping[#M.mapping + 1] = entry end
table.insert(M.mapping, 4, { 'decoder.layers.{L}.self_attention.q_layernorm.weight', 'model.layers.{L}.self_attn.q_norm.weight' })
table.insert(M.mapping, 5, { 'decoder.layers.{L}.self_attention.k_layernorm.weight', 'model.layers.{L}.self_attn.k_norm.weight' })
M.ignore = llama.ignore

function M.config(read)
  local c = llama.base_config(read, { head_dim = 128 })
  local attention_bias = read:bool('attention_bias', false)
  c.add_qkv_bias, c.add_proj_bias = attention_bias, attention_bias
  c.qk_layernorm = true
  c.sliding_window = qwen2.read_windows(read, c.num_layers)
  return c
end

function M.hf_config(c)
  if not c.qk_layernorm then error('qwen3: the family normalizes query and key heads (qk_layernorm)', 0) end
  if c.add_qkv_bias ~= c.add_proj_bias or c.add_mlp_bias then
    error('qwen3: attention_bias covers q/k/v and o together and the MLP has no bias', 0)
  end
  local hf = llama.base_hf_config(c)
  hf.attention_bias = c.add_qkv_bias and true or false
  return qwen2.write_windows(hf, c)
end

return M
