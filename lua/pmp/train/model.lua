--- The Llama-style GPT of pmp.train.flags.model. Every rank builds the whole model from the current
--- generator state; pmp.train.parallel.split then keeps its part.
local M = {}

--- The SwiGLU MLP width Megatron's Llama recipes use: 8/3 of the hidden size, rounded up to 64.
function M.ffn_hidden_size(opts)
  if opts.ffn_hidden_size > 0 then return opts.ffn_hidden_size end
  return math.floor((opts.hidden_size * 8 / 3 + 63) / 64) * 64
end

-- The shapes the flags must agree on, checked before anything is built.
local function check_shapes(opts)
  local heads, groups = opts.num_attention_heads, opts.num_query_groups
  if opts.hidden_size % heads ~= 0 then
    error(string.format('--hidden-size %d is not a multiple of --num-attention-heads %d', opts.hidden_size, heads), 0)
  end
  if groups > 0 and heads % groups ~= 0 then
    error(string.format('--num-attention-heads %d is not a multiple of --num-query-groups %d', heads, groups), 0)
  end
end

function M.gpt(opts, vocab_size)
  check_shapes(opts)
  return require('pmp.nn').GPTModel({
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
    tie_embeddings = not opts.untie_embeddings_and_output_weights,
    recompute_granularity = opts.recompute_granularity,
    make_vocab_size_divisible_by = opts.make_vocab_size_divisible_by,
    tensor_model_parallel_size = opts.tensor_model_parallel_size or 1,
  })
end

return M
