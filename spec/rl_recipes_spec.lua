require 'busted.runner'()
-- Short runs of recipes/rm.lua, dpo.lua, ppo.lua and grpo.lua: the embedded default end to end on a
-- tiny pretraining checkpoint, a tiny Hugging Face model on TRL-format data, and bad inputs.
local shell = require 'spec.support.shell'

local function run_in(dir, script, args)
  local words = { 'cd', shell.quote(dir), '&&', shell.quote(shell.pmp), shell.quote(shell.root .. '/recipes/' .. script) }
  for _, a in ipairs(args) do words[#words + 1] = shell.quote(a) end
  return shell.run(table.concat(words, ' '))
end

describe('RL recipes on the embedded sums task', function()
  it('end on bad flags or a missing start model with one line from the runner, before any work', function()
    local dir = shell.temp_dir()
    local cases = {
      { 'rm.lua', { '--bogus' }, "pmp: unknown argument '--bogus' (see --help)\n" },
      { 'dpo.lua', { '--load', 'x' }, 'pmp: --data-path FILE.jsonl is required with --load\n' },
      { 'ppo.lua', { '--rollout-batch-size', '3', '--mini-batch-size', '2' },
        'pmp: --rollout-batch-size must be a multiple of --mini-batch-size\n' },
      { 'grpo.lua', {}, 'pmp: the embedded default starts from checkpoints/pretrain: run `pmp recipes/pretrain.lua` first\n' },
    }
    for _, case in ipairs(cases) do
      local out, err, status = run_in(dir, case[1], case[2])
      assert.are_not.equal(0, status, case[1])
      assert.are.equal(case[3], err)
      assert.are.equal('', out)
    end
    shell.remove_dir(dir)
  end)

  it('each trains from a tiny start and prints its held-out metric before and after', function()
    local dir = shell.temp_dir()
    local _, err0, status0 = run_in(dir, 'grpo.lua', {})
    assert.are_not.equal(0, status0)
    assert.matches('run `pmp recipes/pretrain.lua` first', err0)
    local _, err1, status1 = run_in(dir, 'pretrain.lua', { '--num-layers', '1', '--hidden-size', '32',
      '--num-attention-heads', '2', '--train-iters', '4', '--log-interval', '2', '--eval-interval', '4', '--sample-length', '0' })
    assert.are.equal(0, status1, err1)
    local runs = {
      { 'rm.lua', { '--start-iters', '3', '--train-iters', '3', '--batch-size', '4', '--log-interval', '1' },
        '\nrm: held%-out pairwise accuracy before [%d.]+ after [%d.]+\n$', 'pairwise loss: ' },
      { 'dpo.lua', { '--train-iters', '3', '--batch-size', '4', '--log-interval', '1' },
        '\ndpo: held%-out preference accuracy before 0%.5000 after [%d.]+\n$', 'dpo loss: ' },
      { 'grpo.lua', { '--iterations', '2', '--prompts-per-iteration', '2', '--num-generations', '3', '--eval-samples', '1',
        '--ref-dtype', 'bf16' },
        '\ngrpo: held%-out mean reward before [%d.]+ after [%d.]+\n$', 'clipfrac: ' },
      { 'ppo.lua', { '--iterations', '2', '--rollout-batch-size', '4', '--mini-batch-size', '2', '--ppo-epochs', '2',
        '--eval-samples', '1', '--target-kl', '0.1', '--save', 'ppo_ck', '--save-interval', '1', '--ref-dtype', 'bf16' },
        '\nppo: held%-out mean reward before [%d.]+ after [%d.]+\n$', 'value loss: ' },
    }
    for _, r in ipairs(runs) do
      local out, err, status = run_in(dir, r[1], r[2])
      assert.are.equal(0, status, r[1] .. ': ' .. err)
      assert.matches(r[3], out)
      assert.matches(r[4], out)
    end
    assert.is_true(pmp.checkpoint.latest_iteration(dir .. '/ppo_ck/actor') == 2)

    -- ppo resumes bit-exactly: 2 iterations (stopped by --exit-interval) + 2 give the log lines and weights of 4
    -- in one go
    shell.write_file(dir .. '/length.lua', 'return function(prompt, response) return #response / 4 end\n')
    local args = { '--reward-fn', 'length.lua', '--rollout-batch-size', '4', '--mini-batch-size', '2', '--ppo-epochs', '2',
      '--target-kl', '0.01', '--iterations', '4' }
    local function ppo(save, extra)
      local a = { unpack(args) }
      a[#a + 1], a[#a + 2] = '--save', save
      for _, word in ipairs(extra or {}) do a[#a + 1] = word end
      local out, err, status = run_in(dir, 'ppo.lua', a)
      assert.are.equal(0, status, err)
      local lines = {}
      for line in out:gmatch('iteration +%d+/ +%d+ | (.-)| time') do lines[#lines + 1] = line end
      return lines
    end
    local whole = ppo('whole')
    local first, rest = ppo('parts', { '--exit-interval', '2' }), ppo('parts')
    assert.are.equal(4, #whole)
    assert.are.equal(2, #first)
    assert.are.same(whole, { first[1], first[2], rest[1], rest[2] })
    for _, part in ipairs({ 'actor', 'critic' }) do
      local function weights(run)
        local file = string.format('%s/%s/%s/iter_0000004/mp_rank_00/model_optim_rng.safetensors', dir, run, part)
        return pmp.safetensors.load(file)
      end
      local a, b = weights('whole'), weights('parts')
      for name, t in pairs(a) do
        assert.are.equal(0, (t:double() - b[name]:double()):abs():max():item(), part .. ' ' .. name)
      end
    end
    shell.remove_dir(dir)
  end)
end)

describe('RL recipes on a Hugging Face model', function()
  local tiny_hf = require 'spec.support.tiny_hf'
  local dir
  setup(function()
    if not tiny_hf.available() then return end
    dir = shell.temp_dir()
    tiny_hf.write(dir .. '/base')
    shell.write_file(dir .. '/prefs.jsonl', table.concat({
      '{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}',
      '{"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], ' ..
        '"rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}',
    }, '\n') .. '\n')
    shell.write_file(dir .. '/prompts.jsonl', '{"prompt": "Count to three."}\n{"prompt": [{"role": "user", "content": "Hi"}]}\n')
    shell.write_file(dir .. '/length.lua', 'return function(prompt, response) return #response / 10 end\n')
  end)
  teardown(function() if dir then shell.remove_dir(dir) end end)
  local function need_tokenizer()
    if not dir then pending('needs ../shared/tokenizers/qwen3') end
    return dir ~= nil
  end

  it('rm trains on TRL string and message-list pairs and saves a reward model transformers-style', function()
    if not need_tokenizer() then return end
    local out, err, status = run_in(dir, 'rm.lua', { '--load', 'base', '--data-path', 'prefs.jsonl', '--eval-data-path',
      'prefs.jsonl', '--train-iters', '2', '--batch-size', '2', '--log-interval', '1', '--save-hf', 'rm_out' })
    assert.are.equal(0, status, err)
    assert.matches('rm: held%-out pairwise accuracy before [%d.]+ after [%d.]+', out)
    local rm = pmp.models.from_pretrained(dir .. '/rm_out', { head = 'score' })
    assert.are.equal('Qwen3ForSequenceClassification', rm.hf.config.architectures[1])
  end)

  it('dpo, grpo and ppo run a step each on it (ppo with the reward model of the rm run)', function()
    if not need_tokenizer() then return end
    local out, err, status = run_in(dir, 'dpo.lua', { '--load', 'base', '--data-path', 'prefs.jsonl', '--train-iters', '2',
      '--batch-size', '2', '--log-interval', '1', '--loss-type', 'ipo', '--ref-dtype', 'bf16' })
    assert.are.equal(0, status, err)
    assert.matches('dpo loss: ', out)
    out, err, status = run_in(dir, 'grpo.lua', { '--load', 'base', '--prompts', 'prompts.jsonl', '--reward-fn', 'length.lua',
      '--iterations', '1', '--prompts-per-iteration', '2', '--num-generations', '2', '--max-new-tokens', '3' })
    assert.are.equal(0, status, err)
    assert.matches('reward mean: ', out)
    if not pmp.io.is_dir(dir .. '/rm_out') then return end
    out, err, status = run_in(dir, 'ppo.lua', { '--load', 'base', '--prompts', 'prompts.jsonl', '--reward-model', 'rm_out',
      '--iterations', '1', '--rollout-batch-size', '2', '--mini-batch-size', '1', '--ppo-epochs', '1', '--max-new-tokens', '3' })
    assert.are.equal(0, status, err)
    assert.matches('time %(s%) rollout [%d.]+ reference [%d.]+ update [%d.]+', out)
  end)

  it('name the record or the function when the input is bad', function()
    if not need_tokenizer() then return end
    shell.write_file(dir .. '/bad.jsonl', '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    local _, err, status = run_in(dir, 'dpo.lua', { '--load', 'base', '--data-path', 'bad.jsonl' })
    assert.are_not.equal(0, status)
    assert.truthy(err:find("bad.jsonl:2: missing field 'rejected'", 1, true), err)
    shell.write_file(dir .. '/empty.jsonl', '{"prompt": "a", "chosen": "", "rejected": "c"}\n')
    _, err, status = run_in(dir, 'rm.lua', { '--load', 'base', '--data-path', 'empty.jsonl' })
    assert.are_not.equal(0, status)
    assert.truthy(err:find("empty.jsonl:1: the 'chosen' answer is empty", 1, true), err)
    shell.write_file(dir .. '/raises.lua', 'return function() error("no judge today") end\n')
    shell.write_file(dir .. '/nan.lua', 'return function() return 0 / 0 end\n')
    for file, message in pairs({ ['raises.lua'] = 'failed on sample 1', ['nan.lua'] = 'returned NaN for sample 1' }) do
      _, err, status = run_in(dir, 'grpo.lua', { '--load', 'base', '--prompts', 'prompts.jsonl', '--reward-fn', file,
        '--iterations', '1', '--prompts-per-iteration', '1', '--num-generations', '2', '--max-new-tokens', '2' })
      assert.are_not.equal(0, status)
      assert.truthy(err:find('reward function ' .. file .. ' ' .. message, 1, true), err)
    end
  end)
end)
