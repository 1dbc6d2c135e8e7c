--- Durable file and directory writes, for checkpoints and exported models.
--
--   pmp.io.write_atomic(path, string_or_writer)   -- path holds the old bytes or the new ones, never half
--   pmp.io.replace_dir_atomic(dir, function(tmp) ... end)
--   pmp.io.mkdir_p(path)
--
-- write_atomic writes to `path.tmp.<pid>` in the same directory, fsyncs it, renames it over path and
-- fsyncs the directory, so after a crash path holds either the old or the new content. A writer
-- function receives an object w with w:write(string) and w:write(pointer, nbytes) (any cdata pointer),
-- w:write_tensor(t, dtype) (t's elements in row-major order, in its dtype or dtype) and w.bytes (bytes written so far).
-- If the writer raises, the temporary file is removed, the old file is left as it was, and the error
-- is raised again with the path in front.
local ffi = require 'ffi'
local C = require('pmp.ffi').C

local M = {}

local function last_error() return ffi.string(C.pmp_last_error()) end

-- An operating-system error on a path: the message names the path, without a position (it is the
-- file system's state, not the calling code, that is wrong).
local function fail(what)
  error(what .. ': ' .. last_error(), 0)
end

-- Directory part of a path ('.' for a bare name).
function M.dirname(path)
  local dir = path:match('^(.*[^/])/+[^/]*$')
  if dir then return dir end
  if path:match('^/+[^/]*$') then return '/' end
  return '.'
end

function M.basename(path) return (path:gsub('/+$', ''):match('([^/]*)$')) end

function M.join(...)
  local parts = { ... }
  local out = ''
  for _, p in ipairs(parts) do
    if p:sub(1, 1) == '/' or out == '' then out = p else out = out:gsub('/+$', '') .. '/' .. p end
  end
  return out
end

function M.getpid() return C.pmp_getpid() end

-- 'file', 'directory', 'other' or nil when nothing is there.
function M.kind(path)
  local k = C.pmp_file_kind(path)
  if k < 0 then fail('pmp.io.kind') end
  return ({ [1] = 'file', [2] = 'directory', [3] = 'other' })[k]
end

function M.exists(path) return M.kind(path) ~= nil end
function M.is_dir(path) return M.kind(path) == 'directory' end
function M.is_file(path) return M.kind(path) == 'file' end

function M.size(path)
  local n = C.pmp_file_size(path)
  if n < 0 then fail('pmp.io.size') end
  return tonumber(n)
end

-- The names in a directory, sorted (no '.' or '..').
function M.listdir(path)
  local dir = C.pmp_dir_open(path)
  if dir == nil then fail('pmp.io.listdir') end
  dir = ffi.gc(dir, C.pmp_dir_close)
  local names = {}
  while true do
    local name = C.pmp_dir_next(dir)
    if name == nil then break end
    names[#names + 1] = ffi.string(name)
  end
  C.pmp_dir_close(ffi.gc(dir, nil))
  table.sort(names)
  return names
end

-- The whole file as a string.
function M.read_file(path)
  local f, err = io.open(path, 'rb')
  if not f then error('pmp.io.read_file: cannot open ' .. tostring(err), 0) end
  local data = f:read('*a')
  f:close()
  return data
end

-- Creates path and any missing parents; an existing directory is fine.
function M.mkdir_p(path)
  if type(path) ~= 'string' or path == '' then error('pmp.io.mkdir_p: expects a non-empty path', 2) end
  local prefix = path:sub(1, 1) == '/' and '/' or ''
  for part in path:gmatch('[^/]+') do
    prefix = prefix .. part
    if part ~= '.' and part ~= '..' then
      if C.pmp_file_mkdir(prefix) < 0 then fail('pmp.io.mkdir_p: ' .. path) end
    end
    prefix = prefix .. '/'
  end
  return path
end

-- The CRC32C of a file's bytes as 'crc32c:xxxxxxxx' (the form checkpoints record).
function M.checksum(path)
  local out = ffi.new('uint32_t[1]')
  if C.pmp_file_crc32c(path, out) ~= 0 then fail('pmp.io.checksum') end
  return string.format('crc32c:%08x', out[0])
end

-- Removes the temporaries of killed runs from dir: entries named `<stem>...tmp.<pid>` (write_atomic,
-- replace_dir_atomic and the indexed builder name theirs so) whose process no longer exists. Those of a
-- live process, this one's included, are work in progress and stay. A process on another machine that
-- shares the directory cannot be checked, so callers clean only directories that one process of the
-- run writes. stem: only names that start with it (default: all). Returns the removed paths.
function M.remove_stale_temporaries(dir, stem)
  stem = stem or ''
  local removed = {}
  if not M.is_dir(dir) then return removed end
  local me = C.pmp_getpid()
  for _, name in ipairs(M.listdir(dir)) do
    local pid = name:sub(1, #stem) == stem and tonumber(name:match('%.tmp%.(%d+)$'))
    if pid and pid ~= me and C.pmp_process_alive(pid) == 0 then
      local path = M.join(dir, name)
      if C.pmp_file_remove_tree(path) ~= 0 then fail('pmp.io.remove_stale_temporaries') end
      removed[#removed + 1] = path
    end
  end
  return removed
end

-- Removes a file or a directory tree (links are removed, not followed); missing paths are fine.
function M.remove_tree(path)
  if C.pmp_file_remove_tree(path) ~= 0 then fail('pmp.io.remove_tree') end
end

function M.remove(path)
  if C.pmp_file_remove(path) ~= 0 then fail('pmp.io.remove') end
end

---------------------------------------------------------------------------------------------------
-- write_atomic

local Writer = {}
Writer.__index = Writer

local tensor_ct
function Writer:write(data, nbytes)
  if type(data) == 'string' then
    nbytes = nbytes or #data
    if nbytes > #data then error('write: ' .. nbytes .. ' bytes asked from a ' .. #data .. '-byte string', 2) end
  elseif type(data) == 'cdata' then
    if type(nbytes) ~= 'number' then error('write: a pointer needs a byte count', 2) end
  else
    error('write: expects a string or a pointer and a byte count, got ' .. type(data), 2)
  end
  if C.pmp_file_write(self.fd, data, nbytes, self.tmp) ~= 0 then error(last_error(), 2) end
  self.bytes = self.bytes + nbytes
end

-- Writes t's elements row-major in t's dtype, or converted to dtype (a name: 'bf16', ...) without a
-- whole converted copy (a tensor on another device is copied to the cpu first).
function Writer:write_tensor(t, dtype)
  tensor_ct = tensor_ct or ffi.typeof('pmp_tensor_handle')
  if not ffi.istype(tensor_ct, t) then error('write_tensor: expects a tensor', 2) end
  if t.ptr.dev.type ~= C.PMP_CPU then t = t:to('cpu') end
  local id = dtype and C.pmp_dtype_from_name(dtype) or t.ptr.dtype_id
  if id < 0 then error("write_tensor: unknown dtype '" .. tostring(dtype) .. "'", 2) end
  if C.pmp_file_write_tensor_as(self.fd, t.ptr, id, self.tmp) ~= 0 then error(last_error(), 2) end
  self.bytes = self.bytes + tonumber(C.pmp_numel(t.ptr)) * C.pmp_dtype_size(id)
end

function M.write_atomic(path, content)
  if type(path) ~= 'string' or path == '' then error('pmp.io.write_atomic: expects a path', 2) end
  if type(content) ~= 'string' and type(content) ~= 'function' then
    error('pmp.io.write_atomic: ' .. path .. ': content must be a string or a writer function', 2)
  end
  local tmp = path .. '.tmp.' .. C.pmp_getpid()
  local fd = C.pmp_file_open_write(tmp)
  if fd < 0 then error('pmp.io.write_atomic: ' .. path .. ': ' .. last_error(), 0) end
  local w = setmetatable({ fd = fd, tmp = tmp, path = path, bytes = 0 }, Writer)
  local ok, err = pcall(function()
    if type(content) == 'string' then w:write(content) else content(w) end
  end)
  if not ok then
    C.pmp_file_close(fd)
    C.pmp_file_remove(tmp)
    error('pmp.io.write_atomic: ' .. path .. ': ' .. tostring(err), 2)
  end
  if C.pmp_file_sync_close(fd, tmp) ~= 0 or C.pmp_file_rename(tmp, path) ~= 0 then
    local msg = last_error()
    C.pmp_file_remove(tmp)
    error('pmp.io.write_atomic: ' .. path .. ': ' .. msg, 0)
  end
  if C.pmp_file_sync_dir(M.dirname(path)) ~= 0 then
    error('pmp.io.write_atomic: ' .. path .. ': ' .. last_error(), 0)
  end
  return w.bytes
end

---------------------------------------------------------------------------------------------------
-- replace_dir_atomic

-- Fills `final_dir.tmp.<pid>` with fill_fn(tmp_dir), fsyncs everything in it, then puts it in place of
-- final_dir: an atomic exchange where the system has one (Linux renameat2), else the old directory
-- is moved aside to `final_dir.old.<pid>`, the new one renamed in, and the old one removed. If fill_fn
-- raises, the temporary directory is removed and final_dir is untouched. Returns final_dir.
function M.replace_dir_atomic(final_dir, fill_fn)
  if type(final_dir) ~= 'string' or final_dir == '' then error('pmp.io.replace_dir_atomic: expects a path', 2) end
  if type(fill_fn) ~= 'function' then error('pmp.io.replace_dir_atomic: ' .. final_dir .. ': expects a fill function', 2) end
  final_dir = final_dir:gsub('(.)/+$', '%1')
  local function raise(msg) error('pmp.io.replace_dir_atomic: ' .. final_dir .. ': ' .. msg, 3) end
  local pid = C.pmp_getpid()
  local tmp = final_dir .. '.tmp.' .. pid
  local parent = M.dirname(final_dir)
  local kind = C.pmp_file_kind(final_dir)
  if kind < 0 then raise(last_error()) end
  if kind ~= 0 and kind ~= 2 then raise('exists and is not a directory') end
  if C.pmp_file_remove_tree(tmp) ~= 0 then raise(last_error()) end
  if C.pmp_file_mkdir(tmp) < 0 then raise(last_error()) end
  local ok, err = pcall(fill_fn, tmp)
  if ok and C.pmp_file_sync_tree(tmp) ~= 0 then ok, err = false, last_error() end
  if not ok then
    C.pmp_file_remove_tree(tmp)
    raise(tostring(err))
  end
  if kind == 2 then
    -- (M._force_move_aside lets the specs exercise the fallback on systems that can exchange)
    local swapped = M._force_move_aside and 1 or C.pmp_file_exchange(tmp, final_dir)
    if swapped == 0 then
      -- tmp now holds the old directory
      C.pmp_file_sync_dir(parent)
      if C.pmp_file_remove_tree(tmp) ~= 0 then raise('replaced, but the old copy remains: ' .. last_error()) end
      return final_dir
    elseif swapped < 0 then
      local msg = last_error()
      C.pmp_file_remove_tree(tmp)
      raise(msg)
    end
    local aside = final_dir .. '.old.' .. pid
    if C.pmp_file_remove_tree(aside) ~= 0 or C.pmp_file_rename(final_dir, aside) ~= 0 then
      local msg = last_error()
      C.pmp_file_remove_tree(tmp)
      raise(msg)
    end
    if C.pmp_file_rename(tmp, final_dir) ~= 0 then
      local msg = last_error()
      C.pmp_file_rename(aside, final_dir)   -- put the old one back
      C.pmp_file_remove_tree(tmp)
      raise(msg)
    end
    C.pmp_file_sync_dir(parent)
    if C.pmp_file_remove_tree(aside) ~= 0 then raise('replaced, but the old copy remains: ' .. last_error()) end
    return final_dir
  end
  if C.pmp_file_rename(tmp, final_dir) ~= 0 then
    local msg = last_error()
    C.pmp_file_remove_tree(tmp)
    raise(msg)
  end
  if C.pmp_file_sync_dir(parent) ~= 0 then raise(last_error()) end
  return final_dir
end

return M
