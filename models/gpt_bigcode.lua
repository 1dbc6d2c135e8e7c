-- GPT-BigCode: StarCoder 1 and SantaCoder (HF model_type 'gpt_bigcode', GPTBigCodeForCausalLM). GPT-2's
-- block (pre-LayerNorm with bias, learned absolute positions, GELU MLP, biases everywhere, tied output)
-- with multi-query attention: c_attn holds [q of every head; k; v], which is Megatron's per-group layout
-- for one KV group; without multi_query it holds [q_h; k_h; v_h] per head, Megatron's layout for one
-- group per head. Either way c_attn is linear_qkv as it is.
local activations = require 'pmp.models.activations'

local M = { model_type = 'gpt_bigcode', architectures = { 'GPTBigCodeForCausalLM' } }

local ACTIVATIONS = { 'gelu_pytorch_tanh', 'gelu_new', 'gelu', 'relu' }
local LAYER = 'transformer.h.{L}.'

M.mapping = {
  { 'embedding.word_embeddings.weight', 'transformer.wte.weight', pack = 'vocab', tp = 'vocab' },
  { 'embedding.position_embeddings.weight', 'transformer.wpe.weight' },
  { 'decoder.layers.{L}.input_layernorm.weight', LAYER .. 'ln_1.weight' },
  { 'decoder.layers.{L}.input_layernorm.bias', LAYER .. 'ln_1.bias' },
  { 'decoder.layers.{L}.self_attention.linear_qkv.weight', LAYER .. 'attn.c_attn.weight', tp = 'column' },
  { 'decoder.layers.{L}.self_attention.linear_qkv.bias', LAYER .. 'attn.c_attn.bias', tp = 'column' },
  { 'decoder.layers.{L}.self_attention.linear_proj.weight', LAYER .. 'attn.c_proj.weight', tp = 'row' },
  { 'decoder.layers.{L}.self_attention.linear_proj.bias', LAYER .. 'attn.c_proj.bias' },
  { 'decoder.layers.{L}.pre_mlp_layernorm.weight', LAYER .. 'ln_2.weight' },
  { 'decoder.layers.{L}.pre_mlp_layernorm.bias', LAYER .. 'ln_2.bias' },
  { 'decoder.layers.{L}.mlp.linear_fc1.weight', LAYER .. 'mlp.c_fc.weight', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc1.bias', LAYER .. 'mlp.c_fc.bias', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc2.weight', LAYER .. 'mlp.c_proj.weight', tp = 'row' },
  { 'decoder.layers.{L}.mlp.linear_fc2.bias', LAYER .. 'mlp.c_proj.bias' },
  { 'decoder.final_layernorm.weight', 'transformer.ln_f.weight' },
  { 'decoder.final_layernorm.bias', 'transformer.ln_f.bias' },
  { 'output_layer.weight', 'lm_head.weight', pack = 'vocab', tp = 'vocab', tied = true },
}

-- Buffers of old checkpoints (the causal mask).
M.ignore = { '^transformer%.h%.%d+%.attn%.masked_bias$', '^transformer%.h%.%d+%.attn%.bias$', '^transformer%.bias$' }

-- The value of the first of `keys` present (HF configs spell GPT-2's sizes n_embd ... or hidden_size ...).
local function first_of(read, keys, default)
  for _, key in ipairs(keys) do
    if read(key) ~= nil then return read:positive_int(key) end
  end
  if default ~= nil then return default end
  read:need(keys[1])
end

function M.config(read)
  local hidden = first_of(read, { 'n_embd', 'hidden_size' })
  local heads = first_of(read, { 'n_head', 'num_attention_heads' })
  if hidden % heads ~= 0 then read:fail(string.format('n_embd %d is not a multiple of n_head %d', hidden, heads)) end
  if not read:bool('scale_attn_weights', true) then
    read:fail('scale_attn_weights false (attention scores not divided by sqrt(head_dim)) is not supported')
  end
  if read:bool('add_cross_attention', false) then read:fail('add_cross_attention true is not supported') end
  return {
    num_layers = first_of(read, { 'n_layer', 'num_hidden_layers' }),
    hidden_size = hidden,
    ffn_hidden_size = read:number('n_inner') and read:positive_int('n_inner') or 4 * hidden,
    num_attention_heads = heads,
    num_query_groups = read:bool('multi_query', true) and 1 or heads,
    kv_channels = hidden / heads,
    vocab_size = read:positive_int('vocab_size'),
    max_position_embeddings = first_of(read, { 'n_positions', 'max_position_embeddings' }),
    position_embedding_type = 'learned_absolute',
    normalization = 'LayerNorm',
    norm_epsilon = read:number('layer_norm_epsilon', 1e-5),
    activation = activations.read(read, 'activation_function', 'gelu_pytorch_tanh', ACTIVATIONS),
    add_qkv_bias = true, add_proj_bias = true, add_mlp_bias = true,
    tie_embeddings = read:bool('tie_word_embeddings', true),
  }
end

function M.hf_config(c)
  if c.position_embedding_type ~= 'learned_absolute' or c.normalization ~= 'LayerNorm' or c.post_norm
      or c.parallel_residual or c.final_layernorm == false or not (c.add_qkv_bias and c.add_proj_bias and c.add_mlp_bias)
      or (c.num_query_groups ~= 1 and c.num_query_groups ~= c.num_attention_heads) then
    error('gpt_bigcode: the family has learned positions, pre-LayerNorm blocks, biases on every linear layer and ' ..
      'one KV head (multi_query) or one per query head', 0)
  end
  return {
    n_embd = c.hidden_size, n_inner = c.ffn_hidden_size, n_layer = c.num_layers, n_head = c.num_attention_heads,
    n_positions = c.max_position_embeddings, vocab_size = c.vocab_size, multi_query = c.num_query_groups == 1,
    layer_norm_epsilon = c.norm_epsilon, activation_function = activations.write(c.activation, ACTIVATIONS, 'gpt_bigcode'),
    scale_attn_weights = true, tie_word_embeddings = c.tie_embeddings and true or false,
    attn_pdrop = 0.0, embd_pdrop = 0.0, resid_pdrop = 0.0,
  }
end

return M
