--- pmp.help: documentation read from the source, behind the REPL's help(x), ?x and help 'topic'.
--- help(x) shows the signature and doc comment of a function, class, module or tensor method.
--
-- The doc comment convention, the one help reads everywhere: in the run of comment lines directly
-- above a definition, the lines that start with `---` are its documentation; plain `--` lines are
-- notes for readers of the code and stay out of help. A definition is a `function` statement
-- (`function M.f(a)`, `function Class:m(a)`, `local function f(a)`), an assignment of a function or
-- class (`M.add = binary(...)`, `M.Linear = Module:extend('Linear')`, `local AdamW = {}`), or, for a
-- module or a script, the comment block that opens its file. A separator line of dashes is not a doc
-- line. Keep a doc comment short: what it does, its arguments and options with their defaults, what
-- it returns; the signature comes from the code.
local help = {}

---------------------------------------------------------------------------------------------------
-- Reading doc comments

local source_cache = {}

-- The lines of a source file, or nil when the file cannot be read.
local function source_lines(path)
  if source_cache[path] == nil then
    local file = io.open(path)
    if not file then
      source_cache[path] = false
    else
      local lines = {}
      for line in file:lines() do lines[#lines + 1] = line end
      file:close()
      source_cache[path] = lines
    end
  end
  return source_cache[path] or nil
end

-- `---` followed by a space or nothing: a doc line. A separator line of dashes is not one.
local function doc_text(line)
  return line:match('^%s*%-%-%- (.*)$') or (line:match('^%s*%-%-%-$') and '')
end

-- The doc lines of the comment block that ends just above line `n`.
local function doc_above(lines, n)
  local doc, i = {}, n - 1
  while i >= 1 and lines[i]:match('^%s*%-%-') do
    local text = doc_text(lines[i])
    if text then table.insert(doc, 1, text) end
    i = i - 1
  end
  return doc
end

-- The doc lines of the comment block that opens a file.
local function file_doc(lines)
  local doc, i = {}, 1
  while lines[i] and lines[i]:match('^%s*%-%-') do
    local text = doc_text(lines[i])
    if text then doc[#doc + 1] = text end
    i = i + 1
  end
  return doc
end

local function escape_pattern(s)
  return (s:gsub('%p', '%%%0'))
end

-- The name a line defines (`function a.b:key(`, `a.key = `), or nil.
local function defined_key(line)
  return line:match('^%s*function%s+[%w_.:]-([%w_]+)%s*%(') or line:match('^%s*[%w_.]-%.([%w_]+)%s*=[^=]')
end

-- A line with what varies between sibling definitions masked: its own name, strings, numbers and
-- constants.
-- `Tensor.add = binary(C.PMP_OP_ADD, 'add')` and `Tensor.sub = ...` look the same.
local function line_shape(line)
  local key = defined_key(line)
  if not key then return nil end
  local shape = line:gsub(escape_pattern(key), '\0'):gsub("%b''", '\1'):gsub('%b""', '\1')
  return (shape:gsub('[%w_]+', function(word)
    if word:match('^%d') or word:match('%u') and word:match('^[%u%d_]+$') then return '\2' end
  end))
end

-- The doc comment above line n; a definition without one that continues a run of look-alike lines
-- (`Tensor.sub = binary(...)` below `Tensor.add = binary(...)`) shares the doc of the run's first.
local function doc_of(lines, n)
  local shape, first = line_shape(lines[n]), n
  while shape and first > 1 and line_shape(lines[first - 1]) == shape do first = first - 1 end
  return doc_above(lines, first)
end

-- Whether `line` defines `key`: `function a.key(`, `function a:key(`, `local function key(`,
-- `a.key = ...` or `local key = ...`.
local function defines(line, key)
  local k = escape_pattern(key)
  return line:match('^%s*function%s+[%w_.:]-[.:]' .. k .. '%s*%(') ~= nil
    or line:match('^%s*local%s+function%s+' .. k .. '%s*%(') ~= nil
    or line:match('^%s*function%s+' .. k .. '%s*%(') ~= nil
    or line:match('^%s*[%w_.]-%.' .. k .. '%s*=[^=]') ~= nil
    or line:match('^%s*local%s+' .. k .. '%s*=[^=]') ~= nil
end

-- The line that defines `key` in `lines`: `hint` (where the function value itself begins) when it
-- names key, else the first line that does. A function made by a factory (`M.add = binary(...)`) begins
-- inside the factory, so its doc sits above the assignment instead.
local function definition_line(lines, key, hint)
  if hint and lines[hint] and (key == nil or defines(lines[hint], key)) then return hint end
  if key == nil then return nil end
  for i, line in ipairs(lines) do
    if defines(line, key) then return i end
  end
  return nil
end

local function file_of(fn)
  local info = debug.getinfo(fn, 'S')
  if info.what ~= 'Lua' or info.source:sub(1, 1) ~= '@' then return nil, nil end
  return info.source:sub(2), info.linedefined
end

-- Whether the `function` statement that made fn names it `key`.
local function named_where_defined(fn, key)
  local path, line = file_of(fn)
  local lines = path and source_lines(path)
  return lines ~= nil and lines[line] ~= nil and defines(lines[line], key)
end

-- A project-relative path for showing where something is defined.
local function shown_path(path)
  local root = package.loaded['pmp.root']
  if type(root) == 'string' and path:sub(1, #root + 1) == root .. '/' then return path:sub(#root + 2) end
  return path
end

---------------------------------------------------------------------------------------------------
-- What a value is

local function parameter_names(fn)
  local info = debug.getinfo(fn, 'u')
  local names = {}
  for i = 1, info.nparams or 0 do names[i] = debug.getlocal(fn, i) or ('arg' .. i) end
  if info.isvararg then names[#names + 1] = '...' end
  return names
end

-- A callable table made by nn.Module:extend or with a __call constructor (AdamW, SGD).
local function is_class(value)
  if type(value) ~= 'table' then return false end
  if rawget(value, '__instance_mt') ~= nil then return true end
  if rawget(value, '__index') == value then return true end -- a metatable for instances (Tokenizer)
  local mt = getmetatable(value)
  return type(mt) == 'table' and rawget(mt, '__call') ~= nil and rawget(value, 'new') ~= nil
end

-- The function that builds instances: init (nn modules, found up the class chain) or new.
local function constructor(class)
  if rawget(class, '__instance_mt') ~= nil then
    local c = class
    while c do
      if type(rawget(c, 'init')) == 'function' then return rawget(c, 'init'), true end
      c = rawget(c, '__super')
    end
  end
  return rawget(class, 'new'), false
end

local function loaded_module_name(value)
  for name, loaded in pairs(package.loaded) do
    if loaded == value and name:match('^pmp') and name ~= 'pmp.root' then return name end
  end
  return nil
end

---------------------------------------------------------------------------------------------------
-- The documented names: pmp, the modules it loads on first use, their functions, classes and
-- methods, and the tensor methods. Built on demand by walking the tables (no function is called
-- except the requires of pmp's modules).

-- Whether a module name such as 'pmp.nn.functional' is a path of fields from pmp.
local function reachable(pmp, module_name)
  local value = pmp
  for part in module_name:gmatch('%.([^.]+)') do
    value = type(value) == 'table' and rawget(value, part) or nil
  end
  return value ~= nil and value == package.loaded[module_name]
end

local INTERNAL_MODULES = { ffi = true, repl = true, root = true }

local function sorted_keys(t)
  local keys = {}
  for key in next, t do
    if type(key) == 'string' and key:match('^[%a][%w_]*$') then keys[#keys + 1] = key end
  end
  table.sort(keys)
  return keys
end

-- Loads the modules of pmp that load on first use, so that the index and searches see them all:
-- name -> module.
local function load_modules(pmp)
  local mt = getmetatable(pmp)
  local list = mt and rawget(mt, '__pmp_members')
  local modules = {}
  if type(list) ~= 'function' then return modules end
  for _, name in ipairs(list(pmp)) do
    if not INTERNAL_MODULES[name] then
      local ok, module = pcall(function() return pmp[name] end)
      if ok and module ~= nil then modules[name] = module end
    end
  end
  return modules
end

-- entries: a list of {name, value, kind, key} in walking order; by_value: value -> entry.
local function collect()
  local pmp = package.loaded.pmp
  local entries, by_value = {}, {}
  if type(pmp) ~= 'table' then return entries, by_value end
  local lazy_modules = load_modules(pmp)

  local function add(entry)
    if by_value[entry.value] then return end
    entries[#entries + 1], by_value[entry.value] = entry, entry
  end

  local visit
  local function visit_members(t, name, depth)
    for _, key in ipairs(sorted_keys(t)) do
      local value = rawget(t, key)
      if not (key == 'tensor_methods' or key == 'tensor_fields' or INTERNAL_MODULES[key]) then
        visit(value, name .. '.' .. key, key, depth + 1)
      end
    end
  end

  function visit(value, name, key, depth)
    local known = by_value[value]
    if known and known.kind == 'function' and type(value) == 'function' and named_where_defined(value, key)
        and not named_where_defined(value, known.key) then
      known.name, known.key = name, key   -- an alias was met first (from_file = from_pretrained)
    end
    if known or depth > 4 then return end
    if type(value) == 'function' then
      add({ name = name, value = value, kind = 'function', key = key })
    elseif is_class(value) then
      add({ name = name, value = value, kind = 'class', key = key })
      for _, method in ipairs(sorted_keys(value)) do
        local fn = rawget(value, method)
        if type(fn) == 'function' and method ~= 'init' and method ~= 'new' and not by_value[fn] then
          local self_first = parameter_names(fn)[1] == 'self'
          add({ name = name .. (self_first and ':' or '.') .. method, value = fn, kind = 'method', key = method,
                drop_first = self_first })
        end
      end
    elseif type(value) == 'table' then
      local module_name = loaded_module_name(value)
      -- an alias such as pmp.F is skipped: the module is listed under its own name, pmp.nn.functional
      if module_name and module_name ~= name and reachable(pmp, module_name) then return end
      if module_name then add({ name = name, value = value, kind = 'module' }) end
      if module_name or getmetatable(value) == nil then visit_members(value, name, depth) end
    end
  end

  add({ name = 'pmp', value = pmp, kind = 'module' })
  visit_members(pmp, 'pmp', 0)
  for _, key in ipairs(sorted_keys(lazy_modules)) do visit(lazy_modules[key], 'pmp.' .. key, key, 1) end
  local methods = rawget(pmp, 'tensor_methods')
  if type(methods) == 'table' then
    for _, key in ipairs(sorted_keys(methods)) do
      local fn = rawget(methods, key)
      if type(fn) == 'function' and not by_value[fn] then
        add({ name = 'tensor:' .. key, value = fn, kind = 'method', key = key, drop_first = true })
      end
    end
  end
  return entries, by_value
end

---------------------------------------------------------------------------------------------------
-- Describing one entry

-- s1, s2, ..., s10 (sizes passed one by one, see Tensor.view) shortened to s1, s2, ...
local function shorten_numbered(params)
  local out, i = {}, 1
  while i <= #params do
    local stem = params[i]:match('^(.-)1$')
    local j = i
    while stem and params[j + 1] == stem .. (j - i + 2) do j = j + 1 end
    if stem and j - i >= 3 then
      out[#out + 1], out[#out + 2], out[#out + 3] = params[i], params[i + 1], '...'
      i = j + 1
    else
      out[#out + 1], i = params[i], i + 1
    end
  end
  return out
end

local function signature_of(fn, name, drop_first)
  local params = parameter_names(fn)
  if drop_first then table.remove(params, 1) end
  return name .. '(' .. table.concat(shorten_numbered(params), ', ') .. ')'
end

-- {signature, doc lines, where} of an entry (or of an unnamed value: entry.name may be nil).
local function describe(entry)
  local value, name = entry.value, entry.name or '?'
  if entry.kind == 'module' then
    local module_name = loaded_module_name(value)
    local path = module_name and package.searchpath(module_name, package.path)
    local lines = path and source_lines(path)
    return { signature = name, doc = lines and file_doc(lines) or {}, where = path and shown_path(path) }
  end
  if entry.kind == 'class' then
    local init, is_init = constructor(value)
    local out = { signature = name, doc = {} }
    if not init then return out end
    out.signature = signature_of(init, name, is_init)
    local path = file_of(init)
    local lines = path and source_lines(path)
    if not lines then return out end
    local class_name = rawget(value, '__name')
    local line
    if type(class_name) == 'string' then
      local pattern = 'extend%(%s*[\'"]' .. escape_pattern(class_name) .. '[\'"]%s*%)'
      for i, text in ipairs(lines) do
        if text:match(pattern) then line = i break end
      end
    end
    line = line or definition_line(lines, entry.key)
    out.doc = line and doc_above(lines, line) or {}
    if #out.doc == 0 then  -- the constructor's own doc comment, when the class has none
      local _, init_line = file_of(init)
      out.doc = doc_above(lines, init_line)
    end
    -- a class that is its file's module (nn.Module) is documented at the top of the file
    if #out.doc == 0 and loaded_module_name(value) then out.doc = file_doc(lines) end
    out.where = line and shown_path(path) .. ':' .. line
    return out
  end
  -- a function or method
  local out = { signature = signature_of(value, name, entry.drop_first), doc = {} }
  if debug.getinfo(value, 'S').what ~= 'Lua' then
    out.doc = { 'built into LuaJIT (see the Lua 5.1 reference manual)' }
    return out
  end
  local path, linedefined = file_of(value)
  local lines = path and source_lines(path)
  if not lines then return out end
  local line = definition_line(lines, entry.key, linedefined)
  if line then
    out.doc = doc_of(lines, line)
    out.where = shown_path(path) .. ':' .. line
  end
  -- a module that is a function (pmp.generate) is documented at the top of its file
  if #out.doc == 0 and loaded_module_name(value) then out.doc = file_doc(lines) end
  return out
end

local function first_line(doc)
  return doc[1] or ''
end

-- Short names of an entry's documented members, e.g. the functions and classes of a module.
local function member_summary(entries, parent)
  local prefix = parent.name
  local names = {}
  for _, entry in ipairs(entries) do
    local rest = entry.name:sub(#prefix + 2)
    local direct = entry.name:sub(1, #prefix) == prefix and entry.name:sub(#prefix + 1, #prefix + 1):match('[.:]')
      and not rest:find('[.:]')
    if direct and entry.kind ~= 'module' and #describe(entry).doc > 0 then names[#names + 1] = rest end
  end
  return names
end

-- Words joined into lines of at most 100 columns, each starting with `indent`.
local function wrap(words, indent)
  local lines, line = {}, indent
  for _, word in ipairs(words) do
    if #line > #indent and #line + 1 + #word > 100 then
      lines[#lines + 1], line = line, indent
    end
    line = line .. (#line > #indent and ' ' or '') .. word
  end
  if #line > #indent then lines[#lines + 1] = line end
  return table.concat(lines, '\n')
end

local function show(entry, entries)
  local d = describe(entry)
  local out = { d.signature .. (d.where and ('    [' .. d.where .. ']') or '') }
  for _, line in ipairs(d.doc) do out[#out + 1] = '  ' .. line end
  if #d.doc == 0 then out[#out + 1] = '  (no doc comment)' end
  if entry.kind == 'module' or entry.kind == 'class' then
    local members = member_summary(entries, entry)
    if #members > 0 then out[#out + 1] = (entry.kind == 'class' and 'methods:' or 'members:') .. '\n' .. wrap(members, '  ') end
  end
  return table.concat(out, '\n')
end

---------------------------------------------------------------------------------------------------
-- help(x), help(), help 'topic'

local USAGE = [[
Type a Lua statement; an expression prints its value. The library is the global `pmp`.
  help(x), ?x      what x is: the signature and doc comment of a function, class, module or method
  help 'topic'     searches names and doc comments (help 'pmp.nn.Linear' shows that name,
                   help 'recipes/pretrain.lua' the doc comment atop that file)
  Tab              completes names, fields, methods after ':' and keys in t['...']
  Up/Down          walk the history (~/.pmp_history)
  Ctrl-C           interrupts a running statement, or discards the line being typed
  Ctrl-D           exits]]

-- The recipes shipped with pmp: recipes/*.lua under its root.
local function recipe_files()
  local root, names = package.loaded['pmp.root'], {}
  local listing = type(root) == 'string' and io.popen('ls ' .. root .. '/recipes 2>/dev/null')
  if not listing then return names end
  for entry in listing:lines() do
    if entry:match('^[%w_-]+%.lua$') then names[#names + 1] = 'recipes/' .. entry end
  end
  listing:close()
  return names
end

--- help() -> the usage and an index of pmp's modules with their documented functions and classes.
function help.index()
  local entries = collect()
  local out = { USAGE, '', 'Modules (help(pmp.nn) for one; tensor methods: help(pmp.tensor_methods)):' }
  for _, entry in ipairs(entries) do
    if entry.kind == 'module' then
      local summary = first_line(describe(entry).doc):gsub('^[%w_.]+: ', '')
      if #summary > 72 then summary = summary:sub(1, 72):gsub('%s+%S*$', '') .. ' ...' end
      out[#out + 1] = string.format('  %-26s %s', entry.name, summary)
      local members = member_summary(entries, entry)
      if #members > 0 then out[#out + 1] = wrap(members, string.rep(' ', 29)) end
    end
  end
  local recipes = recipe_files()
  if #recipes > 0 then
    out[#out + 1] = "Recipes (help 'recipes/pretrain.lua' for one):"
    out[#out + 1] = wrap(recipes, '  ')
  end
  return table.concat(out, '\n')
end

-- The value a name such as 'pmp.nn.Linear' or 'tensor:sum' stands for, without calling anything
-- but pmp's lazy module loading.
local function resolve(name, by_name)
  if by_name[name] then return by_name[name].value end
  local value = _G
  for part in name:gmatch('[^.:]+') do
    if type(value) ~= 'table' then return nil end
    local ok, found = pcall(function() return value[part] end)
    if not ok or found == nil then return nil end
    value = found
  end
  return value
end

-- An entry for a function or class that a module outside pmp (one loaded with require) holds.
local function entry_in_loaded_modules(value)
  if type(value) ~= 'function' and not is_class(value) then return nil end
  local names = {}
  for name, module in pairs(package.loaded) do
    if type(module) == 'table' and module ~= _G then names[#names + 1] = name end
  end
  table.sort(names)
  for _, name in ipairs(names) do
    for _, key in ipairs(sorted_keys(package.loaded[name])) do
      if rawget(package.loaded[name], key) == value then
        local kind = type(value) == 'function' and 'function' or 'class'
        return { name = name .. '.' .. key, value = value, kind = kind, key = key }
      end
    end
  end
  return nil
end

-- help 'recipes/pretrain.lua': the doc comment at the top of a Lua file (a recipe, a tool), found
-- from the current directory or pmp's root.
local function file_help(path)
  local root = package.loaded['pmp.root']
  local lines = source_lines(path) or (type(root) == 'string' and source_lines(root .. '/' .. path))
  if not lines then return "help: no file '" .. path .. "' here or under pmp's root" end
  local doc = file_doc(lines)
  if #doc == 0 then doc = { '(no doc comment: no --- lines open the file)' } end
  return path .. '\n  ' .. table.concat(doc, '\n  ')
end

--- help.search(topic) -> the names whose name or doc comment contains topic (any case), one a line.
function help.search(topic)
  local entries = collect()
  local wanted = topic:lower()
  local out = {}
  for _, entry in ipairs(entries) do
    local d = describe(entry)
    local text = entry.name:lower() .. '\n' .. table.concat(d.doc, '\n'):lower()
    if text:find(wanted, 1, true) then
      out[#out + 1] = string.format('  %-34s %s', d.signature, first_line(d.doc))
    end
  end
  if #out == 0 then return "nothing found for '" .. topic .. "'" end
  table.insert(out, 1, "Found for '" .. topic .. "':")
  return table.concat(out, '\n')
end

--- help.text(x) -> what help(x) prints: x is a value, a name ('pmp.zeros', 'tensor:sum'), a Lua file
--- ('recipes/pretrain.lua') or a topic.
function help.text(...)
  if select('#', ...) == 0 then return help.index() end
  local subject = ...
  if subject == nil then return 'help(nil): the value given is nil (a misspelt name?); help() lists what there is' end
  local entries, by_value = collect()
  if type(subject) == 'string' and subject:match('%.lua$') then return file_help(subject) end
  if type(subject) == 'string' then
    local by_name = {}
    for _, entry in ipairs(entries) do by_name[entry.name] = entry end
    local value = subject:match('^[%a_][%w_.:]*$') and resolve(subject, by_name)
    if value == nil or type(value) == 'string' then return help.search(subject) end
    subject = value
  end
  local pmp = package.loaded.pmp
  if type(subject) == 'cdata' and pmp and pmp.is_tensor(subject) then
    return tostring(subject) .. '\n' .. show(by_value[package.loaded['pmp.tensor']] or
      { name = 'pmp.tensor', value = package.loaded['pmp.tensor'], kind = 'module' }, entries) ..
      '\nmethods: help(pmp.tensor_methods), or help(t.name) for one'
  end
  if subject == rawget(pmp or {}, 'tensor_methods') then
    local names = {}
    for _, entry in ipairs(entries) do
      if entry.name:match('^tensor:') then names[#names + 1] = entry.name:sub(8) end
    end
    return 'Tensor methods (help(t.sum) or help \'tensor:sum\' for one):\n' .. wrap(names, '  ')
  end
  local entry = by_value[subject] or entry_in_loaded_modules(subject)
  if not entry and type(subject) == 'table' then   -- an nn module instance: its class
    local mt = getmetatable(subject)
    local class = type(mt) == 'table' and rawget(mt, '__class')
    entry = class and by_value[class]
  end
  if entry then return show(entry, entries) end
  if type(subject) == 'function' then   -- outside pmp: named as its definition names it
    if debug.getinfo(subject, 'S').what ~= 'Lua' then return 'a function built into LuaJIT or the host' end
    local path, line = file_of(subject)
    local lines = path and source_lines(path)
    local text = lines and lines[line] or ''
    local name = text:match('^%s*function%s+([%w_.:]+)') or text:match('^%s*local%s+function%s+([%w_]+)')
      or text:match('^%s*([%w_.]+)%s*=') or 'function'
    return show({ name = name, value = subject, kind = 'function', key = name:match('([%w_]+)$'),
                  drop_first = name:find(':') ~= nil }, entries)
  end
  return 'no documentation for a ' .. type(subject) .. ' value; help() lists what has some'
end

--- help(x) prints help.text(x): help() the index, help(pmp.nn.Linear), help(t.sum), help 'topic'.
function help.print(...)
  print(help.text(...))
end

return setmetatable(help, { __call = function(_, ...) return help.print(...) end })
