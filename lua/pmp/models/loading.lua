--- pmp.models.loading: a Hugging Face directory's safetensors into a GPTModel, tensor by tensor.
---
--- The files are checked from their headers alone (missing, unexpected, mis-shaped weights: one error
--- listing all) before any data is read. Then, one file at a time, each HF tensor is copied from the
--- file's mapping straight into its place in the parameter: packed layouts (qkv per query group,
--- [gate; up], padded vocabulary rows) are narrow views of the destination, and copy_ converts the
--- dtype on the way (same dtype: a plain copy), so nothing passes through f32 or an intermediate
--- tensor. The pages of each copied tensor leave resident memory at once (the page cache keeps them)
--- and a file's mapping is released when its tensors are done, so memory holds the model plus about
--- one tensor.
---
--- Zero-copy (mmap = true): a parameter whose bytes in the file already have its dtype and layout is
--- the file's mapping itself, not a copy (also linear_fc1 when the file holds gate_proj and up_proj
--- back to back, as writers that sort by name do; qkv packed per group is always copied). The mapping is private (copy-on-write): the pages are read
--- from the file (the page cache) when first touched, an optimizer step or any in-place write copies
--- the pages it changes into this process's memory, and nothing is ever written to the file. The file
--- stays mapped while such a parameter lives: replace it by writing a new file and renaming it (as
--- save_pretrained does), never in place. A file truncated while mapped makes the next read of the
--- lost pages end the process with a message naming the file (SIGBUS; see core/io/file_io.c).
---
--- Under tensor / pipeline parallelism (fill_parts, from_pretrained's split) a rank copies only its
--- stage's tensors, and of each only the rows or columns its tensor-parallel part holds (whole query
--- groups of qkv, its slices of gate and of up, its rows of the padded vocabulary), straight into place.
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local safetensors = require 'pmp.safetensors'
local sharding = require 'pmp.dist.sharding'

local M = {}

local function shape_string(shape) return '[' .. table.concat(shape, ',') .. ']' end

local function with_first(first, shape)
  local s = { first }
  for i = 2, #shape do s[#s + 1] = shape[i] end
  return s
end

-- The HF shapes that make up a pmp tensor of shape `shape` under a mapping entry.
function M.hf_shapes(entry, shape, config)
  if entry.pack == nil then return { shape } end
  if entry.pack == 'vocab' then return { with_first(config.vocab_size, shape) } end
  if entry.pack == 'offset' then return { with_first(shape[1] + entry.offset, shape) } end
  if entry.pack == 'qkv' then
    local d = config.kv_channels
    return { with_first(config.num_attention_heads * d, shape), with_first(config.num_query_groups * d, shape),
             with_first(config.num_query_groups * d, shape) }
  end
  if entry.pack == 'gate_up' then return { with_first(shape[1] / 2, shape), with_first(shape[1] / 2, shape) } end
  if entry.pack == 'qkv_concat' then return { shape } end
  error("pmp.models: unknown pack '" .. tostring(entry.pack) .. "' for " .. entry.pmp, 3)
end

