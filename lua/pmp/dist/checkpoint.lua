-- Checkpoints of a parallel layout in Megatron-LM's per-rank directories (../shared/FORMATS.md §3),
-- and resharding when they are loaded into another layout.
--
--   local dcp = require 'pmp.dist.checkpoint'
--   dcp.save(dir, iteration, model, optimizer, state)   -- every rank; model: this rank's TP part / PP stage
--   local info = dcp.load(dir, model, optimizer)         -- every rank; any saved layout loads into any other
--
--   DIR/latest_checkpointed_iteration.txt
--   DIR/iter_0000100/mp_rank_TT/ (PP = 1) or mp_rank_TT_PPP/ (PP > 1), one per model-parallel rank,
--     written by the first data-parallel replica of that rank:
--       model_optim_rng.safetensors   model.<name>: this TP rank's part of the stage's tensors, layers
--                                     numbered from 0 on each stage as Megatron numbers them (with
--                                     virtual pipeline stages model<v>.<name> for chunk v, numbered
--                                     from 0 in each chunk: Megatron's model0, model1, ...);
--                                     optimizer.<name>.<slot>: a replicated optimizer's state, same cut
--       model_optim_rng.json          iteration, state (the caller's: data position, args, ...), the RNG
--                                     state of every data-parallel replica, optimizer hyperparameters
--                                     and steps, and `layout`: tp, pp, dp, cp, this directory's
--                                     tp_rank/pp_rank, the stages' layer ranges (or their chunks'),
--                                     whether the optimizer was distributed, and the model config
--       distrib_optim_DDD.safetensors with the distributed optimizer, one per replica DDD: <name>.<slot>
--                                     holds the DDD-th of optimizer_shards even pieces of the flattened
--                                     state of <name> (so each replica writes 1/dp of the state)
--
-- Saving goes to a temporary iteration directory that rank 0 creates; after every rank has written
-- (an all-reduce of everybody's success is the barrier) rank 0 renames it into place and only then
-- rewrites the tracker, so a save killed at any point leaves the previous checkpoint the latest.
-- Loading cuts each parameter out of the saved shards: the TP parts of a tensor are joined with
-- pmp.dist.sharding.unshard and this rank's part cut with shard; layers are found on the stage that
-- held them and renumbered. Optimizer moments and master weights have their parameter's shape and are
-- resharded the same way. Nothing is computed, so a resharded load is bit-identical to the original.
-- A checkpoint written by pmp.checkpoint.save (one process) loads like one of TP = PP = 1, without
-- its optimizer state (that is stored by position, not by parameter name).
local ffi = require 'ffi'
local tensor = require 'pmp.tensor'
local io_ = require 'pmp.io'
local json = require 'pmp.json'
local safetensors = require 'pmp.safetensors'
local checkpoint = require 'pmp.checkpoint'
local sharding = require 'pmp.dist.sharding'
local pipeline = require 'pmp.dist.pipeline'

local M = {}

local TRACKER = checkpoint.TRACKER
local MODEL_FILE, INFO_FILE = 'model_optim_rng.safetensors', 'model_optim_rng.json'
local SLOTS = { 'exp_avg', 'exp_avg_sq', 'master' }

local function dist() return require 'pmp.dist' end

function M.iteration_root(dir, iteration) return io_.join(dir, string.format('iter_%07d', iteration)) end

-- 'mp_rank_TT' when pp is 1, else 'mp_rank_TT_PPP' (ranks 0-based).
function M.rank_dir_name(tp_rank, pp_rank, pp)
  if pp == 1 then return string.format('mp_rank_%02d', tp_rank) end
  return string.format('mp_rank_%02d_%03d', tp_rank, pp_rank)
end

function M.optimizer_file_name(shard) return string.format('distrib_optim_%03d.safetensors', shard) end

-- Elements [first, last) of a flattened tensor of numel elements held by piece `index` of `count`.
local function piece_range(numel, index, count)
  return math.floor(index * numel / count), math.floor((index + 1) * numel / count)
end

local function shape_string(shape) return '[' .. table.concat(shape, ',') .. ']' end

---------------------------------------------------------------------------------------------------
-- The model's place in the layout

-- This rank's stage {first = global layer offset, count}, or with virtual pipeline stages (a
-- pmp.dist.pipeline.Chunks) {chunks = {first, count} of each chunk}, after checking that the model was
-- cut for the layout (a model left whole would be saved as if it were one part).
local function model_stage(model, layout, op)
  local chunks = pipeline.chunks(model)
  local p, tp = chunks[1].pipeline, chunks[1].tensor_parallel
  if #chunks == 1 and p and (p.virtual_stages or 1) > 1 then
    error(op .. ': the model is one chunk of a pmp.dist.pipeline.Chunks; pass the Chunks', 3)
  end
  if layout.pp > 1 and (not p or p.stages ~= layout.pp) then
    error(string.format('%s: the layout has pp=%d but the model is %s (pmp.dist.pipeline.stage makes the stage)', op,
      layout.pp, p and ('stage ' .. p.stage .. ' of ' .. p.stages) or 'not a pipeline stage'), 3)
  end
  if layout.tp > 1 and (not tp or tp.group.size ~= layout.tp) then
    error(string.format('%s: the layout has tp=%d but the model is %s (pmp.nn.parallel.tensor_parallel splits it)', op,
      layout.tp, tp and ('split ' .. tp.group.size .. ' ways') or 'not tensor parallel'), 3)
  end
  if layout.ep > 1 then error(op .. ': expert-parallel checkpoints (ep > 1) are not supported', 3) end
  if #chunks > 1 then
    local ranges = {}
    for v, chunk in ipairs(chunks) do
      ranges[v] = { first = chunk.pipeline.layer_offset, count = chunk.pipeline.num_layers }
    end
    return { chunks = ranges }
  end
  if p and layout.pp > 1 then return { first = p.layer_offset, count = p.num_layers } end
  return { first = 0, count = model.config.num_layers }
end

-- The tensor key of a model parameter in the model file: 'model.<name>' for a stage, and the name
-- itself, 'model<v>.<name in chunk v>', for the chunks of virtual stages (Megatron's model0, model1).
local function model_key(name)
  if name:match('^model%d+%.') then return name end
  return 'model.' .. name
end

-- The global parameter name (whole-model layer numbering) of a stage's parameter.
local function global_name(name, stage)
  local v, inner = name:match('^model(%d+)%.(.*)$')
  if v then return sharding.shift_layer(inner, stage.chunks[tonumber(v) + 1].first) end
  return sharding.shift_layer(name, stage.first)
end

-- The address of a tensor's storage handle: the optimizer and the model hold the same tensors.
local function tensor_key(t) return tostring(ffi.cast('uintptr_t', t.ptr)) end

-- The names (model state_dict keys) of a replicated optimizer's parameters, in its order.
local function optimizer_param_names(model, optimizer, op)
  local names = {}
  for name, t in pairs(model:state_dict()) do names[tensor_key(t)] = name end
  local out = {}
  for k, s in ipairs(optimizer.state or {}) do
    out[k] = s.param and names[tensor_key(s.param)]
    if not out[k] then error(string.format('%s: optimizer parameter %d is not a parameter of the model', op, k), 3) end
  end
  return out
end

-- The optimizer state keyed by parameter name: {lr, betas, eps, weight_decay, step, params = {[name] =
-- {step, exp_avg, exp_avg_sq, master}}}. A distributed optimizer (pmp.optim.DistributedOptimizer) gives
-- it through full_state() (a collective over its data-parallel group), with one step for all
-- parameters; a replicated one (AdamW) through its state_dict, with a step per parameter.
local function named_optimizer_state(model, optimizer)
  if optimizer.full_state then return optimizer:full_state() end
  local names = optimizer_param_names(model, optimizer, 'checkpoint.save')
  local sd = optimizer:state_dict()
  local out = { lr = sd.lr, betas = sd.betas, eps = sd.eps, weight_decay = sd.weight_decay, params = {} }
  for k, s in ipairs(sd.state) do
    out.params[names[k]] = { step = s.step, exp_avg = s.exp_avg, exp_avg_sq = s.exp_avg_sq, master = s.master }
  end
  return out
end

---------------------------------------------------------------------------------------------------
-- Small collectives over plain numbers and strings

local function f64(values) return tensor.tensor(values, { dtype = 'f64' }) end

-- Everybody's stage (as model_stage gives it), in pipeline order. Every stage has as many chunks.
local function gather_stages(stage)
  local ranges, mine = stage.chunks or { stage }, {}
  for _, r in ipairs(ranges) do
    mine[#mine + 1] = r.first
    mine[#mine + 1] = r.count
  end
  local all = dist().group('pp'):all_gather(f64(mine)):totable()
  local out = {}
  for s = 1, #all / #mine do
    local list = {}
    for v = 1, #ranges do
      local at = (s - 1) * #mine + 2 * (v - 1)
      list[v] = { first = all[at + 1], count = all[at + 2] }
    end
    out[s] = stage.chunks and { chunks = list } or list[1]
  end
  return out
end

-- The RNG state of every replica of this model-parallel rank (the 'dp_cp' group), in group order, as
-- pmp.checkpoint.rng_state gives it. The 64-bit words travel as exact 32-bit halves.
local function gather_rng()
  local halves = {}
  for _, word in ipairs(checkpoint.rng_state()) do
    halves[#halves + 1] = tonumber(word:sub(1, 8), 16)
    halves[#halves + 1] = tonumber(word:sub(9, 16), 16)
  end
  local all = dist().group('dp_cp'):all_gather(f64(halves)):totable()
  local out = {}
  for r = 1, #all / 8 do
    local words = {}
    for k = 1, 4 do words[k] = string.format('%08x%08x', all[8 * (r - 1) + 2 * k - 1], all[8 * (r - 1) + 2 * k]) end
    out[r] = words
  end
  return out
end

-- 0 when every rank of group succeeded, else 1 + the highest failing rank.
local function agree(group, ok)
  return group:all_reduce(f64({ ok and 0 or group.rank + 1 }), 'max'):item()
end

-- Rank 0's text (nil: none) on every rank.
local function broadcast_text(group, text)
  local n = group:broadcast(f64({ text and #text or -1 }), 0):item()
  if n < 0 then return nil end
  if n == 0 then return '' end
  local bytes = group.rank == 0 and { text:byte(1, -1) } or {}
  if group.rank ~= 0 then for k = 1, n do bytes[k] = 0 end end
  return string.char(unpack(group:broadcast(f64(bytes), 0):totable()))
end

---------------------------------------------------------------------------------------------------
-- save

-- The files this rank writes: a list of {dir = 'mp_rank_..', name, tensors or text}.
local function rank_files(layout, model, stages, rngs, opt, state, iteration)
  local files = {}
  local dir = M.rank_dir_name(layout.tp_rank, layout.pp_rank, layout.pp)
  local distributed = opt ~= nil and opt.distributed
  local replica = dist().group('dp_cp')
  if distributed then
    local tensors = {}
    for name, s in pairs(opt.params) do
      for _, slot in ipairs(SLOTS) do
        local t = s[slot]
        if t then
          local first, last = piece_range(t:numel(), replica.rank, replica.size)
          if last > first then tensors[name .. '.' .. slot] = t:reshape(-1):narrow(1, first + 1, last - first) end
        end
      end
    end
    files[#files + 1] = { dir = dir, name = M.optimizer_file_name(replica.rank), tensors = tensors }
  end
  if replica.rank ~= 0 then return files end
  local tensors = {}
  for name, t in pairs(model:state_dict()) do tensors[model_key(name)] = t end
  local info = {
    iteration = iteration, state = state or {}, rng = rngs,
    layout = { tp = layout.tp, pp = layout.pp, dp = layout.dp, cp = layout.cp, tp_rank = layout.tp_rank,
      pp_rank = layout.pp_rank, stages = stages, distributed_optimizer = distributed or false,
      optimizer_shards = distributed and replica.size or nil, model_config = model.config },
  }
  if opt then
    info.optimizer = { lr = opt.lr, betas = opt.betas, eps = opt.eps, weight_decay = opt.weight_decay, step = opt.step,
      steps = {} }
    for name, s in pairs(opt.params) do
      info.optimizer.steps[name] = s.step or opt.step
      if not distributed then
        for _, slot in ipairs(SLOTS) do
          if s[slot] then tensors['optimizer.' .. name .. '.' .. slot] = s[slot] end
        end
      end
    end
  end
  files[#files + 1] = { dir = dir, name = MODEL_FILE, tensors = tensors }
  files[#files + 1] = { dir = dir, name = INFO_FILE, text = json.encode(info) }
  return files
end

local function write_files(root, files)
  for _, f in ipairs(files) do
    local path = io_.join(root, f.dir, f.name)
    if f.text then io_.write_atomic(path, f.text) else safetensors.save(path, f.tensors, { format = 'pt' }) end
  end
end

-- Saves this rank's part of model (and optimizer) plus the JSON-able `state` for `iteration`. Every
-- rank of the world calls it with its own part; model is the rank's pipeline stage / tensor-parallel
-- part as pmp.dist.pipeline.stage and pmp.nn.parallel.tensor_parallel leave it. optimizer: nil, a
-- replicated one (AdamW over the model's parameters) or a distributed one (with full_state()).
-- Returns the iteration directory; raises on every rank if any rank failed, naming the failing rank.
function M.save(dir, iteration, model, optimizer, state)
  local layout = dist().layout()
  local stage = model_stage(model, layout, 'checkpoint.save')
  local world = dist().group('world')
  -- the collectives, in the same order everywhere
  local stages = gather_stages(stage)
  local rngs = gather_rng()
  local opt = optimizer and named_optimizer_state(model, optimizer)
  if opt then opt.distributed = optimizer.full_state ~= nil end
  local made, files = pcall(rank_files, layout, model, stages, rngs, opt, state, iteration)

  local root = M.iteration_root(dir, iteration)
  local mine = not made and tostring(files) or nil   -- this rank's own failure
  local function write_mine(tmp)
    if made then
      local ok, err = pcall(write_files, tmp, files)
      if not ok then mine = tostring(err) end
    end
    return agree(world, mine == nil)
  end
  -- Rank 0 makes the temporary directory and tells everybody its path (nil: it could not), all write,
  -- agree, rank 0 renames and updates the tracker, then tells everybody the outcome ('' = success).
  local outcome
  if world.rank == 0 then
    local announced, code = false, 0
    local ok, err = pcall(function()
      io_.mkdir_p(dir)
      io_.replace_dir_atomic(root, function(tmp)
        for tp_rank = 0, layout.tp - 1 do
          for pp_rank = 0, layout.pp - 1 do io_.mkdir_p(io_.join(tmp, M.rank_dir_name(tp_rank, pp_rank, layout.pp))) end
        end
        broadcast_text(world, tmp)
        announced = true
        code = write_mine(tmp)
        if code ~= 0 then error('a rank could not write', 0) end   -- removes the temporary directory
      end)
      io_.write_atomic(io_.join(dir, TRACKER), tostring(iteration) .. '\n')
    end)
    if not announced then broadcast_text(world, nil) end
    if code ~= 0 then
      outcome = mine and 'rank 0: ' .. mine or string.format('rank %d could not write its files (see its error)', code - 1)
    elseif not ok then
      mine = tostring(err):gsub('^[^%s:]+%.lua:%d+: ', '')
      outcome = 'rank 0: ' .. mine
    else
      outcome = ''
    end
    broadcast_text(world, outcome)
  else
    local tmp = broadcast_text(world, nil)
    if tmp then write_mine(tmp) end
    outcome = broadcast_text(world, nil)
  end
  if mine then error(string.format('checkpoint.save: %s: rank %d: %s', root, world.rank, mine), 0) end
  if outcome ~= '' then error(string.format('checkpoint.save: %s: %s', root, outcome), 0) end
  return root
end

---------------------------------------------------------------------------------------------------
-- load

local function read_json(path)
  local ok, value = pcall(json.decode, io_.read_file(path))
  if not ok then error(string.format('checkpoint: %s: %s', path, tostring(value)), 0) end
  return value
end

-- The layout a checkpoint was saved with; one written by pmp.checkpoint.save reads as TP = PP = 1.
local function saved_layout(info)
  if info.layout then return info.layout end
  return { tp = 1, pp = 1, dp = 1, cp = 1, tp_rank = 0, pp_rank = 0, stages = { { first = 0 } }, single_process = true,
    model_config = type(info.state) == 'table' and info.state.model_config or nil }
end

-- The RNG state saved for replica r (1-based) of a shard (pmp.checkpoint.save keeps the one there is).
local function replica_rng(info, r)
  if type(info.rng[1]) == 'string' then return info.rng end
  return info.rng[r]
end

-- The info table (iteration, state, rng, optimizer hyperparameters, layout) of the first shard
-- directory of `iteration` (default: the latest), without reading any tensor: what a recipe needs
-- before it builds the model (layout.model_config, the data position in state). Also returns the
-- iteration directory.
function M.info(dir, iteration)
  iteration = iteration or checkpoint.latest_iteration(dir)
  if not iteration then error('checkpoint: no ' .. TRACKER .. ' in ' .. dir, 0) end
  local root = M.iteration_root(dir, iteration)
  for _, name in ipairs({ 'mp_rank_00', 'mp_rank_00_000' }) do
    local path = io_.join(root, name, INFO_FILE)
    if io_.exists(path) then
      local info = read_json(path)
      info.layout = saved_layout(info)
      return info, root
    end
  end
  error(string.format('checkpoint: %s has neither mp_rank_00/%s nor mp_rank_00_000/%s', root, INFO_FILE, INFO_FILE), 0)
end

-- The saved shards of one iteration directory, each read (memory-mapped) once, when first needed.
local Source = {}
Source.__index = Source

local function open_source(dir, iteration)
  local info, root = M.info(dir, iteration)
  return setmetatable({ root = root, info = info, layout = info.layout, shards = {} }, Source)
end

-- The shard directory of stage s (1-based) and TP rank r (0-based): {dir, info, tensors}, its
-- recorded place checked against its name.
function Source:shard(s, r)
  local key = s .. ':' .. r
  if self.shards[key] then return self.shards[key] end
  local L = self.layout
  local dir = io_.join(self.root, M.rank_dir_name(r, s - 1, L.pp))
  local info_path, model_path = io_.join(dir, INFO_FILE), io_.join(dir, MODEL_FILE)
  for _, path in ipairs({ info_path, model_path }) do
    if not io_.is_file(path) then
      error(string.format('checkpoint: %s is missing (the checkpoint was saved with tp=%d pp=%d)', path, L.tp, L.pp), 0)
    end
  end
  local info = read_json(info_path)
  local got = saved_layout(info)
  if got.tp ~= L.tp or got.pp ~= L.pp or got.tp_rank ~= r or got.pp_rank ~= s - 1 then
    error(string.format('checkpoint: %s records tp_rank %d pp_rank %d of tp=%d pp=%d, but its directory holds tp_rank %d ' ..
      'pp_rank %d of tp=%d pp=%d', info_path, got.tp_rank, got.pp_rank, got.tp, got.pp, r, s - 1, L.tp, L.pp), 0)
  end
  local shard = { dir = dir, model_path = model_path, info = info, tensors = safetensors.load(model_path) }
  self.shards[key] = shard
  return shard
end

-- global parameter name -> {stage, name (the stage's own numbering), global}, from the first TP
-- rank's shard of every stage.
function Source:index()
  if self.names then return self.names end
  local names = {}
  for s, st in ipairs(self.layout.stages) do
    for key in pairs(self:shard(s, 0).tensors) do
      local name = key:match('^model%.(.*)$') or (key:match('^model%d+%.') and key)
      if name then
        local global = global_name(name, st)
        names[global] = names[global] or { stage = s, name = name, global = global }
      end
    end
  end
  self.names = names
  return names
end

-- Where the tensor of global name `global` is saved. With tied embeddings the last stage's output
-- layer is a copy of the word embeddings, which is where a checkpoint of one stage keeps it.
function Source:find(global, config)
  local index = self:index()
  local entry = index[global]
  if not entry and global == 'output_layer.weight' and config.tie_embeddings then
    entry = index['embedding.word_embeddings.weight']
  end
  if not entry then
    error(string.format('checkpoint: %s holds no model.%s on any stage (saved with tp=%d pp=%d)', self.root, global,
      self.layout.tp, self.layout.pp), 0)
  end
  return entry
end

-- Part `rank` of `tp` of the saved tensor at entry, read from each TP shard by read(shard, name)
-- (nil where the shard has none). Same TP size: the rank's own shard, as saved.
function Source:part(entry, read, tp, rank, config)
  local L = self.layout
  local same = L.tp == tp
  if not sharding.rule(entry.global, config) then return read(self:shard(entry.stage, same and rank or 0), entry.name) end
  if same then return read(self:shard(entry.stage, rank), entry.name) end
  local parts = {}
  for r = 0, L.tp - 1 do
    local shard = self:shard(entry.stage, r)
    parts[r + 1] = read(shard, entry.name)
    if (parts[r + 1] == nil) ~= (parts[1] == nil) then
      error(string.format('checkpoint: %s and %s disagree on whether %s has this tensor', self:shard(entry.stage, 0).dir,
        shard.dir, entry.name), 0)
    end
  end
  if parts[1] == nil then return nil end
  return sharding.shard(entry.global, sharding.unshard(entry.global, parts, config), config, tp, rank)
end

local function read_model(shard, name)
  local t = shard.tensors[model_key(name)]
  if not t then error(string.format('checkpoint: %s lacks %s', shard.model_path, model_key(name)), 0) end
  return t
end

-- The distributed optimizer's pieces of a shard directory, read once.
function Source:pieces(shard)
  if shard.pieces then return shard.pieces end
  local count = self.layout.optimizer_shards
  shard.pieces = {}
  for i = 0, count - 1 do
    local path = io_.join(shard.dir, M.optimizer_file_name(i))
    if not io_.is_file(path) then
      error(string.format('checkpoint: %s is missing (the distributed optimizer was saved in %d pieces)', path, count), 0)
    end
    shard.pieces[i + 1] = { path = path, tensors = safetensors.load(path) }
  end
  return shard.pieces
end

-- A reader of optimizer slot `slot` (nil where it was not saved, as master weights of f32 parameters).
function Source:slot_reader(slot)
  if not self.layout.distributed_optimizer then
    return function(shard, name) return shard.tensors['optimizer.' .. name .. '.' .. slot] end
  end
  return function(shard, name)
    local pieces = self:pieces(shard)
    local shape = read_model(shard, name).shape
    local numel = 1
    for _, n in ipairs(shape) do numel = numel * n end
    local key = name .. '.' .. slot
    local parts, found, lacking = {}, false, nil
    for i, piece in ipairs(pieces) do
      local first, last = piece_range(numel, i - 1, #pieces)
      if last > first then
        local t = piece.tensors[key]
        if t then
          if t:numel() ~= last - first then
            error(string.format('checkpoint: %s: %s has %d elements, its piece of %s %s is %d', piece.path, key, t:numel(),
              name, shape_string(shape), last - first), 0)
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

local function check_shape(got, want, what, source, entry)
  if shape_string(got.shape) ~= shape_string(want.shape) then
    local L = source.layout
    error(string.format('checkpoint: %s is %s in the checkpoint but %s in the model (saved as %s in %s%s)', what,
      shape_string(got.shape), shape_string(want.shape), entry.name,
      io_.join(source.root, M.rank_dir_name(0, entry.stage - 1, L.pp)), L.tp > 1 and ' and its other tp ranks' or ''), 0)
  end
end

local function same_stages(a, b)
  if #a ~= #b then return false end
  for s = 1, #a do
    local x, y = a[s].chunks or { a[s] }, b[s].chunks or { b[s] }
    if #x ~= #y then return false end
    for v = 1, #x do
      if x[v].first ~= y[v].first or x[v].count ~= y[v].count then return false end
    end
  end
  return true
end

-- Reads and cuts everything this rank loads, without changing model or optimizer yet.
local function prepare(dir, iteration, model, optimizer, layout, stage, stages)
  local source = open_source(dir, iteration)
  local L, config = source.layout, model.config
  local own = model:state_dict()
  local out = { values = {}, info = source.info }

  local names = {}
  for name in pairs(own) do names[#names + 1] = name end
  table.sort(names)   -- the same first error on every run
  for _, name in ipairs(names) do
    local t = own[name]
    local entry = source:find(global_name(name, stage), config)
    local value = source:part(entry, read_model, layout.tp, layout.tp_rank, config)
    check_shape(value, t, model_key(name), source, entry)
    out.values[name] = value
  end

  if optimizer then
    if L.single_process then
      error(string.format('checkpoint: %s was written by pmp.checkpoint.save, which stores the optimizer state by ' ..
        'position; load it without an optimizer', source.root), 0)
    end
    if not source.info.optimizer then error('checkpoint: ' .. source.root .. ' was saved without optimizer state', 0) end
    local saved = source.info.optimizer
    local state = { lr = saved.lr, betas = saved.betas, eps = saved.eps, weight_decay = saved.weight_decay,
      step = saved.step, params = {} }
    local opt_names
    if optimizer.load_full_state then
      opt_names = {}
      for k, pair in ipairs(model:named_parameters()) do opt_names[k] = pair[1] end
    else
      opt_names = optimizer_param_names(model, optimizer, 'checkpoint.load')
    end
    for _, name in ipairs(opt_names) do
      local entry = source:find(global_name(name, stage), config)
      local shard = source:shard(entry.stage, 0)
      local step = shard.info.optimizer and shard.info.optimizer.steps[entry.name]
      if step == nil then
        error(string.format('checkpoint: %s has no optimizer state for %s', io_.join(shard.dir, INFO_FILE), entry.name), 0)
      end
      local s = { step = step }
      for _, slot in ipairs(SLOTS) do
        local value = source:part(entry, source:slot_reader(slot), layout.tp, layout.tp_rank, config)
        if value then
          check_shape(value, own[name], 'the optimizer ' .. slot .. ' of ' .. name, source, entry)
        elseif slot ~= 'master' then
          error(string.format('checkpoint: %s lacks the optimizer %s of %s', shard.dir, slot, entry.name), 0)
        end
        s[slot] = value
      end
      state.params[name] = s
      -- a distributed optimizer counts one step for all: that of the most stepped parameter
      if not saved.step then state.step = math.max(state.step or 0, step) end
    end
    out.optimizer = state
    out.optimizer_names = opt_names
  end

  -- Each replica's own RNG stream when the layout is the one saved; otherwise the streams do not
  -- correspond and every rank takes that of the first rank.
  local same = L.tp == layout.tp and L.pp == layout.pp and L.dp == layout.dp and L.cp == layout.cp
    and same_stages(L.stages, stages)
  out.info.resharded = not same
  if same then
    out.rng = replica_rng(source:shard(layout.pp_rank + 1, layout.tp_rank).info, dist().group('dp_cp').rank + 1)
  else
    out.rng = replica_rng(source.info, 1)
  end
  return out
end

-- Loads a checkpoint saved with any layout into this rank's part of model (and optimizer), restores
-- the RNG and returns the info table: iteration, state, layout (the saved one), resharded (whether
-- the layout differs from the current one). Every rank of the world calls it; if any rank cannot load,
-- all raise (the failing one with the reason) and nothing is changed. iteration: default the latest.
function M.load(dir, model, optimizer, iteration)
  local layout = dist().layout()
  local stage = model_stage(model, layout, 'checkpoint.load')
  local stages = gather_stages(stage)   -- collectives stay outside what may fail on one rank only
  local world = dist().group('world')
  local ok, prepared = pcall(prepare, dir, iteration, model, optimizer, layout, stage, stages)
  local code = agree(world, ok)
  if not ok then error(tostring(prepared), 0) end
  if code ~= 0 then error(string.format('checkpoint.load: %s: rank %d could not load (see its error)', dir, code - 1), 0) end
  model:load_state_dict(prepared.values)
  if optimizer then
    local state = prepared.optimizer
    if optimizer.load_full_state then
      optimizer:load_full_state(state)
    else
      local sd = { lr = state.lr, betas = state.betas, eps = state.eps, weight_decay = state.weight_decay, state = {} }
      for k, name in ipairs(prepared.optimizer_names) do sd.state[k] = state.params[name] end
      optimizer:load_state_dict(sd)
    end
  end
  checkpoint.set_rng_state(prepared.rng)
  return prepared.info
end

return M
