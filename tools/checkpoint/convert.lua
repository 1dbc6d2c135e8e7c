--- Converts checkpoints between Hugging Face, Megatron-LM and pmp, with Megatron-LM's
--- tools/checkpoint/convert.py flags:
---
---   pmp tools/checkpoint/convert.lua --loader hf --saver mcore --load-dir hf_model --save-dir megatron_ckpt \
---       --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2 --transformer-impl local
---   pmp tools/checkpoint/convert.lua --loader mcore --saver hf --load-dir megatron_ckpt --save-dir hf_out \
---       --true-vocab-size 151665 --model-type qwen2 --check-logits
---
--- Loaders and savers: hf (a Hugging Face directory: config.json + safetensors), mcore / megatron
--- (Megatron-LM's checkpoints, pmp.checkpoint.megatron: the legacy torch format, or torch_dist, which the
--- loader recognizes by its metadata and the saver writes with --megatron-format torch_dist), pmp
--- (pmp's own checkpoints).
--- Every family converts through its one mapping table (models/<model_type>.lua); nothing here knows a
--- family. hf -> mcore and mcore -> mcore/hf stream tensor by tensor: each tensor is read (a view of
--- the mapped file), packed or joined, cut for each target rank and written before the next one, so
--- memory holds about one tensor at a time (the peak resident size is printed at the end). The pmp
--- loader and saver go through a whole model in memory (pmp checkpoints are saved by a model); the pmp
--- saver writes one process's checkpoint, which pmp loads into any layout.
--- --check-logits loads the source and the result as whole f32 models (the source's weights rounded
--- through --dtype first), runs both on a fixed batch and fails when any logit differs by more than 1e-4.
local FLAGS = {
  { '--loader', nil, 'hf, mcore (or megatron) or pmp' },
  { '--saver', nil, 'hf, mcore (or megatron) or pmp' },
  { '--load-dir', nil, 'the checkpoint to read' },
  { '--save-dir', nil, 'where to write' },
  { '--target-tensor-parallel-size', 1, 'Megatron saver: tensor-parallel size' },
  { '--target-pipeline-parallel-size', 1, 'Megatron saver: pipeline-parallel size' },
  { '--target-expert-parallel-size', 1, 'Megatron saver: expert-parallel size (1: dense models only)' },
  { '--target-num-layers-per-virtual-pipeline-stage', 0, 'Megatron saver: layers per virtual stage (0: none)' },
  { '--target-decoder-first-pipeline-num-layers', 0, 'Megatron saver: layers of the first stage (0: even)' },
  { '--megatron-format', 'torch', 'Megatron saver checkpoint format: torch (legacy, per rank) or torch_dist' },
  { '--transformer-impl', 'transformer_engine', 'Megatron saver layer spec: local or transformer_engine' },
  { '--vocab-size', 0, 'the true vocabulary size (same as --true-vocab-size)' },
  { '--true-vocab-size', 0, 'the true vocabulary size, when the source stores only the padded one' },
  { '--make-vocab-size-divisible-by', 128, 'Megatron padding multiple (times the target tensor-parallel size)' },
  { '--dtype', nil, 'saved dtype: fp32, bf16, fp16 (default: the source\'s)' },
  { '--model-type', nil, 'hf saver: the HF family (models/*.lua) when the source is not HF (default llama)' },
  { '--iteration', nil, 'Megatron saver: the iteration to record (default release: no optimizer or RNG state to load)' },
  { '--check-logits', false, 'run both models on a fixed batch; fail if logits differ by more than 1e-4' },
}

local C = require('pmp.ffi').C
local megatron = require 'pmp.checkpoint.megatron'
local models = require 'pmp.models'
local loading = require 'pmp.models.loading'
local safetensors = pmp.safetensors
local json = pmp.json
local pio = pmp.io
local tensor = require 'pmp.tensor'

local function die(message)
  io.stderr:write('convert: ' .. message .. '\n')
  os.exit(1)
end

local ok, opts = pcall(pmp.args.parse, arg, FLAGS, {
  usage = 'pmp tools/checkpoint/convert.lua --loader hf|mcore|pmp --saver hf|mcore|pmp --load-dir DIR --save-dir DIR ' ..
    '[--target-tensor-parallel-size N] [--target-pipeline-parallel-size N] [--check-logits]',
  description = 'Convert checkpoints between Hugging Face, Megatron-LM and pmp.',
})
if not ok then
  io.stderr:write('convert: ' .. tostring(opts) .. '\n')
  os.exit(2)
end

local KINDS = { hf = 'hf', mcore = 'mcore', megatron = 'mcore', legacy = 'mcore', pmp = 'pmp' }
local loader, saver = KINDS[opts.loader or ''], KINDS[opts.saver or '']
if not loader then die("--loader must be hf, mcore or pmp, got '" .. tostring(opts.loader) .. "'") end
if not saver then die("--saver must be hf, mcore or pmp, got '" .. tostring(opts.saver) .. "'") end
if not opts.load_dir then die('--load-dir is required') end
if not opts.save_dir then die('--save-dir is required') end
if not pio.is_dir(opts.load_dir) then die('--load-dir ' .. opts.load_dir .. ' is not a directory') end
if opts.megatron_format ~= 'torch' and opts.megatron_format ~= 'torch_dist' then
  die("--megatron-format must be torch or torch_dist, got '" .. opts.megatron_format .. "'")
end
if opts.target_expert_parallel_size ~= 1 then die('--target-expert-parallel-size must be 1 (dense models only)') end
if opts.transformer_impl ~= 'local' and opts.transformer_impl ~= 'transformer_engine' then
  die("--transformer-impl must be local or transformer_engine, got '" .. opts.transformer_impl .. "'")
end
local DTYPES = { fp32 = 'f32', f32 = 'f32', float32 = 'f32', bf16 = 'bf16', bfloat16 = 'bf16', fp16 = 'f16', f16 = 'f16',
  float16 = 'f16' }
local dtype = opts.dtype and (DTYPES[opts.dtype] or die("--dtype must be fp32, bf16 or fp16, got '" .. opts.dtype .. "'"))
local true_vocab = opts.true_vocab_size > 0 and opts.true_vocab_size or (opts.vocab_size > 0 and opts.vocab_size or nil)
local tp, pp = opts.target_tensor_parallel_size, opts.target_pipeline_parallel_size
if opts.iteration and opts.iteration ~= 'release' and not tostring(opts.iteration):match('^%d+$') then
  die("--iteration must be a number or 'release', got '" .. tostring(opts.iteration) .. "'")
end

local function shape_of(t) return { unpack(t.shape) } end

---------------------------------------------------------------------------------------------------
-- Sources: {config, names (sorted), shapes, tensor(name), dtype, iteration, family, hf}

local sources = {}

-- A Hugging Face directory, read through the family's mapping: each pmp tensor is packed from its HF
-- tensors (views of the mapped files) when asked for.
function sources.hf(dir)
  local config_path = pio.join(dir, 'config.json')
  if not pio.is_file(config_path) then die(dir .. ' has no config.json (not a Hugging Face model directory)') end
  local hf = json.read(config_path)
  local config, family = models.config_from_hf(hf, { make_vocab_size_divisible_by = opts.make_vocab_size_divisible_by,
    tensor_model_parallel_size = saver == 'mcore' and tp or 1 }, config_path)
  config = require('pmp.nn.transformer').config(config)
  local catalog = loading.catalog(dir)
  local names, shapes, entries = {}, {}, {}
  for _, entry in ipairs(models.expand_mapping(family, config)) do
    local present = 0
    for _, n in ipairs(entry.hf) do if catalog.tensors[n] then present = present + 1 end end
    if present > 0 and not (entry.tied and config.tie_embeddings) then
      if present < #entry.hf then die(string.format('%s: %s needs %s', dir, entry.pmp, table.concat(entry.hf, ', '))) end
      local first = catalog.tensors[entry.hf[1]].shape
      local rows = 0
      for _, n in ipairs(entry.hf) do rows = rows + catalog.tensors[n].shape[1] end
      local shape = { unpack(first) }
      shape[1] = entry.pack == 'vocab' and config.padded_vocab_size or rows
      names[#names + 1] = entry.pmp
      shapes[entry.pmp] = shape
      entries[entry.pmp] = entry
    end
  end
  table.sort(names)
  local file_dtype = loading.file_dtype(family, catalog, function(n, l) return (n:gsub('{L}', tostring(l))) end)
  local function tensor_of(name)
    local entry = entries[name]
    local parts = {}
    for i, n in ipairs(entry.hf) do
      local e = catalog.tensors[n]
      parts[i] = safetensors.load(e.path, { names = { n } })[n]
    end
    local out = tensor.empty(shapes[name], { dtype = parts[1].dtype })
    local places, padding = loading.destinations(entry, out, config)
    for _, place in ipairs(places) do
      local from = parts[place.from]
      if place.rows then from = from:narrow(1, place.rows[1], place.rows[2]) end
      place[1]:copy_(from:view(place[2]))
    end
    for _, part in ipairs(parts) do
      C.pmp_mapping_drop_pages(part.ptr)   -- copied: out of resident memory (the page cache keeps it)
    end
    if padding then padding:zero_() end
    return out
  end
  return { config = config, names = names, shapes = shapes, tensor = tensor_of, dtype = file_dtype, family = family,
    hf = hf }
end

-- A Megatron-LM checkpoint (torch or torch_dist): each whole tensor rebuilt when asked for.
function sources.mcore(dir)
  if not megatron.is_checkpoint(dir) then die(dir .. ' is not a Megatron-LM torch or torch_dist checkpoint (no ' ..
    megatron.TRACKER .. ' naming a directory with mp_rank_*/' .. megatron.MODEL_FILE .. ' or .metadata)') end
  local ckpt = megatron.open(dir, { true_vocab_size = true_vocab })
  if not true_vocab and ckpt.config.vocab_size == ckpt.config.padded_vocab_size then
    io.stderr:write(string.format('convert: %s records only the padded vocabulary size (%d); pass --true-vocab-size to ' ..
      'drop the padding rows\n', dir, ckpt.config.padded_vocab_size))
  end
  for name, n in pairs(ckpt.report) do
    io.stderr:write(string.format('convert: %s: %d object(s) of %s kept as inert placeholders\n', dir, n, name))
  end
  local shapes = {}
  for _, name in ipairs(ckpt.names) do shapes[name] = ckpt:shape(name) end
  return { config = ckpt.config, names = ckpt.names, shapes = shapes, dtype = ckpt.dtype,
    tensor = function(name) return ckpt:tensor(name, { copy = true }) end, iteration = ckpt.iteration }
end

-- A pmp checkpoint, loaded whole.
function sources.pmp(dir)
  local model, info = pmp.checkpoint.load_model(dir)
  local state = model:state_dict()
  local names, shapes = {}, {}
  for name, t in pairs(state) do
    names[#names + 1] = name
    shapes[name] = shape_of(t)
  end
  table.sort(names)
  return { config = model.config, names = names, shapes = shapes, dtype = model.config.dtype, iteration = info.iteration,
    tensor = function(name) return state[name] end }
end

-- The source re-padded to the target's vocabulary padding (vocabulary rows past the true size are
-- zeros, as pmp pads when it loads a Hugging Face model).
local function repadded(source, multiple)
  local c = {}
  for k, v in pairs(source.config) do c[k] = v end
  if true_vocab then
    if true_vocab > source.config.padded_vocab_size then
      die(string.format('the true vocabulary size %d is larger than the source\'s %d rows', true_vocab,
        source.config.padded_vocab_size))
    end
    c.vocab_size = true_vocab
  end
  c.make_vocab_size_divisible_by = opts.make_vocab_size_divisible_by
  local padded = math.ceil(c.vocab_size / multiple) * multiple
  if padded == c.padded_vocab_size then
    source.config = c
    return source
  end
  if c.vocab_size == source.config.padded_vocab_size and not true_vocab then
    die(string.format('the source holds %d vocabulary rows and the target layout needs a multiple of %d; pass ' ..
      '--true-vocab-size (the tokenizer\'s size) so the padding can be redone', c.vocab_size, multiple))
  end
  c.padded_vocab_size = padded
  local shapes, inner = {}, source.tensor
  for name, shape in pairs(source.shapes) do
    shapes[name] = { unpack(shape) }
    if name == 'embedding.word_embeddings.weight' or name == 'output_layer.weight' then shapes[name][1] = padded end
  end
  local out = {}
  for k, v in pairs(source) do out[k] = v end
  out.config, out.shapes = c, shapes
  out.tensor = function(name)
    local t = inner(name)
    if name ~= 'embedding.word_embeddings.weight' and name ~= 'output_layer.weight' then return t end
    local rows = tensor.zeros(shapes[name], { dtype = t.dtype })
    rows:narrow(1, 1, c.vocab_size):copy_(t:narrow(1, 1, c.vocab_size))
    return rows
  end
  return out
end

---------------------------------------------------------------------------------------------------
-- Savers

local function progress_bar(total)
  local bar = pmp.progress.new({ total = total, label = 'convert', unit = 'tensors' })
  return bar, function(done) bar:update(done) end
end

local savers = {}

function savers.mcore(source, dir)
  local vp = 1
  if opts.target_num_layers_per_virtual_pipeline_stage > 0 then
    local per = opts.target_num_layers_per_virtual_pipeline_stage
    if source.config.num_layers % (per * pp) ~= 0 then
      die(string.format('%d layers do not split into %d stages of virtual stages of %d layers', source.config.num_layers, pp, per))
    end
    vp = source.config.num_layers / (per * pp)
  end
  local dist = opts.megatron_format == 'torch_dist'
  local bar, update = progress_bar((dist and 1 or tp) * #source.names)
  local root = megatron.save(dir, {
    names = source.names, shapes = source.shapes, tensor = source.tensor, config = source.config, tp = tp, pp = pp, vp = vp,
    first_stage_layers = opts.target_decoder_first_pipeline_num_layers > 0 and opts.target_decoder_first_pipeline_num_layers or nil,
    transformer_impl = opts.transformer_impl, dtype = dtype or source.dtype,
    iteration = opts.iteration and opts.iteration ~= 'release' and tonumber(opts.iteration) or 'release',
    progress = update, format = opts.megatron_format,
  })
  bar:finish()
  return root
end

function savers.hf(source, dir)
  local family = models.family(source.family and source.family.model_type or opts.model_type or 'llama')
  local config = source.config
  local out_dtype = dtype or source.dtype
  local tensors = {}
  local present = {}
  for _, name in ipairs(source.names) do present[name] = true end
  local bar, update = progress_bar(#source.names)
  local done = 0
  for _, entry in ipairs(models.expand_mapping(family, config)) do
    if present[entry.pmp] then
      present[entry.pmp] = nil
      local shapes = loading.hf_shapes(entry, source.shapes[entry.pmp], config)
      for i, hf_name in ipairs(entry.hf) do
        tensors[hf_name] = safetensors.deferred(out_dtype, shapes[i], function()
          -- the tensors made for the previous one are written: their memory goes back now
          collectgarbage()
          C.pmp_memory_empty_cache(C.PMP_CPU)
          local piece = models.export(family, { [entry.pmp] = source.tensor(entry.pmp) }, config)[hf_name]
          if i == #entry.hf then
            done = done + 1
            update(done)
          end
          return piece
        end)
      end
    end
  end
  local left = next(present)
  if left then die(string.format("the %s mapping (models/%s.lua) has no entry for '%s'", family.model_type, family.model_type, left)) end
  pio.mkdir_p(dir)
  safetensors.save_sharded(dir, tensors, { max_shard_size = '5GB' })
  bar:finish()
  local stub = { config = config }
  if source.hf and source.family == family then stub.hf = { model_type = family.model_type, config = source.hf } end
  local hf_config = models.hf_config(stub, { model_type = family.model_type, dtype = out_dtype })
  pio.write_atomic(pio.join(dir, 'config.json'), json.encode(hf_config, { indent = 2 }) .. '\n')
  return dir
end

function savers.pmp(source, dir)
  local build = {}
  for k, v in pairs(source.config) do build[k] = v end
  build.dtype, build.init = dtype or source.dtype, false
  local model = pmp.nn.GPTModel(build)
  model.config.init = nil
  local own = model:state_dict()
  local bar, update = progress_bar(#source.names)
  pmp.no_grad(function()
    for k, name in ipairs(source.names) do
      if not own[name] then die("the model of the source's config has no parameter " .. name) end
      own[name]:copy_(source.tensor(name))
      update(k)
    end
  end)
  bar:finish()
  local iteration = tonumber(source.iteration) or 0
  return pmp.checkpoint.save(dir, iteration, model)
end

---------------------------------------------------------------------------------------------------
-- The whole f32 model of a checkpoint (for --check-logits)

local function whole_model(kind, dir)
  if kind == 'hf' then return models.from_pretrained(dir, { dtype = 'f32' }) end
  if kind == 'mcore' then return (megatron.load_model(dir, { true_vocab_size = true_vocab, dtype = 'f32' })) end
  local model = pmp.checkpoint.load_model(dir)
  model:to('f32')
  return model
end

local function resident_peak_mb()
  local f = io.open('/proc/self/status')
  if not f then return nil end
  local text = f:read('*a')
  f:close()
  local kb = tonumber(text:match('VmHWM:%s*(%d+)'))
  return kb and kb / 1024
end

local source = sources[loader](opts.load_dir)
if saver == 'mcore' then source = repadded(source, opts.make_vocab_size_divisible_by * tp) end
local written = savers[saver](source, opts.save_dir)
print(string.format('convert: wrote %s (%s -> %s, %d tensors)', written, loader, saver, #source.names))
local peak = resident_peak_mb()
if peak then print(string.format('convert: peak resident memory %.1f MB', peak)) end

if opts.check_logits then
  local a = whole_model(loader, opts.load_dir)
  local b = whole_model(saver, opts.save_dir)
  -- saved in another precision: the source rounded the same way, so only the conversion is compared
  if dtype and dtype ~= 'f32' then
    pmp.no_grad(function()
      for _, p in pairs(a:state_dict()) do p:copy_(p:to(dtype)) end
    end)
  end
  local n = math.min(a.config.vocab_size, b.config.vocab_size)
  local ids = {}
  for row = 1, 2 do
    ids[row] = {}
    for t = 1, 16 do ids[row][t] = (row * 7919 + t * 104729) % n end
  end
  local function logits(model)
    return pmp.no_grad(function() return model(tensor.tensor(ids, { dtype = 'i64' })) end):float():narrow(3, 1, n)
  end
  local diff = (logits(a) - logits(b)):abs():max():item()
  print(string.format('convert: --check-logits: max |logit difference| %.3g', diff))
  if diff > 1e-4 then die(string.format('--check-logits: the converted model differs by %.3g (> 1e-4)', diff)) end
end
