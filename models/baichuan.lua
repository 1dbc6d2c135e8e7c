-- Baichuan and Baichuan2 (HF model_type 'baichuan', published with their own modeling_baichuan.py; no
-- transformers class): the Llama block without biases, q, k and v fused in W_pack as [q; k; v], an
-- untied lm_head. The checkpoints tell their layouts apart only by config keys, as their code does:
--   * the 7B files (Baichuan-7B, Baichuan2-7B) rotate q and k (RoPE, base 10000) and their config has
--     max_position_embeddings; the 13B files use ALiBi instead and have only model_max_length;
--   * Baichuan2 (its config has z_loss_weight, and its vocabulary has 125696 tokens: either tells it, as
--     vLLM tells it by the size) normalises each lm_head row to unit norm (NormHead, config.norm_head);
--     the file holds the rows unnormalised during training, as pmp keeps them.
local llama = require 'models.llama'

local M = { model_type = 'baichuan', architectures = { 'BaichuanForCausalLM' } }

local BAICHUAN2_VOCAB = 125696

M.mapping = {
  { 'embedding.word_embeddings.weight', 'model.embed_tokens.weight', pack = 'vocab', tp = 'vocab' },
  { 'decoder.layers.{L}.input_layernorm.weight', 'model.layers.{L}.input_layernorm.weight' },
  { 'decoder.layers.{L}.self_attention.linear_qkv.weight', 'model.layers.{L}.self_attn.W_pack.weight',
    pack = 'qkv_concat', tp = 'column' },
  { 'decoder.layers.{L}.self_attention.linear_proj.weight', 'model.layers.{L}.self_attn.o_proj.weight', tp = 'row' },
  { 'decoder.layers.{L}.pre_mlp_layernorm.weight', 'model.layers.{L}.post_attention_layernorm.weight' },
  { 'decoder.layers.{L}.mlp.linear_fc1.weight',
    { 'model.layers.{L}.mlp.gate_proj.weight', 'model.layers.{L}.mlp.up_proj.weight' }, pack = 'gate_up', tp = 'column' },
  { 'decoder.layers.{L}.mlp.linear_fc2.weight', 'model.layers.{L}.mlp.down_proj.weight', tp = 'row' },
  { 'decoder.final_layernorm.weight', 'model.norm.weight' },
  { 'output_layer.weight', 'lm_head.weight', pack = 'vocab', tp = 'vocab' },
}

-- Baichuan's config keys are Llama's (without num_key_value_heads, head_dim or rope settings).
function M.config(read)
  for _, key in ipairs({ 'num_key_value_heads', 'head_dim', 'rope_theta', 'rope_scaling', 'rope_parameters' }) do
    if read(key) ~= nil then read:fail(string.format("key '%s' is not a Baichuan setting (its code ignores it)", key)) end
  end
  local c = llama.base_config(read, { rms_norm_eps = 1e-6 })
  if c.tie_embeddings then read:fail('tie_word_embeddings = true is not supported (Baichuan has its own lm_head)') end
  -- Baichuan-7B's own class name (BaiChuanForCausalLM) also says RoPE
  local architectures = read('architectures')
  local seven_b = type(architectures) == 'table' and architectures[1] == 'BaiChuanForCausalLM'
  if read('max_position_embeddings') == nil and not seven_b then c.position_embedding_type = 'alibi' end
  local z_loss = read:number('z_loss_weight')
  if z_loss ~= nil and z_loss ~= 0 then
    read:fail(string.format('z_loss_weight %g is not supported (only 0: no z-loss)', z_loss))
  end
  c.norm_head = z_loss ~= nil or c.vocab_size == BAICHUAN2_VOCAB or nil
  return c
end

function M.hf_config(c)
  if c.num_query_groups ~= c.num_attention_heads or c.kv_channels * c.num_attention_heads ~= c.hidden_size
      or c.add_qkv_bias or c.add_proj_bias or c.add_mlp_bias or c.tie_embeddings or c.rope_scaling
      or (c.rotary_base or 10000) ~= 10000 or (c.rotary_percent or 1) ~= 1 then
    error('baichuan: the family has one key/value head per query head, no biases, an untied lm_head and RoPE '
      .. 'of base 10000 or ALiBi; this model differs', 0)
  end
  local length = c.max_position_embeddings or c.seq_length or 4096
  return {
    auto_map = { AutoConfig = 'configuration_baichuan.BaichuanConfig',
      AutoModelForCausalLM = 'modeling_baichuan.BaichuanForCausalLM' },
    hidden_act = 'silu',
    hidden_size = c.hidden_size,
    intermediate_size = c.ffn_hidden_size,
    num_attention_heads = c.num_attention_heads,
    num_hidden_layers = c.num_layers,
    vocab_size = c.vocab_size,
    rms_norm_eps = c.norm_epsilon,
    tie_word_embeddings = false,
    model_max_length = length,
    max_position_embeddings = c.position_embedding_type ~= 'alibi' and length or nil,
    z_loss_weight = c.norm_head and 0 or nil,
  }
end

return M
