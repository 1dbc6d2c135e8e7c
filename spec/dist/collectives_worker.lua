-- Run by spec/dist_collectives_spec.lua on several MPI processes. Every rank draws every rank's input
-- from the same seed, so each can compute the expected result of a collective by itself (in f64) and
-- compare it with what the collective returned. Prints 'OK name rN' or 'FAIL name rN detail' per check,
-- into <arg[1]>/rank<N> when a directory is given: mpirun's forwarding of several ranks' output can
-- split or lose lines when the machine is loaded, and the spec counts them.
local dist = pmp.dist
dist.init{}
local world = dist.group('world')
local n, me = world.size, world.rank

local out = arg[1] and assert(io.open(arg[1] .. '/rank' .. me, 'w')) or io.stdout
local function report(name, ok, detail)
  out:write(string.format('%s %s r%d%s\n', ok and 'OK' or 'FAIL', name, me, ok and '' or (' ' .. tostring(detail))))
end

-- the input of rank k for a check: floats, or small integers for integer dtypes
local function input_of(k, shape, dtype, seed)
  pmp.manual_seed(seed * 100 + k)
  if dtype == 'bool' then return pmp.rand(shape):lt(0.5) end
  -- u8 sums must fit in a byte whatever the world size
  if dtype == 'u8' then return pmp.randint(0, math.floor(255 / n) + 1, shape):to(dtype) end
  if dtype == 'i32' or dtype == 'i64' then return pmp.randint(-1000, 1000, shape):to(dtype) end
  return pmp.randn(shape):to(dtype)
end

local function max_rel_diff(got, want)
  local diff = (got:double() - want:double()):abs():max():item()
  local scale = want:double():abs():max():item()
  return diff / math.max(scale, 1e-30)
end

local tolerance = { f64 = 1e-14, f32 = 1e-6, bf16 = 2e-2, f16 = 2e-3, i32 = 0, i64 = 0, u8 = 0, bool = 0 }

-- all_reduce: every op on every dtype, with sizes below, at and above the group size
local seed = 1
for _, dtype in ipairs({ 'f64', 'f32', 'bf16', 'f16', 'i32', 'i64', 'u8', 'bool' }) do
  for _, op in ipairs({ 'sum', 'avg', 'max', 'min' }) do
    local float = dtype == 'f64' or dtype == 'f32' or dtype == 'bf16' or dtype == 'f16'
    if (op ~= 'avg' or float) and (dtype ~= 'bool' or op == 'max' or op == 'min') then
      for _, count in ipairs({ 1, n + 1, 1000 }) do
        seed = seed + 1
        local inputs = {}
        for k = 0, n - 1 do inputs[k + 1] = input_of(k, { count }, dtype, seed) end
        local want = inputs[1]:double()
        for k = 2, n do
          local x = inputs[k]:double()
          if op == 'max' then want = want:maximum(x) elseif op == 'min' then want = want:minimum(x) else want = want + x end
        end
        if op == 'avg' then want = want / n end
        local got = inputs[me + 1]:clone()
        world:all_reduce(got, op)
        local err = max_rel_diff(got, want)
        report(string.format('all_reduce/%s/%s/%d', dtype, op, count), err <= tolerance[dtype], 'max rel diff ' .. err)
        -- every rank holds the same bits
        local gathered = world:all_gather(got:view(1, count))
        local same = true
        for k = 2, n do same = same and gathered:narrow(1, k, 1):eq(gathered:narrow(1, 1, 1)):all() end
        report(string.format('all_reduce_identical/%s/%s/%d', dtype, op, count), same, 'ranks differ')
      end
    end
  end
end

-- all_gather and reduce_scatter along each dim, and a non-contiguous input
for _, dim in ipairs({ 1, 2, 3 }) do
  seed = seed + 1
  local shape = { 2, 3, 4 }
  local inputs = {}
  for k = 0, n - 1 do inputs[k + 1] = input_of(k, shape, 'f32', seed) end
  local got = world:all_gather(inputs[me + 1], { dim = dim })
  report('all_gather/dim' .. dim, got:eq(pmp.cat(inputs, dim)):all(), 'differs')

  local big = { 2, 3, 4 }
  big[dim] = big[dim] * n
  local rs_inputs = {}
  for k = 0, n - 1 do rs_inputs[k + 1] = input_of(k, big, 'f64', seed + 1000) end
  local total = rs_inputs[1]
  for k = 2, n do total = total + rs_inputs[k] end
  local slice = total:narrow(dim, 1 + me * shape[dim], shape[dim])
  local out = world:reduce_scatter(rs_inputs[me + 1], 'sum', { dim = dim })
  report('reduce_scatter/dim' .. dim, max_rel_diff(out, slice) < 1e-14, max_rel_diff(out, slice))
end
seed = seed + 1
local base = input_of(0, { 4, 6 }, 'f32', seed)
local strided = base:t()                                   -- not contiguous
local reduced = world:all_reduce(strided:clone(), 'sum')
world:all_reduce(strided, 'sum')
report('all_reduce/non_contiguous', strided:eq(reduced):all() and base:t():eq(reduced):all(), 'differs')

-- broadcast from every root
for root = 0, n - 1 do
  seed = seed + 1
  local t = input_of(me, { 5 }, 'bf16', seed)
  world:broadcast(t, root)
  report('broadcast/root' .. root, t:eq(input_of(root, { 5 }, 'bf16', seed)):all(), 'differs')
end

-- send/recv around the ring, non-blocking both ways at once (a world of one has no peer)
seed = seed + 1
if n > 1 then
local right, left = (me + 1) % n, (me + n - 1) % n
local incoming = pmp.empty({ 7 }, { dtype = 'f16' })
local h_recv = world:recv(incoming, left, { tag = 5, async = true })
local h_send = world:send(input_of(me, { 7 }, 'f16', seed), right, { tag = 5, async = true })
h_send:wait()
h_recv:wait()
report('send_recv/ring', incoming:eq(input_of(left, { 7 }, 'f16', seed)):all(), 'differs')
end

-- several collectives in flight, finished in reverse order
local handles, values = {}, {}
for k = 1, 4 do
  values[k] = pmp.full({ 3 }, me + k)
  handles[k] = world:all_reduce(values[k], 'sum', { async = true })
end
local ok = true
for k = 4, 1, -1 do
  local want = n * k + n * (n - 1) / 2
  ok = ok and handles[k]:wait():eq(want):all()
end
report('async/in_flight', ok, 'wrong sums')

world:barrier()
local stats = dist.stats()
if n > 1 then report('stats/bytes', stats.bytes_sent > 0 and stats.collectives > 0, 'no traffic counted') end
if out ~= io.stdout then out:close() end
