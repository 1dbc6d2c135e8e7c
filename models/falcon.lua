-- Falcon (HF model_type 'falcon', FalconForCausalLM), both layouts:
--   Falcon-7B style (new_decoder_architecture false): multi-query attention (or one KV head per query
--     head without multi_query), attention and MLP in parallel off one shared LayerNorm (input_layernorm),
--     or one after the other with post_attention_layernorm when parallel_attn is false;
--   Falcon-40B/180B (new_decoder_architecture): num_kv_heads KV groups, attention and MLP in parallel off
--     ln_attn and ln_mlp (or one shared input_layernorm with num_ln_in_parallel_attn 1).
-- Rotary positions, LayerNorm with bias, GELU MLP, biases on the linear layers when `bias` is true,
-- output tied by default. The fused query_key_value is, in every layout, Megatron's per-group layout
-- ([q heads of group g, k_g, v_g]), so it is linear_qkv as it is.
-- Falcon-RW (alibi true) has ALiBi instead of rotary positions: transformers adds the biases to q.k
-- before the division by sqrt(head_dim), so its slopes are BLOOM's times 1/sqrt(head_dim)
-- (alibi_slope_scale). transformers also rounds the slopes, each key position (counted from the row's
-- first real token) and their product to bf16: alibi_bias_hf_falcon_bf16 makes pmp's attention do the
-- same (with falcon-rw-1b's 32 heads the exact biases differ from those by several units past 256).
local activations = require 'pmp.models.activations'
local models = require 'pmp.models'

local M = { model_type = 'falcon', architectures = { 'FalconForCausalLM' } }

local ACTIVATIONS = { 'gelu', 'gelu_pytorch_tanh', 'gelu_new', 'relu' }
local LAYER = 'transformer.h.{L}.'

local function two_norms(c) return c.parallel_residual and not c.shared_layernorm end
local function one_input_norm(c) return not two_norms(c) end
local function sequential(c) return not c.parallel_residual end

M.mapping = {
  { 'embedding.word_embeddings.weight', 'transformer.word_embeddings.weight', pack = 'vocab', tp = 'vocab' },
  { 'decoder.layers.{L}.input_layernorm.weight', LAYER .. 'input_layernorm.weight', when = one_input_norm },
  { 'decoder.layers.{L}.input_layernorm.bias', LAYER .. 'input_layernorm.bias', when = one_input_norm },
  { 'decoder.layers.{L}.input_layernorm.weight', LAYER .. 'ln_attn.weight', when = two_norms },
  { 'decoder.layers.{L}.input_layernorm.bias', LAYER .. 'ln_attn.bias', when = two_norms },
  { 'decoder.layers.{L}.self_attention.linear_qkv.weight', LAYER .. 'self_attention.query_key_value.weight', tp = 'column' },
  { 'decoder.layers.{L}.self_attention.linear_qkv.bias', LAYER .. 'self_attention.query_key_value.bias', tp = 'column' },
  { 'decoder.layers.{L}.self_attention.linear_proj.weight', LAYER .. 'self_attention.dense.weight', tp = 'row' },
  { 'decoder.layers.{L}.self_attention.linear_proj.bias', LAYER .. 'self_attention.dense.bias' },
  { 'decoder.layers.{L}.pre_mlp_layernorm.weight', LAYER .. 'ln_mlp.weight', when = two_norms },
  { 'decoder.layers.{L}.pre_mlp_layernorm.bias', LAYER .. 'ln_mlp.bias', when = two_norms },
  { 'decoder.layers.{L}.pre_mlp_layernorm.weight', LAYER .. 'post_attention_layernorm.weight', when = sequential },
  { 'decoder.layers.{L}.pre_mlp_layernorm.bias', LAYER .. 'post_attention_layernorm.bias', when = sequential },
  { 'decoder.layers.{L}.mlp.linear_fc1.weight', LAYER .. 'mlp.dense_h_to_4h.weight', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc1.bias', LAYER .. 'mlp.dense_h_to_4h.bias', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc2.weight', LAYER .. 'mlp.dense_4h_to_h.weight', tp = 'row' },
  { 'decoder.layers.{L}.mlp.linear_fc2.bias', LAYER .. 'mlp.dense_4h_to_h.bias' },
  { 'decoder.final_layernorm.weight', 'transformer.ln_f.weight' },
  { 'decoder.final_layernorm.bias', 'transformer.ln_f.bias' },
  { 'output_layer.weight', 'lm_head.weight', pack = 'vocab', tp = 'vocab', tied = true },
}

M.ignore = { '%.rotary_emb%.inv_freq$' }

-- Falcon's published configs spell some sizes the RW way (n_embed, n_head, n_layer, n_head_kv).
local function size(read, key, old_key, default)
  if read(key) ~= nil then return read:positive_int(key) end
  if read(old_key) ~= nil then return read:positive_int(old_key) end
  if default ~= nil then return default end
  read:need(key)
end

function M.config(read)
  if read:bool('apply_residual_connection_post_layernorm', false) then
    read:fail('apply_residual_connection_post_layernorm true is not supported')
  end
  local hidden = size(read, 'hidden_size', 'n_embed')
  local heads = size(read, 'num_attention_heads', 'n_head')
  if hidden % heads ~= 0 then read:fail(string.format('hidden_size %d is not a multiple of num_attention_heads %d', hidden, heads)) end
  local new = read:bool('new_decoder_architecture', false)
  local parallel = read:bool('parallel_attn', true)
  local norms = read:number('num_ln_in_parallel_attn') or (new and 2 or 1)
  local c = {
    num_layers = size(read, 'num_hidden_layers', 'n_layer'),
    hidden_size = hidden,
    ffn_hidden_size = read:number('ffn_hidden_size') and read:positive_int('ffn_hidden_size') or 4 * hidden,
    num_attention_heads = heads,
    kv_channels = hidden / heads,
    vocab_size = read:positive_int('vocab_size'),
    max_position_embeddings = read:number('max_position_embeddings'),
    normalization = 'LayerNorm',
    norm_epsilon = read:number('layer_norm_epsilon', 1e-5),
    activation = activations.read(read, 'activation', 'gelu', ACTIVATIONS),
    tie_embeddings = read:bool('tie_word_embeddings', true),
  }
  c.rotary_base, c.rope_scaling, c.rotary_percent = models.read_rope(read)
  if read:bool('alibi', false) then
    c.position_embedding_type, c.alibi_slope_scale = 'alibi', 1 / math.sqrt(c.kv_channels)
    c.alibi_bias_hf_falcon_bf16 = true
  end
  local bias = read:bool('bias', false)
  c.add_qkv_bias, c.add_proj_bias, c.add_mlp_bias = bias, bias, bias
  if new then
    if not parallel then read:fail('new_decoder_architecture with parallel_attn false is not a Falcon layout') end
    c.num_query_groups = size(read, 'num_kv_heads', 'n_head_kv', heads)
    if heads % c.num_query_groups ~= 0 then
      read:fail(string.format('num_attention_heads %d is not a multiple of num_kv_heads %d', heads, c.num_query_groups))
    end
    if norms ~= 1 and norms ~= 2 then read:fail('num_ln_in_parallel_attn must be 1 or 2, got ' .. tostring(norms)) end
    c.parallel_residual, c.shared_layernorm = true, norms == 1
  else
    if parallel and norms ~= 1 then
      read:fail('num_ln_in_parallel_attn 2 needs new_decoder_architecture (transformers builds ln_attn/ln_mlp only there)')
    end
    c.num_query_groups = read:bool('multi_query', true) and 1 or heads
    c.parallel_residual, c.shared_layernorm = parallel, parallel
  end
  return c
end

function M.hf_config(c)
  local bias = c.add_qkv_bias or false
  local alibi = c.position_embedding_type == 'alibi'
  if alibi and math.abs((c.alibi_slope_scale or 1) * math.sqrt(c.kv_channels) - 1) > 1e-12 then
    error('falcon: ALiBi slopes must be scaled by 1/sqrt(kv_channels) (alibi_slope_scale), as Falcon-RW adds ' ..
      'the biases before dividing the scores by sqrt(head_dim)', 0)
  end
  if c.position_embedding_type == 'learned_absolute' or c.normalization ~= 'LayerNorm' or c.post_norm
      or c.final_layernorm == false or (c.add_proj_bias or false) ~= bias or (c.add_mlp_bias or false) ~= bias
      or c.kv_channels * c.num_attention_heads ~= c.hidden_size then
    error('falcon: the family has rotary or ALiBi positions, LayerNorm, head_dim = hidden_size / heads and biases on every ' ..
      'linear layer or none', 0)
  end
  local hf = {
    hidden_size = c.hidden_size, ffn_hidden_size = c.ffn_hidden_size, num_hidden_layers = c.num_layers,
    num_attention_heads = c.num_attention_heads, vocab_size = c.vocab_size,
    max_position_embeddings = c.max_position_embeddings or c.seq_length or 2048, layer_norm_epsilon = c.norm_epsilon,
    activation = activations.write(c.activation, ACTIVATIONS, 'falcon'), bias = bias, alibi = alibi,
    rope_parameters = models.write_rope(c), tie_word_embeddings = c.tie_embeddings and true or false,
    parallel_attn = c.parallel_residual and true or false,
  }
  local groups = c.num_query_groups
  if c.parallel_residual and (groups ~= 1 or not c.shared_layernorm) then
    hf.new_decoder_architecture, hf.num_kv_heads = true, groups
    hf.num_ln_in_parallel_attn = c.shared_layernorm and 1 or 2
  elseif groups == 1 or groups == c.num_attention_heads then
    hf.new_decoder_architecture, hf.multi_query = false, groups == 1
  else
    error('falcon: grouped KV heads need attention and MLP in parallel (new_decoder_architecture)', 0)
  end
  return hf
end

return M
