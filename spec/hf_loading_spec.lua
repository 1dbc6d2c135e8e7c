require 'busted.runner'()
-- Loading and saving Hugging Face models at size (pmp.models.loading, save_pretrained): no random init
-- thrown away, zero-copy loads that give the same logits and never write to the file, loads and saves
-- whose engine memory stays at the model plus about one tensor. Values come from the transformers
-- fixtures (spec/fixtures/hf, tools/make_hf_fixtures.py) and from the files' own bytes.
local C = require('pmp.ffi').C
local pio = require 'pmp.io'
local st = require 'pmp.safetensors'
local models = require 'pmp.models'
local tensor = require 'pmp.tensor'

local ROOT = package.loaded['pmp.root'] or '.'
local FIXTURES = ROOT .. '/spec/fixtures/hf'
local NAMES = { 'llama', 'llama3_bias_tied', 'mistral', 'qwen2_tied', 'qwen3' }
local fails_with = require('spec.support.expect').fails_with
local shell = require 'spec.support.shell'

local same_bits = require('spec.support.expect').same_bits

local function ids() return tensor.tensor({ { 1, 5, 9, 2, 7, 3 }, { 4, 4, 8, 0, 6, 1 } }, { dtype = 'i64' }) end

local tmp
before_each(function()
  tmp = string.format('%s/pmp_hf_loading_spec.%d.%d', os.getenv('TMPDIR') or '/tmp', pio.getpid(), math.random(1e9))
  pio.mkdir_p(tmp)
end)
after_each(function()
  collectgarbage()
  pio.remove_tree(tmp)
end)

-- A GQA Llama of the given dtype saved by pmp into dir, big enough that its weights dominate memory.
local function saved_llama(dir, dtype, options)
  local model = models.from_config({
    model_type = 'llama', hidden_size = 128, intermediate_size = 320, num_hidden_layers = 2,
    num_attention_heads = 4, num_key_value_heads = 2, vocab_size = 1024, rms_norm_eps = 1e-5,
    max_position_embeddings = 64, tie_word_embeddings = false,
  }, { dtype = dtype })
  model:save_pretrained(dir, options)
  return model
end

local function bytes_of(model)
  local n = 0
  for _, p in ipairs(model:parameters()) do n = n + p:numel() * p:element_size() end
  return n
end

describe('HF loading without thrown-away work', function()
  it('builds a model with init = false without drawing random numbers, and a loaded model keeps init', function()
    local config = { num_layers = 2, hidden_size = 32, num_attention_heads = 4, vocab_size = 50 }
    tensor.manual_seed(7)
    local want = tensor.randn(4)
    tensor.manual_seed(7)
    pmp.nn.GPTModel(config)
    assert.is_false(same_bits(want, tensor.randn(4)), 'a random init draws from the generator')
    tensor.manual_seed(7)
    config.init = false
    pmp.nn.GPTModel(config)
    assert.is_true(same_bits(want, tensor.randn(4)), 'init = false must not draw from the generator')
    assert.is_nil(models.from_pretrained(FIXTURES .. '/llama').config.init)
  end)

  it('holds no more engine memory than the model while loading, with dtype conversion', function()
    saved_llama(tmp .. '/f32', 'f32')
    for _, dtype in ipairs({ 'f32', 'bf16' }) do
      collectgarbage()
      pmp.memory.reset_peak()
      local before = pmp.memory.stats().in_use
      local model = models.from_pretrained(tmp .. '/f32', { dtype = dtype })
      local extra = pmp.memory.stats().peak - before
      local own = bytes_of(model)
      assert(extra <= own * 1.05, string.format('%s: peak %d bytes over a model of %d', dtype, extra, own))
    end
    assert.are.equal(0, C.pmp_mapping_live_count(), 'a copying load leaves no file mapped')
  end)

  it('converts bf16 files to f32 models and back exactly', function()
    local model = saved_llama(tmp .. '/bf16', 'bf16')
    local wide = models.from_pretrained(tmp .. '/bf16', { dtype = 'f32' })
    local narrow = models.from_pretrained(tmp .. '/bf16')
    assert.are.equal('bf16', narrow.config.dtype)
    local want, wide_sd, narrow_sd = model:state_dict(), wide:state_dict(), narrow:state_dict()
    for name, t in pairs(want) do
      assert(same_bits(t, narrow_sd[name]), name .. ' differs after a bf16 -> bf16 load')
      assert(same_bits(t:to('f32'), wide_sd[name]), name .. ' differs after a bf16 -> f32 load')
    end
  end)
end)

