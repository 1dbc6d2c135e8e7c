-- Mixture of experts against a dense MLP with the same active parameters: forward + backward of one
-- pmp.nn.moe MoELayer (E experts of width F, top-k routing, grouped GEMM) and of the SwiGLU MLP of
-- width k x F that every token would pass through instead, on the same tokens, in f32; tokens/s and
-- the time ratio MoE / dense (issue 14's target: at most 1.5). With python3 and torch, the same two
-- layers in PyTorch (tools/bench_moe.py: the MoE layer as a loop over the experts' sorted rows) on as
-- many threads, and the ratios pmp / torch. Not run by the tests; `make bench-moe`.
--   pmp tools/bench_moe.lua [--tokens 2048] [--hidden-size 512] [--num-experts 8] [--moe-router-topk 2]
--                           [--moe-ffn-hidden-size 704] [--reps 5] [--no-torch]
-- Times are the best of --reps after one warm-up (the machine may be shared: the best is the least
-- disturbed), wall-clock and the process's CPU time (all threads; what a loaded machine disturbs
-- least). The router's few parameters (hidden x experts) are the MoE layer's only extra ones.
local clock = require 'pmp.clock'
local transformer = require 'pmp.nn.transformer'
local moe = require 'pmp.nn.moe'

local opts = pmp.args.parse(arg, {
  { '--tokens', 2048, 'tokens per forward' },
  { '--hidden-size', 512, 'model width' },
  { '--num-experts', 8, 'experts' },
  { '--moe-router-topk', 2, 'experts per token' },
  { '--moe-ffn-hidden-size', 704, "each expert's width (the dense MLP's is topk x this)" },
  { '--reps', 5, 'timed repetitions of each layer' },
  { '--threads', 0, 'threads for pmp and torch (0: pmp.num_threads())' },
  { '--no-torch', false, 'skip the PyTorch comparison' },
}, { usage = 'pmp tools/bench_moe.lua [flags]' })

if opts.threads > 0 then pmp.set_num_threads(opts.threads) end
local H, E, k, F = opts.hidden_size, opts.num_experts, opts.moe_router_topk, opts.moe_ffn_hidden_size
local config = pmp.nn.config({ num_layers = 1, hidden_size = H, num_attention_heads = 1, vocab_size = 16,
  ffn_hidden_size = k * F, num_moe_experts = E, moe_router_topk = k, moe_ffn_hidden_size = F,
  moe_grouped_gemm = true, moe_aux_loss_coeff = 0, moe_z_loss_coeff = 0, dtype = 'f32' })

pmp.manual_seed(0)
local layers = { moe = moe.MoELayer(config, 1), dense = transformer.MLP(config) }
local x = pmp.randn({ 1, opts.tokens, H }):requires_grad_()

local function best_time(layer)
  local function step()
    layer:zero_grad()
    x.grad = nil
    layer(x):sum():backward()
  end
  step()
  local best, best_cpu = math.huge, math.huge
  for _ = 1, opts.reps do
    collectgarbage()
    local start, start_cpu = clock.now(), os.clock()
    step()
    best, best_cpu = math.min(best, clock.now() - start), math.min(best_cpu, os.clock() - start_cpu)
  end
  return { best, best_cpu }
end

local function count(layer)
  local n = 0
  for _, p in ipairs(layer:parameters()) do n = n + p:numel() end
  return n
end

local seconds = { moe = best_time(layers.moe), dense = best_time(layers.dense) }
local active = count(layers.moe) - (E - k) * 3 * H * F   -- k experts of E, and the router
print(string.format('bench_moe: %d tokens, hidden %d, %d experts of width %d, top-%d (active parameters %d) ' ..
  'vs a dense SwiGLU MLP of width %d (%d parameters); %d threads, f32, forward + backward, best of %d',
  opts.tokens, H, E, F, k, active, k * F, count(layers.dense), pmp.num_threads(), opts.reps))
-- each of moe, dense: {wall seconds, cpu seconds}
local function line(who, moe_, dense)
  print(string.format('  %-5s MoE %7.0f tokens/s (%.4f s, cpu %.4f s) | dense %7.0f tokens/s (%.4f s, cpu %.4f s) | ' ..
    'MoE / dense time %.2f, cpu %.2f', who, opts.tokens / moe_[1], moe_[1], moe_[2], opts.tokens / dense[1], dense[1],
    dense[2], moe_[1] / dense[1], moe_[2] / dense[2]))
end
line('pmp', seconds.moe, seconds.dense)

if opts.no_torch then return end
local script = debug.getinfo(1, 'S').source:sub(2):gsub('bench_moe%.lua$', 'bench_moe.py')
local command = string.format('python3 %q --hidden %d --experts %d --topk %d --ffn %d --tokens %d --reps %d ' ..
  '--threads %d 2>&1', script, H, E, k, F, opts.tokens, opts.reps, pmp.num_threads())
local pipe = io.popen(command)
local out = pipe:read('*a')
pipe:close()
local a, b, c, d = out:match('RESULT (%S+) (%S+) (%S+) (%S+)')
if not a then
  print('  torch: not measured (python3 with torch needed): ' .. out:gsub('%s+$', ''):sub(-300))
  return
end
local torch = { moe = { tonumber(a), tonumber(c) }, dense = { tonumber(b), tonumber(d) } }
line('torch', torch.moe, torch.dense)
print(string.format('  pmp / torch tokens/s: MoE %.2f (cpu %.2f), dense %.2f (cpu %.2f)', torch.moe[1] / seconds.moe[1],
  torch.moe[2] / seconds.moe[2], torch.dense[1] / seconds.dense[1], torch.dense[2] / seconds.dense[2]))