-- Where each HF part of an entry goes in the parameter p: a list of { view of p, shape to view the
-- (narrowed) HF tensor as, from = index of the HF tensor in entry.hf, rows = { first, count } / cols =
-- { first, count } when the part takes only those rows / columns of it }, and the view of p's rows no
-- HF tensor fills (vocabulary padding), if any. ('qkv_concat': the one HF tensor fills three parts;
-- 'offset': the HF table's first entry.offset rows are skipped.)
-- shard = { rule, tp, rank }: p is only tensor-parallel part `rank` of tp of the parameter, cut by
-- pmp.dist.sharding's rule (nil: replicated), and the parts take only the HF rows or columns it holds.
local function destinations(entry, p, config, shard)
  local tp, rank, rule = 1, 0, nil
  if shard and shard.rule and shard.tp > 1 then tp, rank, rule = shard.tp, shard.rank, shard.rule end
  local function part(view, from, rows, cols) return { view, view.shape, from = from, rows = rows, cols = cols } end
  if rule and rule.dim == 2 then
    if entry.pack ~= nil then error(string.format("pmp.models: %s: pack '%s' cut by columns is not supported", entry.pmp, entry.pack), 3) end
    local n = p:size(2)
    return { part(p, 1, nil, { rank * n + 1, n }) }
  end
  local rows = p:size(1)
  if entry.pack == nil or entry.pack == 'gate_up' then
    if rule and rule.gated then
      -- p holds this rank's slice of gate, then of up: [gate; up] in one HF tensor, or two
      local n, two = rows / 2, entry.pack == 'gate_up'
      local whole = two and 0 or n * tp
      return { part(p:narrow(1, 1, n), 1, { rank * n + 1, n }),
               part(p:narrow(1, n + 1, n), two and 2 or 1, { whole + rank * n + 1, n }) }
    end
    if entry.pack == 'gate_up' then
      if rule then error(string.format("pmp.models: %s: pack 'gate_up' needs a gated tensor-parallel rule", entry.pmp), 3) end
      local half = rows / 2
      return { part(p:narrow(1, 1, half), 1), part(p:narrow(1, half + 1, half), 2) }
    end
    return { part(p, 1, rule and { rank * rows + 1, rows } or nil) }
  end
  if entry.pack == 'offset' then
    if rule then error(string.format("pmp.models: %s: pack 'offset' cannot be cut", entry.pmp), 3) end
    return { part(p, 1, { entry.offset + 1, rows }) }
  end
  if entry.pack == 'vocab' then
    -- this rank's rows of the padded table: those below vocab_size come from the file, the rest are padding
    local first = rank * rows
    local n = math.max(0, math.min(rows, config.vocab_size - first))
    local parts = {}
    if n > 0 then parts[1] = part(p:narrow(1, 1, n), 1, rule and { first + 1, n } or nil) end
    return parts, rows > n and p:narrow(1, n + 1, rows - n) or nil
  end
  -- qkv: p is [ng, qpg + 2, d, ...] per query group; q is [ng, qpg, d, ...], k and v [ng, 1, d, ...]; a
  -- tensor-parallel part holds ng / tp whole groups
  local ng, d = config.num_query_groups, config.kv_channels
  local qpg = config.num_attention_heads / ng
  local local_ng = ng / tp
  local grouped = { local_ng, qpg + 2, d }
  for i = 2, #p.shape do grouped[#grouped + 1] = p.shape[i] end
  local g = p:view(grouped)
  local concat = entry.pack == 'qkv_concat'
  local q_rows, kv_rows = ng * qpg * d, ng * d
  local out = {}
  for i, span in ipairs({ { 1, qpg, 0, qpg }, { qpg + 1, 1, q_rows, 1 }, { qpg + 2, 1, q_rows + kv_rows, 1 } }) do
    local per_group = span[4] * d   -- rows of one group in the HF tensor of this part
    local first = (concat and span[3] or 0) + rank * local_ng * per_group
    local all_rows = not concat and not rule
    out[i] = part(g:narrow(2, span[1], span[2]), concat and 1 or i, (not all_rows) and { first + 1, local_ng * per_group } or nil)
  end
  return out
end

M.destinations = destinations

-- The headers of a directory's files: files (paths in order) and name -> { path, dtype (pmp's name or
-- the file's for dtypes pmp lacks), shape } (or { tensor, dtype, shape }: see add_tensor).
function M.catalog(dir)
  local files = safetensors.shard_files(dir)
  local tensors = {}
  for _, path in ipairs(files) do
    local info = safetensors.inspect(path)
    for name, e in pairs(info.tensors) do
      tensors[name] = { path = path, dtype = safetensors.pmp_dtype(e.dtype) or e.dtype, shape = e.shape }
    end
  end
  return { files = files, tensors = tensors }
end

-- Adds a tensor held in memory to the catalog, as if a file had it (a head a checkpoint lacks).
function M.add_tensor(catalog, name, t)
  catalog.tensors[name] = { tensor = t, dtype = t.dtype, shape = t.shape }
end

local FLOAT = { f64 = true, f32 = true, bf16 = true, f16 = true }

-- The dtype of the first weight the family maps (layer 0), for loading in the file's own dtype.
function M.file_dtype(family, catalog, subst)
  for _, entry in ipairs(family.mapping) do
    local first = type(entry[2]) == 'table' and entry[2][1] or entry[2]
    local e = catalog.tensors[subst(first, 0)]
    if e and FLOAT[e.dtype] then return e.dtype end
  end
  return 'f32'
end

local function ignored(family, name)
  for _, pattern in ipairs(family.ignore or {}) do
    if name:match(pattern) then return true end
  end
  return false
end

-- The work list { entry, param } for the model's parameters `own` (name -> tensor) against the
-- catalog, after checking every header: missing, unexpected and mis-shaped weights are one error.
local function plan(family, entries, catalog, own, config, source)
  local covered, used, work = {}, {}, {}
  local missing, unexpected, misshaped = {}, {}, {}
  for _, entry in ipairs(entries) do
    local p = own[entry.pmp]
    if p == nil then
      if entry.tied and config.tie_embeddings then
        for _, n in ipairs(entry.hf) do used[n] = true end
      end
    else
      covered[entry.pmp] = true
      local shapes, ok = M.hf_shapes(entry, p.shape, config), true
      for i, n in ipairs(entry.hf) do
        local e = catalog.tensors[n]
        used[n] = true
        if e == nil then
          missing[#missing + 1] = n
          ok = false
        elseif shape_string(e.shape) ~= shape_string(shapes[i]) then
          misshaped[#misshaped + 1] = string.format('%s (file %s, expected %s)', n, shape_string(e.shape), shape_string(shapes[i]))
          ok = false
        elseif not FLOAT[e.dtype] then
          misshaped[#misshaped + 1] = string.format('%s (dtype %s, expected floating point)', n, e.dtype)
          ok = false
        end
      end
      if ok then work[#work + 1] = { entry = entry, param = p } end
    end
  end
  for name in pairs(own) do
    if not covered[name] then
      error(string.format("pmp.models: the %s mapping has no entry for the model's parameter '%s'", family.model_type, name), 3)
    end
  end
  for name in pairs(catalog.tensors) do
    if not used[name] and not ignored(family, name) then unexpected[#unexpected + 1] = name end
  end
  table.sort(missing, safetensors.natural_less)
  table.sort(unexpected, safetensors.natural_less)
  table.sort(misshaped, safetensors.natural_less)
  local problems = {}
  if #missing > 0 then problems[#problems + 1] = 'missing weights: ' .. table.concat(missing, ', ') end
  if #unexpected > 0 then problems[#problems + 1] = 'unexpected weights: ' .. table.concat(unexpected, ', ') end
  if #misshaped > 0 then problems[#problems + 1] = 'mis-shaped weights: ' .. table.concat(misshaped, ', ') end
  if #problems > 0 then error(source .. ': ' .. table.concat(problems, '; '), 0) end
  return work
end

-- Replaces the parameter `name` (dotted: decoder.layers.0.mlp.linear_fc1.weight) of model by t.
local function replace_parameter(model, name, t)
  local path = {}
  for part in name:gmatch('[^.]+') do path[#path + 1] = part end
  local owner = model
  for i = 1, #path - 1 do owner = owner[path[i]] end
  owner[path[#path]] = t:requires_grad_()
end

-- The view of the file that can be the parameter p itself, or nil: the HF tensor when it has p's dtype
-- and shape, or for [gate; up] the two tensors when the file holds them back to back in that order.
local function zero_copy_view(entry, first, p, catalog)
  if first.dtype ~= p.dtype or entry.pack == 'qkv_concat' then return nil end
  if #entry.hf == 1 then return shape_string(first.shape) == shape_string(p.shape) and first or nil end
  if entry.pack ~= 'gate_up' then return nil end
  local path = catalog.tensors[entry.hf[1]].path
  if not path or catalog.tensors[entry.hf[2]].path ~= path then return nil end
  return safetensors.load_joined(path, entry.hf, p.shape)
end

-- Bytes of file data this process has copied into parameters (all loads since it started): a load of a
-- tensor-parallel part or pipeline stage adds only what the rank holds (see fill_parts).
M.bytes_read = 0

-- Copies the work items { entry, param, owner (the module holding it), name (its name there), shard }
-- from the catalog's files, one file at a time. options.mmap: zero-copy where the layout allows.
local function copy_work(work, catalog, config, options, source)
  -- each entry is filled when the last file holding one of its parts is open
  local order = {}
  for k, path in ipairs(catalog.files) do order[path] = k end
  local due = {}
  for _, item in ipairs(work) do
    local last = 1
    for _, n in ipairs(item.entry.hf) do last = math.max(last, order[catalog.tensors[n].path] or 1) end
    due[last] = due[last] or {}
    table.insert(due[last], item)
  end
  local open = {}   -- name -> view of the mapping (or tensor in memory), for parts of entries still to fill
  local needed = {}
  for _, item in ipairs(work) do
    for _, n in ipairs(item.entry.hf) do
      needed[n] = true
      open[n] = catalog.tensors[n].tensor
    end
  end
  require('pmp').no_grad(function()
    for k, path in ipairs(catalog.files) do
      local names = {}
      for name, e in pairs(catalog.tensors) do
        if e.path == path and needed[name] then names[#names + 1] = name end
      end
      -- a file holding nothing this model (or pipeline stage) needs is never mapped
      for name, t in pairs(#names > 0 and safetensors.load(path, { names = names }) or {}) do
        local e = catalog.tensors[name]
        if t.dtype ~= e.dtype or shape_string(t.shape) ~= shape_string(e.shape) then
          error(string.format('%s: %s changed while loading: %s is %s %s, its header said %s %s', source, path, name,
            t.dtype, shape_string(t.shape), e.dtype, shape_string(e.shape)), 0)
        end
        open[name] = t
      end
      for _, item in ipairs(due[k] or {}) do
        local entry, p = item.entry, item.param
        local first = open[entry.hf[1]]
        local view = options.mmap and zero_copy_view(entry, first, p, catalog)
        if view then
          replace_parameter(item.owner, item.name, view)
        else
          local parts, padding = destinations(entry, p, config, item.shard)
          for _, dst in ipairs(parts) do
            local from = open[entry.hf[dst.from]]
            if dst.rows then from = from:narrow(1, dst.rows[1], dst.rows[2]) end
            if dst.cols then from = from:narrow(2, dst.cols[1], dst.cols[2]) end
            if shape_string(from.shape) ~= shape_string(dst[2]) then from = from:view(dst[2]) end
            dst[1]:copy_(from)
            M.bytes_read = M.bytes_read + from:numel() * from:element_size()
          end
          for _, n in ipairs(entry.hf) do
            -- the source pages are copied: out of resident memory with them (the file keeps them cached)
            if C.pmp_mapping_drop_pages(open[n].ptr) ~= 0 then
              error(source .. ': ' .. n .. ': ' .. ffi.string(C.pmp_last_error()), 0)
            end
          end
          if padding then padding:zero_() end
        end
        for _, n in ipairs(entry.hf) do open[n] = nil end
      end
      -- drop the views just consumed, so the mapping of a finished file is released now
      collectgarbage()
    end
  end)
end

-- Fills the parameters of `model` (built with init = false) from the catalog's files. options.mmap:
-- zero-copy where the layout allows (see above). source names the directory in errors.
function M.fill(model, family, entries, catalog, options, source)
  local work = plan(family, entries, catalog, model:state_dict(), model.config, source)
  for _, item in ipairs(work) do item.owner, item.name = model, item.entry.pmp end
  copy_work(work, catalog, model.config, options, source)
  return model
end

-- Fills this rank's part of a model: `whole` (built with init = false, never read) is checked against
-- the files' headers, split(whole) turns it into the rank's pipeline stage (or pmp.dist.pipeline.Chunks)
-- and tensor-parallel part without reading a weight (pmp.train.parallel.split with unfilled), and only
-- the tensors of that stage, and of each only the rows or columns this rank holds, are read from the
-- files (files with none of them are not even mapped). The whole model's parameters are allocated but
-- never written, so their pages never take memory. Returns split's model.
function M.fill_parts(whole, split, family, entries, catalog, options, source)
  if options.mmap then error(source .. ': mmap = true is not supported with split (each rank copies its part)', 0) end
  local config = whole.config
  plan(family, entries, catalog, whole:state_dict(), config, source)
  local shapes, by_pmp = {}, {}
  for name, p in pairs(whole:state_dict()) do shapes[name] = p.shape end
  for _, entry in ipairs(entries) do by_pmp[entry.pmp] = entry end
  local model = split(whole)
  collectgarbage()   -- the layers of other stages and the uncut weights go
  local work = {}
  for _, chunk in ipairs(require('pmp.dist.pipeline').chunks(model)) do
    local stage, tp = chunk.pipeline, chunk.tensor_parallel
    for name, p in pairs(chunk:state_dict()) do
      local global = sharding.shift_layer(name, stage and stage.layer_offset or 0)
      -- a last pipeline stage's copy of tied word embeddings is read from theirs
      local entry = by_pmp[global]
      if global == 'output_layer.weight' and config.tie_embeddings then entry = by_pmp['embedding.word_embeddings.weight'] end
      if not entry or not shapes[entry.pmp] then
        error(string.format("%s: split gave a parameter '%s' (%s of the whole model) that the whole model lacks", source,
          name, global), 0)
      end
      local size = tp and tp.group.size or 1
      local want = sharding.shard_shape(global, shapes[entry.pmp], config, size)
      if shape_string(want) ~= shape_string(p.shape) then
        error(string.format('%s: split gave %s the shape %s; its part of the whole model is %s', source, global,
          shape_string(p.shape), shape_string(want)), 0)
      end
      work[#work + 1] = { entry = entry, param = p, owner = chunk, name = name,
        shard = { rule = sharding.rule(global, config), tp = size, rank = tp and tp.group.rank or 0 } }
    end
  end
  table.sort(work, function(a, b) return a.name < b.name end)
  copy_work(work, catalog, config, options, source)
  return model
end

return M
