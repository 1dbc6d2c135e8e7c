-- The lexer: splits a template source into data and tags ({{ }}, {% %}; comments and raw blocks are
-- resolved here), applying jinja2's whitespace control (trim_blocks, lstrip_blocks, '-' and '+'), and
-- tokenizes each tag's expression.
local V = require 'pmp.tokenizer.chat_template.values'
local S = require 'pmp.tokenizer.chat_template.strings'

local sub, find, concat = string.sub, string.find, table.concat
local mkfloat = V.mkfloat
local utf8_char, py_strip, str_repr = S.utf8_char, S.py_strip, S.str_repr

-- Syntax errors: tables with the line, turned into strings by compile.
local SyntaxMT = {}
local function syntax_error(msg, line) error(setmetatable({ msg = msg, line = line }, SyntaxMT), 0) end

local OPERATORS2 = { ['//'] = true, ['**'] = true, ['=='] = true, ['!='] = true, ['>='] = true, ['<='] = true }
local OPERATORS1 = {}
for c in ('+-/*%~[](){}><=.:|,;'):gmatch('.') do OPERATORS1[c] = true end
local CLOSE = { [')'] = '(', [']'] = '[', ['}'] = '{' }
local OPEN = { ['('] = ')', ['['] = ']', ['{'] = '}' }

