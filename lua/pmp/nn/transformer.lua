-- The decoder-only transformer in Megatron-Core's structure and parameter names:
--   embedding.word_embeddings.weight
--   decoder.layers.N.{input_layernorm, self_attention.{linear_qkv, q_layernorm, k_layernorm, linear_proj},
--                     pre_mlp_layernorm, mlp.{linear_fc1, linear_fc2}}
--   decoder.final_layernorm.weight, output_layer.weight (absent when tied to the embedding)
-- linear_qkv rows are grouped per KV head: [q heads of group 0, k_0, v_0, q heads of group 1, ...];
-- linear_fc1 rows are [gate; up] for SwiGLU.
local tensor = require 'pmp.tensor'
local Module = require 'pmp.nn.module'
local layers = require 'pmp.nn.layers'
local F = require 'pmp.nn.functional'
local autograd = require 'pmp.autograd'

local M = {}

local function required(config, key)
  local v = config[key]
  if v == nil then error("transformer config: missing key '" .. key .. "'", 3) end
  return v
end

-- Fills in derived defaults the way Megatron's TransformerConfig does.
function M.config(c)
  local out = {}
  for k, v in pairs(c) do out[k] = v end
  out.num_layers = required(c, 'num_layers')
  out.hidden_size = required(c, 'hidden_size')
  out.num_attention_heads = required(c, 'num_attention_heads')
  out.vocab_size = required(c, 'vocab_size')
  out.num_query_groups = c.num_query_groups or c.num_attention_heads
  out.kv_channels = c.kv_channels or c.hidden_size / c.num_attention_heads
  out.activation = c.activation or 'swiglu'
  out.ffn_hidden_size = c.ffn_hidden_size or (out.activation == 'swiglu' and 4 * c.hidden_size * 2 / 3 or 4 * c.hidden_size)
  out.normalization = c.normalization or 'RMSNorm'
  out.norm_epsilon = c.norm_epsilon or 1e-5
  out.rotary_base = c.rotary_base or 10000
  out.rotary_percent = c.rotary_percent or 1.0
  out.init_std = c.init_std or 0.02
  out.dtype = c.dtype or 'f32'
  out.hidden_dropout = c.hidden_dropout or 0
  out.tie_embeddings = c.tie_embeddings ~= false and not c.untie_embeddings_and_output_weights
  if out.num_attention_heads % out.num_query_groups ~= 0 then
    error(string.format('transformer config: num_attention_heads %d is not a multiple of num_query_groups %d',
      out.num_attention_heads, out.num_query_groups), 2)
  end
  if out.ffn_hidden_size ~= math.floor(out.ffn_hidden_size) then out.ffn_hidden_size = math.floor(out.ffn_hidden_size) end
  return out
end

local function norm(config, dim)
  local options = { eps = config.norm_epsilon, dtype = config.dtype }
  if config.normalization == 'LayerNorm' then return layers.LayerNorm(dim, options) end
  if config.normalization ~= 'RMSNorm' then error("transformer config: unknown normalization '" .. tostring(config.normalization) .. "'", 3) end
  return layers.RMSNorm(dim, options)
end

-- cos/sin tables of rotary position embeddings, computed in f32 as HF does and cached per length.
M.RotaryEmbedding = Module:extend('RotaryEmbedding')
function M.RotaryEmbedding:init(rotary_dim, options)
  options = options or {}
  self.rotary_dim = rotary_dim
  self.base = options.base or 10000
  self.scaling = options.scaling
  local exponent = tensor.arange(0, rotary_dim, 2):float() / rotary_dim
  local inv_freq = 1 / tensor.full({}, self.base):pow(exponent)
  if self.scaling and self.scaling.type == 'linear' then inv_freq = inv_freq / self.scaling.factor end
  self:register_buffer('inv_freq', inv_freq, false)
  rawset(self, 'cache', {})
