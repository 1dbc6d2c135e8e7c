-- The decoder-only transformer in Megatron-Core's structure and parameter names:
--   embedding.word_embeddings.weight
--   decoder.layers.N.{input_layernorm, self_attention.{linear_qkv, q_layernorm, k_layernorm, linear_proj},
--                     pre_mlp_layernorm, mlp.{linear_fc1, linear_fc2}}
--   decoder.final_layernorm.weight, output_layer.weight (absent when tied to the embedding)
--   embedding.position_embeddings.weight with position_embedding_type = 'learned_absolute' (GPT-2 style
--   families: OPT, StarCoder 1), and *.bias beside every LayerNorm weight; position_embedding_type =
--   'alibi' has no position parameters (per-head score biases, BLOOM and Baichuan-13B; alibi_slope_scale
--   multiplies the slopes, 1/sqrt(head_dim) for Falcon-RW).
--   embedding.input_projection.weight and output_projection.weight when word_embedding_size differs from
--   hidden_size (OPT-350m): the word embeddings and the output layer are word_embedding_size wide, the
--   first maps the looked-up rows to hidden_size, the second the final hidden states back (no biases).
-- Block variants the other families need (all off by default, Llama-style pre-norm otherwise):
--   post_norm          the two norms follow each residual sum instead of preceding each branch (OPT-350m)
--   parallel_residual  x + attention(norm(x)) + mlp(norm'(x)) in one sum (Falcon, GPT-J)
--   shared_layernorm   with parallel_residual, the MLP reads input_layernorm's output (no pre_mlp_layernorm)
--   final_layernorm    false: no norm after the last layer (post-norm models)
-- The embedding and output layer hold padded_vocab_size rows (vocab_size rounded up to a multiple of
-- make_vocab_size_divisible_by, as Megatron pads); logits and the loss only ever see the first vocab_size.
-- linear_qkv rows are grouped per KV head: [q heads of group 0, k_0, v_0, q heads of group 1, ...];
-- linear_fc1 rows are [gate; up] for SwiGLU.
local tensor = require 'pmp.tensor'
local Module = require 'pmp.nn.module'
local layers = require 'pmp.nn.layers'
local F = require 'pmp.nn.functional'
local autograd = require 'pmp.autograd'
local parallel = require 'pmp.nn.parallel'
local context_parallel = require 'pmp.nn.context_parallel'
local alibi = require 'pmp.nn.alibi'

local M = {}

local function required(config, key)
  local v = config[key]
  if v == nil then error("transformer config: missing key '" .. key .. "'", 3) end
  return v
end

--- Fills in derived defaults the way Megatron's TransformerConfig does.
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
  out.position_embedding_type = c.position_embedding_type or 'rope'
  local kind = out.position_embedding_type
  if kind ~= 'rope' and kind ~= 'learned_absolute' and kind ~= 'alibi' then
    error("transformer config: position_embedding_type must be 'rope', 'learned_absolute' or 'alibi', got '" ..
      tostring(out.position_embedding_type) .. "'", 2)
  end
  if c.alibi_slope_scale ~= nil and (kind ~= 'alibi' or type(c.alibi_slope_scale) ~= 'number' or c.alibi_slope_scale <= 0) then
    error("transformer config: alibi_slope_scale must be a positive number and needs position_embedding_type 'alibi'", 2)
  end
  if c.alibi_bias_hf_falcon_bf16 ~= nil and (kind ~= 'alibi' or type(c.alibi_bias_hf_falcon_bf16) ~= 'boolean') then
    error("transformer config: alibi_bias_hf_falcon_bf16 must be a boolean and needs position_embedding_type 'alibi'", 2)
  end
  if out.position_embedding_type == 'learned_absolute' and type(c.max_position_embeddings) ~= 'number' then
    error("transformer config: learned_absolute position embeddings need 'max_position_embeddings'", 2)
  end
  if c.shared_layernorm and not c.parallel_residual then
    error('transformer config: shared_layernorm needs parallel_residual', 2)
  end
  if c.post_norm and c.parallel_residual then
    error('transformer config: post_norm and parallel_residual cannot be combined', 2)
  end
  local width = c.word_embedding_size
  if width ~= nil and (type(width) ~= 'number' or width < 1 or width % 1 ~= 0) then
    error('transformer config: word_embedding_size must be a positive integer, got ' .. tostring(width), 2)
  end
  if width ~= nil and width ~= out.hidden_size and c.word_embeddings_layernorm then
    error('transformer config: word_embeddings_layernorm cannot be combined with a word_embedding_size other than hidden_size', 2)
  end
  out.rotary_percent = c.rotary_percent or 1.0
  out.init_std = c.init_std or 0.02
  out.dtype = c.dtype or 'f32'
  out.hidden_dropout = c.hidden_dropout or 0
  -- Megatron's attention_dropout: on the attention probabilities while training (an unfused path, F.attention)
  out.attention_dropout = c.attention_dropout or 0
  out.tie_embeddings = c.tie_embeddings ~= false and not c.untie_embeddings_and_output_weights
  -- Megatron's --make-vocab-size-divisible-by (times the tensor-parallel size); 1 (no padding) unless given.
  local multiple = (c.make_vocab_size_divisible_by or 1) * (c.tensor_model_parallel_size or 1)
  out.padded_vocab_size = c.padded_vocab_size or math.ceil(out.vocab_size / multiple) * multiple
  if out.padded_vocab_size < out.vocab_size then
    error(string.format('transformer config: padded_vocab_size %d is smaller than vocab_size %d',
      out.padded_vocab_size, out.vocab_size), 2)
  end
  -- Biases: linear_qkv has one with add_qkv_bias; linear_proj and the MLP follow add_bias_linear unless
  -- add_proj_bias / add_mlp_bias say otherwise (HF Llama's attention_bias and mlp_bias are independent).
  if out.add_proj_bias == nil then out.add_proj_bias = c.add_bias_linear or false end
  if out.add_mlp_bias == nil then out.add_mlp_bias = c.add_bias_linear or false end
  if out.num_attention_heads % out.num_query_groups ~= 0 then
    error(string.format('transformer config: num_attention_heads %d is not a multiple of num_query_groups %d',
      out.num_attention_heads, out.num_query_groups), 2)
  end
  if out.ffn_hidden_size ~= math.floor(out.ffn_hidden_size) then out.ffn_hidden_size = math.floor(out.ffn_hidden_size) end
  return require('pmp.nn.mla').check_config(require('pmp.nn.moe').check_config(out))
end

local function norm(config, dim)
  local options = { eps = config.norm_epsilon, dtype = config.dtype }
  if config.normalization == 'LayerNorm' then return layers.LayerNorm(dim, options) end
  if config.normalization ~= 'RMSNorm' then error("transformer config: unknown normalization '" .. tostring(config.normalization) .. "'", 3) end
  return layers.RMSNorm(dim, options)
end

-- Llama 3.1's frequency-dependent scaling of inv_freq (HF's llama3 rope type): wavelengths longer than
-- original_max_position_embeddings / low_freq_factor are divided by factor, shorter than
-- original / high_freq_factor kept, and the band between interpolates smoothly.
local function llama3_inv_freq(inv_freq, s)
  local function need(key)
    local v = s[key]
    if type(v) ~= 'number' then error("rope scaling 'llama3': missing number '" .. key .. "'", 4) end
    return v
  end
  local factor, low, high = need('factor'), need('low_freq_factor'), need('high_freq_factor')
  local old = need('original_max_position_embeddings')
  local low_wavelen, high_wavelen = old / low, old / high
  local out = {}
  for i, f in ipairs(inv_freq:totable()) do
    local wavelen = 2 * math.pi / f
    local g = wavelen > low_wavelen and f / factor or f
    if not (wavelen < high_wavelen) and not (wavelen > low_wavelen) then
      local smooth = (old / wavelen - low) / (high - low)
      g = (1 - smooth) * g / factor + smooth * g
    end
    out[i] = g
  end
  return tensor.tensor(out, { dtype = 'f32' })
end

-- Angles [..., n] -> [..., 2n] in the layout F.rope expects: [a, a] for rotate-half pairs (k, k + n),
-- each angle twice in a row [a0, a0, a1, a1, ...] for interleaved pairs (2k, 2k + 1).
local function pair_angles(freqs, interleaved)
  local last = freqs:dim()
  if not interleaved then return tensor.cat({ freqs, freqs }, last) end
  local shape = {}
  for k = 1, last - 1 do shape[k] = freqs:size(k) end
  shape[last] = 2 * freqs:size(last)
  return tensor.stack({ freqs, freqs }, last + 1):reshape(shape)
end

-- cos/sin tables of rotary position embeddings, computed in f32 as HF does and cached per length.
-- options.scaling: nil, {type = 'linear', factor = f} (positions / f) or {type = 'llama3', factor,
-- low_freq_factor, high_freq_factor, original_max_position_embeddings}. options.interleaved: tables
-- for rotating adjacent pairs (GPT-J, GLM, ChatGLM; Megatron's rotary_interleaved) instead of halves.
-- options.position_limit: positions from it on are refused (config.rotary_position_limit: a family
-- whose own code changes attention there, e.g. Qwen 1's use_dynamic_ntk / use_logn_attn).
--- RotaryEmbedding(rotary_dim, {base = 10000, scaling, interleaved, position_limit}): cos/sin tables of rotary position embeddings.
M.RotaryEmbedding = Module:extend('RotaryEmbedding')
function M.RotaryEmbedding:init(rotary_dim, options)
  options = options or {}
  self.rotary_dim = rotary_dim
  self.base = options.base or 10000
  self.scaling = options.scaling
  rawset(self, 'interleaved', options.interleaved or false)
  rawset(self, 'position_limit', options.position_limit)
  local exponent = tensor.arange(0, rotary_dim, 2):float() / rotary_dim
  local inv_freq = 1 / tensor.full({}, self.base):pow(exponent)
  local kind = self.scaling and (self.scaling.type or self.scaling.rope_type) or nil
  if kind == 'linear' then
    inv_freq = inv_freq / self.scaling.factor
  elseif kind == 'llama3' then
    inv_freq = llama3_inv_freq(inv_freq, self.scaling)
  elseif kind == 'yarn' then
    local scale
    inv_freq, scale = require('pmp.nn.yarn').inv_freq(inv_freq, rotary_dim, self.base, self.scaling)
    rawset(self, 'attention_scaling', scale)   -- YaRN's factor on cos and sin
  elseif kind ~= nil and kind ~= 'default' then
    error("RotaryEmbedding: unknown rope scaling type '" .. tostring(kind) .. "' (known: linear, llama3, yarn)", 3)
  end
  self:register_buffer('inv_freq', inv_freq, false)
  rawset(self, 'cache', {})
end
-- Tables for positions offset .. offset + length - 1, in dtype: [length, rotary_dim] each.
function M.RotaryEmbedding:forward(length, offset, dtype)
  offset, dtype = offset or 0, dtype or 'f32'
  local key = length .. ':' .. offset .. ':' .. dtype
  local hit = self.cache[key]
  if hit then return hit[1], hit[2] end
  self:check_positions(offset + length - 1)
  local positions = tensor.arange(offset, offset + length):float()
  local freqs = positions:unsqueeze(2) * self.inv_freq:unsqueeze(1)
  local emb = pair_angles(freqs, self.interleaved)
  local cos, sin = emb:cos(), emb:sin()
  if self.attention_scaling then cos, sin = cos * self.attention_scaling, sin * self.attention_scaling end
  cos, sin = cos:to(dtype), sin:to(dtype)
  self.cache[key] = { cos, sin }
  return cos, sin
end
-- Tables for explicit positions: an integer tensor [B, T] -> cos, sin [B, 1, T, rotary_dim], so each
-- row of a left-padded batch counts its own positions.
function M.RotaryEmbedding:tables(positions, dtype)
  if self.position_limit then self:check_positions(positions:max():item()) end
  local freqs = positions:float():unsqueeze(3) * self.inv_freq
  local emb = pair_angles(freqs, self.interleaved)
  local cos, sin = emb:cos(), emb:sin()
  if self.attention_scaling then cos, sin = cos * self.attention_scaling, sin * self.attention_scaling end
  return cos:to(dtype or 'f32'):unsqueeze(2), sin:to(dtype or 'f32'):unsqueeze(2)
end
function M.RotaryEmbedding:check_positions(last)
  local limit = self.position_limit
  if limit and last >= limit then
    error(string.format('RotaryEmbedding: position %d is not below rotary_position_limit %d (from there on the ' ..
      "checkpoint's own code computes attention otherwise; its family file in models/ says how)", last, limit), 3)
  end
end
function M.RotaryEmbedding:extra_repr()
  local s = self.scaling
  local kind = s and (s.type or s.rope_type)
  return string.format('dim=%d, base=%g%s%s', self.rotary_dim, self.base,
    (kind and kind ~= 'default') and string.format(', %s x%g', kind, s.factor or 1) or '',
    self.interleaved and ', interleaved' or '')
end

-- config.sliding_window: nil/0 (full causal attention), a number of keys for every layer, or a list with
-- one entry per layer (0 or false: full attention in that layer). layer is 1-based.
--- SelfAttention(config, layer): causal self-attention with grouped query heads, rotary embeddings and an
--- optional sliding window, in Megatron's layout (linear_qkv, linear_proj).
M.Attention = Module:extend('SelfAttention')
function M.Attention:init(config, layer)
  self.config = config
  local window = config.sliding_window
  if type(window) == 'table' then window = window[layer or 1] end
  rawset(self, 'window', window or nil)
  local heads, groups, d = config.num_attention_heads, config.num_query_groups, config.kv_channels
  -- the heads and query groups this module computes: fewer under tensor parallelism (pmp.nn.parallel)
  self.num_heads, self.num_query_groups = heads, groups
  local opts = { init_std = config.init_std, dtype = config.dtype }
  self.linear_qkv = layers.Linear(config.hidden_size, (heads + 2 * groups) * d,
    { bias = config.add_qkv_bias or false, init_std = config.init_std, dtype = config.dtype, init = config.init })
  if config.qk_layernorm then
    self.q_layernorm = norm(config, d)
    self.k_layernorm = norm(config, d)
  end
  self.linear_proj = layers.Linear(heads * d, config.hidden_size,
    { bias = config.add_proj_bias or false, init_std = config.output_init_std or opts.init_std, dtype = config.dtype, init = config.init })
  -- constants, not parameters; tensor parallelism keeps this rank's heads' slopes
  -- alibi_bias_hf_falcon_bf16 (pmp's own key, no Megatron one): the bf16-rounded bias of transformers'
  -- Falcon, which rounds the unscaled slopes and applies alibi_slope_scale after (alibi_bias_scale)
  if config.alibi_bias_hf_falcon_bf16 then
    rawset(self, 'alibi_slopes', alibi.slopes(heads))
    rawset(self, 'alibi_bias_scale', config.alibi_slope_scale or 1)
  elseif config.position_embedding_type == 'alibi' then
    rawset(self, 'alibi_slopes', alibi.slopes(heads, config.alibi_slope_scale))
  end
end

function M.Attention:forward(x, rope)
  local heads, groups, d = self.num_heads, self.num_query_groups, self.config.kv_channels
  local per_group = heads / groups
  local qkv = self.linear_qkv(x)
  -- with sequence parallelism x is this rank's slice of the sequence and linear_qkv gathers it whole
  local B, T = qkv:size(1), qkv:size(2)
  qkv = qkv:view(B, T, groups, per_group + 2, d)
  local q = qkv:narrow(4, 1, per_group):reshape(B, T, heads, d)
  local k = qkv:narrow(4, per_group + 1, 1):reshape(B, T, groups, d)
  local v = qkv:narrow(4, per_group + 2, 1):reshape(B, T, groups, d)
  if self.q_layernorm then
    q = self.q_layernorm(q)
    k = self.k_layernorm(k)
  end
  q, k, v = q:transpose(2, 3), k:transpose(2, 3), v:transpose(2, 3)
  if rope and rope.cos and (self.config.position_embedding_type or 'rope') == 'rope' then
    q = F.rope(q, rope.cos, rope.sin, self.config.rotary_interleaved)
    k = F.rope(k, rope.cos, rope.sin, self.config.rotary_interleaved)
  end
  -- continuous batching: keys and values live in the paged cache's block pools (pmp.serve.paged_kv_cache)
  if rope and rope.paged then
    return self.linear_proj(rope.paged:attention(self, q, k, v):transpose(2, 3):reshape(B, T, heads * d))
  end
  -- generation: keys and values of earlier steps are kept per layer in rope.cache
  if rope and rope.cache then
    local past = rope.cache[self]
    if past then
      k = tensor.cat({ past.k, k }, 3)
      v = tensor.cat({ past.v, v }, 3)
    end
    rope.cache[self] = { k = k, v = v }
  end
  local o
  local cp = rope and rope.context_parallel
  if cp and self.training and (self.config.attention_dropout or 0) > 0 then
    error('attention dropout is not supported under context parallelism', 0)
  end
  if cp then   -- this rank's queries against the whole sequence's keys (pmp.nn.context_parallel)
    o = context_parallel.attention(q, k, v, cp, { window = self.window, first_key = rope.first_key,
      alibi_slopes = self.alibi_slopes, alibi_hf_falcon_scale = self.alibi_bias_scale })
  else
    o = F.attention(q, k, v, { causal = true, window = self.window, first_key = rope and rope.first_key,
      alibi_slopes = self.alibi_slopes, alibi_hf_falcon_scale = self.alibi_bias_scale,
      dropout = self.training and (self.config.attention_dropout or 0) or 0 })
  end
  return self.linear_proj(o:transpose(2, 3):reshape(B, T, heads * d))
end

function M.Attention:extra_repr()
  local window = (self.window and self.window > 0) and ('window=' .. self.window) or ''
  if not self.alibi_slopes then return window end
  return window == '' and 'alibi' or window .. ', alibi'
end

--- MLP(config): linear_fc1, the activation (config.activation: swiglu, gelu, gelu_tanh, relu), linear_fc2.
M.MLP = Module:extend('MLP')
function M.MLP:init(config)
  self.activation = config.activation
  local gated = config.activation == 'swiglu'
  local bias = config.add_mlp_bias or false
  self.linear_fc1 = layers.Linear(config.hidden_size, (gated and 2 or 1) * config.ffn_hidden_size,
    { bias = bias, init_std = config.init_std, dtype = config.dtype, init = config.init })
  self.linear_fc2 = layers.Linear(config.ffn_hidden_size, config.hidden_size,
    { bias = bias, init_std = config.output_init_std or config.init_std, dtype = config.dtype, init = config.init })
end
-- linear_fc1 and the activation (what MoE's shared experts run apart from linear_fc2 to overlap them
-- with the token all-to-alls)
function M.MLP:hidden(x)
  local h = self.linear_fc1(x)
  if self.activation == 'swiglu' then return F.swiglu(h)
  elseif self.activation == 'gelu' then return h:gelu()
  elseif self.activation == 'gelu_tanh' then return h:gelu('tanh')
  elseif self.activation == 'relu' then return h:relu() end
  error("MLP: unknown activation '" .. tostring(self.activation) .. "'", 3)
end
function M.MLP:forward(x) return self.linear_fc2(self:hidden(x)) end
function M.MLP:extra_repr() return self.activation end

--- Pre-norm block with sequential residuals (or post-norm, or parallel attention and MLP: see the top).
--- config.post_self_attn_layernorm / post_mlp_layernorm also normalize the attention / MLP output before
--- its residual add (GLM-4's sandwich norms).
M.TransformerBlock = Module:extend('TransformerBlock')
function M.TransformerBlock:init(config, layer)
  rawset(self, 'dropout', config.hidden_dropout)
  rawset(self, 'post_norm', config.post_norm or false)
  rawset(self, 'parallel_residual', config.parallel_residual or false)
  self.input_layernorm = norm(config, config.hidden_size)
  self.self_attention = config.multi_latent_attention and require('pmp.nn.mla').MLASelfAttention(config)
    or M.Attention(config, layer)
  if config.post_self_attn_layernorm then self.post_self_attn_layernorm = norm(config, config.hidden_size) end
  if not config.shared_layernorm then self.pre_mlp_layernorm = norm(config, config.hidden_size) end
  local moe = require 'pmp.nn.moe'   -- required here: pmp.nn.moe builds its experts from M.MLP
  self.mlp = moe.is_moe_layer(config, layer) and moe.MoELayer(config, layer) or M.MLP(config)
  if config.post_mlp_layernorm then self.post_mlp_layernorm = norm(config, config.hidden_size) end
end
function M.TransformerBlock:forward(x, rope)
  local p, training = self.dropout, self.training
  if self.parallel_residual then
    local h = self.input_layernorm(x)
    local attention = self.self_attention(h, rope)
    local mlp = self.mlp(self.pre_mlp_layernorm and self.pre_mlp_layernorm(x) or h)
    return x + F.dropout(attention + mlp, p, training)
  end
  if self.post_norm then
    x = self.input_layernorm(x + F.dropout(self.self_attention(x, rope), p, training))
    return self.pre_mlp_layernorm(x + F.dropout(self.mlp(x), p, training))
  end
  local h = self.self_attention(self.input_layernorm(x), rope)
  if self.post_self_attn_layernorm then h = self.post_self_attn_layernorm(h) end
  x = x + F.dropout(h, p, training)
  h = self.mlp(self.pre_mlp_layernorm(x))
  if self.post_mlp_layernorm then h = self.post_mlp_layernorm(h) end
  return x + F.dropout(h, p, training)
end

-- The final norm of a model that has none (config.final_layernorm = false): a pipeline's last stage is
-- still the one holding decoder.final_layernorm.
local NoFinalNorm = Module:extend('Identity')
function NoFinalNorm:init() end
function NoFinalNorm:forward(x) return x end

-- The width of the word embeddings and of the output layer's rows, and whether it needs the projections
-- to and from hidden_size.
local function word_embedding_width(config)
  local width = config.word_embedding_size or config.hidden_size
  return width, width ~= config.hidden_size
end

local function projection(config, from, to)
  return layers.Linear(from, to, { bias = false, init_std = config.init_std, dtype = config.dtype, init = config.init })
end

--- LanguageModelEmbedding(config): the word embeddings (padded_vocab_size x word_embedding_size, by
--- default hidden_size; input_projection maps other widths to hidden_size), normalised by
--- word_embeddings_layernorm when config.word_embeddings_layernorm is set (BLOOM), plus learned position
--- embeddings (max_position_embeddings x hidden_size) with position_embedding_type 'learned_absolute'.
M.LanguageModelEmbedding = Module:extend('LanguageModelEmbedding')
function M.LanguageModelEmbedding:init(config)
  local width, projected = word_embedding_width(config)
  self.word_embeddings = layers.Embedding(config.padded_vocab_size, width, { init_std = config.init_std, dtype = config.dtype, init = config.init })
  if projected then self.input_projection = projection(config, width, config.hidden_size) end
  if config.word_embeddings_layernorm then self.word_embeddings_layernorm = norm(config, config.hidden_size) end
  if config.position_embedding_type == 'learned_absolute' then
    self.position_embeddings = layers.Embedding(config.max_position_embeddings, config.hidden_size,
      { init_std = config.init_std, dtype = config.dtype, init = config.init })
  end
end
-- positions: an integer tensor [B, T] or nil (0 .. T-1 in every row); ignored without position embeddings.
function M.LanguageModelEmbedding:forward(ids, positions)
  local x = self.word_embeddings(ids)
  if self.input_projection then x = self.input_projection(x) end
  if self.word_embeddings_layernorm then x = self.word_embeddings_layernorm(x) end
  if not self.position_embeddings then return x end
  local T = ids:size(2)
  positions = positions or tensor.arange(0, T):view(1, T)
  -- the engine checks every position; the error only needs rewording for what these ids are
  local ok, added = pcall(self.position_embeddings, positions)
  if not ok then
    error(string.format('LanguageModelEmbedding: position %s is outside max_position_embeddings %d',
      tostring(added):match('id (%-?%d+)') or '?', self.position_embeddings.num_embeddings), 2)
  end
  local words = self.word_embeddings
  if words.sequence_parallel and words.group.size > 1 then
    -- the word embeddings came reduce-scattered: this rank's slice of the sequence (the position
    -- embedding's gradient is then partial, and pmp.nn.parallel.finish_grads sums it over the group)
    local n = T / words.group.size
    added = added:narrow(2, 1 + words.group.rank * n, n)
  end
  return x + added
end

--- TransformerDecoder(config): num_layers TransformerBlocks (decoder.layers) and the final norm.
M.TransformerDecoder = Module:extend('TransformerDecoder')
function M.TransformerDecoder:init(config)
  local list = {}
  for k = 1, config.num_layers do list[k] = M.TransformerBlock(config, k) end
  self.layers = layers.ModuleList(list)
  self.final_layernorm = config.final_layernorm == false and NoFinalNorm() or norm(config, config.hidden_size)
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
  if not self.final_layernorm then return x end   -- a pipeline stage before the last
  return self.final_layernorm(x)
end

-- Logits, or the loss against targets, from the final hidden states (see forward).
local function output(model, x, targets, options)
  if model.output_projection then x = model.output_projection(x) end
  if model.score then
    if targets ~= nil then error('GPTModel: a model with a score head returns values [B, T]; it takes no targets', 3) end
    return model.score(x):squeeze(-1)
  end
  if model.tensor_parallel then return parallel.gpt_output(model, x, targets, options) end
  local weight = model.output_layer and model.output_layer.weight or model.embedding.word_embeddings.weight
  if model.config.norm_head then weight = F.normalize(weight) end   -- Baichuan2's NormHead
  if model.config.padded_vocab_size ~= model.config.vocab_size then weight = weight:narrow(1, 1, model.config.vocab_size) end
  local logits = x:matmul(weight:t())
  if targets == nil then return logits end
  -- an f16 loss overflows under --fp16's loss scaling: Megatron takes the loss of f32 logits
  if logits.dtype == 'f16' then logits = logits:float() end
  return F.cross_entropy(logits, targets, options and { ignore_index = options.ignore_index, reduction = options.reduction })
end

-- config: see M.config (Megatron's names). forward(ids [B, T]) -> logits [B, T, vocab_size] (the padded
-- vocabulary rows are cut off before the output matmul, so they never reach logits, loss or sampling);
-- forward(ids, targets) -> mean cross-entropy over targets ~= ignore_index (-100).
-- With config.head = 'score' the output layer is a scalar head: forward(ids) -> values [B, T].
-- Models loaded with pmp.models.from_pretrained also have save_pretrained(dir).
--- GPTModel(config): a decoder-only transformer (Llama, Qwen, GPT-style) in Megatron-Core's structure.
--- config: num_layers, hidden_size, num_attention_heads, vocab_size, and optional Megatron names
--- (num_query_groups, ffn_hidden_size, activation, normalization, ...; see pmp.nn.config).
--- config.init = false leaves the weight matrices uninitialized, for a model a checkpoint fills next.
--- model(ids [B, T]) -> logits [B, T, vocab]; model(ids, targets) -> mean cross-entropy.
M.GPTModel = Module:extend('GPTModel')
function M.GPTModel:init(config)
  config = M.config(config)
  rawset(self, 'config', config)
  if config.output_init_std == nil then config.output_init_std = config.init_std / math.sqrt(2 * config.num_layers) end
  self.embedding = M.LanguageModelEmbedding(config)
  local rotary_dim = config.multi_latent_attention and config.qk_pos_emb_head_dim
    or math.floor(config.kv_channels * config.rotary_percent)
  self.rotary_pos_emb = M.RotaryEmbedding(rotary_dim,
    { base = config.rotary_base, scaling = config.rope_scaling, interleaved = config.rotary_interleaved,
      position_limit = config.rotary_position_limit })
  self.decoder = M.TransformerDecoder(config)
  local width, projected = word_embedding_width(config)
  if projected then self.output_projection = projection(config, config.hidden_size, width) end
  if config.head == 'score' then
    -- a scalar per position (reward models, critics), as HF's *ForSequenceClassification with num_labels 1
    self.score = layers.Linear(width, 1, { bias = false, init_std = config.init_std, dtype = config.dtype,
      init = config.init })
  elseif config.head ~= nil and config.head ~= 'lm' then
    error("transformer config: head must be 'lm' or 'score', got '" .. tostring(config.head) .. "'", 2)
  elseif not config.tie_embeddings then
    self.output_layer = layers.Linear(width, config.padded_vocab_size,
      { bias = false, init_std = config.init_std, dtype = config.dtype, init = config.init })
  end
end

-- options.positions [B, T] and options.first_key [B] or [B, T] (see F.attention) serve packed sequences:
-- positions restart at each document and attention stays inside it. The rest of options goes to
-- F.cross_entropy (ignore_index, reduction).
--
-- A pipeline stage (pmp.dist.pipeline) keeps only some layers: without `embedding` its first argument
-- is the previous stage's hidden states [B, T, H]; without `decoder.final_layernorm` it returns its
-- hidden states instead of logits or loss.
--
-- A context-parallel model (pmp.nn.context_parallel) takes this rank's part of the sequence (ids,
-- targets, and options.positions / first_key if given); its mean loss is this rank's share of the
-- mean over the whole context-parallel group (see there).
function M.GPTModel:forward(ids, targets, options)
  local T = ids:size(2)
  local tp, cp = self.tensor_parallel, self.context_parallel
  -- a later pipeline stage under sequence parallelism receives its slice of the sequence
  if tp and tp.sequence_parallel and not self.embedding then T = T * tp.group.size end
  local learned = self.config.position_embedding_type == 'learned_absolute'
  if learned and cp then
    error('GPTModel: context parallelism is not supported with learned_absolute position embeddings', 2)
  end
  local x = self.embedding and self.embedding(ids, options and options.positions) or ids
  local cos, sin
  if learned then
    -- the positions went in with the embedding: no rotary tables
  elseif options and options.positions then
    cos, sin = self.rotary_pos_emb:tables(options.positions, x.dtype)
  elseif cp then
    cos, sin = context_parallel.rotary_tables(self.rotary_pos_emb, T, cp.group, x.dtype)
  else
    cos, sin = self.rotary_pos_emb(T, 0, x.dtype)
  end
  local context = { cos = cos, sin = sin, first_key = options and options.first_key, context_parallel = cp and cp.group }
  if self.embedding then x = F.dropout(x, self.config.hidden_dropout, self.training) end
  x = self.decoder(x, context)
  if not self.decoder.final_layernorm then return x end
  if cp and targets ~= nil and (options == nil or (options.reduction or 'mean') == 'mean') then
    local ignore_index = options and options.ignore_index
    local sum = output(self, x, targets, { ignore_index = ignore_index, reduction = 'sum' })
    return context_parallel.mean_loss(sum, targets, ignore_index, cp.group)
  end
  return output(self, x, targets, options)
end

--- One step of incremental decoding: ids [B, T] are the next tokens of each row, state.positions [B, T]
--- their positions, state.first_key [B] the first real (not left-padding) key of each row, and
--- state.cache (a table, filled here) the keys and values of earlier steps, or state.paged a
--- pmp.serve.paged_kv_cache that holds them in blocks instead. Returns logits [B, T, vocab],
--- or [B, 1, vocab] for the last position only when state.last_only is set (all generation needs).
--- A tensor-parallel model (every rank of its group calling with the same ids) caches its rank's heads
--- and returns the whole gathered logits, bit-identical on every rank (the ring collectives give every
--- rank the same sums), so ranks that sample from the same seeded stream pick the same tokens.
function M.GPTModel:decode(ids, state)
  if self.context_parallel then
    error('GPTModel:decode: a context-parallel model cannot decode; generate with the whole model', 2)
  end
  if self.tensor_parallel and self.tensor_parallel.sequence_parallel then
    -- each step feeds one token per row, which cannot be cut along the sequence
    error('GPTModel:decode: a sequence-parallel model cannot decode; generate with tensor parallelism alone', 2)
  end
  if self.score then error('GPTModel:decode: a model with a score head does not generate', 2) end
  local x = self.embedding(ids, state.positions)
  local cos, sin
  if self.config.position_embedding_type == 'rope' then cos, sin = self.rotary_pos_emb:tables(state.positions, x.dtype) end
  state.cache = state.cache or {}
  x = self.decoder(x, { cos = cos, sin = sin, cache = state.cache, first_key = state.first_key, paged = state.paged })
  if state.last_only then x = x:narrow(2, x:size(2), 1) end
  return output(self, x)
end

--- Writes a Hugging Face directory (config.json + model.safetensors, sharded when large) for a model of a
--- family that pmp.models knows; see pmp.models.save_pretrained.
function M.GPTModel:save_pretrained(dir, options)
  return require('pmp.models').save_pretrained(self, dir, options)
end

function M.GPTModel:extra_repr()
  local c = self.config
  local vocab = c.padded_vocab_size ~= c.vocab_size and string.format('%d (padded %d)', c.vocab_size, c.padded_vocab_size)
    or tostring(c.vocab_size)
  return string.format('layers=%d, hidden=%d, heads=%d, groups=%d, ffn=%d, vocab=%s%s', c.num_layers, c.hidden_size,
    c.num_attention_heads, c.num_query_groups, c.ffn_hidden_size, vocab, c.tie_embeddings and ', tied' or '')
end

return M
