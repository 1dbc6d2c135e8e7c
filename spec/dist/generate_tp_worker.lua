-- Run by spec/dist_generate_tp_spec.lua on every rank of a tensor-parallel group as large as the world
-- (also without mpirun, as a group of one). Each case builds a GPTModel twice from the same seed, splits
-- one (pmp.nn.parallel.tensor_parallel) and keeps the other whole as the reference, in this same process.
-- Differences are the largest over the ranks, printed by rank 0 alone (mpirun may split other ranks' lines).
--   LOGITS case max_diff                    decode's logits, prompt then 4 cached steps, vs the whole model's
--   TOKENS case mode mismatches             generated tokens differing from the whole model's (any rank)
--   LOGPROBS case mode max_diff             their log-probs vs the whole model's
--   COUNT case mode n                       tokens generated (rank 0)
--   ERROR case message                      the error decode raised on rank 0
local parallel = pmp.nn.parallel

pmp.dist.init{ tp = pmp.dist.init().world }
local group = pmp.dist.group('tp')

local function worst(x) return group:all_reduce(pmp.tensor({ x }, { dtype = 'f64' }), 'max'):item() end
local function report(...) if group.rank == 0 then print(string.format(...)) end end
local function max_diff(a, b) return (a:double() - b:double()):abs():max():item() end

local VOCAB = 61

local function config(case)
  local c = { num_layers = 2, hidden_size = 32, num_attention_heads = 4, num_query_groups = 2, ffn_hidden_size = 48,
    vocab_size = VOCAB, make_vocab_size_divisible_by = 4, tensor_model_parallel_size = 2,   -- padded to 64
    tie_embeddings = case.tied, init_std = 0.1 }   -- peaked enough that greedy choices are clear of rounding
  if case.extras then   -- LayerNorm, GELU, biases everywhere and qk_layernorm
    c.normalization, c.activation, c.add_bias_linear, c.add_qkv_bias, c.qk_layernorm = 'LayerNorm', 'gelu', true, true, true
  end
  if case.mla then   -- DeepSeek's multi-latent attention (its cache holds the latent and the rotary keys)
    c.multi_latent_attention, c.kv_lora_rank, c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim = true, 12, 8, 4, 6
  end
  if case.moe then   -- the second layer a MoE layer (whole on every rank)
    c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size, c.moe_layer_freq = 4, 2, 24, { 0, 1 }
  end
  return c
end

local function build(case)
  pmp.manual_seed(1234)
  local model = pmp.nn.GPTModel(config(case))
  model:eval()
  return model
end

-- decode on a batch of equal-length prompts, then 4 steps feeding the whole model's greedy tokens
local function decode_logits(reference, model)
  pmp.manual_seed(7)
  local B, T = 2, 5
  local ids = pmp.randint(0, VOCAB, { B, T })
  local positions = pmp.arange(0, T):view(1, T):expand(B, T):contiguous()
  local function state() return { first_key = pmp.zeros({ B }, { dtype = 'i64' }), positions = positions } end
  local ref_state, state_tp = state(), state()
  local worst_diff = 0
  pmp.no_grad(function()
    local a, b = reference:decode(ids, ref_state), model:decode(ids, state_tp)
    worst_diff = math.max(worst_diff, max_diff(a, b))
    for step = 0, 3 do
      local next_ids = a:select(2, a:size(2)):argmax(2):view(B, 1)
      local at = (pmp.zeros({ B, 1 }, { dtype = 'i64' }) + (T + step))
      ref_state.positions, state_tp.positions = at, at
      a, b = reference:decode(next_ids, ref_state), model:decode(next_ids, state_tp)
      worst_diff = math.max(worst_diff, max_diff(a, b))
    end
  end)
  return worst_diff
end

-- left-padded prompts of different lengths
local PROMPTS = { { 3, 4, 5, 6, 7 }, { 9, 2 }, { 11, 12, 13 } }
local MODES = {
  greedy = { max_new_tokens = 8, return_logprobs = true },
  sampled = { max_new_tokens = 8, return_logprobs = true, temperature = 1.0, top_p = 0.95 },
}
local SEEDS = { 101, 202, 303 }   -- sampled rows: one generator per prompt, fresh for every run

local function options(mode)
  local o = {}
  for k, v in pairs(MODES[mode]) do o[k] = v end
  if mode == 'sampled' then
    o.generator = {}
    for b, seed in ipairs(SEEDS) do o.generator[b] = pmp.Generator(seed) end
  end
  return o
end

local function run_case(name, case)
  local reference = build(case)
  local model = parallel.tensor_parallel(build(case))
  report('LOGITS %s %.3e', name, worst(decode_logits(reference, model)))
  for _, mode in ipairs({ 'greedy', 'sampled' }) do
    local expected = pmp.generate(reference, PROMPTS, options(mode))
    local got = pmp.generate(model, PROMPTS, options(mode))
    local mismatches, diff, count = 0, 0, 0
    for b = 1, #PROMPTS do
      local e, g = expected[b], got[b]
      if #e.tokens ~= #g.tokens then mismatches = mismatches + 1 end
      for k = 1, math.max(#e.tokens, #g.tokens) do
        if e.tokens[k] ~= g.tokens[k] then mismatches = mismatches + 1 end
        if e.logprobs[k] and g.logprobs[k] then diff = math.max(diff, math.abs(e.logprobs[k] - g.logprobs[k])) end
      end
      count = count + #g.tokens
    end
    report('TOKENS %s %s %d', name, mode, worst(mismatches))
    report('LOGPROBS %s %s %.3e', name, mode, worst(diff))
    report('COUNT %s %s %d', name, mode, count)
  end
end

run_case('gqa', {})
run_case('tied_extras', { tied = true, extras = true })
run_case('mla', { mla = true })
run_case('moe', { moe = true })

-- sequence parallelism cuts the sequence, which a one-token decode step cannot be
if group.size > 1 then
  local model = parallel.tensor_parallel(build({}), { sequence_parallel = true })
  local ok, message = pcall(pmp.generate, model, PROMPTS, { max_new_tokens = 2 })
  report('ERROR sequence_parallel %s', ok and 'none' or tostring(message))
end
