-- Checkpoints of every parallel layout load in every recipe, checked against one process.
-- The reference is recipes/pretrain.lua in one process for 16 iterations, saving every 2. A chain of
-- runs trains the same model 2 iterations at a time, each under mpirun in another layout (DP, TP, DP
-- with the distributed optimizer, PP, CP, virtual PP, TP x DP with sequence parallel and the
-- distributed optimizer, then one process), each resuming from the checkpoint of the one before: every
-- logged loss must be the reference's. Each link's checkpoint then loads through
-- pmp.checkpoint.load_model (as recipes/generate.lua and recipes/sft.lua do) with the reference's
-- weights, logits and greedy tokens at that iteration; recipes/generate.lua and recipes/sft.lua (fine-
-- tuning and its resume) run on the last parallel link's checkpoint like on the reference's.
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'
local pio = require 'pmp.io'
local json = require 'pmp.json'

local TOTAL = 16
local common = { '--num-layers', '4', '--hidden-size', '32', '--num-attention-heads', '4', '--num-query-groups', '2',
  '--seq-length', '16', '--micro-batch-size', '2', '--global-batch-size', '8', '--train-iters', tostring(TOTAL),
  '--log-interval', '1', '--eval-interval', '0', '--sample-length', '0', '--lr-warmup-iters', '1', '--lr', '1e-2',
  '--tokenizer-type', 'byte' }

-- np, name, flags, and the sizes layout.json must record: tp, pp, cp, dp, virtual stages, distributed
-- optimizer. TP=2 pads the 256 bytes to a multiple of 64 x 2, the others to one of 128: 256 rows either way.
local LINKS = {
  { 2, 'DP=2', {}, { 1, 1, 1, 2, 1, false } },
  { 2, 'TP=2', { '--tensor-model-parallel-size', '2' }, { 2, 1, 1, 1, 1, false } },
  { 2, 'DP=2 with the distributed optimizer', { '--use-distributed-optimizer' }, { 1, 1, 1, 2, 1, true } },
  { 2, 'PP=2', { '--pipeline-model-parallel-size', '2' }, { 1, 2, 1, 1, 1, false } },
  { 2, 'CP=2', { '--context-parallel-size', '2' }, { 1, 1, 2, 1, 1, false } },
  { 2, 'PP=2 with 2 virtual stages', { '--pipeline-model-parallel-size', '2', '--num-layers-per-virtual-pipeline-stage', '1' },
    { 1, 2, 1, 1, 2, false } },
  { 4, 'TP=2 x DP=2 with sequence parallel and the distributed optimizer', { '--tensor-model-parallel-size', '2',
    '--sequence-parallel', '--use-distributed-optimizer' }, { 2, 1, 1, 2, 1, true } },
  { 1, 'one process', {}, { 1, 1, 1, 1, 1, false } },
}
local LAST_PARALLEL = #LINKS - 1

