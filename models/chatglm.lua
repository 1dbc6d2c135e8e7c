-- ChatGLM2 / ChatGLM3 (HF model_type 'chatglm', ChatGLMModel; published with its own
-- modeling_chatglm.py): pre-RMSNorm blocks, multi-query attention from one fused query_key_value
-- ([every query head; the multi_query_group_num key groups; the value groups], with a bias when
-- add_qkv_bias), rotary embeddings on interleaved pairs of the first half of each head with base
-- 10000 * rope_ratio, a SwiGLU MLP whose dense_h_to_4h rows are [gate; up] as Megatron's linear_fc1,
-- and an untied output_layer over padded_vocab_size rows. Layouts the published models do not use
-- (no multi-query attention, LayerNorm, post-norm residuals, p-tuning prefixes) and the int4/int8
-- quantized releases are refused by key.
local M = { model_type = 'chatglm', architectures = { 'ChatGLMModel' } }

local LAYER = 'transformer.encoder.layers.{L}.'

M.mapping = {
  { 'embedding.word_embeddings.weight', 'transformer.embedding.word_embeddings.weight', pack = 'vocab', tp = 'vocab' },
  { 'decoder.layers.{L}.input_layernorm.weight', LAYER .. 'input_layernorm.weight' },
  { 'decoder.layers.{L}.self_attention.linear_qkv.weight', LAYER .. 'self_attention.query_key_value.weight',
    pack = 'qkv_concat', tp = 'column' },
  { 'decoder.layers.{L}.self_attention.linear_qkv.bias', LAYER .. 'self_attention.query_key_value.bias',
    pack = 'qkv_concat', tp = 'column' },
  { 'decoder.layers.{L}.self_attention.linear_proj.weight', LAYER .. 'self_attention.dense.weight', tp = 'row' },
  { 'decoder.layers.{L}.self_attention.linear_proj.bias', LAYER .. 'self_attention.dense.bias' },
  { 'decoder.layers.{L}.pre_mlp_layernorm.weight', LAYER .. 'post_attention_layernorm.weight' },
  { 'decoder.layers.{L}.mlp.linear_fc1.weight', LAYER .. 'mlp.dense_h_to_4h.weight', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc1.bias', LAYER .. 'mlp.dense_h_to_4h.bias', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc2.weight', LAYER .. 'mlp.dense_4h_to_h.weight', tp = 'row' },
  { 'decoder.layers.{L}.mlp.linear_fc2.bias', LAYER .. 'mlp.dense_4h_to_h.bias' },
  { 'decoder.final_layernorm.weight', 'transformer.encoder.final_layernorm.weight' },
  { 'output_layer.weight', 'transformer.output_layer.weight', pack = 'vocab', tp = 'vocab' },
}

-- the rotary buffer the published files carry (pmp computes it from the config)
M.ignore = { '^transformer%.rotary_pos_emb%.inv_freq$' }

-- Keys whose other values select layouts that no published ChatGLM2/3 uses.
local REQUIRED = { multi_query_attention = true, rmsnorm = true, post_layer_norm = true,
  apply_residual_connection_post_layernorm = false }

function M.config(read)
  for key, want in pairs(REQUIRED) do
    if read:bool(key, want) ~= want then read:fail(string.format("key '%s' = %s is not supported", key, tostring(not want))) end
  end
  if read('pre_seq_len') ~= nil then read:fail("key 'pre_seq_len': p-tuning prefixes are not supported") end
  local bits = read:number('quantization_bit', 0)
  if bits ~= 0 then read:fail(string.format("key 'quantization_bit' = %d: quantized weights are not supported", bits)) end
  local heads = read:positive_int('num_attention_heads')
  local hidden = read:positive_int('hidden_size')
  local groups = read:positive_int('multi_query_group_num')
  if heads % groups ~= 0 then
    read:fail(string.format('num_attention_heads %d is not a multiple of multi_query_group_num %d', heads, groups))
  end
  local kv_channels = read:number('kv_channels')
  if kv_channels == nil then
    if hidden % heads ~= 0 then read:fail(string.format('hidden_size %d is not a multiple of num_attention_heads %d', hidden, heads)) end
    kv_channels = hidden / heads
  end
  local bias = read:bool('add_bias_linear', false)
  return {
    num_layers = read:positive_int('num_layers'),
    hidden_size = hidden,
    ffn_hidden_size = read:positive_int('ffn_hidden_size'),
    num_attention_heads = heads,
    num_query_groups = groups,
    kv_channels = kv_channels,
    vocab_size = read:positive_int('padded_vocab_size'),
    max_position_embeddings = read:number('seq_length'),
    normalization = 'RMSNorm',
    norm_epsilon = read:number('layernorm_epsilon', 1e-5),
    activation = 'swiglu',
    rotary_base = 10000 * read:number('rope_ratio', 1),
    rotary_percent = 0.5,
    rotary_interleaved = true,
    add_qkv_bias = read:bool('add_qkv_bias', false) or bias,
    add_proj_bias = bias,
    add_mlp_bias = bias,
    tie_embeddings = false,
  }
end

function M.hf_config(c)
  local function refuse(what) error('chatglm: ' .. what, 0) end
  if c.tie_embeddings then refuse('the family has an untied output_layer') end
  if c.rope_scaling or not c.rotary_interleaved or c.rotary_percent ~= 0.5 then
    refuse('the family rotates interleaved pairs of half of each head, without rope scaling')
  end
  if c.normalization ~= 'RMSNorm' or c.activation ~= 'swiglu' then refuse('the family uses RMSNorm and SwiGLU') end
  if (c.add_proj_bias or false) ~= (c.add_mlp_bias or false) or (c.add_proj_bias and not c.add_qkv_bias) then
    refuse('add_bias_linear covers every linear layer together')
  end
  if c.qk_layernorm or c.post_self_attn_layernorm or c.post_mlp_layernorm or c.sliding_window then
    refuse('the family has no per-head, post-attention or post-MLP norms and no sliding window')
  end
  return {
    auto_map = { AutoConfig = 'configuration_chatglm.ChatGLMConfig',
      AutoModel = 'modeling_chatglm.ChatGLMForConditionalGeneration',
      AutoModelForCausalLM = 'modeling_chatglm.ChatGLMForConditionalGeneration' },
    add_bias_linear = c.add_proj_bias and true or false,
    add_qkv_bias = c.add_qkv_bias and true or false,
    apply_residual_connection_post_layernorm = false,
    ffn_hidden_size = c.ffn_hidden_size,
    hidden_size = c.hidden_size,
    kv_channels = c.kv_channels,
    layernorm_epsilon = c.norm_epsilon,
    multi_query_attention = true,
    multi_query_group_num = c.num_query_groups,
    num_attention_heads = c.num_attention_heads,
    num_layers = c.num_layers,
    original_rope = true,
    padded_vocab_size = c.vocab_size,
    post_layer_norm = true,
    rmsnorm = true,
    rope_ratio = (c.rotary_base or 10000) / 10000,
    seq_length = c.max_position_embeddings or c.seq_length or 2048,
    tie_word_embeddings = false,
  }
end

return M
