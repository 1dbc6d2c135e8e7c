--- pmp.dist: process groups and collectives.
--
--   pmp.dist.init{tp = 2, pp = 2}            -- dp is whatever is left of the world
--   local tp = pmp.dist.group('tp')          -- a Communicator: tp.rank, tp.size, tp.name
--   tp:all_reduce(t)                         -- in place, sum; 'avg', 'max', 'min'
--   local h = dp:all_reduce(g, 'avg', {async = true}); ...; h:wait()
--
-- Groups follow Megatron-LM's rank order: tensor-parallel ranks are adjacent, then context, then data,
-- and pipeline stages are outermost (rank = tp + TP*(cp + CP*(dp + DP*pp))). Expert-parallel groups
-- take consecutive blocks of ep data-parallel ranks. Under `mpirun` the collectives go over MPI (the
-- engine's core/dist/dist.c); started without a launcher the world is this process alone and the same
-- script runs unchanged.
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local tensor = require 'pmp.tensor'

local M = {}

local REDUCE = { sum = C.PMP_REDUCE_SUM, avg = C.PMP_REDUCE_AVG, max = C.PMP_REDUCE_MAX, min = C.PMP_REDUCE_MIN }

local function raise(level) error(ffi.string(C.pmp_last_error()), level or 3) end

---------------------------------------------------------------------------------------------------
-- Handles of non-blocking operations

local Handle = {}
Handle.__index = Handle

-- Finishes the operation and returns its result (the tensor it produced or filled).
function Handle:wait()
  if self.request ~= nil then
    local request = self.request
    self.request = nil
    if C.pmp_dist_wait(request) ~= 0 then error(ffi.string(C.pmp_last_error()), 0) end
    if self.finish then self.result = self.finish() end
  end
  return self.result
end

function Handle:is_completed()
  return self.request == nil or C.pmp_dist_test(self.request) == 1
end

local function started(request, result, finish, async)
  if request == nil then raise(4) end
  local h = setmetatable({ request = request, result = result, finish = finish }, Handle)
  if async then return h end
  return h:wait()
end

---------------------------------------------------------------------------------------------------
-- Communicators

local Communicator = {}
Communicator.__index = Communicator

local function communicator(ptr)
  return setmetatable({ ptr = ptr, rank = C.pmp_comm_rank(ptr), size = C.pmp_comm_size(ptr),
                        name = ffi.string(C.pmp_comm_name(ptr)) }, Communicator)
end

function Communicator:__tostring()
  return string.format('Communicator(%s: rank %d of %d)', self.name, self.rank, self.size)
end

-- The world rank of member r (0-based) of this group.
function Communicator:world_rank(r) return C.pmp_comm_world_rank(self.ptr, r) end

-- The world ranks of the members, in group order.
function Communicator:members()
  local out = {}
  for r = 0, self.size - 1 do out[#out + 1] = self:world_rank(r) end
  return out
end

local function reduce_code(op, name)
  local code = REDUCE[op or 'sum']
  if not code then error(string.format("pmp.dist.%s: unknown reduction '%s' (sum, avg, max or min)", name, tostring(op)), 4) end
  return code
end

local function contiguous(t, name)
  if not tensor.is_tensor(t) then error('pmp.dist.' .. name .. ': expected a tensor, got ' .. type(t), 4) end
  return t:is_contiguous() and t or t:contiguous()
end

-- Sums (or averages, maxes, mins) t over the group, in place. Returns t, or a handle with {async=true}.
function Communicator:all_reduce(t, op, options)
  local work = contiguous(t, 'all_reduce')
  local request = C.pmp_all_reduce_start(self.ptr, work.ptr, reduce_code(op, 'all_reduce'))
  local finish
  if work ~= t then finish = function() t:copy_(work); return t end end
  return started(request, t, finish, options and options.async)
end

-- Concatenates every rank's t along dim (default 1) in rank order.
function Communicator:all_gather(t, options)
  options = options or {}
  local dim = options.dim or 1
  local work = contiguous(t, 'all_gather')
  local shape = work.shape
  if dim < 0 then dim = #shape + 1 + dim end
  if dim < 1 or dim > #shape then error(string.format('pmp.dist.all_gather: dim %d out of range for a %d-d tensor', dim, #shape), 2) end
  local gathered_shape = { self.size }
  for d = 1, #shape do gathered_shape[d + 1] = shape[d] end
  local out = tensor.empty(gathered_shape, { dtype = work.dtype })
  local finish = function()
    if dim == 1 then
      shape[1] = shape[1] * self.size
      return out:view(shape)
    end
    -- [n, s1..sk] -> [s1..s(dim-1), n, s(dim)..sk] -> merge n into s(dim)
    local order = {}
    for d = 2, dim do order[#order + 1] = d end
    order[#order + 1] = 1
    for d = dim + 1, #shape + 1 do order[#order + 1] = d end
    shape[dim] = shape[dim] * self.size
    return out:permute(order):contiguous():view(shape)
  end
  return started(C.pmp_all_gather_start(self.ptr, out.ptr, work.ptr), nil, finish, options.async)
end

-- Reduces t over the group and leaves rank r with the r-th of size equal slices along dim (default 1).
function Communicator:reduce_scatter(t, op, options)
  options = options or {}
  local dim = options.dim or 1
  local shape = t.shape
  if dim < 0 then dim = #shape + 1 + dim end
  if dim < 1 or dim > #shape then error(string.format('pmp.dist.reduce_scatter: dim %d out of range for a %d-d tensor', dim, #shape), 2) end
  if shape[dim] % self.size ~= 0 then
    error(string.format("pmp.dist.reduce_scatter on group '%s': dim %d has size %d, not a multiple of the group size %d",
      self.name, dim, shape[dim], self.size), 2)
  end
  local work
  if dim == 1 then
    work = contiguous(t, 'reduce_scatter')
  else
    -- move the slice index to the front: [s1.., n, s(dim)/n, ..] -> [n, s1.., s(dim)/n, ..]
    local split = {}
    for d = 1, dim - 1 do split[#split + 1] = shape[d] end
    split[#split + 1] = self.size
    split[#split + 1] = shape[dim] / self.size
    for d = dim + 1, #shape do split[#split + 1] = shape[d] end
    local order = { dim }
    for d = 1, #split do if d ~= dim then order[#order + 1] = d end end
    work = t:contiguous():view(split):permute(order):contiguous()
  end
  local out_shape = {}
  for d = 1, #shape do out_shape[d] = shape[d] end
  out_shape[dim] = shape[dim] / self.size
  local out = tensor.empty(out_shape, { dtype = t.dtype })
  local request = C.pmp_reduce_scatter_start(self.ptr, out.ptr, work.ptr, reduce_code(op, 'reduce_scatter'))
  return started(request, out, function() local keep = work; return out end, options.async)
end

-- Sends rows of t (along dim 1) to every rank: send_splits[k] rows to rank k (1-based list, rank
-- order, back to back in t), and returns the rows received, recv_splits[k] from rank k in rank order
-- (recv_splits: every rank's send_splits for this rank; nil swaps the counts first).
function Communicator:all_to_all(t, send_splits, recv_splits, options)
  local work = contiguous(t, 'all_to_all')
  local shape = work.shape
  if #shape == 0 then error('pmp.dist.all_to_all: expected a tensor with at least one dim', 2) end
  if #send_splits ~= self.size then
    error(string.format("pmp.dist.all_to_all on group '%s': %d send counts for %d ranks", self.name, #send_splits, self.size), 2)
  end
  if recv_splits == nil then
    local gathered = self:all_gather(tensor.tensor(send_splits, { dtype = 'i64' })):totable()
    recv_splits = {}
    for k = 1, self.size do recv_splits[k] = gathered[(k - 1) * self.size + self.rank + 1] end
  end
  local row = 1
  for d = 2, #shape do row = row * shape[d] end
  local send, recv = ffi.new('int64_t[?]', self.size), ffi.new('int64_t[?]', self.size)
  local rows = 0
  for k = 1, self.size do
    send[k - 1], recv[k - 1] = send_splits[k] * row, recv_splits[k] * row
    rows = rows + recv_splits[k]
  end
  shape[1] = rows
  local out = tensor.empty(shape, { dtype = work.dtype })
  local request = C.pmp_all_to_all_start(self.ptr, out.ptr, work.ptr, send, recv)
  return started(request, out, function() local keep = work; return out end, options and options.async)
end

-- Copies root's t into t on every rank (in place).
function Communicator:broadcast(t, root, options)
  local work = contiguous(t, 'broadcast')
  local finish
  if work ~= t then finish = function() t:copy_(work); return t end end
  return started(C.pmp_broadcast_start(self.ptr, work.ptr, root or 0), t, finish, options and options.async)
end

-- Point to point; peer is a rank of this group. recv fills t (its shape and dtype must match).
function Communicator:send(t, peer, options)
  local work = contiguous(t, 'send')
  local tag = options and options.tag or 0
  return started(C.pmp_send_start(self.ptr, work.ptr, peer, tag), t, function() local keep = work; return t end,
    options and options.async)
end

function Communicator:recv(t, peer, options)
  if not t:is_contiguous() then error('pmp.dist.recv: the receiving tensor must be contiguous', 2) end
  local tag = options and options.tag or 0
  return started(C.pmp_recv_start(self.ptr, t.ptr, peer, tag), t, nil, options and options.async)
end

function Communicator:barrier()
  return started(C.pmp_barrier_start(self.ptr), nil, nil, false)
end

-- Splits this group: ranks giving the same color (>= 0) form a new group ordered by key; a rank giving
-- a negative color gets nil.
function Communicator:split(color, key, name)
  C.pmp_clear_error()
  local ptr = C.pmp_comm_split(self.ptr, color, key or self.rank, name or (self.name .. '.split'))
  if ptr == nil then
    if color < 0 then return nil end
    raise(2)
  end
  return communicator(ptr)
end

M.Communicator = Communicator

---------------------------------------------------------------------------------------------------
-- Initialisation and the parallel layout

local state = { layout = nil, groups = {} }

local function positive(options, key, default)
  local v = options[key]
  if v == nil then return default end
  if type(v) ~= 'number' or v < 1 or v ~= math.floor(v) then
    error(string.format('pmp.dist.init: %s must be a positive integer, got %s', key, tostring(v)), 3)
  end
  return v
end

local function start_engine(timeout)
  if C.pmp_dist_is_initialized() == 0 then
    if C.pmp_dist_init(timeout or 0) ~= 0 then raise(3) end
    -- ranks sharing a machine share its cores
    local local_size = tonumber(os.getenv('OMPI_COMM_WORLD_LOCAL_SIZE') or os.getenv('SLURM_NTASKS_PER_NODE') or '1') or 1
    if C.pmp_dist_uses_mpi() == 1 and local_size > 1 and not os.getenv('OMP_NUM_THREADS') then
      C.pmp_set_num_threads(math.max(1, math.floor(C.pmp_num_threads() / local_size)))
    end
  end
  return communicator(C.pmp_comm_world())
end

-- Builds the groups. options: tp, pp, cp, ep (default 1), dp (default: the rest of the world),
-- timeout (seconds without progress before a collective fails; default PMP_DIST_TIMEOUT or 600).
-- Calling it again with another layout rebuilds the groups.
function M.init(options)
  options = options or {}
  local world = start_engine(options.timeout)
  local tp, pp, cp, ep = positive(options, 'tp', 1), positive(options, 'pp', 1), positive(options, 'cp', 1),
    positive(options, 'ep', 1)
  local n = world.size
  if n % (tp * pp * cp) ~= 0 then
    error(string.format('pmp.dist.init: the world of %d processes is not divisible by tp (%d) x pp (%d) x cp (%d)',
      n, tp, pp, cp), 2)
  end
  local dp = positive(options, 'dp', n / (tp * pp * cp))
  if tp * pp * cp * dp ~= n then
    error(string.format('pmp.dist.init: tp (%d) x pp (%d) x cp (%d) x dp (%d) = %d, but the world has %d processes',
      tp, pp, cp, dp, tp * pp * cp * dp, n), 2)
  end
  if dp * cp % ep ~= 0 then
    error(string.format('pmp.dist.init: ep (%d) must divide dp x cp (%d)', ep, dp * cp), 2)
  end
  local r = world.rank
  local tp_rank = r % tp
  local cp_rank = math.floor(r / tp) % cp
  local dp_rank = math.floor(r / (tp * cp)) % dp
  local pp_rank = math.floor(r / (tp * cp * dp))
  local layout = { tp = tp, pp = pp, dp = dp, cp = cp, ep = ep, world = n, rank = r,
                   tp_rank = tp_rank, pp_rank = pp_rank, dp_rank = dp_rank, cp_rank = cp_rank }
  local function rank_of(t, c, d, p) return t + tp * (c + cp * (d + dp * p)) end
  local groups = { world = world }
  -- each group: color = the coordinates it does not span, key = position inside it
  groups.tp = world:split(rank_of(0, cp_rank, dp_rank, pp_rank), tp_rank, 'tp')
  groups.cp = world:split(rank_of(tp_rank, 0, dp_rank, pp_rank), cp_rank, 'cp')
  groups.dp = world:split(rank_of(tp_rank, cp_rank, 0, pp_rank), dp_rank, 'dp')
  groups.dp_cp = world:split(rank_of(tp_rank, 0, 0, pp_rank), cp_rank + cp * dp_rank, 'dp_cp')
  groups.pp = world:split(rank_of(tp_rank, cp_rank, dp_rank, 0), pp_rank, 'pp')
  groups.mp = world:split(rank_of(0, cp_rank, dp_rank, 0), tp_rank + tp * pp_rank, 'mp')
  local is_end_stage = pp_rank == 0 or pp_rank == pp - 1
  groups.embedding = world:split(is_end_stage and rank_of(tp_rank, cp_rank, dp_rank, 0) or -1, pp_rank, 'embedding')
  local dcp_rank = cp_rank + cp * dp_rank   -- position among the dp x cp ranks of this (tp, pp) slot
  groups.ep = world:split(rank_of(tp_rank, 0, 0, pp_rank) * (dp * cp) + math.floor(dcp_rank / ep), dcp_rank % ep, 'ep')
  groups.edp = world:split(rank_of(tp_rank, 0, 0, pp_rank) * ep + dcp_rank % ep, math.floor(dcp_rank / ep), 'edp')
  layout.ep_rank = dcp_rank % ep
  state.layout, state.groups = layout, groups
  return layout
end

function M.is_initialized() return state.layout ~= nil end

local function layout()
  if not state.layout then M.init() end
  return state.layout
end

-- The world rank and size; a process that never called init is rank 0 of 1.
function M.rank() return C.pmp_dist_is_initialized() == 1 and C.pmp_comm_rank(C.pmp_comm_world()) or 0 end
function M.world_size() return C.pmp_dist_is_initialized() == 1 and C.pmp_comm_size(C.pmp_comm_world()) or 1 end
function M.uses_mpi() return C.pmp_dist_uses_mpi() == 1 end

-- The layout: tp, pp, dp, cp, ep and this rank's tp_rank, pp_rank, dp_rank, cp_rank, ep_rank.
function M.layout() return layout() end

-- One of: world, tp, pp, dp, cp, dp_cp, mp, embedding (nil on middle pipeline stages), ep, edp.
function M.group(name)
  layout()
  local g = state.groups[name]
  if g == nil and name ~= 'embedding' then
    error("pmp.dist.group: unknown group '" .. tostring(name) .. "' (world, tp, pp, dp, cp, dp_cp, mp, embedding, ep, edp)", 2)
  end
  return g
end

-- Traffic and timing of this process since the last reset: bytes_sent, bytes_received, collectives,
-- busy_seconds (communication thread inside collectives), wait_seconds (callers blocked in wait),
-- all_to_all_seconds (the part of busy_seconds in all-to-alls).
function M.stats()
  local s = C.pmp_dist_stats_get()
  return { bytes_sent = tonumber(s.bytes_sent), bytes_received = tonumber(s.bytes_received),
           collectives = tonumber(s.collectives), busy_seconds = s.busy_seconds, wait_seconds = s.wait_seconds,
           all_to_all_seconds = s.all_to_all_seconds }
end
function M.reset_stats() C.pmp_dist_stats_reset() end

-- Prints only on the given world rank (default 0).
function M.print0(...)
  if M.rank() == 0 then print(...) end
end

M.pipeline = require 'pmp.dist.pipeline'   -- pipeline stages and the 1F1B schedule
M.ddp = require 'pmp.dist.ddp'             -- data parallelism: gradient buckets reduced during backward
-- the global gradient norm over tp/pp/dp ranks, and clipping by it
M.grad_norm = require('pmp.dist.grad_norm').grad_norm
M.clip_grad_norm = require('pmp.dist.grad_norm').clip_grad_norm

return M
