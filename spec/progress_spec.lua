require 'busted.runner'()
-- pmp.progress: the ETA arithmetic and the plain lines written when the output is not a terminal,
-- driven by a fake clock so every line's numbers are known in advance.
local progress = require 'pmp.progress'

local function recorder()
  local out = { text = '' }
  function out:write(...) for _, s in ipairs({ ... }) do self.text = self.text .. s end end
  function out:flush() end
  function out:lines()
    local list = {}
    for line in self.text:gmatch('[^\n]+') do list[#list + 1] = line end
    return list
  end
  return out
end

local function fake_clock()
  local t = { now = 100 }
  return t, function() return t.now end
end

describe('progress.eta', function()
  it('is the remaining count at the average rate so far', function()
    -- 25 of 100 in 10 s: 2.5 per second, 75 left -> 30 s
    assert.are.equal(30, progress.eta(25, 100, 10))
    assert.are.equal(0, progress.eta(100, 100, 7))
    assert.is_nil(progress.eta(0, 100, 5))
    assert.is_nil(progress.eta(5, nil, 5))
  end)

  it('formats durations as MM:SS, with hours when needed', function()
    assert.are.equal('00:30', progress.duration(30))
    assert.are.equal('01:15', progress.duration(75))
    assert.are.equal('1:02:05', progress.duration(3725))
    assert.are.equal('--:--', progress.duration(nil))
  end)
end)

describe('progress bars off a terminal', function()
  it('print a line per tenth of the total and a final line with the total time', function()
    local t, now = fake_clock()
    local out = recorder()
    local bar = progress.new({ total = 200, label = 'eval', unit = 'docs', stream = out, tty = false, clock = now,
      interval = 1000 })
    for k = 1, 200 do
      t.now = 100 + k * 0.5                 -- 2 docs per second
      bar:update(k)
    end
    bar:finish('acc 0.5')
    local lines = out:lines()
    assert.are.equal(10, #lines)             -- 10%, 20%, ..., 90%, then the final line
    assert.are.equal('eval: 20/200 docs (10.0%), 2.0 docs/s, ETA 01:30', lines[1])
    assert.are.equal('eval: 100/200 docs (50.0%), 2.0 docs/s, ETA 00:50', lines[5])
    assert.are.equal('eval: 200/200 docs (100.0%), 2.0 docs/s, done in 01:40 | acc 0.5', lines[10])
    assert.is_nil(out.text:find('\r', 1, true))
  end)

  it('print a line every interval seconds when the tenths come slowly', function()
    local t, now = fake_clock()
    local out = recorder()
    local bar = progress.new({ total = 1000, label = 'x', stream = out, tty = false, clock = now, interval = 5 })
    for k = 1, 30 do
      t.now = 100 + k                       -- one per second: 3% after 30 s
      bar:update(k)
    end
    local lines = out:lines()
    assert.are.equal(6, #lines)
    assert.are.equal('x: 5/1000 (0.5%), 1.0 it/s, ETA 16:35', lines[1])
  end)

  it('count bytes in readable units, and work without a total', function()
    local t, now = fake_clock()
    local out = recorder()
    local bar = progress.new({ label = 'read', unit = 'B', stream = out, tty = false, clock = now, interval = 1 })
    t.now = 102
    bar:update(3000000)
    bar:finish()
    assert.are.same({ 'read: 3.0 MB, 1.5 MB/s', 'read: 3.0 MB, 1.5 MB/s, done in 00:02' }, out:lines())
  end)
end)

describe('progress bars on a terminal', function()
  it('redraw one line in place and end it at finish', function()
    local t, now = fake_clock()
    local out = recorder()
    local bar = progress.new({ total = 4, label = 'p', stream = out, tty = true, clock = now })
    for k = 1, 4 do
      t.now = 100 + k
      bar:update(k)
    end
    bar:finish()
    assert.are.equal(1, select(2, out.text:gsub('\n', '')))
    assert.is_true(select(2, out.text:gsub('\r', '')) >= 4)
    assert.matches('p: %[######%.%.%.%.*%] 1/4 %(25.0%%%)', out.text)
    assert.matches('p: %[########################%] 4/4 %(100.0%%%), 1.0 it/s, done in 00:04 *\n$', out.text)
  end)
end)
