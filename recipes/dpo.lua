--- DPO (and IPO, hinge) on preference pairs: the policy's summed answer log-probs against a frozen
--- reference (the start policy), computed on the fly.
---   pmp recipes/dpo.lua --load HF_DIR --data-path prefs.jsonl [--eval-data-path held.jsonl] --save-hf OUT
--- prefs.jsonl holds TRL's preference records: {"prompt", "chosen", "rejected"} strings, or
--- "chosen"/"rejected" message lists (with or without a "prompt" list); the chat template is applied.
--- --loss-type ipo uses per-token mean log-probs (the IPO authors' normalisation, as TRL).
---
--- With no --load it runs the embedded default: pairs of the sums task (pmp.rl.sums), the right sum
--- chosen over a wrong one, from the main job's checkpoint fine-tuned on sums, and prints the held-out
--- preference accuracy (pairs where the implicit reward beta (log pi - log pi_ref) of the chosen answer
--- is the higher; ties, as at the start, count half) before and after.
local rl, train = pmp.rl, pmp.train
local flags, step = train.flags, train.step
local recipe = require 'pmp.rl.recipe'
local clock = require 'pmp.clock'

local opts = flags.parse(arg, { {
  { '--load', nil, 'Hugging Face policy directory (default: the embedded sums task)' },
  { '--train-iters', 200, 'optimizer steps' },
  { '--batch-size', 32, 'pairs per step' },
  { '--beta', 0.1, 'DPO beta' },
  { '--label-smoothing', 0.0, 'cDPO label smoothing (sigmoid loss)' },
  { '--loss-type', 'sigmoid', 'sigmoid, ipo or hinge' },
  { '--log-interval', 20, 'steps between log lines' },
}, flags.optimizer, recipe.flags.common, train.lora.flags, recipe.flags.preference, {
  -- the shared flags whose defaults or meaning differ here
  { '--lr', 2e-5, 'AdamW peak learning rate' },
} }, { usage = 'pmp recipes/dpo.lua [--load HF_DIR --data-path FILE.jsonl] [flags]' })
recipe.require_one_process()
train.lora.check(opts, opts.save_hf)
if opts.load and not opts.data_path then error('--data-path FILE.jsonl is required with --load', 0) end

pmp.manual_seed(opts.seed)
local policy, tokenizer, render = recipe.policy(opts)
local reference = recipe.frozen_copy(policy)
-- LoRA: the policy trains adapters on its frozen weights (the reference above is a copy of those)
train.lora.setup(policy, opts, not opts.load and 'llama' or nil)
policy:eval()   -- no dropout
local train_pairs, held_out = recipe.preference_pairs(opts, tokenizer, render)
local pad = tokenizer.pad_id or 0
local mean_per_token = opts.loss_type == 'ipo'

-- summed (or, for IPO, per-token mean) answer log-probs of chosen and rejected under a model
local function logps(model, batch, n)
  local per_token = rl.sequence_logprobs(model, batch.ids, batch.mask)
  local total = per_token:sum(2)
  if mean_per_token then total = total / batch.mask:sum(2) end
  return total:narrow(1, 1, n), total:narrow(1, n + 1, n)
end
-- the implicit rewards beta (log pi - log pi_ref) of chosen and rejected answers
local function implicit_rewards(pairs)
  local batch = rl.preference.collate(pairs, pad, opts.max_length)
  local pc, pr = logps(policy, batch, #pairs)
  local rc, rr = logps(reference, batch, #pairs)
  local _, chosen, rejected = rl.dpo_loss(pc, pr, rc, rr, { beta = opts.beta })
  return chosen, rejected
end
local function accuracy(pairs) return recipe.pairs_accuracy(pairs, implicit_rewards) end
local before = held_out and accuracy(held_out)
local optimizer = train.optimizer.adamw(policy, opts)
local lr_at = train.optimizer.schedule(opts, opts.train_iters)
local logger = train.Logger(opts, { name = 'dpo', train_iters = opts.train_iters })
local checkpoints = train.Checkpoints({ save = opts.save, save_interval = 0 }, logger)
print(string.format('dpo: %d training pairs, %s held-out; %d steps of %d pairs; loss %s, beta %g; %s', #train_pairs,
  held_out and tostring(#held_out) or 'no', opts.train_iters, opts.batch_size, opts.loss_type, opts.beta,
  tostring(policy):match('^[^\n]*')))
local next_batch = recipe.batches(train_pairs, opts.batch_size)
local start, loss_sum, acc_sum, margin_sum, count = clock.now(), 0, 0, 0, 0
for iteration = 1, opts.train_iters do
  logger:begin_iteration(iteration)
  optimizer.lr = lr_at(iteration)
  local pairs = next_batch()
  local batch = rl.preference.collate(pairs, pad, opts.max_length)
  local rc, rr = pmp.no_grad(logps, reference, batch, #pairs)
  optimizer:zero_grad()
  local pc, pr = logps(policy, batch, #pairs)
  local loss, chosen, rejected = rl.dpo_loss(pc, pr, rc, rr, { beta = opts.beta,
    label_smoothing = opts.label_smoothing, loss_type = opts.loss_type })
  loss:backward()
  local grad_norm = step.clip_grads(policy, optimizer, opts.clip_grad)
  optimizer:step()
  loss_sum, count = loss_sum + loss:item(), count + 1
  acc_sum = acc_sum + recipe.pair_accuracy(chosen:double():totable(), rejected:double():totable())
  margin_sum = margin_sum + (chosen - rejected):mean():item()
  if iteration % opts.log_interval == 0 or iteration == opts.train_iters then
    local now = clock.now()
    print(string.format(' iteration %8d/%8d | elapsed time per iteration (ms): %.1f | learning rate: %.6E | ' ..
      'dpo loss: %.6E | rewards accuracy: %.4f | rewards margin: %.4f | grad norm: %.3f |', iteration, opts.train_iters,
      (now - start) * 1000 / count, optimizer.lr, loss_sum / count, acc_sum / count, margin_sum / count, grad_norm))
    start, loss_sum, acc_sum, margin_sum, count = now, 0, 0, 0, 0
  end
end
checkpoints:finish(opts.train_iters, policy, optimizer, function() return { model_config = policy.config, args = opts } end)
logger:finish(opts.train_iters)
train.lora.finish(policy, opts, opts.load)
if opts.save_hf then
  policy:save_pretrained(opts.save_hf, { model_type = not opts.load and 'llama' or nil })
  print('dpo: saved the policy to ' .. opts.save_hf)
end
if held_out then print(string.format('dpo: held-out preference accuracy before %.4f after %.4f', before, accuracy(held_out))) end
