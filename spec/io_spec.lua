require 'busted.runner'()
-- pmp.io: atomic file and directory replacement, mkdir_p, and the small helpers around them.
local ffi = require 'ffi'
local pio = require 'pmp.io'

local fails_with = require('spec.support.expect').fails_with

local function read(path)
  local f = assert(io.open(path, 'rb'))
  local s = f:read('*a')
  f:close()
  return s
end

local root
before_each(function()
  root = string.format('%s/pmp_io_spec.%d.%d', os.getenv('TMPDIR') or '/tmp', pio.getpid(), math.random(1e9))
  pio.mkdir_p(root)
end)
after_each(function() pio.remove_tree(root) end)

describe('pmp.io.write_atomic', function()
  it('writes a string and leaves no temporary file', function()
    local path = root .. '/a.txt'
    assert.equal(5, pio.write_atomic(path, 'hello'))
    assert.equal('hello', read(path))
    assert.equal(11, pio.write_atomic(path, 'replacement'))
    assert.equal('replacement', read(path))
    assert.same({ 'a.txt' }, pio.listdir(root))
  end)

  it('gives a writer function strings, pointers and tensors', function()
    local path = root .. '/b.bin'
    local buf = ffi.new('uint8_t[3]', { 65, 66, 67 })
    local t = pmp.tensor({ { 1, 2 }, { 3, 4 } }, { dtype = 'i32' }):t()   -- not contiguous
    local n = pio.write_atomic(path, function(w)
      w:write('xy')
      w:write(buf, 3)
      w:write('0123456789', 4)
      w:write_tensor(t)
      assert.equal(9 + 16, w.bytes)
    end)
    assert.equal(25, n)
    local s = read(path)
    assert.equal('xyABC0123', s:sub(1, 9))
    local ints = ffi.cast('const int32_t *', s:sub(10))
    assert.same({ 1, 3, 2, 4 }, { ints[0], ints[1], ints[2], ints[3] })
  end)

  it('keeps the old file and removes the temporary one when the writer fails midway', function()
    local path = root .. '/c.txt'
    pio.write_atomic(path, 'old content')
    local err = fails_with(function()
      pio.write_atomic(path, function(w)
        w:write(string.rep('new ', 1000))
        error('disk on fire')
      end)
    end, path, 'disk on fire')
    assert.truthy(err:find('write_atomic', 1, true))
    assert.equal('old content', read(path))
    assert.same({ 'c.txt' }, pio.listdir(root))
  end)

  it('does not create the file when the first write fails', function()
    local path = root .. '/never.txt'
    fails_with(function() pio.write_atomic(path, function() error('nope') end) end, path, 'nope')
    assert.is_nil(pio.kind(path))
    assert.same({}, pio.listdir(root))
  end)

  it('names the path when the directory does not exist', function()
    local path = root .. '/missing/dir/x.txt'
    fails_with(function() pio.write_atomic(path, 'x') end, path, 'No such file')
  end)

  it('refuses bad arguments', function()
    fails_with(function() pio.write_atomic(root .. '/x', 42) end, 'string or a writer function')
    fails_with(function() pio.write_atomic(nil, 'x') end, 'expects a path')
    fails_with(function()
      pio.write_atomic(root .. '/y', function(w) w:write({}) end)
    end, 'expects a string or a pointer')
  end)
end)

describe('pmp.io.mkdir_p', function()
  it('creates missing parents and accepts existing directories', function()
    local path = root .. '/a/b/c'
    pio.mkdir_p(path)
    assert.is_true(pio.is_dir(path))
    pio.mkdir_p(path)
    pio.mkdir_p(root .. '/a/./b/../b/c/')
    assert.is_true(pio.is_dir(path))
  end)

  it('fails when a file is in the way', function()
    pio.write_atomic(root .. '/file', 'x')
    fails_with(function() pio.mkdir_p(root .. '/file/sub') end, root .. '/file', 'not a directory')
  end)
end)

