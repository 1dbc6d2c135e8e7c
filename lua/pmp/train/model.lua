--- The Llama-style GPT of pmp.train.flags.model. Every rank builds the whole model from the current
--- generator state; pmp.train.parallel.split then keeps its part.
local M = {}

--- The MLP width when --ffn-hidden-size is 0: for SwiGLU the one Megatron's Llama recipes use, 8/3 of
--- the hidden size rounded up to 64; for the GELU MLP (--swiglu=false) Megatron's 4 x hidden.
function M.ffn_hidden_size(opts)
  if opts.ffn_hidden_size > 0 then return opts.ffn_hidden_size end
  if opts.swiglu == false then return 4 * opts.hidden_size end
  return math.floor((opts.hidden_size * 8 / 3 + 63) / 64) * 64
end

-- Megatron's MLP flags: SwiGLU, or without --swiglu GELU (erf, or --openai-gelu's tanh form).
local function activation_of(opts)
  if opts.swiglu ~= false then return 'swiglu' end
  return opts.openai_gelu and 'gelu_tanh' or 'gelu'
end

-- The shapes the flags must agree on, checked before anything is built.
local function check_shapes(opts)
  local heads, groups = opts.num_attention_heads, opts.num_query_groups
  if (opts.kv_channels or 0) == 0 and opts.hidden_size % heads ~= 0 then
    error(string.format('--hidden-size %d is not a multiple of --num-attention-heads %d', opts.hidden_size, heads), 0)
  end
  if groups > 0 and heads % groups ~= 0 then
    error(string.format('--num-attention-heads %d is not a multiple of --num-query-groups %d', heads, groups), 0)
  end
end

-- Megatron's --moe-layer-freq: an integer, or a list of 0/1 per layer written as "[0,1,1]" or as the
-- Python expression Megatron evaluates, "([0]*1+[1]*3)".
function M.moe_layer_freq(text)
  text = tostring(text)
  if text:match('^%s*%d+%s*$') then return tonumber(text) end
  local list = {}
  for term in text:gsub('^%s*%((.*)%)%s*$', '%1'):gmatch('[^+]+') do
    local items, times = term:match('^%s*%[([%d,%s]*)%]%s*%*?%s*(%d*)%s*$')
    if not items then error(string.format("--moe-layer-freq '%s': expected N, [0,1,...] or ([0]*N+[1]*M)", text), 0) end
    for _ = 1, tonumber(times) or 1 do
      for v in items:gmatch('%d+') do list[#list + 1] = tonumber(v) end
    end
  end
  return list
end

-- The MoE keys of the GPTModel config from pmp.train.flags.moe (nothing with --num-experts 0).
local function moe_config(config, opts)
  if (opts.num_experts or 0) == 0 then return config end
  config.num_moe_experts = opts.num_experts
  config.moe_router_topk = opts.moe_router_topk
  config.moe_ffn_hidden_size = opts.moe_ffn_hidden_size > 0 and opts.moe_ffn_hidden_size or config.ffn_hidden_size
  config.moe_shared_expert_intermediate_size = opts.moe_shared_expert_intermediate_size
  config.moe_shared_expert_gate = opts.moe_shared_expert_gate
  config.moe_shared_expert_overlap = opts.moe_shared_expert_overlap
  config.moe_router_pre_softmax = opts.moe_router_pre_softmax
  config.moe_router_load_balancing_type = opts.moe_router_load_balancing_type
  config.moe_router_score_function = opts.moe_router_score_function
  config.moe_router_enable_expert_bias = opts.moe_router_enable_expert_bias
  config.moe_router_bias_update_rate = opts.moe_router_bias_update_rate
  config.moe_router_num_groups = opts.moe_router_num_groups > 0 and opts.moe_router_num_groups or nil
  config.moe_router_group_topk = opts.moe_router_group_topk > 0 and opts.moe_router_group_topk or nil
  config.moe_router_topk_scaling_factor = opts.moe_router_topk_scaling_factor > 0 and opts.moe_router_topk_scaling_factor or nil
  if opts.moe_token_dispatcher_type ~= 'alltoall' then
    error(string.format("--moe-token-dispatcher-type '%s' is not supported (alltoall)", opts.moe_token_dispatcher_type), 0)
  end
  config.moe_aux_loss_coeff = opts.moe_aux_loss_coeff
  config.moe_z_loss_coeff = opts.moe_z_loss_coeff
  config.moe_grouped_gemm = opts.moe_grouped_gemm
  config.moe_expert_capacity_factor = opts.moe_expert_capacity_factor > 0 and opts.moe_expert_capacity_factor or nil
  config.moe_token_drop_policy = opts.moe_token_drop_policy
  config.moe_layer_freq = M.moe_layer_freq(opts.moe_layer_freq)
  config.expert_model_parallel_size = opts.expert_model_parallel_size
  return config
end

-- The multi-latent attention keys of the GPTModel config from pmp.train.flags.mla.
local function mla_config(config, opts)
  if not opts.multi_latent_attention then return config end
  config.multi_latent_attention = true
  config.q_lora_rank = opts.q_lora_rank > 0 and opts.q_lora_rank or nil
  config.kv_lora_rank = opts.kv_lora_rank
  config.qk_head_dim = opts.qk_head_dim
  config.qk_pos_emb_head_dim = opts.qk_pos_emb_head_dim
  config.v_head_dim = opts.v_head_dim
  return config
end

-- The keys of pmp.train.megatron_flags.architecture (absent in recipes that do not parse that set).
local function architecture_config(config, opts)
  config.activation = activation_of(opts)
  -- Megatron's add_bias_linear: linear_qkv, linear_proj, linear_fc1 and linear_fc2
  config.add_bias_linear = opts.disable_bias_linear == false
  config.normalization = opts.normalization
  config.position_embedding_type = opts.position_embedding_type
  config.max_position_embeddings = opts.max_position_embeddings
  config.add_qkv_bias = opts.add_qkv_bias or config.add_bias_linear
  config.qk_layernorm = opts.qk_layernorm
  config.kv_channels = (opts.kv_channels or 0) > 0 and opts.kv_channels or nil
  config.rotary_percent = opts.rotary_percent
  local factor = opts.rotary_seq_len_interpolation_factor
  if factor and factor ~= 1 then config.rope_scaling = { type = 'linear', factor = factor } end
  return config
end

function M.gpt(opts, vocab_size)
  check_shapes(opts)
  return require('pmp.nn').GPTModel(architecture_config(mla_config(moe_config({
    num_layers = opts.num_layers,
    hidden_size = opts.hidden_size,
    ffn_hidden_size = M.ffn_hidden_size(opts),
    num_attention_heads = opts.num_attention_heads,
    num_query_groups = opts.num_query_groups > 0 and opts.num_query_groups or opts.num_attention_heads,
    vocab_size = vocab_size,
    rotary_base = opts.rotary_base,
    norm_epsilon = opts.norm_epsilon,
    init_std = opts.init_method_std,
    hidden_dropout = opts.hidden_dropout,
    attention_dropout = opts.attention_dropout,
    tie_embeddings = not opts.untie_embeddings_and_output_weights,
    recompute_granularity = opts.recompute_granularity,
    make_vocab_size_divisible_by = opts.make_vocab_size_divisible_by,
    padded_vocab_size = opts.padded_vocab_size,
    tensor_model_parallel_size = opts.tensor_model_parallel_size or 1,
  }, opts), opts), opts))
end

return M
