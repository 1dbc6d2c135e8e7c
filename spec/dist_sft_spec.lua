require 'busted.runner'()
-- recipes/sft.lua under mpirun fine-tunes a Hugging Face model on packed chat data to the losses one
-- process logs, whatever the layout, and its --save-hf (the parts gathered on rank 0) is the file one
-- process writes. The single-process run is the reference.
local shell = require 'spec.support.shell'
local mpi = require 'spec.support.mpi'
local tiny_hf = require 'spec.support.tiny_hf'

local WORDS = { 'red', 'blue', 'green', 'cat', 'dog', 'sun', 'moon', 'tree', 'river', 'stone' }

-- A 4-layer Qwen3-shaped model with Qwen3's tokenizer. Its weights are scaled up from the usual
-- initialization so that attention (and with it the per-document masks and positions of packed rows)
-- changes the loss visibly from the first step: at the usual scale every logit is near 0.
local function write_base(dir)
  local tok = pmp.tokenizer.from_pretrained(tiny_hf.TOKENIZER)
  local hf = pmp.json.decode(pmp.io.read_file(shell.root .. '/spec/fixtures/hf/qwen3/config.json'))
  hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.intermediate_size = tok.vocab_size, 16, 4, 32
  hf.head_dim, hf.num_attention_heads, hf.num_key_value_heads = 8, 2, 2
  hf.tie_word_embeddings = true
  pmp.manual_seed(7)
  local model = pmp.models.from_config(hf)
  for name, t in pairs(model:state_dict()) do
    if not name:find('norm') then t:detach():copy_(t:detach() * 10) end
  end
  model:save_pretrained(dir)
  for _, name in ipairs({ 'tokenizer.json', 'tokenizer_config.json' }) do
    shell.write_file(dir .. '/' .. name, pmp.io.read_file(tiny_hf.TOKENIZER .. '/' .. name))
  end
end

-- Conversations of 1 to 4 user words and 1 to 5 answer words (16 to 23 tokens), two per 48-token row.
local function write_chats(path)
  local lines = {}
  for k = 1, 24 do
    local question, answer = {}, {}
    for j = 1, 1 + k % 4 do question[j] = WORDS[(k * j) % 10 + 1] end
    for j = 1, 1 + (k * 3) % 5 do answer[j] = WORDS[(k + j * 7) % 10 + 1] end
    lines[k] = pmp.json.encode({ messages = { { role = 'user', content = table.concat(question, ' ') },
      { role = 'assistant', content = table.concat(answer, ' ') } } })
  end
  shell.write_file(path, table.concat(lines, '\n') .. '\n')
end

local losses = require('spec.support.train_log').losses

-- A PEFT adapter for the model in base_dir with random A and B: rank 4 on every linear layer.
local function write_adapter(base_dir, dir)
  local peft = require 'pmp.models.peft'
  local model = pmp.models.from_pretrained(base_dir)
  peft.apply(model, { rank = 4, alpha = 8, targets = 'all-linear' })
  pmp.manual_seed(11)
  pmp.no_grad(function()
    for _, e in ipairs(model.lora.entries) do
      for _, slot in ipairs({ 'A', 'B' }) do
        local t = e.adapter[slot]
        t:copy_(pmp.randn(t.shape) * 0.5)
      end
    end
  end)
  peft.save(model, dir, { base = base_dir })
end

-- Two PEFT directories hold the same config and tensors of the same names and shapes, equal within
-- 1e-4 (1% of one AdamW step at --lr 1e-2: Adam amplifies the rounding of another summation order).
local function assert_same_adapters(want_dir, got_dir, label)
  assert.are.same(pmp.json.read(want_dir .. '/adapter_config.json'), pmp.json.read(got_dir .. '/adapter_config.json'))
  local want = pmp.safetensors.load(want_dir .. '/adapter_model.safetensors')
  local got = pmp.safetensors.load(got_dir .. '/adapter_model.safetensors')
  local count = 0
  for key, t in pairs(want) do
    count = count + 1
    assert.is_not_nil(got[key], label .. ': no ' .. key)
    assert.are.same(t.shape, got[key].shape, key)
    local diff = (t:double() - got[key]:double()):abs():max():item()
    assert.is_true(diff <= 1e-4, string.format('%s: %s differs by %g', label, key, diff))
  end
  for key in pairs(got) do assert.is_not_nil(want[key], label .. ': extra ' .. key) end
  assert.are.equal(4 * 7 * 2, count)
