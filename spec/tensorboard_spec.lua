require 'busted.runner'()
-- pmp.tensorboard against an independent reader (spec/support/tensorboard_reader.lua). Nothing below calls the
-- writer's helpers except the check value test of the writer's crc32c.
local ffi = require 'ffi'
local shell = require 'spec.support.shell'

local reader = require 'spec.support.tensorboard_reader'
local crc32c, decode, read_file, list_dir, read_events = reader.crc32c, reader.decode, reader.read_file, reader.list_dir,
  reader.read_events

---------------------------------------------------------------------------------------------------

describe('pmp.tensorboard', function()
  local tensorboard = pmp.tensorboard
  local dir
  before_each(function() dir = shell.temp_dir() end)
  after_each(function() shell.remove_dir(dir) end)

  it('computes the CRC-32C check value', function()
    assert.equal(0xE3069283, tensorboard.crc32c('123456789'))
    assert.equal(0xE3069283, crc32c('123456789')) -- the spec's reader agrees
    assert.equal(0, tensorboard.crc32c(''))
  end)

  it('names the file events.out.tfevents.<time>.<host>.<pid>.<counter><suffix> in a new directory', function()
    local before = os.time()
    local tb = tensorboard.writer(dir .. '/a/b', { filename_suffix = '.v2' })
    tb:close()
    local names = list_dir(dir .. '/a/b')
    assert.equal(1, #names)
    local t, host, pid, counter = names[1]:match('^events%.out%.tfevents%.(%d+)%.(.+)%.(%d+)%.(%d+)%.v2$')
    assert.truthy(t, names[1])
    assert.equal(10, #t)
    assert.is_true(math.abs(tonumber(t) - before) <= 2)
    assert.truthy(#host > 0)
    assert.truthy(tonumber(pid) > 0 and tonumber(counter) >= 0)
    -- a second writer in the same second gets a different name
    local tb2 = tensorboard.writer(dir .. '/a/b', { filename_suffix = '.v2' })
    tb2:close()
    assert.equal(2, #list_dir(dir .. '/a/b'))
  end)

  it('writes scalars that read back with tags, steps and float32-rounded values', function()
    local tb = tensorboard.writer(dir)
    local logged = {
      { 'lm loss', 10.123456789, 1 }, { 'lm loss', 0.1, 2 }, { 'learning-rate', 3e-4, 2 },
      { 'lm loss', -2.5, 2^40 }, { 'grad-norm', 1e30, 3 },
    }
    for _, s in ipairs(logged) do tb:add_scalar(s[1], s[2], s[3]) end
    tb:add_scalar('explicit time', 1, 7, 1234.5)
    tb:close()

    local events = read_events(tb.path)
    assert.equal(1 + #logged + 1, #events)
    assert.equal('brain.Event:2', events[1].file_version)
    assert.is_true(math.abs(events[1].wall_time - os.time()) < 60)
    for i, s in ipairs(logged) do
      local e = events[i + 1]
      assert.equal(s[3], e.step)
      assert.equal(1, #e.values)
      assert.equal(s[1], e.values[1].tag)
      assert.equal(tonumber(ffi.new('float', s[2])), e.values[1].simple_value)
    end
    -- float32 rounding, spelled out for one value: 0.1 is stored as the float nearest to it
    assert.equal(0.100000001490116119384765625, events[3].values[1].simple_value)
    assert.equal(1234.5, events[#events].wall_time)
    assert.equal(7, events[#events].step)
  end)

  it('buffers events until flush', function()
    local tb = tensorboard.writer(dir, { max_queue = 100, flush_secs = 1000 })
    local size_after_open = #read_file(tb.path)
    tb:add_scalar('x', 1, 1)
    assert.equal(size_after_open, #read_file(tb.path))
    tb:flush()
    assert.is_true(#read_file(tb.path) > size_after_open)
    tb:close()
    tb:close() -- closing twice is harmless
  end)

  it('writes text as a string tensor for the text plugin', function()
    local tb = tensorboard.writer(dir)
    tb:add_text('config', 'lr: **3e-4**', 5)
    tb:close()
    local v = read_events(tb.path)[2].values[1]
    assert.equal('config', v.tag)
    assert.equal('text', decode(v.metadata[1][1])[1][1]) -- plugin_data.plugin_name
    assert.equal(7, v.tensor[1][1])                      -- dtype DT_STRING
    assert.equal('lr: **3e-4**', v.tensor[8][1])         -- string_val
  end)
end)
