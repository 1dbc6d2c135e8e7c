-- A program on a pseudo-terminal, driven through tmux: type, press keys, read the screen.
-- Each terminal has its own tmux server, its socket in the terminal's directory, so specs never touch
-- a user's tmux sessions and leave nothing behind.
local shell = require 'spec.support.shell'

local Terminal = {}
Terminal.__index = Terminal

local POLL_SECONDS = 0.05
local TIMEOUT_SECONDS = 10

local function sleep(seconds)
  os.execute('sleep ' .. seconds)
end

function Terminal:tmux(arguments)
  local tmux = 'env -u TMUX tmux -f /dev/null -S ' .. shell.quote(self.socket)
  local out, err, status = shell.run(tmux .. ' ' .. arguments)
  assert(status == 0, 'tmux ' .. arguments .. ' failed: ' .. err)
  return out
end

-- Starts `command` (a /bin/sh command line) in a 200x50 terminal. Its exit status is kept for
-- wait_exit; the directory `dir` holds the terminal's files.
function Terminal.start(command, dir)
  local self = setmetatable({ dir = dir, socket = dir .. '/tmux.socket' }, Terminal)
  self.status_file = dir .. '/exit_status'
  local wrapped = command .. '; echo $? > ' .. shell.quote(self.status_file)
  self:tmux('new-session -d -s main -x 200 -y 50 ' .. shell.quote(wrapped))
  return self
end

function Terminal:close()
  pcall(self.tmux, self, 'kill-server') -- fails when the program already ended, taking tmux along
end

-- Types text literally (no key names), without Enter.
function Terminal:type(text)
  self:tmux('send-keys -t main -l ' .. shell.quote(text))
end

-- Presses keys by tmux name: 'Enter', 'Tab', 'Up', 'C-c', 'C-d'.
function Terminal:press(...)
  self:tmux('send-keys -t main ' .. table.concat({ ... }, ' '))
end

-- The visible lines, trailing blank lines dropped.
function Terminal:lines()
  local lines = {}
  for line in self:tmux('capture-pane -p -t main'):gmatch('([^\n]*)\n') do lines[#lines + 1] = line end
  while #lines > 0 and lines[#lines]:match('^%s*$') do lines[#lines] = nil end
  return lines
end

function Terminal:screen()
  return table.concat(self:lines(), '\n')
end

-- Polls until condition(terminal) is true; fails with the screen after TIMEOUT_SECONDS.
function Terminal:wait_until(description, condition)
  local deadline = os.time() + TIMEOUT_SECONDS
  repeat
    if condition(self) then return end
    sleep(POLL_SECONDS)
  until os.time() > deadline
  error('timed out waiting for ' .. description .. '; the screen shows:\n' .. self:screen(), 2)
end

function Terminal:wait_for_text(text)
  self:wait_until('"' .. text .. '"', function(t) return t:screen():find(text, 1, true) ~= nil end)
end

-- Waits for the program to end; returns its exit status.
function Terminal:wait_exit()
  local status
  self:wait_until('the program to exit', function()
    local file = io.open(self.status_file)
    status = file and tonumber(file:read('*a'))
    if file then file:close() end
    return status ~= nil
  end)
  return status
end

return Terminal
