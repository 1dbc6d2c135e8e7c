-- The saved shards of one checkpoint iteration, read for a load into any layout: each parameter (and
-- its optimizer state) is found on the stage that saved it, and the loading rank's part is copied from
-- the pieces of the saved TP parts it holds (pmp.dist.sharding.copy_part). Nothing is computed, so a
-- resharded tensor is bit-identical to the saved one. Rank directories are read (memory-mapped) once,
-- when first needed, and checked against the layout description.
local C = require('pmp.ffi').C
local tensor = require 'pmp.tensor'
local io_ = require 'pmp.io'
local safetensors = require 'pmp.safetensors'
local sharding = require 'pmp.dist.sharding'
local layout_file = require 'pmp.checkpoint.layout'

local Source = {}
Source.__index = Source

-- root: the iteration directory; description: its layout (pmp.checkpoint.layout.read).
function Source.open(root, description)
  return setmetatable({ root = root, layout = description, shards = {} }, Source)
end

local function sizes(L) return string.format('tp=%d pp=%d', L.tp, L.pp) .. ((L.ep or 1) > 1 and ' ep=' .. L.ep or '') end

-- The rank directory of stage s (1-based), TP rank r and expert-parallel rank e (0-based, default 0):
-- {dir, info, tensors}, its recorded place checked against its name and its tensors against the
-- description.
function Source:shard(s, r, e)
  e = e or 0
  local key = s .. ':' .. r .. ':' .. e
  if self.shards[key] then return self.shards[key] end
  local L = self.layout
  local name = layout_file.rank_dir_name(r, s - 1, L.pp, e, L.ep)
  local dir = io_.join(self.root, name)
  local info_path, model_path = io_.join(dir, layout_file.INFO_FILE), io_.join(dir, layout_file.MODEL_FILE)
  layout_file.verify(L, self.root, name .. '/' .. layout_file.INFO_FILE)
  local info = layout_file.read_json(info_path)
  if not L.legacy and (info.tp_rank ~= r or info.pp_rank ~= s - 1) then
    error(string.format('checkpoint: %s records tp_rank %s pp_rank %s, but its directory holds tp_rank %d pp_rank %d of %s',
      info_path, tostring(info.tp_rank), tostring(info.pp_rank), r, s - 1, sizes(L)), 0)
  end
  layout_file.verify(L, self.root, name .. '/' .. layout_file.MODEL_FILE)
  local tensors = safetensors.load(model_path)
  layout_file.check_tensors(L, name, model_path, tensors)
  local shard = { dir = dir, model_path = model_path, info = info, tensors = tensors }
  self.shards[key] = shard
  return shard
end