end
-- Tables for positions offset .. offset + length - 1, in dtype: [length, rotary_dim] each.
function M.RotaryEmbedding:forward(length, offset, dtype)
  offset, dtype = offset or 0, dtype or 'f32'
  local key = length .. ':' .. offset .. ':' .. dtype
  local hit = self.cache[key]
  if hit then return hit[1], hit[2] end
  local positions = tensor.arange(offset, offset + length):float()
  local freqs = positions:unsqueeze(2) * self.inv_freq:unsqueeze(1)
  local emb = tensor.cat({ freqs, freqs }, 2)
  local cos, sin = emb:cos():to(dtype), emb:sin():to(dtype)
  self.cache[key] = { cos, sin }
  return cos, sin
end
function M.RotaryEmbedding:extra_repr() return string.format('dim=%d, base=%g', self.rotary_dim, self.base) end

M.Attention = Module:extend('SelfAttention')
function M.Attention:init(config)
  self.config = config
  local heads, groups, d = config.num_attention_heads, config.num_query_groups, config.kv_channels
  local opts = { init_std = config.init_std, dtype = config.dtype }
  self.linear_qkv = layers.Linear(config.hidden_size, (heads + 2 * groups) * d,
    { bias = config.add_qkv_bias or false, init_std = config.init_std, dtype = config.dtype })
  if config.qk_layernorm then
    self.q_layernorm = norm(config, d)
    self.k_layernorm = norm(config, d)
  end
  self.linear_proj = layers.Linear(heads * d, config.hidden_size,
    { bias = config.add_bias_linear or false, init_std = config.output_init_std or opts.init_std, dtype = config.dtype })
end

function M.Attention:forward(x, rope)
  local c = self.config
  local B, T = x:size(1), x:size(2)
  local heads, groups, d = c.num_attention_heads, c.num_query_groups, c.kv_channels
  local per_group = heads / groups
  local qkv = self.linear_qkv(x):view(B, T, groups, per_group + 2, d)
  local q = qkv:narrow(4, 1, per_group):reshape(B, T, heads, d)
  local k = qkv:narrow(4, per_group + 1, 1):reshape(B, T, groups, d)
  local v = qkv:narrow(4, per_group + 2, 1):reshape(B, T, groups, d)
  if self.q_layernorm then
    q = self.q_layernorm(q)
    k = self.k_layernorm(k)
  end
  q, k, v = q:transpose(2, 3), k:transpose(2, 3), v:transpose(2, 3)
  if rope then
    q = F.rope(q, rope.cos, rope.sin)
    k = F.rope(k, rope.cos, rope.sin)
  end
  local o = F.attention(q, k, v, { causal = true, window = c.sliding_window })
  return self.linear_proj(o:transpose(2, 3):reshape(B, T, heads * d))
end

M.MLP = Module:extend('MLP')
function M.MLP:init(config)
  self.activation = config.activation
  local gated = config.activation == 'swiglu'
  local bias = config.add_bias_linear or false
  self.linear_fc1 = layers.Linear(config.hidden_size, (gated and 2 or 1) * config.ffn_hidden_size,
    { bias = bias, init_std = config.init_std, dtype = config.dtype })
  self.linear_fc2 = layers.Linear(config.ffn_hidden_size, config.hidden_size,
    { bias = bias, init_std = config.output_init_std or config.init_std, dtype = config.dtype })
end
function M.MLP:forward(x)
  local h = self.linear_fc1(x)
  if self.activation == 'swiglu' then h = F.swiglu(h)
  elseif self.activation == 'gelu' then h = h:gelu()
  elseif self.activation == 'gelu_tanh' then h = h:gelu('tanh')
  elseif self.activation == 'relu' then h = h:relu()
  else error("MLP: unknown activation '" .. tostring(self.activation) .. "'", 2) end
  return self.linear_fc2(h)
end
function M.MLP:extra_repr() return self.activation end

