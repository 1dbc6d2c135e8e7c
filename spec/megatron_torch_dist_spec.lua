require 'busted.runner'()
-- Megatron-Core's torch_dist checkpoints: Megatron-Core's own (spec/fixtures/megatron_torch_dist, written on
-- the CPU by tools/make_torch_dist_fixtures.sh with Megatron-Core's logits of a fixed batch; layers stacked
-- under one key, or each under its own) read to the same logits whatever layout wrote them; damaged ones refused naming the file and tensor; pmp's writer
-- read back bit-identical, and through tools/checkpoint/convert.lua. With PMP_MEGATRON_CHECK=1
-- Megatron-Core itself loads what pmp wrote (tools/megatron_reference.py read --format torch_dist) into
-- several layouts and must give the reference logits.
local shell = require 'spec.support.shell'
local megatron = require 'pmp.checkpoint.megatron'
local P = require 'pmp.checkpoint.torch_pickle'

local ROOT = package.loaded['pmp.root']
local FIXTURES = ROOT .. '/spec/fixtures/megatron_torch_dist'
local LEGACY = ROOT .. '/spec/fixtures/megatron'
local LAYOUTS = { 'tp1_pp1', 'tp2_pp2', 'per_layer_tp1_pp2' }

local function reference(name) return pmp.json.decode(pmp.io.read_file(FIXTURES .. '/' .. name .. '/reference.json')) end

local function max_logit_difference(model, ref)
  local got = pmp.no_grad(function() return model(pmp.tensor(ref.ids, { dtype = 'i64' })) end):double():totable()
  local worst = 0
  for i = 1, #ref.logits do
    for j = 1, #ref.logits[i] do
      for k = 1, #ref.logits[i][j] do worst = math.max(worst, math.abs(ref.logits[i][j][k] - got[i][j][k])) end
    end
  end
  return worst
end

local function fails_with(fn, ...)
  local ok, err = pcall(fn)
  assert(not ok, 'expected an error')
  for _, pattern in ipairs({ ... }) do
    assert(tostring(err):find(pattern, 1, true), 'error "' .. tostring(err) .. '" does not contain "' .. pattern .. '"')
  end
end

local function copy_fixture(dir, name)
  os.execute(string.format('cp -r %s %s', shell.quote(FIXTURES .. '/' .. name), shell.quote(dir .. '/' .. name)))
  return dir .. '/' .. name
end

