-- Llama 1/2/3/3.1/3.2 (HF model_type 'llama', LlamaForCausalLM): pre-RMSNorm decoder, RoPE rotate-half
-- (optionally scaled: linear, llama3), GQA, SwiGLU, optional attention_bias (q/k/v/o) and mlp_bias.
-- Mistral, Qwen2 and Qwen3 reuse the pieces below (see models/mistral.lua, qwen2.lua, qwen3.lua).
local models = require 'pmp.models'

local M = { model_type = 'llama', architectures = { 'LlamaForCausalLM' } }

-- THE mapping between pmp (Megatron-Core) and HF names/layouts; it drives HF loading, HF export and
-- Megatron conversion (see lua/pmp/models/init.lua for what pack / tp / tied mean).
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
  { 'decoder.layers.{L}.self_attention.linear_proj.bias', 'model.layers.{L}.self_attn.o_proj.bias' },
  { 'decoder.layers.{L}.pre_mlp_layernorm.weight', 'model.layers.{L}.post_attention_layernorm.weight' },
  { 'decoder.layers.{L}.mlp.linear_fc1.weight',
    { 'model.layers.{L}.mlp.gate_proj.weight', 'model.layers.{L}.mlp.up_proj.weight' }, pack = 'gate_up', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc1.bias',
    { 'model.layers.{L}.mlp.gate_proj.bias', 'model.layers.{L}.mlp.up_proj.bias' }, pack = 'gate_up', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc2.weight', 'model.layers.{L}.mlp.down_proj.weight', tp = 'row' },
  { 'decoder.layers.{L}.mlp.linear_fc2.bias', 'model.layers.{L}.mlp.down_proj.bias' },
  { 'decoder.final_layernorm.weight', 'model.norm.weight' },
  { 'output_layer.weight', 'lm_head.weight', pack = 'vocab', tp = 'vocab', tied = true },
}

-- Non-parameter buffers that old checkpoints carry.
M.ignore = { '%.rotary_emb%.inv_freq$' }

-- The config keys every Llama-style family shares; returns the GPTModel config. `defaults` holds the
-- family's HF defaults for keys a config.json may leave out (head_dim, rms_norm_eps, rope_theta).
function M.base_config(read, defaults)
  defaults = defaults or {}
  local act = read('hidden_act') or 'silu'
  if act ~= 'silu' and act ~= 'swish' then read:fail(string.format("hidden_act '%s' is not supported (only silu)", tostring(act))) end
  local heads = read:positive_int('num_attention_heads')
  local hidden = read:positive_int('hidden_size')
  local base, scaling, percent = models.read_rope(read, defaults.rope_theta)
  local head_dim = read:number('head_dim') or defaults.head_dim
  if head_dim == nil then
    if hidden % heads ~= 0 then read:fail(string.format('hidden_size %d is not a multiple of num_attention_heads %d', hidden, heads)) end
    head_dim = hidden / heads
  end
  local groups = read:number('num_key_value_heads') or heads
  if heads % groups ~= 0 then
    read:fail(string.format('num_attention_heads %d is not a multiple of num_key_value_heads %d', heads, groups))
  end
  return {
    num_layers = read:positive_int('num_hidden_layers'),
    hidden_size = hidden,
    ffn_hidden_size = read:positive_int('intermediate_size'),
    num_attention_heads = heads,
    num_query_groups = groups,
    kv_channels = head_dim,
    vocab_size = read:positive_int('vocab_size'),
    max_position_embeddings = read:number('max_position_embeddings'),
    normalization = 'RMSNorm',
    norm_epsilon = read:number('rms_norm_eps', defaults.rms_norm_eps or 1e-6),
    activation = 'swiglu',
    rotary_base = base,
    rope_scaling = scaling,
    rotary_percent = percent,
    tie_embeddings = read:bool('tie_word_embeddings', defaults.tie_word_embeddings or false),
  }
end

-- The keys every Llama-style family writes (transformers v5 spelling).
function M.base_hf_config(c)
  return {
    hidden_act = 'silu',
    hidden_size = c.hidden_size,
    intermediate_size = c.ffn_hidden_size,
    num_hidden_layers = c.num_layers,
    num_attention_heads = c.num_attention_heads,
    num_key_value_heads = c.num_query_groups,
    head_dim = c.kv_channels,
    vocab_size = c.vocab_size,
    max_position_embeddings = c.max_position_embeddings or c.seq_length or 2048,
    rms_norm_eps = c.norm_epsilon,
    rope_parameters = models.write_rope(c),
    tie_word_embeddings = c.tie_embeddings and true or false,
  }
end

function M.config(read)
  local c = M.base_config(read)
  local attention_bias = read:bool('attention_bias', false)
  c.add_qkv_bias, c.add_proj_bias = attention_bias, attention_bias
  c.add_mlp_bias = read:bool('mlp_bias', false)
  return c
end

function M.hf_config(c)
  local hf = M.base_hf_config(c)
  if (c.add_qkv_bias or false) ~= (c.add_proj_bias or false) then
    error('llama: attention_bias covers q/k/v and o together; this model has add_qkv_bias ~= add_proj_bias', 0)
  end
  hf.attention_bias = c.add_qkv_bias and true or false
  hf.mlp_bias = c.add_mlp_bias and true or false
  return hf
end

return M
