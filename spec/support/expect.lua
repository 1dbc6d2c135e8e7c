-- Assertions shared by the specs.
local M = {}

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
