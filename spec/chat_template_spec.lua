require 'busted.runner'()
-- pmp.chat_template: the Jinja2 subset of Hugging Face chat templates. Fixtures come from
-- tools/make_chat_template_fixtures.py (transformers' apply_chat_template and its Jinja environment).
local json = require 'pmp.json'
local ct = require 'pmp.tokenizer.chat_template'
local pio = require 'pmp.io'

local fails_with = require('spec.support.expect').fails_with

local ROOT = assert(package.loaded['pmp.root'])
local FIXTURES = ROOT .. '/spec/fixtures/chat_templates/'
local SHARED = ROOT .. '/../shared/tokenizers'

local function read_jsonl(path)
  local out = {}
  for line in assert(io.open(path, 'rb')):lines() do
    if line ~= '' then out[#out + 1] = json.decode(line, { ordered = true }) end
  end
  return out
end

-- Shows where two strings first differ.
local function diff(want, got)
  local i = 1
  while i <= #want and i <= #got and want:byte(i) == got:byte(i) do i = i + 1 end
  return string.format('first difference at byte %d:\nwant: %q\ngot:  %q', i, want:sub(math.max(1, i - 40), i + 40),
    got:sub(math.max(1, i - 40), i + 40))
end

describe('chat_template on transformers apply_chat_template fixtures', function()
  local records = read_jsonl(FIXTURES .. 'cases.jsonl')
  local configs, cases = {}, {}
  for i = 2, #records do
    local r = records[i]
    if r.config then configs[r.config] = r.tokenizer_config else cases[#cases + 1] = r end
  end

  for _, c in ipairs(cases) do
    it(c.template .. ' / ' .. c.case, function()
      local opts = {}
      for k, v in pairs(c.kwargs) do opts[k] = v end
      local ok, got = pcall(ct.apply, configs[c.template], c.messages, opts)
      if c.error then
        assert(not ok, 'expected an error like: ' .. c.error)
        -- the reference's message is the jinja2 one; ours names the same missing key
        local key = c.error:match("attribute '([^']+)'")
        if key then assert.truthy(got:find(key, 1, true), got) end
      else
        assert(ok, got)
        if got ~= c.output then error(diff(c.output, got)) end
      end
    end)
  end

  it('reads a tokenizer directory, with bos/eos from the config', function()
    if not pio.is_dir(SHARED) then return pending('../shared/tokenizers is not here') end
    local msgs = { { role = 'user', content = 'hi' } }
    assert.equal('<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>' ..
      '<|start_header_id|>assistant<|end_header_id|>\n\n', ct.apply(SHARED .. '/llama3', msgs))
    assert.equal('<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>',
      ct.apply(SHARED .. '/deepseek_v3/tokenizer_config.json', msgs, { add_generation_prompt = true }))
  end)
end)

describe('chat_template on jinja2 reference cases', function()
  local records = read_jsonl(FIXTURES .. 'jinja_cases.jsonl')
  for i = 2, #records do
    local c = records[i]
    it(c.name, function()
      local ok, got = pcall(function() return ct.compile(c.template):render(c.vars) end)
      if c.error then
        assert(not ok, 'expected an error like: ' .. c.error .. ', got output ' .. tostring(got))
        if c.error_type == 'TemplateError' then
          assert.equal(c.error, got) -- raise_exception: the message, unchanged
        elseif c.error_line then
          assert.truthy(got:find('line ' .. c.error_line .. ':', 1, true), got)
        end
      else
        assert(ok, got)
        if got ~= c.output then error(diff(c.output, got)) end
      end
    end)
  end
end)

describe('chat_template API', function()
  it('compiles once and renders with different variables', function()
    local t = ct.compile('{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}')
    assert.equal('user:a;', t:render({ messages = { { role = 'user', content = 'a' } } }))
    assert.equal('', t:render({}))
  end)

  it('names the line of a syntax error', function()
    fails_with(function() ct.compile('ok\n{% if x %}\n{{ 1 + }}\n{% endif %}') end, 'syntax error', 'line 3')
    fails_with(function() ct.compile('{% for x in y %}\n\n') end, 'line 1', "'endfor'")
    fails_with(function() ct.compile('a\n\n{% frobnicate %}') end, 'line 3', "unknown tag 'frobnicate'")
    fails_with(function() ct.compile("{{ 'unterminated }}") end, 'line 1')
    fails_with(function() ct.compile('{# never closed') end, 'Missing end of comment tag')
  end)

  it('names the line of a runtime error', function()
    fails_with(function() ct.render('a\nb\n{{ x.y }}', {}) end, 'line 3', "'x' is undefined")
    fails_with(function() ct.render("{{ 'a' + 1 }}", {}) end, 'line 1', 'unsupported operand')
  end)

  it('propagates raise_exception messages unchanged', function()
    local ok, err = pcall(ct.render, "{% if messages|length > 1 %}{{ raise_exception('Only one message!') }}{% endif %}",
      { messages = { 1, 2 } })
    assert.is_false(ok)
    assert.equal('Only one message!', err)
    ok, err = pcall(ct.apply, { chat_template = "{{ raise_exception('bad role: ' + messages[0].role) }}" },
      { { role = 'robot', content = '' } })
    assert.equal('bad role: robot', err)
  end)

  it('treats undefined values as falsy and empty, and json.null as none', function()
    assert.equal('[][no][0]', ct.render('[{{ a }}][{% if a %}yes{% else %}no{% endif %}][{{ a | length }}]', {}))
    assert.equal('None True', ct.render('{{ n }} {{ n is none }}', { n = json.null }))
  end)

  it('tracks float results like Python', function()
    assert.equal('2.0 2 0.5 3.0', ct.render('{{ 4 / 2 }} {{ 4 // 2 }} {{ 1 / 2 }} {{ 1.5 * 2 }}', {}))
  end)

  it('returns {% generation %} spans as byte ranges', function()
    local t = ct.compile('{% for m in messages %}{{ m.role }}: {% if m.role == "assistant" %}{% generation %}' ..
      '{{ m.content }}!{% endgeneration %}{% else %}{{ m.content }}{% endif %}{{ "\\n" }}{% endfor %}')
    local text, spans = t:render({ messages = { { role = 'user', content = 'hi' }, { role = 'assistant', content = 'héllo' } } })
    assert.equal('user: hi\nassistant: héllo!\n', text)
    assert.equal(1, #spans)
    assert.equal('héllo!', text:sub(spans[1][1], spans[1][2]))
  end)

  it('passes bos/eos given as strings or {content=} tables, and options override them', function()
    local cfg = { chat_template = '{{ bos_token }}|{{ eos_token }}|{{ pad_token }}', bos_token = { content = '<s>' },
      eos_token = '</s>', pad_token = json.null }
    local msgs = { { role = 'user', content = 'x' } }
    assert.equal('<s>|</s>|', ct.apply(cfg, msgs))
    assert.equal('<B>|</s>|', ct.apply(cfg, msgs, { bos_token = '<B>' }))
  end)

  it('drops null message fields and aliases reasoning fields, as transformers does', function()
    local cfg = { chat_template = '{% for m in messages %}{{ m.content is defined }} {{ m.reasoning_content }} ' ..
      '{{ m.thinking }};{% endfor %}' }
    assert.equal('False  ;True r r;', ct.apply(cfg, {
      { role = 'assistant', content = json.null },
      { role = 'assistant', content = 'c', reasoning = 'r' },
    }))
  end)

  it('passes tools as none when not given, and extra options as variables', function()
    local cfg = { chat_template = '{{ tools is none }} {{ enable_thinking }} {{ add_generation_prompt }}' }
    assert.equal('True False False', ct.apply(cfg, { { role = 'user', content = '' } }, { enable_thinking = false }))
  end)

  it('chooses among named templates', function()
    local cfg = { chat_template = { { name = 'default', template = 'D' }, { name = 'tool_use', template = 'T' } } }
    local msgs = { { role = 'user', content = '' } }
    assert.equal('D', ct.apply(cfg, msgs))
    assert.equal('T', ct.apply(cfg, msgs, { tools = { { type = 'function' } } }))
    assert.equal('T', ct.apply(cfg, msgs, { chat_template = 'tool_use' }))
  end)

  it('rejects an empty conversation', function()
    fails_with(function() ct.apply({ chat_template = 'x' }, {}) end, 'empty conversation')
  end)
end)

describe('chat_template builtins', function()
  local msgs = {
    { role = 'system', content = 'Be brief.' },
    { role = 'user', content = 'Hi' },
    { role = 'assistant', content = 'Hello.' },
  }

  it('chatml', function()
    assert.equal('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n' ..
      '<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>assistant\n',
      ct.apply({}, msgs, { add_generation_prompt = true }))
  end)

  it('llama3', function()
    assert.equal('<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>' ..
      '<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n' ..
      'Hello.<|eot_id|>', ct.apply({}, msgs, { fallback = 'llama3' }))
  end)

  it('alpaca', function()
    assert.equal('Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello.</s>\n\n### Instruction:\nMore\n\n' ..
      '### Response:\n', ct.apply({ eos_token = '</s>' },
        { msgs[1], msgs[2], msgs[3], { role = 'user', content = 'More' } }, { fallback = 'alpaca', add_generation_prompt = true }))
    assert.equal('Below is an instruction that describes a task. Write a response that appropriately completes ' ..
      'the request.\n\n### Instruction:\nHi\n\n', ct.render(ct.builtin('alpaca'), { messages = { msgs[2] } }))
  end)

  it('a model without a template errors when fallback is false', function()
    fails_with(function() ct.apply({}, msgs, { fallback = false }) end, 'no chat_template')
    fails_with(function() ct.builtin('nope') end, 'unknown template')
  end)
end)
