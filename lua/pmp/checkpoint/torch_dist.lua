--- Megatron-Core's `torch_dist` checkpoints (PyTorch distributed checkpoint, docs/formats.md §4.4), read
--- and written:
---
---   DIR/latest_checkpointed_iteration.txt
---   DIR/iter_NNNNNNN/ (or DIR/release/)
---     metadata.json      {"sharded_backend": "torch_dist", ...}
---     .metadata          a pickle of torch.distributed.checkpoint's Metadata: each tensor's global size and
---                        chunks (offsets, sizes), and where each chunk's bytes are
---                        (MetadataIndex(fqn, offsets) -> _StorageInfo(relative_path, offset, length))
---     __R_N.distcp       the chunks, each a whole torch.save archive at its byte range
---     common.pt          torch.save of the entries that are not sharded: args, iteration, ...
---
--- A tensor is stored once with its global shape, whatever layout wrote it: each weight is rebuilt from
--- the chunks that cover it. Megatron stacks the layers of a homogeneous decoder under one key with a
--- leading layer axis (`decoder.layers.mlp.linear_fc1.weight` [num_layers, ...]) and names the norms
--- the Transformer Engine way whatever the spec; heterogeneous models keep per-layer keys. Both are
--- mapped to pmp's names (decoder.layers.N.input_layernorm.weight ...), the same the legacy reader
--- gives. `_extra_state` and other objects (bytes items) hold no weights and are skipped, and so is the
--- optimizer's state (keys under `optimizer.`), which pmp does not take from Megatron checkpoints.
---
--- Opened through pmp.checkpoint.megatron.open (which sees metadata.json or .metadata), so loading a
--- model, recipes' --load and tools/checkpoint/convert.lua take either Megatron format. Written by
--- M.save (megatron.save with format = 'torch_dist'): one data file, each weight one chunk (a stacked
--- key one chunk per layer), which Megatron-Core reads into any parallel layout.
local io_ = require 'pmp.io'
local tensor = require 'pmp.tensor'
local C = require('pmp.ffi').C
local P = require 'pmp.checkpoint.torch_pickle'
local Z = require 'pmp.checkpoint.torch_zip'
local json = require 'pmp.json'

local M = {}

M.METADATA = '.metadata'
M.METADATA_JSON = 'metadata.json'
M.COMMON = 'common.pt'

local function fail(fmt, ...) error('megatron torch_dist checkpoint: ' .. string.format(fmt, ...), 0) end

--- Whether the iteration directory root holds a distributed checkpoint.
function M.is_dist_dir(root)
  return io_.is_file(io_.join(root, M.METADATA)) or io_.is_file(io_.join(root, M.METADATA_JSON))
end

local DTYPES = { float32 = 'f32', float = 'f32', bfloat16 = 'bf16', float16 = 'f16', half = 'f16', float64 = 'f64' }

local function fields_of(record, what, source)
  if P.kind_of(record) ~= 'Record' then
    fail('%s: %s is a %s, not a torch.distributed.checkpoint record', source, what, tostring(P.kind_of(record) or type(record)))
  end
  return record.fields
end

local function ints(t, what, source)
  if P.kind_of(t) ~= 'Tuple' then fail('%s: %s is not a torch.Size', source, what) end
  local out = {}
  for k, v in ipairs(t) do
    if type(v) ~= 'number' then fail('%s: %s holds a %s', source, what, type(v)) end
    out[k] = v
  end
  return out
end

local function volume(sizes)
  local n = 1
  for _, s in ipairs(sizes) do n = n * s end
  return n
end

local function index_key(fqn, offsets) return fqn .. '@' .. table.concat(offsets, ',') end

-- Whether boxes a and b (offsets, sizes) share an element.
local function overlap(a, b)
  for d = 1, #a.offsets do
    if a.offsets[d] + a.sizes[d] <= b.offsets[d] or b.offsets[d] + b.sizes[d] <= a.offsets[d] then return false end
  end
  return true
