--- Data parallelism: every rank of the data-parallel group runs the whole model (or its pipeline stage /
--- tensor-parallel part) on its own part of the global batch, and the gradients are averaged over the
--- group in buckets that start reducing during backward, as Megatron-LM's DistributedDataParallel does.
--
--   local ddp = pmp.dist.ddp.DistributedDataParallel(model, { bucket_size = 4e7 })
--   optimizer:zero_grad()
--   for k, mb in ipairs(micro_batches) do
--     ddp:set_sync(k == #micro_batches)        -- only the last micro-batch's backward reduces
--     (model(mb.ids, mb.targets) / #micro_batches):backward()
--   end
--   ddp:finish_grad_sync()                    -- every p.grad now holds the average over the group
--   optimizer:step()
--
-- Buckets. Parameters are taken in reverse registration order (the output layer and last layers first,
-- since backward reaches them first) and packed into buckets of about bucket_size elements; each bucket
-- owns one flat gradient buffer and every parameter's .grad is a view of it, so a bucket is reduced by
-- one collective. Gradients are kept in f32 (grad_dtype) even for bf16 parameters, as Megatron
-- accumulates and reduces them. With distributed_optimizer = true a bucket is padded to a multiple of
-- the group size and reduce-scattered instead: rank r ends up with the average of the r-th slice only
-- (bucket.shard), which is all pmp.optim.DistributedOptimizer needs. An expert-parallel model's experts
-- (options.experts) get buckets of their own, reduced over the expert-data-parallel group instead.
--
-- Overlap. The engine accumulates a leaf's gradient whenever a node that used it runs, and nothing tells
-- Lua when the last one has. So during every forward (with grad on) each module's parameters are read
-- through an identity autograd function (pmp.autograd.custom) made on first access: its backward runs
-- once every use of the parameter in that graph has sent its gradient, and it adds that sum into the
-- bucket buffer itself. A parameter is final when no such identity is pending any more (which also
-- holds under 1F1B pipelines, where several micro-batches' graphs are alive at once, and under
-- activation recompute, whose re-run in backward reads the parameters again); a bucket whose
-- parameters are all final starts its asynchronous collective on the spot. Buckets start strictly in
-- order so that every rank issues the same collectives in the same order; whatever the hooks did not
-- start (overlap = false, sync off, a parameter read outside a forward) finish_grad_sync starts.
-- The model must be complete (pipeline.stage, tensor_parallel, :to(dtype) done) before it is wrapped;
-- with virtual pipeline stages wrap the pipeline.Chunks (all of the rank's chunks in one set of buckets).
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local tensor = require 'pmp.tensor'
local autograd = require 'pmp.autograd'
local Module = require 'pmp.nn.module'
local clock = require 'pmp.clock'
local pipeline = require 'pmp.dist.pipeline'

local M = {}

local DDP = {}
DDP.__index = DDP

local function address(t) return tonumber(ffi.cast('uintptr_t', t.ptr)) end
local function grad_enabled() return C.pmp_is_grad_enabled() ~= 0 end

-- The word-embedding weight that the first and last pipeline stages both hold when the model ties them
-- (pmp.dist.pipeline), nil otherwise. Under the distributed optimizer it gets a bucket of its own so
-- that both stages cut it into the same shards, and the sum of its gradient over the two stages
-- (pipeline.sync_embedding_grads) lines up shard by shard. With virtual stages (a pipeline.Chunks) it
-- is on rank 0's first chunk or the last rank's last chunk.
local function tied_stage_weight(model)
  for _, chunk in ipairs(pipeline.chunks(model)) do
    local stage = chunk.pipeline
    if stage and chunk.config and chunk.config.tie_embeddings then
      if stage.is_first then return chunk.embedding.word_embeddings.weight end
      if stage.is_last then return chunk.output_layer.weight end
    end
  end
  return nil
end

local function build_buckets(self, named, bucket_size, alone)
  local buckets, current = {}, nil
  local function close()
    if current then buckets[#buckets + 1] = current end
    current = nil
  end
  for k = #named, 1, -1 do
    local name, p = named[k][1], named[k][2]
    local key = address(p)
    -- a tensor registered under two names is reduced once; options.skip's are left to their owner
    if not self.by_address[key] and not (self.skip and self.skip(name)) then
      local own = alone == key
      local expert = self.experts ~= nil and self.experts.match(name)
      if current and (own or current.dtype ~= p.dtype or current.expert ~= expert) then close() end
      current = current or { entries = {}, numel = 0, dtype = p.dtype, expert = expert }
      local entry = { name = name, param = p, offset = current.numel, numel = p:numel(), bucket = current,
        outstanding = 0, ready = false }
      current.entries[#current.entries + 1] = entry
      current.numel = current.numel + entry.numel
      self.by_address[key] = entry
      self.entries[#self.entries + 1] = entry
      if own or current.numel >= bucket_size then close() end
    end
  end
  close()
  for index, b in ipairs(buckets) do
    b.index = index
    b.group = b.expert and self.experts.group or self.group
    local n = b.group.size
    b.padded_numel = self.distributed_optimizer and math.ceil(b.numel / n) * n or b.numel
    b.buffer = tensor.zeros(b.padded_numel, { dtype = self.grad_dtype })
    b.shard_size = b.padded_numel / n
    b.shard_start = b.group.rank * b.shard_size   -- 0-based, in elements
    b.shard = b.buffer:narrow(1, b.shard_start + 1, b.shard_size)
    b.ready, b.launched = 0, false
    for _, e in ipairs(b.entries) do e.view = b.buffer:narrow(1, e.offset + 1, e.numel):view(e.param.shape) end
  end
  return buckets
end

-- model: an nn.Module (GPTModel, a pipeline stage, a tensor-parallel part, anything with parameters).
-- options: group (default pmp.dist.group('dp_cp'), which is 'dp' without context parallelism),
-- bucket_size (elements; default Megatron's max(4e7, 1e6 x group size)), overlap (true: start buckets
-- from backward), distributed_optimizer (false: all-reduce; true: reduce-scatter for
-- pmp.optim.DistributedOptimizer), grad_dtype ('f32'), skip (a function of a parameter name: true
-- leaves that gradient unreduced, as an expert-parallel model's experts, pmp.nn.expert_parallel.finish_expert_grads),
-- experts ({match = a function of a parameter name, group, divisor}: the matching gradients are summed
-- over group, not averaged over the data-parallel one, then divided by divisor; Megatron's expert
-- buckets over the expert-data-parallel group, whose all-to-all backward already summed the gradient
-- over the expert-parallel ranks' tokens).
function M.DistributedDataParallel(model, options)
  options = options or {}
  if not Module.is_module(model) then
    error('DistributedDataParallel: expected an nn.Module, got ' .. type(model), 2)
  end
  local group = options.group or require('pmp.dist').group('dp_cp')
  local self = setmetatable({
    model = model,
    group = group,
    overlap = options.overlap ~= false,
    distributed_optimizer = options.distributed_optimizer == true,
    grad_dtype = options.grad_dtype or 'f32',
    skip = options.skip,
    experts = options.experts,
    sync = true,       -- whether the backward running now is the last before finish_grad_sync
    synced = false,    -- whether finish_grad_sync ran since the last training forward
    entries = {},      -- one per parameter, in bucket order
    by_address = {},
    proxied = {},      -- module._parameters -> its real values table, while a forward reads through proxies
    next_launch = 1,   -- buckets start in index order on every rank
    launches = {},
    grads_seen = 0,    -- parameter gradients made final by the hooks since the last finish_grad_sync
  }, DDP)
  local named = model:named_parameters()
  if #named == 0 then error('DistributedDataParallel: the model has no parameters', 2) end
  local bucket_size = options.bucket_size or math.max(40000000, 1000000 * group.size)
  if type(bucket_size) ~= 'number' or bucket_size < 1 then
    error('DistributedDataParallel: bucket_size must be a positive number of elements, got ' .. tostring(bucket_size), 2)
  end
  local tied = self.distributed_optimizer and tied_stage_weight(model)
  self.buckets = build_buckets(self, named, bucket_size, tied and address(tied))
  self:_wrap_forwards()
  return self
end

---------------------------------------------------------------------------------------------------
-- Hooks

-- Every module whose subtree holds parameters reads them through proxies while its forward runs with
-- grad on (the outermost such forward installs them; recompute's re-run of a block installs its own).
-- Without overlap only the root is wrapped, to notice that a new accumulation has begun. A
-- pipeline.Chunks is never called itself (pipeline.forward_backward runs its chunks): each chunk is a root.
function DDP:_wrap_forwards()
  local roots = pipeline.chunks(self.model)
  if not self.overlap then
    for _, root in ipairs(roots) do self:_wrap_forward(root, {}, true) end
    return
  end
  local wrapped = {}
  local function visit(m, is_root)
    local owners = {}
    if #rawget(m, '_parameters').names > 0 then owners[1] = m end
    for _, child in ipairs(m:children()) do
      for _, o in ipairs(visit(child, false)) do owners[#owners + 1] = o end
    end
    if #owners > 0 and not wrapped[m] then
      wrapped[m] = true
      self:_wrap_forward(m, owners, is_root)
    end
    return owners
  end
  for _, root in ipairs(roots) do visit(root, true) end
end

function DDP:_wrap_forward(m, owners, is_root)
  local original = m.forward
  rawset(m, 'forward', function(module, ...)
    if not grad_enabled() then return original(module, ...) end
    if is_root then self.synced = false end
    local installed = self:_install(owners)
    if #installed == 0 then return original(module, ...) end
    local function restore(ok, ...)
      for _, params in ipairs(installed) do
        params.values = self.proxied[params]
        self.proxied[params] = nil
      end
      if not ok then error((...), 0) end
      return ...
    end
    return restore(pcall(original, module, ...))
  end)
end

function DDP:_install(owners)
  local installed = {}
  for _, m in ipairs(owners) do
    local params = rawget(m, '_parameters')
    if not self.proxied[params] then
      local values = params.values
      self.proxied[params] = values
      params.values = setmetatable({}, {
        __index = function(proxy, key)
          local p = values[key]
          if p == nil or not grad_enabled() then return p end
          local entry = self.by_address[address(p)]
          if not entry then return p end
          local tracked = self:_track(entry)
          rawset(proxy, key, tracked)   -- later reads in this forward share the one identity
          return tracked
        end,
        __newindex = values,
      })
      installed[#installed + 1] = params
    end
  end
  return installed
end

-- The parameter as an identity function of itself whose backward hands us its gradient.
function DDP:_track(entry)
  local p = entry.param
  entry.outstanding = entry.outstanding + 1
  return autograd.custom({ p }, p:detach(), function(g)
    self:_accumulate(entry, g)
    return {}
  end)
end

function DDP:_accumulate(entry, g)
  local p, view, bucket = entry.param, entry.view, entry.bucket
  if bucket.launched then
    error(string.format("DistributedDataParallel (group '%s', rank %d): a gradient of '%s' arrived after bucket %d " ..
      'was sent; was the parameter used by a graph that started after set_sync(true)?', bucket.group.name,
      bucket.group.rank, entry.name, bucket.index), 0)
  end
  local acc = p.ptr.grad_acc
  if acc == nil then
    view:copy_(g)
  elseif acc == view.ptr then
    view:copy_(view + g)
  else
    view:copy_(p.grad + g)   -- someone set .grad to a tensor of their own: it joins the buffer
  end
  if acc ~= view.ptr then p.grad = view end
  self.synced = false
  entry.outstanding = entry.outstanding - 1
  if entry.outstanding == 0 and self.sync and not entry.ready then
    entry.ready = true
    self.grads_seen = self.grads_seen + 1
    bucket.ready = bucket.ready + 1
    if bucket.ready == #bucket.entries then self:_launch_ready() end
  end
end

function DDP:_launch_ready()
  local b = self.buckets[self.next_launch]
  while b and b.ready == #b.entries do
    self:_launch(b, true)
    b = self.buckets[self.next_launch]
  end
end

function DDP:_launch(b, from_hook)
  for _, e in ipairs(b.entries) do
    local acc = e.param.ptr.grad_acc
    if acc == nil then
      e.view:zero_()   -- no gradient on this rank: it contributes zeros
      e.param.grad = e.view
    elseif acc ~= e.view.ptr then
      e.view:copy_(e.param.grad)
      e.param.grad = e.view
    end
  end
  if self.next_launch == 1 then self.busy_at_first_launch = require('pmp.dist').stats().busy_seconds end
  local options = { async = true }
  local op = b.expert and 'sum' or 'avg'
  if self.distributed_optimizer then
    b.handle = b.group:reduce_scatter(b.buffer, op, options)
  else
    b.handle = b.group:all_reduce(b.buffer, op, options)
  end
  b.launched = true
  self.next_launch = b.index + 1
  self.launches[#self.launches + 1] = { bucket = b.index, at = clock.now(), from_hook = from_hook,
    grads_seen = self.grads_seen }
end

---------------------------------------------------------------------------------------------------
-- Public interface

function DDP:forward(...) return self.model(...) end
function DDP:__call(...) return self.model(...) end
function DDP:parameters() return self.model:parameters() end
function DDP:named_parameters() return self.model:named_parameters() end

-- Whether the coming backward is the last before finish_grad_sync (only then do buckets start early).
function DDP:set_sync(flag) self.sync = flag and true or false end

-- Runs fn(...) with sync off: gradient accumulation over all but the last micro-batch.
function DDP:no_sync(fn, ...)
  local previous = self.sync
  self.sync = false
  local ok, err = pcall(fn, ...)
  self.sync = previous
  if not ok then error(err, 0) end
end

-- Clears the gradients (the buffers are overwritten by the next accumulation, not zeroed).
function DDP:zero_grad()
  for _, e in ipairs(self.entries) do
    e.param.grad = nil
    e.outstanding, e.ready = 0, false
  end
end

-- Starts the buckets the hooks did not start, waits for all of them and leaves every parameter's .grad
-- averaged over the group (distributed_optimizer: only each bucket's shard on this rank is averaged).
-- Does nothing if no training forward ran since the last call.
function DDP:finish_grad_sync()
  if self.synced then return end
  local backward_end = clock.now()
  for k = self.next_launch, #self.buckets do self:_launch(self.buckets[k], false) end
  local waited = 0
  for _, b in ipairs(self.buckets) do
    local start = clock.now()
    local ok, result = pcall(b.handle.wait, b.handle)
    waited = waited + clock.now() - start
    if not ok then
      error(string.format("DistributedDataParallel: reducing bucket %d of %d (%d elements) over group '%s' failed: %s",
        b.index, #self.buckets, b.numel, b.group.name, tostring(result)), 2)
    end
    if self.distributed_optimizer then b.shard:copy_(result) end
    if b.expert and self.experts.divisor ~= 1 then
      local reduced = self.distributed_optimizer and b.shard or b.buffer
      reduced:copy_(reduced * (1 / self.experts.divisor))
    end
    b.handle, b.launched, b.ready = nil, false, 0
  end
  for _, e in ipairs(self.entries) do e.outstanding, e.ready = 0, false end
  local busy = require('pmp.dist').stats().busy_seconds - self.busy_at_first_launch
  local from_hooks = 0
  for _, l in ipairs(self.launches) do if l.from_hook then from_hooks = from_hooks + 1 end end
  self.last_sync = {
    buckets = #self.buckets,
    from_hooks = from_hooks,
    launches = self.launches,
    backward_end = backward_end,
    wait_seconds = waited,
    comm_seconds = busy,
    hidden_fraction = busy > 0 and math.max(0, math.min(1, 1 - waited / busy)) or 0,
  }
  self.launches, self.next_launch, self.grads_seen, self.synced = {}, 1, 0, true
end

-- What the last finish_grad_sync saw: buckets, from_hooks (buckets started during backward), launches
-- ({bucket, at = clock time, from_hook, grads_seen = how many parameters' gradients the hooks had
-- finished by then} in start order), backward_end (clock time finish_grad_sync was
-- called), wait_seconds (time it blocked), comm_seconds (time the communication thread spent in
-- collectives since the first bucket started), hidden_fraction (1 - wait / comm: the part of the
-- communication that ran behind compute).
function DDP:sync_stats() return self.last_sync end

-- {index, numel, padded_numel, names} per bucket, in the order they are reduced.
function DDP:bucket_layout()
  local out = {}
  for _, b in ipairs(self.buckets) do
    local names = {}
    for k, e in ipairs(b.entries) do names[k] = e.name end
    out[#out + 1] = { index = b.index, numel = b.numel, padded_numel = b.padded_numel, names = names }
  end
  return out
end

M.DDP = DDP

return M
