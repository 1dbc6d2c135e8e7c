-- StarCoder 2 (HF model_type 'starcoder2', Starcoder2ForCausalLM): Llama's attention (GQA, RoPE, q/k/v/o
-- in separate tensors) with LayerNorm with bias, a GELU MLP (c_fc, c_proj) instead of SwiGLU, biases on
-- every linear layer (use_bias), a sliding window over the last `sliding_window` keys in every layer
-- (null: full attention), output tied to the embedding by default.
local activations = require 'pmp.models.activations'
local models = require 'pmp.models'
local json = require 'pmp.json'

local M = { model_type = 'starcoder2', architectures = { 'Starcoder2ForCausalLM' } }

local ACTIVATIONS = { 'gelu_pytorch_tanh', 'gelu_new', 'gelu', 'relu' }
local LAYER = 'model.layers.{L}.'

M.mapping = {
  { 'embedding.word_embeddings.weight', 'model.embed_tokens.weight', pack = 'vocab', tp = 'vocab' },
  { 'decoder.layers.{L}.input_layernorm.weight', LAYER .. 'input_layernorm.weight' },
  { 'decoder.layers.{L}.input_layernorm.bias', LAYER .. 'input_layernorm.bias' },
  { 'decoder.layers.{L}.self_attention.linear_qkv.weight',
    { LAYER .. 'self_attn.q_proj.weight', LAYER .. 'self_attn.k_proj.weight', LAYER .. 'self_attn.v_proj.weight' },
    pack = 'qkv', tp = 'column' },
  { 'decoder.layers.{L}.self_attention.linear_qkv.bias',
    { LAYER .. 'self_attn.q_proj.bias', LAYER .. 'self_attn.k_proj.bias', LAYER .. 'self_attn.v_proj.bias' },
    pack = 'qkv', tp = 'column' },
  { 'decoder.layers.{L}.self_attention.linear_proj.weight', LAYER .. 'self_attn.o_proj.weight', tp = 'row' },
  { 'decoder.layers.{L}.self_attention.linear_proj.bias', LAYER .. 'self_attn.o_proj.bias' },
  { 'decoder.layers.{L}.pre_mlp_layernorm.weight', LAYER .. 'post_attention_layernorm.weight' },
  { 'decoder.layers.{L}.pre_mlp_layernorm.bias', LAYER .. 'post_attention_layernorm.bias' },
  { 'decoder.layers.{L}.mlp.linear_fc1.weight', LAYER .. 'mlp.c_fc.weight', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc1.bias', LAYER .. 'mlp.c_fc.bias', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc2.weight', LAYER .. 'mlp.c_proj.weight', tp = 'row' },
  { 'decoder.layers.{L}.mlp.linear_fc2.bias', LAYER .. 'mlp.c_proj.bias' },
  { 'decoder.final_layernorm.weight', 'model.norm.weight' },
  { 'decoder.final_layernorm.bias', 'model.norm.bias' },
  { 'output_layer.weight', 'lm_head.weight', pack = 'vocab', tp = 'vocab', tied = true },
}

M.ignore = { '%.rotary_emb%.inv_freq$' }

function M.config(read)
  local hidden = read:positive_int('hidden_size')
  local heads = read:positive_int('num_attention_heads')
  if hidden % heads ~= 0 then read:fail(string.format('hidden_size %d is not a multiple of num_attention_heads %d', hidden, heads)) end
  local groups = read:positive_int('num_key_value_heads', heads)
  if heads % groups ~= 0 then
    read:fail(string.format('num_attention_heads %d is not a multiple of num_key_value_heads %d', heads, groups))
  end
  -- keys of the original StarCoder 2 configs that transformers ignores: only the values it implements
  if read('norm_type') ~= nil and read('norm_type') ~= 'layer_norm' then
    read:fail(string.format("norm_type '%s' is not supported (only layer_norm)", tostring(read('norm_type'))))
  end
  if read('mlp_type') ~= nil and read('mlp_type') ~= 'default' then
    read:fail(string.format("mlp_type '%s' is not supported (only default)", tostring(read('mlp_type'))))
  end
  local base, scaling, percent = models.read_rope(read)
  local bias = read:bool('use_bias', true)
  return {
    num_layers = read:positive_int('num_hidden_layers'),
    hidden_size = hidden,
    ffn_hidden_size = read:positive_int('intermediate_size'),
    num_attention_heads = heads,
    num_query_groups = groups,
    kv_channels = hidden / heads,
    vocab_size = read:positive_int('vocab_size'),
    max_position_embeddings = read:number('max_position_embeddings'),
    normalization = 'LayerNorm',
    norm_epsilon = read:number('norm_epsilon', 1e-5),
    activation = activations.read(read, 'hidden_act', 'gelu_pytorch_tanh', ACTIVATIONS),
    rotary_base = base, rope_scaling = scaling, rotary_percent = percent,
    sliding_window = read:number('sliding_window'),
    add_qkv_bias = bias, add_proj_bias = bias, add_mlp_bias = bias,
    tie_embeddings = read:bool('tie_word_embeddings', true),
  }
end

function M.hf_config(c)
  local bias = c.add_qkv_bias or false
  if c.position_embedding_type == 'learned_absolute' or c.normalization ~= 'LayerNorm' or c.post_norm
      or c.parallel_residual or c.final_layernorm == false or (c.add_proj_bias or false) ~= bias
      or (c.add_mlp_bias or false) ~= bias or c.kv_channels * c.num_attention_heads ~= c.hidden_size then
    error('starcoder2: the family has RoPE, pre-LayerNorm blocks, head_dim = hidden_size / heads and biases on ' ..
      'every linear layer or none', 0)
  end
  if type(c.sliding_window) == 'table' then error('starcoder2: the sliding window is the same in every layer', 0) end
  return {
    hidden_size = c.hidden_size, intermediate_size = c.ffn_hidden_size, num_hidden_layers = c.num_layers,
    num_attention_heads = c.num_attention_heads, num_key_value_heads = c.num_query_groups, vocab_size = c.vocab_size,
    max_position_embeddings = c.max_position_embeddings or c.seq_length or 4096, norm_epsilon = c.norm_epsilon,
    hidden_act = activations.write(c.activation, ACTIVATIONS, 'starcoder2'), use_bias = bias,
    rope_parameters = models.write_rope(c),
    sliding_window = (c.sliding_window and c.sliding_window > 0) and c.sliding_window or json.null,
    tie_word_embeddings = c.tie_embeddings and true or false,
  }
end

return M
