require 'busted.runner'()
-- pmp.estimate and tools/estimate.lua: parameter counts against the published sizes of public models
-- and against GPTModel's own parameters, FLOPs against the formula written out here, and the memory
-- estimate against the engine's measured peak (pmp.memory.stats) over a training step of small models
-- in several layouts, within 15%.
local estimate = require 'pmp.estimate'
local shell = require 'spec.support.shell'

local function total_parameters(config, layout)
  local sum = 0
  for _, s in ipairs(estimate.memory(config, layout).stages) do sum = sum + s.parameters end
  return sum
end

describe('estimate: parameters', function()
  it('match the published sizes of public models', function()
    -- from the models' cards / safetensors indexes
    local published = { ['llama-7b'] = 6738415616, ['llama3-8b'] = 8030261248, ['qwen2-1.5b'] = 1543714304,
      ['mistral-7b'] = 7241732096, ['qwen2-0.5b'] = 494032768 }
    for name, count in pairs(published) do
      local c = estimate.model_config(name)
      assert.are.equal(count, total_parameters(c, { seq_length = 8 }), name)
    end
  end)

  it('match GPTModel for tied and untied, GQA, biases, QK norms and projected embeddings, and add up over TP and PP', function()
    local configs = {
      { num_layers = 2, hidden_size = 64, num_attention_heads = 4, vocab_size = 100, tie_embeddings = true },
      { num_layers = 3, hidden_size = 96, num_attention_heads = 6, num_query_groups = 2, ffn_hidden_size = 200,
        vocab_size = 77, add_qkv_bias = true, qk_layernorm = true, kv_channels = 24 },
      -- OPT-350m's narrower word embeddings with projections to and from the hidden size
      { num_layers = 2, hidden_size = 64, num_attention_heads = 4, vocab_size = 100, tie_embeddings = true,
        word_embedding_size = 24 },
      -- MoE after a dense layer, shared experts with their gate; multi-latent attention with and without q LoRA
      { num_layers = 2, hidden_size = 32, num_attention_heads = 2, vocab_size = 50, num_moe_experts = 4, moe_router_topk = 2,
        moe_ffn_hidden_size = 24, moe_shared_expert_intermediate_size = 8, moe_shared_expert_gate = true,
        moe_layer_freq = { 0, 1 } },
      { num_layers = 2, hidden_size = 32, num_attention_heads = 2, vocab_size = 50, multi_latent_attention = true,
        q_lora_rank = 12, kv_lora_rank = 10, qk_head_dim = 8, qk_pos_emb_head_dim = 4, v_head_dim = 6 },
      { num_layers = 1, hidden_size = 32, num_attention_heads = 2, vocab_size = 50, multi_latent_attention = true,
        kv_lora_rank = 10, qk_head_dim = 8, qk_pos_emb_head_dim = 4, v_head_dim = 6 },
    }
    for k, settings in ipairs(configs) do
      local model = pmp.nn.GPTModel(settings)
      local count = 0
      for _, p in ipairs(model:parameters()) do count = count + p:numel() end
      local c = estimate.model_config(settings)
      assert.are.equal(count, total_parameters(c, { seq_length = 8 }), 'config ' .. k)
    end
    -- TP 2 halves the projections and the (padded) vocabulary rows; PP 2 with tied embeddings gives the
    -- last stage its own copy of the embedding, as Megatron does
    local c = estimate.model_config({ num_layers = 4, hidden_size = 64, num_attention_heads = 4, vocab_size = 128,
      tie_embeddings = true }, { tp = 2 })
    local H, F, V = 64, c.ffn_hidden_size, 128
    local layer_per_rank = (H * 3 * H + H * H + 3 * H * F) / 2 + 2 * H
    local stages = estimate.memory(c, { tp = 2, pp = 2, seq_length = 8 }).stages
    assert.are.equal(2 * layer_per_rank + V * H / 2, stages[1].parameters)
    assert.are.equal(2 * layer_per_rank + V * H / 2 + H, stages[2].parameters)
  end)

  -- H 16, 2 heads of 8, dense FFN 32, 4 experts of 24 with top-2, shared experts of 8 with a gate, the
  -- second layer MoE, vocabulary 64, untied
  local MOE = { num_layers = 2, hidden_size = 16, num_attention_heads = 2, ffn_hidden_size = 32, vocab_size = 64,
    make_vocab_size_divisible_by = 16, tie_embeddings = false, num_moe_experts = 4, moe_router_topk = 2,
    moe_ffn_hidden_size = 24, moe_grouped_gemm = true, moe_shared_expert_intermediate_size = 8,
    moe_shared_expert_gate = true, moe_layer_freq = { 0, 1 } }
  -- per rank at tensor-parallel size tp: attention and the dense MLP split, the MoE layer whole (router,
  -- shared experts and gate, and 4 / ep experts), the norms whole, the vocabulary rows split
  local function moe_holds(tp, ep)
    local H = 16
    local attention = (H * 3 * H + H * H) / tp
    local dense = 2 * attention + 2 * 2 * H + 3 * H * 32 / tp + 4 * H + (3 * H * 8 + H) + 2 * 64 * H / tp + H
    return dense, 4 / ep * 3 * H * 24
  end

  it('count a MoE layer whole on each tensor-parallel rank and shard expert optimizer state over dp x cp / ep', function()
    for _, case in ipairs({ { tp = 2, dp = 2, ep = 2 }, { tp = 1, dp = 4, ep = 2 }, { tp = 2, dp = 4, cp = 2, ep = 4 } }) do
      local dense, experts = moe_holds(case.tp, case.ep)
      local edp = case.dp * (case.cp or 1) / case.ep
      local layout = { tp = case.tp, dp = case.dp, cp = case.cp, ep = case.ep, seq_length = 8, micro_batch = 1,
        distributed_optimizer = true }
      local stage = estimate.memory(estimate.model_config(MOE, { tp = case.tp }), layout).stages[1]
      local name = pmp.json.encode(case)
      assert.are.equal(dense + experts, stage.parameters, name)
      assert.are.equal(experts, stage.expert_parameters, name)
      assert.are.equal(dense / (case.dp * (case.cp or 1)) + experts / edp, stage.optimizer_parameters, name)
    end
    local ok, err = pcall(estimate.memory, estimate.model_config(MOE), { dp = 3, ep = 2, seq_length = 8 })
    assert.is_false(ok)
    assert.matches('expert%-parallel size 2 does not divide data%- x context%-parallel size 3', err)
  end)

  it('match what each rank of a TP=2 x EP=2 and an EP=2 x DP=4 run holds (parameters, optimizer shards)', function()
    local mpi = require 'spec.support.mpi'
    if not mpi.available then pending('mpirun is not installed') return end
    local out, err, status = mpi.run(4, shell.root .. '/spec/dist/estimate_moe_worker.lua')
    assert.are.equal(0, status, err)
    local rows = mpi.rows(out, 'HOLDS')
    assert.are.equal(8, #rows, out)
    local layouts = { tp2ep2 = { tp = 2, dp = 2, ep = 2 }, ep2dp4 = { tp = 1, dp = 4, ep = 2 } }
    for _, r in ipairs(rows) do
      local layout = layouts[r[1]]
      local stage = estimate.memory(estimate.model_config(MOE, { tp = layout.tp }), { tp = layout.tp, dp = layout.dp,
        ep = layout.ep, seq_length = 8, distributed_optimizer = true }).stages[1]
      local where = r[1] .. ' rank ' .. r[2]
      assert.are.equal(stage.parameters, tonumber(r[3]), where)
      assert.are.equal(stage.expert_parameters, tonumber(r[4]), where)
      assert.are.equal(stage.optimizer_parameters, tonumber(r[5]), where)
    end
  end)

  it('reject an unknown model by listing the known ones', function()
    assert.has_error(function() estimate.model_config('llama-3b') end)
    local ok, err = pcall(estimate.model_config, 'llama-3b')
    assert.is_false(ok)
    assert.matches("unknown model 'llama%-3b' %(known: .*llama%-7b", err)
  end)
end)

describe('estimate: FLOPs', function()
  it('are 6 x (matmul weights + output layer) + attention per token, plus a forward with recompute', function()
    local c = estimate.model_config({ num_layers = 3, hidden_size = 64, num_attention_heads = 4, num_query_groups = 2,
      ffn_hidden_size = 160, vocab_size = 50 })
    local s, H, L = 32, 64, 3
    local qkv = H * (H + 2 * 32)                                 -- 2 KV groups of 16
    local weights = L * (qkv + H * H + 3 * H * 160) + 50 * H
    local per_token = 6 * weights + 12 * L * s * H
    local f = estimate.flops(c, { seq_length = s, micro_batch = 2, global_batch = 8, dp = 2 })
    assert.are.equal(per_token, f.per_token)
    assert.are.equal(per_token * 8 * s, f.model)
    local r = estimate.flops(c, { seq_length = s, micro_batch = 2, global_batch = 8, dp = 2, recompute = 'full' })
    assert.are.equal(f.model + 8 * s * L * (2 * (qkv + H * H + 3 * H * 160) + 4 * s * H), r.hardware)
    assert.are.equal(r.hardware / 2, r.per_rank)
  end)

  it('count a MoE layer as its router, top-k experts and shared experts', function()
    local c = estimate.model_config({ num_layers = 2, hidden_size = 64, num_attention_heads = 4, ffn_hidden_size = 160,
      vocab_size = 50, num_moe_experts = 8, moe_router_topk = 2, moe_ffn_hidden_size = 48,
      moe_shared_expert_intermediate_size = 32, moe_layer_freq = { 0, 1 } })
    local s, H = 32, 64
    local attention = H * 3 * H + H * H
    local weights = 2 * attention + 3 * H * 160 + (8 * H + 3 * H * (2 * 48 + 32)) + 50 * H
    assert.are.equal(6 * weights + 12 * 2 * s * H, estimate.flops(c, { seq_length = s }).per_token)
  end)
end)

describe('estimate: memory', function()
  -- One training step as recipes/pretrain.lua runs it on one process: the model, its optimizer (and
  -- data-parallel buckets for the distributed optimizer), then the micro batches' forward and backward
  -- and the update. Returns the engine's peak over the step above what was in use before the model.
  local function measure(settings, layout)
    local m = layout.global_batch / layout.micro_batch
    local batches = {}
    for k = 1, m do batches[k] = pmp.randint(0, settings.vocab_size, { layout.micro_batch, layout.seq_length }) end
    -- a fresh collector window of 256 MiB, as a run starts with, so no collection falls inside the step
    pmp.memory.set_gc_step(0)
    pmp.memory.set_gc_step(256 * 2^20)
    collectgarbage()
    collectgarbage()
    local base = pmp.memory.stats().in_use
    local config = {}
    for k, v in pairs(settings) do config[k] = v end
    config.recompute_granularity = layout.recompute
    pmp.manual_seed(1)
    local model = pmp.nn.GPTModel(config)
    if layout.dtype == 'bf16' then model:to('bf16') end
    local ddp, optimizer
    if layout.distributed_optimizer then
      pmp.dist.init({})
      ddp = pmp.dist.ddp.DistributedDataParallel(model, { distributed_optimizer = true })
      optimizer = pmp.optim.DistributedOptimizer(pmp.optim.decay_groups(model), { lr = 1e-3, ddp = ddp })
    else
      optimizer = pmp.optim.AdamW(pmp.optim.decay_groups(model), { lr = 1e-3 })
    end
    pmp.memory.set_gc_step(0)                  -- the construction's temporaries go, and a new window starts
    pmp.memory.set_gc_step(256 * 2^20)
    pmp.zeros(1)
    pmp.memory.reset_peak()
    optimizer:zero_grad()
    if ddp then ddp:zero_grad() end
    for k = 1, m do
      if ddp then ddp:set_sync(k == m) end
      local loss = model(batches[k], batches[k])
      ;(m == 1 and loss or loss / m):backward()
    end
    if ddp then ddp:finish_grad_sync() end
    optimizer:step()
    return pmp.memory.stats().peak - base
  end

  local gqa = { num_layers = 2, hidden_size = 192, num_attention_heads = 6, num_query_groups = 2, ffn_hidden_size = 384,
    vocab_size = 700, tie_embeddings = false }
  local tied = { num_layers = 3, hidden_size = 96, num_attention_heads = 4, ffn_hidden_size = 256, vocab_size = 300,
    tie_embeddings = true }
  -- activations are most of the step's memory here, so a wrong activation term shows
  local cases = {
    { gqa, { micro_batch = 4, global_batch = 4, seq_length = 256, dtype = 'f32' } },
    { gqa, { micro_batch = 2, global_batch = 6, seq_length = 128, dtype = 'bf16' } },
    { tied, { micro_batch = 8, global_batch = 8, seq_length = 96, dtype = 'f32', recompute = 'full' } },
    { tied, { micro_batch = 4, global_batch = 8, seq_length = 64, dtype = 'bf16', distributed_optimizer = true } },
    { tied, { micro_batch = 32, global_batch = 32, seq_length = 8, dtype = 'f32' } },
  }
  for _, case in ipairs(cases) do
    local settings, layout = case[1], case[2]
    it('is within 15% of the measured peak: ' .. pmp.json.encode(layout), function()
      local measured = measure(settings, layout)
      local estimated = estimate.memory(estimate.model_config(settings), layout).peak
      local ratio = estimated / measured
      if os.getenv('SHOW') then print(ratio) end
      assert.is_true(ratio > 0.85 and ratio < 1.15, string.format('estimated %d bytes, measured %d (ratio %.3f)',
        estimated, measured, ratio))
    end)
  end
end)

describe('estimate: memory under mpirun', function()
  local mpi = require 'spec.support.mpi'
  it('is within 15% of each rank\'s measured peak with TP 2 (sequence parallel) x PP 2', function()
    if not mpi.available then pending('mpirun is not installed') return end
    local out, err, status = mpi.run(4, shell.root .. '/spec/dist/estimate_worker.lua', { '2', '2', '2', '4', '64', '4', 'sp' })
    assert.are.equal(0, status, err)
    local c = estimate.model_config({ num_layers = 4, hidden_size = 128, num_attention_heads = 4, ffn_hidden_size = 256,
      vocab_size = 500, tie_embeddings = true }, { tp = 2 })
    local stages = estimate.memory(c, { tp = 2, pp = 2, micro_batch = 2, global_batch = 8, seq_length = 64,
      sequence_parallel = true }).stages
    local rows = mpi.lines(out, 'PEAK')
    assert.are.equal(4, #rows)
    for _, row in ipairs(rows) do
      local stage, _, measured = unpack(mpi.words(row))
      local ratio = stages[tonumber(stage) + 1].peak / tonumber(measured)
      assert.is_true(ratio > 0.85 and ratio < 1.15, string.format('stage %s: estimated %d bytes, measured %s (ratio %.3f)',
        stage, stages[tonumber(stage) + 1].peak, measured, ratio))
    end
  end)
end)

describe('tools/estimate.lua', function()
  local function run(args)
    local words = { shell.quote(shell.pmp), shell.quote(shell.root .. '/tools/estimate.lua') }
    for _, a in ipairs(args) do words[#words + 1] = shell.quote(a) end
    return shell.run(table.concat(words, ' '))
  end

  it('prints a row per pipeline stage and the FLOPs for a named model', function()
    local out, err, status = run({ '--model', 'llama-7b', '--pipeline-model-parallel-size', '2', '--micro-batch-size', '1',
      '--global-batch-size', '8', '--seq-length', '4096', '--bf16', '--peak-tflops', '989' })
    assert.are.equal(0, status, err)
    assert.matches('model: 32 layers, hidden 4096, ffn 11008', out)
    assert.matches('\n0 +16 +3%.37B ', out)       -- 16 layers and the embedding: (6738415616 - 131076096) / 2 + 131072000
    assert.matches('\n1 +16 +3%.37B ', out)
    assert.matches('FLOPs: [%d.]+B per token', out)
    assert.matches('step time: [%d.]+ s at 100%%', out)
  end)

  it('prints a table over a grid with progress lines', function()
    local out, err, status = run({ '--num-layers', '4', '--hidden-size', '64', '--num-attention-heads', '4',
      '--grid', 'tp=1,2', 'recompute=none,full', '--seq-length', '128' })
    assert.are.equal(0, status, err)
    local rows = 0
    for _ in out:gmatch('\n +[12] +1 +1 +1 +1 +%a+ +[%d.]+ [MG]iB +[%d.]+ [MG]iB') do rows = rows + 1 end
    assert.are.equal(4, rows)
    assert.matches('estimate: 4/4 layouts %(100%.0%%%)', err)
  end)

  it('names a bad grid entry', function()
    local _, err, status = run({ '--model', 'llama-7b', '--grid', 'zz=1,2' })
    assert.are_not.equal(0, status)
    assert.matches("%-%-grid: expected KEY=V1,V2,... with KEY one of tp, pp, dp, cp, micro, recompute; got 'zz=1,2'", err)
  end)
end)