end

-- The losses a parallel run logged (by iteration) are those of one process within 1e-5 (relative).
local function assert_same_losses(want, got, label)
  for iteration, loss in pairs(want) do
    assert.is_not_nil(got[iteration], string.format('%s: no loss logged for iteration %d', label, iteration))
    assert.is_true(math.abs(got[iteration] - loss) <= 1e-5 * math.abs(loss), string.format(
      '%s: the loss of iteration %d is %.7g, one process logged %.7g', label, iteration, got[iteration], loss))
  end
  for iteration in pairs(got) do assert.is_not_nil(want[iteration], label .. ': extra iteration ' .. iteration) end
end

describe('recipes/sft.lua under mpirun', function()
  if not tiny_hf.available() then
    it('needs the Qwen3 tokenizer in ../shared/tokenizers/qwen3', function() end)
    return
  end
  local dir, common
  local function run(np, extra)
    local args = {}
    for _, a in ipairs(common) do args[#args + 1] = a end
    for _, a in ipairs(extra) do args[#args + 1] = a end
    if np == 1 then
      table.insert(args, 1, shell.root .. '/recipes/sft.lua')
      return shell.run_pmp(args)
    end
    return mpi.run(np, shell.root .. '/recipes/sft.lua', args)
  end

  -- A LoRA run of two steps (of --train-iters 3, so that a resume has a third); lists of flags follow.
  local function run_lora(np, load, ...)
    local args = { '--load', load, '--save-interval', '2', '--exit-interval', '2' }
    for _, list in ipairs({ ... }) do
      for _, a in ipairs(list) do args[#args + 1] = a end
    end
    local out, err, status = run(np, args)
    assert.are.equal(0, status, err)
    return losses(out)
  end

  local reference
  setup(function()
    dir = shell.temp_dir()
    write_base(dir .. '/base')
    write_chats(dir .. '/chat.jsonl')
    common = { '--load', dir .. '/base', '--data-path', dir .. '/chat.jsonl', '--packing', '--seq-length', '48',
      '--micro-batch-size', '1', '--global-batch-size', '4', '--train-iters', '3', '--log-interval', '1', '--lr', '1e-2' }
    local out, err, status = run(1, {})
    assert.are.equal(0, status, err)
    reference = losses(out)
    assert.is_not_nil(reference[3], out)
  end)
  teardown(function() if dir then shell.remove_dir(dir) end end)

  local layouts = {
    { 4, 'TP=2 with sequence parallel x DP=2 with the distributed optimizer', { '--tensor-model-parallel-size', '2',
      '--sequence-parallel', '--use-distributed-optimizer' } },
    { 4, 'PP=2 with 2 virtual stages x CP=2, gradients reduced after backward', { '--pipeline-model-parallel-size', '2',
      '--num-layers-per-virtual-pipeline-stage', '1', '--context-parallel-size', '2', '--overlap-grad-reduce=false' } },
  }
  for _, case in ipairs(layouts) do
    local np, name, flags = case[1], case[2], case[3]
    it('logs the single-process losses: ' .. name, function()
      local out, err, status = run(np, flags)
      assert.are.equal(0, status, err)
      assert_same_losses(reference, losses(out), name)
    end)
  end

  -- At --lr 0 the weights cannot differ by rounding: what is compared is how the parts are joined and
  -- written.
  it('writes --save-hf from TP=2 x PP=2 equal bit for bit to one process', function()
    local frozen = { '--lr', '0', '--train-iters', '1', '--recompute-granularity', 'full' }
    local out, err, status = run(1, { '--save-hf', dir .. '/one', unpack(frozen) })
    assert.are.equal(0, status, err)
    local want = losses(out)
    assert.is_not_nil(want[1], out)
    out, err, status = run(4, { '--save-hf', dir .. '/four', '--tensor-model-parallel-size', '2',
      '--pipeline-model-parallel-size', '2', unpack(frozen) })
    assert.are.equal(0, status, err)
    assert_same_losses(want, losses(out), 'TP=2 x PP=2')
    for _, name in ipairs({ 'model.safetensors', 'config.json', 'tokenizer.json', 'tokenizer_config.json' }) do
      assert.is_true(pmp.io.read_file(dir .. '/one/' .. name) == pmp.io.read_file(dir .. '/four/' .. name), name)
    end
    assert.is_false(pmp.io.exists(dir .. '/four.parts'), 'the gathered parts are removed')
  end)

  -- LoRA: every rank puts the adapters on its part of the split model. Fresh adapters (--lora-rank)
  -- train two steps and stop with a checkpoint, which another layout resumes for the third step.
  it('trains LoRA on PP=2 (2 virtual stages) x TP=2, resumes it on TP=2 with sequence parallel x DP=2: ' ..
    "one process's losses, and --save-lora writes one process's adapter", function()
    local fresh = { '--lora-rank', '4', '--lora-alpha', '8' }
    local want = run_lora(1, dir .. '/base', fresh, { '--save', dir .. '/ck1', '--save-lora', dir .. '/one2' })
    for iteration, loss in pairs(run_lora(1, dir .. '/ck1', { '--save-lora', dir .. '/one3' })) do want[iteration] = loss end
    assert.is_not_nil(want[3])
    local got = run_lora(4, dir .. '/base', fresh, { '--save', dir .. '/ck4', '--save-lora', dir .. '/four2',
      '--pipeline-model-parallel-size', '2', '--num-layers-per-virtual-pipeline-stage', '1', '--tensor-model-parallel-size', '2' })
    assert_same_adapters(dir .. '/one2', dir .. '/four2', 'PP=2 x TP=2')
    for iteration, loss in pairs(run_lora(4, dir .. '/ck4', { '--save-lora', dir .. '/four3', '--tensor-model-parallel-size',
      '2', '--sequence-parallel', '--use-distributed-optimizer' })) do
      got[iteration] = loss
    end
    assert_same_losses(want, got, 'LoRA')
    assert_same_adapters(dir .. '/one3', dir .. '/four3', 'TP=2 x DP=2')
  end)

  -- An adapter with random A and B (B is zero in a fresh one, which would hide how B is split); the
  -- merged models are gathered from the layout's parts.
  it("starts LoRA from --load-lora on PP=2 x TP=2 with the losses of one process, and --merge-lora --save-hf writes one process's model", function()
    write_adapter(dir .. '/base', dir .. '/start')
    local load = { '--load-lora', dir .. '/start', '--merge-lora' }
    local want = run_lora(1, dir .. '/base', load, { '--save-hf', dir .. '/merged1' })
    assert.is_not_nil(want[2])
    assert_same_losses(want, run_lora(4, dir .. '/base', load, { '--save-hf', dir .. '/merged4', '--pipeline-model-parallel-size',
      '2', '--tensor-model-parallel-size', '2' }), 'LoRA from --load-lora')
    local one = pmp.safetensors.load(dir .. '/merged1/model.safetensors')
    local four = pmp.safetensors.load(dir .. '/merged4/model.safetensors')
    for key, t in pairs(one) do
      assert.is_not_nil(four[key], key)
      local diff = (t:double() - four[key]:double()):abs():max():item()
      assert.is_true(diff <= 1e-4, string.format('%s differs by %g', key, diff))
    end
    for key in pairs(four) do assert.is_not_nil(one[key], 'extra ' .. key) end
  end)
end)
