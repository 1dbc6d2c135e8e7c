--- The distributed optimizer (ZeRO-1, Megatron-LM's --use-distributed-optimizer): AdamW whose f32 master
--- weights and moments are sharded over the data-parallel group. Each rank keeps the state of its slice
--- of every gradient bucket of a pmp.dist.ddp.DistributedDataParallel built with
--- distributed_optimizer = true; the buckets are reduce-scattered (during backward, by the DDP hooks),
--- each rank steps its slices, and the updated parameters are all-gathered back into the model.
--
--   local ddp = pmp.dist.ddp.DistributedDataParallel(model, { distributed_optimizer = true })
--   local opt = pmp.optim.DistributedOptimizer(pmp.optim.decay_groups(model), { ddp = ddp, lr = 3e-4 })
--   opt.lr = schedule(iteration); opt:zero_grad(); ...backward...; ddp:finish_grad_sync()
--   local norm = opt:clip_grad_norm(1.0); opt:step()
--
-- The options and parameter groups are pmp.optim.AdamW's (lr, betas, eps, weight_decay; groups with
-- weight_decay / lr_scale) and the update is its fused pmp_adamw_step_, run on views of the flat shard
-- buffers, one call per run of parameters sharing a group. Unlike AdamW, a parameter that received no
-- gradient is still stepped (with a zero gradient: the ranks cannot agree cheaply on who had one), and
-- one step count serves all, as in Megatron. The buckets of an expert-parallel model's experts are
-- sharded over their own group (the DDP's experts.group, Megatron's expert-data-parallel group).
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local tensor = require 'pmp.tensor'

local DistributedOptimizer = {}
DistributedOptimizer.__index = DistributedOptimizer

local function address(t) return tonumber(ffi.cast('uintptr_t', t.ptr)) end

local function check(rc)
  if rc ~= 0 then error(ffi.string(C.pmp_last_error()), 3) end
end

local function low_precision(dtype) return dtype == 'bf16' or dtype == 'f16' end

-- Runs fn with autograd off: views of parameters taken here must not record graph nodes.
local function outside_autograd(fn)
  local previous = C.pmp_set_grad_enabled(0)
  local ok, err = pcall(fn)
  C.pmp_set_grad_enabled(previous)
  if not ok then error(err, 0) end
end

-- The pieces of this rank's shard of bucket b: for each parameter overlapping it, which of its elements
-- (param_offset, 0-based, in its flat layout) sit where in the shard (shard_offset), how many (length).
local function shard_segments(b, group_of)
  local segments = {}
  local first, last = b.shard_start, b.shard_start + b.shard_size   -- [first, last)
  for _, e in ipairs(b.entries) do
    local from, to = math.max(first, e.offset), math.min(last, e.offset + e.numel)
    if from < to then
      segments[#segments + 1] = { entry = e, shard_offset = from - first, param_offset = from - e.offset,
        length = to - from, group = group_of[address(e.param)] }
    end
  end
  return segments
end

