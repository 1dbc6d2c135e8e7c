require 'busted.runner'()
-- pmp.rl against the formulas written out in plain Lua (f64) here, and its gradients against f64
-- finite differences.
local gradcheck = require 'spec.support.gradcheck'
local expect = require 'spec.support.expect'
local rl = pmp.rl

local function values(t)
  local v = t:double():totable()
  return type(v) == 'number' and { v } or v
end

local function close(expected, got, tol, what)
  tol = tol or 1e-5
  if type(expected) == 'number' then expected, got = { expected }, { got } end
  for i, e in ipairs(expected) do
    if type(e) == 'table' then close(e, got[i], tol, what)
    else
      assert(math.abs(e - got[i]) <= tol * (1 + math.abs(e)),
        string.format('%s: element %d expected %.8g, got %.8g', what or 'value', i, e, got[i]))
    end
  end
end

local function sigmoid(x) return 1 / (1 + math.exp(-x)) end

-- a fixed batch: 3 rows of 5 tokens, responses in different places
local LOGP = { { -1.0, -2.2, -0.5, -0.7, -3.0 }, { -0.3, -1.0, -2.0, -0.1, -0.4 }, { -1.5, -0.2, -0.9, -1.1, -0.6 } }
local OLD = { { -1.1, -1.5, -0.4, -1.9, -2.0 }, { -0.3, -2.0, -1.0, -0.2, -0.5 }, { -1.4, -0.3, -0.5, -1.0, -2.6 } }
local ADV = { { 0.5, 1.0, -1.0, 2.0, -0.3 }, { 2.0, -0.5, 0.7, -1.2, 0.4 }, { -0.8, 0.3, 1.5, -2.0, 1.1 } }
local MASK = { { 0, 1, 1, 1, 0 }, { 0, 0, 1, 1, 1 }, { 1, 1, 1, 1, 1 } }

local function f32(rows) return pmp.tensor(rows, { dtype = 'f32' }) end
local function f64(rows) return pmp.tensor(rows, { dtype = 'f64' }) end

local function masked_mean(rows, fn)
  local sum, n = 0, 0
  for b = 1, #MASK do
    for t = 1, #MASK[b] do
      if MASK[b][t] == 1 then sum, n = sum + fn(b, t, rows), n + 1 end
    end
  end
  return sum / n
end

describe('pmp.rl.kl', function()
  it('computes k1, k2 and k3 elementwise', function()
    local formulas = {
      k1 = function(p, r) return p - r end,
      k2 = function(p, r) return 0.5 * (p - r) ^ 2 end,
      k3 = function(p, r) return math.exp(r - p) - (r - p) - 1 end,
    }
    for kind, formula in pairs(formulas) do
      local expected = {}
      for b = 1, 3 do
        expected[b] = {}
        for t = 1, 5 do expected[b][t] = formula(LOGP[b][t], OLD[b][t]) end
      end
      close(expected, values(rl.kl(f32(LOGP), f32(OLD), kind)), 1e-5, kind)
    end
  end)
  it("matches NeMo-RL's hand-computed k3 (mean 0.362 for logp [0,-1,-2], ref -1)", function()
    close(0.3620, rl.kl(f32({ { 0, -1, -2 } }), f32({ { -1, -1, -1 } }), 'k3'):mean():item(), 1e-3)
  end)
  it('has the gradient of its formula', function()
    for _, kind in ipairs({ 'k1', 'k2', 'k3' }) do
      gradcheck.gradcheck(function(p, r) return rl.kl(p, r, kind) end, { f64(LOGP), f64(OLD) })
    end
  end)
  it('rejects an unknown kind', function()
    expect.fails_with(function() rl.kl(f32(LOGP), f32(OLD), 'k4') end, "'k1', 'k2' or 'k3'", 'k4')
  end)
end)

