require 'busted.runner'()
-- pmp.train's pieces on one process: flag sets, layout checks, micro-batch order, the step's loss
-- scaling and clipping against whole-batch and closed-form references, the log line format with a
-- stopped clock, checkpoint cadence, and the epoch order.
local train = pmp.train
local shell = require 'spec.support.shell'

describe('pmp.train.flags', function()
  it('merges sets in order, a later spec of a flag replacing the earlier one where it stood', function()
    local specs = train.flags.merge({ { { '--a', 1, 'a' }, { '--b', 2, 'b' } }, { { '--c', 3, 'c' }, { '--a', 9, 'a again' } } })
    assert.are.same({ { '--a', 9, 'a again' }, { '--b', 2, 'b' }, { '--c', 3, 'c' } }, specs)
    local opts = train.flags.parse({ '--adam-beta1', '0.8' }, { train.flags.optimizer, { { '--lr', 0.5, 'peak' } } })
    assert.are.equal(0.5, opts.lr)
    assert.are.equal(0.8, opts.adam_beta1)
    assert.are.equal(1e-8, opts.adam_eps)
    assert.has_error(function() train.flags.parse({ '--b', '5' }, { train.flags.optimizer }) end,
      "unknown argument '--b' (see --help)")
  end)

  it('keeps the bounds of a replaced spec unless the new one sets its own', function()
    local sets = { { { '--a', 1, 'a', integer = true, min = 1 } }, { { '--a', 4, 'a, another default' } } }
    assert.are.same({ { '--a', 4, 'a, another default', integer = true, min = 1 } }, train.flags.merge(sets))
    assert.has_error(function() train.flags.parse({ '--a', '0' }, sets) end, '--a must be >= 1, got 0')
    local own = { '--a', 4, 'a, any value', min = -1 }
    assert.are.equal(own, train.flags.merge({ sets[1], { own } })[1])
    assert.are.equal(0.5, train.flags.parse({ '--a', '0.5' }, { sets[1], { own } }).a)
  end)
end)

describe('pmp.train.parallel.init on one process', function()
  local function opts(changes)
    local o = train.flags.parse({}, { train.flags.model, train.flags.training, train.flags.parallel })
    o.micro_batch_size, o.global_batch_size = 2, 8
    for k, v in pairs(changes or {}) do o[k] = v end
    return o
  end

  it('gives the layout with the micro batches per step, and turns sequence parallelism off at TP=1', function()
    local o = opts({ sequence_parallel = true })
    local layout = train.parallel.init(o)
    assert.are.equal(1, layout.world)
    assert.are.equal(4, layout.accumulation)
    assert.are.equal(1, layout.virtual)
    assert.is_true(layout.is_logger)
    assert.is_false(o.sequence_parallel)
    assert.is_nil(train.parallel.describe(o, layout))
  end)

  it('names the flags that do not fit together, in one line without a position', function()
    assert.has_error(function() train.parallel.init(opts({ global_batch_size = 7 })) end,
      '--global-batch-size 7 is not a multiple of --micro-batch-size 2 x data-parallel size 1')
    assert.has_error(function() train.parallel.init(opts({ num_layers_per_virtual_pipeline_stage = 1 })) end,
      '--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1')
    assert.has_error(function() train.parallel.init(opts({ tensor_model_parallel_size = 2 })) end,
      'the world of 1 processes is not divisible by tp (2) x pp (1) x cp (1)')
  end)
end)

