-- The pmp side of tools/bench_generate.sh:
--   pmp tools/bench_generate.lua DIR BATCH NEW REPS OUT.json [sample]
-- Loads the HF directory DIR with pmp.models.from_pretrained, runs greedy pmp.generate on the first BATCH
-- prompts of DIR/bench_prompts.json (left-padded by pmp.generate) for NEW tokens: one warm-up run, then
-- REPS timed runs (pmp.clock). Writes {seconds = {...}, tokens = {{...} per row}} to OUT.json.
-- With `sample` it samples instead (temperature 0.8, top-k 50, top-p 0.9, repetition penalty 1.1, each
-- run seeded alike), to time the sampling path; its tokens are not comparable with transformers'.
local dir, batch, new, reps, out, mode = arg[1], tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4]), arg[5], arg[6]
if not (dir and batch and new and reps and out) or (mode and mode ~= 'sample') then
  io.stderr:write('usage: pmp tools/bench_generate.lua DIR BATCH NEW REPS OUT.json [sample]\n')
  os.exit(2)
end
local clock = require 'pmp.clock'
local model = pmp.models.from_pretrained(dir)
local all = pmp.json.decode(pmp.io.read_file(dir .. '/bench_prompts.json'))
local prompts = {}
for b = 1, batch do prompts[b] = all[b] end

local options = { max_new_tokens = new, temperature = 0, pad_id = 0 }
if mode == 'sample' then
  options.temperature, options.top_k, options.top_p, options.repetition_penalty, options.seed = 0.8, 50, 0.9, 1.1, 1
end

local function run()
  return pmp.generate(model, prompts, options)
end

local first = run() -- warm-up
local seconds = {}
for r = 1, reps do
  local t0 = clock.now()
  local results = run()
  seconds[r] = clock.now() - t0
  for b = 1, batch do
    assert(#results[b].tokens == new, 'fewer tokens than asked')
    for i = 1, new do assert(results[b].tokens[i] == first[b].tokens[i], 'runs differ') end
  end
end
local tokens = {}
for b = 1, batch do tokens[b] = pmp.json.array(first[b].tokens) end
local f = assert(io.open(out, 'w'))
f:write(pmp.json.encode({ seconds = pmp.json.array(seconds), tokens = pmp.json.array(tokens),
  threads = pmp.num_threads() }), '\n')
f:close()
