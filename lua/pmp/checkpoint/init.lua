-- Checkpoints of any parallel layout (one process included) in Megatron-LM's per-rank directories
-- (docs/formats.md §3), loadable into any other layout.
--
--   pmp.checkpoint.save(dir, iteration, model, optimizer, state)   -- every rank; model: its TP part / PP stage
--   local info = pmp.checkpoint.load(dir, model, optimizer)         -- every rank; any saved layout
--   local model, info = pmp.checkpoint.load_model(dir)              -- the whole model in this process
--
--   DIR/latest_checkpointed_iteration.txt
--   DIR/iter_0000100/layout.json      the layout description (pmp.checkpoint.layout): parallel sizes,
--                                     rank directories and their tensors, parameters, dtype, model config
--   DIR/iter_0000100/mp_rank_TT/ (PP = 1) or mp_rank_TT_PPP/ (PP > 1), one per model-parallel rank,
--     written by the first data-parallel replica of that rank:
--       model_optim_rng.safetensors   model.<name>: this TP rank's part of the stage's tensors, layers
--                                     numbered from 0 on each stage as Megatron numbers them (with
--                                     virtual pipeline stages model<v>.<name> for chunk v);
--                                     optimizer.<name>.<slot>: a replicated optimizer's state, same cut
--       model_optim_rng.json          iteration, state (the caller's: data position, args, ...), tp_rank,
--                                     pp_rank, the RNG state of every data- and context-parallel replica,
--                                     optimizer hyperparameters and steps
--       distrib_optim_DDD.safetensors with the distributed optimizer, one per replica DDD: <name>.<slot>
--                                     holds the DDD-th of optimizer_shards even pieces of the flattened
--                                     state of <name> (so each replica writes 1/dp of the state; with
--                                     expert parallelism ep of them into its own directory)
--   With expert parallelism (ep > 1): mp_rank_TT[_PPP]_EEE/, one per expert-parallel rank EEE of each
--   model-parallel rank, written by that rank of the first expert-data-parallel replica: its experts
--   under their global numbers (and their optimizer state); 000's also everything else.
--
-- Saving goes to a temporary iteration directory that rank 0 creates; after every rank has written
-- (an all-reduce of everybody's success is the barrier) rank 0 writes layout.json, renames the
-- directory into place and only then rewrites the tracker, so a save killed at any point leaves the
-- previous checkpoint the latest. Loading reshards (pmp.checkpoint.source): the weights are
-- bit-identical to the saved ones whatever the two layouts, and each is copied straight from the mapped
-- files into its parameter, piece by piece when resharded (no whole tensor, no temporary). The
-- optimizer state of a resharded load is made part by part too, but all of it is held until the
-- optimizer copies it in (one extra copy of the rank's optimizer state). The RNG state is restored per
-- rank when the layout is the saved one; the optimizer state whenever the checkpoint has it by
-- parameter name.
-- What a load could not restore is printed once and listed in info.not_restored.
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local tensor = require 'pmp.tensor'
local io_ = require 'pmp.io'
local json = require 'pmp.json'
local safetensors = require 'pmp.safetensors'
local pipeline = require 'pmp.dist.pipeline'
local layout_file = require 'pmp.checkpoint.layout'
local Source = require 'pmp.checkpoint.source'

local M = {}

M.TRACKER = 'latest_checkpointed_iteration.txt'
local SLOTS = { 'exp_avg', 'exp_avg_sq', 'master' }
local MODEL_FILE, INFO_FILE = layout_file.MODEL_FILE, layout_file.INFO_FILE

local function dist() return require 'pmp.dist' end

function M.iteration_root(dir, iteration) return io_.join(dir, string.format('iter_%07d', iteration)) end

-- The iteration named by the tracker file, or nil when dir holds no checkpoint.
function M.latest_iteration(dir)
  local path = io_.join(dir, M.TRACKER)
  if not io_.exists(path) then return nil end
  local text = io_.read_file(path)
  local iteration = tonumber(text:match('^%s*(%d+)%s*$'))
  if not iteration then error(string.format("checkpoint: %s does not hold an iteration number: '%s'", path, text), 2) end
  return iteration
end

-- The generator state as hex strings (JSON numbers cannot hold 64 bits).
function M.rng_state()
  local words = ffi.new('uint64_t[4]')
  C.pmp_rng_get_state(words)
  local out = {}
  for k = 0, 3 do out[k + 1] = require('bit').tohex(words[k], 16) end
  return out
end

function M.set_rng_state(hex_words)
  local words = ffi.new('uint64_t[4]')
  for k = 1, 4 do
    local v = ffi.new('uint64_t', 0)
    for digit in hex_words[k]:gmatch('%x') do v = v * 16 + tonumber(digit, 16) end
    words[k - 1] = v
  end
  C.pmp_rng_set_state(words)
end

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
  for _, chunk in ipairs(layout.ep > 1 and chunks or {}) do
    local ep = rawget(chunk, 'expert_parallel')
    if (ep and ep.group.size ~= layout.ep) or (not ep and require('pmp.nn.expert_parallel').has_moe_layer(chunk)) then
      error(string.format('%s: the layout has ep=%d but the model is %s (pmp.nn.expert_parallel.expert_parallel splits ' ..
        'its experts)', op, layout.ep, ep and ('split ' .. ep.group.size .. ' ways') or 'not expert parallel'), 3)
    end
  end
  if #chunks > 1 then
    local ranges = {}
    for v, chunk in ipairs(chunks) do
      ranges[v] = { first = chunk.pipeline.layer_offset, count = chunk.pipeline.num_layers }
    end
    return { chunks = ranges }
  end
  if p and layout.pp > 1 then return { first = p.layer_offset, count = p.num_layers } end
  return { first = 0, count = model.config and model.config.num_layers or 0 }
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
-- rng_state gives it. The 64-bit words travel as exact 32-bit halves.
local function gather_rng()
  local halves = {}
  for _, word in ipairs(M.rng_state()) do
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

-- Bytes (numbers) [first, last] of list as a string, in pieces that unpack can take.
local function chars(list, first, last)
  local out = {}
  for at = first, last, 4096 do out[#out + 1] = string.char(unpack(list, at, math.min(at + 4095, last))) end
  return table.concat(out)
end

-- Rank 0's text (nil: none) on every rank.
local function broadcast_text(group, text)
  local n = group:broadcast(f64({ text and #text or -1 }), 0):item()
  if n < 0 then return nil end
  if n == 0 then return '' end
  local bytes = group.rank == 0 and { text:byte(1, -1) } or {}
  if group.rank ~= 0 then for k = 1, n do bytes[k] = 0 end end
  return chars(group:broadcast(f64(bytes), 0):totable(), 1, n)
end

-- Everybody's text, in group order, on every rank.
local function gather_text(group, text)
  local lengths = group:all_gather(f64({ #text })):totable()
  local longest = math.max(1, unpack(lengths))
  local bytes = {}
  for k = 1, longest do bytes[k] = text:byte(k) or 0 end
  local all = group:all_gather(f64(bytes)):totable()
  local out = {}
  for r, n in ipairs(lengths) do out[r] = n > 0 and chars(all, (r - 1) * longest + 1, (r - 1) * longest + n) or '' end
  return out
end

---------------------------------------------------------------------------------------------------
-- save

-- The files this rank writes: a list of {dir = 'mp_rank_..', name, tensors or text}, and the listing
-- of its model file ({tp_rank, pp_rank, ep_rank, tensors = {key = {shape, dtype}}}; nil on a replica
-- that writes none). With expert parallelism the first ep replicas (expert-data-parallel rank 0) write,
-- each its own experts, the first one also the rest.
local function rank_files(layout, model, rngs, opt, state, iteration)
  local files = {}
  local ep_rank = layout.ep_rank or 0
  local dir = layout_file.rank_dir_name(layout.tp_rank, layout.pp_rank, layout.pp, ep_rank, layout.ep)
  local distributed = opt ~= nil and opt.distributed
  local replica = dist().group('dp_cp')
  local function kept(name) return ep_rank == 0 or layout_file.is_expert(name) end
  if distributed then
    -- a directory holds dp x cp pieces of each of its tensors' states, written by the replicas sharing
    -- its expert-parallel rank (all of them without expert parallelism: one piece each), each of which
    -- has the whole states from full_state()
    local writers = dist().group('edp')
    local per_writer = replica.size / writers.size
    for piece = writers.rank * per_writer, (writers.rank + 1) * per_writer - 1 do
      local tensors = {}
      for name, s in pairs(opt.params) do
        for _, slot in ipairs(SLOTS) do
          local t = s[slot]
          if t and kept(name) then
            local first, last = Source.piece_range(t:numel(), piece, replica.size)
            if last > first then tensors[name .. '.' .. slot] = t:reshape(-1):narrow(1, first + 1, last - first) end
          end
        end
      end
      files[#files + 1] = { dir = dir, name = layout_file.optimizer_file_name(piece), tensors = tensors }
    end
  end
  if replica.rank ~= ep_rank then return files end
  local tensors, listing = {}, { tp_rank = layout.tp_rank, pp_rank = layout.pp_rank, ep_rank = ep_rank, tensors = {} }
  for name, t in pairs(model:state_dict()) do
    if kept(name) then
      local key = layout_file.model_key(name)
      tensors[key] = t
      listing.tensors[key] = { shape = t.shape, dtype = t.dtype }
    end
  end
  local info = { iteration = iteration, state = state or {}, rng = rngs, tp_rank = layout.tp_rank,
    pp_rank = layout.pp_rank }
  if opt then
    info.optimizer = { lr = opt.lr, betas = opt.betas, eps = opt.eps, weight_decay = opt.weight_decay, step = opt.step,
      steps = {} }
    for name, s in pairs(opt.params) do
      if kept(name) then info.optimizer.steps[name] = s.step or opt.step end
      if not distributed and kept(name) then
        for _, slot in ipairs(SLOTS) do
          if s[slot] then tensors['optimizer.' .. name .. '.' .. slot] = s[slot] end
        end
      end
    end
  end
  files[#files + 1] = { dir = dir, name = MODEL_FILE, tensors = tensors }
  files[#files + 1] = { dir = dir, name = INFO_FILE, text = json.encode(info) }
  return files, listing
end

-- Writes the files under root; returns their checksums by path relative to root (as the layout
-- description records them; read back from the file, so they are of the bytes that reached it).
local function write_files(root, files)
  local checksums = {}
  for _, f in ipairs(files) do
    local path = io_.join(root, f.dir, f.name)
    if f.text then io_.write_atomic(path, f.text) else safetensors.save(path, f.tensors, { format = 'pt' }) end
    checksums[f.dir .. '/' .. f.name] = io_.checksum(path)
  end
  return checksums
end

-- Saves this rank's part of model (and optimizer) plus the JSON-able `state` for `iteration`. Every
-- rank of the world calls it with its own part (one process: the whole model); model is the rank's
-- pipeline stage / tensor-parallel part as pmp.dist.pipeline.stage and pmp.nn.parallel.tensor_parallel
-- leave it. optimizer: nil, a replicated one (AdamW over the model's parameters) or a distributed one
-- (with full_state()). Returns the iteration directory; raises on every rank if any rank failed,
-- naming the failing rank.
function M.save(dir, iteration, model, optimizer, state)
  local layout = dist().layout()
  local stage = model_stage(model, layout, 'checkpoint.save')
  local world = dist().group('world')
  -- the collectives, in the same order everywhere
  local stages = gather_stages(stage)
  local rngs = gather_rng()
  local opt = optimizer and named_optimizer_state(model, optimizer)
  if opt then opt.distributed = optimizer.full_state ~= nil end
  local made, files, listing = pcall(rank_files, layout, model, rngs, opt, state, iteration)
  local listings = gather_text(world, made and listing and json.encode(listing) or '')

  local root = M.iteration_root(dir, iteration)
  local mine = not made and tostring(files) or nil   -- this rank's own failure
  -- Returns the agreement code and, when all succeeded, every rank's checksums (JSON texts).
  local function write_mine(tmp)
    local checksums = {}
    if made then
      local ok, result = pcall(write_files, tmp, files)
      if ok then checksums = result else mine = tostring(result) end
    end
    local code = agree(world, mine == nil)
    if code ~= 0 then return code end
    return code, gather_text(world, json.encode(checksums))
  end
  -- Rank 0 makes the temporary directory and tells everybody its path (nil: it could not), all write,
  -- agree, rank 0 describes the layout, renames and updates the tracker, then tells everybody the
  -- outcome ('' = success).
  local outcome
  if world.rank == 0 then
    local announced, code = false, 0
    local ok, err = pcall(function()
      io_.mkdir_p(dir)
      -- iter_*.tmp.PID directories and tracker temporaries of killed runs (only rank 0 writes here)
      io_.remove_stale_temporaries(dir)
      io_.replace_dir_atomic(root, function(tmp)
        for tp_rank = 0, layout.tp - 1 do
          for pp_rank = 0, layout.pp - 1 do
            for ep_rank = 0, layout.ep - 1 do
              io_.mkdir_p(io_.join(tmp, layout_file.rank_dir_name(tp_rank, pp_rank, layout.pp, ep_rank, layout.ep)))
            end
          end
        end
        broadcast_text(world, tmp)
        announced = true
        local checksum_texts
        code, checksum_texts = write_mine(tmp)
        if code ~= 0 then error('a rank could not write', 0) end   -- removes the temporary directory
        local parts = {}
        for _, text in ipairs(listings) do
          if text ~= '' then parts[#parts + 1] = json.decode(text) end
        end
        local kind = opt and (opt.distributed and 'distributed' or 'replicated') or nil
        local description = layout_file.describe(iteration, layout, stages, parts, model.config, kind)
        description.checksums = {}
        for _, text in ipairs(checksum_texts) do
          for file, sum in pairs(json.decode(text)) do description.checksums[file] = sum end
        end
        io_.write_atomic(io_.join(tmp, layout_file.FILE), json.encode(description))
      end)
      io_.write_atomic(io_.join(dir, M.TRACKER), tostring(iteration) .. '\n')
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

-- The info table of `iteration` (default: the latest) without reading any tensor: what a recipe needs
-- before it builds the model. Fields: iteration, state (the saver's), layout (the description,
-- pmp.checkpoint.layout: tp, pp, dp, cp, model_config, dtype, ...). The directory is checked against
-- its layout description. Also returns the iteration directory.
function M.info(dir, iteration)
  iteration = iteration or M.latest_iteration(dir)
  if not iteration then error('checkpoint: no ' .. M.TRACKER .. ' in ' .. dir, 0) end
  local root = M.iteration_root(dir, iteration)
  if not io_.is_dir(root) then error(string.format('checkpoint: %s is missing (%s names it)', root, M.TRACKER), 0) end
  local description = layout_file.read(root)
  local first_rank = layout_file.rank_dir_name(0, 0, description.pp, 0, description.ep)
  layout_file.verify(description, root, first_rank .. '/' .. INFO_FILE)
  local info = layout_file.read_json(io_.join(root, first_rank, INFO_FILE))
  info.layout = description
  return info, root
end

-- The RNG state saved for replica r (1-based) of a shard (an earlier single-process save kept one).
local function replica_rng(info, r)
  if type(info.rng[1]) == 'string' then return info.rng end
  return info.rng[r]
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

local function layout_string(L)
  local out = string.format('tp=%d pp=%d cp=%d dp=%d', L.tp, L.pp, L.cp, L.dp)
  if (L.ep or 1) > 1 then out = out .. ' ep=' .. L.ep end
  if (L.virtual_stages or 1) > 1 then out = out .. ' virtual=' .. L.virtual_stages end
  return out
end

-- The optimizer state of an earlier single-process checkpoint, stored by position in the optimizer:
-- it maps onto a replicated optimizer of one process built the same way, parameter k to parameter k.
local function positional_optimizer_state(source, model, optimizer, own)
  local shard = source:shard(1, 0)
  local saved = shard.info.optimizer
  local names = optimizer_param_names(model, optimizer, 'checkpoint.load')
  if #saved.steps ~= #names then
    error(string.format('checkpoint: %s holds the state of %d optimizer parameters, the optimizer has %d', shard.dir,
      #saved.steps, #names), 0)
  end
  local state = { lr = saved.lr, betas = saved.betas, eps = saved.eps, weight_decay = saved.weight_decay, params = {} }
  for k, name in ipairs(names) do
    local s = { step = saved.steps[k] }
    for _, slot in ipairs(SLOTS) do
      local key = string.format('optimizer.%d.%s', k, slot)
      s[slot] = shard.tensors[key]
      if s[slot] then
        source:check_shape(s[slot], own[name], key .. ' (the optimizer ' .. slot .. ' of ' .. name .. ')',
          { name = key, stage = 1 })
      elseif slot ~= 'master' then
        error(string.format('checkpoint: %s lacks %s', shard.model_path, key), 0)
      end
    end
    state.params[name] = s
  end
  return state, names
end

-- The optimizer state by parameter name, cut for this rank.
local function named_saved_state(source, model, optimizer, own, layout, stage, config)
  local saved = source:shard(1, 0).info.optimizer
  local state = { lr = saved.lr, betas = saved.betas, eps = saved.eps, weight_decay = saved.weight_decay,
    step = saved.step, params = {} }
  local names
  if optimizer.load_full_state then
    names = {}
    for k, pair in ipairs(model:named_parameters()) do names[k] = pair[1] end
  else
    names = optimizer_param_names(model, optimizer, 'checkpoint.load')
  end
  for _, name in ipairs(names) do
    local entry = source:find(layout_file.global_name(name, stage), config)
    local shard = source:shard(entry.stage, 0, entry.ep)
    local step = shard.info.optimizer and shard.info.optimizer.steps[entry.name]
    if step == nil then
      error(string.format('checkpoint: %s has no optimizer state for %s', io_.join(shard.dir, INFO_FILE), entry.name), 0)
    end
    local s = { step = step }
    for _, slot in ipairs(SLOTS) do
      local value = source:part(entry, source:slot_reader(slot), layout.tp, layout.tp_rank, config)
      if value then
        source:check_shape(value, own[name], 'the optimizer ' .. slot .. ' of ' .. name, entry)
      elseif slot ~= 'master' then
        error(string.format('checkpoint: %s lacks the optimizer %s of %s', shard.dir, slot, entry.name), 0)
      end
      s[slot] = value
    end
    state.params[name] = s
    -- a distributed optimizer counts one step for all: that of the most stepped parameter
    if not saved.step then state.step = math.max(state.step or 0, step) end
  end
  return state, names
end

-- Where each parameter of the model (this rank's part) is saved: a list of {name, entry, param}, after
-- checking every shape from the file headers, without reading a weight.
local function locate_weights(source, model, stage, tp, config)
  local own, out = model:state_dict(), {}
  local names = {}
  for name in pairs(own) do names[#names + 1] = name end
  table.sort(names)   -- the same first error on every run
  for _, name in ipairs(names) do
    local entry = source:find(layout_file.global_name(name, stage), config)
    source:check_shape({ shape = source:part_shape(entry, tp, config) }, own[name], layout_file.model_key(name), entry)
    out[#out + 1] = { name = name, entry = entry, param = own[name] }
  end
  return out
end

-- Copies the located weights into the parameters one at a time, straight from the mapped files (a
-- resharded one piece by piece): no temporary, each saved tensor read once.
local function copy_weights(source, weights, tp, rank, config)
  require('pmp').no_grad(function()
    for _, w in ipairs(weights) do source:copy_model_part(w.entry, tp, rank, config, w.param) end
  end)
end

-- Locates and checks everything this rank loads and reads the optimizer state, without changing model
-- or optimizer yet.
local function prepare(dir, options, model, optimizer, layout, stage, stages)
  local info, root = M.info(dir, options.iteration)
  local source = Source.open(root, info.layout)
  local L, config = info.layout, model.config or {}
  local own = model:state_dict()
  local out = { source = source, info = info, not_restored = {} }
  out.weights = locate_weights(source, model, stage, layout.tp, config)

  if optimizer then
    if not L.optimizer then error('checkpoint: ' .. root .. ' was saved without optimizer state', 0) end
    if not L.legacy then
      out.optimizer, out.optimizer_names = named_saved_state(source, model, optimizer, own, layout, stage, config)
    elseif layout.world == 1 and not optimizer.load_full_state then
      out.optimizer, out.optimizer_names = positional_optimizer_state(source, model, optimizer, own)
    else
      out.not_restored[#out.not_restored + 1] = 'the optimizer state (an earlier single-process checkpoint stores it ' ..
        'by position, which maps only onto one process with a replicated optimizer)'
    end
  end

  -- Each replica's own RNG stream when the layout is the one saved; otherwise the streams do not
  -- correspond and every rank takes that of the first rank.
  local same = L.tp == layout.tp and L.pp == layout.pp and L.dp == layout.dp and L.cp == layout.cp
    and same_stages(L.stages, stages)
  -- the replicas' RNG streams do not depend on how the experts are split, but the weights are resharded
  info.resharded = not same or (L.ep or 1) ~= layout.ep
  if options.rng ~= false then
    if same then
      out.rng = replica_rng(source:shard(layout.pp_rank + 1, layout.tp_rank).info, dist().group('dp_cp').rank + 1)
    else
      out.rng = replica_rng(source:shard(1, 0).info, 1)
      out.not_restored[#out.not_restored + 1] = string.format('the RNG state of each rank (saved with %s, loaded ' ..
        'into %s: every rank continues the saved first rank\'s stream)', layout_string(L),
        layout_string({ tp = layout.tp, pp = layout.pp, cp = layout.cp, dp = layout.dp, virtual_stages = stage.chunks and #stage.chunks }))
    end
  end
  return out
end

-- Loads a checkpoint saved with any layout into this rank's part of model (and optimizer), restores
-- the RNG and returns the info table (as M.info gives it) with resharded (whether the saved layout
-- differs from this one) and not_restored (what could not be restored, also printed once by rank 0).
-- Every rank of the world calls it; if any rank cannot load, all raise (the failing one with the
-- reason) and nothing is changed. options: iteration (default the latest), rng (false: leave the
-- generator alone).
function M.load(dir, model, optimizer, options)
  options = options or {}
  local layout = dist().layout()
  local stage = model_stage(model, layout, 'checkpoint.load')
  local stages = gather_stages(stage)   -- collectives stay outside what may fail on one rank only
  local world = dist().group('world')
  local ok, prepared = pcall(prepare, dir, options, model, optimizer, layout, stage, stages)
  local code = agree(world, ok)
  if not ok then error(tostring(prepared), 0) end
  if code ~= 0 then error(string.format('checkpoint.load: %s: rank %d could not load (see its error)', dir, code - 1), 0) end
  copy_weights(prepared.source, prepared.weights, layout.tp, layout.tp_rank, model.config or {})
  local state = prepared.optimizer
  if state then
    if optimizer.load_full_state then
      optimizer:load_full_state(state)
    else
      local sd = { lr = state.lr, betas = state.betas, eps = state.eps, weight_decay = state.weight_decay, state = {} }
      for k, name in ipairs(prepared.optimizer_names) do sd.state[k] = state.params[name] end
      optimizer:load_state_dict(sd)
    end
  end
  if prepared.rng then M.set_rng_state(prepared.rng) end
  local info = prepared.info
  info.not_restored = prepared.not_restored
  if #info.not_restored > 0 and world.rank == 0 then
    print(string.format('checkpoint: loaded %s at iteration %d; not restored: %s', dir, info.iteration,
      table.concat(info.not_restored, '; ')))
  end
  return info
end

-- The whole model of a checkpoint of any layout, in this process: a GPTModel built from the recorded
-- model_config in the saved dtype, its parts joined; plus the info table. iteration: default the latest.
-- The GPTModel of a checkpoint's recorded model_config, uninitialized in the saved dtype (the load
-- fills every parameter or raises).
local function unfilled_model(dir, info)
  local config = info.layout.model_config
  if type(config) ~= 'table' then
    error('checkpoint: ' .. M.iteration_root(dir, info.iteration) .. ' does not record model_config', 0)
  end
  local build = {}
  for k, v in pairs(config) do build[k] = v end
  build.dtype, build.init = info.layout.dtype, false
  local model = require('pmp.nn').GPTModel(build)
  model.config.init = nil
  return model
end

function M.load_model(dir, iteration)
  local info = M.info(dir, iteration)
  local model = unfilled_model(dir, info)
  return model, M.load(dir, model, nil, { iteration = info.iteration, rng = false })
end

-- A checkpoint's model cut for this rank: split(model) turns the model built uninitialized from the
-- recorded model_config into this rank's part without reading a weight (pmp.train.parallel.split with
-- unfilled), then every rank of the world loads its part (M.load, so only its tensors, rows and columns
-- are read). Returns the part and the info table.
function M.load_model_part(dir, split)
  local info = M.info(dir)
  local model = split(unfilled_model(dir, info))
  return model, M.load(dir, model, nil, { iteration = info.iteration, rng = false })
end

-- The whole model of a checkpoint of any layout read by this process alone, without collectives (so
-- that one rank of a parallel run can join the parts the world saved); plus the info table.
function M.read_whole_model(dir)
  local info, root = M.info(dir)
  local model = unfilled_model(dir, info)
  local source, config = Source.open(root, info.layout), model.config
  copy_weights(source, locate_weights(source, model, { first = 0, count = config.num_layers }, 1, config), 1, 0, config)
  return model, info
end

return M
