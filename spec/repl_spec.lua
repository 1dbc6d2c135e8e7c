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

describe('pmp.help', function()
  local help = require 'pmp.help'
  local dir, fixture

  -- A module whose doc comments the expectations below are written from.
  local FIXTURE = [=[
local M = {}

--- Doubles x.
--- Returns a number.
-- A note for readers of the code, not for help.
function M.double(x) return 2 * x end

---------------------------------------------------------------------------------------------------
-- A section title is not a doc comment.
function M.under_separator(a, b) return a + b end

local function multiplier(k) return function(x) return k * x end end
--- Multiplies by a constant.
M.triple = multiplier(3)
M.quadruple = multiplier(4)
M.negate = function(x) return -x end

--- A point in the plane.
M.Point = pmp.nn.Module:extend('Point')
function M.Point:init(x, y) self.x, self.y = x, y end
function M.Point:norm() return math.sqrt(self.x ^ 2 + self.y ^ 2) end

return M
]=]

  local saved_path

  setup(function()
    dir = shell.temp_dir()
    local file = assert(io.open(dir .. '/help_fixture.lua', 'w'))
    file:write(FIXTURE)
    file:close()
    saved_path = package.path
    package.path = dir .. '/?.lua;' .. package.path
    fixture = require 'help_fixture'
  end)

  teardown(function()
    package.loaded.help_fixture = nil
    package.path = saved_path
    shell.remove_dir(dir)
  end)

  it('shows the signature and the --- lines above a definition, not plain comments', function()
    local text = help.text(fixture.double)
    assert.matches('^help_fixture%.double%(x%)', text)
    assert.matches('help_fixture.lua:6]', text, 1, true)
    assert.matches('\n  Doubles x.\n  Returns a number.$', text)
    assert.not_matches('A note', text, 1, true)
    assert.matches('^help_fixture%.under_separator%(a, b%).*%(no doc comment%)$', help.text(fixture.under_separator))
  end)

  it('gives look-alike definitions below a documented one its doc', function()
    assert.matches('Multiplies by a constant.', help.text(fixture.triple), 1, true)
    assert.matches('^help_fixture%.quadruple%(x%).*Multiplies by a constant%.$', help.text(fixture.quadruple))
    assert.matches('(no doc comment)', help.text(fixture.negate), 1, true)
  end)

  it('documents a class by its definition and its constructor signature', function()
    local text = help.text(fixture.Point)
    assert.matches('^help_fixture%.Point%(x, y%)', text)
    assert.matches('A point in the plane.', text, 1, true)
  end)

  it('explains pmp functions, nn classes and their instances, tensor methods and modules', function()
    local linear = help.text(pmp.nn.Linear)
    assert.matches('^pmp%.nn%.Linear%(in_features, out_features, options%)', linear)
    assert.matches('y = x weight^T + bias', linear, 1, true)
    assert.equal(linear, help.text(pmp.nn.Linear(2, 3)))
    assert.equal(linear, help.text('pmp.nn.Linear'))
    assert.matches('^pmp%.zeros%(%.%.%.%).*pmp%.zeros%(2, 3%)', help.text(pmp.zeros))
    local sum = help.text(pmp.zeros(2).sum)
    assert.matches('^tensor:sum%(dim, keepdim%)', sum)
    assert.matches('along dims', sum, 1, true)
    assert.equal(sum, help.text('tensor:sum'))
    assert.matches('^tensor:sub%(b%).*Elementwise a %+ b', help.text(pmp.tensor_methods.sub))
    assert.matches('^pmp%.nn%.Module:num_parameters%(%)', help.text(pmp.nn.Linear(2, 3).num_parameters))
    assert.matches('^pmp%.models%.from_pretrained%(dir, options%).*Loads a Hugging Face model directory',
      help.text(pmp.models.from_pretrained))
    assert.matches('^pmp%.tokenizer%.from_pretrained%(dir%)', help.text(pmp.tokenizer.from_pretrained))
    assert.matches('^pmp%.optim%.AdamW%(params, options%)', help.text(pmp.optim.AdamW))
    local optim = help.text(pmp.optim)
    assert.matches('^pmp%.optim    %[lua/pmp/optim/init%.lua%]\n  pmp%.optim: optimizers', optim)
    assert.matches('AdamW', optim, 1, true)
  end)

  it('shows the doc comment that opens a Lua file named by its path', function()
    local path = dir .. '/recipe.lua'
    local file = assert(io.open(path, 'w'))
    file:write('--- Trains a model.\n---   pmp recipe.lua --steps 10\n-- (a note)\nlocal x = 1\n')
    file:close()
    assert.equal(path .. '\n  Trains a model.\n    pmp recipe.lua --steps 10', help.text(path))
    assert.matches("no file 'missing.lua'", help.text('missing.lua'), 1, true)
  end)

  it('prints an index of the modules with their documented members', function()
    local index = help.text()
    assert.matches("help 'topic'", index, 1, true)
    assert.matches('\n  pmp%.nn +modules[^\n]*\n +Attention Dropout Embedding GPTModel', index)
    assert.matches('\n  pmp%.optim +optimizers', index)
    assert.matches('\n  pmp%.summary ', index)
  end)

  it('searches names and doc comments', function()
    local found = help.text('warmup')
    assert.matches("^Found for 'warmup':", found)
    assert.matches('pmp.optim.schedule.new(options)', found, 1, true)
    assert.matches('tensor:softmax(dim)', help.text('SOFTMAX'), 1, true)
    assert.equal("nothing found for 'no such topic'", help.text('no such topic'))
    assert.matches('help%(nil%)', help.text(nil))
  end)
end)

