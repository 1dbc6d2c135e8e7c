-- Run by spec/checkpoint_layouts_spec.lua as one process: loads checkpoints of parallel runs with
-- pmp.checkpoint.load_model (what recipes/generate.lua and recipes/sft.lua load through) and compares
-- each with the checkpoint the one-process reference run saved at the same iteration.
--   layouts_worker.lua REF NAME DIR ITERATION [NAME DIR ITERATION ...]
-- Prints per NAME:
--   WEIGHTS name tensors max_abs_diff        every parameter against the reference's
--   LOGITS name max_abs_diff                 a forward pass over a fixed prompt
--   TOKENS name ref|run ids...               16 greedy tokens after the prompt (repetition penalised)
local ref_dir = arg[1]
local prompt = { 116, 104, 101, 32, 99, 97, 116, 32, 115, 97, 116, 32 }   -- 'the cat sat ' as bytes

-- A model this small and this briefly trained greedily repeats its likeliest byte; the repetition
-- penalty makes each step take the next one down the ranking, so the tokens test the ranking.
local function greedy(model)
  return pmp.generate(model, { prompt }, { max_new_tokens = 16, repetition_penalty = 100 })[1].tokens
end

for k = 2, #arg, 3 do
  local name, dir, iteration = arg[k], arg[k + 1], tonumber(arg[k + 2])
  local run = pmp.checkpoint.load_model(dir)
  local ref, info = pmp.checkpoint.load_model(ref_dir, iteration)
  assert(info.iteration == iteration)
  local count, worst = 0, 0
  local run_params = run:state_dict()
  for pname, t in pairs(ref:state_dict()) do
    count = count + 1
    local other = assert(run_params[pname], name .. ' lacks ' .. pname)
    worst = math.max(worst, (other:double() - t:double()):abs():max():item())
  end
  print(string.format('WEIGHTS %s %d %.3g', name, count, worst))
  local ids = pmp.tensor({ prompt }, { dtype = 'i64' })
  local diff = pmp.no_grad(function() return (run:eval()(ids):double() - ref:eval()(ids):double()):abs():max():item() end)
  print(string.format('LOGITS %s %.3g', name, diff))
  print(string.format('TOKENS %s ref %s', name, table.concat(greedy(ref), ' ')))
  print(string.format('TOKENS %s run %s', name, table.concat(greedy(run), ' ')))
end
