-- BLOOM (HF model_type 'bloom', BloomForCausalLM): no position embedding but ALiBi, a LayerNorm on the
-- word embeddings, LayerNorm with bias everywhere, biases on every linear layer, a GELU (tanh) MLP of 4x
-- the hidden size, output tied to the embedding. query_key_value holds [q_h; k_h; v_h] for each head h in
-- turn, which is Megatron's linear_qkv with one head per query group: it maps as it is.
local M = { model_type = 'bloom', architectures = { 'BloomForCausalLM' } }

-- bigscience's published files were saved from BloomModel: 'h.0...' for 'transformer.h.0...', no lm_head
M.base_prefix = 'transformer.'

M.mapping = {
  { 'embedding.word_embeddings.weight', 'transformer.word_embeddings.weight', pack = 'vocab', tp = 'vocab' },
  { 'embedding.word_embeddings_layernorm.weight', 'transformer.word_embeddings_layernorm.weight' },
  { 'embedding.word_embeddings_layernorm.bias', 'transformer.word_embeddings_layernorm.bias' },
  { 'decoder.layers.{L}.input_layernorm.weight', 'transformer.h.{L}.input_layernorm.weight' },
  { 'decoder.layers.{L}.input_layernorm.bias', 'transformer.h.{L}.input_layernorm.bias' },
  { 'decoder.layers.{L}.self_attention.linear_qkv.weight', 'transformer.h.{L}.self_attention.query_key_value.weight',
    tp = 'column' },
  { 'decoder.layers.{L}.self_attention.linear_qkv.bias', 'transformer.h.{L}.self_attention.query_key_value.bias',
    tp = 'column' },
  { 'decoder.layers.{L}.self_attention.linear_proj.weight', 'transformer.h.{L}.self_attention.dense.weight', tp = 'row' },
  { 'decoder.layers.{L}.self_attention.linear_proj.bias', 'transformer.h.{L}.self_attention.dense.bias' },
  { 'decoder.layers.{L}.pre_mlp_layernorm.weight', 'transformer.h.{L}.post_attention_layernorm.weight' },
  { 'decoder.layers.{L}.pre_mlp_layernorm.bias', 'transformer.h.{L}.post_attention_layernorm.bias' },
  { 'decoder.layers.{L}.mlp.linear_fc1.weight', 'transformer.h.{L}.mlp.dense_h_to_4h.weight', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc1.bias', 'transformer.h.{L}.mlp.dense_h_to_4h.bias', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc2.weight', 'transformer.h.{L}.mlp.dense_4h_to_h.weight', tp = 'row' },
  { 'decoder.layers.{L}.mlp.linear_fc2.bias', 'transformer.h.{L}.mlp.dense_4h_to_h.bias' },
  { 'decoder.final_layernorm.weight', 'transformer.ln_f.weight' },
  { 'decoder.final_layernorm.bias', 'transformer.ln_f.bias' },
  { 'output_layer.weight', 'lm_head.weight', pack = 'vocab', tp = 'vocab', tied = true },
}

function M.config(read)
  if read:bool('apply_residual_connection_post_layernorm', false) then
    read:fail("apply_residual_connection_post_layernorm = true is not supported (the residual is taken before the LayerNorm)")
  end
  -- older files spell the sizes n_embed / n_head / n_layer (transformers maps them the same way)
  local hidden = read('hidden_size') ~= nil and read:positive_int('hidden_size') or read:positive_int('n_embed')
  local heads = read('n_head') ~= nil and read:positive_int('n_head') or read:positive_int('num_attention_heads')
  local layers = read('n_layer') ~= nil and read:positive_int('n_layer') or read:positive_int('num_hidden_layers')
  if hidden % heads ~= 0 then read:fail(string.format('hidden_size %d is not a multiple of n_head %d', hidden, heads)) end
  return {
    num_layers = layers,
    hidden_size = hidden,
    ffn_hidden_size = 4 * hidden,
    num_attention_heads = heads,
    num_query_groups = heads,
    kv_channels = hidden / heads,
    vocab_size = read:positive_int('vocab_size'),
    normalization = 'LayerNorm',
    norm_epsilon = read:number('layer_norm_epsilon', 1e-5),
    activation = 'gelu_tanh',
    add_qkv_bias = true, add_proj_bias = true, add_mlp_bias = true,
    position_embedding_type = 'alibi',
    word_embeddings_layernorm = true,
    tie_embeddings = read:bool('tie_word_embeddings', true),
  }
end

function M.hf_config(c)
  if c.position_embedding_type ~= 'alibi' or not c.word_embeddings_layernorm or c.normalization ~= 'LayerNorm'
      or c.activation ~= 'gelu_tanh' or not (c.add_qkv_bias and c.add_proj_bias and c.add_mlp_bias)
      or c.ffn_hidden_size ~= 4 * c.hidden_size or c.num_query_groups ~= c.num_attention_heads
      or c.kv_channels * c.num_attention_heads ~= c.hidden_size then
    error('bloom: the family has ALiBi, an embedding LayerNorm, LayerNorms and biases everywhere, a GELU (tanh) MLP '
      .. 'of 4x the hidden size and one key/value head per query head; this model differs', 0)
  end
  return {
    hidden_size = c.hidden_size,
    n_head = c.num_attention_heads,
    n_layer = c.num_layers,
    vocab_size = c.vocab_size,
    layer_norm_epsilon = c.norm_epsilon,
    apply_residual_connection_post_layernorm = false,
    tie_word_embeddings = c.tie_embeddings and true or false,
  }
end

return M
