-- Run by spec/dist_collectives_spec.lua: prints each group's members for the layout in arg.
local tp, pp, cp = tonumber(arg[1]), tonumber(arg[2]), tonumber(arg[3] or '1')
local layout = pmp.dist.init{ tp = tp, pp = pp, cp = cp }
for _, name in ipairs({ 'tp', 'pp', 'dp', 'cp', 'dp_cp', 'mp', 'embedding' }) do
  local g = pmp.dist.group(name)
  print(string.format('GROUP %d %s %s', layout.rank, name, g and table.concat(g:members(), ',') or '-'))
end
print(string.format('COORD %d %d %d %d %d', layout.rank, layout.tp_rank, layout.cp_rank, layout.dp_rank, layout.pp_rank))
