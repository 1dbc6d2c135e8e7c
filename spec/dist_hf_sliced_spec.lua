require 'busted.runner'()
-- Hugging Face directories loaded straight into a rank's part under tensor and pipeline parallelism
-- (pmp.models.from_pretrained with split): each rank's weights are bit for bit its part of the
-- one-process load, the logits and loss after the load are the one process's, and each rank reads
-- from the files only what it keeps (pmp.models.loading.bytes_read), about its share of the model.
-- spec/dist/hf_sliced_worker.lua loads each directory both ways on every rank.
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'
local expect = require 'spec.support.expect'

local worker = shell.root .. '/spec/dist/hf_sliced_worker.lua'
local F = shell.root .. '/spec/fixtures/'
-- GQA with [gate; up] (llama), biases with tied embeddings (llama3_bias_tied), q/k norms (qwen3), one
-- fused [q; k; v] tensor (zoo_rotary qwen, chatglm), a gelu MLP with biases (starcoder2); the
-- vocabulary of 150 is padded to 256 rows, so a second tensor-parallel rank holds mostly padding
local TP_DIRS = { F .. 'hf/llama', F .. 'hf/llama3_bias_tied', F .. 'hf/qwen3', F .. 'zoo_rotary/qwen',
  F .. 'zoo_rotary/chatglm', F .. 'zoo_ln/starcoder2' }

-- share: the most of the whole model's bytes one rank may read (reading whole tensors and cutting
-- them reads all of it; the tiny models' padded vocabulary puts rank 0's share of 2 above one half)
local function check(np, tp, pp, dirs, share)
  local args = { tostring(tp), tostring(pp) }
  for _, d in ipairs(dirs) do args[#args + 1] = d end
  local out, err, status = mpi.run(np, worker, args)
  assert.are.equal(0, status, err .. out)
  assert.are.same({}, mpi.lines(out, 'DIFFER'), 'parameters that are not the whole model\'s part')
  local reads = mpi.rows(out, 'READ')
  assert.are.equal(np * #dirs, #reads, out)
  for _, r in ipairs(reads) do
    local part, whole, held = tonumber(r[3]), tonumber(r[4]), tonumber(r[5])
    assert.is_true(part <= held, string.format('%s rank %s read %d bytes but holds %d', r[1], r[2], part, held))
    assert.is_true(part <= share * whole, string.format('%s rank %s read %d of the whole model\'s %d bytes', r[1], r[2],
      part, whole))
  end
  local losses = mpi.rows(out, 'LOSS')
  assert.are.equal(#dirs, #losses, out)
  for _, r in ipairs(losses) do
    local got, want = tonumber(r[2]), tonumber(r[3])
    assert.is_true(math.abs(got - want) <= 1e-6 * math.abs(want), string.format('%s: loss %s, one process %s', r[1], r[2], r[3]))
  end
  for _, r in ipairs(mpi.rows(out, 'LOGITS')) do
    assert.is_true(tonumber(r[3]) <= 1e-5 * tonumber(r[4]), string.format('%s rank %s: logits off by %s', r[1], r[2], r[3]))
  end
  return out
end

local run = mpi.available and it or pending
describe('from_pretrained with split under mpirun', function()
  run('TP=2: each rank reads its rows and columns; weights, logits and loss are the one process\'s', function()
    local out = check(2, 2, 1, TP_DIRS, 0.7)
    assert.are.equal(2 * #TP_DIRS, #mpi.rows(out, 'LOGITS'), out)
  end)

  run('PP=2 from sharded files: each stage reads its layers (the last also the tied embeddings)', function()
    local dir = shell.temp_dir()
    -- several small files, so a stage finds files holding none of its tensors
    pmp.models.from_pretrained(F .. 'hf/llama'):save_pretrained(dir .. '/llama', { max_shard_size = '20KB' })
    assert.is_true(#require('pmp.models.loading').catalog(dir .. '/llama').files > 3)
    check(2, 1, 2, { dir .. '/llama', F .. 'hf/llama3_bias_tied', F .. 'zoo_ln/starcoder2' }, 0.7)
    shell.remove_dir(dir)
  end)

  run('TP=2 x PP=2: each of 4 ranks reads about a quarter', function()
    check(4, 2, 2, { F .. 'hf/llama', F .. 'hf/qwen2_tied' }, 0.45)
  end)
end)

describe('from_pretrained with split', function()
  it('refuses mmap by name (each rank copies its part)', function()
    expect.fails_with(function()
      pmp.models.from_pretrained(F .. 'hf/llama', { mmap = true, split = function(m) return m end })
    end, 'mmap = true is not supported with split')
  end)

  it('refuses a split that gives a parameter a shape other than its part of the whole', function()
    expect.fails_with(function()
      pmp.models.from_pretrained(F .. 'hf/llama', { split = function(m)
        m.decoder.layers.items[1].mlp.linear_fc2.weight = pmp.empty({ 32, 7 }):requires_grad_()
        return m
      end })
    end, 'decoder.layers.0.mlp.linear_fc2.weight', '[32,7]', '[32,40]')
  end)
end)
