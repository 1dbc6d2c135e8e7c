-- Running a Lua script on several MPI processes from a spec: `mpirun` on this machine's cores,
-- oversubscribed (CI has 2 cores), as root where needed.
local shell = require 'spec.support.shell'

local mpi = {}

mpi.available = os.execute('command -v mpirun >/dev/null 2>&1') == 0

-- The command line that runs `pmp script args...` on np processes, and the directory it keeps Open
-- MPI's session files in (remove it with shell.remove_dir after the run). env: a table of environment
-- variables for every rank; dir: the ranks' working directory (default: this one).
function mpi.command(np, script, args, env, dir)
  -- Each run keeps Open MPI's session files (and PMIx's, under TMPDIR) in a directory of its own:
  -- concurrent jobs sharing /tmp/ompi.* collided.
  local session = shell.temp_dir()
  -- no core binding (several ranks share each core here) and no ptrace-based copies (containers forbid them)
  local parts = { 'TMPDIR=' .. shell.quote(session), 'mpirun --oversubscribe --bind-to none',
    '--mca btl_vader_single_copy_mechanism none --mca orte_tmpdir_base', shell.quote(session), '-np', tostring(np) }
  local uid = io.popen('id -u'):read('*l')
  if uid == '0' then parts[#parts + 1] = '--allow-run-as-root' end
  for k, v in pairs(env or {}) do parts[#parts + 1] = '-x ' .. k .. '=' .. shell.quote(v) end
  if dir then parts[#parts + 1] = '-wdir ' .. shell.quote(dir) end
  parts[#parts + 1] = shell.quote(shell.pmp)
  parts[#parts + 1] = shell.quote(script)
  for _, a in ipairs(args or {}) do parts[#parts + 1] = shell.quote(a) end
  return table.concat(parts, ' '), session
end

-- Runs `pmp script args...` on np processes (see mpi.command); returns stdout, stderr, exit status.
function mpi.run(np, script, args, env, dir)
  local command, session = mpi.command(np, script, args, env, dir)
  local out, err, status = shell.run(command)
  shell.remove_dir(session)
  return out, err, status
end

-- Lines 'KEY value...' printed by the ranks, collected as result[KEY] = {value strings in order}.
function mpi.lines(stdout, key)
  local out = {}
  for line in stdout:gmatch('[^\n]+') do
    local k, rest = line:match('^(%S+)%s+(.*)$')
    if k == key then out[#out + 1] = rest end
  end
  return out
end

function mpi.words(text)
  local out = {}
  for w in text:gmatch('%S+') do out[#out + 1] = w end
  return out
end

-- The KEY lines whose first word is `case`, each split into the words after it; without case, every
-- KEY line split into words.
function mpi.rows(stdout, key, case)
  local found = {}
  for _, rest in ipairs(mpi.lines(stdout, key)) do
    local w = mpi.words(rest)
    if case == nil then found[#found + 1] = w
    elseif w[1] == case then found[#found + 1] = { unpack(w, 2) } end
  end
  return found
end

return mpi
