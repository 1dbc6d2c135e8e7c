require 'busted.runner'()
-- Tensor and sequence parallelism (lua/pmp/nn/parallel.lua): spec/dist/tp_worker.lua runs on a tp group
-- of 2 (mpirun) and of 1 (no launcher) and compares, in the same process, against references computed
-- without tensor parallelism: F.cross_entropy on whole logits, plain Linear layers, and a plain GPTModel
-- (dense, with a MoE layer, with multi-latent attention) trained three AdamW steps on the same global batch.
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'

local worker = shell.root .. '/spec/dist/tp_worker.lua'
local CASES = { 'tied', 'tied_sp', 'untied', 'untied_sp', 'extras', 'extras_sp', 'moe', 'moe_sp', 'moe_seq_sp', 'mla', 'mla_sp',
  'mla_q_proj_sp' }

local words = mpi.words

local rows = mpi.rows

-- One worker run per group size, shared by the tests below.
local outputs = {}
local function output(np)
  if not outputs[np] then
    local out, err, status
    if np == 1 then
      out, err, status = shell.run(shell.quote(shell.pmp) .. ' ' .. shell.quote(worker))
    else
      out, err, status = mpi.run(np, worker)
    end
    assert.are.equal(0, status, err .. out)
    outputs[np] = out
  end
  return outputs[np]
end

