--- Mutation testing: plants each small bug listed in tools/mutations.txt, one at a time, in a scratch
--- copy of the tree, rebuilds what it touched, runs the specs the line names, and reports whether they
--- failed (the mutation is caught) or passed (it survived: the suite misses that bug).
---
---   ./pmp tools/mutate.lua                 -- every mutation (make mutate)
---   ./pmp tools/mutate.lua --lua-only      -- only those in Lua files (no rebuilds)
---   ./pmp tools/mutate.lua rope adam       -- those whose name contains any of the words
---   ./pmp tools/mutate.lua --check         -- only checks that every line still applies to the tree
---
--- The scratch copy (PMP_MUTATE_DIR/tree, default /tmp/pmp-mutate-<user>/tree) keeps its build/ between
--- runs, so a C mutation recompiles one object and relinks; ../shared is linked beside it as beside the
--- worktree, so the specs that read it run there too. Logs are in PMP_MUTATE_DIR/logs/.
--- Exits non-zero when a mutation survived, no longer applies (its text is not in the file exactly once:
--- remap it after a move or rewrite), fails to build, or when the unmutated specs already fail.
local root = assert(package.loaded['pmp.root'], 'run tools/mutate.lua with ./pmp')

local LIST = root .. '/tools/mutations.txt'
local SPEC_TIMEOUT = 900   -- seconds; a mutation that hangs the specs counts as caught

local function quote(text) return "'" .. tostring(text):gsub("'", [['\'']]) .. "'" end

local function run(command) return os.execute(command) == 0 end

local pio = pmp.io
local write = pio.write_atomic

--- Lines "name | file | text | replacement | spec files", '#' comments. The text must occur exactly once
--- in the file; it and the replacement are literal (no patterns), with \n, \t and \\ standing for
--- newline, tab and backslash. The fields are split at ' | ', so neither may contain that sequence.
local ESCAPES = { n = '\n', t = '\t', ['\\'] = '\\' }
local function unescape(s) return (s:gsub('\\(.)', ESCAPES)) end

