-- Qwen 1 (HF model_type 'qwen', QWenLMHeadModel; published with its own modeling_qwen.py): pre-RMSNorm
-- blocks (ln_1, ln_2), multi-head attention from one fused c_attn ([q; k; v], always with a bias),
-- rotary embeddings on halves of the first rotary_pct of each head (base rotary_emb_base), and a SwiGLU
-- MLP whose gate is w2 and whose up projection is w1 (c_proj(w1(x) * silu(w2(x)))), intermediate_size
-- being twice its width. no_bias (default true) drops the biases of attn.c_proj and the MLP.
-- use_dynamic_ntk and use_logn_attn (on unless the config says otherwise) only change attention from
-- position seq_length on, which pmp does not follow: with either on, positions past seq_length are
-- refused (rotary_position_limit) rather than given logits Qwen would not give.
local M = { model_type = 'qwen', architectures = { 'QWenLMHeadModel' } }

M.mapping = {
  { 'embedding.word_embeddings.weight', 'transformer.wte.weight', pack = 'vocab', tp = 'vocab' },
  { 'decoder.layers.{L}.input_layernorm.weight', 'transformer.h.{L}.ln_1.weight' },
  { 'decoder.layers.{L}.self_attention.linear_qkv.weight', 'transformer.h.{L}.attn.c_attn.weight', pack = 'qkv_concat', tp = 'column' },
  { 'decoder.layers.{L}.self_attention.linear_qkv.bias', 'transformer.h.{L}.attn.c_attn.bias', pack = 'qkv_concat', tp = 'column' },
  { 'decoder.layers.{L}.self_attention.linear_proj.weight', 'transformer.h.{L}.attn.c_proj.weight', tp = 'row' },
  { 'decoder.layers.{L}.self_attention.linear_proj.bias', 'transformer.h.{L}.attn.c_proj.bias' },
  { 'decoder.layers.{L}.pre_mlp_layernorm.weight', 'transformer.h.{L}.ln_2.weight' },
  { 'decoder.layers.{L}.mlp.linear_fc1.weight', { 'transformer.h.{L}.mlp.w2.weight', 'transformer.h.{L}.mlp.w1.weight' },
    pack = 'gate_up', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc1.bias', { 'transformer.h.{L}.mlp.w2.bias', 'transformer.h.{L}.mlp.w1.bias' },
    pack = 'gate_up', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc2.weight', 'transformer.h.{L}.mlp.c_proj.weight', tp = 'row' },
  { 'decoder.layers.{L}.mlp.linear_fc2.bias', 'transformer.h.{L}.mlp.c_proj.bias' },
  { 'decoder.final_layernorm.weight', 'transformer.ln_f.weight' },
  { 'output_layer.weight', 'lm_head.weight', pack = 'vocab', tp = 'vocab', tied = true },
}

M.ignore = { '%.rotary_emb%.inv_freq$' }

function M.config(read)
  local heads = read:positive_int('num_attention_heads')
  local hidden = read:positive_int('hidden_size')
  local intermediate = read:positive_int('intermediate_size')
  if intermediate % 2 ~= 0 then read:fail(string.format('intermediate_size %d is not even (w1 and w2 are half of it each)', intermediate)) end
  if not read:bool('scale_attn_weights', true) then read:fail("scale_attn_weights false is not supported") end
  local kv_channels = read:number('kv_channels')
  if kv_channels == nil then
    if hidden % heads ~= 0 then read:fail(string.format('hidden_size %d is not a multiple of num_attention_heads %d', hidden, heads)) end
    kv_channels = hidden / heads
  end
  local biases = not read:bool('no_bias', true)
  local seq_length = read:positive_int('seq_length', 8192)
  local extrapolates = read:bool('use_dynamic_ntk', true) or read:bool('use_logn_attn', true)
  return {
    num_layers = read:positive_int('num_hidden_layers'),
    hidden_size = hidden,
    ffn_hidden_size = intermediate / 2,
    num_attention_heads = heads,
    num_query_groups = heads,
    kv_channels = kv_channels,
    vocab_size = read:positive_int('vocab_size'),
    max_position_embeddings = seq_length,
    rotary_position_limit = extrapolates and seq_length or nil,
    normalization = 'RMSNorm',
    norm_epsilon = read:number('layer_norm_epsilon', 1e-6),
    activation = 'swiglu',
    rotary_base = read:number('rotary_emb_base', 10000),
    rotary_percent = read:number('rotary_pct', 1.0),
    add_qkv_bias = true,
    add_proj_bias = biases,
    add_mlp_bias = biases,
    tie_embeddings = read:bool('tie_word_embeddings', false),
  }
end

function M.hf_config(c)
  local function refuse(what) error('qwen: ' .. what, 0) end
  if c.num_query_groups ~= c.num_attention_heads then refuse('the family has one key/value head per query head') end
  if c.normalization ~= 'RMSNorm' or c.activation ~= 'swiglu' then refuse('the family uses RMSNorm and SwiGLU') end
  if c.rope_scaling or c.rotary_interleaved then refuse('the family rotates halves without rope scaling') end
  if not c.add_qkv_bias or (c.add_proj_bias or false) ~= (c.add_mlp_bias or false) then
    refuse('c_attn always has a bias; no_bias covers attn.c_proj and the MLP together')
  end
  if c.qk_layernorm or c.post_self_attn_layernorm or c.post_mlp_layernorm or c.sliding_window then
    refuse('the family has no per-head, post-attention or post-MLP norms and no sliding window')
  end
  local length = c.max_position_embeddings or c.seq_length or 2048
  return {
    auto_map = { AutoConfig = 'configuration_qwen.QWenConfig', AutoModelForCausalLM = 'modeling_qwen.QWenLMHeadModel' },
    hidden_size = c.hidden_size,
    intermediate_size = 2 * c.ffn_hidden_size,
    kv_channels = c.kv_channels,
    layer_norm_epsilon = c.norm_epsilon,
    max_position_embeddings = length,
    seq_length = length,
    no_bias = not c.add_proj_bias,
    num_attention_heads = c.num_attention_heads,
    num_hidden_layers = c.num_layers,
    rotary_emb_base = c.rotary_base or 10000,
    rotary_pct = c.rotary_percent or 1.0,
    scale_attn_weights = true,
    tie_word_embeddings = c.tie_embeddings and true or false,
    -- what pmp computes at every length (Qwen's own code scales attention past seq_length with these)
    use_dynamic_ntk = false,
    use_logn_attn = false,
    vocab_size = c.vocab_size,
  }
end

return M
