-- The engine's C ABI, declared to LuaJIT from the engine's own headers so the two can never disagree:
-- core/pmp.h includes one header per area (core/pmp/*.h) in dependency order, and each area header
-- holds its declarations between PMP_CDEF_BEGIN/END markers. They are declared in that order, once each.
local ffi = require 'ffi'

local function project_root()
  local root = package.loaded['pmp.root']
  if type(root) == 'string' then return root end
  -- outside the pmp executable: this file is ROOT/lua/pmp/ffi.lua
  local source = debug.getinfo(1, 'S').source:gsub('^@', '')
  return source:match('^(.*)/lua/pmp/ffi%.lua$') or '.'
end

local root = project_root()

local function read(path)
  local file = io.open(path, 'r')
  if not file then error('pmp: cannot read the engine header ' .. path .. ' (set PMP_PATH to the pmp checkout)') end
  local text = file:read('*a')
  file:close()
  return text
end

local umbrella_path = root .. '/core/pmp.h'
local areas = 0
for area in read(umbrella_path):gmatch('\n#include "(pmp/[%w_]+%.h)"') do
  local path = root .. '/core/' .. area
  local declarations = read(path):match('/%* PMP_CDEF_BEGIN %*/(.-)/%* PMP_CDEF_END %*/')
  if not declarations then error('pmp: ' .. path .. ' has no PMP_CDEF_BEGIN/END region') end
  local ok, err = pcall(ffi.cdef, declarations)
  if not ok then error('pmp: declaring ' .. path .. ' to LuaJIT failed: ' .. tostring(err)) end
  areas = areas + 1
end
if areas == 0 then error('pmp: ' .. umbrella_path .. ' includes no area headers (#include "pmp/<area>.h")') end

return { C = ffi.C, root = root }
