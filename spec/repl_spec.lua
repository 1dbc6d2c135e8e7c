require 'busted.runner'()
local shell = require 'spec.support.shell'
local Terminal = require 'spec.support.terminal'
local repl = require 'pmp.repl'

describe('pmp.repl', function()
  local function feed_all(lines)
    local statement
    for _, line in ipairs(lines) do statement = repl.feed(line) end
    return statement
  end

  after_each(function() repl.discard() end)

  it('asks for more lines until the statement is complete', function()
    assert.is_nil(repl.feed('function twice(x)'))
    assert.is_nil(repl.feed('  return x * 2'))
    assert.equal('function twice(x)\n  return x * 2\nend', repl.feed('end'))
  end)

  it('completes nn module members and modules that pmp loads on first use', function()
    local function complete(q) return repl.complete(q, q, #q) end
    rawset(_G, 'completion_model', pmp.nn.GPTModel({ num_layers = 1, hidden_size = 8, num_attention_heads = 2, vocab_size = 4 }))
    assert.are.same({ 'completion_model.decode', 'completion_model.decoder' }, complete('completion_model.dec'))
    assert.are.same({ 'completion_model.decoder.layers' }, complete('completion_model.decoder.lay'))
    assert.are.same({ 'completion_model:num_parameters' }, complete('completion_model:num_p'))
    assert.are.same({ 'pmp.optim' }, complete('pmp.opti'))
    assert.are.same({ 'pmp.optim.AdamW' }, complete('pmp.optim.Ada'))
    rawset(_G, 'completion_model', nil)
  end)

  it('completes a syntax error at once', function()
    assert.equal('x = = 1', repl.feed('x = = 1'))
  end)

  it('forgets discarded lines', function()
    assert.is_nil(repl.feed('for i = 1, 2 do'))
    repl.discard()
    assert.equal('1', repl.feed('1'))
  end)

  it('formats values for display', function()
    assert.equal('"a\\nb"', repl.format('a\nb'))
    assert.equal('42', repl.format(42))
    assert.equal('{1, 2, ["two words"] = 3, x = {y = true}}', repl.format({ 1, 2, x = { y = true }, ['two words'] = 3 }))
    local cycle = {}
    cycle.self = cycle
    assert.equal('{self = <cycle>}', repl.format(cycle))
    assert.equal('{a = {b = {c = {d = {...}}}}}', repl.format({ a = { b = { c = { d = { e = {} } } } } }))
    assert.equal('custom', repl.format(setmetatable({}, { __tostring = function() return 'custom' end })))
    local long = {}
    for i = 1, 100 do long[i] = i end
    assert.matches('... (50 more)', repl.format(long), 1, true)
  end)

  it('completes globals, keywords and fields without calling anything', function()
    rawset(_G, 'repl_spec_table', setmetatable({ longname = 1, method = function() end },
      { __index = { inherited = function() end } }))
    rawset(_G, 'repl_spec_trap', setmetatable({}, { __index = function() error('completion called __index') end }))
    assert.same({ 'repl_spec_table.longname' }, repl.complete('repl_spec_table.lon', 'repl_spec_table.lon', 19))
    assert.same({ 'repl_spec_table:inherited', 'repl_spec_table:method' },
      repl.complete('repl_spec_table:', 'repl_spec_table:', 16))
    assert.same({}, repl.complete('repl_spec_trap.x', 'repl_spec_trap.x', 16))
    assert.same({ 'while' }, repl.complete('whil', 'whil', 4))
    assert.same({ 'string.format' }, repl.complete('string.form', 'string.form', 11))
    assert.same({}, repl.complete('pri', 'x = "pri', 8))
    rawset(_G, 'repl_spec_table', nil)
    rawset(_G, 'repl_spec_trap', nil)
  end)

  it('completes pmp functions', function()
    assert.is_true(#repl.complete('pmp.', 'pmp.', 4) > 0)
    for _, candidate in ipairs(repl.complete('pmp.tens', 'pmp.tens', 8)) do
      assert.matches('^pmp%.tens', candidate)
    end
  end)
end)

describe('pmp prompt on a terminal', function()
  local dir, home, term

  local function at_prompt(t)
    local lines = t:lines()
    return lines[#lines] == 'pmp>'
  end

  local function prompt_count(t)
    local count = 0
    for _, line in ipairs(t:lines()) do
      if line:sub(1, 4) == 'pmp>' then count = count + 1 end
    end
    return count
  end

  local function start()
    term = Terminal.start('env HOME=' .. shell.quote(home) .. ' ' .. shell.quote(shell.pmp), dir)
    term:wait_until('the first prompt', at_prompt)
  end

  -- Types a statement, waits for the next prompt and returns what was printed in between.
  local function run(statement)
    local prompts = prompt_count(term)
    term:type(statement)
    term:press('Enter')
    term:wait_until('the prompt after ' .. statement, function(t)
      return prompt_count(t) > prompts and at_prompt(t)
    end)
    local lines = term:lines()
    local first = #lines
    while first > 1 and lines[first - 1] ~= 'pmp> ' .. statement do first = first - 1 end
    return table.concat(lines, '\n', first, #lines - 1)
  end

  before_each(function()
    dir = shell.temp_dir()
    home = dir .. '/home'
    os.execute('mkdir ' .. shell.quote(home))
  end)

  after_each(function()
    if term then term:close() end
    term = nil
    shell.remove_dir(dir)
  end)

  it('prints the value of a bare expression', function()
    start()
    assert.equal('2', run('1+1'))
    assert.matches('^"abc"%s+3$', run('"abc", 3')) -- the terminal shows the tab as spaces
    assert.equal('', run('x = 5'))
    assert.equal('5', run('x'))
  end)

  it('reads a statement over several lines', function()
    start()
    term:type('function f(x)')
    term:press('Enter')
    term:wait_for_text('...>')
    term:type('return x*2')
    term:press('Enter')
    term:type('end')
    term:press('Enter')
    term:wait_until('the prompt after end', at_prompt)
    assert.equal('42', run('f(21)'))
  end)

  it('completes names with Tab', function()
    start()
    run('abc = {longname=1}')
    term:type('abc.lon')
    term:press('Tab')
    term:wait_for_text('pmp> abc.longname')
    term:press('Enter')
    term:wait_until('the value', at_prompt)
    assert.matches('pmp> abc.longname\n1\npmp>$', term:screen())

    run('s = "text"')
    term:type('s:upp')
    term:press('Tab')
    term:wait_for_text('pmp> s:upper')
    term:type('()')
    term:press('Enter')
    term:wait_for_text('"TEXT"')

    term:type('pmp.tens')
    term:press('Tab')
    term:wait_for_text('pmp> pmp.tensor')
  end)

  it('keeps the history in $HOME/.pmp_history across sessions', function()
    start()
    term:type('function g()')
    term:press('Enter')
    term:type('return 5')
    term:press('Enter')
    term:type('end')
    term:press('Enter')
    term:wait_until('the prompt after end', at_prompt)
    run('history_marker = 123')
    term:press('C-d')
    assert.equal(0, term:wait_exit())
    term:close()

    local file = assert(io.open(home .. '/.pmp_history'))
    local saved = file:read('*a')
    file:close()
    assert.matches('function g()\nreturn 5\nend\n', saved, 1, true)
    assert.matches('history_marker = 123\n', saved, 1, true)

    os.remove(dir .. '/exit_status')
    start()
    term:press('Up')
    term:wait_for_text('pmp> history_marker = 123')
    term:press('Up')
    term:wait_for_text('pmp> function g()\nreturn 5\nend')
    term:press('Enter')
    term:wait_until('the prompt after the recalled function', at_prompt)
    assert.equal('5', run('g()'))
  end)

  it('interrupts a running statement with Ctrl-C and goes on', function()
    start()
    -- Interpreted code runs the interrupt hook; a JIT-compiled pure-Lua loop would not (see interrupt.c).
    local busy = 'jit.off() for i = 1, 1e12 do local s = math.sin(i) end'
    term:type(busy)
    term:press('Enter')
    term:wait_for_text('pmp> ' .. busy)
    term:press('C-c')
    term:wait_for_text('interrupted!')
    term:wait_until('the prompt after the interrupt', at_prompt)
    assert.equal('3', run('1+2'))
  end)

  it('discards the typed input on Ctrl-C at the prompt', function()
    start()
    term:type('unfinished(')
    term:press('C-c')
    term:wait_until('a fresh prompt', at_prompt)
    term:type('for i = 1, 2 do')
    term:press('Enter')
    term:wait_for_text('...>')
    term:press('C-c')
    term:wait_until('a fresh prompt', at_prompt)
    assert.equal('7', run('7'))
  end)

  it('prints an error with its traceback and goes on', function()
    start()
    run('function fails() error("bad thing") end')
    local output = run('fails()')
    assert.matches('stdin:1: bad thing', output, 1, true)
    assert.matches('stack traceback:', output, 1, true)
    assert.matches("in function 'fails'", output, 1, true)
    assert.not_matches('repl.lua', output, 1, true)
    assert.equal('still here', run('print("still here")'))
  end)

  it('exits with status 0 on Ctrl-D', function()
    start()
    term:press('C-d')
    assert.equal(0, term:wait_exit())
  end)
end)
