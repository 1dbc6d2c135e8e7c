-- The engine's C ABI, declared to LuaJIT from core/pmp.h itself so the two can never disagree.
local ffi = require 'ffi'

local function project_root()
  local root = package.loaded['pmp.root']
  if type(root) == 'string' then return root end
  -- outside the pmp executable: this file is ROOT/lua/pmp/ffi.lua
  local source = debug.getinfo(1, 'S').source:gsub('^@', '')
  return source:match('^(.*)/lua/pmp/ffi%.lua$') or '.'
end

local root = project_root()
local header_path = root .. '/core/pmp.h'
local file = io.open(header_path, 'r')
if not file then error('pmp: cannot read the engine header ' .. header_path .. ' (set PMP_PATH to the pmp checkout)') end
local header = file:read('*a')
file:close()
local declarations = header:match('/%* PMP_CDEF_BEGIN %*/(.-)/%* PMP_CDEF_END %*/')
if not declarations then error('pmp: ' .. header_path .. ' has no PMP_CDEF_BEGIN/END region') end
ffi.cdef(declarations)

return { C = ffi.C, root = root }
