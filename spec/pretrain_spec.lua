require 'busted.runner'()
-- The pretraining recipe end to end (small models, a few steps): Megatron-format logs, checkpoints
-- in Megatron's layout, bit-exact resume, and a save killed midway leaving the last checkpoint usable.
local shell = require 'spec.support.shell'

local TINY = { '--num-layers', '2', '--hidden-size', '32', '--num-attention-heads', '4', '--num-query-groups', '2',
  '--seq-length', '16', '--micro-batch-size', '4', '--global-batch-size', '8', '--log-interval', '1',
  '--eval-interval', '3', '--eval-iters', '2', '--sample-length', '0', '--lr-warmup-iters', '2',
  '--hidden-dropout', '0.1' }

local function run_pretrain(extra)
  local args = { 'recipes/pretrain.lua' }
  for _, a in ipairs(TINY) do args[#args + 1] = a end
  for _, a in ipairs(extra) do args[#args + 1] = a end
  local words = { 'cd', shell.quote(shell.root), '&&', shell.quote(shell.pmp) }
  for _, a in ipairs(args) do words[#words + 1] = shell.quote(a) end
  return shell.run(table.concat(words, ' '))
end

local losses = require('spec.support.train_log').losses

local function checkpoint_tensors(dir, iteration)
  local rank = string.format('%s/iter_%07d/mp_rank_00', dir, iteration)
  return pmp.safetensors.load(rank .. '/model_optim_rng.safetensors', { copy = true })
end

describe('recipes/pretrain.lua', function()
  local scratch
  before_each(function() scratch = shell.temp_dir() end)
  after_each(function() shell.remove_dir(scratch) end)

  it('trains, logs in Megatron format and writes a Megatron-layout checkpoint', function()
    local out, err, status = run_pretrain({ '--train-iters', '12', '--save', scratch .. '/ck', '--save-interval', '6',
      '--tensorboard-dir', scratch .. '/tb' })
    assert.are.equal(0, status, err)
    local l = losses(out)
    assert.is_not_nil(l[1])
    assert.is_not_nil(l[12])
    assert.is_true(l[12] < l[1], 'loss did not fall')
    assert.matches(' iteration +12/ +12 | consumed samples: +96 | elapsed time per iteration %(ms%): [%d.]+ | learning rate: [%d.]+E[-+]%d+ | global batch size: +8 | lm loss: [%d.]+E[-+]%d+ | loss scale: 1.0 | grad norm: [%d.]+ | number of skipped iterations: +0 | number of nan iterations: +0 | tokens per second: %d+ | MFU: [%d.]+%% |', out)
    assert.matches('validation loss at iteration 12 | lm loss value: [%d.]+E[-+]%d+ | lm loss PPL: [%d.]+E[-+]%d+ |', out)
    assert.are.equal('12\n', pmp.io.read_file(scratch .. '/ck/latest_checkpointed_iteration.txt'))
    assert.is_true(pmp.io.is_file(scratch .. '/ck/iter_0000006/mp_rank_00/model_optim_rng.safetensors'))
    assert.is_true(pmp.io.is_file(scratch .. '/ck/iter_0000012/mp_rank_00/model_optim_rng.json'))
    local tensors = checkpoint_tensors(scratch .. '/ck', 12)
    assert.is_not_nil(tensors['model.decoder.layers.1.self_attention.linear_qkv.weight'])
    assert.is_not_nil(tensors['optimizer.decoder.layers.1.self_attention.linear_qkv.weight.exp_avg'])
    assert.is_true(pmp.io.is_file(scratch .. '/ck/iter_0000012/layout.json'))
    local events = pmp.io.listdir(scratch .. '/tb')
    assert.are.equal(1, #events)
    assert.matches('^events%.out%.tfevents%.', events[1])
    -- the checkpoint generates text, one prompt and a jsonl batch
    local gen, gen_err, gen_status = shell.run_pmp({ shell.root .. '/recipes/generate.lua', '--load', scratch .. '/ck',
      '--prompt', 'the ', '--max-new-tokens', '12' })
    assert.are.equal(0, gen_status, gen_err)
    assert.matches('^the ', gen)
    assert.matches('12 tokens in', gen_err)
    shell.write_file(scratch .. '/prompts.jsonl', '{"prompt": "a "}\n{"prompt": "one quiet"}\n')
    local _, err3, status3 = shell.run_pmp({ shell.root .. '/recipes/generate.lua', '--load', scratch .. '/ck',
      '--input-file', scratch .. '/prompts.jsonl', '--output-file', scratch .. '/out.jsonl', '--ordered', '--max-new-tokens', '5',
      '--temperature', '0.7' })
    assert.are.equal(0, status3, err3)
    local lines = {}
    for line in pmp.io.read_file(scratch .. '/out.jsonl'):gmatch('[^\n]+') do lines[#lines + 1] = pmp.json.decode(line) end
    assert.are.equal(2, #lines)
    assert.are.equal('one quiet', lines[2].prompt)
    assert.are.equal(5, #lines[2].tokens)
  end)

  it('resumes bit-exactly: the same weights, optimizer state and losses as an uninterrupted run', function()
    local full_out, err, status = run_pretrain({ '--train-iters', '6', '--save', scratch .. '/full', '--save-interval', '3' })
    assert.are.equal(0, status, err)
    -- a second run that stops at 3 and then resumes from its own checkpoint
    local _, err1, status1 = run_pretrain({ '--train-iters', '3', '--save', scratch .. '/part', '--save-interval', '3',
      '--lr-decay-iters', '6' })
    assert.are.equal(0, status1, err1)
    local resumed_out, err2, status2 = run_pretrain({ '--train-iters', '6', '--save', scratch .. '/part',
      '--save-interval', '3', '--load', scratch .. '/part' })
    assert.are.equal(0, status2, err2)
    assert.matches('loaded checkpoint', resumed_out)
    local full, resumed = losses(full_out), losses(resumed_out)
    for it = 4, 6 do assert.are.equal(full[it], resumed[it]) end
    local a, b = checkpoint_tensors(scratch .. '/full', 6), checkpoint_tensors(scratch .. '/part', 6)
    local names = 0
    for name, t in pairs(a) do
      names = names + 1
      assert.is_not_nil(b[name], name)
      assert.are.equal(0, (t:double() - b[name]:double()):abs():max():item(), name)
    end
    assert.is_true(names > 10)
  end)

  it('resumes bit-exactly in bf16 with f32 master weights and with activation recompute', function()
    local flags = { '--bf16', '--recompute-granularity', 'full', '--save-interval', '2', '--train-iters', '4' }
    local function with(extra)
      local all = {}
      for _, f in ipairs(flags) do all[#all + 1] = f end
      for _, f in ipairs(extra) do all[#all + 1] = f end
      return all
    end
    local _, err, status = run_pretrain(with({ '--save', scratch .. '/full' }))
    assert.are.equal(0, status, err)
    local _, err1, status1 = run_pretrain({ '--bf16', '--recompute-granularity', 'full', '--save-interval', '2',
      '--train-iters', '2', '--lr-decay-iters', '4', '--save', scratch .. '/part' })
    assert.are.equal(0, status1, err1)
    local _, err2, status2 = run_pretrain(with({ '--save', scratch .. '/part', '--load', scratch .. '/part' }))
    assert.are.equal(0, status2, err2)
    local a, b = checkpoint_tensors(scratch .. '/full', 4), checkpoint_tensors(scratch .. '/part', 4)
    assert.are.equal('bf16', a['model.decoder.layers.0.mlp.linear_fc1.weight'].dtype)
    assert.are.equal('f32', a['optimizer.decoder.layers.0.mlp.linear_fc1.weight.master'].dtype)
    for name, t in pairs(a) do
      assert.are.equal(0, (t:double() - b[name]:double()):abs():max():item(), name)
    end
  end)

  it('a save killed midway leaves the previous checkpoint loadable', function()
    -- save iteration 1, then start saving a large iteration 2 and kill the process while it writes
    local script = scratch .. '/save.lua'
    shell.write_file(script, string.format([[
      local M = pmp.nn.Module:extend('Big')
      function M:init(n) self.w = pmp.zeros(n):requires_grad_() end
      local big = M(150000000)
      pmp.checkpoint.save(%q, 1, M(1000), nil, { note = 'first' })
      io.stdout:write('saved 1\n'); io.stdout:flush()
      pmp.checkpoint.save(%q, 2, big, nil, { note = 'second' })
    ]], scratch .. '/ck', scratch .. '/ck'))
    -- kill it 0.2 s into writing the 600 MB of iteration 2
    local command = string.format('%s %s > %s & pid=$!; for i in $(seq 200); do grep -q "saved 1" %s && break; sleep 0.05; done; ' ..
      'sleep 0.2; kill -9 $pid; wait $pid; cat %s', shell.quote(shell.pmp), shell.quote(script),
      shell.quote(scratch .. '/log'), shell.quote(scratch .. '/log'), shell.quote(scratch .. '/log'))
    local out = shell.run(command)
    assert.matches('saved 1', out)
    local latest = pmp.checkpoint.latest_iteration(scratch .. '/ck')
    assert.is_true(latest == 1 or latest == 2)
    local M = pmp.nn.Module:extend('Small')
    function M:init(n) self.w = pmp.zeros(n):requires_grad_() end
    if latest == 1 then
      local info = pmp.checkpoint.load(scratch .. '/ck', M(1000))
      assert.are.equal('first', info.state.note)
    end
    assert.is_false(pmp.io.exists(scratch .. '/ck/iter_0000002/mp_rank_00/model_optim_rng.json') and latest == 1)
  end)

  it('rejects bad flags with a clear message', function()
    local _, err, status = run_pretrain({ '--no-such-flag', '1' })
    assert.are_not.equal(0, status)
    assert.are.equal("pmp: unknown argument '--no-such-flag' (see --help)\n", err)   -- one line, no traceback
    local _, err2, status2 = run_pretrain({ '--global-batch-size', '6' })
    assert.are_not.equal(0, status2)
    assert.are.equal('pmp: --global-batch-size 6 is not a multiple of --micro-batch-size 4 x data-parallel size 1\n', err2)
    -- a --load that holds no checkpoint stops the run before any work, instead of training from scratch
    local out3, err3, status3 = run_pretrain({ '--load', scratch .. '/typo', '--save', scratch .. '/ck' })
    assert.are.equal(1, status3)
    assert.are.equal('pmp: --load ' .. scratch .. '/typo does not exist\n', err3)
    assert.are.equal('', out3)
    assert.is_false(pmp.io.exists(scratch .. '/ck'))
  end)

  it('lists its flags with defaults', function()
    local out, _, status = shell.run_pmp({ shell.root .. '/recipes/pretrain.lua', '--help' })
    assert.are.equal(0, status)
    for _, flag in ipairs({ '--num-layers', '--hidden-size', '--ffn-hidden-size', '--num-attention-heads',
      '--num-query-groups', '--seq-length', '--micro-batch-size', '--global-batch-size', '--train-iters', '--lr',
      '--min-lr', '--lr-warmup-iters', '--lr-decay-style', '--weight-decay', '--clip-grad', '--seed', '--bf16',
      '--data-path', '--split', '--eval-interval', '--eval-iters', '--save', '--save-interval', '--load',
      '--tensorboard-dir', '--log-interval', '--tokenizer-type', '--tokenizer-model' }) do
      assert.matches(flag:gsub('%-', '%%-') .. ' ', out)
    end
  end)
end)
