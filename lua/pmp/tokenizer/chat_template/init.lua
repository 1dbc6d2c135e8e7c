-- Chat templates: an interpreter for the subset of Jinja2 that Hugging Face chat templates use, and
-- apply_chat_template.
--
--   local ct = pmp.chat_template
--   local t = ct.compile(source)                       -- syntax errors name the line
--   local text, spans = t:render({ messages = msgs, add_generation_prompt = true })
--   ct.apply('/path/to/tokenizer_dir', msgs, { add_generation_prompt = true, enable_thinking = false })
--   ct.builtin('chatml')                               -- also 'llama3', 'alpaca': template sources
--
-- Semantics follow jinja2 as transformers configures it (ImmutableSandboxedEnvironment with
-- trim_blocks=True, lstrip_blocks=True, the loopcontrols extension, keep_trailing_newline=False) and its
-- extras: raise_exception, strftime_now, namespace, dict, the `tojson` filter as
-- json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False), and the
-- {% generation %} block (render's second result lists the generated spans as {first, last} 1-based
-- inclusive byte positions).
--
-- Values: strings, numbers, booleans, json.null (None), Lua tables: a table marked with json.array,
-- or with a [1] entry, is a list; any other table is a dict (key order: json.keys(t) when set, e.g. by
-- json.decode(text, {ordered = true}); otherwise sorted). Python float-vs-int is tracked for values the
-- template computes (4/2 renders 2.0); numbers given by Lua are ints when integral.
-- Undefined values (missing variables, keys, attributes) are falsy, render as '', iterate as empty,
-- and raise an error when used in arithmetic or when an attribute of them is read, as in jinja2.
-- raise_exception(msg) raises a Lua error whose message is exactly msg; other errors read
-- 'chat_template: line N: ...'.
-- Not supported: extends/include/import/block, call blocks, recursive loops, macro varargs/kwargs/caller,
-- autoescape, Unicode case mapping in upper/lower/title (ASCII only), line statements.
--
-- The interpreter's stages, in this folder: lexer -> parser -> evaluator, over the value model
-- (values, strings, operators, access, methods, tojson) with the filters, tests and globals.
local json = require 'pmp.json'
local V = require 'pmp.tokenizer.chat_template.values'
local S = require 'pmp.tokenizer.chat_template.strings'
local lexer = require 'pmp.tokenizer.chat_template.lexer'
local parser = require 'pmp.tokenizer.chat_template.parser'
local evaluator = require 'pmp.tokenizer.chat_template.evaluator'

local M = {}

local format, concat = string.format, table.concat
local NONE, ErrorMT, new_list, new_dict, dict_keys = V.NONE, V.ErrorMT, V.new_list, V.new_dict, V.dict_keys
local lex, parse, SyntaxMT, exec_body = lexer.lex, parser.parse, lexer.SyntaxMT, evaluator.exec_body

local Template = {}
Template.__index = Template

-- Compiles a template source; errors name the line ('chat_template: syntax error, line N: ...').
function M.compile(source, name)
  if type(source) ~= 'string' then error('chat_template.compile: expects a string, got ' .. type(source), 2) end
  local ok, res = pcall(function() return parse(lex(source)) end)
  if not ok then
    if type(res) == 'table' and getmetatable(res) == SyntaxMT then
      error(format('chat_template: syntax error%s, line %d: %s', name and (' in ' .. name) or '', res.line or 0,
        res.msg), 2)
    end
    error(res, 0)
  end
  return setmetatable({ body = res, source = source, name = name }, Template)
end

-- Renders with vars (a table of template variables). Returns the text and the {% generation %} spans
-- ({first, last} 1-based inclusive byte positions in the text).
function Template:render(vars)
  local ctx = { vars = vars or {}, out = {}, n = 0, len = 0, spans = {}, line = 1 }
  local root = { vars = {} }
  local ok, err = pcall(exec_body, self.body, root, ctx)
  if not ok then
    if type(err) == 'table' and getmetatable(err) == ErrorMT then
      if err.raised then error(err.msg, 0) end
      error(format('chat_template: %sline %d: %s', self.name and (self.name .. ', ') or '', ctx.line or 0, err.msg), 0)
    end
    error(format('chat_template: %sline %d: %s', self.name and (self.name .. ', ') or '', ctx.line or 0,
      tostring(err)), 0)
  end
  return concat(ctx.out, '', 1, ctx.n), ctx.spans
end

local cache = setmetatable({}, { __mode = 'v' })
local function compile_cached(source)
  local t = cache[source]
  if not t then
    t = M.compile(source)
    cache[source] = t
  end
  return t
end

-- Compiles and renders in one call.
function M.render(source, vars) return compile_cached(source):render(vars) end

---------------------------------------------------------------------------------------------------
-- Built-in templates for models without one

local BUILTIN = {
  -- the ChatML template transformers used as its default (Qwen, many fine-tunes)
  chatml = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + " ..
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
  -- Meta-Llama-3-Instruct's template (BOS is '<|begin_of_text|>' when bos_token is not given)
  llama3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = " ..
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + " ..
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = (bos_token if bos_token is defined and bos_token " ..
    "is not none else '<|begin_of_text|>') + content %}{% endif %}{{ content }}{% endfor %}" ..
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
  -- Stanford Alpaca's prompt; a leading system message replaces the preamble; eos_token ends responses
  alpaca = "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}" ..
    "{% set loop_messages = messages[1:] %}{% else %}{{ 'Below is an instruction that describes a task. " ..
    "Write a response that appropriately completes the request.\\n\\n' }}{% set loop_messages = messages %}" ..
    "{% endif %}{% for message in loop_messages %}{% if message['role'] == 'user' %}" ..
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}" ..
    "{{ '### Response:\\n' + message['content'] + (eos_token if eos_token is defined and eos_token is not none " ..
    "else '') + '\\n\\n' }}{% else %}{{ raise_exception('alpaca template: unsupported role ' + message['role']) }}" ..
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}",
}

