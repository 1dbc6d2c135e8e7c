require 'busted.runner'()
-- The LayerNorm-era families (models/opt.lua, gpt_bigcode.lua, starcoder2.lua, falcon.lua) against tiny
-- random checkpoints that transformers wrote (tools/make_zoo_ln_fixtures.py -> spec/fixtures/zoo_ln/):
-- logits on a left-padded batch and greedy generation equal transformers', save_pretrained writes what
-- transformers reads back (checked by transformers itself under PMP_HF_CHECK=1), recipes/sft.lua and
-- recipes/generate.lua take each family's directory, and configs or files a family cannot honour are
-- errors naming the key or tensor.
local json = require 'pmp.json'
local pio = require 'pmp.io'
local st = require 'pmp.safetensors'
local models = require 'pmp.models'
local tensor = require 'pmp.tensor'
local shell = require 'spec.support.shell'
local expect = require 'spec.support.expect'

local ROOT = package.loaded['pmp.root'] or '.'
local FIXTURES = ROOT .. '/spec/fixtures/zoo_ln'
local NAMES = { 'opt', 'opt_post', 'opt_proj', 'gpt_bigcode', 'gpt_bigcode_mha', 'starcoder2', 'falcon', 'falcon_new', 'falcon_seq',
  'falcon_alibi' }

local tmp = shell.temp_dir()
teardown(function() shell.remove_dir(tmp) end)

local reference_fixture = require 'spec.support.reference_fixture'