describe('pmp.train.data.micro_batches', function()
  it("reads Megatron's order: micro step k of data-parallel rank r at first + (k dp + r) micro_batch_size", function()
    pmp.dist.init()
    local starts = {}
    local dataset = { count = 20 }
    function dataset:batch(start, n)
      starts[#starts + 1] = start
      return pmp.zeros({ n, 4 }, { dtype = 'i64' }), pmp.ones({ n, 4 }, { dtype = 'i64' })
    end
    local batches = train.data.micro_batches(dataset, 10, 3, 2, { dp = 2, dp_rank = 1 })
    assert.are.same({ 12, 16, 20 }, starts)
    assert.are.equal(3, #batches)
    assert.are.same({ 2, 4 }, batches[1].ids.shape)
    starts = {}
    train.data.micro_batches(dataset, 10, 3, 2, { dp = 2, dp_rank = 1 }, true)
    assert.are.same({ 12, 16, 0 }, starts)
  end)
end)

describe('pmp.train.step', function()
  local function tiny_model()
    pmp.manual_seed(7)
    return pmp.nn.GPTModel({ num_layers = 1, hidden_size = 16, ffn_hidden_size = 32, num_attention_heads = 2,
      num_query_groups = 2, vocab_size = 11 })
  end
  local function grads(model)
    local out = {}
    for _, p in ipairs(model:parameters()) do out[#out + 1] = p.grad:double():clone() end
    return out
  end
  local function assert_close(a, b)
    for k = 1, #a do
      local scale = a[k]:abs():max():item() + 1e-12
      assert.is_true((a[k] - b[k]):abs():max():item() <= 1e-5 * scale, 'gradient ' .. k)
    end
  end
  pmp.manual_seed(3)
  local ids = pmp.randint(0, 11, { 4, 6 }, { dtype = 'i64' })
  local target_ids = pmp.randint(0, 11, { 4, 6 }, { dtype = 'i64' }):totable()
  target_ids[1][2] = -100   -- an ignored target: 23 trained tokens
  local targets = pmp.tensor(target_ids, { dtype = 'i64' })
  local halves = { { ids = ids:narrow(1, 1, 2), targets = targets:narrow(1, 1, 2) },
    { ids = ids:narrow(1, 3, 2), targets = targets:narrow(1, 3, 2) } }

  it('takes the gradient of the mean of the micro batches', function()
    local model = tiny_model()
    local loss = train.step.forward_backward(model, halves)
    local got = grads(model)
    -- each half's mean loss weighs the same (the halves hold 11 and 12 trained tokens)
    local first, second = tiny_model(), tiny_model()
    local l1 = first(halves[1].ids, halves[1].targets)
    local l2 = second(halves[2].ids, halves[2].targets)
    l1:backward()
    l2:backward()
    local a, b = grads(first), grads(second)
    for k = 1, #a do a[k] = (a[k] + b[k]) / 2 end
    assert_close(a, got)
    assert.is_true(math.abs(loss - (l1:item() + l2:item()) / 2) < 1e-6)
  end)

  it('with loss_divisor N takes the gradient of the summed token losses over N', function()
    local model = tiny_model()
    local loss = train.step.forward_backward(model, halves, { loss_divisor = 23 })
    local got = grads(model)
    local whole = tiny_model()
    local reference = whole(ids, targets, { reduction = 'sum' }) / 23
    reference:backward()
    assert_close(grads(whole), got)
    assert.is_true(math.abs(loss - reference:item()) < 1e-5)
    -- 23 trained tokens: the mean over them is the whole batch's mean loss
    assert.is_true(math.abs(loss - whole(ids, targets):item()) < 1e-5)
  end)

  it('evaluates without recording a graph and leaves the model training', function()
    local model = tiny_model()
    local loss = train.step.evaluate(model, halves, { dp = 1, cp = 1 })
    assert.is_nil(model:parameters()[1].grad)
    assert.is_true(model.training)
    local l1 = pmp.no_grad(function() return model(halves[1].ids, halves[1].targets):item() end)
    local l2 = pmp.no_grad(function() return model(halves[2].ids, halves[2].targets):item() end)
    assert.is_true(math.abs(loss - (l1 + l2) / 2) < 1e-6)
  end)

  it('clips to the global norm over all parameters', function()
    local Pair = pmp.nn.Module:extend('Pair')
    function Pair:init()
      self.a = pmp.zeros({ 2 }, { dtype = 'f64' }):requires_grad_()
      self.b = pmp.zeros({ 1 }, { dtype = 'f64' }):requires_grad_()
    end
    local model = Pair()
    local optimizer = pmp.optim.AdamW(model:parameters())
    model.a.grad = pmp.tensor({ 3, 0 }, { dtype = 'f64' })
    model.b.grad = pmp.tensor({ 4 }, { dtype = 'f64' })
    assert.are.equal(5, train.step.clip_grads(model, optimizer, 0))
    assert.are.same({ 3, 0 }, model.a.grad:totable())
    assert.are.equal(5, train.step.clip_grads(model, optimizer, 1))
    local factor = 1 / (5 + 1e-6)
    assert.is_true(math.abs(model.a.grad:totable()[1] - 3 * factor) < 1e-15)
    assert.is_true(math.abs(model.b.grad:totable()[1] - 4 * factor) < 1e-15)
  end)
end)

describe('pmp.train.Logger', function()
  local clock = require 'pmp.clock'
  local real_now, real_print = clock.now, print
  local now, printed
  before_each(function()
    now, printed = 0, {}
    clock.now = function() return now end
    _G.print = function(text) printed[#printed + 1] = text end
  end)
  after_each(function()
    clock.now, _G.print = real_now, real_print
  end)
  local opts = { log_interval = 2, global_batch_size = 4 }
  -- the line without Megatron's leading ' [YYYY-MM-DD HH:MM:SS]' (checked on its own below)
  local function untimed(line) return (line:gsub('^ %[%d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%d%]', '', 1)) end

  it("prints Megatron's line every log interval, with MFU and ETA, and keeps validation time out", function()
    local logger = train.Logger(opts, { name = 'pretrain', train_iters = 10, consumed = true, flops_per_token = 1e6,
      peak_flops = 1e9 })
    logger:begin_iteration(1)
    now = 1
    logger:iteration(1, { lr = 1e-3, loss = 2.5, grad_norm = 0.75, consumed = 4, tokens = 32 })
    assert.are.equal(0, #printed)
    logger:begin_iteration(2)
    now = 2
    logger:iteration(2, { lr = 2e-3, loss = 1.5, grad_norm = 0.5, consumed = 8, tokens = 32 })
    assert.are.equal(' iteration        2/      10 | consumed samples:            8 | elapsed time per iteration ' ..
      '(ms): 1000.0 | learning rate: 2.000000E-03 | global batch size:     4 | lm loss: 2.000000E+00 | loss scale: 1.0 | ' ..
      'grad norm: 0.500 | number of skipped iterations:   0 | number of nan iterations:   0 | tokens per second: 32 | MFU: 3.2% | ' ..
      'ETA: 00:00:08 |', untimed(printed[1]))
    logger:validation(2, function() now = now + 5; return 1 end)
    local line = ' validation loss at iteration 2 | lm loss value: 1.000000E+00 | lm loss PPL: 2.718282E+00 |'
    assert.are.same({ string.rep('-', #line), line, string.rep('-', #line) }, { printed[2], printed[3], printed[4] })
    for it = 3, 4 do
      logger:begin_iteration(it)
      now = now + 1
      -- iteration 3's step was skipped (NaN): its loss stays out of the mean, and it is counted
      logger:iteration(it, { lr = 1e-3, loss = it == 3 and 0 / 0 or 1, grad_norm = 1, consumed = 4 * it, tokens = 32,
        skipped = it == 3 })
    end
    assert.matches('elapsed time per iteration %(ms%): 1000%.0 |', printed[5])
    assert.matches('| lm loss: 1%.000000E%+00 | loss scale: 1%.0 | grad norm: 1%.000 | number of skipped iterations:   1 | number of nan ' ..
      'iterations:   1 |', printed[5])
    logger:finish(4)
    assert.matches('^pretrain: 4 iterations in 00:00:09 | peak engine memory: [%d.]+ MiB | peak resident memory: [%d.]+ MiB$',
      printed[6])
  end)

  it("starts the line with Megatron's timestamp, the local time of the log", function()
    local logger = train.Logger({ log_interval = 1, global_batch_size = 4 }, { name = 'pretrain', train_iters = 1 })
    local before = os.time()
    logger:begin_iteration(1)
    logger:iteration(1, { lr = 1e-3, loss = 2, grad_norm = 1, tokens = 8 })
    local after = os.time()
    local y, mo, d, h, mi, s = printed[1]:match('^ %[(%d%d%d%d)%-(%d%d)%-(%d%d) (%d%d):(%d%d):(%d%d)%] iteration        1/       1 |')
    assert.is_not_nil(y, printed[1])
    local logged = os.time({ year = tonumber(y), month = tonumber(mo), day = tonumber(d), hour = tonumber(h),
      min = tonumber(mi), sec = tonumber(s) })
    assert.is_true(logged >= before and logged <= after, printed[1])
  end)

  it('leaves out consumed samples, MFU and ETA when not given, and prints nothing on other ranks', function()
    local logger = train.Logger(opts, { name = 'sft', train_iters = 3 })
    logger:begin_iteration(1)
    now = 0.5
    logger:iteration(1, { lr = 1e-5, loss = 3, grad_norm = 2, tokens = 100 })
    logger:begin_iteration(2)
    now = 2
    logger:iteration(2, { lr = 1e-5, loss = 1, grad_norm = 2, tokens = 100 })
    assert.are.equal(' iteration        2/       3 | elapsed time per iteration (ms): 1000.0 | learning rate: ' ..
      '1.000000E-05 | global batch size:     4 | lm loss: 2.000000E+00 | loss scale: 1.0 | grad norm: 2.000 | number of skipped iterations:   0 | number of nan iterations:   0 | tokens per second: 100 |',
      untimed(printed[1]))
    local silent = train.Logger(opts, { name = 'x', enabled = false, train_iters = 2 })
    silent:begin_iteration(2)
    silent:iteration(2, { lr = 1, loss = 1, grad_norm = 1, tokens = 1 })
    silent:finish(1)
    assert.are.equal(1, #printed)
    assert.are.equal('01:02:05', train.Logger.duration(3725))
  end)
end)

describe('pmp.train.Checkpoints', function()
  local dir
  before_each(function() dir = shell.temp_dir() end)
  after_each(function() shell.remove_dir(dir) end)
  local Box = pmp.nn.Module:extend('Box')
  function Box:init(v) self.w = pmp.tensor({ v, v }, { dtype = 'f32' }):requires_grad_() end

  it('saves every interval and at the end, once per iteration, stops at the exit interval, and resumes', function()
    local lines = {}
    local logger = { name = 'test', line = function(_, text) lines[#lines + 1] = text end }
    local checkpoints = train.Checkpoints({ save = dir .. '/ck', save_interval = 2, exit_interval = 3 }, logger)
    assert.is_nil(train.Checkpoints.info(dir .. '/ck'))
    local model, position = Box(1), 0
    local function state() return { position = position } end
    for it = 1, 3 do
      position = it * 10
      checkpoints:save_if_due(it, model, nil, state)
      if checkpoints:exit_due(it) then break end
    end
    checkpoints:finish(3, model, nil, state)
    assert.are.same({ ' saved checkpoint to ' .. dir .. '/ck at iteration 2', 'test: exiting at iteration 3 (--exit-interval 3)',
      ' saved checkpoint to ' .. dir .. '/ck at iteration 3' }, lines)
    position = 40
    checkpoints:save_if_due(4, model, nil, state)
    checkpoints:finish(4, model, nil, state)
    assert.are.equal(4, #lines)

    lines = {}
    local info = train.Checkpoints.info(dir .. '/ck')
    assert.are.equal(40, info.state.position)
    local restored = Box(0)
    local again = train.Checkpoints({ save = dir .. '/ck', save_interval = 2 }, logger)
    local iteration, saved = again:load(dir .. '/ck', restored)
    assert.are.equal(4, iteration)
    assert.are.equal(40, saved.position)
    assert.are.same({ 1, 1 }, restored.w:totable())
    assert.are.same({ ' loaded checkpoint from ' .. dir .. '/ck at iteration 4' }, lines)
    again:finish(4, restored, nil, state)   -- nothing trained since the load
    assert.are.equal(1, #lines)
  end)

  it('resumes only from a directory that holds a checkpoint, or starts fresh in its own --save directory', function()
    local function refuses(load, save, why)
      local ok, err = pcall(train.Checkpoints.resume, load, save)
      assert.is_false(ok, load)
      assert.are.equal('--load ' .. load .. ' ' .. why, err)
    end
    refuses(dir .. '/typo', dir .. '/ck', 'does not exist')
    local file = dir .. '/file'
    pmp.io.write_atomic(file, 'x')
    refuses(file, file, 'is a file, not a checkpoint directory')
    pmp.io.mkdir_p(dir .. '/hf')
    pmp.io.write_atomic(dir .. '/hf/config.json', '{}')
    refuses(dir .. '/hf', dir .. '/ck', 'holds a Hugging Face model (config.json), not a pmp checkpoint to resume')
    pmp.io.mkdir_p(dir .. '/empty')
    refuses(dir .. '/empty', nil, 'holds no checkpoint (no latest_checkpointed_iteration.txt)')
    -- the same path for --load and --save, nothing saved yet: a fresh run
    assert.is_nil(train.Checkpoints.resume(dir .. '/ck', dir .. '/ck/'))
    assert.is_nil(train.Checkpoints.resume(nil, dir .. '/ck'))

    local logger = { name = 'test', line = function() end }
    local checkpoints = train.Checkpoints({ save = dir .. '/ck', save_interval = 1 }, logger)
    checkpoints:finish(5, Box(3), nil, function() return { position = 7 } end)
    assert.are.equal(7, train.Checkpoints.resume(dir .. '/ck', '').state.position)
    refuses(dir .. '/ck/iter_0000005', dir .. '/other',
      'is one iteration of a checkpoint: pass the directory above it (the one holding latest_checkpointed_iteration.txt)')
  end)

  it('saves nothing without a directory', function()
    local logger = { name = 'test', line = function() error('nothing to log') end }
    for _, save in ipairs({ '', false }) do
      local checkpoints = train.Checkpoints({ save = save or nil, save_interval = 1 }, logger)
      checkpoints:save_if_due(1, Box(1), nil, function() return {} end)
      checkpoints:finish(1, Box(1), nil, function() return {} end)
    end
  end)
end)

describe('pmp.train.Epochs', function()
  local items = {}
  for k = 1, 7 do items[k] = k end
  local function sorted(list)
    local copy = { unpack(list) }
    table.sort(copy)
    return copy
  end

  it('takes every item once per epoch, in another order each epoch, leaving the generator alone', function()
    pmp.manual_seed(99)
    local expected_draw = pmp.rand(3, { dtype = 'f64' }):totable()
    pmp.manual_seed(99)
    local epochs = train.Epochs(items, 5)
    local first, second = epochs:take(7), epochs:take(7)
    assert.are.same(pmp.rand(3, { dtype = 'f64' }):totable(), expected_draw)
    assert.are.same(items, sorted(first))
    assert.are.same(items, sorted(second))
    assert.are_not.same(first, second)
    assert.are.equal(14, epochs.position)
  end)

  it('continues after seek as if the items had been taken', function()
    local whole = train.Epochs(items, 5)
    local straight = {}
    for _ = 1, 5 do for _, v in ipairs(whole:take(3)) do straight[#straight + 1] = v end end
    for _, cut in ipairs({ 3, 6, 7, 9 }) do
      local resumed = train.Epochs(items, 5)
      resumed:seek(cut)
      local rest = resumed:take(15 - cut)
      for k = 1, #rest do assert.are.equal(straight[cut + k], rest[k], 'after ' .. cut .. ', item ' .. k) end
    end
  end)
end)

describe('pmp.train.chat_data.samples', function()
  local tokenizer = { eos_id = 0 }
  function tokenizer:encode(text)
    local ids = {}
    for k = 1, #text do ids[k] = text:byte(k) end
    return ids
  end
  local function render(messages)
    local parts = {}
    for _, m in ipairs(messages) do parts[#parts + 1] = m.role .. ':' .. m.content .. '\n' end
    return table.concat(parts)
  end
  local function samples(lines)
    local k = 0
    return train.chat_data.samples(function() k = k + 1; return lines[k] end,
      { tokenizer = tokenizer, render = render, format = 'auto', source = 'data.jsonl' })
  end

  it('reads one sample per non-blank line', function()
    local got = samples({ '{"instruction": "a", "input": "", "output": "b"}', '', '{"messages": [{"role": "user", ' ..
      '"content": "x"}, {"role": "assistant", "content": "y"}]}' })
    assert.are.equal(2, #got)
  end)

  it('names the file and line of a bad record, and an empty file', function()
    assert.has_error(function() samples({ '{"messages": []}', '{not json' }) end)
    local ok, message = pcall(samples, { '{"instruction": "a", "input": "", "output": "b"}', '{not json' })
    assert.is_false(ok)
    assert.matches('^data%.jsonl:2: ', message)
    ok, message = pcall(samples, { '{"text": "plain"}' })
    assert.are.equal('data.jsonl:1: not an alpaca, sharegpt or messages record', message)
    ok, message = pcall(samples, { '', '  ' })
    assert.are.equal('data.jsonl holds no samples', message)
  end)
end)

describe('pmp.train.base_model', function()
  local dir
  before_each(function() dir = shell.temp_dir() end)
  after_each(function() shell.remove_dir(dir) end)
  local Box = pmp.nn.Module:extend('Box')
  function Box:init() self.w = pmp.zeros({ 2 }):requires_grad_() end

  it('tells a Hugging Face directory, a pretraining checkpoint and a fine-tuning checkpoint apart', function()
    local ok, message = pcall(train.base_model.locate, dir)
    assert.are.equal(dir .. ' has neither config.json nor latest_checkpointed_iteration.txt', message)
    shell.write_file(dir .. '/config.json', '{}')
    assert.are.same({ { kind = 'hf', dir = dir } }, { train.base_model.locate(dir) })
    local pretrained = Box()
    pretrained.config = { num_layers = 1 }   -- what a GPTModel's checkpoint records
    pmp.checkpoint.save(dir .. '/pre', 1, pretrained, nil, {})
    assert.are.same({ kind = 'pmp', dir = dir .. '/pre' }, (train.base_model.locate(dir .. '/pre')))
    pmp.checkpoint.save(dir .. '/sft', 2, Box(), nil, { base_model = { kind = 'hf', dir = 'somewhere' } })
    local base, resume = train.base_model.locate(dir .. '/sft')
    assert.are.same({ kind = 'hf', dir = 'somewhere' }, base)
    assert.are.equal(2, resume.iteration)
    pmp.checkpoint.save(dir .. '/other', 1, Box(), nil, { note = 'x' })
    ok, message = pcall(train.base_model.locate, dir .. '/other')
    assert.is_false(ok)
    assert.are.equal(dir .. '/other is neither an SFT checkpoint nor a pretraining checkpoint', message)
  end)

  it('renders with a built-in template, and asks for one when the base has none', function()
    local render = train.base_model.chat_renderer({}, nil, 'chatml', 'base')
    assert.are.equal('<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n',
      render({ { role = 'user', content = 'hi' } }, true))
    local ok, message = pcall(train.base_model.chat_renderer, { type = 'char' }, nil, nil, 'base')
    assert.is_false(ok)
    assert.are.equal('base has no chat template (its tokenizer is char): give --chat-template chatml, llama3 or alpaca',
      message)
  end)
end)
