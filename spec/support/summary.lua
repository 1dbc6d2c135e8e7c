-- busted output handler: one line per test, failures with their message and where they happened,
-- then a last line `N passed, N failed` (`, N skipped` when some are pending). Errors outside a test
-- (a file that does not load, a failing setup) count as failed.
local TRACE_LINES = 6

local function message_text(message)
  if message == nil then return 'nil error' end
  if type(message) == 'string' then return message end
  return require('pl.pretty').write(message)
end

-- The frames in the test's own code: busted's and the C frames around them are noise.
local function short_traceback(trace)
  local lines = {}
  for line in ((trace and trace.traceback) or ''):gmatch('[^\n]+') do
    local is_frame = line:find('^%s') ~= nil
    local is_noise = line:find('busted/') or line:find('%[C%]') or line:find('luassert/')
    if is_frame and not is_noise and #lines < TRACE_LINES then lines[#lines + 1] = line end
  end
  return lines
end

local function indented(text)
  return '    ' .. text:gsub('\n', '\n    ')
end

return function()
  local busted = require 'busted'
  local handler = require 'busted.outputHandlers.base'()
  local counts = { passed = 0, failed = 0, skipped = 0 }

  local function report_failure(failure)
    local where = failure.trace or failure.element.trace
    local location = where and where.short_src and (where.short_src .. ':' .. (where.currentline or '?'))
    io.write('FAIL ', failure.name ~= '' and failure.name or (failure.element.name or 'file'), '\n')
    if location then io.write('    at ', location, '\n') end
    io.write(indented(message_text(failure.message)), '\n')
    for _, line in ipairs(short_traceback(failure.trace)) do io.write('    ', line:gsub('^%s+', ''), '\n') end
  end

  local function on_test_end(element, parent, status)
    if status == 'success' then
      counts.passed = counts.passed + 1
      io.write('ok   ', handler.getFullName(element), '\n')
    elseif status == 'pending' then
      counts.skipped = counts.skipped + 1
      io.write('skip ', handler.getFullName(element), '\n')
    elseif status == 'failure' then
      counts.failed = counts.failed + 1
      report_failure(handler.failures[#handler.failures])
    elseif status == 'error' then
      counts.failed = counts.failed + 1
      report_failure(handler.errors[#handler.errors])
    end
    io.flush()
    return nil, true
  end

  -- Errors of tests arrive through on_test_end; these are the ones outside any test.
  local function on_error(element)
    if element.descriptor ~= 'it' then
      counts.failed = counts.failed + 1
      report_failure(handler.errors[#handler.errors])
      io.flush()
    end
    return nil, true
  end

  local function on_suite_end()
    local line = counts.passed .. ' passed, ' .. counts.failed .. ' failed'
    if counts.skipped > 0 then line = line .. ', ' .. counts.skipped .. ' skipped' end
    io.write(line, '\n')
    io.flush()
    return nil, true
  end

  local function on_suite_reset()
    counts.passed, counts.failed, counts.skipped = 0, 0, 0
    return nil, true
  end

  busted.subscribe({ 'suite', 'reset' }, on_suite_reset)
  busted.subscribe({ 'suite', 'end' }, on_suite_end)
  busted.subscribe({ 'test', 'end' }, on_test_end, { predicate = handler.cancelOnPending })
  busted.subscribe({ 'error' }, on_error)
  busted.subscribe({ 'failure' }, on_error)
  return handler
end
