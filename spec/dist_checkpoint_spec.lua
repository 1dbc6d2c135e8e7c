require 'busted.runner'()
-- Checkpoints of parallel layouts (lua/pmp/checkpoint): a tiny GPTModel and its AdamW state saved with
-- TP=2 PP=2 under mpirun, in Megatron's per-rank directories, load bit-identically into TP=2 PP=2,
-- TP=1 PP=1 (one process, and DP=4 with the distributed optimizer), TP=2 PP=1 and TP=1 PP=2; so do the
-- distributed optimizer's per-replica pieces, a checkpoint of one process, and one in the format
-- single-process saves had before the layout description (optimizer state by position). Every loaded
-- tensor is compared by the worker (spec/dist/checkpoint_worker.lua) with the reference's tensor cut
-- for the rank by pmp.dist.sharding. A killed or failed save never becomes the latest, and broken
-- checkpoints are errors that name the file at fault.
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'
local pio = require 'pmp.io'
local json = require 'pmp.json'

local worker = shell.root .. '/spec/dist/checkpoint_worker.lua'

-- Tensors compared per part: each parameter, and with the optimizer its exp_avg, exp_avg_sq and step,
-- plus the learning rate. The model has 42 parameters: the embedding, 4 layers of 10 (norms, QKV and
-- MLP weights and biases), the final norm. Stage 0 of 2 holds the embedding and 2 layers (21), stage 1
-- two layers, the final norm and its copy of the tied embedding (22).
local WHOLE, STAGE = 42, { [0] = 21, [1] = 22 }
local function with_optimizer(n) return 4 * n + 1 end

