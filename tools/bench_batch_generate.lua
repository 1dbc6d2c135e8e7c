-- The pmp side of tools/bench_batch_generate.sh:
--   pmp tools/bench_batch_generate.lua DIR WORKLOAD.json MAX_BATCH OUT.json
-- Loads the HF directory DIR, runs every request of WORKLOAD.json (greedy, its own max_tokens, no eos)
-- through pmp.serve.engine (continuous batching, paged KV cache of 16-token blocks sized for MAX_BATCH
-- sequences of the longest request) after a warm-up request, and writes {seconds, tokens, peak_blocks,
-- num_blocks, steps} to OUT.json.
local dir, workload_path, max_batch, out = arg[1], arg[2], tonumber(arg[3]), arg[4]
if not (dir and workload_path and max_batch and out) then
  io.stderr:write('usage: pmp tools/bench_batch_generate.lua DIR WORKLOAD.json MAX_BATCH OUT.json\n')
  os.exit(2)
end
local clock = require 'pmp.clock'
local engine_module = require 'pmp.serve.engine'
local model = pmp.models.from_pretrained(dir)
local requests = pmp.json.decode(pmp.io.read_file(workload_path))
local longest = 0
for _, r in ipairs(requests) do longest = math.max(longest, #r.prompt + r.max_tokens) end
local block_size = 16
local engine = engine_module.new(model, { block_size = block_size, max_batch = max_batch,
  num_blocks = max_batch * math.ceil(longest / block_size) })
engine:run({ { prompt = { 5, 6, 7, 8 }, max_tokens = 4 } })   -- warm-up

local t0 = clock.now()
local results = engine:run(requests)
local seconds = clock.now() - t0
local tokens = {}
for k, result in ipairs(results) do
  local got = result.samples[1].tokens
  assert(#got == requests[k].max_tokens, 'request ' .. k .. ' got fewer tokens than asked')
  tokens[k] = pmp.json.array(got)
end
local f = assert(io.open(out, 'w'))
f:write(pmp.json.encode({ seconds = seconds, tokens = pmp.json.array(tokens), peak_blocks = engine.blocks.peak,
  num_blocks = engine.blocks.num_blocks, steps = engine.stats.steps, threads = pmp.num_threads() }), '\n')
f:close()