-- Python string-literal escapes, as jinja2 decodes them ('unicode-escape').
local function unescape(s, line)
  if not find(s, '\\', 1, true) then return s end
  local out, i, n = {}, 1, #s
  while i <= n do
    local a = find(s, '\\', i, true)
    if not a then out[#out + 1] = sub(s, i); break end
    out[#out + 1] = sub(s, i, a - 1)
    local c = sub(s, a + 1, a + 1)
    i = a + 2
    if c == 'n' then out[#out + 1] = '\n'
    elseif c == 't' then out[#out + 1] = '\t'
    elseif c == 'r' then out[#out + 1] = '\r'
    elseif c == '\\' then out[#out + 1] = '\\'
    elseif c == "'" then out[#out + 1] = "'"
    elseif c == '"' then out[#out + 1] = '"'
    elseif c == 'a' then out[#out + 1] = '\a'
    elseif c == 'b' then out[#out + 1] = '\b'
    elseif c == 'f' then out[#out + 1] = '\f'
    elseif c == 'v' then out[#out + 1] = '\v'
    elseif c == '\n' then -- line continuation
    elseif c == 'x' or c == 'u' or c == 'U' then
      local len = c == 'x' and 2 or c == 'u' and 4 or 8
      local hex = sub(s, i, i + len - 1)
      if #hex ~= len or find(hex, '%X') then syntax_error('truncated \\' .. c .. ' escape in a string', line) end
      out[#out + 1] = utf8_char(tonumber(hex, 16))
      i = i + len
    elseif c:match('[0-7]') then
      local oct = s:match('^[0-7][0-7]?[0-7]?', a + 1)
      out[#out + 1] = utf8_char(tonumber(oct, 8))
      i = a + 1 + #oct
    else
      out[#out + 1] = '\\' .. c
    end
  end
  return concat(out)
end

local Lexer = {}
Lexer.__index = Lexer

-- The line number of byte p. Positions come mostly in increasing order, so it scans on from the last
-- answer (and starts over for an earlier one).
function Lexer:line_at(p)
  if p < self.line_pos then self.line_pos, self.line_no = 1, 1 end
  while true do
    local a = find(self.src, '\n', self.line_pos, true)
    if not a or a >= p then break end
    self.line_no = self.line_no + 1
    self.line_pos = a + 1
  end
  return self.line_no
end

function Lexer:push_data(text, at)
  if text ~= '' then
    local items = self.items
    items[#items + 1] = { t = 'data', v = text }
    items.last_line = self:line_at(at)
  end
end

-- The data before a tag (starting at byte `start`), with the whitespace that the tag's sign or
-- lstrip_blocks removes stripped.
function Lexer:lstrip_text(text, start, sign, is_var)
  if sign == '-' then return (py_strip(text, nil, false, true)) end
  if sign ~= '+' and not is_var then
    local nl = 0
    local p = 0
    while true do
      local a = find(text, '\n', p + 1, true)
      if not a then break end
      nl, p = a, a
    end
    if nl > 0 or start == 1 or sub(self.src, start - 1, start - 1) == '\n' then
      local tail = sub(text, nl + 1)
      if tail ~= '' and find(tail, '^%s+$') then return sub(text, 1, nl) end
    end
  end
  return text
end

-- Position after a block end (p at '%}' or '-%}' or '+%}'), or nil.
function Lexer:block_end(p, closer)
  local src = self.src
  local c = sub(src, p, p)
  if c == '+' and sub(src, p + 1, p + 2) == closer then return p + 3 end
  if c == '-' and sub(src, p + 1, p + 2) == closer then
    local q = p + 3
    local _, e = find(src, '^%s+', q)
    return e and e + 1 or q
  end
  if sub(src, p, p + 1) == closer then
    if closer == '%}' and sub(src, p + 2, p + 2) == '\n' then return p + 3 end
    return p + 2
  end
  return nil
end

-- Position after the end of a comment whose body starts at body_start.
function Lexer:skip_comment(body_start, tagline)
  local src = self.src
  local e = find(src, '#}', body_start, true)
  if not e then syntax_error('Missing end of comment tag', tagline) end
  local before = e > body_start and sub(src, e - 1, e - 1) or ''
  if before == '-' then
    local _, we = find(src, '^%s+', e + 2)
    return we and we + 1 or e + 2
  elseif before == '+' then
    return e + 2
  end
  local pos = e + 2
  if sub(src, pos, pos) == '\n' then pos = pos + 1 end
  return pos
end

-- A {% raw %} block whose tag body starts at body_start: its text up to {% endraw %} is data.
-- Returns the position after the endraw tag.
function Lexer:raw_block(body_start, tagline)
  local src = self.src
  local _, e = find(src, '^%s*raw%s*[-]?%%}', body_start)
  local rawstart = e + 1
  if sub(src, e - 2, e - 2) == '-' then
    local _, we = find(src, '^%s+', rawstart)
    rawstart = we and we + 1 or rawstart
  end
  local p = rawstart
  while true do
    local a = find(src, '{%', p, true)
    if not a then syntax_error('Missing end of raw directive', tagline) end
    local esign = sub(src, a + 2, a + 2)
    if esign ~= '-' and esign ~= '+' then esign = '' end
    local _, ee = find(src, '^%s*endraw%s*', a + 2 + #esign)
    if ee then
      local after = self:block_end(ee + 1, '%}')
      if after then
        local body = sub(src, rawstart, a - 1)
        self:push_data(self:lstrip_text(body, rawstart, esign, false), rawstart)
        return after
      end
    end
    p = a + 2
  end
end

-- Position after the closing delimiter of a {{ }} (is_var) or {% %} tag when it is at p, else nil.
function Lexer:tag_end(p, is_var)
  if not is_var then return self:block_end(p, '%}') end
  local src = self.src
  if sub(src, p, p + 2) == '-}}' then
    local _, we = find(src, '^%s+', p + 3)
    return we and we + 1 or p + 3
  elseif sub(src, p, p + 1) == '}}' then
    return p + 2
  end
  return nil
end

-- Each token scanner takes the token's first byte p and its line; returns the token and the position
-- after it.

function Lexer:number(p, line)
  local src = self.src
  local _, ie = find(src, '^%d[%d_]*', p)
  local isflt = false
  local num_end = ie
  if sub(src, p - 1, p - 1) ~= '.' then
    local _, fe = find(src, '^%.%d[%d_]*', ie + 1)
    if fe then num_end = fe; isflt = true end
    local _, ee = find(src, '^[eE][-+]?%d[%d_]*', num_end + 1)
    if ee then num_end = ee; isflt = true end
  end
  local text_num = sub(src, p, num_end):gsub('_', '')
  local v = tonumber(text_num)
  return { t = isflt and 'float' or 'integer', v = isflt and mkfloat(v) or v, line = line }, num_end + 1
end

function Lexer:name(p, line)
  local _, ne = find(self.src, '^[%w_]+', p)
  return { t = 'name', v = sub(self.src, p, ne), line = line }, ne + 1
end

function Lexer:string_literal(p, quote, line)
  local src = self.src
  local q = p + 1
  while true do
    local a = find(src, '[\\' .. quote .. ']', q)
    if not a then syntax_error('unexpected char ' .. str_repr(quote) .. ' (unterminated string)', line) end
    if sub(src, a, a) == '\\' then q = a + 2 else q = a; break end
  end
  return { t = 'string', v = unescape(sub(src, p + 1, q - 1), line), line = line }, q + 1
end

-- stack: the closing brackets the tag still expects, innermost last.
function Lexer:operator(p, c, line, stack)
  local two = sub(self.src, p, p + 1)
  local op
  if OPERATORS2[two] then op = two elseif OPERATORS1[c] then op = c end
  if not op then syntax_error('unexpected char ' .. str_repr(c), line) end
  if OPEN[op] then
    stack[#stack + 1] = OPEN[op]
  elseif CLOSE[op] then
    if #stack == 0 then syntax_error("unexpected '" .. op .. "'", line) end
    local want = table.remove(stack)
    if want ~= op then syntax_error("unexpected '" .. op .. "', expected '" .. want .. "'", line) end
  end
  return { t = 'op', v = op, line = line }, p + #op
end

-- Tokenizes the body of a {{ }} (is_var) or {% %} tag starting at body_start, adds the tag to items
-- and returns the position after it. The tag ends at the first closing delimiter outside brackets.
function Lexer:tag(body_start, is_var, tagline)
  local src, len = self.src, self.len
  local toks, stack = {}, {}
  local p = body_start
  while true do
    if p > len then
      syntax_error('unexpected end of template, expected ' .. (is_var and "'end of print statement'" or
        "'end of statement block'"), tagline)
    end
    if #stack == 0 then
      local after = self:tag_end(p, is_var)
      if after then
        local items = self.items
        items.last_line = self:line_at(p)
        items[#items + 1] = { t = is_var and 'var' or 'block', toks = toks, line = tagline }
        return after
      end
    end
    local c = sub(src, p, p)
    local line = self:line_at(p)
    local _, we = find(src, '^%s+', p)
    local tok
    if we then
      p = we + 1
    elseif c:match('%d') then
      tok, p = self:number(p, line)
    elseif c:match('[%a_]') then
      tok, p = self:name(p, line)
    elseif c == '"' or c == "'" then
      tok, p = self:string_literal(p, c, line)
    else
      tok, p = self:operator(p, c, line, stack)
    end
    if tok then toks[#toks + 1] = tok end
  end
end

-- Returns a list of items: {t='data', v=}, {t='var'|'block', toks=, line=}; items.last_line is the
-- line where the last item ends.
local function lex(src)
  src = src:gsub('\r\n', '\n'):gsub('\r', '\n')
  if sub(src, -1) == '\n' then src = sub(src, 1, -2) end
  local lx = setmetatable({ src = src, len = #src, items = {}, line_pos = 1, line_no = 1 }, Lexer)
  local pos = 1
  while pos <= lx.len do
    local s = find(src, '{[{%%#]', pos)
    if not s then lx:push_data(sub(src, pos), pos); break end
    local kc = sub(src, s + 1, s + 1)
    local sign = sub(src, s + 2, s + 2)
    if sign ~= '-' and sign ~= '+' then sign = '' end
    local text = sub(src, pos, s - 1)
    local tagline = lx:line_at(s)
    local body_start = s + 2 + #sign
    if kc == '#' then
      lx:push_data(lx:lstrip_text(text, pos, sign, false), pos)
      pos = lx:skip_comment(body_start, tagline)
    elseif kc == '%' and find(src, '^%s*raw%s*[-]?%%}', body_start) then
      lx:push_data(lx:lstrip_text(text, pos, sign, false), pos)
      pos = lx:raw_block(body_start, tagline)
    else
      local is_var = kc == '{'
      lx:push_data(lx:lstrip_text(text, pos, sign, is_var), pos)
      pos = lx:tag(body_start, is_var, tagline)
    end
  end
  return lx.items
end

return { lex = lex, syntax_error = syntax_error, SyntaxMT = SyntaxMT }
