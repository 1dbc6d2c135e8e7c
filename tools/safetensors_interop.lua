-- Writes safetensors files with pmp, plus expected.json describing what they should hold, for
-- tools/make_safetensors_fixtures.py --verify to read back with the reference Python library.
--   ./pmp tools/safetensors_interop.lua OUTDIR
local json = pmp.json
local st = pmp.safetensors

local out = assert(arg and arg[1], 'usage: pmp tools/safetensors_interop.lua OUTDIR')
pmp.io.mkdir_p(out)

local ST = { f64 = 'F64', f32 = 'F32', bf16 = 'BF16', f16 = 'F16', i64 = 'I64', i32 = 'I32', u8 = 'U8', bool = 'BOOL' }

-- source values (exact in the dtype), nested as the tensor's shape
local cases = {
  { 'w.f64', { { 0.1, -2.5 }, { 1e300, 5e-324 } }, 'f64' },
  { 'w.f32', { { 1.25, -3 }, { 0.375, 16777216 } }, 'f32' },
  { 'w.bf16', { 1.5, -2.25, 3.3895313892515355e38, 0 }, 'bf16' },
  { 'w.f16', { 65504, -0.5, 6.103515625e-05, 1 / 1024 }, 'f16' },
  { 'w.i64', { -9007199254740991, 2 ^ 40, 0, 7 }, 'i64' },
  { 'w.i32', { { -2147483648, 2147483647 }, { -1, 42 } }, 'i32' },
  { 'w.u8', { 0, 1, 127, 128, 255 }, 'u8' },
  { 'w.bool', { true, false, true, true }, 'bool' },
}

local function flat(v, acc)
  acc = acc or {}
  if type(v) == 'table' then for _, x in ipairs(v) do flat(x, acc) end else acc[#acc + 1] = v end
  return acc
end

local tensors, expected = {}, {}
for _, c in ipairs(cases) do
  local name, values, dtype = c[1], c[2], c[3]
  tensors[name] = pmp.tensor(values, { dtype = dtype })
  expected[name] = { dtype = ST[dtype], shape = json.array(tensors[name].shape), values = json.array(flat(values)) }
end
-- layouts that are not row-major contiguous
local base = pmp.tensor({ { 1, 2, 3 }, { 4, 5, 6 } })
tensors['v.transposed'] = base:t()
expected['v.transposed'] = { dtype = 'F32', shape = json.array({ 3, 2 }), values = json.array({ 1, 4, 2, 5, 3, 6 }) }
tensors['v.narrowed'] = base:narrow(2, 2, 2)
expected['v.narrowed'] = { dtype = 'F32', shape = json.array({ 2, 2 }), values = json.array({ 2, 3, 5, 6 }) }
tensors['v.expanded'] = pmp.tensor({ 7, 8 }):unsqueeze(2):expand(2, 3)
expected['v.expanded'] = { dtype = 'F32', shape = json.array({ 2, 3 }), values = json.array({ 7, 7, 7, 8, 8, 8 }) }
tensors['v.scalar'] = pmp.tensor(2.5)
expected['v.scalar'] = { dtype = 'F32', shape = json.array(), values = json.array({ 2.5 }) }
tensors['v.empty'] = pmp.zeros(0, 3)
expected['v.empty'] = { dtype = 'F32', shape = json.array({ 0, 3 }), values = json.array() }

local metadata = { format = 'pt', writer = 'pmp' }
st.save(out .. '/pmp_dtypes.safetensors', tensors, { writer = 'pmp' })

-- sharded: 8 tensors of 96 bytes each with a 200-byte limit -> 4 shards
local sharded, sharded_expected, total = {}, {}, 0
for layer = 0, 7 do
  local name = 'model.layers.' .. layer .. '.mlp.weight'
  local values = {}
  for k = 1, 24 do values[k] = layer * 100 + k end
  sharded[name] = pmp.tensor(values):view(4, 6)
  sharded_expected[name] = { dtype = 'F32', shape = json.array({ 4, 6 }), values = json.array(values) }
  total = total + 96
end
local index = st.save_sharded(out .. '/pmp_sharded', sharded, { max_shard_size = 200 })
local shards = {}
for _, file in pairs(index.weight_map) do shards[file] = true end
local n = 0
for _ in pairs(shards) do n = n + 1 end

pmp.io.write_atomic(out .. '/expected.json', json.encode({
  files = { ['pmp_dtypes.safetensors'] = { metadata = metadata, tensors = expected } },
  sharded = { dir = 'pmp_sharded', total_size = total, shards = n, metadata = { format = 'pt' }, tensors = sharded_expected },
}))
print('pmp wrote ' .. out)
