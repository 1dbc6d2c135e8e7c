-- The interactive prompt's Lua side. The host (core/host/repl.c) reads the lines and calls:
--   repl.start()                       once, before the first prompt
--   repl.feed(line)                    per line: the whole statement's source once it is complete
--                                      (or has a syntax error), nil while it needs more lines
--   repl.execute()                     runs the statement the last feed completed, printing its values
--   repl.discard()                     drops the lines typed so far (Ctrl-C at the prompt)
--   repl.complete(text, line, cursor)  tab-completion candidates for the word `text` before the cursor
-- Besides Lua, the prompt takes `?x` for help(x), `?x:m` for help(x.m) and a bare `help` for help().
-- help(x) (lua/pmp/help.lua) shows the doc comment of what x is: the `---` lines directly above its
-- definition in the source.
local repl = {}

local CHUNK_NAME = '=stdin'
local MAX_DEPTH = 4       -- nested tables shown before `{...}`
local MAX_ENTRIES = 50    -- entries shown per table
local LINE_WIDTH = 80     -- a table that fits stays on one line

local KEYWORDS = {}
for word in ([[and break do else elseif end false for function goto if in local nil not or repeat
               return then true until while]]):gmatch('%a+') do
  KEYWORDS[word] = true
end

local pending_lines = {}
local ready_statement -- { fn = compiled chunk } or { syntax_error = message }

local function is_identifier(key)
  return type(key) == 'string' and key:match('^[%a_][%w_]*$') ~= nil and not KEYWORDS[key]
end

---------------------------------------------------------------------------------------------------
-- Reading statements

-- An expression is compiled so that its values print; anything else as a statement, whose error
-- decides whether the input is merely unfinished. The expression is an argument list rather than
-- `return <expression>`, where a call would be a tail call and its error lose the line and the stack.
local function compile(source)
  local expression = loadstring('return (function(...) return ... end)(' .. source .. '\n)', CHUNK_NAME)
  if expression then return expression end
  return loadstring(source, CHUNK_NAME)
end

-- `?x` stands for help(x) (`?x:m` for help(x.m)), and `help` alone for help() while help is still pmp's.
local function expand_help_shorthand(source)
  local subject = source:match('^%s*%?%s*(.-)%s*$')
  if subject then
    local object, method = subject:match('^(.-):([%a_][%w_]*)$')
    return 'help(' .. (object and object .. '.' .. method or subject) .. ')'
  end
  if source:match('^%s*help%s*$') and rawget(_G, 'help') == require('pmp.help').print then return 'help()' end
  return source
end

