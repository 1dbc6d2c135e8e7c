require 'busted.runner'()
-- How a training run stops without losing work or saving a wrong one: SIGTERM / SIGINT save at the end
-- of the iteration (every MPI rank at the same one), --exit-duration-in-mins, a second Ctrl-C ending the
-- process at once, steps with a non-finite gradient skipped and counted, a diverged model never saved,
-- a --save directory checked before any work, and every recipe stopping at once, in one line without a
-- Lua position, on a nonsense flag value or a path it cannot use.
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'
local losses = require('spec.support.train_log').losses

local TINY = { '--num-layers', '1', '--hidden-size', '32', '--num-attention-heads', '2', '--seq-length', '16',
  '--micro-batch-size', '4', '--global-batch-size', '8', '--log-interval', '1', '--eval-interval', '0',
  '--sample-length', '0', '--lr-warmup-iters', '2' }

local function pretrain_words(extra)
  local words = { 'cd', shell.quote(shell.root), '&&', shell.quote(shell.pmp), 'recipes/pretrain.lua' }
  for _, list in ipairs({ TINY, extra }) do
    for _, a in ipairs(list) do words[#words + 1] = shell.quote(a) end
  end
  return table.concat(words, ' ')
end

local function run_pretrain(extra) return shell.run(pretrain_words(extra)) end

local tracker = pmp.checkpoint.latest_iteration

-- Starts `command` in the background, waits until its log shows `iterations` iteration lines, sends
-- `signal` to the pretraining processes whose command line holds `marker` (the first of them only with
-- `one`: one MPI rank), waits
-- for the command; returns its log and exit status.
local function signal_midway(command, marker, signal, iterations, one)
  local dir = shell.temp_dir()
  local script = string.format([[
( %s ) >%s/log 2>&1 &
job=$!
for _ in $(seq 600); do
  [ "$(grep -c ' iteration ' %s/log)" -ge %d ] && break
  sleep 0.05
done
pids=$(pgrep -f %s %s)
kill -%s $pids
wait $job
echo "status $?" >>%s/log
]], command, dir, dir, iterations, shell.quote('^' .. shell.pmp .. ' recipes/pretrain.lua .*' .. marker), one and '| head -1' or '', signal, dir)
  shell.run(script)
  local file = assert(io.open(dir .. '/log'))
  local log = file:read('*a')
  file:close()
  shell.remove_dir(dir)
  return log, tonumber(log:match('status (%d+)\n$'))
end

describe('a training run that is told to stop', function()
  local scratch
  before_each(function() scratch = shell.temp_dir() end)
  after_each(function() shell.remove_dir(scratch) end)

  it('on SIGTERM finishes the iteration, saves it, exits 0, and resumes to the uninterrupted losses', function()
    local iters = { '--train-iters', '300' }
    local log, status = signal_midway(pretrain_words({ iters[1], iters[2], '--save', scratch .. '/ck' }),
      scratch .. '/ck', 'TERM', 5)
    assert.are.equal(0, status, log)
    local stopped = tonumber(log:match('pretrain: exiting at iteration (%d+) %(SIGTERM received%)'))
    assert.is_not_nil(stopped, log)
    assert.is_true(stopped >= 5 and stopped < 300, log)
    assert.are.equal(stopped, tracker(scratch .. '/ck'))
    local resumed_out, err, resumed_status = run_pretrain({ iters[1], iters[2], '--save', scratch .. '/ck', '--load',
      scratch .. '/ck' })
    assert.are.equal(0, resumed_status, err)
    local whole_out = run_pretrain({ iters[1], iters[2], '--save', '' })
    assert.are.equal(losses(whole_out)[300], losses(resumed_out)[300])
    assert.is_nil(losses(resumed_out)[stopped], 'the resumed run repeated the saved iteration')
  end)

  it('under mpirun stops every rank after the same iteration when one rank gets SIGTERM', function()
    if not mpi.available then pending('mpirun is not installed') return end
    local args = { '--train-iters', '2000', '--save', scratch .. '/ck' }
    for _, a in ipairs(TINY) do args[#args + 1] = a end
    local command, session = mpi.command(2, 'recipes/pretrain.lua', args, nil, shell.root)
    local log, status = signal_midway(command, scratch .. '/ck', 'TERM', 3, true)
    shell.remove_dir(session)
    assert.are.equal(0, status, log)
    local stopped = tonumber(log:match('pretrain: exiting at iteration (%d+) %(SIGTERM received%)'))
    assert.is_not_nil(stopped, log)
    assert.are.equal(stopped, tracker(scratch .. '/ck'))
    -- both data-parallel ranks saved that iteration: it loads back whole
    local out, err, resumed = run_pretrain({ '--train-iters', tostring(stopped + 1), '--load', scratch .. '/ck',
      '--save', scratch .. '/ck' })
    assert.are.equal(0, resumed, err)
    assert.is_not_nil(losses(out)[stopped + 1], out)
  end)

  it('stops after --exit-duration-in-mins, saving', function()
    local out, err, status = run_pretrain({ '--train-iters', '300', '--exit-duration-in-mins', '0.0001', '--save',
      scratch .. '/ck' })
    assert.are.equal(0, status, err)
    local stopped = tonumber(out:match('exiting at iteration (%d+) %(%-%-exit%-duration%-in%-mins 0.0001 elapsed%)'))
    assert.is_not_nil(stopped, out)
    assert.are.equal(stopped, tracker(scratch .. '/ck'))
  end)

  it('records the first signal and ends at once on a SIGINT after it', function()
    local script = scratch .. '/twice.lua'
    shell.write_file(script, [[
local ffi = require 'ffi'
ffi.cdef('int kill(int pid, int sig); int getpid(void);')
local C = require('pmp.ffi').C
assert(C.pmp_stop_signals_watch(1, 1) == 0)
ffi.C.kill(ffi.C.getpid(), 2)
print('first ' .. C.pmp_stop_signal())
ffi.C.kill(ffi.C.getpid(), 15)
print('after SIGTERM ' .. C.pmp_stop_signal())
ffi.C.kill(ffi.C.getpid(), 2)
print('survived a second SIGINT')
]])
    local out, _, status = shell.run_pmp({ script })
    assert.are.equal('first 2\nafter SIGTERM 2\n', out)
    assert.are.equal(130, status)
  end)
end)

-- A tiny model whose parameter `name` holds a NaN, and its AdamW optimizer.
local function model_with_nan(name)
  local model = pmp.train.model.gpt({ num_layers = 1, hidden_size = 8, num_attention_heads = 2, num_query_groups = 0,
    ffn_hidden_size = 0, seq_length = 8, hidden_dropout = 0, init_method_std = 0.02, rotary_base = 10000,
    norm_epsilon = 1e-5, untie_embeddings_and_output_weights = false, make_vocab_size_divisible_by = 1 }, 11)
  for _, pair in ipairs(model:named_parameters()) do
    if pair[1] == name then pmp.no_grad(function() pair[2]:narrow(1, 1, 1):fill_(0 / 0) end) end
  end
  return model, pmp.optim.AdamW(model:parameters(), { lr = 0.1 })
end

describe('a run whose gradient is not finite', function()
  local scratch
  before_each(function() scratch = shell.temp_dir() end)
  after_each(function() shell.remove_dir(scratch) end)

  local logger = pmp.train.Logger({ log_interval = 1 }, { name = 'spec', enabled = false })

  it('skips those steps (the weights stay as they were) and stops after too many in a row', function()
    local model, optimizer = model_with_nan('decoder.layers.0.mlp.linear_fc2.weight')
    local guard = pmp.train.NanGuard({ max_nan_iterations_in_a_row = 2 }, logger)
    local ids = pmp.tensor({ { 1, 2, 3, 4 } }, { dtype = 'i64' })
    local embedding = model.embedding.word_embeddings.weight:clone()
    local function train_step(iteration)
      pmp.train.step.zero_grad(optimizer)
      pmp.train.step.forward_backward(model, { { ids = ids, targets = ids } })
      local norm = pmp.train.step.clip_grads(model, optimizer, 1.0)
      if guard:finite(iteration, norm) then optimizer:step() end
      return norm
    end
    local norm = train_step(1)
    assert.is_true(norm ~= norm, 'a NaN weight gives a NaN gradient norm')
    assert.is_true(require('spec.support.expect').same_bits(embedding, model.embedding.word_embeddings.weight))
    require('spec.support.expect').fails_with(function() train_step(2) end, 'stopping at iteration 2: 2 iterations ' ..
      'in a row had a non-finite loss or gradient (--max-nan-iterations-in-a-row 2)')
  end)

  it('counts a finite step as ending the streak', function()
    local guard = pmp.train.NanGuard({ max_nan_iterations_in_a_row = 2 }, logger)
    assert.is_false(guard:finite(1, 0 / 0))
    assert.is_true(guard:finite(2, 1.5))
    assert.is_false(guard:finite(3, math.huge))
    assert.are.equal(2, guard.total)
  end)

  it('refuses to save a model holding NaN', function()
    local model = model_with_nan('decoder.layers.0.mlp.linear_fc2.weight')
    local checkpoints = pmp.train.Checkpoints({ save = scratch .. '/ck', save_interval = 1 }, logger)
    require('spec.support.expect').fails_with(function() checkpoints:save(3, model, nil, {}) end,
      'not saving iteration 3: parameter decoder.layers.0.mlp.linear_fc2.weight holds NaN or Inf (the run diverged)')
    assert.is_nil(tracker(scratch .. '/ck'))
  end)

  -- A learning rate of 1e30 blows the weights up within a few steps, then the loss turns NaN.
  local DIVERGING = { '--train-iters', '40', '--lr', '1e30', '--lr-warmup-iters', '0', '--clip-grad', '0' }

  it('in the recipe: a diverged model is not saved over the last good checkpoint', function()
    local args = { '--save', scratch .. '/ck', '--save-interval', '1' }
    for _, a in ipairs(DIVERGING) do args[#args + 1] = a end
    local _, err, status = run_pretrain(args)
    assert.are_not.equal(0, status)
    local refused = tonumber(err:match('^pmp: not saving iteration (%d+): parameter [%w._]+ holds NaN or Inf'))
    assert.is_not_nil(refused, err)
    assert.are.equal(refused - 1, tracker(scratch .. '/ck'))
  end)

  it('in the recipe: NaN steps are logged as skipped until the limit', function()
    local args = { '--save', '', '--max-nan-iterations-in-a-row', '3' }
    for _, a in ipairs(DIVERGING) do args[#args + 1] = a end
    local out, err, status = run_pretrain(args)
    assert.are_not.equal(0, status)
    local stopped = tonumber(err:match('stopping at iteration (%d+): 3 iterations in a row'))
    assert.is_not_nil(stopped, err)
    for k = stopped - 2, stopped - 1 do
      assert.matches(' iteration +' .. k .. '/ +40 |.- lm loss: [-%a]+ | loss scale: 1.0 | grad norm: [-%a]+ | number of skipped ' ..
        'iterations: +1 | number of nan iterations: +1 |', out)
    end
    assert.matches(' iteration ' .. (stopped - 2) .. ': gradient norm is [-%a]+; the update is skipped %(1 in a row%)', out)
  end)
end)

describe('the --save directory of a fresh run', function()
  local scratch
  before_each(function() scratch = shell.temp_dir() end)
  after_each(function() shell.remove_dir(scratch) end)

  it('may not hold another run\'s checkpoint unless --override-checkpoint', function()
    local _, err, status = run_pretrain({ '--train-iters', '2', '--save', scratch .. '/ck' })
    assert.are.equal(0, status, err)
    local out2, err2, status2 = run_pretrain({ '--train-iters', '1', '--save', scratch .. '/ck' })
    assert.are_not.equal(0, status2)
    assert.are.equal('', out2)
    assert.are.equal('pmp: --save ' .. scratch .. '/ck already holds a checkpoint (iteration 2) of another run; pass ' ..
      '--load ' .. scratch .. '/ck to resume it, or --override-checkpoint to start over and replace it\n', err2)
    assert.are.equal(2, tracker(scratch .. '/ck'))
    local _, err3, status3 = run_pretrain({ '--train-iters', '1', '--save', scratch .. '/ck', '--override-checkpoint' })
    assert.are.equal(0, status3, err3)
    assert.are.equal(1, tracker(scratch .. '/ck'))
  end)

  it('must be writable before any training', function()
    shell.write_file(scratch .. '/file', 'x')
    local out, err, status = run_pretrain({ '--train-iters', '1', '--save', scratch .. '/file/ck' })
    assert.are_not.equal(0, status)
    assert.are.equal('', out)
    assert.matches('^pmp: %-%-save ' .. scratch:gsub('%p', '%%%0') .. '/file/ck is not writable', err)
  end)
end)

describe('flags with nonsense values', function()
  -- each is refused before any work with one line naming the flag (the bounds are Megatron's meanings)
  local cases = {
    { { '--num-layers', '-1' }, '--num-layers must be >= 1, got -1' },
    { { '--train-iters', '-3' }, '--train-iters must be >= 0, got -3' },
    { { '--rotary-base', '0' }, '--rotary-base must be > 0, got 0' },
    { { '--adam-beta1', '2' }, '--adam-beta1 must be < 1, got 2' },
    { { '--num-layers', '2.5' }, '--num-layers must be a whole number, got 2.5' },
    { { '--bf16=maybe' }, "--bf16 is a switch: give it alone, or =true / =false, not 'maybe'" },
    { { '--seq-length', '0' }, '--seq-length must be >= 1, got 0' },
    { { '--make-vocab-size-divisible-by', '0' }, '--make-vocab-size-divisible-by must be >= 1, got 0' },
    { { '--lr-decay-style', 'cosin' }, "--lr-decay-style must be one of cosine, linear, constant, WSD, got 'cosin'" },
    { { '--moe-expert-capacity-factor', '-1' }, '--moe-expert-capacity-factor must be >= 0, got -1' },
    { { '--moe-router-score-function', 'softplus' }, "--moe-router-score-function must be one of softmax, sigmoid, got 'softplus'" },
    { { '--kv-lora-rank', '0' }, '--kv-lora-rank must be >= 1, got 0' },
    { { '--hidden-size', '63', '--num-attention-heads', '4' }, '--hidden-size 63 is not a multiple of --num-attention-heads 4' },
    { { '--num-attention-heads', '4', '--num-query-groups', '3' }, '--num-attention-heads 4 is not a multiple of --num-query-groups 3' },
    { { '--split', '0,0,0' }, "--split '0,0,0' has no positive weight" },
    { { '--split', '0,1,0' }, 'the embedded corpus: the --split 0,1,0 leaves 0 training tokens, fewer than --seq-length 16 + 1' },
    { { '--data-path', '/tmp' }, '--data-path /tmp is a directory (give a text file or an indexed dataset PREFIX)' },
    { { '--data-path', '/dev/null' }, '--data-path /dev/null is empty' },
  }
  for _, case in ipairs(cases) do
    it(table.concat(case[1], ' '), function()
      local args = { '--save', '', '--train-iters', '1' }
      for _, a in ipairs(case[1]) do args[#args + 1] = a end
      local out, err, status = run_pretrain(args)
      assert.are_not.equal(0, status)
      assert.are.equal('', out)
      assert.are.equal('pmp: ' .. case[2] .. '\n', err)
    end)
  end
end)

describe("the other recipes' flags with nonsense values", function()
  -- each recipe refuses them while parsing, before it reads a model or data, with one line naming the flag
  -- (a recipe's own spec of a shared flag keeps the shared bounds: sft's --seq-length, rm's --lr-decay-style)
  local cases = {
    { 'sft', { '--epochs', '0' }, '--epochs must be >= 1, got 0' },
    { 'sft', { '--format', 'csv' }, "--format must be one of auto, alpaca, sharegpt, messages, got 'csv'" },
    { 'sft', { '--chat-template', 'vicuna' }, "--chat-template must be one of alpaca, chatml, llama3, got 'vicuna'" },
    { 'sft', { '--seq-length', '0' }, '--seq-length must be >= 1, got 0' },
    { 'sft', { '--lora-rank', '1.5' }, '--lora-rank must be a whole number, got 1.5' },
    { 'sft', { '--lora-dropout', '1' }, '--lora-dropout must be < 1, got 1' },
    { 'rm', { '--batch-size', '0' }, '--batch-size must be >= 1, got 0' },
    { 'rm', { '--lora-alpha', '0' }, '--lora-alpha must be > 0, got 0' },
    { 'rm', { '--lr-decay-style', 'cosin' }, "--lr-decay-style must be one of cosine, linear, constant, WSD, got 'cosin'" },
    { 'rm', { '--max-length', '1' }, '--max-length must be >= 2, got 1' },
    { 'dpo', { '--beta', '0' }, '--beta must be > 0, got 0' },
    { 'dpo', { '--loss-type', 'kto' }, "--loss-type must be one of sigmoid, ipo, hinge, got 'kto'" },
    { 'dpo', { '--label-smoothing', '0.7' }, '--label-smoothing must be <= 0.5, got 0.7' },
    { 'dpo', { '--adam-beta2', '1' }, '--adam-beta2 must be < 1, got 1' },
    { 'dpo', { '--ref-dtype', 'f16' }, "--ref-dtype must be one of f32, bf16, got 'f16'" },
    { 'ppo', { '--gamma', '1.5' }, '--gamma must be <= 1, got 1.5' },
    { 'ppo', { '--lam', '-0.1' }, '--lam must be >= 0, got -0.1' },
    { 'ppo', { '--kl-horizon', '0' }, '--kl-horizon must be > 0, got 0' },
    { 'ppo', { '--value-clip-range', '0' }, '--value-clip-range must be > 0, got 0' },
    { 'ppo', { '--mini-batch-size', '0' }, '--mini-batch-size must be >= 1, got 0' },
    { 'ppo', { '--temperature', '0' }, '--temperature must be > 0, got 0' },
    { 'ppo', { '--seed', '-1' }, '--seed must be >= 0, got -1' },
    { 'grpo', { '--num-generations', '1' }, '--num-generations must be >= 2, got 1' },
    { 'grpo', { '--kl-coef', '-0.01' }, '--kl-coef must be >= 0, got -0.01' },
    { 'grpo', { '--clip-range', '-0.2' }, '--clip-range must be > 0, got -0.2' },
    { 'grpo', { '--top-p', '0' }, '--top-p must be > 0, got 0' },
    { 'grpo', { '--start-iters', '0' }, '--start-iters must be >= 1, got 0' },
    { 'grpo', { '--epochs', '2.5' }, '--epochs must be a whole number, got 2.5' },
    { 'generate', { '--max-new-tokens', '0' }, '--max-new-tokens must be >= 1, got 0' },
    { 'generate', { '--temperature', '-1' }, '--temperature must be >= 0, got -1' },
    { 'generate', { '--top-k', '-1' }, '--top-k must be >= 0, got -1' },
    { 'generate', { '--top-p', '1.5' }, '--top-p must be <= 1, got 1.5' },
    { 'generate', { '--repetition-penalty', '0' }, '--repetition-penalty must be > 0, got 0' },
    { 'eval', { '--micro-batch-size', '0' }, '--micro-batch-size must be >= 1, got 0' },
    { 'eval', { '--stride', '-64' }, '--stride must be >= 0, got -64' },
    { 'eval', { '--limit', '0.5' }, '--limit must be a whole number, got 0.5' },
    { 'quickstart', { '--steps', '0' }, '--steps must be >= 1, got 0' },
    { 'quickstart', { '--lr', '0' }, '--lr must be > 0, got 0' },
    { 'quickstart', { '--context', '5000' }, "--context 5000 leaves no window in the text's 621 characters" },
    { 'pretrain', { '--sample-length', '-1' }, '--sample-length must be >= 0, got -1' },
  }
  it('stop each recipe at once with one line naming the flag', function()
    local dir = shell.temp_dir()   -- no checkpoints/ here: a recipe that went on would fail otherwise
    for _, case in ipairs(cases) do
      local words = { 'cd', shell.quote(dir), '&&', shell.quote(shell.pmp), shell.quote(shell.root .. '/recipes/' .. case[1] .. '.lua') }
      for _, a in ipairs(case[2]) do words[#words + 1] = shell.quote(a) end
      local what = case[1] .. ' ' .. table.concat(case[2], ' ')
      local out, err, status = shell.run(table.concat(words, ' '))
      assert.are.equal(1, status, what)
      assert.are.equal('', out, what)
      assert.are.equal('pmp: ' .. case[3] .. '\n', err, what)
    end
    shell.remove_dir(dir)
  end)
end)

describe('a recipe given a path it cannot use', function()
  -- one line naming the path (and the flag where the recipe knows it), with no Lua position or stack: the
  -- file system's state is the user's to fix, not the code's (PMP_TRACEBACK=1 still adds the stack)
  local cases = {
    { 'rm', { '--load', 'missing', '--data-path', 'pairs.jsonl' }, '^%-%-load missing is not a directory$' },
    { 'dpo', { '--load', 'afile', '--data-path', 'pairs.jsonl' }, '^%-%-load afile is not a directory$' },
    { 'ppo', { '--load', 'missing' }, '^%-%-load missing is not a directory$' },
    { 'eval', { '--output', 'afile/results.json' }, '^%-%-output afile/results.json is not writable: .*Not a directory$' },
    { 'eval', { '--data-path', '.' }, '^%-%-data%-path %. is a directory %(give a text file or an indexed dataset PREFIX%)$' },
    { 'eval', { '--task', '.' }, '^task file %. is a directory %(give a jsonl file%)$' },
    { 'pretrain', { '--split', 'a,b', '--save', '' }, "^dataset: bad %-%-split 'a,b'$" },
    { 'pretrain', { '--tensorboard-dir', 'afile/tb', '--save', '', '--seq-length', '8', '--train-iters', '1' },
      '^%-%-tensorboard%-dir afile/tb: pmp.tensorboard: cannot create event file: afile/tb/events.* Not a directory$' },
  }
  local function run_in(dir, case, environment)
    local words = { 'cd', shell.quote(dir), '&&', environment or '', shell.quote(shell.pmp),
      shell.quote(shell.root .. '/recipes/' .. case[1] .. '.lua') }
    for _, a in ipairs(case[2]) do words[#words + 1] = shell.quote(a) end
    return shell.run(table.concat(words, ' '))
  end

  it('stops with one line that names it, without a Lua position', function()
    local dir = shell.temp_dir()
    shell.write_file(dir .. '/afile', 'x')
    for _, case in ipairs(cases) do
      local what = case[1] .. ' ' .. table.concat(case[2], ' ')
      local out, err, status = run_in(dir, case)
      assert.are.equal(1, status, what .. ': ' .. err)
      assert.are.equal('', out, what)
      local line = err:match('^pmp: ([^\n]*)\n$')
      assert.is_not_nil(line, what .. ': ' .. err)
      assert.matches(case[3], line)
    end
    local _, traced = run_in(dir, cases[1], 'PMP_TRACEBACK=1')
    assert.matches('^pmp: %-%-load missing is not a directory\nstack traceback:\n', traced)
    shell.remove_dir(dir)
  end)

  it('finds an unwritable --save when the checkpoints are set up, before any training', function()
    local dir = shell.temp_dir()
    shell.write_file(dir .. '/afile', 'x')
    local logger = pmp.train.Logger({ log_interval = 1 }, { name = 'spec', enabled = false })
    assert.has_error(function() pmp.train.Checkpoints({ save = dir .. '/afile/ck', save_interval = 0 }, logger) end,
      '--save ' .. dir .. '/afile/ck is not writable: pmp.io.mkdir_p: ' .. dir .. '/afile/ck: cannot create directory ' ..
      dir .. '/afile: it exists and is not a directory')
    shell.remove_dir(dir)
  end)

  it('reads preference pairs, model directories and JSON with errors that carry no position', function()
    assert.has_error(function() pmp.rl.preference.load_jsonl('/nonexistent/pairs.jsonl', {}) end,
      'preference: cannot read /nonexistent/pairs.jsonl')
    assert.has_error(function() pmp.rl.preference.load_jsonl('/tmp', {}) end, 'preference: /tmp is a directory (give a jsonl file)')
    assert.has_error(function() pmp.train.chat_data.lines('/tmp') end, '--data-path /tmp is a directory (give a jsonl file or a PREFIX)')
    assert.has_error(function() pmp.models.from_pretrained('/nonexistent/model') end,
      'from_pretrained: /nonexistent/model is not a directory')
    assert.has_error(function() pmp.json.read('/nonexistent/config.json') end,
      'json.read: cannot open /nonexistent/config.json: No such file or directory')
    assert.has_error(function() pmp.io.read_file('/nonexistent/file') end,
      'pmp.io.read_file: cannot open /nonexistent/file: No such file or directory')
  end)
end)