-- Pre-norm block with sequential residuals.
M.TransformerBlock = Module:extend('TransformerBlock')
function M.TransformerBlock:init(config)
  rawset(self, 'dropout', config.hidden_dropout)
  self.input_layernorm = norm(config, config.hidden_size)
  self.self_attention = M.Attention(config)
  self.pre_mlp_layernorm = norm(config, config.hidden_size)
  self.mlp = M.MLP(config)
end
function M.TransformerBlock:forward(x, rope)
  local p, training = self.dropout, self.training
  x = x + F.dropout(self.self_attention(self.input_layernorm(x), rope), p, training)
  return x + F.dropout(self.mlp(self.pre_mlp_layernorm(x)), p, training)
end

M.LanguageModelEmbedding = Module:extend('LanguageModelEmbedding')
function M.LanguageModelEmbedding:init(config)
  self.word_embeddings = layers.Embedding(config.vocab_size, config.hidden_size, { init_std = config.init_std, dtype = config.dtype })
end
function M.LanguageModelEmbedding:forward(ids) return self.word_embeddings(ids) end

M.TransformerDecoder = Module:extend('TransformerDecoder')
function M.TransformerDecoder:init(config)
  local list = {}
  for k = 1, config.num_layers do list[k] = M.TransformerBlock(config) end
  self.layers = layers.ModuleList(list)
  self.final_layernorm = norm(config, config.hidden_size)
  if config.recompute_granularity == 'full' then
    rawset(self, 'recompute', true)
  elseif config.recompute_granularity ~= nil then
    error("transformer config: recompute_granularity must be 'full' or nil, got '" .. tostring(config.recompute_granularity) .. "'", 3)
  end
end
-- config.recompute_granularity = 'full' re-runs each layer's forward during backward instead of
-- keeping its activations (Megatron's --recompute-granularity full --recompute-method uniform).
function M.TransformerDecoder:forward(x, rope)
  local recompute = self.training and self.recompute
  for _, layer in ipairs(self.layers.items) do
    if recompute then x = autograd.recompute(layer.forward, layer, x, rope) else x = layer(x, rope) end
  end
  return self.final_layernorm(x)
end

-- config: see M.config (Megatron's names). forward(ids [B, T]) -> logits [B, T, vocab];
-- forward(ids, targets) -> mean cross-entropy over targets ~= ignore_index (-100).
M.GPTModel = Module:extend('GPTModel')
function M.GPTModel:init(config)
  config = M.config(config)
  rawset(self, 'config', config)
  if config.output_init_std == nil then config.output_init_std = config.init_std / math.sqrt(2 * config.num_layers) end
  self.embedding = M.LanguageModelEmbedding(config)
  local rotary_dim = math.floor(config.kv_channels * config.rotary_percent)
  self.rotary_pos_emb = M.RotaryEmbedding(rotary_dim, { base = config.rotary_base, scaling = config.rope_scaling })
  self.decoder = M.TransformerDecoder(config)
  if not config.tie_embeddings then
    self.output_layer = layers.Linear(config.hidden_size, config.vocab_size,
      { bias = false, init_std = config.init_std, dtype = config.dtype })
  end
end

function M.GPTModel:forward(ids, targets, options)
  local T = ids:size(2)
  local x = self.embedding(ids)
  local cos, sin = self.rotary_pos_emb(T, 0, x.dtype)
  x = self.decoder(F.dropout(x, self.config.hidden_dropout, self.training), { cos = cos, sin = sin })
  local weight = self.output_layer and self.output_layer.weight or self.embedding.word_embeddings.weight
  local logits = x:matmul(weight:t())
  if targets == nil then return logits end
  return F.cross_entropy(logits, targets, options)
end

function M.GPTModel:extra_repr()
  local c = self.config
  return string.format('layers=%d, hidden=%d, heads=%d, groups=%d, ffn=%d, vocab=%d%s', c.num_layers, c.hidden_size,
    c.num_attention_heads, c.num_query_groups, c.ffn_hidden_size, c.vocab_size, c.tie_embeddings and ', tied' or '')
end

return M