describe("Megatron-Core's torch_dist checkpoints", function()
  local dir
  setup(function() dir = shell.temp_dir() end)
  teardown(function() shell.remove_dir(dir) end)

  it("read in every layout give Megatron-Core's logits, without placeholders", function()
    for _, name in ipairs(LAYOUTS) do
      local ref = reference(name)
      local model, ckpt = megatron.load_model(FIXTURES .. '/' .. name, { true_vocab_size = ref.vocab_size })
      assert.are.equal('torch_dist', ckpt.format)
      assert.are.equal(5, ckpt.iteration)
      assert.are.equal(5, ckpt.saved_iteration)
      assert.are.same({}, ckpt.report)
      local diff = max_logit_difference(model, ref)
      assert(diff < 1e-5, string.format('%s: logits differ from Megatron-Core by %.3g', name, diff))
    end
  end)

  it("hold the weights Megatron-Core's legacy checkpoint of the same model holds, under the same names", function()
    -- tools/megatron_reference.py seeds the same weights for both formats in the same layout
    for dist_name, legacy_name in pairs({ tp2_pp2 = 'tp2_pp2', per_layer_tp1_pp2 = 'tp1_pp2' }) do
      local legacy = megatron.open(LEGACY .. '/' .. legacy_name)
      local dist = megatron.open(FIXTURES .. '/' .. dist_name)
      assert.are.same(legacy.names, dist.names)
      for _, name in ipairs(legacy.names) do
        assert.are.same(legacy:shape(name), dist:shape(name), name)
        assert((legacy:tensor(name):double() - dist:tensor(name):double()):abs():max():item() == 0, name .. ' differs')
      end
    end
  end)

  it('take the model config from common.pt', function()
    local c = megatron.open(FIXTURES .. '/tp2_pp2', { true_vocab_size = 100 }).config
    assert.are.same({ 4, 32, 48, 4, 2, 8, 100, 128, 'RMSNorm', 'swiglu', false },
      { c.num_layers, c.hidden_size, c.ffn_hidden_size, c.num_attention_heads, c.num_query_groups, c.kv_channels,
        c.vocab_size, c.padded_vocab_size, c.normalization, c.activation, c.tie_embeddings })
  end)

  it('refuse damaged, truncated or incomplete ones naming the file and tensor', function()
    local ckpt = copy_fixture(dir, 'tp1_pp1')
    local root = ckpt .. '/iter_0000005'
    local opened = megatron.open(ckpt)
    local t = opened.tensors['decoder.layers.mlp.linear_fc2.weight']
    local chunk = t.chunks[3]   -- layer 2's
    local path = root .. '/' .. chunk.storage.path
    opened = nil
    collectgarbage()   -- unmapped before the files change
    local bytes = pmp.io.read_file(path)
    -- a flipped byte near the end of the chunk's archive lands in its tensor's bytes... or its zip
    -- records; either way the error names the file and the chunk
    local at = chunk.storage.offset + 1200
    shell.write_file(path, bytes:sub(1, at - 1) .. string.char((bytes:byte(at) + 1) % 256) .. bytes:sub(at + 1))
    fails_with(function() megatron.open(ckpt):tensor('decoder.layers.2.mlp.linear_fc2.weight') end,
      path, 'decoder.layers.mlp.linear_fc2.weight chunk at (2,0,0)', 'is corrupted: CRC-32')
    -- the other layers still read
    megatron.open(ckpt):tensor('decoder.layers.1.mlp.linear_fc2.weight')

    shell.write_file(path, bytes:sub(1, chunk.storage.offset + 100))
    fails_with(function() megatron.load_model(ckpt) end, path, 'the file is truncated')

    os.remove(path)
    fails_with(function() megatron.load_model(ckpt) end, path .. ' is missing')
    shell.write_file(path, bytes)

    -- a chunk left out of the metadata: the tensor's chunks no longer cover it
    local metadata_path = root .. '/.metadata'
    local original = pmp.io.read_file(metadata_path)
    local metadata = P.load(original)
    table.remove(metadata.fields.state_dict_metadata['decoder.layers.mlp.linear_fc2.weight'].fields.chunks, 2)
    shell.write_file(metadata_path, P.dump(metadata))
    fails_with(function() megatron.open(ckpt) end, metadata_path, 'decoder.layers.mlp.linear_fc2.weight',
      'its chunks cover 4608 of its 6144 elements (a chunk is missing)')

    -- a chunk whose bytes the metadata does not place
    metadata = P.load(original)
    for _, index in ipairs(P.keys(metadata.fields.storage_data)) do
      if index.fields.fqn == 'decoder.final_layernorm.weight' then metadata.fields.storage_data[index] = nil end
    end
    shell.write_file(metadata_path, P.dump(metadata))
    fails_with(function() megatron.open(ckpt) end, 'decoder.final_layernorm.weight: no stored bytes for its chunk at (0)')

    shell.write_file(root .. '/metadata.json', '{"sharded_backend": "zarr"}')
    fails_with(function() megatron.open(ckpt) end, "sharded_backend 'zarr' is not supported")
  end)

  it("skip the optimizer's state that Megatron-LM saves beside the weights", function()
    local ckpt = copy_fixture(dir, 'tp2_pp2')
    local metadata_path = ckpt .. '/iter_0000005/.metadata'
    local metadata = P.load(pmp.io.read_file(metadata_path))
    local state, storage = metadata.fields.state_dict_metadata, metadata.fields.storage_data
    -- an exp_avg of the final norm, stored where the norm's bytes are
    local key = 'optimizer.state.exp_avg.decoder.final_layernorm.weight'
    P.set(state, key, state['decoder.final_layernorm.weight'])
    for _, index in ipairs(P.keys(storage)) do
      if index.fields.fqn == 'decoder.final_layernorm.weight' then
        P.set(storage, P.record(index.class, { fqn = key, offset = index.fields.offset, index = P.None }), storage[index])
      end
    end
    shell.write_file(metadata_path, P.dump(metadata))
    local ref = reference('tp2_pp2')
    local model, opened = megatron.load_model(ckpt, { true_vocab_size = ref.vocab_size })
    assert.is_not_nil(opened.tensors[key])
    for _, name in ipairs(opened.names) do assert.is_nil(name:match('optimizer'), name) end
    assert(max_logit_difference(model, ref) < 1e-5)
  end)

  it("read a pickle's other globals as inert placeholders, never calling them", function()
    -- a .metadata naming os.system where a dataclass should be
    local value, report = P.load('\128\2cos\nsystem\nX\2\0\0\0idq\0\133R.')
    assert.are.equal('Placeholder', P.kind_of(value))
    assert.are.same({ ['os.system'] = 1 }, report)
    -- an allow-listed dataclass is data only: called with arguments it is refused
    local call = '\128\2ctorch.distributed.checkpoint.metadata\nMetadata\nX\1\0\0\0x\133\129.'
    fails_with(function() P.load(call) end, 'called with arguments')
  end)
end)

