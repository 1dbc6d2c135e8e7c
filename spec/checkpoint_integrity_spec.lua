require 'busted.runner'()
-- Checkpoint files that changed on disk are refused, and killed runs' temporaries are cleaned up.
-- Every file a save writes has its CRC32C in layout.json (core/io/checksum.c; checked against the
-- standard's check value and a bitwise implementation written here), verified when it is loaded: a
-- zeroed block inside the tensor data fails the load naming the file. Leftover `*.tmp.PID` entries of
-- dead processes are removed by the next save into their directory (checkpoint directories,
-- safetensors files, indexed dataset builders), while those of live processes stay.
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local pio = require 'pmp.io'
local json = require 'pmp.json'
local safetensors = require 'pmp.safetensors'
local indexed = require 'pmp.data.indexed'
local shell = require 'spec.support.shell'
local fails_with = require('spec.support.expect').fails_with
local crc32c_bitwise = require 'spec.support.crc32c'

local function c_crc(bytes)
  local buf = ffi.new('uint8_t[?]', math.max(#bytes, 1), bytes)
  return tonumber(C.pmp_crc32c(0, buf, #bytes))
end

describe('CRC32C', function()
  it("gives the standard's check value and agrees with a bitwise implementation at every length", function()
    assert.are.equal(0xE3069283, c_crc({ ('123456789'):byte(1, -1) }))
    local bytes, state = {}, 12345
    for k = 1, 3001 do
      state = (state * 1103515245 + 12345) % 2147483648
      bytes[k] = math.floor(state / 65536) % 256
    end
    for n = 0, 40 do
      local part = { unpack(bytes, 1, n) }
      assert.are.equal(crc32c_bitwise(part), c_crc(part), 'length ' .. n)
    end
    assert.are.equal(crc32c_bitwise(bytes), c_crc(bytes))
    -- continuing a crc over a second piece is the crc of the whole
    local buf = ffi.new('uint8_t[?]', #bytes, bytes)
    assert.are.equal(c_crc(bytes), tonumber(C.pmp_crc32c(C.pmp_crc32c(0, buf, 1000), buf + 1000, #bytes - 1000)))
    local dir = shell.temp_dir()
    finally(function() shell.remove_dir(dir) end)
    shell.write_file(dir .. '/f', string.char(unpack(bytes)))
    assert.are.equal(string.format('crc32c:%08x', crc32c_bitwise(bytes)),
      pio.checksum(dir .. '/f'))
    fails_with(function() pio.checksum(dir .. '/missing') end, dir .. '/missing')
  end)
end)

local config = { num_layers = 1, hidden_size = 8, num_attention_heads = 2, vocab_size = 11, dtype = 'f32' }

local function model_and_optimizer()
  local model = pmp.nn.GPTModel(config)
  return model, pmp.optim.AdamW(model:parameters(), { lr = 0.1 })
end

-- Overwrites n bytes of path at 0-based offset with zeros, in place.
local function zero_block(path, offset, n)
  local f = assert(io.open(path, 'r+b'))
  f:seek('set', offset)
  f:write(string.rep('\0', n))
  f:close()
end

describe('checkpoint checksums', function()
  local dir, iter, model_file, info_file
  before_each(function()
    dir = shell.temp_dir()
    pmp.manual_seed(3)
    local model, opt = model_and_optimizer()
    model(pmp.tensor({ { 1, 2, 3 } }, { dtype = 'i64' })):sum():backward()
    opt:step()
    pmp.checkpoint.save(dir, 1, model, opt, {})
    iter = dir .. '/iter_0000001'
    model_file, info_file = iter .. '/mp_rank_00/model_optim_rng.safetensors', iter .. '/mp_rank_00/model_optim_rng.json'
  end)
  after_each(function() shell.remove_dir(dir) end)

  it('records one per file, of the bytes on disk, and loads an intact checkpoint', function()
    local sums = json.decode(pio.read_file(iter .. '/layout.json')).checksums
    assert.are.same({ 'mp_rank_00/model_optim_rng.json', 'mp_rank_00/model_optim_rng.safetensors' },
      (function() local k = {} for name in pairs(sums) do k[#k + 1] = name end table.sort(k) return k end)())
    assert.are.equal(string.format('crc32c:%08x', crc32c_bitwise(pio.read_file(model_file))),
      sums['mp_rank_00/model_optim_rng.safetensors'])
    local model, opt = model_and_optimizer()
    pmp.checkpoint.load(dir, model, opt)
  end)

  it('a zeroed block inside the tensor data fails the load, naming the file', function()
    local info = safetensors.inspect(model_file)
    local data_size = info.file_size - info.data_start
    assert.is_true(data_size > 256)
    zero_block(model_file, info.data_start + math.floor(data_size / 2), 64)
    local model, opt = model_and_optimizer()
    fails_with(function() pmp.checkpoint.load(dir, model, opt) end, model_file, 'corrupted', 'checksum')
    fails_with(function() pmp.checkpoint.load_model(dir) end, model_file, 'corrupted')
  end)

  it('a changed byte in a rank JSON fails too, naming it', function()
    local text = pio.read_file(info_file)
    local at = text:find('"iteration":1')
    assert.is_truthy(at)
    local f = assert(io.open(info_file, 'r+b'))
    f:seek('set', at + #'"iteration":' - 1)
    f:write('7')
    f:close()
    local model, opt = model_and_optimizer()
    fails_with(function() pmp.checkpoint.load(dir, model, opt) end, info_file, 'corrupted')
  end)
end)

describe('leftover temporaries of killed runs', function()
  -- The pid of a process that has exited (reaped), and one that lives (init) but is not this one.
  local function dead_pid()
    local pipe = assert(io.popen('sh -c \'echo $$\''))
    local pid = tonumber(pipe:read('*l'))
    pipe:close()
    assert.are.equal(0, C.pmp_process_alive(pid))
    return pid
  end
  local LIVE = 1

  local dir
  before_each(function() dir = shell.temp_dir() end)
  after_each(function() shell.remove_dir(dir) end)

  it('a checkpoint save removes dead runs\' iteration directories and tracker files, not live ones', function()
    local dead = dead_pid()
    assert.are.equal(1, C.pmp_process_alive(LIVE))
    pio.mkdir_p(dir .. '/iter_0000004.tmp.' .. dead .. '/mp_rank_00')
    shell.write_file(dir .. '/iter_0000004.tmp.' .. dead .. '/mp_rank_00/model_optim_rng.json', '{')
    shell.write_file(dir .. '/latest_checkpointed_iteration.txt.tmp.' .. dead, '4')
    pio.mkdir_p(dir .. '/iter_0000005.tmp.' .. LIVE)
    shell.write_file(dir .. '/notes.tmp.txt', 'mine')
    pmp.manual_seed(3)
    local model, opt = model_and_optimizer()
    pmp.checkpoint.save(dir, 1, model, opt, {})
    assert.are.same({ 'iter_0000001', 'iter_0000005.tmp.' .. LIVE, 'latest_checkpointed_iteration.txt', 'notes.tmp.txt' },
      pio.listdir(dir))
  end)

  it('safetensors.save removes its own file\'s dead temporaries only', function()
    local dead = dead_pid()
    shell.write_file(dir .. '/a.safetensors.tmp.' .. dead, 'half')
    shell.write_file(dir .. '/b.safetensors.tmp.' .. dead, 'half')
    shell.write_file(dir .. '/a.safetensors.tmp.' .. LIVE, 'half')
    safetensors.save(dir .. '/a.safetensors', { x = pmp.ones(2) })
    assert.are.same({ 'a.safetensors', 'a.safetensors.tmp.' .. LIVE, 'b.safetensors.tmp.' .. dead }, pio.listdir(dir))
  end)

  it('an indexed dataset builder removes its prefix\'s dead .bin/.idx temporaries', function()
    local dead = dead_pid()
    shell.write_file(dir .. '/out.bin.tmp.' .. dead, 'half')
    shell.write_file(dir .. '/out.idx.tmp.' .. dead, 'half')
    shell.write_file(dir .. '/other.bin.tmp.' .. dead, 'half')
    shell.write_file(dir .. '/out.bin.tmp.' .. LIVE, 'half')
    local b = indexed.builder(dir .. '/out', { vocab_size = 100 })
    b:add_document({ 1, 2, 3 })
    b:finalize()
    assert.are.same({ 'other.bin.tmp.' .. dead, 'out.bin', 'out.bin.tmp.' .. LIVE, 'out.idx' }, pio.listdir(dir))
  end)
end)