local function read_mutations()
  local list = {}
  local number = 0
  for line in io.lines(LIST) do
    number = number + 1
    if line:match('%S') and not line:match('^%s*#') then
      local fields = {}
      for field in (line .. ' | '):gmatch('(.-) | ') do fields[#fields + 1] = field:match('^%s*(.-)%s*$') end
      if #fields ~= 5 then
        error(string.format('%s:%d: expected 5 fields separated by " | ", got %d', LIST, number, #fields), 0)
      end
      local specs = {}
      for spec in fields[5]:gmatch('%S+') do specs[#specs + 1] = spec end
      if #specs == 0 then error(string.format('%s:%d: no spec files named', LIST, number), 0) end
      list[#list + 1] = { name = fields[1], file = fields[2], find = unescape(fields[3]),
        replace = unescape(fields[4]), specs = specs, line = number }
    end
  end
  return list
end

local function select_mutations(all, args)
  local lua_only, words = false, {}
  for _, a in ipairs(args) do
    if a == '--lua-only' then lua_only = true elseif a ~= '--check' then words[#words + 1] = a:lower() end
  end
  local chosen = {}
  for _, m in ipairs(all) do
    local wanted = #words == 0
    for _, w in ipairs(words) do
      if m.name:lower():find(w, 1, true) then wanted = true end
    end
    if wanted and (not lua_only or m.file:match('%.lua$')) then chosen[#chosen + 1] = m end
  end
  return chosen
end

local function count_plain(haystack, needle)
  local count, at = 0, 1
  while true do
    local s, e = haystack:find(needle, at, true)
    if not s then return count end
    count, at = count + 1, e + 1
  end
end

-- The scratch tree: the worktree's files (tracked and untracked-not-ignored, with their times, so make
-- only rebuilds what changed since the last run) over the previous copy's build/.
local function refresh_scratch(base)
  assert(base:match('^/tmp/'), 'PMP_MUTATE_DIR must be under /tmp: ' .. base)
  local scratch = base .. '/tree'
  assert(run('mkdir -p ' .. quote(scratch) .. ' ' .. quote(base .. '/logs')))
  assert(run('find ' .. quote(scratch) .. ' -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +'))
  assert(run('cd ' .. quote(root) .. ' && git ls-files -z -co --exclude-standard | ' ..
    'xargs -0 cp -a --parents -t ' .. quote(scratch)), 'copying the tree to ' .. scratch .. ' failed')
  if pio.is_dir(root .. '/../shared') then
    assert(run('ln -sfn ' .. quote(root .. '/../shared') .. ' ' .. quote(base .. '/shared')))
  end
  return scratch
end

-- The objects that must be recompiled when `file` changes: its own for a .c file; for a header, those
-- of the .c files under the same top folder that include it by any relative path (make is told to
-- ignore the header's time, which would otherwise rebuild every object).
local function dependents(scratch, file)
  if file:match('%.c$') then return { 'build/' .. file:gsub('%.c$', '.o') }, '' end
  if not file:match('%.h$') then return {}, nil end
  local top, base = file:match('^([^/]+)/'), file:match('([^/]+)$')
  local objects = {}
  local include = '#include "([^"]*/)?' .. base:gsub('%.', '\\.') .. '"'
  local pipe = io.popen('cd ' .. quote(scratch) .. ' && grep -rlE --include=*.c ' .. quote(include) .. ' ' ..
    quote(top or '.') .. ' 2>/dev/null')
  for c_file in pipe:lines() do objects[#objects + 1] = 'build/' .. c_file:gsub('%.c$', '.o') end
  pipe:close()
  return objects, ' -o ' .. quote(file)
end

local function build(scratch, log, make_flags)
  return run('cd ' .. quote(scratch) .. ' && make -j2' .. (make_flags or '') .. ' pmp >> ' .. quote(log) .. ' 2>&1')
end

local function forget_objects(scratch, objects)
  for _, o in ipairs(objects) do os.remove(scratch .. '/' .. o) end
end

local function specs_pass(scratch, specs, log)
  return run('cd ' .. quote(scratch) .. ' && timeout ' .. SPEC_TIMEOUT .. ' ./pmp spec/run.lua ' ..
    table.concat(specs, ' ') .. ' >> ' .. quote(log) .. ' 2>&1')
end

-- The file's content, or nil and why the mutation no longer applies to it.
local function target_of(tree, m)
  local path = tree .. '/' .. m.file
  if not pio.is_file(path) then return nil, 'STALE: no such file' end
  local content = pio.read_file(path)
  local n = count_plain(content, m.find)
  if n ~= 1 then return nil, string.format('STALE: text found %d times', n) end
  return content
end

local function try_mutation(scratch, logs, m, index)
  local log = string.format('%s/%02d.log', logs, index)
  write(log, string.format('mutation %q (%s line %d)\n', m.name, LIST, m.line))
  local path = scratch .. '/' .. m.file
  local original, stale = target_of(scratch, m)
  if not original then return stale end
  local s, e = original:find(m.find, 1, true)
  write(path, original:sub(1, s - 1) .. m.replace .. original:sub(e + 1))
  local objects, make_flags = dependents(scratch, m.file)
  if make_flags and #objects == 0 then return 'NO OBJECT: nothing includes ' .. m.file end
  forget_objects(scratch, objects)
  local verdict
  if make_flags and not build(scratch, log, make_flags) then
    verdict = 'BUILD FAILED'
  else
    verdict = specs_pass(scratch, m.specs, log) and 'SURVIVED' or 'caught'
  end
  write(path, original)
  forget_objects(scratch, objects)   -- rebuilt from the original by the next build
  if make_flags and make_flags ~= '' then assert(build(scratch, log, make_flags), 'rebuilding after ' .. m.name) end
  return verdict
end

local mutations = select_mutations(read_mutations(), arg)
if #mutations == 0 then
  io.stderr:write('mutate: no mutation matches\n')
  os.exit(2)
end
local checking = false
for _, a in ipairs(arg) do checking = checking or a == '--check' end
if checking then
  local stale = 0
  for _, m in ipairs(mutations) do
    local _, why = target_of(root, m)
    if why then
      stale = stale + 1
      print(string.format('%s:%d: %s: %s (%s)', LIST, m.line, m.name, why, m.file))
    end
  end
  print(string.format('%d of %d mutations apply', #mutations - stale, #mutations))
  os.exit(stale == 0 and 0 or 1)
end

local base = os.getenv('PMP_MUTATE_DIR') or ('/tmp/pmp-mutate-' .. (os.getenv('USER') or 'user'))
local scratch, logs = refresh_scratch(base), base .. '/logs'
local baseline_log = logs .. '/baseline.log'
write(baseline_log, '')
if not build(scratch, baseline_log) then
  io.stderr:write('mutate: the unmutated tree does not build; see ' .. baseline_log .. '\n')
  os.exit(2)
end
local union, seen = {}, {}
for _, m in ipairs(mutations) do
  for _, spec in ipairs(m.specs) do
    if not seen[spec] then seen[spec], union[#union + 1] = true, spec end
  end
end
io.write(string.format('baseline: %d spec files unmutated... ', #union))
io.flush()
if not specs_pass(scratch, union, baseline_log) then
  print('FAILED')
  io.stderr:write('mutate: the specs fail without any mutation; see ' .. baseline_log .. '\n')
  os.exit(2)
end
-- the summary line: skipped specs are worth seeing, since a mutation in what they cover would survive
print(pio.read_file(baseline_log):match('\n(%d+ passed[^\n]*)\n?$') or 'pass')

local failures = 0
print(string.format('%-3s %-12s %-52s %s', '#', 'result', 'mutation', 'file'))
for index, m in ipairs(mutations) do
  local started = os.time()
  local verdict = try_mutation(scratch, logs, m, index)
  if verdict ~= 'caught' then failures = failures + 1 end
  print(string.format('%-3d %-12s %-52s %s (%ds)', index, verdict, m.name, m.file, os.time() - started))
end
print(string.format('%d of %d mutations caught; logs in %s', #mutations - failures, #mutations, logs))
os.exit(failures == 0 and 0 or 1)