describe('HF zero-copy loading (mmap = true)', function()
  it('gives the same logits as a copying load for every family, and keeps the files mapped meanwhile', function()
    for _, name in ipairs(NAMES) do
      collectgarbage()
      local before = C.pmp_mapping_live_count()
      local copied = models.from_pretrained(FIXTURES .. '/' .. name)
      local mapped = models.from_pretrained(FIXTURES .. '/' .. name, { mmap = true })
      assert(C.pmp_mapping_live_count() > before, name .. ': a zero-copy model maps its file')
      assert(same_bits(copied(ids()), mapped(ids())), name .. ': logits differ')
      mapped = nil
      collectgarbage()
      assert.are.equal(before, C.pmp_mapping_live_count(), name .. ': the file stays mapped after the model went')
    end
  end)

  it('copies only what the layout forces: qkv packed per query group (gate and up lie back to back)', function()
    local dir = tmp .. '/model'
    saved_llama(dir, 'bf16')
    collectgarbage()
    local before = pmp.memory.stats().in_use
    local model = models.from_pretrained(dir, { mmap = true })
    collectgarbage()
    -- what the engine's allocator holds for n bytes: rounded up to 512 B (below 1 MiB)
    local function held(t) return math.ceil(t:numel() * t:element_size() / 512) * 512 end
    local copied = held(model.rotary_pos_emb.inv_freq)
    for _, pair in ipairs(model:named_parameters()) do
      if pair[1]:find('linear_qkv', 1, true) then copied = copied + held(pair[2]) end
    end
    assert.are.equal(copied, pmp.memory.stats().in_use - before)
    local copy = models.from_pretrained(dir)
    assert(same_bits(copy(ids()), model(ids())))
  end)

  it('trains after a zero-copy load without writing to the file', function()
    local dir = tmp .. '/model'
    saved_llama(dir, 'f32')
    local file = dir .. '/model.safetensors'
    local bytes = pio.read_file(file)
    local model = models.from_pretrained(dir, { mmap = true })
    local embedding = model.embedding.word_embeddings.weight
    local original = embedding:clone()
    local opt = pmp.optim.AdamW(model:parameters(), { lr = 1e-2 })
    for _ = 1, 2 do
      opt:zero_grad()
      model(ids(), ids()):backward()
      opt:step()
    end
    assert.is_false(same_bits(original, embedding), 'the step changed the mapped embedding')
    assert.is_true(pio.read_file(file) == bytes, 'training wrote into the mapped file')
    assert(same_bits(original, models.from_pretrained(dir).embedding.word_embeddings.weight))
  end)
end)

describe('HF saving', function()
  it('writes tensor by tensor: engine memory grows by at most one converted tensor', function()
    local model = saved_llama(tmp .. '/f32', 'f32')
    local largest = 0
    for _, p in ipairs(model:parameters()) do largest = math.max(largest, p:numel() * p:element_size()) end
    pmp.memory.set_gc_step(16 * 1024)
    local ok, err = pcall(function()
      collectgarbage()
      pmp.memory.reset_peak()
      local before = pmp.memory.stats().in_use
      model:save_pretrained(tmp .. '/bf16', { dtype = 'bf16', max_shard_size = '200KB' })
      local extra = pmp.memory.stats().peak - before
      -- all converted at once would be half the model's f32 bytes
      assert(extra <= largest, string.format('save peak %d bytes; the largest tensor has %d', extra, largest))
      assert(extra < bytes_of(model) / 2)
    end)
    pmp.memory.set_gc_step(256 * 1024 * 1024)
    assert(ok, err)
    assert(pio.is_file(tmp .. '/bf16/model.safetensors.index.json'))
    local reloaded = models.from_pretrained(tmp .. '/bf16', { dtype = 'f32' }):state_dict()
    for name, t in pairs(model:state_dict()) do
      assert(same_bits(t:to('bf16'):to('f32'), reloaded[name]), name .. ' differs after a bf16 save')
    end
  end)
end)

