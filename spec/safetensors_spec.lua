require 'busted.runner'()
-- pmp.safetensors: round trips for every dtype, zero-copy loading, the reference fixtures written by
-- the Python library (tools/make_safetensors_fixtures.py), malformed files, and sharded directories.
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local json = require 'pmp.json'
local pio = require 'pmp.io'
local st = require 'pmp.safetensors'

local FIXTURES = (package.loaded['pmp.root'] or '.') .. '/spec/fixtures/safetensors'

local fails_with = require('spec.support.expect').fails_with

local function read(path)
  local f = assert(io.open(path, 'rb'))
  local s = f:read('*a')
  f:close()
  return s
end

local function write_raw(path, bytes)
  local f = assert(io.open(path, 'wb'))
  f:write(bytes)
  f:close()
  return path
end

local function u64le(n)
  local out = {}
  for i = 1, 8 do
    out[i] = string.char(n % 256)
    n = math.floor(n / 256)
  end
  return table.concat(out)
end

-- A file with the given header text (size prefix computed unless given) and data bytes.
local function raw_file(path, header, data, size)
  return write_raw(path, u64le(size or #header) .. header .. (data or ''))
end

-- Row-major values of a tensor as Lua numbers/booleans, exact for i64 within 2^53.
local function flat(t)
  local out = {}
  local function walk(v)
    if type(v) == 'table' then for _, x in ipairs(v) do walk(x) end else out[#out + 1] = v end
  end
  walk(t:totable())
  return out
end

local function live_mappings()
  collectgarbage()
  collectgarbage()
  return C.pmp_mapping_live_count()
end

local root
before_each(function()
  root = string.format('%s/pmp_st_spec.%d.%d', os.getenv('TMPDIR') or '/tmp', pio.getpid(), math.random(1e9))
  pio.mkdir_p(root)
end)
after_each(function()
  pio.remove_tree(root)
end)

describe('safetensors round trips', function()
  local cases = {
    { 'f64', { { 0.1, -2.5 }, { 1e300, 5e-324 } } },
    { 'f32', { { 1.25, -3 }, { 0.375, 16777216 } } },
    { 'bf16', { 1.5, -2.25, 3.3895313892515355e38, 0 } },
    { 'f16', { 65504, -0.5, 6.103515625e-05, 1 / 1024 } },
    { 'i64', { -9007199254740991, 2 ^ 40, 0, 7 } },
    { 'i32', { { -2147483648, 2147483647 }, { -1, 42 } } },
    { 'u8', { 0, 1, 127, 128, 255 } },
    { 'bool', { true, false, true } },
  }

  it('keeps dtype, shape and values for every dtype', function()
    local tensors = {}
    for _, c in ipairs(cases) do tensors['t.' .. c[1]] = pmp.tensor(c[2], { dtype = c[1] }) end
    tensors.scalar = pmp.tensor(2.5)
    tensors.empty = pmp.zeros(0, 3, { dtype = 'bf16' })
    tensors.cube = pmp.arange(24, { dtype = 'i32' }):view(2, 3, 4)
    local path = root .. '/all.safetensors'
    local size = st.save(path, tensors)
    assert.equal(pio.size(path), size)
    local loaded, metadata = st.load(path)
    assert.same({ format = 'pt' }, metadata)
    for _, c in ipairs(cases) do
      local t = loaded['t.' .. c[1]]
      assert.equal(c[1], t.dtype)
      assert.same(tensors['t.' .. c[1]].shape, t.shape)
      assert.same(c[2], t:totable())
    end
    assert.same({}, loaded.scalar.shape)
    assert.equal(2.5, loaded.scalar:item())
    assert.same({ 0, 3 }, loaded.empty.shape)
    assert.equal('bf16', loaded.empty.dtype)
    assert.same(tensors.cube:totable(), loaded.cube:totable())
    local n = 0
    for _ in pairs(loaded) do n = n + 1 end
    assert.equal(11, n)
  end)

  it('writes the reference layout: padded header, larger dtypes first, every tensor aligned', function()
    local path = root .. '/layout.safetensors'
    st.save(path, { b = pmp.ones(3), a = pmp.ones(1, { dtype = 'u8' }), c = pmp.ones(2, { dtype = 'i64' }),
                    d = pmp.ones(1, { dtype = 'bf16' }) }, { note = 'x', step = 12 })
    local info = st.inspect(path)
    assert.equal(0, info.header_size % 8)
    assert.same({ 'c', 'b', 'd', 'a' }, info.names)
    assert.same({ format = 'pt', note = 'x', step = '12' }, info.metadata)
    local sizes = { I64 = 8, F32 = 4, BF16 = 2, U8 = 1 }
    for _, name in ipairs(info.names) do
      local e = info.tensors[name]
      assert.equal(0, (info.data_start + e.data_offsets[1]) % sizes[e.dtype])
    end
    local text = read(path):sub(9, 8 + info.header_size)
    local head = '{"__metadata__":{"format":"pt","note":"x","step":"12"},"c":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},'
    assert.equal(head, text:sub(1, #head))
    assert.truthy(text:find('} *$'))
  end)

  it('lets metadata override the format', function()
    local path = root .. '/fmt.safetensors'
    st.save(path, { x = pmp.ones(1) }, { format = 'mlx' })
    local _, metadata = st.load(path)
    assert.equal('mlx', metadata.format)
  end)

  it('saves non-contiguous tensors in row-major order', function()
    local base = pmp.arange(6, { dtype = 'f32' }):view(2, 3)
    local path = root .. '/views.safetensors'
    st.save(path, {
      transposed = base:t(),
      narrowed = base:narrow(2, 2, 2),
      expanded = pmp.tensor({ 7, 8 }):unsqueeze(2):expand(2, 3),
      permuted = pmp.arange(24, { dtype = 'i64' }):view(2, 3, 4):permute(3, 1, 2),
    })
    local t = st.load(path)
    assert.same({ { 0, 3 }, { 1, 4 }, { 2, 5 } }, t.transposed:totable())
    assert.same({ { 1, 2 }, { 4, 5 } }, t.narrowed:totable())
    assert.same({ { 7, 7, 7 }, { 8, 8, 8 } }, t.expanded:totable())
    assert.same(pmp.arange(24, { dtype = 'i64' }):view(2, 3, 4):permute(3, 1, 2):contiguous():totable(),
      t.permuted:totable())
  end)

  it('saves tensors that require grad and tensors that share storage', function()
    local w = pmp.randn(3, 4, { requires_grad = true })
    local path = root .. '/grad.safetensors'
    st.save(path, { w = w, tied = w })
    local t = st.load(path)
    assert.same(w:detach():totable(), t.w:totable())
    assert.same(w:detach():totable(), t.tied:totable())
  end)

  it('converts floating-point tensors with the dtype option and leaves integers alone', function()
    local path = root .. '/conv.safetensors'
    st.save(path, { h = pmp.tensor({ 1.5, -2 }, { dtype = 'bf16' }), d = pmp.tensor({ 0.25 }, { dtype = 'f64' }),
                    i = pmp.tensor({ 3, 4 }, { dtype = 'i64' }), m = pmp.tensor({ true, false }) })
    local t = st.load(path, { dtype = 'f32' })
    assert.equal('f32', t.h.dtype)
    assert.same({ 1.5, -2 }, t.h:totable())
    assert.equal('f32', t.d.dtype)
    assert.equal('i64', t.i.dtype)
    assert.equal('bool', t.m.dtype)
    t = st.load(path, { dtype = 'bfloat16' })
    assert.equal('bf16', t.d.dtype)
    fails_with(function() st.load(path, { dtype = 'i32' }) end, 'floating-point dtype')
  end)

  it('loads only the named tensors', function()
    local path = root .. '/names.safetensors'
    st.save(path, { a = pmp.ones(1), b = pmp.ones(2), c = pmp.ones(3) })
    local t = st.load(path, { names = { 'c', 'a' } })
    assert.is_nil(t.b)
    assert.same({ 3 }, t.c.shape)
    assert.same({ 1 }, t.a.shape)
    t = st.load(path, { names = { b = true } })
    assert.same({ 'b' }, (function() local k = {} for n in pairs(t) do k[#k + 1] = n end return k end)())
    fails_with(function() st.load(path, { names = { 'a', 'zz' } }) end, path, "no tensor named 'zz'")
  end)

  it('refuses bad arguments to save', function()
    local path = root .. '/bad.safetensors'
    fails_with(function() st.save(path, { x = 1 }) end, "'x' is a number, not a tensor")
    fails_with(function() st.save(path, { __metadata__ = pmp.ones(1) }) end, '__metadata__')
    fails_with(function() st.save(path, { pmp.ones(1) }) end, 'names must be non-empty strings')
    fails_with(function() st.save(path, { x = pmp.ones(1) }, { k = {} }) end, "metadata 'k'")
    fails_with(function() st.save(root .. '/no/such/dir/x.safetensors', { x = pmp.ones(1) }) end,
      root .. '/no/such/dir/x.safetensors')
    assert.is_nil(pio.kind(path))
  end)
end)

describe('safetensors zero-copy loading', function()
  it('returns views of the file mapping, kept alive by the tensors', function()
    local path = root .. '/zc.safetensors'
    st.save(path, { a = pmp.arange(16, { dtype = 'f32' }), b = pmp.arange(8, { dtype = 'i64' }),
                    c = pmp.ones(5, { dtype = 'bf16' }) })
    local info = st.inspect(path)
    local before = live_mappings()
    local t = st.load(path)
    assert.equal(before + 1, live_mappings())
    -- the data pointers sit where the header says, relative to each other: one mapping, no copies
    local base = ffi.cast('char *', t.b.ptr.data) - (info.data_start + info.tensors.b.data_offsets[1])
    for _, name in ipairs({ 'a', 'b', 'c' }) do
      local e = info.tensors[name]
      assert.equal(info.data_start + e.data_offsets[1], tonumber(ffi.cast('char *', t[name].ptr.data) - base), name)
      assert.is_true(t[name]:is_contiguous())
    end
    -- views keep the mapping: dropping some tensors does not unmap it
    local a = t.a
    t = nil
    assert.equal(before + 1, live_mappings())
    assert.same(pmp.arange(16, { dtype = 'f32' }):totable(), a:totable())
    local view = a:narrow(1, 3, 4)
    a = nil
    assert.equal(before + 1, live_mappings())
    assert.same({ 2, 3, 4, 5 }, view:totable())
    view = nil
    assert.equal(before, live_mappings())
  end)

  it('lets loaded tensors be written in place without changing the file', function()
    local path = root .. '/cow.safetensors'
    st.save(path, { w = pmp.ones(4) })
    local bytes = read(path)
    local t = st.load(path)
    t.w:fill_(7)
    assert.same({ 7, 7, 7, 7 }, t.w:totable())
    assert.equal(bytes, read(path))
    assert.same({ 1, 1, 1, 1 }, st.load(path).w:totable())
  end)

  it('survives the file being replaced or removed while mapped', function()
    local path = root .. '/swap.safetensors'
    st.save(path, { w = pmp.full({ 3 }, 2) })
    local t = st.load(path)
    st.save(path, { w = pmp.full({ 3 }, 5) })
    os.remove(path)
    assert.same({ 2, 2, 2 }, t.w:totable())
  end)

  it('copies instead with copy = true or a dtype change, unmapping at once', function()
    local path = root .. '/copy.safetensors'
    st.save(path, { a = pmp.ones(4, { dtype = 'bf16' }), b = pmp.ones(2) })
    local before = live_mappings()
    local t = st.load(path, { copy = true })
    assert.equal(before, live_mappings())
    assert.same({ 1, 1, 1, 1 }, t.a:totable())
    local u = st.load(path, { dtype = 'f64' })
    assert.equal(before, live_mappings())
    assert.equal('f64', u.b.dtype)
    local v = st.load(path, { dtype = 'f32' })   -- b needs no change: a view; a is converted
    assert.equal(before + 1, live_mappings())
    assert.equal('f32', v.a.dtype)
    v = nil
    assert.equal(before, live_mappings())
    assert(t and u)
  end)
end)

describe('safetensors reference files (written by the Python safetensors library)', function()
  local expected = json.read(FIXTURES .. '/expected.json')
  local PMP = { F64 = 'f64', F32 = 'f32', BF16 = 'bf16', F16 = 'f16', I64 = 'i64', I32 = 'i32', U8 = 'u8', BOOL = 'bool' }

  local function check(tensors, want)
    local n = 0
    for name, spec in pairs(want) do
      local t = tensors[name]
      assert(t, 'missing tensor ' .. name)
      assert.equal(PMP[spec.dtype], t.dtype, name)
      assert.same(spec.shape, t.shape, name)
      local got = flat(t)
      assert.equal(#spec.values, #got, name)
      for k, v in ipairs(spec.values) do assert.equal(v, got[k], name .. '[' .. k .. ']') end
      n = n + 1
    end
    for name in pairs(tensors) do assert(want[name], 'unexpected tensor ' .. name) end
    return n
  end

  it('loads every dtype with the reference values and metadata', function()
    local want = expected['reference.safetensors']
    local tensors, metadata = st.load(FIXTURES .. '/reference.safetensors')
    assert.same(want.metadata, metadata)
    assert.equal(12, check(tensors, want.tensors))
    -- i64 beyond 2^53 would not survive a double; the ones here do, and read exactly
    local exact = ffi.new('int64_t[4]')
    assert.equal(0, C.pmp_copy_to_buffer(tensors.i64.ptr, exact, C.PMP_I64))
    assert.equal(-9007199254740991LL, exact[0])
  end)

  it('loads a valid file whose tensors are not aligned for their dtype', function()
    local want = expected['unaligned.safetensors']
    local tensors = st.load(FIXTURES .. '/unaligned.safetensors')
    check(tensors, want.tensors)
  end)

  it('loads a sharded directory through its index', function()
    local want = expected.sharded
    local tensors, metadata, index = st.load_sharded(FIXTURES .. '/sharded')
    assert.same(want.metadata, metadata)
    assert.equal(want.total_size, index.metadata.total_size)
    check(tensors, want.tensors)
    local some = st.load_sharded(FIXTURES .. '/sharded', { names = { 'lm_head.weight' }, dtype = 'f64' })
    assert.equal('f64', some['lm_head.weight'].dtype)
    assert.is_nil(some['embed.weight'])
  end)
end)

describe('safetensors malformed files', function()
  local good_header = '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
  local good_data = string.rep('\0', 8)

  -- Each case: a file, and the fragments its error must mention (the path is always required).
  local function rejects(name, header, data, fragments, size)
    local path = raw_file(root .. '/' .. name .. '.safetensors', header, data, size)
    local err = fails_with(function() st.load(path) end, 'safetensors: ' .. path .. ': ', unpack(fragments))
    fails_with(function() st.inspect(path) end, path)
    return err
  end

  it('accepts the well-formed base case', function()
    local path = raw_file(root .. '/good.safetensors', good_header, good_data)
    assert.same({ 0, 0 }, st.load(path).a:totable())
  end)

  it('names the problem with the header size', function()
    local path = write_raw(root .. '/short.safetensors', '\1\0\0')
    fails_with(function() st.load(path) end, path, 'too short')
    path = write_raw(root .. '/empty.safetensors', '')
    fails_with(function() st.load(path) end, path, 'too short')
    rejects('huge', good_header, good_data, { 'header size 1099511627776 exceeds the limit of 100000000' }, 2 ^ 40)
    path = write_raw(root .. '/huge64.safetensors', string.rep('\255', 8) .. good_header .. good_data)
    fails_with(function() st.load(path) end, path, 'header size 18446744073709551615 exceeds')
  end)

  it('rejects a header size past the end of the file or of zero', function()
    rejects('past', good_header, good_data, { 'header size 500 runs past the end of the file' }, 500)
    rejects('zero', '', good_data, { 'header size is 0' }, 0)
  end)

  it('rejects headers that are not a JSON object', function()
    rejects('badjson', '{"a":{"dtype":"F32",', '', { 'header is not valid JSON', 'of the header' })
    rejects('garbage', '\255\0garbage', '', { 'does not start with "{"' })
    rejects('array', '[1,2]', '', { 'does not start with "{"' })
    rejects('trailing', good_header .. 'x', good_data, { 'trailing characters' })
    rejects('dupe', '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
      '\0\0\0\0', { 'duplicate key "a"' })
  end)

  it('rejects entries with missing or ill-typed keys, naming the tensor', function()
    rejects('nodtype', '{"w":{"shape":[2],"data_offsets":[0,8]}}', good_data, { "tensor 'w'", "missing 'dtype'" })
    rejects('noshape', '{"w":{"dtype":"F32","data_offsets":[0,8]}}', good_data, { "tensor 'w'", "missing 'shape'" })
    rejects('nooffsets', '{"w":{"dtype":"F32","shape":[2]}}', good_data, { "tensor 'w'", "missing 'data_offsets'" })
    rejects('notobj', '{"w":[1]}', '', { "tensor 'w'", 'not an object' })
    rejects('shapestr', '{"w":{"dtype":"F32","shape":"2","data_offsets":[0,8]}}', good_data, { "tensor 'w'", "'shape' is not an array" })
    rejects('shapeneg', '{"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', good_data, { "tensor 'w'", "'shape' entry 1" })
    rejects('shapefrac', '{"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}}', good_data, { "tensor 'w'", "'shape' entry 1" })
    rejects('offs3', '{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8,9]}}', good_data, { "tensor 'w'", 'two integers' })
    rejects('offsrev', '{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}', good_data, { "tensor 'w'", 'end before they begin' })
    rejects('meta', '{"__metadata__":{"format":1},' .. good_header:sub(2), good_data, { "__metadata__ key 'format'", 'must be strings' })
    rejects('metaarr', '{"__metadata__":[],' .. good_header:sub(2), good_data, { "'__metadata__' is not an object" })
  end)

  it('rejects unknown dtypes and names unsupported ones', function()
    rejects('unknown', '{"w":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}}', good_data, { "tensor 'w'", "unknown dtype 'F17'" })
    rejects('dtnum', '{"w":{"dtype":4,"shape":[2],"data_offsets":[0,8]}}', good_data, { "tensor 'w'", "'dtype' is not a string" })
    local header = '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"q":{"dtype":"I8","shape":[4],"data_offsets":[4,8]}}'
    local path = raw_file(root .. '/i8.safetensors', header, good_data)
    fails_with(function() st.load(path) end, path, "tensor 'q'", 'dtype I8 is not supported by pmp', 'F64 F32 BF16')
    assert.equal('I8', st.inspect(path).tensors.q.dtype)         -- the file itself is valid
    assert.same({ 0 }, st.load(path, { names = { 'a' } }).a:totable())
  end)

  it('rejects sizes that do not match the shape', function()
    rejects('mismatch', '{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,8]}}', good_data,
      { "tensor 'w'", 'shape [2,2] of F32 needs 16 bytes', 'span 8' })
    rejects('f4odd', '{"w":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', '\0\0', { "tensor 'w'", 'whole number of bytes' })
  end)

  it('rejects layouts that do not tile the data region', function()
    rejects('overlap', '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}',
      string.rep('\0', 12), { "tensor 'b'", 'overlap', "tensor 'a'" })
    rejects('gap', '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}',
      string.rep('\0', 12), { "tensor 'b'", 'gap of 4 bytes', "tensor 'a'" })
    rejects('notzero', '{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', good_data, { "tensor 'a'", 'must start at byte 0' })
    rejects('extra', good_header, good_data .. 'xyz', { 'the tensors end at byte 8', 'holds 11 bytes' })
  end)

  it('rejects a file truncated in the data region, naming the tensor', function()
    local header = '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F64","shape":[4],"data_offsets":[8,40]}}'
    rejects('trunc', header, string.rep('\0', 20), { "tensor 'b'", 'run past the end of the file', 'truncated' })
  end)

  it('names missing files and directories', function()
    local path = root .. '/nothing.safetensors'
    fails_with(function() st.load(path) end, 'safetensors: cannot open ' .. path, 'No such file')
    fails_with(function() st.load(root) end, root, 'not a regular file')
  end)

  it('never crashes on truncated or corrupted copies of a valid file', function()
    local path = root .. '/src.safetensors'
    st.save(path, { a = pmp.arange(6, { dtype = 'f32' }):view(2, 3), b = pmp.ones(3, { dtype = 'bf16' }), c = pmp.tensor({ true }) })
    local bytes = read(path)
    local before = live_mappings()
    local target = root .. '/fuzz.safetensors'
    for n = 0, #bytes - 1 do
      write_raw(target, bytes:sub(1, n))
      fails_with(function() st.load(target) end, 'safetensors: ' .. target .. ': ')
    end
    math.randomseed(1234)
    local loaded = 0
    for _ = 1, 300 do
      local pos = math.random(1, #bytes)
      local corrupted = bytes:sub(1, pos - 1) .. string.char(math.random(0, 255)) .. bytes:sub(pos + 1)
      write_raw(target, corrupted)
      local ok, err = pcall(st.load, target)
      if ok then loaded = loaded + 1 else assert.truthy(err:find('safetensors: ' .. target .. ': ', 1, true), err) end
    end
    assert.is_true(loaded > 0)   -- flips in the data region still load
    assert.equal(before, live_mappings())
  end)
end)

describe('safetensors sharded directories', function()
  local function layers(n)
    local t = {}
    for i = 0, n - 1 do t['model.layers.' .. i .. '.weight'] = pmp.full({ 4, 6 }, i, { dtype = 'f32' }) end  -- 96 bytes
    return t
  end

  it('splits by max_shard_size in natural name order, with HF names and an index', function()
    local dir = root .. '/model'
    local tensors = layers(12)
    tensors['model.embed.weight'] = pmp.ones(100)   -- 400 bytes: larger than the limit, a shard of its own
    local index = st.save_sharded(dir, tensors, { max_shard_size = 200, metadata = { step = '3' } })
    assert.equal(12 * 96 + 400, index.metadata.total_size)
    local files = pio.listdir(dir)
    assert.equal('model-00001-of-00007.safetensors', files[1])
    assert.equal('model-00007-of-00007.safetensors', files[7])
    assert.equal('model.safetensors.index.json', files[8])
    assert.equal(8, #files)
    assert.equal('model-00001-of-00007.safetensors', index.weight_map['model.embed.weight'])
    assert.equal('model-00002-of-00007.safetensors', index.weight_map['model.layers.0.weight'])
    assert.equal('model-00002-of-00007.safetensors', index.weight_map['model.layers.1.weight'])
    assert.equal('model-00003-of-00007.safetensors', index.weight_map['model.layers.2.weight'])
    assert.equal('model-00007-of-00007.safetensors', index.weight_map['model.layers.11.weight'])
    local on_disk = json.read(dir .. '/model.safetensors.index.json')
    assert.same(index.weight_map, on_disk.weight_map)
    assert.truthy(read(dir .. '/model.safetensors.index.json'):find('^{\n  "metadata": {\n    "total_size": 1552\n  },\n  "weight_map": {\n'))
    local loaded, metadata, idx = st.load_sharded(dir)
    assert.same({ format = 'pt', step = '3' }, metadata)
    assert.equal(1552, idx.metadata.total_size)
    for name, t in pairs(tensors) do assert.same(t:totable(), loaded[name]:totable(), name) end
    local n = 0
    for _ in pairs(loaded) do n = n + 1 end
    assert.equal(13, n)
  end)

  it('writes one model.safetensors when everything fits, removing an earlier save\'s shards', function()
    local dir = root .. '/model'
    st.save_sharded(dir, layers(4), { max_shard_size = 100 })
    assert.equal(5, #pio.listdir(dir))
    local index = st.save_sharded(dir, layers(4))
    assert.is_nil(index)
    assert.same({ 'model.safetensors' }, pio.listdir(dir))
    local loaded, _, idx = st.load_sharded(dir)
    assert.is_nil(idx)
    assert.same(layers(4)['model.layers.3.weight']:totable(), loaded['model.layers.3.weight']:totable())
    -- and back to shards: the single file goes
    st.save_sharded(dir, layers(3), { max_shard_size = '0.1KB' })
    assert.same({ 'model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors',
                  'model-00003-of-00003.safetensors', 'model.safetensors.index.json' }, pio.listdir(dir))
    -- a path to a file works too
    assert.truthy(st.load_sharded(dir .. '/model-00002-of-00003.safetensors')['model.layers.1.weight'])
  end)

  it('follows an explicit order', function()
    local dir = root .. '/ordered'
    local t = layers(3)
    local index = st.save_sharded(dir, t, { max_shard_size = 96,
      order = { 'model.layers.2.weight', 'model.layers.0.weight', 'model.layers.1.weight' } })
    assert.equal('model-00001-of-00003.safetensors', index.weight_map['model.layers.2.weight'])
    fails_with(function() st.save_sharded(dir, t, { order = { 'model.layers.2.weight' } }) end, 'leaves out')
  end)

  it('parses sizes like huggingface_hub', function()
    assert.equal(5e9, st.parse_size('5GB'))
    assert.equal(500 * 2 ^ 20, st.parse_size('500MiB'))
    assert.equal(1000, st.parse_size('1kb'))
    assert.equal(123, st.parse_size(123))
    fails_with(function() st.parse_size('5 parsecs') end, '5 parsecs')
  end)

  it('names what is wrong with a sharded directory', function()
    fails_with(function() st.load_sharded(root .. '/none') end, root .. '/none', 'not a directory')
    pio.mkdir_p(root .. '/emptydir')
    fails_with(function() st.load_sharded(root .. '/emptydir') end, 'neither model.safetensors.index.json nor model.safetensors')
    local dir = root .. '/model'
    st.save_sharded(dir, layers(3), { max_shard_size = 100 })
    local index_path = dir .. '/model.safetensors.index.json'
    fails_with(function() st.load_sharded(dir, { names = { 'nope' } }) end, index_path, "no tensor named 'nope'")
    os.remove(dir .. '/model-00002-of-00003.safetensors')
    fails_with(function() st.load_sharded(dir) end, index_path, "tensor 'model.layers.1.weight'", 'model-00002-of-00003.safetensors',
      'does not exist')
    pio.write_atomic(index_path, '{"weight_map": {"x": "../../etc/passwd"}}')
    fails_with(function() st.load_sharded(dir) end, index_path, 'outside the directory')
    pio.write_atomic(index_path, '{"metadata": {}}')
    fails_with(function() st.load_sharded(dir) end, index_path, "'weight_map'")
    pio.write_atomic(index_path, '{"weight_map": ')
    fails_with(function() st.load_sharded(dir) end, index_path, 'unexpected end')
    pio.write_atomic(index_path, '{"weight_map": {"model.layers.0.weight": "model-00003-of-00003.safetensors"}}')
    fails_with(function() st.load_sharded(dir) end, 'model-00003-of-00003.safetensors', "no tensor named 'model.layers.0.weight'")
  end)
end)
