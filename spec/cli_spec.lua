require 'busted.runner'()
local shell = require 'spec.support.shell'

describe('pmp command line', function()
  local dir
  before_each(function() dir = shell.temp_dir() end)
  after_each(function() shell.remove_dir(dir) end)

  local function script(source)
    local path = dir .. '/script.lua'
    shell.write_file(path, source)
    return path
  end

  it('passes arguments to a script as arg and ...', function()
    local path = script([[
      print('arg0=' .. arg[0])
      print('arg-1=' .. arg[-1])
      print('args=' .. table.concat(arg, ' '))
      print('varargs=' .. table.concat({...}, ' '))
    ]])
    local out, err, status = shell.run_pmp({ path, 'a', '--flag', 'v' })
    assert.equal(0, status, err)
    assert.matches('arg0=' .. path, out, 1, true)
    assert.matches('arg-1=' .. shell.pmp, out, 1, true)
    assert.matches('args=a --flag v\n', out, 1, true)
    assert.matches('varargs=a --flag v\n', out, 1, true)
  end)

  -- libgomp reads its spin policy when it loads, so pmp picks one and re-executes itself: long spins
  -- when its threads have the cores to themselves, short ones when ranks or other work share them.
  it('chooses the OpenMP spin before libgomp loads, and keeps a policy the user set', function()
    local function spin_count(env)
      local out, err, status = shell.run('env -u GOMP_SPINCOUNT -u OMP_WAIT_POLICY ' .. env .. ' ' ..
        shell.quote(shell.pmp) .. [[ -e 'print(os.getenv("GOMP_SPINCOUNT"))']])
      assert.equal(0, status, err)
      return out
    end
    assert.equal('1000\n', spin_count('OMPI_COMM_WORLD_LOCAL_SIZE=100000 OMP_NUM_THREADS=2'))
    assert.is_truthy(({ ['1000\n'] = true, ['100000\n'] = true })[spin_count('')])
    assert.equal('7\n', spin_count('GOMP_SPINCOUNT=7'))
    assert.equal('nil\n', spin_count('OMP_WAIT_POLICY=passive'))
  end)

  it('preloads the pmp library as a global', function()
    local out, err, status = shell.run_pmp({ '-e', "print(type(pmp), pmp == require 'pmp')" })
    assert.equal(0, status, err)
    assert.equal('table\ttrue\n', out)
  end)

  it('runs several -e in order and then exits', function()
    local out, err, status = shell.run_pmp({ '-e', 'x = 20', '-e', 'print(x + 1)' }, 'print("stdin ran")\n')
    assert.equal(0, status, err)
    assert.equal('21\n', out)
  end)

  it('requires a module into a global with -l', function()
    shell.write_file(dir .. '/greeting.lua', 'return { text = "hello" }\n')
    local out, err, status = shell.run('LUA_PATH=' .. shell.quote(dir .. '/?.lua;;') .. ' ' ..
      shell.quote(shell.pmp) .. [[ -l greeting -e 'print(greeting.text)']])
    assert.equal(0, status, err)
    assert.equal('hello\n', out)
  end)

  it('runs the script then the prompt with -i, reading piped stdin', function()
    local path = script('y = 7\n')
    local out, err, status = shell.run_pmp({ '-i', path }, 'y * 6\nfunction f(x)\nreturn x + 1\nend\nf(1)\n')
    assert.equal(0, status, err)
    assert.equal('42\n2\n', out)
  end)

  it('runs the script read from stdin with -', function()
    local out, err, status = shell.run_pmp({ '-', 'p', 'q' }, 'print(select("#", ...), ...)\n')
    assert.equal(0, status, err)
    assert.equal('2\tp\tq\n', out)
  end)

  it('runs stdin as a script when it is not a terminal and there are no arguments', function()
    local out, err, status = shell.run_pmp({}, 'print("from stdin")\n')
    assert.equal(0, status, err)
    assert.equal('from stdin\n', out)
  end)

  it('prints usage for --help', function()
    local out, _, status = shell.run_pmp({ '--help' })
    assert.equal(0, status)
    assert.matches('^usage: pmp ', out)
    assert.matches('-e code', out, 1, true)
  end)

  it('prints the engine and LuaJIT versions for --version', function()
    local out, _, status = shell.run_pmp({ '--version' })
    assert.equal(0, status)
    assert.matches('^pmp %S+ %(LuaJIT 2%.1[^)]*%)\n$', out)
  end)

  it('rejects an unknown option with the usage', function()
    local _, err, status = shell.run_pmp({ '--no-such-option' })
    assert.equal(1, status)
    assert.matches("unrecognized option or missing value: '--no-such-option'", err, 1, true)
  end)

  it('reports a failing script as one line on stderr and status 1', function()
    local path = script('local function inner() error("it broke") end\ninner()\n')
    local out, err, status = shell.run_pmp({ path })
    assert.equal(1, status)
    assert.equal('', out)
    assert.equal('pmp: ' .. path .. ':1: it broke\n', err)
  end)

  it('follows the message with the stack when PMP_TRACEBACK=1', function()
    local path = script('local function inner() error("it broke") end\ninner()\n')
    for _, setting in ipairs({ '1', 'yes' }) do
      local _, err, status = shell.run('PMP_TRACEBACK=' .. setting .. ' ' .. shell.quote(shell.pmp) .. ' ' .. shell.quote(path))
      assert.equal(1, status)
      assert.equal(1, err:find('pmp: ' .. path .. ':1: it broke\nstack traceback:\n', 1, true), err)
      assert.matches("in function 'inner'", err, 1, true)
    end
    local _, plain = shell.run('PMP_TRACEBACK=0 ' .. shell.quote(shell.pmp) .. ' ' .. shell.quote(path))
    assert.equal('pmp: ' .. path .. ':1: it broke\n', plain)
  end)

  it('describes an error object that is not a string', function()
    local _, err, status = shell.run_pmp({ '-e', 'error({})' })
    assert.equal(1, status)
    assert.matches('pmp: (error object is a table value)', err, 1, true)
    local _, err2 = shell.run_pmp({ '-e', 'error(setmetatable({}, {__tostring = function() return "custom" end}))' })
    assert.matches('pmp: custom', err2, 1, true)
  end)

  it('reports a syntax error and a missing script', function()
    local _, err, status = shell.run_pmp({ '-e', 'x = = 1' })
    assert.equal(1, status)
    assert.matches('^pmp: %(command line%):1:', err)
    _, err, status = shell.run_pmp({ dir .. '/missing.lua' })
    assert.equal(1, status)
    assert.matches('cannot open ' .. dir .. '/missing.lua', err, 1, true)
  end)

  -- Runs `code` with -e, sends SIGINT once it printed "started", returns stderr and the status (grep -s:
  -- the background shell may not have created the output file yet when grep first looks).
  local function interrupt(code)
    local out_file = dir .. '/out'
    local _, err, status = shell.run(string.format(
      '%s -e %s >%s & until grep -qs started %s; do sleep 0.02; done; kill -INT $!; wait $!',
      shell.quote(shell.pmp), shell.quote('io.write("started\\n") io.flush() ' .. code),
      shell.quote(out_file), shell.quote(out_file)))
    return err, status
  end

  it('stops interpreted Lua code on Ctrl-C (SIGINT) with one line and status 1', function()
    -- Bounded in time in case the interrupt does not arrive.
    local err, status = interrupt('jit.off() local start = os.clock() while os.clock() - start < 10 do end')
    assert.equal(1, status, err)
    assert.matches('^pmp: [^\n]*interrupted!\n$', err)
  end)

  it('stops a loop of engine ops on Ctrl-C', function()
    local err, status = interrupt([[local x = pmp.ones({4}) local start = os.clock()
      while os.clock() - start < 10 do local y = x + x end]])
    assert.equal(1, status, err)
    assert.matches('interrupted', err, 1, true)
  end)

  it('exits with the status given to os.exit', function()
    local _, _, status = shell.run_pmp({ '-e', 'os.exit(7)' })
    assert.equal(7, status)
  end)

  it('finds its modules from another working directory', function()
    local out, err, status = shell.run('cd /tmp && ' .. shell.quote(shell.pmp) ..
      [[ -e 'print(require("pmp") == pmp, package.loaded["pmp.root"])']])
    assert.equal(0, status, err)
    assert.equal('true\t' .. shell.root .. '\n', out)
  end)

  it('takes the project root from PMP_PATH', function()
    os.execute('mkdir -p ' .. shell.quote(dir .. '/lua/pmp'))
    shell.write_file(dir .. '/lua/pmp/init.lua', 'return { marker = "override" }\n')
    local out, err, status = shell.run('PMP_PATH=' .. shell.quote(dir) .. ' ' .. shell.quote(shell.pmp) ..
      [[ -e 'print(pmp.marker, package.loaded["pmp.root"])']])
    assert.equal(0, status, err)
    assert.equal('override\t' .. dir .. '\n', out)
  end)

  it('fails with context when PMP_PATH does not exist', function()
    local _, err, status = shell.run('PMP_PATH=/nonexistent/pmp ' .. shell.quote(shell.pmp) .. ' -e 1')
    assert.equal(1, status)
    assert.matches('PMP_PATH=/nonexistent/pmp: No such file or directory', err, 1, true)
  end)

  it('runs a busted spec standalone', function()
    local passing = script([[
      require 'busted.runner'()
      describe('standalone', function()
        it('sees pmp', function() assert.is_table(pmp) end)
      end)
    ]])
    local out, err, status = shell.run_pmp({ passing, '-o', 'TAP' })
    assert.equal(0, status, out .. err)
    assert.matches('ok 1 - standalone sees pmp', out, 1, true)

    local failing = dir .. '/failing_spec.lua'
    shell.write_file(failing, [[
      require 'busted.runner'()
      it('fails', function() assert.equal(1, 2) end)
    ]])
    out, err, status = shell.run_pmp({ failing, '-o', 'TAP' })
    assert.equal(1, status)
    assert.matches('not ok 1 - fails', out, 1, true)
    assert.equal('', err)
  end)

  it('runs specs through spec/run.lua with a summary line', function()
    local failing = dir .. '/mixed_spec.lua'
    shell.write_file(failing, [[
      describe('mixed', function()
        it('passes', function() end)
        it('fails', function() assert.is_true(false) end)
        pending('later')
      end)
    ]])
    local out, _, status = shell.run_pmp({ shell.root .. '/spec/run.lua', failing })
    assert.equal(1, status)
    assert.matches('ok   mixed passes\n', out, 1, true)
    assert.matches('FAIL mixed fails\n', out, 1, true)
    assert.matches('skip mixed later\n', out, 1, true)
    assert.matches('\n1 passed, 1 failed, 1 skipped\n$', out)
  end)
end)