describe('safetensors.deferred', function()
  it('writes the same bytes as the tensors themselves, making each only when written', function()
    local a, b = tensor.randn(3, 4), tensor.arange(6):to('bf16'):view(2, 3)
    st.save(tmp .. '/eager.safetensors', { a = a, b = b })
    local made = {}
    st.save(tmp .. '/deferred.safetensors', {
      a = st.deferred('f32', { 3, 4 }, function() made[#made + 1] = 'a' return a end),
      b = st.deferred('bf16', { 2, 3 }, function() made[#made + 1] = 'b' return b:t() end),
    })
    assert.are.same({ 'a', 'b' }, made)
    local eager = pio.read_file(tmp .. '/eager.safetensors')
    assert.is_true(eager ~= pio.read_file(tmp .. '/deferred.safetensors'), 'b:t() writes its elements row-major')
    st.save(tmp .. '/deferred.safetensors', {
      a = st.deferred('f32', { 3, 4 }, function() return a end),
      b = st.deferred('bf16', { 2, 3 }, function() return b end),
    })
    assert.is_true(eager == pio.read_file(tmp .. '/deferred.safetensors'))
    -- converted on the way: as if the tensor had been converted first
    st.save(tmp .. '/eager.safetensors', { a = a:to('bf16'), b = b:to('f32') })
    st.save(tmp .. '/deferred.safetensors', {
      a = st.deferred('bf16', { 3, 4 }, function() return a end),
      b = st.deferred('f32', { 2, 3 }, function() return b end),
    })
    assert.is_true(pio.read_file(tmp .. '/eager.safetensors') == pio.read_file(tmp .. '/deferred.safetensors'))
  end)

  it('rejects a tensor that does not match its header entry, leaving the old file', function()
    local path = tmp .. '/x.safetensors'
    st.save(path, { a = tensor.ones(2) })
    local old = pio.read_file(path)
    fails_with(function()
      st.save(path, { a = st.deferred('f32', { 3 }, function() return tensor.ones(2) end) })
    end, path, "deferred tensor 'a' produced f32 [2], not f32 [3]")
    fails_with(function()
      st.save(path, { a = st.deferred('f32', { 2 }, function() return tensor.ones(2, { dtype = 'i64' }) end) })
    end, "deferred tensor 'a' produced i64 [2], not f32 [2]")
    assert.is_true(old == pio.read_file(path))
    fails_with(function() st.deferred('q8', { 2 }, function() end) end, "dtype 'q8' has no safetensors form")
  end)
end)

describe('files that change while mapped', function()
  it('end the process with a message naming the file when a mapped file is truncated (SIGBUS)', function()
    local file = tmp .. '/weights.safetensors'
    local script = tmp .. '/truncate.lua'
    shell.write_file(script, string.format([[
      local st = require 'pmp.safetensors'
      st.save(%q, { a = pmp.ones(65536) })
      local a = st.load(%q).a
      assert(a:sum():item() == 65536)
      io.open(%q, 'w'):close()   -- truncated in place while mapped
      print('sum after truncation', a:sum():item())
    ]], file, file, file))
    -- not the last command of its shell, so that shell (whose stderr is captured) reports the signal; under
    -- make sanitize the fault this child is meant to die of is left to the default action, not reported by ASan
    local out, err, status = shell.run('ASAN_OPTIONS="${ASAN_OPTIONS:-}:handle_sigbus=0" ' .. shell.quote(shell.pmp) .. ' ' ..
      shell.quote(script) .. '; exit $?')
    assert.are_not.equal(0, status)
    assert.is_nil(out:find('sum after truncation', 1, true), 'the lost pages were read as if nothing happened')
    assert.truthy(err:find('pmp: fatal: ' .. file .. ' shrank while memory-mapped', 1, true), err)
  end)

  it('are refused by name when a file no longer matches the header read at the start of a load', function()
    local dir = tmp .. '/model'
    saved_llama(dir, 'f32')
    local catalog = require('pmp.models.loading').catalog(dir)
    local path = dir .. '/model.safetensors'
    local tensors = st.load(path, { copy = true })
    tensors['model.norm.weight'] = tensor.ones(128, { dtype = 'bf16' })
    st.save(path, tensors)
    local family = models.family('llama')
    local model = pmp.nn.GPTModel(models.config_from_hf(require('pmp.json').read(dir .. '/config.json')))
    fails_with(function()
      require('pmp.models.loading').fill(model, family, models.expand_mapping(family, model.config), catalog, {}, 'load ' .. dir)
    end, 'load ' .. dir, path .. ' changed while loading: model.norm.weight is bf16 [128], its header said f32 [128]')
  end)
end)
