require 'busted.runner'()
-- Megatron's attention dropout (F.attention's dropout option, GPTModel's attention_dropout): with
-- identity values each output row is the row of attention probabilities itself, so every entry must
-- be 0 (dropped) or the closed-form softmax probability / (1 - p), computed here in f64; gradients are
-- checked against f64 finite differences with the mask held fixed by the seed.
local F = pmp.nn.functional
local gradcheck = require('spec.support.gradcheck').gradcheck

-- softmax(q k^T / sqrt(D)) of query t over keys 0..t, in Lua arithmetic
local function probabilities(q, k, t, D)
  local scores, top = {}, -math.huge
  for s = 1, t do
    local dot = 0
    for j = 1, D do dot = dot + q[t][j] * k[s][j] end
    scores[s] = dot / math.sqrt(D)
    top = math.max(top, scores[s])
  end
  local sum = 0
  for s = 1, t do scores[s] = math.exp(scores[s] - top); sum = sum + scores[s] end
  for s = 1, t do scores[s] = scores[s] / sum end
  return scores
end

describe('attention dropout', function()
  it('drops causal softmax probabilities and scales the rest by 1/(1-p), per query head of a KV group', function()
    local T, D, p = 5, 5, 0.4
    pmp.manual_seed(5)
    local q = pmp.randn({ 1, 4, T, D }, { dtype = 'f64' })
    local k = pmp.randn({ 1, 2, T, D }, { dtype = 'f64' })
    local eye = {}
    for i = 1, T do eye[i] = {} for j = 1, D do eye[i][j] = i == j and 1 or 0 end end
    local v = pmp.tensor({ { eye, eye } }, { dtype = 'f64' })
    local out = F.attention(q, k, v, { dropout = p }):totable()[1]
    local qs, ks = q:totable()[1], k:totable()[1]
    local dropped, kept = 0, 0
    for h = 1, 4 do
      local group = math.floor((h - 1) / 2) + 1
      for t = 1, T do
        local probs = probabilities(qs[h], ks[group], t, D)
        for s = 1, T do
          local got = out[h][t][s]
          if s > t then
            assert.are.equal(0, got)
          elseif got == 0 then
            dropped = dropped + 1
          else
            kept = kept + 1
            assert.is_true(math.abs(got - probs[s] / (1 - p)) < 1e-12, string.format('head %d query %d key %d: %.15g vs %.15g',
              h, t, s, got, probs[s] / (1 - p)))
          end
        end
      end
    end
    -- 60 probabilities at p = 0.4: some dropped, most kept
    assert.is_true(dropped > 5 and kept > 20, dropped .. ' dropped, ' .. kept .. ' kept')
  end)

  it('passes f64 finite differences (mask fixed by the seed)', function()
    pmp.manual_seed(6)
    local q, k, v = pmp.randn({ 1, 2, 3, 4 }, { dtype = 'f64' }), pmp.randn({ 1, 1, 3, 4 }, { dtype = 'f64' }),
      pmp.randn({ 1, 1, 3, 4 }, { dtype = 'f64' })
    gradcheck(function(a, b, c) return F.attention(a, b, c, { dropout = 0.3 }) end, { q, k, v })
  end)

  it("is the fused attention in evaluation, and GPTModel's attention_dropout trains through it", function()
    pmp.manual_seed(3)
    local config = { num_layers = 1, hidden_size = 16, num_attention_heads = 4, num_query_groups = 2, vocab_size = 12,
      attention_dropout = 0.5 }
    local model = pmp.nn.GPTModel(config)
    pmp.manual_seed(3)
    config.attention_dropout = 0
    local plain = pmp.nn.GPTModel(config)
    local ids = pmp.tensor({ { 1, 2, 3, 4, 5, 6 } }, { dtype = 'i64' })
    model:eval()
    plain:eval()
    assert.are.equal(0, (model(ids) - plain(ids)):abs():max():item())
    model:train()
    plain:train()
    assert.is_true((model(ids) - plain(ids)):abs():max():item() > 1e-4)
    local ok, err = pcall(F.attention, pmp.randn({ 1, 1, 2, 4 }), pmp.randn({ 1, 1, 2, 4 }), pmp.randn({ 1, 1, 2, 4 }),
      { dropout = 0.1, window = 1 })
    assert.is_false(ok)
    assert.matches('dropout on the probabilities is not supported with first_key, a window or ALiBi', err)
  end)
end)
