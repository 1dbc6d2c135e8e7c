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
--- Under mpirun each process takes its share of every batch of pairs (the reference scores its share too)
--- and the gradients are averaged; --tensor-model-parallel-size N splits the policy and the reference
--- over N ranks as pretrain.lua does (the data-parallel size is what remains of the world).
local rl, train = pmp.rl, pmp.train
local flags = train.flags
local recipe = require 'pmp.rl.recipe'
local pair_training = require 'pmp.rl.pair_training'

local opts = flags.parse(arg, { {
  { '--train-iters', 200, 'optimizer steps', integer = true, min = 0 },
  { '--batch-size', 32, 'pairs per step (over all processes)', integer = true, min = 1 },
  { '--beta', 0.1, 'DPO beta', above = 0 },
  { '--label-smoothing', 0.0, 'cDPO label smoothing (sigmoid loss)', min = 0, max = 0.5 },
  { '--loss-type', 'sigmoid', 'sigmoid, ipo or hinge', choices = { 'sigmoid', 'ipo', 'hinge' } },
  { '--log-interval', 20, 'steps between log lines', integer = true, min = 1 },
}, flags.optimizer, recipe.flags.common, recipe.flags.reference, train.lora.flags, recipe.flags.preference, flags.checkpoint, recipe.flags.resume, {
  -- the shared flags whose defaults or meaning differ here
  { '--load', nil, 'Hugging Face policy directory (default: the embedded sums task)' },
  { '--lr', 2e-5, 'AdamW peak learning rate' },
} }, { usage = 'pmp recipes/dpo.lua [--load HF_DIR --data-path FILE.jsonl] [flags]' })
train.lora.check(opts, opts.save_hf)
recipe.check_tensor_parallel(opts)
if opts.load and not opts.data_path then error('--data-path FILE.jsonl is required with --load', 0) end

pmp.manual_seed(opts.seed)
local policy, tokenizer, render = recipe.policy(opts)
local reference = recipe.frozen_copy(policy, opts.ref_dtype)
-- LoRA: the policy trains adapters on its frozen weights (the reference above is a copy of those)
train.lora.setup(policy, opts, not opts.load and 'llama' or nil)
policy:eval()   -- no dropout
local layout, ddp = recipe.data_parallel(policy, opts.batch_size, '--batch-size', opts.tensor_model_parallel_size,
  { reference })
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
local trainer = pair_training.new(opts, { name = 'dpo', model = policy, layout = layout, ddp = ddp, pairs = train_pairs,
  metrics = { { 'dpo loss', '%.6E' }, { 'rewards accuracy', '%.4f' }, { 'rewards margin', '%.4f' } } })
local state = { before = held_out and not trainer.resuming and accuracy(held_out) or nil }
trainer.logger:line(string.format('dpo: %d training pairs, %s held-out; %d steps of %d pairs%s; loss %s, beta %g; %s',
  #train_pairs, held_out and tostring(#held_out) or 'no', opts.train_iters, opts.batch_size,
  recipe.describe_layout(layout), opts.loss_type, opts.beta,
  tostring(policy):match('^[^\n]*')))
trainer:train(function(pairs)
  local batch = rl.preference.collate(pairs, pad, opts.max_length)
  local rc, rr = pmp.no_grad(logps, reference, batch, #pairs)
  local pc, pr = logps(policy, batch, #pairs)
  local loss, chosen, rejected = rl.dpo_loss(pc, pr, rc, rr, { beta = opts.beta,
    label_smoothing = opts.label_smoothing, loss_type = opts.loss_type })
  return loss, { recipe.pair_accuracy(chosen:double():totable(), rejected:double():totable()),
    (chosen - rejected):mean():item() }
end, state)
recipe.save_model(policy, layout, opts, { model_type = not opts.load and 'llama' or nil }, 'dpo: saved the policy to')
if held_out then   -- every rank scores (tensor-parallel ranks compute together), the logging one prints
  local after = accuracy(held_out)
  trainer.logger:line(string.format('dpo: held-out preference accuracy before %.4f after %.4f', state.before, after))
end
