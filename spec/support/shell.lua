-- Running commands from specs: quoting, captured output and exit status, scratch directories.
local shell = {}

shell.root = assert(package.loaded['pmp.root'], 'specs run under pmp, which sets pmp.root')
-- `make sanitize` points child processes at its own executable
shell.pmp = os.getenv('PMP_SPEC_EXECUTABLE') or shell.root .. '/pmp'

function shell.quote(text)
  return "'" .. tostring(text):gsub("'", [['\'']]) .. "'"
end

local function read_file(path)
  local file = assert(io.open(path, 'rb'))
  local content = file:read('*a')
  file:close()
  return content
end

-- A fresh directory under /tmp, removed by shell.remove_dir.
function shell.temp_dir()
  local pipe = assert(io.popen('mktemp -d /tmp/pmp-spec.XXXXXX'))
  local path = pipe:read('*l')
  pipe:close()
  assert(path and path ~= '', 'mktemp -d failed')
  return path
end

function shell.remove_dir(path)
  assert(path:match('^/tmp/pmp%-spec%.'), 'refusing to remove ' .. path)
  os.execute('rm -rf ' .. shell.quote(path))
end

function shell.write_file(path, content)
  local file = assert(io.open(path, 'wb'))
  file:write(content)
  file:close()
end

-- Runs a /bin/sh command line; returns its stdout, stderr and exit status. `input` feeds stdin
-- (otherwise stdin is /dev/null, so nothing waits on the terminal).
function shell.run(command, input)
  local dir = shell.temp_dir()
  local stdin = '/dev/null'
  if input then
    stdin = dir .. '/stdin'
    shell.write_file(stdin, input)
  end
  local script = string.format('( %s ) <%s >%s 2>%s; echo $?', command, shell.quote(stdin),
                               shell.quote(dir .. '/stdout'), shell.quote(dir .. '/stderr'))
  local pipe = assert(io.popen(script))
  local status = tonumber(pipe:read('*a'):match('%d+'))
  pipe:close()
  local stdout, stderr = read_file(dir .. '/stdout'), read_file(dir .. '/stderr')
  shell.remove_dir(dir)
  return stdout, stderr, status
end

-- shell.run for the pmp executable: `args` is a list of arguments, quoted here.
function shell.run_pmp(args, input)
  local words = { shell.quote(shell.pmp) }
  for _, word in ipairs(args) do words[#words + 1] = shell.quote(word) end
  return shell.run(table.concat(words, ' '), input)
end

return shell
