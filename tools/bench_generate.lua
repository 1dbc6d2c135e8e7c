-- The pmp side of tools/bench_generate.sh:
--   pmp tools/bench_generate.lua DIR BATCH NEW REPS OUT.json
-- Loads the HF directory DIR with pmp.models.from_pretrained, runs greedy pmp.generate on the first BATCH
-- prompts of DIR/bench_prompts.json (left-padded by pmp.generate) for NEW tokens: one warm-up run, then
-- REPS timed runs (pmp.clock). Writes {seconds = {...}, tokens = {{...} per row}} to OUT.json.
local dir, batch, new, reps, out = arg[1], tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4]), arg[5]
if not (dir and batch and new and reps and out) then
  io.stderr:write('usage: pmp tools/bench_generate.lua DIR BATCH NEW REPS OUT.json\n')
  os.exit(2)
end
local clock = require 'pmp.clock'
local model = pmp.models.from_pretrained(dir)
local all = pmp.json.decode(pmp.io.read_file(dir .. '/bench_prompts.json'))
local prompts = {}
for b = 1, batch do prompts[b] = all[b] end

local function run()
  return pmp.generate(model, prompts, { max_new_tokens = new, temperature = 0, pad_id = 0 })
end

local first = run() -- warm-up
local seconds = {}
for r = 1, reps do
  local t0 = clock.now()
  local results = run()
  seconds[r] = clock.now() - t0
  for b = 1, batch do
    assert(#results[b].tokens == new, 'fewer tokens than asked')
    for i = 1, new do assert(results[b].tokens[i] == first[b].tokens[i], 'greedy runs differ') end
  end
end
local tokens = {}
for b = 1, batch do tokens[b] = pmp.json.array(first[b].tokens) end
local f = assert(io.open(out, 'w'))
f:write(pmp.json.encode({ seconds = pmp.json.array(seconds), tokens = pmp.json.array(tokens),
  threads = pmp.num_threads() }), '\n')
f:close()