describe('pmp.repl shorthands', function()
  after_each(function() repl.discard() end)

  it('reads ?x as help(x), ?x:m as help(x.m) and a bare help as help()', function()
    local printed
    local original_print, original_help = print, rawget(_G, 'help')
    rawset(_G, 'help', require('pmp.help').print)
    rawset(_G, 'print', function(text) printed = text end)
    local ok, err = pcall(function()
      assert.equal('?pmp.zeros', repl.feed('?pmp.zeros'))
      repl.execute()
      assert.equal(require('pmp.help').text(pmp.zeros), printed)
      repl.feed('?pmp.zeros(2):sum')
      repl.execute()
      assert.equal(require('pmp.help').text(pmp.tensor_methods.sum), printed)
      assert.equal('help', repl.feed('help'))
      repl.execute()
      assert.equal(require('pmp.help').text(), printed)
    end)
    rawset(_G, 'print', original_print)
    rawset(_G, 'help', original_help)
    assert(ok, err)
  end)

  it("completes tensor methods after ':' and string keys in brackets", function()
    local function complete(line)
      local word = line:match('[^%s\'"%[%]%(%)]*$')
      return repl.complete(word, line, #line)
    end
    rawset(_G, 'completion_tensor', pmp.zeros(2))
    rawset(_G, 'completion_cfg', { hidden_size = 8, hidden_dropout = 0, ['decoder.layers.0.weight'] = 1, ['two words'] = 2 })
    assert.same({ 'completion_tensor:softmax' }, complete('completion_tensor:softm'))
    assert.same({ 'completion_cfg.hidden_dropout', 'completion_cfg.hidden_size' }, complete('completion_cfg.hid'))
    assert.same({ 'hidden_dropout', 'hidden_size' }, complete("completion_cfg['hid"))
    assert.same({ 'decoder.layers.0.weight' }, complete('x = completion_cfg["decoder.la'))
    assert.same({}, complete("completion_cfg['two"))
    assert.same({}, complete("print('hid"))
    rawset(_G, 'completion_tensor', nil)
    rawset(_G, 'completion_cfg', nil)
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

  it('explains things with help(x), ?x, help \'topic\' and a bare help', function()
    start()
    local linear = run('help(pmp.nn.Linear)')
    assert.matches('^pmp%.nn%.Linear%(in_features, out_features, options%)', linear)
    assert.matches('y = x weight^T + bias', linear, 1, true)
    assert.matches('^tensor:sum%(dim, keepdim%)', run('?pmp.zeros(1).sum'))
    assert.matches('pmp.optim.schedule.new(options)', run("help 'warmup'"), 1, true)
    term:type('help')
    term:press('Enter')
    term:wait_until('the end of the index', function(t)  -- the index is longer than the screen
      return at_prompt(t) and t:screen():find('\n  pmp%.tokenizer +Hugging Face[^\n]*\n +from_pretrained') ~= nil
    end)
  end)

  it('completes methods after : and keys in brackets with Tab', function()
    start()
    run('t = pmp.zeros(3)')
    term:type('t:softm')
    term:press('Tab')
    term:wait_for_text('pmp> t:softmax')
    term:press('C-c')
    term:wait_until('a fresh prompt', at_prompt)
    run('cfg = {hidden_size = 64}')
    term:type("cfg['hid")
    term:press('Tab')
    term:wait_for_text("pmp> cfg['hidden_size'") -- readline closes the quote
    term:type(']')
    term:press('Enter')
    term:wait_for_text('\n64\n')
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