end

-- The tensors of the .metadata pickle at path: fqn -> {key, size, dtype, chunks = {{offsets, sizes,
-- storage = {path, offset, length}}}}, each checked to be tiled exactly by chunks with stored bytes.
local function read_metadata(path)
  local value, report = P.load(io_.read_file(path), { source = path })
  local meta = fields_of(value, 'the pickle', path)
  local state, storage = meta.state_dict_metadata, meta.storage_data
  if P.kind_of(state) ~= 'Dict' or P.kind_of(storage) ~= 'Dict' then
    fail('%s lacks state_dict_metadata or storage_data', path)
  end
  local where = {}
  for _, index in ipairs(P.keys(storage)) do
    local key = fields_of(index, 'a storage_data key', path)
    local info = fields_of(storage[index], 'storage_data of ' .. tostring(key.fqn), path)
    if info.transform_descriptors ~= nil and info.transform_descriptors ~= P.None and #info.transform_descriptors > 0 then
      fail('%s: %s is stored through transforms (%s); only plain chunks are read', path, tostring(key.fqn),
        table.concat(info.transform_descriptors, ', '))
    end
    if type(key.fqn) ~= 'string' or type(info.relative_path) ~= 'string' or type(info.offset) ~= 'number'
        or type(info.length) ~= 'number' then
      fail('%s: a storage_data entry lacks fqn, relative_path, offset or length', path)
    end
    local offsets = key.offset ~= P.None and key.offset ~= nil and ints(key.offset, key.fqn .. ' offset', path) or {}
    where[index_key(key.fqn, offsets)] = { path = info.relative_path, offset = info.offset, length = info.length }
  end
  local tensors = {}
  for _, fqn in ipairs(P.keys(state)) do
    local m = state[fqn]
    if P.kind_of(m) == 'Record' and m.class:match('TensorStorageMetadata$') then
      local f = m.fields
      local properties = P.kind_of(f.properties) == 'Record' and (f.properties.state or {}) or {}
      local dtype_name = properties[1] and properties[1].name or (f.properties.fields and f.properties.fields.dtype and
        f.properties.fields.dtype.name)
      local t = { key = fqn, size = ints(f.size, fqn .. ' size', path), dtype = DTYPES[dtype_name], dtype_name = dtype_name,
        chunks = {} }
      local covered = 0
      for k, c in ipairs(f.chunks or {}) do
        local cf = fields_of(c, fqn .. ' chunk ' .. k, path)
        local chunk = { offsets = ints(cf.offsets, fqn .. ' chunk offsets', path), sizes = ints(cf.sizes, fqn .. ' chunk sizes', path) }
        if #chunk.offsets ~= #t.size or #chunk.sizes ~= #t.size then
          fail('%s: %s chunk %d has %d dimensions, the tensor %d', path, fqn, k, #chunk.offsets, #t.size)
        end
        for d = 1, #t.size do
          if chunk.offsets[d] < 0 or chunk.offsets[d] + chunk.sizes[d] > t.size[d] then
            fail('%s: %s chunk at (%s) of size (%s) lies outside the tensor (%s)', path, fqn, table.concat(chunk.offsets, ','),
              table.concat(chunk.sizes, ','), table.concat(t.size, ','))
          end
        end
        chunk.storage = where[index_key(fqn, chunk.offsets)]
        if not chunk.storage then
          fail('%s: %s: no stored bytes for its chunk at (%s) (storage_data lacks it)', path, fqn, table.concat(chunk.offsets, ','))
        end
        for j = 1, k - 1 do
          if overlap(chunk, t.chunks[j]) then
            fail('%s: %s: chunks at (%s) and (%s) overlap', path, fqn, table.concat(chunk.offsets, ','),
              table.concat(t.chunks[j].offsets, ','))
          end
        end
        t.chunks[k] = chunk
        covered = covered + volume(chunk.sizes)
      end
      if covered ~= volume(t.size) then
        fail('%s: %s: its chunks cover %d of its %d elements (a chunk is missing)', path, fqn, covered, volume(t.size))
      end
      tensors[fqn] = t
    end
  end
  return tensors, report
end

---------------------------------------------------------------------------------------------------

local Checkpoint = {}
Checkpoint.__index = Checkpoint

local function merge_report(into, report)
  for name, n in pairs(report) do into[name] = (into[name] or 0) + n end
end

-- pmp's names for each stored tensor: name -> {key, layer (0-based index into the stacked axis, or nil)}.
function Checkpoint:index(name_from_megatron)
  self.where, self.names = {}, {}
  local function add(name, key, layer)
    if name == 'output_layer.weight' and self.config.tie_embeddings then return end
    if self.where[name] then fail('%s: %s is held twice (by %s and %s)', self.root, name, self.where[name].key, key) end
    self.where[name] = { key = key, layer = layer }
    self.names[#self.names + 1] = name
  end
  local keys = {}
  for key in pairs(self.tensors) do keys[#keys + 1] = key end
  table.sort(keys)
  for _, key in ipairs(keys) do
    local t = self.tensors[key]
    local rest = key:match('^decoder%.layers%.(.*)$')
    if key:match('_extra_state') or key:match('^optimizer%.') or key:match('^chained_%d+%.optimizer%.') then
      -- no weights (Transformer Engine's FP8 state), or the optimizer's
    elseif rest and not rest:match('^%d+%.') then
      if t.size[1] ~= self.config.num_layers then
        fail('%s: %s stacks %d layers, args.num_layers is %d', self.root, key, t.size[1], self.config.num_layers)
      end
      for layer = 0, t.size[1] - 1 do add((name_from_megatron('decoder.layers.' .. layer .. '.' .. rest)), key, layer) end
    else
      add((name_from_megatron(key)), key, nil)
    end
  end
  table.sort(self.names)
end

-- The mapping of a .distcp file, mapped once.
function Checkpoint:mapping(path)
  local m = self.maps[path]
  if not m then
    m = Z.map(path)
    self.maps[path] = m
  end
  return m
end

-- The tensor of one chunk of t: a view of its bytes in the .distcp file.
function Checkpoint:chunk(t, chunk)
  local s = chunk.storage
  local at = string.format('%s chunk at (%s)', t.key, table.concat(chunk.offsets, ','))
  if s.path:find('/', 1, true) or s.path:match('^%.') then
    fail('%s: %s: unexpected data file name %s', self.root, at, tostring(s.path))
  end
  local path = io_.join(self.root, s.path)
  if not io_.is_file(path) then fail('%s is missing (it holds %s)', path, at) end
  local ok, value, report = pcall(function()
    local m = self:mapping(path)
    local size = tonumber(C.pmp_mapping_size(m))
    if s.offset + s.length > size then
      error(string.format('bytes %d to %d lie past its end (%d bytes): the file is truncated', s.offset, s.offset + s.length,
        size), 0)
    end
    return Z.load(string.format('%s@%d', path, s.offset), { mapping = m, offset = s.offset, length = s.length })
  end)
  if not ok then fail('%s: %s: %s', path, at, tostring(value)) end
  merge_report(self.report, report)
  if not tensor.is_tensor(value) then fail('%s: %s holds a %s, not a tensor', path, at, tostring(P.kind_of(value) or type(value))) end
  if table.concat(value.shape, ',') ~= table.concat(chunk.sizes, ',') then
    fail('%s: %s holds a tensor of shape [%s], the metadata says [%s]', path, at, table.concat(value.shape, ','),
      table.concat(chunk.sizes, ','))
  end
  if t.dtype and value.dtype ~= t.dtype then
    fail('%s: %s holds %s, the metadata says %s', path, at, value.dtype, tostring(t.dtype_name))
  end
  return value
end

--- The whole shape of pmp name `name`.
function Checkpoint:shape(name)
  local w = self.where[name]
  if not w then fail('%s holds no %s', self.root, name) end
  local shape = { unpack(self.tensors[w.key].size) }
  if w.layer then table.remove(shape, 1) end
  return shape
end

--- The whole tensor of pmp name `name`, always a new one (the legacy reader's options.copy), rebuilt
--- from the chunks that cover it; the pages of the files it was read from leave resident memory.
function Checkpoint:tensor(name)
  local w = self.where[name]
  if not w then fail('%s holds no %s', self.root, name) end
  local t = self.tensors[w.key]
  local start, size = {}, {}
  for d = 1, #t.size do start[d], size[d] = 0, t.size[d] end
  if w.layer then start[1], size[1] = w.layer, 1 end
  if not t.dtype then fail('%s: %s has dtype %s, which pmp does not hold', self.root, w.key, tostring(t.dtype_name)) end
  local out = tensor.empty(size, { dtype = t.dtype })
  local covered = 0
  for _, chunk in ipairs(t.chunks) do
    local lo, hi, inside = {}, {}, true
    for d = 1, #size do
      lo[d] = math.max(start[d], chunk.offsets[d])
      hi[d] = math.min(start[d] + size[d], chunk.offsets[d] + chunk.sizes[d])
      if hi[d] <= lo[d] then inside = false end
    end
    if inside then
      local src = self:chunk(t, chunk)
      local from, to = src, out
      for d = 1, #size do
        from = from:narrow(d, lo[d] - chunk.offsets[d] + 1, hi[d] - lo[d])
        to = to:narrow(d, lo[d] - start[d] + 1, hi[d] - lo[d])
      end
      to:copy_(from)
      covered = covered + volume(from.shape)
      C.pmp_mapping_drop_pages(src.ptr)
    end
  end
  if covered ~= volume(size) then
    fail('%s: %s: its chunks cover %d of the %d elements of %s', self.root, w.key, covered, volume(size), name)
  end
  if w.layer then out = out:view(self:shape(name)) end
  return out
end

--- Copies part `rank` of `tp` of pmp name `name` into dst. torch_dist stores whole tensors (as chunks
--- with offsets), so the one temporary is this tensor rebuilt whole.
function Checkpoint:copy_part(name, dst, tp, rank, config)
  local whole = self:tensor(name)
  self.megatron.copy_saved_part(self, name, dst, tp, rank, config, function() return whole end, 1)
end

--- Opens the torch_dist checkpoint of iteration directory root (dir: the directory holding the tracker,
--- iteration: the tracker's). megatron: pmp.checkpoint.megatron (its config_from_args and names).
--- options: as for megatron.open (true_vocab_size, config).
function M.open(dir, root, iteration, options, megatron)
  options = options or {}
  local json_path = io_.join(root, M.METADATA_JSON)
  if io_.is_file(json_path) then
    local ok, info = pcall(json.decode, io_.read_file(json_path))
    if not ok or type(info) ~= 'table' then fail('%s is not JSON: %s', json_path, tostring(info)) end
    if info.sharded_backend ~= 'torch_dist' then
      fail("%s: sharded_backend '%s' is not supported (only torch_dist)", json_path, tostring(info.sharded_backend))
    end
  end
  local metadata_path = io_.join(root, M.METADATA)
  if not io_.is_file(metadata_path) then fail('%s is missing', metadata_path) end
  local self = setmetatable({ dir = dir, root = root, iteration = iteration, report = {}, maps = {}, format = 'torch_dist',
    megatron = megatron },
    Checkpoint)
  local tensors, report = read_metadata(metadata_path)
  self.tensors = tensors
  merge_report(self.report, report)
  local common_path = io_.join(root, M.COMMON)
  local common
  if io_.is_file(common_path) then
    local value, common_report = Z.load(common_path)
    merge_report(self.report, common_report)
    if P.kind_of(value) ~= 'Dict' then fail('%s does not hold a dict', common_path) end
    common = value
  end
  local args = common and common.args
  if args ~= nil and args ~= P.None and P.kind_of(args) ~= 'Namespace' then
    fail('%s: args is a %s, not an argparse.Namespace', common_path, tostring(P.kind_of(args)))
  end
  self.args = args ~= P.None and args or nil
  local config = {}
  if self.args then config = megatron.config_from_args(self.args, options, common_path) end
  for k, v in pairs(options.config or {}) do config[k] = v end
  if not config.num_layers then fail('%s has no %s with args; pass the model config', root, M.COMMON) end
  self.config = config
  self.checkpoint_version = common and common.checkpoint_version
  self.saved_iteration = common and common.iteration
  self:index(megatron.name_from_megatron)
  local embedding = self.where['embedding.word_embeddings.weight']
  self.dtype = embedding and tensors[embedding.key].dtype or 'f32'
  return self
end

---------------------------------------------------------------------------------------------------
-- Writing

local DCP = 'torch.distributed.checkpoint.'
M.DATA_FILE = '__0_0.distcp'

local function size_of(dims) return P.call('torch', 'Size', P.tuple({ P.tuple({ unpack(dims) }) })) end

-- TensorProperties pickles its own 5-tuple: dtype, layout, requires_grad, memory format, pin_memory.
local function properties(dtype)
  return setmetatable({ class = DCP .. 'metadata.TensorProperties', fields = {}, state = P.tuple({
    P.dtype(Z.TORCH_DTYPE[dtype]), P.enum('torch.serialization._get_layout', 'torch.strided'), false,
    P.enum(DCP .. 'metadata._MEM_FORMAT_ENCODING', 0), false }) }, P.Record)
end

--- Writes a torch_dist checkpoint of the weights in spec (as for megatron.save: names, shapes, tensor,
--- config, dtype, iteration, args, transformer_impl, progress; tp, pp, vp and first_stage_layers are
--- only recorded in args, since Megatron-Core reads the one copy into any layout). megatron:
--- pmp.checkpoint.megatron (names, args, extra-state entries). The iteration directory is written to a
--- temporary one and renamed, then the tracker is rewritten.
function M.save(dir, spec, megatron)
  local config = spec.config
  local impl = spec.transformer_impl or 'local'
  local extras = megatron.LAYER_EXTRA[impl]
  if not extras then fail("transformer_impl '%s' (local, transformer_engine)", tostring(impl)) end
  local dtype = spec.dtype or 'f32'
  if not Z.TORCH_DTYPE[dtype] then fail("dtype '%s' has no torch dtype", tostring(dtype)) end
  local iteration = spec.iteration or 'release'
  local layers = config.num_layers
  local extra_args = { ckpt_format = 'torch_dist' }
  for k, v in pairs(spec.args or {}) do extra_args[k] = v end
  local args = megatron.args_for(config, { tp = spec.tp or 1, pp = spec.pp or 1, vp = spec.vp or 1,
    first_stage_layers = spec.first_stage_layers, transformer_impl = impl, dtype = dtype }, extra_args)

  -- every weight's key and place: stacked layers under one key with a leading layer axis
  local keys, by_key = {}, {}
  for _, name in ipairs(spec.names) do
    local megatron_name = megatron.name_to_megatron(name, 'transformer_engine')
    local layer, rest = megatron_name:match('^decoder%.layers%.(%d+)%.(.*)$')
    local key = layer and 'decoder.layers.' .. rest or megatron_name
    local k = by_key[key]
    if not k then
      k = { key = key, stacked = layer ~= nil, parts = {} }
      by_key[key] = k
      keys[#keys + 1] = key
    end
    local at = layer and tonumber(layer) + 1 or 1
    if layer and at > layers then fail('%s: %s is past the model\'s %d layers', dir, name, layers) end
    k.parts[at] = name
    k.shape = spec.shapes[name]
  end
  table.sort(keys)
  for _, key in ipairs(keys) do
    local k = by_key[key]
    for at = 1, k.stacked and layers or 1 do
      if not k.parts[at] then fail('%s: layer %d has no %s', dir, at - 1, key:gsub('^decoder%.layers%.', '')) end
    end
  end

  local state = P.dict(false)
  local storage = P.dict(false)
  local function place(fqn, offsets, from, length)
    local index = P.record(DCP .. 'metadata.MetadataIndex', { fqn = fqn, offset = offsets and size_of(offsets) or P.None,
      index = P.None })
    P.set(storage, index, P.record(DCP .. 'filesystem._StorageInfo', { relative_path = M.DATA_FILE, offset = from,
      length = length, transform_descriptors = P.None }))
  end
  local total, done = #spec.names, 0

  local root = megatron.iteration_dir(dir, iteration)
  io_.mkdir_p(dir)
  io_.remove_stale_temporaries(dir)
  io_.replace_dir_atomic(root, function(tmp)
    io_.write_atomic(io_.join(tmp, M.DATA_FILE), function(w)
      for _, key in ipairs(keys) do
        local k = by_key[key]
        local size = { unpack(k.shape) }
        if k.stacked then table.insert(size, 1, layers) end
        local chunks = P.list()
        for at = 1, k.stacked and layers or 1 do
          local name = k.parts[at]
          local offsets, sizes = {}, { unpack(size) }
          for d = 1, #size do offsets[d] = 0 end
          if k.stacked then offsets[1], sizes[1] = at - 1, 1 end
          local from = w.bytes
          local length = Z.write(w, 'archive', Z.deferred(dtype, sizes, function()
            local t = spec.tensor(name)
            if table.concat(t.shape, ',') ~= table.concat(spec.shapes[name], ',') then
              fail('%s: %s is [%s], its shape was given as [%s]', dir, name, table.concat(t.shape, ','),
                table.concat(spec.shapes[name], ','))
            end
            done = done + 1
            if spec.progress then spec.progress(done, total, name) end
            return t
          end))
          place(key, offsets, from, length)
          chunks[#chunks + 1] = P.record(DCP .. 'metadata.ChunkStorageMetadata', { offsets = size_of(offsets),
            sizes = size_of(sizes) })
        end
        P.set(state, key, P.record(DCP .. 'metadata.TensorStorageMetadata', { properties = properties(dtype),
          size = size_of(size), chunks = chunks }))
      end
      -- the weightless entries Megatron-Core's modules ask for: one object per layer, each saved in a
      -- list of one as Megatron-Core saves the values of its ShardedObjects
      local empty = P.list({ impl == 'local' and P.None or tensor.empty({ 0 }, { dtype = 'u8' }) })
      for layer = 0, layers - 1 do
        for _, extra in ipairs(extras) do
          local fqn = string.format('decoder.layers.%s/shard_%d_%d', extra, layer, layers)
          local from = w.bytes
          place(fqn, nil, from, Z.write(w, 'archive', empty))
          P.set(state, fqn, P.record(DCP .. 'metadata.BytesStorageMetadata'))
        end
      end
    end)
    local metadata = P.record(DCP .. 'metadata.Metadata', { state_dict_metadata = state, planner_data = P.None,
      storage_data = storage, storage_meta = P.None, version = '1.0.0' })
    io_.write_atomic(io_.join(tmp, M.METADATA), P.dump(metadata))
    local common = P.dict(false)
    P.set(common, 'args', args)
    P.set(common, 'checkpoint_version', P.float(megatron.CHECKPOINT_VERSION))
    P.set(common, 'iteration', iteration == 'release' and 0 or iteration)
    Z.save(io_.join(tmp, M.COMMON), common)
    io_.write_atomic(io_.join(tmp, M.METADATA_JSON), '{"sharded_backend": "torch_dist", "sharded_backend_version": 1, ' ..
      '"common_backend": "torch", "common_backend_version": 1}')
  end)
  io_.write_atomic(io_.join(dir, megatron.TRACKER), tostring(iteration) .. '\n')
  return root
end

return M