local function reference(name)
  local dir = FIXTURES .. '/' .. name
  local ref = reference_fixture.read(dir)
  -- what pmp.generate gives a left-padded batch: positions counted from each row's first real token
  -- and the index of that token (the first key a row may attend to)
  local positions, first_key, prompts = {}, {}, {}
  for b, row in ipairs(ref.attention_mask) do
    positions[b], prompts[b] = {}, {}
    local seen = 0
    for t, keep in ipairs(row) do
      if keep == 1 and seen == 0 then first_key[b] = t - 1 end
      positions[b][t] = keep == 1 and seen or 0
      if keep == 1 then
        seen = seen + 1
        prompts[b][#prompts[b] + 1] = ref.input_ids[b][t]
      end
    end
  end
  ref.options = { positions = tensor.tensor(positions, { dtype = 'i64' }), first_key = tensor.tensor(first_key, { dtype = 'i64' }) }
  ref.mask = tensor.tensor(ref.attention_mask, { dtype = 'f32' }):unsqueeze(3)
  ref.prompts = prompts
  return ref, dir
end

-- The largest difference from transformers' logits over the positions the attention mask keeps.
local function logits_error(model, ref)
  local logits = pmp.no_grad(function() return model(ref.ids, nil, ref.options) end)
  assert.are.same(ref.logits.shape, logits.shape)
  return ((logits - ref.logits) * ref.mask):abs():max():item()
end

local function copy_dir(from, to)
  pio.mkdir_p(to)
  for _, name in ipairs(pio.listdir(from)) do pio.write_atomic(to .. '/' .. name, pio.read_file(from .. '/' .. name)) end
  return to
end

local function edited(name, fn)
  local dir = copy_dir(FIXTURES .. '/' .. name, string.format('%s/%s_%d', tmp, name, math.random(1e9)))
  local cfg = json.read(dir .. '/config.json')
  fn(cfg)
  pio.write_atomic(dir .. '/config.json', json.encode(cfg, { indent = 2 }))
  return dir
end

for _, name in ipairs(NAMES) do
  describe('zoo ' .. name, function()
    local ref, dir = reference(name)
    local model = models.from_pretrained(dir)

    it('gives transformers\' logits within 1e-4 on a left-padded batch', function()
      local diff = logits_error(model, ref)
      assert(diff < 1e-4, string.format('max |logits - transformers| = %g', diff))
    end)

    it('generates transformers\' greedy tokens (KV cache, left padding)', function()
      local out = pmp.generate(model, ref.prompts, { max_new_tokens = #ref.greedy[1] })
      for b, want in ipairs(ref.greedy) do assert.are.same(want, out[b].tokens, 'row ' .. b) end
    end)

    it('save_pretrained writes transformers\' tensors and config, and reloads to the same logits', function()
      local out = tmp .. '/saved_' .. name
      model:save_pretrained(out)
      assert.are.same(json.read(dir .. '/config.json'), json.read(out .. '/config.json'))
      local want, got = st.load(dir .. '/model.safetensors'), st.load(out .. '/model.safetensors')
      for hf_name, t in pairs(want) do
        local g = got[hf_name]
        assert(g ~= nil, 'missing ' .. hf_name)
        -- OPT's position table: the two rows before position 0 only ever serve padding; pmp writes zeros
        if hf_name:match('embed_positions') then t, g = t:narrow(1, 3, t:size(1) - 2), g:narrow(1, 3, g:size(1) - 2) end
        assert(expect.same_bits(t, g), hf_name .. ' differs')
      end
      for hf_name in pairs(got) do assert(want[hf_name] ~= nil, 'unexpected ' .. hf_name) end
      local again = models.from_pretrained(out)
      assert(logits_error(again, ref) < 1e-4)
    end)

    it('writes a config from the model config alone that reloads to the same logits', function()
      local plain = pmp.nn.GPTModel(model.config)
      plain:load_state_dict(model:state_dict())
      local out = tmp .. '/rendered/' .. name
      plain:save_pretrained(out, { model_type = model.hf.model_type })
      local again = models.from_pretrained(out)
      assert(logits_error(again, ref) < 1e-4)
    end)
  end)
end

-- With transformers importable (PMP_HF_CHECK=1), transformers itself loads what save_pretrained wrote:
-- the files of models loaded from HF and those written from a model config alone.
local check = os.getenv('PMP_HF_CHECK') == '1'
local hf_test = check and it or pending
describe('zoo exports', function()
  hf_test('load in transformers to the reference logits (PMP_HF_CHECK=1)', function()
    for _, kind in ipairs({ 'loaded', 'rendered' }) do
      for _, name in ipairs(NAMES) do
        local model = models.from_pretrained(FIXTURES .. '/' .. name)
        local out = string.format('%s/check_%s/%s', tmp, kind, name)
        if kind == 'loaded' then
          model:save_pretrained(out)
        else
          local plain = pmp.nn.GPTModel(model.config)
          plain:load_state_dict(model:state_dict())
          plain:save_pretrained(out, { model_type = model.hf.model_type })
        end
      end
      local out, err, status = shell.run(string.format('python3 %s/tools/make_zoo_ln_fixtures.py --out %s --verify-export %s',
        shell.quote(ROOT), shell.quote(FIXTURES), shell.quote(tmp .. '/check_' .. kind)))
      assert.are.equal(0, status, kind .. ': ' .. out .. err)
    end
  end)
end)

describe('zoo configs a family cannot honour', function()
  local fails_with = expect.fails_with
  it('name the key: activation, post-norm options, rope type, layouts', function()
    fails_with(function() models.from_pretrained(edited('opt', function(c) c.activation_function = 'swishy' end)) end,
      "activation_function 'swishy' is not supported", 'config.json')
    fails_with(function() models.from_pretrained(edited('opt', function(c) c.layer_norm_elementwise_affine = false end)) end,
      'layer_norm_elementwise_affine')
    fails_with(function() models.from_pretrained(edited('gpt_bigcode', function(c) c.scale_attn_weights = false end)) end,
      'scale_attn_weights')
    fails_with(function() models.from_pretrained(edited('falcon', function(c)
      c.rope_parameters = { rope_type = 'yarn', rope_theta = 10000, factor = 2 } end)) end, "rope type 'yarn' is not supported")
    fails_with(function() models.from_pretrained(edited('falcon', function(c) c.num_ln_in_parallel_attn = 2 end)) end,
      'num_ln_in_parallel_attn 2 needs new_decoder_architecture')
    fails_with(function() models.from_pretrained(edited('starcoder2', function(c) c.hidden_act = 'silu' end)) end,
      "hidden_act 'silu' is not supported")
    fails_with(function() models.from_pretrained(edited('starcoder2', function(c) c.mlp_type = 'gated' end)) end,
      "mlp_type 'gated' is not supported")
  end)

  it('refuse ALiBi slopes Falcon cannot express, naming alibi_slope_scale', function()
    local config = models.from_pretrained(FIXTURES .. '/falcon_alibi').config
    local unscaled = {}
    for k, v in pairs(config) do unscaled[k] = v end
    unscaled.alibi_slope_scale = nil   -- BLOOM's slopes
    fails_with(function() pmp.nn.GPTModel(unscaled):save_pretrained(tmp .. '/unscaled', { model_type = 'falcon' }) end,
      'alibi_slope_scale')
    fails_with(function() pmp.nn.GPTModel({ num_layers = 1, hidden_size = 8, num_attention_heads = 2, vocab_size = 10,
      alibi_slope_scale = 0.5 }) end, "alibi_slope_scale must be a positive number and needs position_embedding_type 'alibi'")
  end)

  it('refuse a word_embedding_size GPTModel cannot honour, naming the key', function()
    fails_with(function() pmp.nn.GPTModel({ num_layers = 1, hidden_size = 8, num_attention_heads = 2, vocab_size = 10,
      word_embedding_size = 2.5 }) end, 'word_embedding_size must be a positive integer, got 2.5')
    fails_with(function() pmp.nn.GPTModel({ num_layers = 1, hidden_size = 8, num_attention_heads = 2, vocab_size = 10,
      word_embedding_size = 4, word_embeddings_layernorm = true }) end,
      'word_embeddings_layernorm cannot be combined with a word_embedding_size')
    fails_with(function() models.from_pretrained(edited('opt_proj', function(c) c.word_embed_proj_dim = 0 end)) end,
      "key 'word_embed_proj_dim' must be a positive integer", 'config.json')
  end)

  it('name a missing tensor', function()
    local dir = copy_dir(FIXTURES .. '/falcon_new', tmp .. '/falcon_missing')
    local tensors = st.load(dir .. '/model.safetensors')
    tensors['transformer.h.1.ln_mlp.bias'] = nil
    st.save(dir .. '/model.safetensors', tensors)
    fails_with(function() models.from_pretrained(dir) end, 'missing weights: transformer.h.1.ln_mlp.bias')
    dir = copy_dir(FIXTURES .. '/opt_proj', tmp .. '/opt_proj_missing')
    tensors = st.load(dir .. '/model.safetensors')
    tensors['model.decoder.project_out.weight'] = nil
    st.save(dir .. '/model.safetensors', tensors)
    fails_with(function() models.from_pretrained(dir) end, 'missing weights: model.decoder.project_out.weight')
  end)

  it('refuse positions beyond the learned table', function()
    local model = models.from_pretrained(FIXTURES .. '/gpt_bigcode')
    fails_with(function() model(tensor.zeros({ 1, 65 }, { dtype = 'i64' })) end, 'position 64 is outside max_position_embeddings 64')
  end)
end)

local function model_type_of(name) return json.read(FIXTURES .. '/' .. name .. '/config.json').model_type end

-- A character-level BPE tokenizer (no merges) whose ids fit the fixtures' vocabulary of 150.
local function write_char_tokenizer(dir)
  local vocab = { ['<unk>'] = 0 }
  local chars = 'abcdefghijklmnopqrstuvwxyz '
  for k = 1, #chars do vocab[chars:sub(k, k)] = k + 2 end
  pio.write_atomic(dir .. '/tokenizer.json', json.encode({ version = '1.0', added_tokens = json.array({}),
    model = { type = 'BPE', vocab = vocab, merges = json.array({}), unk_token = '<unk>' } }))
end

-- The tokenizer plus a short chat template (the fixtures' position tables hold 64 positions).
local function write_chat_tokenizer(dir)
  write_char_tokenizer(dir)
  pio.write_atomic(dir .. '/tokenizer_config.json', json.encode({ chat_template =
    "{% for m in messages %}{{ m.role[0] }}{{ m.content }} {% endfor %}{% if add_generation_prompt %}a{% endif %}" }))
end

describe('recipes/sft.lua --load', function()
  it('fine-tunes a checkpoint of every family and writes one that loads', function()
    local data = tmp .. '/chats.jsonl'
    local lines = {}
    for k = 1, 4 do
      lines[k] = json.encode({ messages = { { role = 'user', content = 'say hi' }, { role = 'assistant', content = 'hi there' } } })
    end
    pio.write_atomic(data, table.concat(lines, '\n') .. '\n')
    for _, name in ipairs(NAMES) do
      local dir = copy_dir(FIXTURES .. '/' .. name, tmp .. '/sft_' .. name)
      write_chat_tokenizer(dir)
      local out, err, status = shell.run_pmp({ ROOT .. '/recipes/sft.lua', '--load', dir, '--data-path', data,
        '--train-iters', '1', '--global-batch-size', '4', '--seq-length', '32', '--log-interval', '1', '--lr', '1e-3',
        '--save-hf', dir .. '/tuned' })
      assert.are.equal(0, status, name .. ': ' .. err)
      local loss = tonumber(out:match('lm loss: (%S+) |'))
      assert(loss and loss > 1 and loss < 10, name .. ': ' .. out)
      local tuned = models.from_pretrained(dir .. '/tuned')
      assert.are.equal(model_type_of(name), tuned.hf.model_type)
    end
  end)
end)

describe('recipes/generate.lua --load', function()
  it('generates from a checkpoint of every family, as pmp.generate does', function()
    for _, name in ipairs(NAMES) do
      local dir = copy_dir(FIXTURES .. '/' .. name, tmp .. '/generate_' .. name)
      write_char_tokenizer(dir)
      local out, err, status = shell.run_pmp({ ROOT .. '/recipes/generate.lua', '--load', dir, '--prompt', 'the cat',
        '--max-new-tokens', '5' })
      assert.are.equal(0, status, name .. ': ' .. err)
      local model, tok = models.from_pretrained(dir), pmp.tokenizer.from_pretrained(dir)
      local want = pmp.generate(model, { tok:encode('the cat') }, { max_new_tokens = 5, tokenizer = tok })[1].text
      assert.is_truthy(out:find('the cat' .. want, 1, true), name .. ': ' .. out)
    end
  end)
end)

-- Falcon-RW with 32 heads over 330 positions, where transformers' bf16 rounding of the ALiBi biases
-- (alibi_bias_hf_falcon_bf16) shows in the logits.
describe('zoo falcon_alibi_long', function()
  local ref, dir = reference('falcon_alibi_long')
  local model = models.from_pretrained(dir)
  it('gives transformers\' logits within 1e-4 on a long left-padded batch', function()
    local diff = logits_error(model, ref)
    assert(diff < 1e-4, string.format('max |logits - transformers| = %g', diff))
  end)
  it('generates transformers\' greedy tokens (KV cache past 300 positions)', function()
    local out = pmp.generate(model, ref.prompts, { max_new_tokens = #ref.greedy[1] })
    for b, want in ipairs(ref.greedy) do assert.are.same(want, out[b].tokens, 'row ' .. b) end
  end)
end)