-- Where the tensor of global name `global` is saved: {stage (1-based), name (the stage's own), global,
-- ep (the expert-parallel rank whose directory holds it)}.
-- With tied embeddings the last stage's output layer is a copy of the word embeddings, which is where
-- a checkpoint of one stage keeps it.
function Source:find(global, config)
  local params = self.layout.params
  local p = params[global]
  if not p and global == 'output_layer.weight' and config.tie_embeddings then
    global, p = 'embedding.word_embeddings.weight', params['embedding.word_embeddings.weight']
  end
  if not p then
    error(string.format('checkpoint: %s holds no model.%s on any stage (saved with %s)', self.root, global,
      sizes(self.layout)), 0)
  end
  return { stage = p.stage + 1, name = p.key:match('^model%.(.*)$') or p.key, global = global, ep = p.ep_rank or 0 }
end

-- Part `rank` of `tp` of the saved tensor at entry, read from each TP shard by read(shard, name)
-- (nil where the shard has none). Same TP size: the rank's own shard, as saved; another: a new tensor
-- (for the optimizer state; model weights go straight into the parameters, see copy_model_part).
function Source:part(entry, read, tp, rank, config)
  local L = self.layout
  local same = L.tp == tp
  local e = entry.ep
  if not sharding.rule(entry.global, config) then return read(self:shard(entry.stage, same and rank or 0, e), entry.name) end
  if same then return read(self:shard(entry.stage, rank, e), entry.name) end
  local parts = {}
  for r = 0, L.tp - 1 do
    local shard = self:shard(entry.stage, r, e)
    parts[r + 1] = read(shard, entry.name)
    if (parts[r + 1] == nil) ~= (parts[1] == nil) then
      error(string.format('checkpoint: %s and %s disagree on whether %s has this tensor', self:shard(entry.stage, 0, e).dir,
        shard.dir, entry.name), 0)
    end
  end
  if parts[1] == nil then return nil end
  -- the part made directly from the saved parts' pieces it holds, without joining the whole tensor
  local shape = parts[1].shape
  local dim = sharding.rule(entry.global, config).dim
  shape[dim] = shape[dim] * L.tp / tp
  local out = tensor.empty(shape, { dtype = parts[1].dtype })
  sharding.copy_part(entry.global, out, function(r) return parts[r + 1] end, L.tp, tp, rank, config)
  return out
end

-- The shape of part `rank` of `tp` of the saved model tensor at entry, from the file headers alone.
function Source:part_shape(entry, tp, config)
  local L = self.layout
  local shape = Source.read_model(self:shard(entry.stage, 0, entry.ep), entry.name).shape
  local rule = sharding.rule(entry.global, config)
  if rule and L.tp ~= tp then shape[rule.dim] = shape[rule.dim] * L.tp / tp end
  return shape
end

-- Copies part `rank` of `tp` of the saved model tensor at entry into dst (of part_shape's shape),
-- straight from the mapped files: a resharded tensor is copied piece by piece from the saved parts
-- (pmp.dist.sharding.copy_part), so no whole tensor or other temporary is made. The copied pages of
-- the files leave this process's resident memory (the page cache keeps them).
function Source:copy_model_part(entry, tp, rank, config, dst)
  local L = self.layout
  local read = {}
  local function part_of(r)
    if L.tp == tp or not sharding.rule(entry.global, config) then r = L.tp == tp and rank or 0 end
    local t = Source.read_model(self:shard(entry.stage, r, entry.ep), entry.name)
    read[#read + 1] = t
    return t
  end
  if L.tp == tp then dst:copy_(part_of(rank)) else sharding.copy_part(entry.global, dst, part_of, L.tp, tp, rank, config) end
  for _, t in ipairs(read) do C.pmp_mapping_drop_pages(t.ptr) end
end

function Source.read_model(shard, name)
  local key = layout_file.model_key(name)
  local t = shard.tensors[key]
  if not t then error(string.format('checkpoint: %s lacks %s', shard.model_path, key), 0) end
  return t
end

-- The distributed optimizer's pieces of a shard directory, read once.
function Source:pieces(shard)
  if shard.pieces then return shard.pieces end
  local count = self.layout.optimizer_shards
  shard.pieces = {}
  for i = 0, count - 1 do
    local file = layout_file.optimizer_file_name(i)
    layout_file.verify(self.layout, self.root, io_.basename(shard.dir) .. '/' .. file)
    local path = io_.join(shard.dir, file)
    shard.pieces[i + 1] = { path = path, tensors = safetensors.load(path) }
  end
  return shard.pieces
end

-- Elements [first, last) of a flattened tensor of numel elements held by piece `index` of `count`.
function Source.piece_range(numel, index, count)
  return math.floor(index * numel / count), math.floor((index + 1) * numel / count)
end

-- A reader of optimizer slot `slot` (nil where it was not saved, as master weights of f32 parameters).
function Source:slot_reader(slot)
  if not self.layout.distributed_optimizer then
    return function(shard, name) return shard.tensors['optimizer.' .. name .. '.' .. slot] end
  end
  return function(shard, name)
    local pieces = self:pieces(shard)
    local shape = Source.read_model(shard, name).shape
    local numel = 1
    for _, n in ipairs(shape) do numel = numel * n end
    local key = name .. '.' .. slot
    local parts, found, lacking = {}, false, nil
    for i, piece in ipairs(pieces) do
      local first, last = Source.piece_range(numel, i - 1, #pieces)
      if last > first then
        local t = piece.tensors[key]
        if t then
          if t:numel() ~= last - first then
            error(string.format('checkpoint: %s: %s has %d elements, its piece of %s %s is %d', piece.path, key, t:numel(),
              name, layout_file.shape_string(shape), last - first), 0)
          end
          found, parts[#parts + 1] = true, t
        else
          lacking = lacking or piece.path
        end
      end
    end
    if not found then return nil end
    if lacking then error(string.format('checkpoint: %s lacks %s', lacking, key), 0) end
    return tensor.cat(parts, 1):view(shape)
  end
end

-- Raises naming where the tensor was saved when its shape is not the model's.
function Source:check_shape(got, want, what, entry)
  local a, b = layout_file.shape_string(got.shape), layout_file.shape_string(want.shape)
  if a ~= b then
    local L = self.layout
    error(string.format('checkpoint: %s is %s in the checkpoint but %s in the model (saved as %s in %s%s)', what, a, b,
      entry.name, io_.join(self.root, layout_file.rank_dir_name(0, entry.stage - 1, L.pp, entry.ep or 0, L.ep)),
      L.tp > 1 and ' and its other tp ranks' or ''), 0)
  end
end

return Source
