require 'busted.runner'()
-- Generation with a tensor-parallel model (GPTModel:decode, pmp.generate): spec/dist/generate_tp_worker.lua
-- runs on a tp group of 2 (mpirun) and of 1 (no launcher) and compares against the whole model in the
-- same process: decode's logits through the KV cache within 1e-5, and greedy and seeded sampled
-- generation giving the same tokens on every rank (GQA, tied with LayerNorm and biases, multi-latent
-- attention, a MoE layer).
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'

local worker = shell.root .. '/spec/dist/generate_tp_worker.lua'
local CASES = { 'gqa', 'tied_extras', 'mla', 'moe' }
local MODES = { 'greedy', 'sampled' }

local function output(np)
  local out, err, status
  if np == 1 then
    out, err, status = shell.run(shell.quote(shell.pmp) .. ' ' .. shell.quote(worker))
  else
    out, err, status = mpi.run(np, worker)
  end
  assert.are.equal(0, status, err .. out)
  return out
end

local function check(out)
  local by_case = {}
  for _, r in ipairs(mpi.rows(out, 'LOGITS')) do by_case[r[1]] = tonumber(r[2]) end
  for _, case in ipairs(CASES) do
    assert.is_number(by_case[case], case .. ': a LOGITS line')
    assert.is_true(by_case[case] <= 1e-5, case .. ': decode logits differ by ' .. tostring(by_case[case]))
    for _, mode in ipairs(MODES) do
      local tokens = mpi.rows(out, 'TOKENS', case)
      local logprobs = mpi.rows(out, 'LOGPROBS', case)
      local counts = mpi.rows(out, 'COUNT', case)
      local function of(rows)
        for _, r in ipairs(rows) do if r[1] == mode then return tonumber(r[2]) end end
      end
      assert.are.equal(0, of(tokens), case .. ' ' .. mode .. ': tokens differ from the whole model')
      assert.is_true(of(logprobs) <= 1e-5, case .. ' ' .. mode .. ': log-probs differ by ' .. tostring(of(logprobs)))
      assert.are.equal(24, of(counts), case .. ' ' .. mode .. ': 8 tokens for each of 3 prompts')
    end
  end
end

describe('generation with a tensor-parallel model', function()
  it('on one process matches the whole model', function()
    check(output(1))
  end)

  it('on a tensor-parallel group of 2 gives the whole model\'s logits and tokens on every rank', function()
    local out = output(2)
    check(out)
    assert.matches('ERROR sequence_parallel [^\n]*GPTModel:decode: a sequence%-parallel model cannot decode', out)
  end)
end)
