-- Run by spec/dist_collectives_spec.lua: ranks that disagree, in the way arg[1] names.
pmp.dist.init{ timeout = tonumber(arg[2] or '3') }
local world = pmp.dist.group('world')
local mode = arg[1]
if mode == 'size' then
  world:all_reduce(pmp.ones(4 + world.rank))
elseif mode == 'op' then
  if world.rank == 0 then world:all_reduce(pmp.ones(4)) else world:all_gather(pmp.ones(4)) end
elseif mode == 'dtype' then
  world:all_reduce(pmp.ones(4, { dtype = world.rank == 0 and 'f32' or 'bf16' }))
elseif mode == 'silent' then
  -- the last rank never joins: the others must give up after the timeout
  if world.rank ~= world.size - 1 then world:all_reduce(pmp.ones(4)) else os.execute('sleep 30') end
elseif mode == 'dead' then
  if world.rank == world.size - 1 then os.exit(3) end
  world:all_reduce(pmp.ones(4))
end
print('FINISHED ' .. world.rank)