-- Adjacent segments of the same parameter group: one fused step each.
local function group_runs(segments)
  local runs = {}
  for _, s in ipairs(segments) do
    local last = runs[#runs]
    if last and last.group == s.group and last.offset + last.length == s.shard_offset then
      last.length = last.length + s.length
    else
      runs[#runs + 1] = { group = s.group, offset = s.shard_offset, length = s.length }
    end
  end
  return runs
end

-- params: tensors or groups {params = {...}, weight_decay =, lr_scale =}, as for AdamW; together they
-- must be exactly the parameters of options.ddp. options: ddp (required), lr (1e-3), betas
-- ({0.9, 0.999}), eps (1e-8), weight_decay (0.01), clip_grad (max global norm; step() clips first and
-- returns the norm; 0 or nil: no clipping).
function DistributedOptimizer.new(params, options)
  options = options or {}
  local ddp = options.ddp
  if type(ddp) ~= 'table' or not ddp.buckets then
    error('DistributedOptimizer: options.ddp must be the pmp.dist.ddp.DistributedDataParallel wrapping the model', 2)
  end
  if not ddp.distributed_optimizer then
    error('DistributedOptimizer: the DistributedDataParallel was built without distributed_optimizer = true ' ..
      '(it all-reduces; the optimizer needs reduce-scattered buckets)', 2)
  end
  local self = setmetatable({
    ddp = ddp,
    group = ddp.group,
    lr = options.lr or 1e-3,
    betas = options.betas or { 0.9, 0.999 },
    eps = options.eps or 1e-8,
    weight_decay = options.weight_decay or 0.01,
    clip_grad = options.clip_grad or 0,
    step_count = 0,
    groups = {},
    buckets = {},   -- per DDP bucket: this rank's shard state
  }, DistributedOptimizer)
  local plain = {}
  for _, entry in ipairs(params) do
    if tensor.is_tensor(entry) then plain[#plain + 1] = entry else self.groups[#self.groups + 1] = entry end
  end
  if #plain > 0 then table.insert(self.groups, 1, { params = plain }) end
  local group_of, count = {}, 0
  for _, group in ipairs(self.groups) do
    for _, p in ipairs(group.params) do
      local key = address(p)
      if not ddp.by_address[key] then
        error(string.format('DistributedOptimizer: a parameter of shape [%s] is not one of the model wrapped by ddp',
          table.concat(p.shape, ',')), 2)
      end
      if not group_of[key] then count = count + 1 end
      group_of[key] = group
    end
  end
  if count ~= #ddp.entries then
    for _, e in ipairs(ddp.entries) do
      if not group_of[address(e.param)] then
        error(string.format("DistributedOptimizer: parameter '%s' of the model is in no parameter group", e.name), 2)
      end
    end
  end
  outside_autograd(function()
    for _, b in ipairs(ddp.buckets) do
      local shard = { bucket = b, segments = shard_segments(b, group_of) }
      shard.runs = group_runs(shard.segments)
      shard.exp_avg = tensor.zeros(b.shard_size, { dtype = 'f32' })
      shard.exp_avg_sq = tensor.zeros(b.shard_size, { dtype = 'f32' })
      shard.master = tensor.zeros(b.shard_size, { dtype = 'f32' })
      -- what the all-gather sends: the master itself for f32 parameters, their rounding otherwise
      shard.low_precision = low_precision(b.dtype)
      shard.params = shard.low_precision and tensor.zeros(b.shard_size, { dtype = b.dtype }) or shard.master
      for _, s in ipairs(shard.segments) do
        local values = s.entry.param:view(-1):narrow(1, s.param_offset + 1, s.length)
        shard.master:narrow(1, s.shard_offset + 1, s.length):copy_(values)
        if shard.low_precision then shard.params:narrow(1, s.shard_offset + 1, s.length):copy_(values) end
      end
      self.buckets[#self.buckets + 1] = shard
    end
  end)
  return self
end

function DistributedOptimizer:zero_grad() self.ddp:zero_grad() end

--- Makes the f32 master shards of bf16/f16 parameters the parameters' values (and what the all-gather
--- sends): after weights were loaded into the model without the optimizer state.
function DistributedOptimizer:refresh_master()
  outside_autograd(function()
    for _, shard in ipairs(self.buckets) do
      if shard.low_precision then
        for _, s in ipairs(shard.segments) do
          local values = s.entry.param:view(-1):narrow(1, s.param_offset + 1, s.length)
          shard.master:narrow(1, s.shard_offset + 1, s.length):copy_(values)
          shard.params:narrow(1, s.shard_offset + 1, s.length):copy_(values)
        end
      end
    end
  end)
end

-- This rank's gradient shards with the parameter each piece belongs to, for pmp.dist.clip_grad_norm:
-- pieces = {{name, grad}} (views of the reduced gradients), whole = one view per bucket (for scaling).
function DistributedOptimizer:grad_shards()
  self.ddp:finish_grad_sync()
  local pieces, whole = {}, {}
  for _, shard in ipairs(self.buckets) do
    local g = shard.bucket.shard
    whole[#whole + 1] = g
    for _, s in ipairs(shard.segments) do
      pieces[#pieces + 1] = { s.entry.name, g:narrow(1, s.shard_offset + 1, s.length) }
    end
  end
  return pieces, whole
end

-- The global gradient norm before clipping; scales this rank's shards so it is at most max_norm.
function DistributedOptimizer:clip_grad_norm(max_norm, options)
  return require('pmp.dist.grad_norm').clip_grad_norm(self, max_norm, options)
end

function DistributedOptimizer:grad_norm(options)
  return require('pmp.dist.grad_norm').grad_norm(self, options)
end

-- One AdamW update of this rank's shards, then every rank's updated parameters into the model.
-- Finishes the gradient reduction first if the caller has not. Returns the gradient norm when
-- clip_grad is set.
function DistributedOptimizer:step()
  self.ddp:finish_grad_sync()
  local norm
  if self.clip_grad and self.clip_grad > 0 then norm = self:clip_grad_norm(self.clip_grad) end
  self.step_count = self.step_count + 1
  local b1, b2 = self.betas[1], self.betas[2]
  outside_autograd(function()
    for _, shard in ipairs(self.buckets) do
      if not shard.low_precision then
        -- f32 parameters are their own master: take them as they are now (a checkpoint may have loaded them)
        for _, s in ipairs(shard.segments) do
          shard.master:narrow(1, s.shard_offset + 1, s.length):copy_(s.entry.param:view(-1):narrow(1, s.param_offset + 1, s.length))
        end
      end
      local grad = shard.bucket.shard
      for _, run in ipairs(shard.runs) do
        local function part(t) return t:narrow(1, run.offset + 1, run.length) end
        local group = run.group
        -- the pieces are views made for this call: held in locals used after it, so none is collected first
        local params, grads, avg, avg_sq = part(shard.params), part(grad), part(shard.exp_avg), part(shard.exp_avg_sq)
        local master = shard.low_precision and part(shard.master) or nil
        check(C.pmp_adamw_step_(params.ptr, grads.ptr, avg.ptr, avg_sq.ptr, master and master.ptr or nil,
          self.lr * (group.lr_scale or 1), b1, b2, self.eps, group.weight_decay or self.weight_decay, self.step_count),
          params, grads, avg, avg_sq, master)
      end
    end
    self:_gather_params()
  end)
  return norm
end

function DistributedOptimizer:_gather_params()
  local handles = {}
  for k, shard in ipairs(self.buckets) do handles[k] = shard.bucket.group:all_gather(shard.params, { async = true }) end
  for k, shard in ipairs(self.buckets) do
    local full = handles[k]:wait()
    for _, e in ipairs(shard.bucket.entries) do
      e.param:view(-1):copy_(full:narrow(1, e.offset + 1, e.numel))
    end
  end
end

---------------------------------------------------------------------------------------------------
-- State

local function layout_of(self)
  local sizes = {}
  for k, shard in ipairs(self.buckets) do sizes[k] = shard.bucket.padded_numel end
  return table.concat(sizes, ',')
end

-- This rank's shard of the state: hyperparameters, step, and per bucket exp_avg, exp_avg_sq (and master
-- for bf16/f16 parameters). Loadable only into the same layout (dp size and buckets).
function DistributedOptimizer:state_dict()
  local out = { lr = self.lr, betas = { self.betas[1], self.betas[2] }, eps = self.eps,
    weight_decay = self.weight_decay, step = self.step_count, dp_rank = self.group.rank, dp_size = self.group.size,
    layout = layout_of(self), buckets = {} }
  for k, shard in ipairs(self.buckets) do
    out.buckets[k] = { exp_avg = shard.exp_avg, exp_avg_sq = shard.exp_avg_sq,
      master = shard.low_precision and shard.master or nil }
  end
  return out
end

local function set_hyperparameters(self, sd)
  self.lr, self.eps, self.weight_decay = sd.lr, sd.eps, sd.weight_decay
  self.betas = { sd.betas[1], sd.betas[2] }
  self.step_count = sd.step
end

function DistributedOptimizer:load_state_dict(sd)
  if sd.dp_size ~= self.group.size or sd.layout ~= layout_of(self) then
    error(string.format('DistributedOptimizer.load_state_dict (rank %d of %s): the state was saved with %s ranks and ' ..
      'buckets [%s], this optimizer has %d ranks and buckets [%s]; reshard through full_state()', self.group.rank,
      self.group.name, tostring(sd.dp_size), tostring(sd.layout), self.group.size, layout_of(self)), 2)
  end
  set_hyperparameters(self, sd)
  for k, shard in ipairs(self.buckets) do
    local saved = sd.buckets[k]
    shard.exp_avg:copy_(saved.exp_avg)
    shard.exp_avg_sq:copy_(saved.exp_avg_sq)
    if shard.low_precision then
      if not saved.master then error(string.format('DistributedOptimizer.load_state_dict: bucket %d has no master weights', k), 2) end
      shard.master:copy_(saved.master)
    end
  end
end

-- The whole optimizer state of this rank's parameters, unsharded and keyed by parameter name (a
-- collective over the data-parallel group, and the expert-data-parallel one for experts; every rank gets it): {lr, betas, eps, weight_decay, step, params = {[name] = {exp_avg,
-- exp_avg_sq, master (bf16/f16 parameters only)}}}, tensors shaped like the parameters.
function DistributedOptimizer:full_state()
  local out = { lr = self.lr, betas = { self.betas[1], self.betas[2] }, eps = self.eps,
    weight_decay = self.weight_decay, step = self.step_count, params = {} }
  local keys = { 'exp_avg', 'exp_avg_sq', 'master' }
  local handles = {}
  for k, shard in ipairs(self.buckets) do
    handles[k] = {}
    for _, key in ipairs(keys) do
      if key ~= 'master' or shard.low_precision then
        handles[k][key] = shard.bucket.group:all_gather(shard[key], { async = true })
      end
    end
  end
  for k, shard in ipairs(self.buckets) do
    local full = {}
    for key, h in pairs(handles[k]) do full[key] = h:wait() end
    for _, e in ipairs(shard.bucket.entries) do
      local state = {}
      for key, t in pairs(full) do state[key] = t:narrow(1, e.offset + 1, e.numel):clone():view(e.param.shape) end
      out.params[e.name] = state
    end
  end
  return out
end

-- Takes this rank's shards out of a full state (as full_state gives, from any data-parallel size).
function DistributedOptimizer:load_full_state(state)
  for _, shard in ipairs(self.buckets) do
    for _, s in ipairs(shard.segments) do
      local name = s.entry.name
      local saved = state.params[name]
      if not saved then
        error(string.format("DistributedOptimizer.load_full_state (rank %d of %s): no state for parameter '%s'",
          self.group.rank, self.group.name, name), 2)
      end
      for _, key in ipairs({ 'exp_avg', 'exp_avg_sq', 'master' }) do
        if key ~= 'master' or shard.low_precision then
          local t = saved[key]
          if not t then
            error(string.format("DistributedOptimizer.load_full_state: parameter '%s' has no %s", name, key), 2)
          end
          if t:numel() ~= s.entry.numel then
            error(string.format("DistributedOptimizer.load_full_state: %s of '%s' has %d elements, the parameter %d",
              key, name, t:numel(), s.entry.numel), 2)
          end
          shard[key]:narrow(1, s.shard_offset + 1, s.length):copy_(t:reshape(-1):narrow(1, s.param_offset + 1, s.length))
        end
      end
    end
  end
  set_hyperparameters(self, state)
end

return setmetatable(DistributedOptimizer, { __call = function(_, ...) return DistributedOptimizer.new(...) end })