local function run(np, args)
  local out, err, status
  if np == 1 then
    local quoted = { shell.quote(shell.pmp), shell.quote(worker) }
    for _, a in ipairs(args) do quoted[#quoted + 1] = shell.quote(a) end
    out, err, status = shell.run(table.concat(quoted, ' '))
  else
    out, err, status = mpi.run(np, worker, args, { PMP_DIST_TIMEOUT = '30' })
  end
  return out, err, status
end

local function run_ok(np, args)
  local out, err, status = run(np, args)
  assert.are.equal(0, status, err .. out)
  return out
end

local words = mpi.words

-- The KEY lines of one case, by rank: rank -> the words after case and rank.
local function by_rank(out, key, case)
  local found = {}
  for _, rest in ipairs(mpi.lines(out, key)) do
    local w = words(rest)
    if w[1] == case then found[tonumber(w[2])] = { unpack(w, 3) } end
  end
  return found
end

-- Every rank of a case compared `expected(rank)` tensors, all identical, and reports iteration etc.
local function assert_case(out, case, ranks, expected, iteration, resharded)
  local checks, infos = by_rank(out, 'CHECK', case), by_rank(out, 'INFO', case)
  for rank = 0, ranks - 1 do
    local c = checks[rank]
    assert.is_not_nil(c, string.format('%s: no CHECK line from rank %d\n%s', case, rank, out))
    assert.are.equal(expected(rank), tonumber(c[1]), string.format('%s rank %d: tensors compared', case, rank))
    assert.are.equal(0, tonumber(c[2]), string.format('%s rank %d: mismatches\n%s', case, rank, out))
    local info = infos[rank]
    assert.are.same({ tostring(iteration), '4242', tostring(resharded) }, info, case .. ' rank ' .. rank .. ': INFO')
  end
end

local function read_json(path) return json.decode(pio.read_file(path)) end

describe('pmp.checkpoint in parallel layouts', function()
  local scratch, A, G, ONE, OLD

  setup(function()
    scratch = shell.temp_dir()
    A, G, ONE, OLD = scratch .. '/A', scratch .. '/G', scratch .. '/one', scratch .. '/old'
  end)
  teardown(function() shell.remove_dir(scratch) end)

  it('saves TP=2 PP=2 in per-rank directories and loads it back, RNG streams included', function()
    local out = run_ok(4, { 'save_load', A, G })
    assert.are.equal('5\n', pio.read_file(A .. '/latest_checkpointed_iteration.txt'))
    local iter = A .. '/iter_0000005'
    local listing = pio.listdir(iter)
    table.sort(listing)
    assert.are.same({ 'layout.json', 'mp_rank_00_000', 'mp_rank_00_001', 'mp_rank_01_000', 'mp_rank_01_001' }, listing)
    for _, d in ipairs({ unpack(listing, 2) }) do
      local files = pio.listdir(iter .. '/' .. d)
      table.sort(files)
      assert.are.same({ 'model_optim_rng.json', 'model_optim_rng.safetensors' }, files)
    end
    local info = read_json(iter .. '/mp_rank_01_001/model_optim_rng.json')
    local layout = read_json(iter .. '/layout.json')
    assert.are.same({ 2, 2, 1, 1, 1, 1, false }, { layout.tp, layout.pp, layout.dp, layout.cp, info.tp_rank,
      info.pp_rank, layout.distributed_optimizer })
    assert.are.same({ { first = 0, count = 2 }, { first = 2, count = 2 } }, layout.stages)
    assert.are.equal(4, layout.model_config.num_layers)
    assert.are.equal(4242, info.state.consumed_samples)
    -- the description lists each rank directory's tensors and each parameter's whole shape and place
    assert.are.same({ 1, 1 }, { layout.ranks.mp_rank_01_001.tp_rank, layout.ranks.mp_rank_01_001.pp_rank })
    assert.are.same({ 32, 32 }, layout.ranks.mp_rank_01_001.tensors['model.output_layer.weight'].shape)
    assert.are.same({ shape = { 2 * 64, 32 }, tp_dim = 1, stage = 1,
      key = 'model.decoder.layers.1.mlp.linear_fc1.weight' }, layout.params['decoder.layers.3.mlp.linear_fc1.weight'])
    -- stage 1 numbers its layers from 0 and keeps the tied embedding's copy as output_layer.weight
    local names = pmp.safetensors.inspect(iter .. '/mp_rank_01_001/model_optim_rng.safetensors').tensors
    assert.is_not_nil(names['model.decoder.layers.1.mlp.linear_fc2.weight'])
    assert.is_nil(names['model.decoder.layers.2.mlp.linear_fc2.weight'])
    assert.are.same({ 64 / 2, 32 }, names['model.output_layer.weight'].shape)
    assert.are.same({ 64 / 2, 32 }, names['optimizer.output_layer.weight.exp_avg'].shape)

    assert_case(out, 'A', 4, function(rank) return with_optimizer(STAGE[math.floor(rank / 2)]) end, 5, false)
    -- RNG A rank saved|loaded words...: each rank gets back its own stream
    local rng = { saved = {}, loaded = {} }
    for _, line in ipairs(mpi.lines(out, 'RNG')) do
      local w = words(line)
      rng[w[3]][tonumber(w[2])] = table.concat(w, ' ', 4)
    end
    for rank = 0, 3 do
      assert.is_not_nil(rng.saved[rank], 'rank ' .. rank .. ' printed its RNG state')
      assert.are.equal(rng.saved[rank], rng.loaded[rank], 'rank ' .. rank .. ' RNG restored')
    end
    assert.are_not.equal(rng.saved[0], rng.saved[1])

    -- DP=4 with the distributed optimizer: loads A, and its own checkpoint has one piece per replica
    assert_case(out, 'A-dp4', 4, function() return with_optimizer(WHOLE) end, 5, true)
    assert_case(out, 'G-dp4', 4, function() return with_optimizer(WHOLE) end, 6, false)
    local files = pio.listdir(G .. '/iter_0000006/mp_rank_00')
    table.sort(files)
    assert.are.same({ 'distrib_optim_000.safetensors', 'distrib_optim_001.safetensors', 'distrib_optim_002.safetensors',
      'distrib_optim_003.safetensors', 'model_optim_rng.json', 'model_optim_rng.safetensors' }, files)
    local g = read_json(G .. '/iter_0000006/layout.json')
    assert.are.same({ 1, 1, 4, true, 4 }, { g.tp, g.pp, g.dp, g.distributed_optimizer, g.optimizer_shards })
  end)

  it('loads TP=2 PP=2 and the distributed optimizer pieces into one process (TP=1 PP=1)', function()
    local out = run_ok(1, { 'single', A, G, ONE, OLD })
    assert_case(out, 'A-single', 1, function() return with_optimizer(WHOLE) end, 5, true)
    assert_case(out, 'G-single', 1, function() return with_optimizer(WHOLE) end, 6, true)
    assert.is_true(pio.is_file(ONE .. '/iter_0000007/mp_rank_00/model_optim_rng.safetensors'))
    assert.is_true(pio.is_file(ONE .. '/iter_0000007/layout.json'))
    -- an earlier single-process checkpoint: its optimizer state by position maps onto one process's AdamW
    assert_case(out, 'OLD-single', 1, function() return with_optimizer(WHOLE) end, 8, false)
    assert_case(out, 'OLD-load_model', 1, function() return WHOLE end, 8, false)
  end)

  it('reshards into TP=2 PP=1 and TP=1 PP=2, from TP=2 PP=2, DP=4, one process and an earlier one-process save', function()
    local out = run_ok(2, { 'reshard', A, G, ONE, OLD })
    for name, iteration in pairs({ A = 5, G = 6, ONE = 7 }) do
      assert_case(out, name .. '-tp2pp1', 2, function() return with_optimizer(WHOLE) end, iteration, true)
      assert_case(out, name .. '-tp1pp2', 2, function(rank) return with_optimizer(STAGE[rank]) end, iteration, true)
    end
    -- the earlier one-process format: the model; its optimizer state (by position) is reported not restored
    assert_case(out, 'OLD-tp2pp1', 2, function() return WHOLE end, 8, true)
    assert_case(out, 'OLD-tp1pp2', 2, function(rank) return STAGE[rank] end, 8, true)
    for _, case in ipairs({ 'OLD-tp2pp1', 'OLD-tp1pp2' }) do
      local reported = by_rank(out, 'NOT_RESTORED', case)
      for rank = 0, 1 do
        local text = table.concat(reported[rank] or {}, ' ')
        assert.matches('the optimizer state %(an earlier single%-process checkpoint stores it by position', text, 1)
        assert.matches('the RNG state of each rank', text, 1)
      end
    end
    -- printed once per load (by rank 0): 6 resharded loads of A, G, ONE, 2 of OLD, 2 of OLD with the optimizer
    local printed = 0
    for _ in out:gmatch('checkpoint: loaded [^\n]*not restored') do printed = printed + 1 end
    assert.are.equal(10, printed)
  end)

  it('a save killed midway, or failing on one rank, leaves the previous checkpoint the latest', function()
    local killed = scratch .. '/killed'
    local out, err, status = run(4, { 'kill', killed })
    assert.are_not.equal(0, status)
    assert.are.same({}, mpi.lines(out, 'SAVED'))
    assert.are.equal('1\n', pio.read_file(killed .. '/latest_checkpointed_iteration.txt'))
    assert.is_false(pio.exists(killed .. '/iter_0000002'), err)
    local partial = 0
    for _, name in ipairs(pio.listdir(killed)) do
      if name:match('^iter_0000002%.tmp%.') then partial = partial + 1 end
    end
    assert.are.equal(1, partial, 'the killed save stays in its temporary directory')
    out = run_ok(1, { 'load_error', killed, '1', '1' })
    assert.are.same({ 'none' }, mpi.lines(out, 'ERROR'))

    local failed = scratch .. '/failed'
    out = run_ok(2, { 'fail_save', failed })
    local errors = mpi.lines(out, 'ERROR')
    table.sort(errors)
    assert.are.same({
      'checkpoint.save: ' .. failed .. '/iter_0000002: rank 1 could not write its files (see its error)',
      'checkpoint.save: ' .. failed .. '/iter_0000002: rank 1: no space left on device',
    }, errors)
    assert.are.equal('1\n', pio.read_file(failed .. '/latest_checkpointed_iteration.txt'))
    assert.are.same({ 'iter_0000001', 'latest_checkpointed_iteration.txt' }, (function()
      local l = pio.listdir(failed)
      table.sort(l)
      return l
    end)())
  end)

  it('missing and mismatched shards are errors naming the file', function()
    local function load_error(np, dir, tp, pp, what)
      return mpi.lines(run_ok(np, { 'load_error', dir, tostring(tp), tostring(pp), what }), 'ERROR')
    end
    local function copy(from, to) assert.are.equal(0, os.execute('cp -r ' .. shell.quote(from) .. ' ' .. shell.quote(to))) end

    local missing = scratch .. '/missing'
    copy(A, missing)
    local gone = missing .. '/iter_0000005/mp_rank_01_001/model_optim_rng.safetensors'
    pio.remove(gone)
    local message = 'checkpoint: ' .. gone .. ' is missing (layout.json lists it)'
    assert.are.same({ message }, load_error(1, missing, 1, 1))
    -- on two ranks each checks the directory against its description
    assert.are.same({ message, message }, load_error(2, missing, 2, 1))

    local swapped = scratch .. '/swapped'
    copy(A, swapped)
    local wrong = swapped .. '/iter_0000005/mp_rank_01_000/model_optim_rng.json'
    copy(swapped .. '/iter_0000005/mp_rank_00_000/model_optim_rng.json', wrong)
    local layout_path = swapped .. '/iter_0000005/layout.json'
    local description = json.decode(pio.read_file(layout_path))
    local recorded = description.checksums['mp_rank_01_000/model_optim_rng.json']
    assert.are.same({ 'checkpoint: ' .. wrong .. ' is corrupted: its checksum is ' .. pio.checksum(wrong) ..
      ', but layout.json recorded ' .. recorded .. ' when it was saved' }, load_error(1, swapped, 1, 1))
    -- as a saver that wrote the wrong file would have recorded it: the place it records is checked too
    description.checksums['mp_rank_01_000/model_optim_rng.json'] = pio.checksum(wrong)
    shell.write_file(layout_path, json.encode(description))
    assert.are.same({ 'checkpoint: ' .. wrong .. ' records tp_rank 0 pp_rank 0, but its directory holds tp_rank 1 ' ..
      'pp_rank 0 of tp=2 pp=2' }, load_error(1, swapped, 1, 1))

    local pieces = scratch .. '/pieces'
    copy(G, pieces)
    local piece = pieces .. '/iter_0000006/mp_rank_00/distrib_optim_002.safetensors'
    pio.remove(piece)
    assert.are.same({ 'checkpoint: ' .. piece .. ' is missing (layout.json lists it)' },
      load_error(1, pieces, 1, 1, 'optimizer'))

    assert.are.same({ 'checkpoint: model.decoder.layers.0.mlp.linear_fc1.bias is [128] in the checkpoint but ' ..
      '[192] in the model (saved as decoder.layers.0.mlp.linear_fc1.bias in ' .. A ..
      '/iter_0000005/mp_rank_00_000 and its other tp ranks)' }, load_error(1, A, 1, 1, 'wide'))
    assert.are.same({ 'checkpoint: no latest_checkpointed_iteration.txt in ' .. scratch .. '/nothing' },
      load_error(1, scratch .. '/nothing', 1, 1))
  end)
end)
