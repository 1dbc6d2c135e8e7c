-- The description of a checkpoint's parallel layout: iter_NNNNNNN/layout.json, written by every save
-- (one process included) next to the per-rank directories it describes, and read first by every load.
--
--   {
--     "format": "pmp-checkpoint-1", "iteration": 100,
--     "tp": 2, "pp": 2, "virtual_stages": 1, "cp": 1, "dp": 2, "ep": 1,
--     "distributed_optimizer": true, "optimizer_shards": 2, "optimizer": true,
--     "dtype": "bf16", "model_config": {...},
--     "stages": [{"first": 0, "count": 2}, ...]      (with virtual stages: [{"chunks": [{first, count}, ...]}, ...])
--     "ranks": {"mp_rank_00_000": {"tp_rank": 0, "pp_rank": 0, "ep_rank": 0, "files": ["model_optim_rng.safetensors", ...],
--               "tensors": {"model.decoder.layers.0...": {"shape": [96, 64], "dtype": "bf16"}, ...}}, ...},
--     "params": {"decoder.layers.2.mlp.linear_fc1.weight": {"shape": [256, 64], "tp_dim": 1, "stage": 1,
--                "key": "model.decoder.layers.0.mlp.linear_fc1.weight"}, ...}
--   }
--
-- With expert parallelism (ep > 1) every (tp, pp) rank has ep directories mp_rank_TT[_PPP]_EEE
-- (Megatron's names): expert-parallel rank EEE's holds the experts it trains (under their global
-- numbers, mlp.experts.local_experts.<global expert>), rank 0's also everything else; a parameter's
-- "ep_rank" says which (absent: 0).
--
-- params are the whole model's parameters by global name (layers numbered over the whole model) with
-- their unsharded shape, the TP dimension they are split on (none: whole on every TP rank) and the
-- stage (0-based) and key under which they are saved. A checkpoint written before layout.json existed
-- by one process (pmp.checkpoint.save of earlier versions: no layout, the optimizer state by position)
-- reads as a description with `legacy = true`.
local io_ = require 'pmp.io'
local json = require 'pmp.json'
local safetensors = require 'pmp.safetensors'
local sharding = require 'pmp.dist.sharding'

local M = {}

M.FILE = 'layout.json'
M.FORMAT = 'pmp-checkpoint-1'
M.MODEL_FILE, M.INFO_FILE = 'model_optim_rng.safetensors', 'model_optim_rng.json'

-- 'mp_rank_TT' when pp is 1, else 'mp_rank_TT_PPP' (ranks 0-based); with expert parallelism (ep > 1)
-- Megatron's '_EEE' after them for expert-parallel rank EEE.
function M.rank_dir_name(tp_rank, pp_rank, pp, ep_rank, ep)
  local name = pp == 1 and string.format('mp_rank_%02d', tp_rank) or string.format('mp_rank_%02d_%03d', tp_rank, pp_rank)
  if (ep or 1) > 1 then name = name .. string.format('_%03d', ep_rank) end
  return name
end

-- Whether a parameter is one of a MoE layer's experts, which expert-parallel ranks split between them.
function M.is_expert(name) return name:match('%.mlp%.experts%.') ~= nil end

function M.optimizer_file_name(shard) return string.format('distrib_optim_%03d.safetensors', shard) end

-- The tensor key of a model parameter in the model file: 'model.<name>' for a stage, and the name
-- itself, 'model<v>.<name in chunk v>', for the chunks of virtual stages (Megatron's model0, model1).
function M.model_key(name)
  if name:match('^model%d+%.') then return name end
  return 'model.' .. name
end

-- The global parameter name (whole-model layer numbering) of a stage's parameter.
function M.global_name(name, stage)
  local v, inner = name:match('^model(%d+)%.(.*)$')
  if v then return sharding.shift_layer(inner, stage.chunks[tonumber(v) + 1].first) end
  return sharding.shift_layer(name, stage.first)
end

local function shape_string(shape) return '[' .. table.concat(shape, ',') .. ']' end
M.shape_string = shape_string

function M.read_json(path)
  local ok, value = pcall(json.decode, io_.read_file(path))
  if not ok then error(string.format('checkpoint: %s: %s', path, tostring(value)), 0) end
  return value
end

---------------------------------------------------------------------------------------------------
-- Writing

-- The description of a save. layout: pmp.dist.layout(); stages: every stage's layer ranges;
-- listings: per model-parallel rank {tp_rank, pp_rank, tensors = {key = {shape, dtype}}} of its model
-- file; config: the whole model's config (nil for a bare module).
function M.describe(iteration, layout, stages, listings, config, optimizer)
  local distributed = optimizer == 'distributed'
  local shards = distributed and layout.dp * layout.cp or nil
  local out = {
    format = M.FORMAT, iteration = iteration, tp = layout.tp, pp = layout.pp,
    virtual_stages = stages[1].chunks and #stages[1].chunks or 1, cp = layout.cp, dp = layout.dp, ep = layout.ep,
    distributed_optimizer = distributed, optimizer_shards = shards, optimizer = optimizer ~= nil,
    model_config = config, stages = stages, ranks = {}, params = {},
  }
  for _, listing in ipairs(listings) do
    local ep_rank = listing.ep_rank or 0
    local name = M.rank_dir_name(listing.tp_rank, listing.pp_rank, layout.pp, ep_rank, layout.ep)
    local files = { M.MODEL_FILE, M.INFO_FILE }
    for i = 0, (shards or 0) - 1 do files[#files + 1] = M.optimizer_file_name(i) end
    out.ranks[name] = { tp_rank = listing.tp_rank, pp_rank = listing.pp_rank, ep_rank = ep_rank, files = files,
      tensors = listing.tensors }
    if listing.tp_rank == 0 then
      local stage = stages[listing.pp_rank + 1]
      for key, t in pairs(listing.tensors) do
        local inner = key:match('^model%.(.*)$') or key
        local global = M.global_name(inner, stage)
        local rule = sharding.rule(global, config or {})
        local shape = { unpack(t.shape) }
        if rule then shape[rule.dim] = shape[rule.dim] * layout.tp end
        out.params[global] = { shape = shape, tp_dim = rule and rule.dim or nil, stage = listing.pp_rank, key = key,
          ep_rank = ep_rank > 0 and ep_rank or nil }
      end
    end
  end
  -- the dtype of the model: that of its word embeddings, else of the first stage's first tensor by name
  local first = out.ranks[M.rank_dir_name(0, 0, layout.pp, 0, layout.ep)].tensors
  local keys = {}
  for key in pairs(first) do keys[#keys + 1] = key end
  table.sort(keys)
  local embedding = first['model.embedding.word_embeddings.weight'] or first['model0.embedding.word_embeddings.weight']
  out.dtype = (embedding or first[keys[1]] or { dtype = 'f32' }).dtype
  return out
end

---------------------------------------------------------------------------------------------------
-- Reading and checking against the directories

-- An earlier single-process checkpoint (no layout.json, no layout in its JSON) as a description.
local function legacy(root, info)
  local dir = io_.join(root, 'mp_rank_00')
  local saved = safetensors.load(io_.join(dir, M.MODEL_FILE))   -- memory-mapped: nothing is read yet
  local tensors, params, layers = {}, {}, 0
  for key, t in pairs(saved) do
    local name = key:match('^model%.(.*)$')
    if name then
      tensors[key] = { shape = t.shape, dtype = t.dtype }
      params[name] = { shape = t.shape, stage = 0, key = key }
      layers = math.max(layers, (tonumber(name:match('^decoder%.layers%.(%d+)%.')) or -1) + 1)
    end
  end
  local config = type(info.state) == 'table' and info.state.model_config or nil
  local embedding = tensors['model.embedding.word_embeddings.weight']
  return { format = 'legacy', legacy = true, iteration = info.iteration, tp = 1, pp = 1, virtual_stages = 1, cp = 1,
    dp = 1, ep = 1, distributed_optimizer = false, optimizer = info.optimizer ~= nil, model_config = config,
    dtype = embedding and embedding.dtype or 'f32',
    stages = { { first = 0, count = layers } },
    ranks = { mp_rank_00 = { tp_rank = 0, pp_rank = 0, files = { M.MODEL_FILE, M.INFO_FILE }, tensors = tensors } },
    params = params }
end

local function check_number(path, d, key)
  local v = d[key]
  if type(v) ~= 'number' or v < 1 or v ~= math.floor(v) then
    error(string.format('checkpoint: %s: %s is %s, expected a positive integer', path, key, tostring(v)), 0)
  end
end

-- The description of iteration directory root, checked against the rank directories and files there:
-- each one it lists exists, and there are no others.
function M.read(root)
  local path = io_.join(root, M.FILE)
  if not io_.is_file(path) then
    local old = io_.join(root, 'mp_rank_00', M.INFO_FILE)
    if io_.is_file(old) then
      local info = M.read_json(old)
      if info.layout == nil and type(info.rng) == 'table' and type(info.rng[1]) == 'string' then return legacy(root, info) end
    end
    error(string.format('checkpoint: %s is missing (the description of the parallel layout that every save writes ' ..
      'next to the rank directories)', path), 0)
  end
  local d = M.read_json(path)
  if d.format ~= M.FORMAT then
    error(string.format("checkpoint: %s: format is '%s', expected '%s'", path, tostring(d.format), M.FORMAT), 0)
  end
  for _, key in ipairs({ 'tp', 'pp', 'cp', 'dp', 'virtual_stages' }) do check_number(path, d, key) end
  for _, key in ipairs({ 'ranks', 'params', 'stages' }) do
    if type(d[key]) ~= 'table' then error(string.format('checkpoint: %s lacks %s', path, key), 0) end
  end
  if d.checksums ~= nil and type(d.checksums) ~= 'table' then
    error(string.format('checkpoint: %s: checksums must be an object of file -> checksum', path), 0)
  end
  if d.ep == nil then d.ep = 1 end   -- saved before expert parallelism could be
  check_number(path, d, 'ep')
  if #d.stages ~= d.pp then
    error(string.format('checkpoint: %s lists %d stages for pp=%d', path, #d.stages, d.pp), 0)
  end
  local sizes = string.format('tp=%d pp=%d', d.tp, d.pp) .. (d.ep > 1 and ' ep=' .. d.ep or '')
  for tp_rank = 0, d.tp - 1 do
    for pp_rank = 0, d.pp - 1 do
      for ep_rank = 0, d.ep - 1 do
        local name = M.rank_dir_name(tp_rank, pp_rank, d.pp, ep_rank, d.ep)
        local rank = d.ranks[name]
        if type(rank) ~= 'table' then error(string.format('checkpoint: %s does not list rank directory %s (%s)', path, name, sizes), 0) end
        if not io_.is_dir(io_.join(root, name)) then
          error(string.format('checkpoint: %s is missing (%s lists it: %s)', io_.join(root, name), M.FILE, sizes), 0)
        end
        for _, file in ipairs(rank.files or {}) do
          if not io_.is_file(io_.join(root, name, file)) then
            error(string.format('checkpoint: %s is missing (%s lists it)', io_.join(root, name, file), M.FILE), 0)
          end
        end
      end
    end
  end
  local count = 0
  for _ in pairs(d.ranks) do count = count + 1 end
  for _, entry in ipairs(io_.listdir(root)) do
    if entry:match('^mp_rank_') and not d.ranks[entry] then
      error(string.format('checkpoint: %s is not in %s (%s)', io_.join(root, entry), M.FILE, sizes), 0)
    end
  end
  if count ~= d.tp * d.pp * d.ep then
    error(string.format('checkpoint: %s lists %d rank directories for %s', path, count, sizes), 0)
  end
  return d
end

-- Checks file `relative` (a path under the iteration directory root) against the checksum the save
-- recorded in the description, reading it whole: a block zeroed or changed on disk is found here,
-- before any of its tensors is used. Checkpoints saved before checksums were recorded have none.
function M.verify(d, root, relative)
  if d.checksums == nil then return end
  local path = io_.join(root, relative)
  local want = d.checksums[relative]
  if type(want) ~= 'string' then
    error(string.format('checkpoint: %s records no checksum for %s', io_.join(root, M.FILE), path), 0)
  end
  local got = io_.checksum(path)
  if got ~= want then
    error(string.format('checkpoint: %s is corrupted: its checksum is %s, but %s recorded %s when it was saved',
      path, got, M.FILE, want), 0)
  end
end

-- Checks a rank directory's model file (its safetensors header) against what the description lists.
function M.check_tensors(d, rank_name, model_path, tensors)
  for key, want in pairs(d.ranks[rank_name].tensors) do
    local t = tensors[key]
    if not t then error(string.format('checkpoint: %s lacks %s (%s lists it)', model_path, key, M.FILE), 0) end
    if shape_string(t.shape) ~= shape_string(want.shape) then
      error(string.format('checkpoint: %s: %s is %s, %s lists %s', model_path, key, shape_string(t.shape), M.FILE,
        shape_string(want.shape)), 0)
    end
  end
end

return M