local function with(...)
  local out = {}
  for _, list in ipairs({ ... }) do
    for _, a in ipairs(list) do out[#out + 1] = a end
  end
  return out
end

local function vocab_flags(flags)
  local tp2 = false
  for k, a in ipairs(flags) do if a == '--tensor-model-parallel-size' and flags[k + 1] == '2' then tp2 = true end end
  return { '--make-vocab-size-divisible-by', tp2 and '64' or '128' }
end

local function run(np, script, args)
  if np == 1 then return shell.run_pmp(with({ script }, args)) end
  return mpi.run(np, script, args, { PMP_DIST_TIMEOUT = '60' })
end

local function run_ok(np, script, args)
  local out, err, status = run(np, script, args)
  assert.are.equal(0, status, err .. out)
  return out
end

local losses = require('spec.support.train_log').losses

local function assert_close(want, got, label)
  local rel = math.abs(got - want) / math.abs(want)
  assert.is_true(rel <= 1e-5, string.format('%s: %.7g, one process gave %.7g', label, got, want))
end

describe('pmp.checkpoint across parallel layouts', function()
  local scratch, ref_dir, reference
  local pretrain = shell.root .. '/recipes/pretrain.lua'
  local function link_dir(k) return scratch .. '/link' .. k end

  setup(function()
    scratch = shell.temp_dir()
    ref_dir = scratch .. '/ref'
    reference = losses(run_ok(1, pretrain, with(common, { '--save', ref_dir, '--save-interval', '2',
      '--make-vocab-size-divisible-by', '128' })))
    assert.is_not_nil(reference[TOTAL])
  end)
  teardown(function() shell.remove_dir(scratch) end)

  it('a chain of runs, each resuming the one before in another layout, logs the losses of one process', function()
    for k, link in ipairs(LINKS) do
      local np, name, flags, sizes = unpack(link)
      local args = with(common, flags, vocab_flags(flags), { '--save', link_dir(k), '--exit-interval', '2' })
      if k > 1 then args = with(args, { '--load', link_dir(k - 1) }) end
      local out = run_ok(np, pretrain, args)
      local got = losses(out)
      for it = 2 * k - 1, 2 * k do
        assert.is_not_nil(got[it], name .. ': no loss logged for iteration ' .. it .. '\n' .. out)
        assert_close(reference[it], got[it], string.format('%s (link %d) iteration %d', name, k, it))
      end
      assert.is_nil(got[2 * k + 1], name .. ' went on past its link')
      if k > 1 then
        assert.matches('loaded checkpoint from ' .. link_dir(k - 1) .. ' at iteration ' .. 2 * (k - 1), out, 1, true)
        -- another layout: the RNG streams do not carry over, and the note says so once
        local notes = 0
        for _ in out:gmatch('checkpoint: loaded [^\n]*not restored: the RNG state') do notes = notes + 1 end
        assert.are.equal(1, notes, name .. ': the not-restored note\n' .. out)
      end
      local d = json.decode(pio.read_file(string.format('%s/iter_%07d/layout.json', link_dir(k), 2 * k)))
      assert.are.same(sizes, { d.tp, d.pp, d.cp, d.dp, d.virtual_stages, d.distributed_optimizer }, name .. ': layout.json')
    end
  end)

  it('every layout\'s checkpoint loads in one process with the weights, logits and greedy tokens of one process', function()
    local args = { ref_dir }
    for k in ipairs(LINKS) do args = with(args, { 'link' .. k, link_dir(k), tostring(2 * k) }) end
    local out = run_ok(1, shell.root .. '/spec/dist/layouts_worker.lua', args)
    for k, link in ipairs(LINKS) do
      local id, name = 'link' .. k, link[2]
      local weights = mpi.rows(out, 'WEIGHTS', id)[1]
      assert.is_not_nil(weights, name .. ': no WEIGHTS line\n' .. out)
      -- 4 layers of 6 (two norms, QKV, projection, fc1, fc2), the embedding and the final norm
      assert.are.equal('26', weights[1], name .. ': parameters compared')
      assert.is_true(tonumber(weights[2]) <= 1e-4, name .. ': weights differ from one process by ' .. weights[2])
      local logits = mpi.rows(out, 'LOGITS', id)[1]
      assert.is_true(tonumber(logits[1]) <= 1e-3, name .. ': logits differ from one process by ' .. logits[1])
      local tokens = {}
      for _, row in ipairs(mpi.rows(out, 'TOKENS', id)) do tokens[row[1]] = table.concat(row, ' ', 2) end
      assert.is_not_nil(tokens.ref)
      assert.are.equal(tokens.ref, tokens.run, name .. ': greedy tokens')
    end
  end)

  it('recipes/generate.lua and recipes/sft.lua (fine-tuning and resuming) take a parallel run\'s checkpoint', function()
    local parallel = link_dir(LAST_PARALLEL)
    local ref_at = scratch .. '/ref_at'   -- the reference at the same iteration, as its own checkpoint directory
    pio.mkdir_p(ref_at)
    local iteration = string.format('iter_%07d', 2 * LAST_PARALLEL)
    assert.are.equal(0, os.execute('cp -r ' .. shell.quote(ref_dir .. '/' .. iteration) .. ' ' .. shell.quote(ref_at)))
    shell.write_file(ref_at .. '/latest_checkpointed_iteration.txt', 2 * LAST_PARALLEL .. '\n')

    local function generate(dir)
      return run_ok(1, shell.root .. '/recipes/generate.lua', { '--load', dir, '--prompt', 'the cat ', '--max-new-tokens', '24',
        '--repetition-penalty', '100' })
    end
    assert.are.equal(generate(ref_at), generate(parallel))

    local data = scratch .. '/chats.jsonl'
    shell.write_file(data, table.concat({
      '{"instruction": "Say hello.", "input": "", "output": "Hello there!"}',
      '{"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]}',
      '{"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}',
    }, '\n') .. '\n')
    local function sft(args)
      return losses(run_ok(1, shell.root .. '/recipes/sft.lua', with({ '--data-path', data, '--chat-template', 'chatml',
        '--seq-length', '64', '--micro-batch-size', '1', '--global-batch-size', '1', '--log-interval', '1', '--lr', '1e-2',
        '--lr-decay-style', 'constant' }, args)))
    end
    local want = sft({ '--load', ref_at, '--train-iters', '4' })
    local first = sft({ '--load', parallel, '--train-iters', '2', '--save', scratch .. '/sft' })
    local resumed = sft({ '--load', scratch .. '/sft', '--train-iters', '4' })
    for it = 1, 4 do
      local got = it <= 2 and first[it] or resumed[it]
      assert.is_not_nil(got, 'sft iteration ' .. it)
      assert_close(want[it], got, 'sft iteration ' .. it)
    end
    assert.is_nil(resumed[2], 'the resumed sft run starts after iteration 2')
  end)

  it('a layout description that is missing or disagrees with the rank directories is an error naming it', function()
    local copies = 0
    local function copy(k)
      copies = copies + 1
      local dir = scratch .. '/broken' .. copies
      assert.are.equal(0, os.execute('cp -r ' .. shell.quote(link_dir(k)) .. ' ' .. shell.quote(dir)))
      return dir, string.format('%s/iter_%07d', dir, 2 * k)
    end
    local function load_error(dir)
      local ok, err = pcall(pmp.checkpoint.load_model, dir)
      assert.is_false(ok, dir .. ' loaded')
      return tostring(err)
    end

    local dir, root = copy(2)   -- TP=2: mp_rank_00 and mp_rank_01
    pio.remove(root .. '/layout.json')
    assert.are.equal('checkpoint: ' .. root .. '/layout.json is missing (the description of the parallel layout that ' ..
      'every save writes next to the rank directories)', load_error(dir))

    dir, root = copy(2)
    pio.remove_tree(root .. '/mp_rank_01')
    assert.are.equal('checkpoint: ' .. root .. '/mp_rank_01 is missing (layout.json lists it: tp=2 pp=1)', load_error(dir))

    dir, root = copy(1)   -- DP=2: mp_rank_00 only
    assert.are.equal(0, os.execute('cp -r ' .. shell.quote(root .. '/mp_rank_00') .. ' ' .. shell.quote(root .. '/mp_rank_01')))
    assert.are.equal('checkpoint: ' .. root .. '/mp_rank_01 is not in layout.json (tp=1 pp=1)', load_error(dir))

    dir, root = copy(4)   -- PP=2: the description claims a tensor the stage's file does not hold
    local d = json.decode(pio.read_file(root .. '/layout.json'))
    local listed = d.ranks.mp_rank_00_001.tensors
    listed['model.decoder.layers.9.mlp.linear_fc2.weight'] = listed['model.decoder.layers.0.mlp.linear_fc2.weight']
    shell.write_file(root .. '/layout.json', json.encode(d))
    assert.are.equal('checkpoint: ' .. root .. '/mp_rank_00_001/model_optim_rng.safetensors lacks ' ..
      'model.decoder.layers.9.mlp.linear_fc2.weight (layout.json lists it)', load_error(dir))

    d.ranks.mp_rank_00_001 = nil
    shell.write_file(root .. '/layout.json', json.encode(d))
    assert.are.equal('checkpoint: ' .. root .. '/layout.json does not list rank directory mp_rank_00_001 (tp=1 pp=2)',
      load_error(dir))

    d.pp = 3
    shell.write_file(root .. '/layout.json', json.encode(d))
    assert.are.equal('checkpoint: ' .. root .. '/layout.json lists 2 stages for pp=3', load_error(dir))
  end)
end)
