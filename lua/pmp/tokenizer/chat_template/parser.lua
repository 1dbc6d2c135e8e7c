-- The parser: turns the lexer's items into a tree of statement and expression nodes ({t = kind, line =
-- ..., ...}) with jinja2's grammar and precedence; unknown filters and tests are syntax errors.
local V = require 'pmp.tokenizer.chat_template.values'
local S = require 'pmp.tokenizer.chat_template.strings'
local lexer = require 'pmp.tokenizer.chat_template.lexer'
local FILTERS = require 'pmp.tokenizer.chat_template.filters'
local TESTS = require 'pmp.tokenizer.chat_template.tests'

local concat = table.concat
local unpack = unpack or table.unpack
local NONE = V.NONE
local py_str = S.py_str
local syntax_error = lexer.syntax_error

local Cursor = {}
Cursor.__index = Cursor

local function cursor(toks, line) return setmetatable({ toks = toks, k = 1, line = line }, Cursor) end
function Cursor:peek(o) return self.toks[self.k + (o or 0)] end
function Cursor:cur_line() local t = self.toks[self.k] or self.toks[#self.toks]; return t and t.line or self.line end
function Cursor:next()
  local t = self.toks[self.k]
  self.k = self.k + 1
  return t
end
function Cursor:at_end() return self.toks[self.k] == nil end
function Cursor:is_op(op) local t = self.toks[self.k]; return t ~= nil and t.t == 'op' and t.v == op end
function Cursor:is_name(n) local t = self.toks[self.k]; return t ~= nil and t.t == 'name' and t.v == n end
function Cursor:fail(msg) syntax_error(msg, self:cur_line()) end
local function describe(t)
  if not t then return 'end of statement block' end
  if t.t == 'string' then return 'string' end
  if t.t == 'op' then return "'" .. t.v .. "'" end
  return "'" .. py_str(t.v) .. "'"
end
function Cursor:accept_op(op) if self:is_op(op) then return self:next() end end
function Cursor:accept_name(n) if self:is_name(n) then return self:next() end end
function Cursor:expect_op(op)
  if not self:is_op(op) then self:fail("expected token '" .. op .. "', got " .. describe(self:peek())) end
  return self:next()
end
function Cursor:expect_name(what)
  local t = self:peek()
  if not t or t.t ~= 'name' then self:fail('expected ' .. (what or 'name') .. ', got ' .. describe(t)) end
  return self:next().v
end
function Cursor:expect_end()
  if not self:at_end() then self:fail('expected end of statement block, got ' .. describe(self:peek())) end
end

local parse_expression, parse_unary, parse_primary, parse_postfix

local function parse_call_args(c)
  c:expect_op('(')
  local args, kwargs, korder = {}, nil, nil
  while not c:is_op(')') do
    if #args > 0 or kwargs then c:expect_op(',') end
    if c:is_op(')') then break end
    local t, t2 = c:peek(), c:peek(1)
    if t and t.t == 'name' and t2 and t2.t == 'op' and t2.v == '=' then
      c:next(); c:next()
      kwargs = kwargs or {}
      korder = korder or {}
      kwargs[t.v] = parse_expression(c)
      korder[#korder + 1] = t.v
    else
      if kwargs then c:fail('positional argument follows keyword argument') end
      args[#args + 1] = parse_expression(c)
    end
  end
  c:expect_op(')')
  return args, kwargs, korder
end

-- A tuple, or one expression (jinja2's parse_tuple).
local function parse_tuple(c, no_condexpr, end_names, explicit_parens)
  local items, is_tuple = {}, false
  local line = c:cur_line()
  while true do
    if #items > 0 then c:expect_op(',') end
    local t = c:peek()
    if not t or (t.t == 'op' and t.v == ')') or (t.t == 'name' and end_names and end_names[t.v]) then break end
    items[#items + 1] = no_condexpr and c:parse_or() or parse_expression(c)
    if c:is_op(',') then is_tuple = true else break end
  end
  if not is_tuple then
    if #items > 0 then return items[1] end
    if not explicit_parens then c:fail('Expected an expression, got ' .. describe(c:peek())) end
  end
  return { t = 'tuple', items = items, line = line }
end

parse_expression = function(c)
  local e = c:parse_or()
  while c:is_name('if') do
    local line = c:next().line
    local test = c:parse_or()
    local no
    if c:accept_name('else') then no = parse_expression(c) end
    e = { t = 'cond', test = test, yes = e, no = no, line = line }
  end
  return e
end

function Cursor:parse_or()
  local e = self:parse_and()
  while self:is_name('or') do
    local line = self:next().line
    e = { t = 'or', l = e, r = self:parse_and(), line = line }
  end
  return e
end

function Cursor:parse_and()
  local e = self:parse_not()
  while self:is_name('and') do
    local line = self:next().line
    e = { t = 'and', l = e, r = self:parse_not(), line = line }
  end
  return e
end

function Cursor:parse_not()
  if self:is_name('not') then
    local line = self:next().line
    return { t = 'not', e = self:parse_not(), line = line }
  end
  return self:parse_compare()
end

local CMP = { ['=='] = true, ['!='] = true, ['<'] = true, ['<='] = true, ['>'] = true, ['>='] = true }

function Cursor:parse_compare()
  local line = self:cur_line()
  local e = self:parse_math1()
  local ops
  while true do
    local t = self:peek()
    local op
    if t and t.t == 'op' and CMP[t.v] then self:next(); op = t.v
    elseif self:is_name('in') then self:next(); op = 'in'
    elseif self:is_name('not') and self:peek(1) and self:peek(1).t == 'name' and self:peek(1).v == 'in' then
      self:next(); self:next(); op = 'notin'
    else break end
    ops = ops or {}
    ops[#ops + 1] = { op = op, e = self:parse_math1() }
  end
  if not ops then return e end
  return { t = 'cmp', first = e, ops = ops, line = line }
end

function Cursor:parse_math1()
  local e = self:parse_concat()
  while self:is_op('+') or self:is_op('-') do
    local t = self:next()
    e = { t = 'bin', op = t.v, l = e, r = self:parse_concat(), line = t.line }
  end
  return e
end

function Cursor:parse_concat()
  local e = self:parse_math2()
  if not self:is_op('~') then return e end
  local items = { e }
  local line = self:cur_line()
  while self:accept_op('~') do items[#items + 1] = self:parse_math2() end
  return { t = 'concat', items = items, line = line }
end

function Cursor:parse_math2()
  local e = self:parse_pow()
  while self:is_op('*') or self:is_op('/') or self:is_op('//') or self:is_op('%') do
    local t = self:next()
    e = { t = 'bin', op = t.v, l = e, r = self:parse_pow(), line = t.line }
  end
  return e
end

function Cursor:parse_pow()
  local e = parse_unary(self, true)
  while self:is_op('**') do
    local t = self:next()
    e = { t = 'bin', op = '**', l = e, r = parse_unary(self, true), line = t.line }
  end
  return e
end

local function parse_filter_expr(c, e)
  while true do
    if c:is_op('|') then
      local line = c:next().line
      local name = c:expect_name('filter name')
      if not FILTERS[name] then syntax_error("No filter named '" .. name .. "'.", line) end
      local args, kwargs, korder = {}, nil, nil
      if c:is_op('(') then args, kwargs, korder = parse_call_args(c) end
      e = { t = 'filter', o = e, name = name, args = args, kwargs = kwargs, korder = korder, line = line }
    elseif c:is_name('is') then
      local line = c:next().line
      local neg = c:accept_name('not') ~= nil
      local name = c:expect_name('test name')
      if not TESTS[name] then syntax_error("No test named '" .. name .. "'.", line) end
      local args, kwargs = {}, nil
      local t = c:peek()
      if c:is_op('(') then
        args, kwargs = parse_call_args(c)
      elseif t and (t.t == 'name' or t.t == 'string' or t.t == 'integer' or t.t == 'float' or
          (t.t == 'op' and (t.v == '[' or t.v == '{'))) and
          not (t.t == 'name' and (t.v == 'else' or t.v == 'or' or t.v == 'and' or t.v == 'is')) then
        args = { parse_postfix(c, parse_primary(c)) }
      end
      e = { t = 'test', o = e, name = name, args = args, kwargs = kwargs, neg = neg, line = line }
    elseif c:is_op('(') then
      local line = c:cur_line()
      local args, kwargs, korder = parse_call_args(c)
      e = { t = 'call', f = e, args = args, kwargs = kwargs, korder = korder, line = line }
    else
      return e
    end
  end
end

parse_unary = function(c, with_filter)
  local e
  if c:is_op('-') then
    local line = c:next().line
    e = { t = 'neg', e = parse_unary(c, false), line = line }
  elseif c:is_op('+') then
    c:next()
    e = parse_unary(c, false)
  else
    e = parse_primary(c)
  end
  e = parse_postfix(c, e)
  if with_filter then e = parse_filter_expr(c, e) end
  return e
end

local CONSTS = { ['true'] = true, ['True'] = true, ['false'] = false, ['False'] = false }

parse_primary = function(c)
  local t = c:peek()
  if not t then c:fail('unexpected end of expression') end
  if t.t == 'name' then
    c:next()
    if CONSTS[t.v] ~= nil then return { t = 'const', v = CONSTS[t.v], line = t.line } end
    if t.v == 'none' or t.v == 'None' then return { t = 'const', v = NONE, line = t.line } end
    return { t = 'name', n = t.v, line = t.line }
  elseif t.t == 'string' then
    c:next()
    local parts = { t.v }
    while c:peek() and c:peek().t == 'string' do parts[#parts + 1] = c:next().v end
    return { t = 'const', v = concat(parts), line = t.line }
  elseif t.t == 'integer' or t.t == 'float' then
    c:next()
    return { t = 'const', v = t.v, line = t.line }
  elseif t.t == 'op' and t.v == '(' then
    c:next()
    local e = parse_tuple(c, false, nil, true)
    c:expect_op(')')
    return e
  elseif t.t == 'op' and t.v == '[' then
    c:next()
    local items = {}
    while not c:is_op(']') do
      if #items > 0 then c:expect_op(',') end
      if c:is_op(']') then break end
      items[#items + 1] = parse_expression(c)
    end
    c:expect_op(']')
    return { t = 'list', items = items, line = t.line }
  elseif t.t == 'op' and t.v == '{' then
    c:next()
    local pairs_ = {}
    while not c:is_op('}') do
      if #pairs_ > 0 then c:expect_op(',') end
      if c:is_op('}') then break end
      local k = parse_expression(c)
      c:expect_op(':')
      pairs_[#pairs_ + 1] = { k, parse_expression(c) }
    end
    c:expect_op('}')
    return { t = 'dict', pairs = pairs_, line = t.line }
  end
  c:fail('unexpected ' .. describe(t))
end

parse_postfix = function(c, e)
  while true do
    if c:is_op('.') then
      local line = c:next().line
      local t = c:next()
      if t and t.t == 'name' then
        e = { t = 'getattr', o = e, name = t.v, line = line }
      elseif t and t.t == 'integer' then
        e = { t = 'getitem', o = e, key = { t = 'const', v = t.v }, line = line }
      else
        syntax_error('expected name or number', line)
      end
    elseif c:is_op('[') then
      local line = c:next().line
      -- subscript: expression or slice
      local parts, is_slice = { nil, nil, nil }, false
      local idx = 1
      while not c:is_op(']') do
        if c:is_op(':') then
          c:next()
          is_slice = true
          idx = idx + 1
          if idx > 3 then c:fail('invalid slice') end
        else
          if parts[idx] then c:fail("expected ']'") end
          parts[idx] = parse_expression(c)
          if c:is_op(',') then c:fail('tuple subscripts are not supported') end
        end
      end
      c:expect_op(']')
      if is_slice then
        e = { t = 'slice', o = e, a = parts[1], b = parts[2], c = parts[3], line = line }
      else
        if not parts[1] then syntax_error('expected subscript expression', line) end
        e = { t = 'getitem', o = e, key = parts[1], line = line }
      end
    elseif c:is_op('(') then
      local line = c:cur_line()
      local args, kwargs, korder = parse_call_args(c)
      e = { t = 'call', f = e, args = args, kwargs = kwargs, korder = korder, line = line }
    else
      return e
    end
  end
end

-- Assignment targets: name, name.attr (namespace), or a tuple of names.
local function parse_target(c, end_names, allow_attr)
  local line = c:cur_line()
  local names, comma = {}, false
  while true do
    local n = c:expect_name('assignment target')
    if allow_attr and #names == 0 and c:is_op('.') then
      c:next()
      local attr = c:expect_name('attribute name')
      return { t = 'nsattr', ns = n, attr = attr, line = line }
    end
    names[#names + 1] = n
    if not c:accept_op(',') then break end
    comma = true
    local t = c:peek()
    if not t or (t.t == 'name' and end_names and end_names[t.v]) or (t.t == 'op' and t.v == '=') then break end
  end
  if not comma then return { t = 'name', n = names[1], line = line } end
  return { t = 'tuple', names = names, line = line }
end

local parse_body

local function block_cursor(item)
  local c = cursor(item.toks, item.line)
  return c
end

local STATEMENTS = {}

STATEMENTS['if'] = function(p, c, line)
  local node = { t = 'if', conds = {}, line = line }
  local test = parse_tuple(c, false)
  c:expect_end()
  while true do
    local body, tag, ec = parse_body(p, { elif = true, ['else'] = true, endif = true })
    node.conds[#node.conds + 1] = { test, body }
    if tag == 'elif' then
      test = parse_tuple(ec, false)
      ec:expect_end()
    elseif tag == 'else' then
      ec:expect_end()
      node.else_body = parse_body(p, { endif = true })
      return node
    else
      return node
    end
  end
end

STATEMENTS['for'] = function(p, c, line)
  local target = parse_target(c, { ['in'] = true }, false)
  if not c:accept_name('in') then c:fail("expected 'in'") end
  local iter = parse_tuple(c, true, { recursive = true, ['if'] = true })
  local cond
  if c:accept_name('if') then cond = parse_expression(c) end
  if c:accept_name('recursive') then c:fail('recursive for loops are not supported') end
  c:expect_end()
  local body, tag, ec = parse_body(p, { endfor = true, ['else'] = true }, true)
  ec:expect_end()
  local else_body
  if tag == 'else' then
    else_body = parse_body(p, { endfor = true })
  end
  return { t = 'for', target = target, iter = iter, cond = cond, body = body, else_body = else_body, line = line }
end

STATEMENTS['set'] = function(p, c, line)
  local target = parse_target(c, nil, true)
  if c:accept_op('=') then
    local e = parse_tuple(c, false)
    c:expect_end()
    return { t = 'set', target = target, e = e, line = line }
  end
  -- block set, with optional filters
  local filters = {}
  local fe = parse_filter_expr(c, { t = 'blockval' })
  c:expect_end()
  filters = fe
  local body, _, ec = parse_body(p, { endset = true })
  ec:expect_end()
  return { t = 'setblock', target = target, body = body, filter = filters, line = line }
end

STATEMENTS['macro'] = function(p, c, line)
  local name = c:expect_name('macro name')
  c:expect_op('(')
  local ps = {}
  while not c:is_op(')') do
    if #ps > 0 then c:expect_op(',') end
    if c:is_op(')') then break end
    local pname = c:expect_name('parameter name')
    local default
    if c:accept_op('=') then default = parse_expression(c) end
    ps[#ps + 1] = { pname, default }
  end
  c:expect_op(')')
  c:expect_end()
  local body, _, ec = parse_body(p, { endmacro = true })
  if ec:is_name(name) then ec:next() end
  ec:expect_end()
  return { t = 'macro', name = name, params = ps, body = body, line = line }
end

STATEMENTS['break'] = function(p, c, line)
  if not p.in_loop or p.in_loop == 0 then syntax_error("'break' outside of a loop", line) end
  c:expect_end()
  return { t = 'break', line = line }
end

STATEMENTS['continue'] = function(p, c, line)
  if not p.in_loop or p.in_loop == 0 then syntax_error("'continue' outside of a loop", line) end
  c:expect_end()
  return { t = 'continue', line = line }
end

STATEMENTS['generation'] = function(p, c, line)
  c:expect_end()
  local body, _, ec = parse_body(p, { endgeneration = true })
  ec:expect_end()
  return { t = 'generation', body = body, line = line }
end

STATEMENTS['filter'] = function(p, c, line)
  local fe = parse_filter_expr(cursor({ { t = 'op', v = '|', line = line }, unpack(c.toks, c.k) }, line),
    { t = 'blockval' })
  local body, _, ec = parse_body(p, { endfilter = true })
  ec:expect_end()
  return { t = 'filterblock', filter = fe, body = body, line = line }
end

-- Parses items until one of end_tags; returns body, the end tag's name and a cursor after it.
parse_body = function(p, end_tags, loop_body)
  local body = {}
  if loop_body then p.in_loop = (p.in_loop or 0) + 1 end
  while true do
    local item = p.items[p.i]
    if not item then
      if end_tags then
        local want = {}
        for k in pairs(end_tags) do want[#want + 1] = "'" .. k .. "'" end
        table.sort(want)
        syntax_error('Unexpected end of template. Jinja was looking for the following tags: ' ..
          concat(want, ' or ') .. '.', p.eof_line or p.last_line)
      end
      return body
    end
    p.i = p.i + 1
    p.last_line = item.line or p.last_line
    if item.t == 'data' then
      body[#body + 1] = { t = 'data', v = item.v }
    elseif item.t == 'var' then
      local c = block_cursor(item)
      if c:at_end() then syntax_error('Expected an expression, got end of print statement', item.line) end
      local e = parse_tuple(c, false)
      if not c:at_end() then c:fail("expected token 'end of print statement', got " .. describe(c:peek())) end
      body[#body + 1] = { t = 'output', e = e, line = item.line }
    else
      local c = block_cursor(item)
      local t = c:next()
      if not t or t.t ~= 'name' then syntax_error('tag name expected', item.line) end
      if end_tags and end_tags[t.v] then
        if loop_body then p.in_loop = p.in_loop - 1 end
        return body, t.v, c
      end
      local st = STATEMENTS[t.v]
      if not st then
        local msg = "Encountered unknown tag '" .. t.v .. "'."
        if end_tags then
          local want = {}
          for k in pairs(end_tags) do want[#want + 1] = "'" .. k .. "'" end
          table.sort(want)
          msg = msg .. ' Jinja was looking for the following tags: ' .. concat(want, ' or ') .. '.'
        end
        syntax_error(msg, item.line)
      end
      local saved = p.in_loop
      if t.v == 'macro' then p.in_loop = 0 end
      body[#body + 1] = st(p, c, item.line)
      p.in_loop = saved
    end
  end
end

-- The body of a whole template, from lex(source).
local function parse(items)
  local p = { items = items, i = 1, last_line = 1, eof_line = items.last_line }
  return parse_body(p, nil)
end

return { parse = parse }