-- The source of a built-in template: 'chatml', 'llama3' or 'alpaca'.
function M.builtin(name)
  local s = BUILTIN[name]
  if not s then error("chat_template.builtin: unknown template '" .. tostring(name) .. "' (chatml, llama3, alpaca)", 2) end
  return s
end

M.builtins = { 'alpaca', 'chatml', 'llama3' }

---------------------------------------------------------------------------------------------------
-- apply_chat_template

local function token_text(v)
  if type(v) == 'string' then return v end
  if type(v) == 'table' and type(v.content) == 'string' then return v.content end
  return nil
end

local function load_config(cfg)
  if type(cfg) == 'table' then return cfg, nil end
  if type(cfg) ~= 'string' then error('chat_template.apply: expects a tokenizer_config table or a path', 3) end
  local pio = require 'pmp.io'
  local dir, file = cfg, nil
  if pio.is_dir(cfg) then
    file = pio.join(cfg, 'tokenizer_config.json')
  else
    file, dir = cfg, pio.dirname(cfg)
  end
  local config = pio.exists(file) and json.read(file, { ordered = true }) or {}
  local jinja_file = pio.join(dir, 'chat_template.jinja')
  local jinja
  if pio.exists(jinja_file) then jinja = pio.read_file(jinja_file) end
  return config, jinja
end

local function pick_template(config, jinja, opts)
  local t = opts.chat_template
  if t ~= nil then
    if BUILTIN[t] then return BUILTIN[t] end
    if type(config.chat_template) == 'table' then
      for _, e in ipairs(config.chat_template) do if e.name == t then return e.template end end
    end
    return t
  end
  if jinja then return jinja end
  local ct = config.chat_template
  if type(ct) == 'string' then return ct end
  if type(ct) == 'table' then
    local byname = {}
    for _, e in ipairs(ct) do byname[e.name] = e.template end
    if opts.tools ~= nil and opts.tools ~= NONE and byname.tool_use then return byname.tool_use end
    if byname.default then return byname.default end
    error('chat_template.apply: the model has several chat templates and none is named default', 3)
  end
  local fb = opts.fallback
  if fb == false then error('chat_template.apply: the tokenizer config has no chat_template', 3) end
  return M.builtin(fb or 'chatml')
end

local REASONING = { 'reasoning_content', 'thinking', 'reasoning' }

-- Copies messages as transformers does: keys whose value is null are dropped, and a message's reasoning
-- (reasoning_content, thinking or reasoning) is also given as thinking and reasoning_content.
local function normalize_messages(messages)
  local out = new_list()
  for i, m in ipairs(messages) do
    if type(m) ~= 'table' then error('chat_template.apply: message ' .. i .. ' is not a table', 3) end
    local keys = dict_keys(m)
    local copy, order = new_dict()
    local reasoning
    for _, field in ipairs(REASONING) do
      if m[field] ~= nil and m[field] ~= NONE then reasoning = m[field]; break end
    end
    if reasoning ~= nil then copy.thinking = reasoning; order[#order + 1] = 'thinking' end
    for _, k in ipairs(keys) do
      local v = m[k]
      if v ~= NONE then
        if copy[k] == nil then order[#order + 1] = k end
        copy[k] = v
      end
    end
    if reasoning ~= nil then
      if copy.reasoning_content == nil then order[#order + 1] = 'reasoning_content' end
      copy.reasoning_content = reasoning
    end
    out[i] = copy
  end
  return out
end

local OPT_KEYS = { chat_template = true, fallback = true }

-- Renders messages with the model's chat template, as transformers' apply_chat_template(tokenize=False).
-- config: a tokenizer_config table, or a tokenizer directory / tokenizer_config.json path (a
-- chat_template.jinja file next to it takes precedence). opts: add_generation_prompt, tools, documents,
-- and any template variable (enable_thinking, bos_token, ...); chat_template = a source or a builtin name
-- to use instead; fallback = builtin name used when the model has no template (default 'chatml';
-- false: error). Returns the text and the {% generation %} spans.
function M.apply(config, messages, opts)
  opts = opts or {}
  local cfg, jinja = load_config(config)
  local source = pick_template(cfg, jinja, opts)
  if type(messages) ~= 'table' or #messages == 0 then
    error('chat_template.apply: Cannot apply chat template to an empty conversation. Provide at least one message.', 2)
  end
  local vars = {}
  for _, k in ipairs({ 'bos_token', 'eos_token', 'unk_token', 'pad_token' }) do
    local v = token_text(cfg[k])
    if v then vars[k] = v end
  end
  for k, v in pairs(opts) do
    if not OPT_KEYS[k] then vars[k] = v end
  end
  vars.messages = normalize_messages(messages)
  if vars.tools == nil then vars.tools = NONE end
  if vars.documents == nil then vars.documents = NONE end
  if vars.add_generation_prompt == nil then vars.add_generation_prompt = false end
  return compile_cached(source):render(vars)
end

-- Exposed for tests and tools.
M.tojson = require 'pmp.tokenizer.chat_template.tojson'
M.py_str = S.py_str
M.NONE = NONE

return M