describe('pmp.rl.gae', function()
  local REWARDS = { { 0, 0.1, -0.2, 1.0, 0 }, { 0, 0, 0.3, 0.0, 2.0 }, { 0.5, 0, 0, -1, 1 } }
  local VALUES = { { 0.3, 0.2, 0.5, -0.4, 9 }, { 7, 7, 0.1, 0.6, 0.2 }, { 0.1, 0.2, 0.3, 0.4, 0.5 } }
  -- the recursion over each row's response tokens, written out per row
  local function reference(gamma, lam)
    local A, R = {}, {}
    for b = 1, 3 do
      A[b], R[b] = { 0, 0, 0, 0, 0 }, { 0, 0, 0, 0, 0 }
      local response = {}
      for t = 1, 5 do if MASK[b][t] == 1 then response[#response + 1] = t end end
      local last = 0
      for k = #response, 1, -1 do
        local t = response[k]
        local v_next = k < #response and VALUES[b][response[k + 1]] or 0
        local delta = REWARDS[b][t] + gamma * v_next - VALUES[b][t]
        last = delta + gamma * lam * last
        A[b][t], R[b][t] = last, last + VALUES[b][t]
      end
    end
    return A, R
  end
  it('follows the backward recursion over response tokens, 0 elsewhere', function()
    for _, gl in ipairs({ { 1, 0.95 }, { 0.9, 0.8 }, { 1, 1 } }) do
      local A, R = reference(gl[1], gl[2])
      local a, r = rl.gae(f32(REWARDS), f32(VALUES), f32(MASK), gl[1], gl[2])
      close(A, values(a), 1e-5, 'advantages')
      close(R, values(r), 1e-5, 'returns')
    end
  end)
end)

describe('pmp.rl.whiten', function()
  it('normalises by the masked mean and unbiased variance, 0 outside the mask', function()
    local mean = masked_mean(ADV, function(b, t) return ADV[b][t] end)
    local n = 0
    for b = 1, 3 do for t = 1, 5 do n = n + MASK[b][t] end end
    local var = masked_mean(ADV, function(b, t) return (ADV[b][t] - mean) ^ 2 end) * n / (n - 1)
    local expected = {}
    for b = 1, 3 do
      expected[b] = {}
      for t = 1, 5 do expected[b][t] = MASK[b][t] == 1 and (ADV[b][t] - mean) / math.sqrt(var + 1e-8) or 0 end
    end
    close(expected, values(rl.whiten(f32(ADV), f32(MASK))), 1e-5)
  end)
end)

describe('pmp.rl.group_advantages', function()
  local REWARDS = { 1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5, 3, -1, 2, 0 }
  local function reference(scale)
    local out = {}
    for g = 0, 2 do
      local sum = 0
      for k = 1, 4 do sum = sum + REWARDS[4 * g + k] end
      local mean, sq = sum / 4, 0
      for k = 1, 4 do sq = sq + (REWARDS[4 * g + k] - mean) ^ 2 end
      local std = math.sqrt(sq / 3)
      for k = 1, 4 do
        local r = REWARDS[4 * g + k]
        out[4 * g + k] = scale and (r - mean) / (std + 1e-4) or r - mean
      end
    end
    return out
  end
  it('centres each group and divides by its unbiased std + 1e-4', function()
    close(reference(true), values(rl.group_advantages(f32(REWARDS), 4)), 1e-5)
  end)
  it('only centres with opts.scale = false (Dr. GRPO)', function()
    close(reference(false), values(rl.group_advantages(REWARDS, 4, { scale = false })), 1e-6)
  end)
  it('rejects a group size that does not divide the rewards', function()
    expect.fails_with(function() rl.group_advantages(REWARDS, 5) end, 'group_size 5', '12 rewards')
  end)
end)

describe('pmp.rl.ppo_policy_loss', function()
  local function reference(clip)
    local clipped_count = 0
    local loss = masked_mean(nil, function(b, t)
      local ratio = math.exp(LOGP[b][t] - OLD[b][t])
      local A = ADV[b][t]
      local plain, clipped = -A * ratio, -A * math.max(1 - clip, math.min(1 + clip, ratio))
      if clipped > plain then clipped_count = clipped_count + 1 end
      return math.max(plain, clipped)
    end)
    local n = 0
    for b = 1, 3 do for t = 1, 5 do n = n + MASK[b][t] end end
    return loss, clipped_count / n
  end
  it('is the masked mean of the clipped surrogate, with the clip fraction', function()
    for _, clip in ipairs({ 0.2, 0.5 }) do
      local loss, clipfrac = rl.ppo_policy_loss(f32(LOGP), f32(OLD), f32(ADV), f32(MASK), clip)
      local ref_loss, ref_frac = reference(clip)
      close(ref_loss, loss:item(), 1e-5, 'loss')
      close(ref_frac, clipfrac, 1e-6, 'clipfrac')
      assert.is_true(ref_frac > 0)
    end
  end)
  it("matches NeMo-RL's golden value -0.6333 (A = [1, -1, 2], ratios [0.5, 1, 1.5])", function()
    local logp = f32({ { math.log(0.5) - 1, -1, math.log(1.5) - 1 } })
    local loss = rl.ppo_policy_loss(logp, f32({ { -1, -1, -1 } }), f32({ { 1, -1, 2 } }), f32({ { 1, 1, 1 } }), 0.2)
    close(-0.6333, loss:item(), 1e-4)
  end)
  it('has the gradient of the clipped surrogate', function()
    gradcheck.gradcheck(function(logp) return (rl.ppo_policy_loss(logp, f64(OLD), f64(ADV), f64(MASK), 0.2)) end,
      { f64(LOGP) })
  end)
end)

describe('pmp.rl.value_loss', function()
  local V = { { 0.1, 0.5, -0.2, 1.4, 0 }, { 0, 2, 0.3, 0.2, -1 }, { 1, 0.3, 0.4, 0.9, -0.7 } }
  local V_OLD = { { 0, 0.1, 0.2, 1.0, 0 }, { 0, 1, 0.2, 0.9, -0.3 }, { 0.2, 0.4, 0.1, 0.5, 0 } }
  local RETURNS = { { 1, 1, 0, 0.5, 0 }, { 0, 0, 1, 0.1, -1.5 }, { 0.5, 0.2, -0.4, 1.2, 0.3 } }
  it('is half the masked mean of the larger of the plain and clipped squared errors', function()
    local clip, larger = 0.2, 0
    local expected = 0.5 * masked_mean(nil, function(b, t)
      local v, old, R = V[b][t], V_OLD[b][t], RETURNS[b][t]
      local vc = old + math.max(-clip, math.min(clip, v - old))
      if (vc - R) ^ 2 > (v - R) ^ 2 then larger = larger + 1 end
      return math.max((v - R) ^ 2, (vc - R) ^ 2)
    end)
    local loss, frac = rl.value_loss(f32(V), f32(V_OLD), f32(RETURNS), f32(MASK), clip)
    close(expected, loss:item(), 1e-5)
    close(larger / 11, frac, 1e-6, 'clipfrac')
  end)
  it('has the gradient of its formula', function()
    gradcheck.gradcheck(function(v) return (rl.value_loss(v, f64(V_OLD), f64(RETURNS), f64(MASK), 0.2)) end, { f64(V) })
  end)
end)

describe('pmp.rl.dpo_loss', function()
  local PC, PR, RC, RR = { -10.5, -3.0, -7.2, -20 }, { -12.0, -2.0, -7.0, -5 }, { -11.0, -3.5, -7.0, -19 }, { -11.5, -2.5, -7.5, -6 }
  local function reference(kind, beta, ls)
    local sum, chosen, rejected = 0, {}, {}
    for i = 1, 4 do
      local delta = (PC[i] - RC[i]) - (PR[i] - RR[i])
      local loss
      if kind == 'sigmoid' then
        loss = -(1 - ls) * math.log(sigmoid(beta * delta)) - ls * math.log(sigmoid(-beta * delta))
      elseif kind == 'ipo' then
        loss = (delta - 1 / (2 * beta)) ^ 2
      else
        loss = math.max(0, 1 - beta * delta)
      end
      sum = sum + loss
      chosen[i], rejected[i] = beta * (PC[i] - RC[i]), beta * (PR[i] - RR[i])
    end
    return sum / 4, chosen, rejected
  end
  local cases = { { 'sigmoid', 0.1, 0 }, { 'sigmoid', 0.5, 0.2 }, { 'ipo', 0.1, 0 }, { 'ipo', 0.7, 0 }, { 'hinge', 0.1, 0 },
    { 'hinge', 2.0, 0 } }
  it('computes the sigmoid (with label smoothing), IPO and hinge losses and the implicit rewards', function()
    for _, c in ipairs(cases) do
      local loss, chosen, rejected = rl.dpo_loss(f32(PC), f32(PR), f32(RC), f32(RR),
        { loss_type = c[1], beta = c[2], label_smoothing = c[3] })
      local ref_loss, ref_chosen, ref_rejected = reference(c[1], c[2], c[3])
      close(ref_loss, loss:item(), 1e-5, c[1] .. ' loss')
      close(ref_chosen, values(chosen), 1e-5, 'chosen rewards')
      close(ref_rejected, values(rejected), 1e-5, 'rejected rewards')
    end
  end)
  it('is ln 2 when the policy is the reference', function()
    close(math.log(2), rl.dpo_loss(f32(PC), f32(PR), f32(PC), f32(PR)):item(), 1e-6)
  end)
  it('has the gradient of its formula for each loss type', function()
    for _, c in ipairs(cases) do
      gradcheck.gradcheck(function(pc, pr)
        return (rl.dpo_loss(pc, pr, f64(RC), f64(RR), { loss_type = c[1], beta = c[2], label_smoothing = c[3] }))
      end, { f64(PC), f64(PR) })
    end
  end)
end)

describe('pmp.rl.pairwise_loss', function()
  it('is the mean of -log sigmoid(chosen - rejected), stable for large margins', function()
    local C, R = { 0.5, -1.0, 3.0, 60 }, { 0.0, 1.0, -2.0, -60 }
    local sum = 0
    for i = 1, 3 do sum = sum - math.log(sigmoid(C[i] - R[i])) end
    close(sum / 4, rl.pairwise_loss(f32(C), f32(R)):item(), 1e-5)
    gradcheck.gradcheck(function(c, r) return rl.pairwise_loss(c, r) end, { f64(C), f64(R) })
  end)
end)

describe('pmp.rl.AdaptiveKL', function()
  it("moves the coefficient by clip(KL / target - 1, +-0.2) n / horizon (Ziegler et al.)", function()
    local ctl = rl.AdaptiveKL(0.2, 6, 10000)
    close(0.2 * (1 + 0.2 * 256 / 10000), ctl:update(12, 256), 1e-12)
    local v = ctl.value
    close(v * (1 - (1 - 3 / 6) * 0 - 0.5 * 0 + (3 / 6 - 1) * 0 - 0.2 * 100 / 10000), ctl:update(0, 100), 1e-12)
    assert.are.equal(0.05, rl.AdaptiveKL(0.05):update(100, 10))
  end)
end)

describe('pmp.rl.sequence_logprobs and sequence_scores', function()
  local config = { num_layers = 2, hidden_size = 16, ffn_hidden_size = 32, num_attention_heads = 2, vocab_size = 11,
    normalization = 'RMSNorm', activation = 'swiglu', init_std = 0.5 }
  local IDS = { { 1, 4, 2, 9, 3, 0 }, { 5, 5, 7, 1, 10, 2 } }
  local M2 = { { 0, 0, 1, 1, 1, 0 }, { 0, 1, 1, 1, 1, 1 } }
  it('are the log-softmax of the previous position at each masked token, 0 elsewhere', function()
    pmp.manual_seed(3)
    local model = pmp.nn.GPTModel(config)
    local logits = pmp.no_grad(function() return model(pmp.tensor(IDS, { dtype = 'i64' })) end):double():totable()
    for _, temperature in ipairs({ 1, 0.7 }) do
      local expected, entropy = {}, {}
      for b = 1, 2 do
        expected[b], entropy[b] = {}, {}
        for t = 1, 6 do
          expected[b][t], entropy[b][t] = 0, 0
          if M2[b][t] == 1 then
            local row, peak, total, h = logits[b][t - 1], -math.huge, 0, 0
            for _, v in ipairs(row) do peak = math.max(peak, v / temperature) end
            for _, v in ipairs(row) do total = total + math.exp(v / temperature - peak) end
            expected[b][t] = row[IDS[b][t] + 1] / temperature - peak - math.log(total)
            for _, v in ipairs(row) do
              local lp = v / temperature - peak - math.log(total)
              h = h - math.exp(lp) * lp
            end
            entropy[b][t] = h
          end
        end
      end
      local logp, ent = rl.sequence_logprobs(model, IDS, f32(M2), { temperature = temperature, entropy = true })
      close(expected, values(logp), 1e-4, 'log-probs')
      close(entropy, values(ent), 1e-4, 'entropy')
    end
  end)
  it('carry gradients to the model (sum of log-probs vs finite differences of one weight)', function()
    pmp.manual_seed(4)
    local model = pmp.nn.GPTModel(config)
    model:to('f64')
    local mask = f64(M2)
    local w = model.decoder.layers.items[1].mlp.linear_fc2.weight
    rl.sequence_logprobs(model, IDS, mask):sum():backward()
    local analytic = w.grad:reshape(-1):totable()
    local original = w:detach():clone()
    for _, i in ipairs({ 1, 17, 200 }) do
      local function at(delta)
        local changed = original:reshape(-1):totable()
        changed[i] = changed[i] + delta
        pmp.no_grad(function() w:copy_(pmp.tensor(changed, { dtype = 'f64' }):view(w.shape)) end)
        local v = pmp.no_grad(function() return rl.sequence_logprobs(model, IDS, mask):sum():item() end)
        pmp.no_grad(function() w:copy_(original) end)
        return v
      end
      close((at(1e-6) - at(-1e-6)) / 2e-6, analytic[i], 1e-5, 'weight gradient')
    end
  end)
  it('score the last non-pad token, or the given positions', function()
    pmp.manual_seed(5)
    local c = {}
    for k, v in pairs(config) do c[k] = v end
    c.head = 'score'
    local model = pmp.nn.GPTModel(c)
    local all = pmp.no_grad(function() return model(pmp.tensor(IDS, { dtype = 'i64' })) end):double():totable()
    close({ all[1][5], all[2][6] }, values(pmp.no_grad(rl.sequence_scores, model, IDS, 0)), 1e-6, 'pad id')
    close({ all[1][2], all[2][4] }, values(pmp.no_grad(rl.sequence_scores, model, IDS, { 2, 4 })), 1e-6, 'positions')
    expect.fails_with(function() rl.sequence_scores(model, { { 0, 0 } }, 0) end, 'row 1 holds only padding')
  end)
end)

describe('a bf16 frozen reference (pmp.rl.recipe.frozen_copy, --ref-dtype bf16)', function()
  it("gives the f32 model's log-probs to bf16 precision, frozen", function()
    local recipe = require 'pmp.rl.recipe'
    local model = pmp.models.from_pretrained(package.loaded['pmp.root'] .. '/spec/fixtures/hf/llama')
    pmp.manual_seed(3)
    local ids = pmp.randint(0, model.config.vocab_size, { 4, 16 }, { dtype = 'i64' })
    local mask = pmp.ones({ 4, 16 })
    local copy = recipe.frozen_copy(model, 'bf16')
    for _, p in ipairs(copy:parameters()) do
      assert.are.equal('bf16', p.dtype)
      assert.is_false(p.requires_grad)
    end
    local f = pmp.no_grad(rl.sequence_logprobs, model, ids, mask):double()
    local b = pmp.no_grad(rl.sequence_logprobs, copy, ids, mask):double()
    assert.are.equal('f32', pmp.no_grad(rl.sequence_logprobs, copy, ids, mask).dtype)
    -- bf16 keeps 8 significant bits (a relative step of 2^-8): over two layers each log-prob stays within
    -- 8 such steps of the f32 one and the mean error within one; a copy that were still f32 would agree exactly
    local relative = (f - b):abs() / f:abs():clamp(1e-3, nil)
    assert.is_true(relative:max():item() <= 2 ^ -5, 'largest relative error ' .. relative:max():item())
    assert.is_true(relative:mean():item() <= 2 ^ -8, 'mean relative error ' .. relative:mean():item())
    assert.is_true((f - b):abs():max():item() > 0, 'the copy computes in bf16')
    assert.has_error(function() recipe.frozen_copy(model, 'f16') end,
      "pmp.rl.recipe.frozen_copy: dtype must be 'f32' or 'bf16', got 'f16'")
  end)
end)

describe("pmp.rl against TRL's implementations (spec/fixtures/rl, tools/make_rl_fixtures.py)", function()
  local ref = pmp.json.decode(pmp.io.read_file(package.loaded['pmp.root'] .. '/spec/fixtures/rl/trl_reference.json'))
  it("whiten matches TRL's masked_whiten on the masked positions", function()
    close(ref.whiten.expected, values(rl.whiten(f32(ref.whiten.values), f32(ref.whiten.mask))), 1e-5)
  end)
  it("dpo_loss matches TRL's dpo_loss for sigmoid (with label smoothing), IPO and hinge", function()
    for _, c in ipairs(ref.dpo) do
      local loss, chosen, rejected = rl.dpo_loss(f64(c.policy_chosen), f64(c.policy_rejected), f64(c.reference_chosen),
        f64(c.reference_rejected), { beta = c.beta, label_smoothing = c.label_smoothing, loss_type = c.loss_type })
      close(c.loss, loss:item(), 1e-9, c.loss_type .. ' loss')
      close(c.chosen_rewards, values(chosen), 1e-9, 'chosen rewards')
      close(c.rejected_rewards, values(rejected), 1e-9, 'rejected rewards')
    end
  end)
end)

describe('pmp.rl.rollout.sample', function()
  local rollout, streams = require 'pmp.rl.rollout', require 'pmp.rl.streams'
  local serve_engine = require 'pmp.serve.engine'
  local FIXTURES = package.loaded['pmp.root'] .. '/spec/fixtures/hf'

  -- Runs fn while counting the engines pmp.serve.engine.new makes; returns fn's result and the engines.
  local function with_engines(fn)
    local made, new = {}, serve_engine.new
    serve_engine.new = function(...)
      local engine = new(...)
      made[#made + 1] = engine
      return engine
    end
    local ok, result = pcall(fn)
    serve_engine.new = new
    if not ok then error(result, 0) end
    return result, made
  end

  -- GRPO's rows: G = 3 samples of each of two 20-token prompts, each with its own stream key.
  local function grpo_rows()
    local prompts, seeds = {}, {}
    for p = 1, 2 do
      local ids = {}
      for i = 1, 20 do ids[i] = 3 + (i * 7 + p * 31) % 140 end
      for g = 1, 3 do
        prompts[#prompts + 1], seeds[#seeds + 1] = ids, streams.key(11, 'sample', p, g)
      end
    end
    return prompts, seeds
  end

  -- pmp.generate's tokens for the rows, each drawing from pmp.Generator(its seed).
  local function generated(model, prompts, seeds, options)
    local generators = {}
    for k, seed in ipairs(seeds) do generators[k] = pmp.Generator(seed) end
    local o = { generator = generators }
    for key, v in pairs(options) do o[key] = v end
    return pmp.generate(model, prompts, o)
  end

  it("runs GRPO's rows through the engine, reusing each prompt's blocks, with pmp.generate's tokens", function()
    local model = pmp.models.from_pretrained(FIXTURES .. '/qwen3')
    local prompts, seeds = grpo_rows()
    for _, settings in ipairs({ { temperature = 1.2, top_p = 0.95 }, { temperature = 0 }, { temperature = 1, top_k = 4 } }) do
      local options = { max_new_tokens = 6, temperature = settings.temperature, top_p = settings.top_p,
        top_k = settings.top_k }
      local expected = generated(model, prompts, seeds, options)
      options.eos_ids, options.row_seeds = {}, seeds
      local samples, engines = with_engines(function() return rollout.sample(model, prompts, options) end)
      assert.are.equal(1, #engines)
      -- samples 2 and 3 of each prompt find its one full 16-token block
      assert.are.equal(2 * 2 * 16, engines[1].stats.cached_prompt_tokens)
      for k = 1, #prompts do
        assert.are.same(expected[k].tokens, samples[k].response)
        assert.are.equal(expected[k].finish_reason, samples[k].finish_reason)
      end
      if settings.temperature > 0 then
        assert.are_not.same(samples[1].response, samples[2].response, 'two samples of one prompt differ')
      end
    end
    -- an eos id ends a row as pmp.generate ends it
    local options = { max_new_tokens = 6, temperature = 1.2 }
    local free = generated(model, prompts, seeds, options)
    options.eos_ids, options.row_seeds = { free[1].tokens[2] }, seeds
    local expected = generated(model, prompts, seeds, options)
    local samples = rollout.sample(model, prompts, options)
    assert.are.equal('eos', samples[1].finish_reason)
    for k = 1, #prompts do
      assert.are.same(expected[k].tokens, samples[k].response)
      assert.are.equal(expected[k].finish_reason, samples[k].finish_reason)
    end
  end)

  it('falls back to pmp.generate for a model the engine refuses (sliding window)', function()
    local model = pmp.models.from_pretrained(FIXTURES .. '/mistral')
    local prompts, seeds = grpo_rows()
    local options = { max_new_tokens = 4, temperature = 1 }
    local expected = generated(model, prompts, seeds, options)
    options.row_seeds = seeds
    local samples, engines = with_engines(function() return rollout.sample(model, prompts, options) end)
    assert.are.equal(0, #engines)
    for k = 1, #prompts do assert.are.same(expected[k].tokens, samples[k].response) end
  end)
end)