describe('pmp writing torch_dist', function()
  local dir
  setup(function() dir = shell.temp_dir() end)
  teardown(function() shell.remove_dir(dir) end)

  it('reads back bit-identical with either layer spec', function()
    local model = megatron.load_model(FIXTURES .. '/tp1_pp1', { true_vocab_size = 100 })
    for _, impl in ipairs({ 'local', 'transformer_engine' }) do
      local out = dir .. '/dist_' .. impl
      megatron.save_model(out, model, { format = 'torch_dist', tp = 2, pp = 2, transformer_impl = impl })
      assert.is_true(pmp.io.is_file(out .. '/release/.metadata'))
      local back, ckpt = megatron.load_model(out)
      assert.are.equal('torch_dist', ckpt.format)
      assert.are.equal(100, ckpt.config.vocab_size)
      local a, b = model:state_dict(), back:state_dict()
      for name, t in pairs(a) do
        assert((t:double() - b[name]:double()):abs():max():item() == 0, impl .. ': ' .. name .. ' differs')
      end
      for name in pairs(b) do assert(a[name], 'unexpected ' .. name) end
    end
  end)

  it('through tools/checkpoint/convert.lua, from torch_dist to torch_dist and to the legacy format', function()
    local function convert(args)
      local words = { ROOT .. '/tools/checkpoint/convert.lua' }
      for _, a in ipairs(args) do words[#words + 1] = a end
      return shell.run_pmp(words)
    end
    local out, err, status = convert({ '--loader', 'mcore', '--saver', 'mcore', '--load-dir', FIXTURES .. '/tp2_pp2',
      '--save-dir', dir .. '/conv_dist', '--megatron-format', 'torch_dist', '--true-vocab-size', '100',
      '--make-vocab-size-divisible-by', '32', '--check-logits' })
    assert.are.equal(0, status, err)
    assert.matches('max |logit difference| 0\n', out, 1, true)
    assert.is_true(pmp.io.is_file(dir .. '/conv_dist/release/.metadata'))
    out, err, status = convert({ '--loader', 'mcore', '--saver', 'mcore', '--load-dir', dir .. '/conv_dist',
      '--save-dir', dir .. '/conv_legacy', '--target-tensor-parallel-size', '2', '--make-vocab-size-divisible-by', '32',
      '--check-logits' })
    assert.are.equal(0, status, err)
    assert.matches('max |logit difference| 0\n', out, 1, true)
    assert.is_true(pmp.io.is_file(dir .. '/conv_legacy/release/mp_rank_01/model_optim_rng.pt'))
  end)

  local check = os.getenv('PMP_MEGATRON_CHECK') == '1'
  local test = check and it or pending
  test('loads in Megatron-Core, into several layouts, to its reference logits (PMP_MEGATRON_CHECK=1)', function()
    local ref = reference('tp1_pp1')
    local model = megatron.load_model(FIXTURES .. '/tp1_pp1', { true_vocab_size = ref.vocab_size })
    local out = dir .. '/for_megatron'
    megatron.save_model(out, model, { format = 'torch_dist' })
    for _, layout in ipairs({ { 1, 1 }, { 2, 1 }, { 2, 2 } }) do
      local tp, pp = layout[1], layout[2]
      local cmd = string.format('cd %s && torchrun --nproc-per-node %d tools/megatron_reference.py read %s --tp %d ' ..
        '--pp %d --format torch_dist 2>&1', shell.quote(ROOT), tp * pp, shell.quote(out), tp, pp)
      local p = io.popen(cmd)
      local text = p:read('*a')
      assert(p:close(), text)
      local json = text:match('(%{"ids".-%}%s*)\n') or text:match('(%{"ids".*%})')
      assert(json, 'no logits in the output of ' .. cmd .. ':\n' .. text)
      local got = pmp.json.decode(json)
      local worst = 0
      for i = 1, #ref.logits do
        for j = 1, #ref.logits[i] do
          for k = 1, #ref.logits[i][j] do worst = math.max(worst, math.abs(ref.logits[i][j][k] - got.logits[i][j][k])) end
        end
      end
      assert(worst < 1e-5, string.format('tp%d pp%d: Megatron-Core logits differ by %.3g', tp, pp, worst))
    end
  end)
end)

describe('recipes/pretrain.lua --load with a torch_dist checkpoint', function()
  local dir
  setup(function() dir = shell.temp_dir() end)
  teardown(function() shell.remove_dir(dir) end)
  local TINY = { '--num-layers', '2', '--hidden-size', '32', '--num-attention-heads', '4', '--num-query-groups', '2',
    '--seq-length', '16', '--micro-batch-size', '4', '--global-batch-size', '8', '--log-interval', '1',
    '--eval-interval', '3', '--eval-iters', '1', '--sample-length', '0', '--lr-warmup-iters', '1' }
  local function pretrain(extra)
    local words = { ROOT .. '/recipes/pretrain.lua' }
    for _, a in ipairs(TINY) do words[#words + 1] = a end
    for _, a in ipairs(extra) do words[#words + 1] = a end
    return shell.run_pmp(words)
  end

  it('continues from its weights and iteration', function()
    local _, err, status = pretrain({ '--train-iters', '1', '--save', dir .. '/pmp' })
    assert.are.equal(0, status, err)
    local trained = pmp.checkpoint.load_model(dir .. '/pmp')
    megatron.save_model(dir .. '/dist', trained, { iteration = 1, format = 'torch_dist' })
    -- a step at learning rate 0 leaves every weight as loaded
    local out
    out, err, status = pretrain({ '--train-iters', '2', '--load', dir .. '/dist', '--save', dir .. '/next', '--lr', '0',
      '--min-lr', '0' })
    assert.are.equal(0, status, err)
    assert.matches('loaded Megatron-LM checkpoint from ' .. dir .. '/dist at iteration 1', out, 1, true)
    local next_model = pmp.checkpoint.load_model(dir .. '/next')
    local a, b = trained:state_dict(), next_model:state_dict()
    for name, t in pairs(a) do
      assert((t:double() - b[name]:double()):abs():max():item() == 0, name .. ' changed')
    end
  end)
end)
