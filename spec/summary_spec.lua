require 'busted.runner'()

-- Expected values are closed forms written out here for a Llama-style config (SwiGLU MLP, RMSNorm,
-- grouped-query attention, no biases), not numbers taken from pmp.summary.
describe('pmp.summary', function()
  local L, H, heads, groups, ffn, V = 2, 64, 4, 2, 96, 100
  local d = H / heads

  local function model(options)
    local config = { num_layers = L, hidden_size = H, num_attention_heads = heads, num_query_groups = groups,
      vocab_size = V, ffn_hidden_size = ffn }
    for k, v in pairs(options or {}) do config[k] = v end
    pmp.manual_seed(1)
    return pmp.nn.GPTModel(config)
  end

  -- Weights of the matrix products in one block: q, k, v; the output projection; gate and up; down.
  local block_matmul_params = H * (heads + 2 * groups) * d + heads * d * H + H * 2 * ffn + ffn * H
  local block_params = block_matmul_params + 2 * H -- and the two norms

  local function row(s, name)
    for _, r in ipairs(s.rows) do
      if r.name == name then return r end
    end
    error('no row ' .. name)
  end

  it('counts parameters per block and in total as the closed form for a Llama-style config', function()
    local s = pmp.summary.rows(model(), { seq = 16 })
    assert.equal(V * H, row(s, 'embedding').params)
    for layer = 0, L - 1 do assert.equal(block_params, row(s, 'decoder.layers.' .. layer).params) end
    assert.equal(H, row(s, 'decoder.final_layernorm').params)
    assert.equal(V * H + L * block_params + H, s.total.params)   -- tied output layer

    local padded = model({ untie_embeddings_and_output_weights = true, make_vocab_size_divisible_by = 64 })
    local Vp = 128
    s = pmp.summary.rows(padded, { seq = 16 })
    assert.equal(Vp * H, row(s, 'output_layer').params)
    assert.equal(2 * Vp * H + L * block_params + H, s.total.params)
  end)

  it('counts forward FLOPs as 2 * matmul params * tokens plus attention, per block and in total', function()
    local B, T = 3, 20
    local tokens = B * T
    -- QK^T and attention-times-V: 2 * B * T * T * heads * d each
    local attention = 4 * B * T * T * heads * d
    for _, options in ipairs({ {}, { untie_embeddings_and_output_weights = true, make_vocab_size_divisible_by = 64 } }) do
      local s = pmp.summary.rows(model(options), { seq = T, batch = B })
      assert.equal(2 * block_matmul_params * tokens + attention, row(s, 'decoder.layers.1').flops)
      -- the logits use the first vocab_size rows of the (possibly padded) output weight
      assert.equal(2 * tokens * H * V, row(s, '(logits)').flops)
      assert.equal(2 * tokens * (L * block_matmul_params + H * V) + L * attention, s.total.flops)
    end
  end)

  it('estimates the activations backward keeps, in proportion to the tokens', function()
    local B, T = 2, 8
    local bytes = 4 -- f32
    -- per block: two norm inputs, the q/k/v projection input, q, k, v and the attention output, the
    -- output projection input, the MLP input, the SwiGLU input [gate | up] and the down projection input
    local per_token = H + H + H + (heads + 2 * groups) * d + heads * d + heads * d + H + 2 * ffn + ffn
    local s = pmp.summary.rows(model(), { seq = T, batch = B })
    assert.equal(B * T * per_token * bytes, row(s, 'decoder.layers.0').activation_bytes)
    local double = pmp.summary.rows(model(), { seq = T, batch = 2 * B })
    assert.equal(2 * s.total.activation_bytes, double.total.activation_bytes)
    local bf16 = pmp.summary.rows(model({ dtype = 'bf16' }), { seq = T, batch = B })
    assert.equal(s.total.activation_bytes / 2, bf16.total.activation_bytes)
  end)

  it('prints a table with a row per block and the totals', function()
    local text = pmp.summary.text(model(), { seq = 16, batch = 2 })
    assert.matches('^GPTModel, batch 2 x seq 16 = 32 tokens, f32\n', text)
    assert.matches('\ndecoder%.layers%.0 +%d', text)
    assert.matches('\ndecoder%.layers%.1 +%d', text)
    assert.matches('\ntotal +[%d.]+ K +[%d.]+ KiB +[%d.]+ MFLOP$', text)
  end)

  it('rejects a missing sequence length and a model that is not a module', function()
    assert.error_matches(function() pmp.summary.rows(model(), {}) end, 'options.seq must be a positive integer', 1, true)
    assert.error_matches(function() pmp.summary.rows(model(), { seq = 4, batch = 0 }) end, 'options.batch', 1, true)
    assert.error_matches(function() pmp.summary.rows({}, { seq = 4 }) end, 'expected an nn module', 1, true)
  end)
end)
