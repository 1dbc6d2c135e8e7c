--- The embedded task of the RL recipes: "a + b = " answered with the sum and a period, in the format of
--- the pretraining corpus ("12 + 7 = 19."), numbers below 50. The reward is exact: 1 for the right sum,
--- 0 otherwise. Pairs with (31 a + 17 b) % 10 == 0 (250 of 2500, spread over all numbers) are held out:
--- never trained on, they measure the recipes' effect.
---
--- The start policy is the main job's checkpoint (checkpoints/pretrain) fine-tuned on the training sums;
--- it is trained once and kept in checkpoints/rl_start, which every recipe then starts from.
local checkpoint = require 'pmp.checkpoint'
local dataset_tokenizer = require 'pmp.data.dataset_tokenizer'
local sequences = require 'pmp.rl.sequences'
local tensor = require 'pmp.tensor'

local M = { PRETRAIN = 'checkpoints/pretrain', START = 'checkpoints/rl_start' }

function M.is_held_out(a, b) return (31 * a + 17 * b) % 10 == 0 end

--- The {a, b} pairs of 'train' or 'held_out'.
function M.pairs(which)
  local out = {}
  for a = 0, 49 do
    for b = 0, 49 do
      if M.is_held_out(a, b) == (which == 'held_out') then out[#out + 1] = { a, b } end
    end
  end
  return out
end

function M.prompt(pair) return pair[1] .. ' + ' .. pair[2] .. ' = ' end

--- 1 when the response, up to its first period, is the sum the prompt asks for; 0 otherwise.
function M.reward(prompt, response)
  local a, b = prompt:match('(%d+) %+ (%d+) = $')
  if not a then error('not a sums prompt: ' .. prompt, 2) end
  local answer = response:match('^([^.]*)%.') or response
  return answer == tostring(tonumber(a) + tonumber(b)) and 1 or 0
end

--- Preference records: the right sum chosen over a wrong one drawn with `random` (a function of n ->
--- an integer in 1..n) from the other numbers 0..98.
function M.preference_record(pair, random)
  local right = pair[1] + pair[2]
  local wrong = random(98) - 1
  if wrong >= right then wrong = wrong + 1 end
  return { prompt = M.prompt(pair), chosen = right .. '.', rejected = wrong .. '.' }
end

--- The task's tokens are the corpus' characters: the period ends an answer.
function M.stop_ids(tokenizer) return { tokenizer:encode('.')[1] } end

local function tokenizer_of(info) return dataset_tokenizer.from_state(info.state.tokenizer) end

--- The start policy and its tokenizer. opts: iters (300), batch (64), lr (1e-3), log (print).
function M.start_policy(opts)
  opts = opts or {}
  local log = opts.log or print
  if checkpoint.latest_iteration(M.START) then
    local model, info = checkpoint.load_model(M.START)
    log(string.format(' start policy: %s (the pretraining checkpoint fine-tuned on sums for %d steps)', M.START,
      info.iteration))
    return model, tokenizer_of(info)
  end
  if not checkpoint.latest_iteration(M.PRETRAIN) then
    error('the embedded default starts from ' .. M.PRETRAIN .. ': run `pmp recipes/pretrain.lua` first', 0)
  end
  local model, info = checkpoint.load_model(M.PRETRAIN)
  local tokenizer = tokenizer_of(info)
  local iters, batch_size = opts.iters or 300, opts.batch or 64
  local train = M.pairs('train')
  local rows = {}
  for k, pair in ipairs(train) do
    rows[k] = { tokenizer:encode(M.prompt(pair)), tokenizer:encode((pair[1] + pair[2]) .. '.') }
  end
  local optimizer = require('pmp.optim').AdamW(require('pmp.optim').decay_groups(model), { lr = opts.lr or 1e-3 })
  local state = 12345
  model:train()
  for step = 1, iters do
    local picked = {}
    for k = 1, batch_size do
      state = (state * 1103515245 + 12345) % 2147483648
      picked[k] = rows[math.floor(state / 65536) % #rows + 1]
    end
    local batch = sequences.collate(picked, 0)
    local T = batch.ids:size(2)
    -- the answer tokens are the targets; the prompt's are ignored
    local targets = tensor.where(batch.mask:narrow(2, 2, T - 1):gt(0), batch.ids:narrow(2, 2, T - 1), -100)
    optimizer:zero_grad()
    local loss = model(batch.ids:narrow(2, 1, T - 1):contiguous(), targets:contiguous())
    loss:backward()
    optimizer:step()
    if step % 50 == 0 or step == iters then log(string.format(' start policy: step %d/%d | sums loss %.4f', step, iters, loss:item())) end
  end
  checkpoint.save(M.START, iters, model, nil, { model_config = model.config, tokenizer = info.state.tokenizer })
  log(' start policy: saved to ' .. M.START)
  return model, tokenizer
end

--- Mean reward of `samples_per_prompt` sampled answers (temperature 1, seeded) per held-out prompt.
function M.held_out_reward(policy, tokenizer, opts)
  opts = opts or {}
  local rollout = require 'pmp.rl.rollout'
  local prompts, texts = {}, {}
  for _, pair in ipairs(M.pairs('held_out')) do
    for _ = 1, opts.samples_per_prompt or 4 do
      prompts[#prompts + 1] = tokenizer:encode(M.prompt(pair))
      texts[#texts + 1] = M.prompt(pair)
    end
  end
  if opts.limit then for k = #prompts, opts.limit + 1, -1 do prompts[k] = nil end end
  local saved = checkpoint.rng_state()
  tensor.manual_seed(opts.seed or 777)
  local samples = rollout.sample(policy, prompts, { temperature = 1, max_new_tokens = 4, eos_ids = M.stop_ids(tokenizer) })
  checkpoint.set_rng_state(saved)
  return rollout.mean(rollout.reward_fn(M.reward, 'sums')(samples, tokenizer))
end

return M