function repl.feed(line)
  pending_lines[#pending_lines + 1] = line
  local source = table.concat(pending_lines, '\n')
  local fn, message = compile(expand_help_shorthand(source))
  if not fn and message:find("'<eof>'$") then return nil end
  pending_lines = {}
  ready_statement = fn and { fn = fn } or { syntax_error = message }
  return source
end

function repl.discard()
  pending_lines = {}
  ready_statement = nil
end

---------------------------------------------------------------------------------------------------
-- Showing values

local function describe_error(err)
  if type(err) == 'string' or type(err) == 'number' then return tostring(err) end
  local mt = getmetatable(err)
  if type(mt) == 'table' and mt.__tostring then return tostring(err) end
  return '(error object is a ' .. type(err) .. ' value)'
end

local function quote(s)
  return (string.format('%q', s):gsub('\\\n', '\\n'))
end

local function has_tostring(value)
  if type(value) == 'cdata' then return true end -- FFI metatypes hide their metatable
  local mt = getmetatable(value)
  return type(mt) == 'table' and rawget(mt, '__tostring') ~= nil
end

local function safe_tostring(value)
  local ok, text = pcall(tostring, value)
  return ok and text or '<__tostring failed: ' .. describe_error(text) .. '>'
end

-- Numbers first (ascending), then strings, then everything else by its printed form.
local TYPE_ORDER = { number = 1, string = 2 }
local function key_before(a, b)
  local ta, tb = TYPE_ORDER[type(a)] or 3, TYPE_ORDER[type(b)] or 3
  if ta ~= tb then return ta < tb end
  if ta == 3 then return tostring(a) < tostring(b) end
  return a < b
end

local render

-- Multi-line layout: one keyed entry per line; runs of short array entries share lines.
local function layout(entries, packable, indent)
  local inner, lines = indent .. '  ', {}
  for i, entry in ipairs(entries) do
    local piece = entry .. (i < #entries and ',' or '')
    local last = lines[#lines]
    if packable[i] and packable[i - 1] and #inner + #last + 1 + #piece <= LINE_WIDTH then
      lines[#lines] = last .. ' ' .. piece
    else
      lines[#lines + 1] = piece
    end
  end
  return '{\n' .. inner .. table.concat(lines, '\n' .. inner) .. '\n' .. indent .. '}'
end

-- `ancestors` holds the tables being rendered around this one: meeting one again is a cycle.
local function render_table(t, depth, ancestors, indent)
  if ancestors[t] then return '<cycle>' end
  if depth > MAX_DEPTH then return '{...}' end
  ancestors[t] = true
  local inner = indent .. '  '
  local entries, packable, array_length = {}, {}, #t
  for i = 1, math.min(array_length, MAX_ENTRIES) do
    entries[i] = render(rawget(t, i), depth + 1, ancestors, inner)
    packable[i] = not entries[i]:find('\n')
  end
  local keys = {}
  for key in next, t do
    local in_array = type(key) == 'number' and key >= 1 and key <= array_length and key % 1 == 0
    if not in_array then keys[#keys + 1] = key end
  end
  table.sort(keys, key_before)
  for _, key in ipairs(keys) do
    if #entries >= MAX_ENTRIES then break end
    local key_text = is_identifier(key) and key or '[' .. render(key, depth + 1, ancestors, inner) .. ']'
    entries[#entries + 1] = key_text .. ' = ' .. render(rawget(t, key), depth + 1, ancestors, inner)
  end
  local hidden = array_length + #keys - #entries
  if hidden > 0 then entries[#entries + 1] = '... (' .. hidden .. ' more)' end
  ancestors[t] = nil

  local one_line = '{' .. table.concat(entries, ', ') .. '}'
  if #indent + #one_line <= LINE_WIDTH and not one_line:find('\n') then return one_line end
  return layout(entries, packable, indent)
end

function render(value, depth, ancestors, indent)
  if type(value) == 'string' then return quote(value) end
  if has_tostring(value) then return safe_tostring(value) end
  if type(value) == 'table' then return render_table(value, depth, ancestors, indent) end
  return tostring(value)
end

-- How the prompt shows a value: strings quoted, tables expanded, tensors and modules by __tostring.
function repl.format(value)
  return render(value, 1, {}, '')
end

---------------------------------------------------------------------------------------------------
-- Running statements

-- The traceback stops at the statement: the frames below it are the REPL's own.
local function traceback(err)
  local text = debug.traceback(describe_error(err), 2)
  local repl_frames = text:find("\n%s*%[C%]: in function 'xpcall'")
  return repl_frames and text:sub(1, repl_frames - 1) or text
end

local function pack(...)
  return { n = select('#', ...), ... }
end

function repl.execute()
  local statement = ready_statement
  ready_statement = nil
  if not statement then return end
  if statement.syntax_error then
    io.stderr:write(statement.syntax_error, '\n')
    return
  end
  local results = pack(xpcall(statement.fn, traceback))
  if not results[1] then
    io.stderr:write(results[2], '\n')
    return
  end
  local shown = {}
  for i = 2, results.n do shown[#shown + 1] = repl.format(results[i]) end
  if #shown > 0 then io.write(table.concat(shown, '\t'), '\n') end
end

---------------------------------------------------------------------------------------------------
-- Tab completion. Names are found by raw reads of tables and of the __index tables up their
-- metatable chain; completion never calls a function or an __index metamethod, so it cannot have
-- side effects. Tensors (FFI cdata) are described by pmp.tensor_methods and pmp.tensor_fields.

local function pmp_library()
  local pmp = package.loaded.pmp
  return type(pmp) == 'table' and pmp or nil
end

local function is_tensor(value)
  local pmp = pmp_library()
  local check = pmp and rawget(pmp, 'is_tensor')
  return type(value) == 'cdata' and type(check) == 'function' and check(value) == true
end

local function index_table(value)
  if type(value) == 'cdata' then return nil end -- getmetatable on cdata only says 'ffi'
  local mt = getmetatable(value)
  local index = type(mt) == 'table' and rawget(mt, '__index')
  return type(index) == 'table' and index or nil
end

-- The tables whose keys are fields of `value`: itself if a table, then its __index chain.
local function field_sources(value)
  local sources, seen = {}, {}
  local source = type(value) == 'table' and value or index_table(value)
  while source and not seen[source] do
    sources[#sources + 1], seen[source] = source, true
    source = index_table(source)
  end
  return sources
end

-- Tables whose metatable has __pmp_members (pmp itself, nn modules) list their members through it,
-- and are indexed normally: their __index only looks up parameters, children and lazy modules.
local function members_hook(value)
  if type(value) ~= 'table' then return nil end
  local mt = getmetatable(value)
  local hook = type(mt) == 'table' and rawget(mt, '__pmp_members')
  return type(hook) == 'function' and hook or nil
end

local function lookup(value, key)
  for _, source in ipairs(field_sources(value)) do
    local found = rawget(source, key)
    if found ~= nil then return found end
  end
  if members_hook(value) then
    local ok, found = pcall(function() return value[key] end)
    if ok then return found end
  end
  return nil
end

local function tensor_member_names(methods_only, add)
  local pmp = pmp_library()
  local methods = rawget(pmp, 'tensor_methods')
  if type(methods) == 'table' then
    for name, method in next, methods do
      if type(method) == 'function' then add(name) end
    end
  end
  local fields = rawget(pmp, 'tensor_fields')
  if not methods_only and type(fields) == 'table' then
    for _, name in ipairs(fields) do add(name) end
  end
end

-- Names reachable from `value` with '.' (any field) or ':' (methods only).
local function member_names(value, methods_only)
  local names = {}
  local function add(name)
    if is_identifier(name) then names[#names + 1] = name end
  end
  if is_tensor(value) then
    tensor_member_names(methods_only, add)
  else
    for _, source in ipairs(field_sources(value)) do
      for name, member in next, source do
        if not methods_only or type(member) == 'function' then add(name) end
      end
    end
    local hook = members_hook(value)
    if hook then
      local ok, extra = pcall(hook, value)
      if ok and type(extra) == 'table' then
        for _, name in ipairs(extra) do
          if not methods_only or type(lookup(value, name)) == 'function' then add(name) end
        end
      end
    end
  end
  return names
end

-- Whether the cursor position `offset` of `line` is inside a quoted string.
local function inside_string(line, offset)
  local quote_char, i = nil, 1
  while i <= offset do
    local c = line:sub(i, i)
    if quote_char and c == '\\' then
      i = i + 1
    elseif c == quote_char then
      quote_char = nil
    elseif not quote_char and (c == '"' or c == "'") then
      quote_char = c
    end
    i = i + 1
  end
  return quote_char ~= nil
end

-- Evaluates a dotted path such as `pmp.nn` from the globals; nil if any step is missing.
local function resolve_path(path)
  local value = _G
  for name in (path .. '.'):gmatch('(.-)%.') do
    if not is_identifier(name) then return nil end
    value = lookup(value, name)
    if value == nil then return nil end
  end
  return value
end

-- Candidates replacing the word `text` (ending at byte `cursor` of `line`): `pmp.ze` gives
-- `pmp.zeros`, `x:su` gives `x:sum`, `pri` gives `print`, `cfg['hid` gives `hidden_size`. Sorted,
-- without duplicates.
-- Candidates for a string key being typed in brackets: `sd['decoder.la` gives the keys of sd that
-- start with 'decoder.la' (as far as readline's word reaches: keys with spaces or quotes are left out).
local function complete_bracket_key(text, before)
  local path = before:match('([%a_][%w_.]*)%[%s*[\'"]$')
  local value = path and resolve_path(path)
  if type(value) ~= 'table' then return {} end
  local candidates, seen = {}, {}
  for _, source in ipairs(field_sources(value)) do
    for key in next, source do
      if type(key) == 'string' and key:sub(1, #text) == text and not seen[key] and not key:find('[%s\'"]') then
        candidates[#candidates + 1], seen[key] = key, true
      end
    end
  end
  table.sort(candidates)
  return candidates
end

function repl.complete(text, line, cursor)
  local before = line:sub(1, cursor - #text)
  if inside_string(line, cursor - #text) then return complete_bracket_key(text, before) end
  local path, separator, partial = text:match('^(.*)([.:])([%w_]*)$')
  local prefix, names
  if path then
    local value = resolve_path(path)
    if value == nil then return {} end
    prefix, names = path .. separator, member_names(value, separator == ':')
  elseif text:match('^[%w_]*$') then
    prefix, partial, names = '', text, member_names(_G, false)
    for word in pairs(KEYWORDS) do names[#names + 1] = word end
  else
    return {}
  end
  local show_private = partial:sub(1, 2) == '__' -- metamethods and other __names only when asked for
  local candidates, seen = {}, {}
  for _, name in ipairs(names) do
    local wanted = name:sub(1, #partial) == partial and not seen[name]
    if wanted and (show_private or name:sub(1, 2) ~= '__') then
      candidates[#candidates + 1], seen[name] = prefix .. name, true
    end
  end
  table.sort(candidates)
  return candidates
end

-- help(x) and the prompt's shorthands for it are pmp.help's (see there for the doc comment convention).
function repl.start()
  if rawget(_G, 'help') == nil then rawset(_G, 'help', require('pmp.help').print) end
end

return repl
