-- Assertions shared by the specs.
local ffi = require 'ffi'
pcall(ffi.cdef, 'int memcmp(const void *, const void *, size_t);')

local M = {}

-- Exact byte equality of two tensors (dtype, shape and every bit).
function M.same_bits(a, b)
  if a.dtype ~= b.dtype or table.concat(a.shape, ',') ~= table.concat(b.shape, ',') then return false end
  a, b = a:contiguous(), b:contiguous()
  return ffi.C.memcmp(a.ptr.data, b.ptr.data, a:numel() * a:element_size()) == 0
end

-- Runs fn, which must raise an error whose message mentions every fragment (plain text); returns it.
function M.fails_with(fn, ...)
  local ok, err = pcall(fn)
  assert(not ok, 'expected an error, but the call succeeded')
  assert(type(err) == 'string', 'the error value is a ' .. type(err) .. ', not a message')
  for _, fragment in ipairs({ ... }) do
    assert(err:find(fragment, 1, true), string.format('message %q does not mention %q', err, fragment))
  end
  return err
end

return M