describe('pmp.io.replace_dir_atomic', function()
  local function fill(files)
    return function(tmp)
      for name, content in pairs(files) do pio.write_atomic(tmp .. '/' .. name, content) end
    end
  end

  it('creates a new directory from the fill function', function()
    local dir = root .. '/ckpt'
    assert.equal(dir, pio.replace_dir_atomic(dir, fill({ ['a.txt'] = 'A', ['b.txt'] = 'B' })))
    assert.same({ 'a.txt', 'b.txt' }, pio.listdir(dir))
    assert.same({ 'ckpt' }, pio.listdir(root))
  end)

  local function replaces_existing()
    local dir = root .. '/ckpt'
    pio.replace_dir_atomic(dir, fill({ ['old.txt'] = 'old', ['same.txt'] = '1' }))
    pio.mkdir_p(dir .. '/nested/deeper')
    pio.write_atomic(dir .. '/nested/deeper/x', 'x')
    pio.replace_dir_atomic(dir .. '/', fill({ ['new.txt'] = 'new', ['same.txt'] = '2' }))
    assert.same({ 'new.txt', 'same.txt' }, pio.listdir(dir))
    assert.equal('2', read(dir .. '/same.txt'))
    assert.same({ 'ckpt' }, pio.listdir(root))   -- no .tmp or .old directories left
  end

  it('replaces an existing directory and removes the old one', replaces_existing)

  it('replaces an existing directory by moving it aside where it cannot exchange', function()
    pio._force_move_aside = true
    local ok, err = pcall(replaces_existing)
    pio._force_move_aside = nil
    assert(ok, err)
  end)

  it('leaves the old directory untouched when the fill function fails', function()
    local dir = root .. '/ckpt'
    pio.replace_dir_atomic(dir, fill({ ['keep.txt'] = 'keep' }))
    fails_with(function()
      pio.replace_dir_atomic(dir, function(tmp)
        pio.write_atomic(tmp .. '/partial.txt', 'partial')
        error('out of disk')
      end)
    end, dir, 'out of disk')
    assert.same({ 'keep.txt' }, pio.listdir(dir))
    assert.same({ 'ckpt' }, pio.listdir(root))
  end)

  it('refuses to replace a file', function()
    pio.write_atomic(root .. '/plain', 'x')
    fails_with(function() pio.replace_dir_atomic(root .. '/plain', fill({})) end, 'not a directory')
  end)
end)

describe('pmp.io helpers', function()
  it('tells files from directories and lists, sizes and removes them', function()
    pio.write_atomic(root .. '/f', '12345')
    pio.mkdir_p(root .. '/d/e')
    assert.equal('file', pio.kind(root .. '/f'))
    assert.equal('directory', pio.kind(root .. '/d'))
    assert.is_nil(pio.kind(root .. '/nothing'))
    assert.is_nil(pio.kind(root .. '/f/below'))
    assert.equal(5, pio.size(root .. '/f'))
    assert.same({ 'd', 'f' }, pio.listdir(root))
    fails_with(function() pio.listdir(root .. '/nothing') end, root .. '/nothing')
    pio.remove_tree(root .. '/d')
    pio.remove_tree(root .. '/d')   -- already gone: fine
    pio.remove(root .. '/f')
    assert.same({}, pio.listdir(root))
    assert.equal('12345', (pio.write_atomic(root .. '/g', '12345') and pio.read_file(root .. '/g')))
  end)

  it('splits paths', function()
    assert.equal('a/b', pio.dirname('a/b/c'))
    assert.equal('.', pio.dirname('c'))
    assert.equal('/', pio.dirname('/c'))
    assert.equal('c', pio.basename('a/b/c'))
    assert.equal('c', pio.basename('a/b/c/'))
    assert.equal('a/b/c', pio.join('a', 'b/', 'c'))
    assert.equal('/x', pio.join('a', '/x'))
  end)

  it('is reachable as pmp.io', function()
    assert.equal(pio, pmp.io)
  end)
end)
