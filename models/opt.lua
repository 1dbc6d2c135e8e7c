-- OPT and Galactica (HF model_type 'opt', OPTForCausalLM): learned absolute positions (the table has 2
-- extra leading rows, OPT's offset), LayerNorm with bias before each branch (do_layer_norm_before) or
-- after each residual sum (OPT-350m), ReLU or GELU MLP, biases everywhere unless enable_bias is false,
-- output tied to the embedding by default. A word_embed_proj_dim other than hidden_size (OPT-350m) makes
-- the word embeddings and the output layer that wide, with project_in after the lookup and project_out
-- before the output layer (GPTModel's word_embedding_size and its two projections).
local activations = require 'pmp.models.activations'
local json = require 'pmp.json'

local M = { model_type = 'opt', architectures = { 'OPTForCausalLM' } }

local ACTIVATIONS = { 'relu', 'gelu', 'gelu_new', 'gelu_pytorch_tanh' }
local LAYER = 'model.decoder.layers.{L}.'

M.mapping = {
  { 'embedding.word_embeddings.weight', 'model.decoder.embed_tokens.weight', pack = 'vocab', tp = 'vocab' },
  { 'embedding.position_embeddings.weight', 'model.decoder.embed_positions.weight', pack = 'offset', offset = 2 },
  { 'embedding.input_projection.weight', 'model.decoder.project_in.weight' },
  { 'decoder.layers.{L}.input_layernorm.weight', LAYER .. 'self_attn_layer_norm.weight' },
  { 'decoder.layers.{L}.input_layernorm.bias', LAYER .. 'self_attn_layer_norm.bias' },
  { 'decoder.layers.{L}.self_attention.linear_qkv.weight',
    { LAYER .. 'self_attn.q_proj.weight', LAYER .. 'self_attn.k_proj.weight', LAYER .. 'self_attn.v_proj.weight' },
    pack = 'qkv', tp = 'column' },
  { 'decoder.layers.{L}.self_attention.linear_qkv.bias',
    { LAYER .. 'self_attn.q_proj.bias', LAYER .. 'self_attn.k_proj.bias', LAYER .. 'self_attn.v_proj.bias' },
    pack = 'qkv', tp = 'column' },
  { 'decoder.layers.{L}.self_attention.linear_proj.weight', LAYER .. 'self_attn.out_proj.weight', tp = 'row' },
  { 'decoder.layers.{L}.self_attention.linear_proj.bias', LAYER .. 'self_attn.out_proj.bias' },
  { 'decoder.layers.{L}.pre_mlp_layernorm.weight', LAYER .. 'final_layer_norm.weight' },
  { 'decoder.layers.{L}.pre_mlp_layernorm.bias', LAYER .. 'final_layer_norm.bias' },
  { 'decoder.layers.{L}.mlp.linear_fc1.weight', LAYER .. 'fc1.weight', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc1.bias', LAYER .. 'fc1.bias', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc2.weight', LAYER .. 'fc2.weight', tp = 'row' },
  { 'decoder.layers.{L}.mlp.linear_fc2.bias', LAYER .. 'fc2.bias' },
  { 'decoder.final_layernorm.weight', 'model.decoder.final_layer_norm.weight' },
  { 'decoder.final_layernorm.bias', 'model.decoder.final_layer_norm.bias' },
  { 'output_projection.weight', 'model.decoder.project_out.weight' },
  { 'output_layer.weight', 'lm_head.weight', pack = 'vocab', tp = 'vocab', tied = true },
}

function M.config(read)
  local hidden = read:positive_int('hidden_size')
  local heads = read:positive_int('num_attention_heads')
  if hidden % heads ~= 0 then read:fail(string.format('hidden_size %d is not a multiple of num_attention_heads %d', hidden, heads)) end
  local width = read:positive_int('word_embed_proj_dim', hidden)
  if not read:bool('layer_norm_elementwise_affine', true) then
    read:fail('layer_norm_elementwise_affine false (LayerNorm without weight and bias) is not supported')
  end
  local pre_norm = read:bool('do_layer_norm_before', true)
  local bias = read:bool('enable_bias', true)
  return {
    num_layers = read:positive_int('num_hidden_layers'),
    hidden_size = hidden,
    word_embedding_size = width ~= hidden and width or nil,
    ffn_hidden_size = read:positive_int('ffn_dim'),
    num_attention_heads = heads,
    num_query_groups = heads,
    kv_channels = hidden / heads,
    vocab_size = read:positive_int('vocab_size'),
    max_position_embeddings = read:positive_int('max_position_embeddings'),
    position_embedding_type = 'learned_absolute',
    normalization = 'LayerNorm',
    norm_epsilon = 1e-5,
    activation = activations.read(read, 'activation_function', 'relu', ACTIVATIONS),
    post_norm = not pre_norm,
    final_layernorm = pre_norm and not read:bool('_remove_final_layer_norm', false),
    add_qkv_bias = bias, add_proj_bias = bias, add_mlp_bias = bias,
    tie_embeddings = read:bool('tie_word_embeddings', true),
  }
end

function M.hf_config(c)
  local bias = c.add_qkv_bias or false
  if c.position_embedding_type ~= 'learned_absolute' or c.normalization ~= 'LayerNorm' or c.num_query_groups ~= c.num_attention_heads
      or (c.add_proj_bias or false) ~= bias or (c.add_mlp_bias or false) ~= bias or c.parallel_residual then
    error('opt: the family has learned positions, LayerNorm, one KV head per query head, biases on every linear ' ..
      'layer or none, and sequential residuals', 0)
  end
  if (c.final_layernorm ~= false) == (c.post_norm or false) then
    error('opt: pre-norm models have a final LayerNorm and post-norm models none', 0)
  end
  return {
    hidden_size = c.hidden_size, word_embed_proj_dim = c.word_embedding_size or c.hidden_size, ffn_dim = c.ffn_hidden_size,
    num_hidden_layers = c.num_layers, num_attention_heads = c.num_attention_heads, vocab_size = c.vocab_size,
    max_position_embeddings = c.max_position_embeddings, do_layer_norm_before = not c.post_norm,
    activation_function = activations.write(c.activation, ACTIVATIONS, 'opt'), enable_bias = bias,
    layer_norm_elementwise_affine = true, tie_word_embeddings = c.tie_embeddings and true or false,
    dropout = 0.0, attention_dropout = 0.0, pad_token_id = json.null,
  }
end

return M