-- tol: relative to the reference loss.
local function check_losses(out, tol)
  local seen = 0
  for _, r in ipairs(rows(out, 'LOSS')) do
    local expected, diff = tonumber(r[4]), tonumber(r[5])
    assert.is_true(diff <= tol * math.abs(expected), string.format(
      '%s step %s: loss %s vs one process %s (a rank differs by %s)', r[1], r[2], r[3], r[4], r[5]))
    seen = seen + 1
  end
  assert.are.equal(#CASES * 3, seen, 'one LOSS line per case and step')
end

-- Gradients after the first backward (tolerance relative to the largest) and parameters after three
-- steps: every name of the reference's state dict is in the parallel model's with this rank's shard
-- of the reference's values, and there is no other name.
local function check_shards(out, grad_tol, param_tol, logits_tol)
  local params, grads = rows(out, 'PARAM'), rows(out, 'GRAD')
  local names = rows(out, 'NAMES')
  assert.are.equal(#CASES, #names, 'one NAMES line per case')
  for _, r in ipairs(names) do
    assert.is_true(tonumber(r[2]) > 0, r[1] .. ': the reference has no parameters')
    assert.are.equal(tonumber(r[2]), #rows(out, 'PARAM', r[1]), r[1] .. ': one PARAM line per reference parameter')
  end
  for _, r in ipairs(params) do
    assert.are_not.equal('missing', r[3], string.format('%s: %s missing or mis-shaped on some rank', r[1], r[2]))
    assert.is_true(tonumber(r[3]) <= param_tol, string.format('%s: %s differs from the reference shard by %s',
      r[1], r[2], r[3]))
  end
  assert.are.equal(#params, #grads)
  for _, r in ipairs(grads) do
    local diff, scale = tonumber(r[3]), tonumber(r[4])
    assert.is_true(diff <= grad_tol * scale, string.format('%s: gradient of %s differs by %s (largest %s)',
      r[1], r[2], r[3], r[4]))
  end
  local keys = rows(out, 'KEYS')
  assert.are.equal(#CASES, #keys)
  for _, r in ipairs(keys) do assert.are.equal('0', r[2], r[1] .. ': state_dict names the reference does not have') end
  local logits = rows(out, 'LOGITS')
  assert.are.equal(#CASES, #logits)
  for _, r in ipairs(logits) do
    assert.is_true(tonumber(r[2]) <= logits_tol, string.format('%s: logits differ by %s', r[1], r[2]))
  end
end

local function check_cross_entropy(out)
  local ce = rows(out, 'CE')
  assert.are.equal(3, #ce)   -- mean, sum, none
  for _, r in ipairs(ce) do
    assert.is_true(tonumber(r[2]) <= 1e-5, string.format('%s: loss differs by %s', r[1], r[2]))
    assert.is_true(tonumber(r[3]) <= 1e-6, string.format('%s: gradient differs by %s', r[1], r[3]))
  end
end

describe('pmp.nn.parallel', function()
  it('vocab_parallel_cross_entropy matches F.cross_entropy on the whole logits (TP=2, padded vocabulary)', function()
    check_cross_entropy(output(2))
  end)

  it('column then row parallel layers match two Linear layers (gathered, split, sequence parallel)', function()
    local layer_rows = rows(output(2), 'LAYERS')
    assert.are.equal(3, #layer_rows)
    for _, r in ipairs(layer_rows) do
      assert.is_true(tonumber(r[2]) <= 1e-5, string.format('%s: differs by %s', r[1], r[2]))
    end
  end)

  -- MoE layers stay whole on each rank; under SP each rank routes its slice of the sequence (the
  -- balancing losses with the whole sequences' counts, the z-loss divided by the group size)
  -- Multi-latent attention splits its heads: up-projections column-parallel, down-projections whole
  it('TP=2 trains a GPTModel like one process: tied, untied, biases and qk_layernorm, MoE, MLA, with and without SP', function()
    local out = output(2)
    check_losses(out, 1e-5)
    -- Parameters: a shard the optimizer misses or updates twice is off by about lr (1e-2) per step;
    -- Adam's division by |gradient| turns f32 summation-order differences into up to ~2e-5 on
    -- elements whose gradient is near eps, and that depends on the CPU's GEMM kernels. 1e-4 is 1% of
    -- one step: far above the rounding, far below any real error.
    check_shards(out, 1e-5, 1e-4, 5e-5)
  end)

  it('rejects sizes that TP=2 cannot split, naming them', function()
    local errors = {}
    for _, r in ipairs(rows(output(2), 'ERROR')) do errors[r[1]] = table.concat(r, ' ', 2) end
    local expected = {
      heads = 'num_attention_heads (3) is not divisible',
      groups = 'num_query_groups (1) is not divisible',
      ffn = 'ffn_hidden_size (45) is not divisible',
      vocab = 'padded_vocab_size (61) is not divisible',
      sequence = 'sequence length (15) divisible by the size 2',
    }
    for case, fragment in pairs(expected) do
      assert.is_truthy(errors[case], case .. ': no ERROR line')
      assert.is_truthy(errors[case]:find(fragment, 1, true), string.format('%s: %q does not mention %q', case, errors[case], fragment))
    end
  end)

  it('on a group of one (no mpirun) leaves the model untouched and computes the same', function()
    local out = output(1)
    local same = rows(out, 'SAME')
    assert.are.equal(#CASES, #same)
    for _, r in ipairs(same) do assert.are.equal('true', r[2], r[1] .. ': the model changed') end
    check_losses(out, 0)
    check_shards(out, 0, 0, 0)
    check_cross_entropy(out)
  end)
end)

describe('multi-latent attention under tensor parallelism', function()
  local test = mpi.available and it or pending
  local dir
  setup(function() dir = shell.temp_dir() end)
  teardown(function() shell.remove_dir(dir) end)

  -- DeepSeek-style layers: MLA with a low-rank query, MoE MLPs with the balancing loss
  local FLAGS = { '--num-layers', '2', '--hidden-size', '32', '--num-attention-heads', '4', '--seq-length', '16',
    '--micro-batch-size', '2', '--global-batch-size', '8', '--train-iters', '6', '--log-interval', '1',
    '--eval-interval', '0', '--sample-length', '0', '--lr-warmup-iters', '1', '--lr', '3e-3', '--save', '',
    '--multi-latent-attention', '--q-lora-rank', '12', '--kv-lora-rank', '16', '--qk-head-dim', '8',
    '--qk-pos-emb-head-dim', '4', '--v-head-dim', '8', '--num-experts', '4', '--moe-router-topk', '2',
    '--moe-ffn-hidden-size', '32', '--moe-aux-loss-coeff', '0.01', '--moe-grouped-gemm' }

  local function run(np, extra)
    -- the vocabulary padded to 128 rows in both layouts: 128 x 1 in one process, 64 x tp 2
    local args = { unpack(FLAGS) }
    for _, a in ipairs({ '--make-vocab-size-divisible-by', np == 1 and '128' or '64', unpack(extra) }) do args[#args + 1] = a end
    local out, err, status
    if np == 1 then
      out, err, status = shell.run_pmp({ shell.root .. '/recipes/pretrain.lua', unpack(args) })
    else
      out, err, status = mpi.run(np, shell.root .. '/recipes/pretrain.lua', args)
    end
    assert.are.equal(0, status, err)
    return require('spec.support.train_log').losses(out)
  end

  local function assert_close(got, want, first, last, label)
    for it = first, last do
      assert.is_number(got[it], label .. ': iteration ' .. it)
      assert.is_true(math.abs(got[it] - want[it]) <= 1e-5 * math.abs(want[it]),
        string.format('%s: loss %d is %.7g, one process gave %.7g', label, it, got[it], want[it]))
    end
  end

  test('TP=2 x SP x PP=2 logs the single-process losses; its checkpoint resumes in one process', function()
    local want = run(1, {})
    local parallel = { '--tensor-model-parallel-size', '2', '--sequence-parallel', '--pipeline-model-parallel-size', '2' }
    local saved = { unpack(parallel) }
    for _, a in ipairs({ '--save', dir .. '/tp2', '--exit-interval', '3' }) do saved[#saved + 1] = a end
    assert_close(run(4, saved), want, 1, 3, 'TP=2 x SP x PP=2')
    assert_close(run(1, { '--load', dir .. '/tp2' }), want, 4, 6, 'its checkpoint resumed in one process')
  end)
end)
