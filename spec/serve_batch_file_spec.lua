require 'busted.runner'()
-- pmp.serve.batch_file and recipes/generate.lua --input-file on a tiny Qwen3-shaped model with Qwen3's
-- tokenizer: every line's tokens and text against pmp.generate on that prompt alone (stop strings
-- included), per-line error records, input order on request, and resuming after a torn write.
local shell = require 'spec.support.shell'
local tiny_hf = require 'spec.support.tiny_hf'
local engine_module = require 'pmp.serve.engine'
local batch_file = require 'pmp.serve.batch_file'

local PROMPTS = { 'Once upon a time', 'The quick brown fox jumps over', 'hello', 'A list: one, two, three, four',
  'Why is the sky blue?' }

local function lines_of(path)
  local out = {}
  for line in io.lines(path) do out[#out + 1] = pmp.json.decode(line) end
  return out
end

local function by_line(records)
  local out = {}
  for _, r in ipairs(records) do
    assert(out[r.line] == nil, 'line ' .. r.line .. ' written twice')
    out[r.line] = r
  end
  return out
end

describe('serve.batch_file', function()
  local dir, tok, model
  setup(function()
    if not tiny_hf.available() then return end
    dir = shell.temp_dir()
    tok = tiny_hf.write(dir .. '/model')
    model = pmp.models.from_pretrained(dir .. '/model')
  end)
  teardown(function() if dir then shell.remove_dir(dir) end end)

  local function engine(options)
    options = options or {}
    options.block_size, options.num_blocks, options.max_batch = 4, 64, options.max_batch or 2
    options.tokenizer = tok
    return engine_module.new(model, options)
  end

  local function expected(prompt, n, stop)
    return pmp.generate(model, { tok:encode(prompt) }, { max_new_tokens = n, tokenizer = tok, stop = stop })[1]
  end

  it('writes one record per line: results as pmp.generate gives them alone, errors naming the line', function()
    if not tok then pending('needs ../shared/tokenizers/qwen3') return end
    -- a stop string from the middle of an unstopped continuation of prompt 1
    local free = expected(PROMPTS[1], 8).text
    local stop = free:match('[%z\1-\127\194-\244][\128-\191]*', math.floor(#free / 2))
    local long = string.rep('word ', 200)
    local input = {
      pmp.json.encode({ prompt = PROMPTS[1], stop = { stop }, max_tokens = 8 }),
      pmp.json.encode({ prompt = PROMPTS[2], id = 'fox', max_tokens = 3 }),
      '',
      pmp.json.encode({ prompt = '' }),
      pmp.json.encode({ prompt = PROMPTS[3], temprature = 0.5 }),
      '{"prompt": "unterminated',
      pmp.json.encode({ prompt = long }),
      pmp.json.encode({ prompt = PROMPTS[4], n = 2, max_tokens = 4, logprobs = true }),
      pmp.json.encode({ prompt = PROMPTS[5] }),
    }
    shell.write_file(dir .. '/in.jsonl', table.concat(input, '\n') .. '\n')
    local progress = {}
    local stats = batch_file.run(engine(), { input = dir .. '/in.jsonl', output = dir .. '/out.jsonl', tokenizer = tok,
      defaults = { max_tokens = 5 }, progress = { write = function(_, s) progress[#progress + 1] = s end, flush = function() end } })
    assert.are.same({ done = 4, errors = 4, skipped = 0 }, { done = stats.done, errors = stats.errors, skipped = stats.skipped })
    local records = by_line(lines_of(dir .. '/out.jsonl'))
    local want = expected(PROMPTS[1], 8, { stop })
    assert.are.equal('stop', records[1].finish_reason)
    assert.are.same(want.tokens, records[1].tokens)
    assert.are.equal(want.text, records[1].completion)
    assert.are.equal('fox', records[2].id)
    assert.are.same(expected(PROMPTS[2], 3).tokens, records[2].tokens)
    assert.is_nil(records[3])
    assert.are.equal('the prompt is empty', records[4].error)
    assert.truthy(records[5].error:find("unknown field 'temprature'", 1, true))
    assert.truthy(records[6].error:find('not valid JSON', 1, true))
    assert.truthy(records[7].error:find('the context holds 128', 1, true))
    local four = expected(PROMPTS[4], 4)
    assert.are.equal(2, #records[8].samples)
    for k = 1, 2 do
      assert.are.same(four.tokens, records[8].samples[k].tokens)
      assert.are.equal(4, #records[8].samples[k].logprobs)
    end
    assert.are.same(expected(PROMPTS[5], 5).tokens, records[9].tokens)
    assert.truthy(progress[#progress]:find('8/8 requests done (4 errors, 0 skipped)', 1, true))
    assert.truthy(progress[#progress]:find('tokens/s', 1, true))
  end)

  it('writes in input order on request, and resumes after a kill without repeating lines', function()
    if not tok then pending('needs ../shared/tokenizers/qwen3') return end
    local input = {}
    for k = 1, 5 do input[k] = pmp.json.encode({ prompt = PROMPTS[k], max_tokens = 7 - k }) end
    shell.write_file(dir .. '/in2.jsonl', table.concat(input, '\n') .. '\n')
    local full = dir .. '/full.jsonl'
    batch_file.run(engine({ max_batch = 3 }), { input = dir .. '/in2.jsonl', output = full, tokenizer = tok, ordered = true })
    local records = lines_of(full)
    for k = 1, 5 do
      assert.are.equal(k, records[k].line)
      assert.are.same(expected(PROMPTS[k], 7 - k).tokens, records[k].tokens)
    end
    -- a run killed after lines 2 and 4, halfway through writing line 1
    local text = pmp.io.read_file(full)
    local kept = {}
    for line in text:gmatch('[^\n]+') do kept[#kept + 1] = line end
    shell.write_file(dir .. '/resumed.jsonl', kept[2] .. '\n' .. kept[4] .. '\n' .. kept[1]:sub(1, 20))
    local stats = batch_file.run(engine(), { input = dir .. '/in2.jsonl', output = dir .. '/resumed.jsonl', tokenizer = tok })
    assert.are.equal(2, stats.skipped)
    assert.are.equal(3, stats.done)
    local resumed = by_line(lines_of(dir .. '/resumed.jsonl'))
    for k = 1, 5 do assert.are.same(records[k], resumed[k]) end
  end)

  it('runs from recipes/generate.lua --input-file with a progress line', function()
    if not tok then pending('needs ../shared/tokenizers/qwen3') return end
    shell.write_file(dir .. '/in3.jsonl', pmp.json.encode({ prompt = PROMPTS[1], id = 7 }) .. '\n' ..
      pmp.json.encode({ prompt = PROMPTS[2], bogus = 1 }) .. '\n')
    local _, err, status = shell.run_pmp({ shell.root .. '/recipes/generate.lua', '--load', dir .. '/model',
      '--input-file', dir .. '/in3.jsonl', '--output-file', dir .. '/out3.jsonl', '--max-new-tokens', '4',
      '--block-size', '4', '--kv-cache-tokens', '256' })
    assert.are.equal(0, status, err)
    local records = by_line(lines_of(dir .. '/out3.jsonl'))
    assert.are.same(expected(PROMPTS[1], 4).tokens, records[1].tokens)
    assert.are.equal(7, records[1].id)
    assert.truthy(records[2].error:find("unknown field 'bogus'", 1, true))
    assert.truthy(err:find('2/2 requests done (1 errors, 0 skipped)', 1, true), err)
    assert.truthy(err:find('requests/s', 1, true))
  end)
end)
