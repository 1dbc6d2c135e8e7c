-- The pmp side of tools/bench_generate.sh, driven by tools/bench_generate.py over a pipe:
--   pmp tools/bench_generate.lua DIR DTYPE
-- Loads the HF directory DIR with pmp.models.from_pretrained in DTYPE, then for each line of stdin,
-- {"prompts": [[ids...]...], "new": N}, runs greedy pmp.generate (left-padded by pmp.generate) for N
-- tokens and answers one line {"seconds": wall time of the call (pmp.clock), "tokens": [[ids...] per row]}.
local dir, dtype = arg[1], arg[2]
if not (dir and dtype) then
  io.stderr:write('usage: pmp tools/bench_generate.lua DIR DTYPE  (requests on stdin)\n')
  os.exit(2)
end
local clock = require 'pmp.clock'
local model = pmp.models.from_pretrained(dir, { dtype = dtype })

for line in io.lines() do
  local request = pmp.json.decode(line)
  local t0 = clock.now()
  local results = pmp.generate(model, request.prompts, { max_new_tokens = request.new, temperature = 0, pad_id = 0 })
  local seconds = clock.now() - t0
  local tokens = {}
  for b = 1, #results do
    assert(#results[b].tokens == request.new, 'fewer tokens than asked')
    tokens[b] = pmp.json.array(results[b].tokens)
  end
  io.stdout:write(pmp.json.encode({ seconds = seconds, tokens = pmp.json.array(tokens) }), '\n')
  io.stdout:flush()
end
