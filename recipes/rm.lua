--- Reward-model training on preference pairs: a score head on the last token of each answer, the
--- Bradley-Terry loss -log sigmoid(score(chosen) - score(rejected)).
---   pmp recipes/rm.lua --load HF_DIR --data-path prefs.jsonl [--eval-data-path held.jsonl] --save-hf OUT
--- prefs.jsonl holds TRL's preference records: {"prompt", "chosen", "rejected"} strings, or
--- "chosen"/"rejected" message lists (with or without a "prompt" list); the chat template is applied.
--- HF_DIR is a causal LM (the head starts at random) or a *ForSequenceClassification model.
---
--- With no --load it runs the embedded default: pairs of the sums task (pmp.rl.sums), the right sum
--- chosen over a wrong one, from the main job's checkpoint fine-tuned on sums, and prints the held-out
--- pairwise accuracy at initialisation and after training.
local rl, train = pmp.rl, pmp.train
local flags, step = train.flags, train.step
local recipe = require 'pmp.rl.recipe'
local clock = require 'pmp.clock'

local opts = flags.parse(arg, { {
  { '--load', nil, 'Hugging Face model directory (default: the embedded sums task)' },
  { '--train-iters', 300, 'optimizer steps' },
  { '--batch-size', 32, 'pairs per step' },
  { '--log-interval', 20, 'steps between log lines' },
}, flags.optimizer, recipe.flags.common, recipe.flags.preference, {
  -- the shared flags whose defaults or meaning differ here
  { '--lr', 1e-4, 'AdamW peak learning rate' },
  { '--lr-decay-style', 'cosine', 'cosine, linear, constant or WSD' },
} }, { usage = 'pmp recipes/rm.lua [--load HF_DIR --data-path FILE.jsonl] [flags]' })
recipe.require_one_process()
if opts.load and not opts.data_path then error('--data-path FILE.jsonl is required with --load', 0) end

pmp.manual_seed(opts.seed)
local model, tokenizer, render = recipe.policy(opts, { head = 'score' })
if pmp.no_grad(function() return model.score.weight:abs():sum():item() end) == 0 then
  -- a head made for a causal LM starts at zero; small random values give the pairs different scores
  pmp.no_grad(function() model.score.weight:copy_(pmp.randn(model.score.weight.shape) * 0.02) end)
end
model:eval()   -- no dropout
local train_pairs, held_out = recipe.preference_pairs(opts, tokenizer, render)
local pad = tokenizer.pad_id or 0

-- chosen and rejected scores of a list of pairs
local function scores(pairs)
  local batch = rl.preference.collate(pairs, pad, opts.max_length)
  local s = rl.sequence_scores(model, batch.ids, batch.last)
  return s:narrow(1, 1, #pairs), s:narrow(1, #pairs + 1, #pairs)
end
local function accuracy(pairs) return recipe.pairs_accuracy(pairs, scores) end
local before = held_out and accuracy(held_out)
local optimizer = train.optimizer.adamw(model, opts)
local lr_at = train.optimizer.schedule(opts, opts.train_iters)
local logger = train.Logger(opts, { name = 'rm', train_iters = opts.train_iters })
local checkpoints = train.Checkpoints({ save = opts.save, save_interval = 0 }, logger)
print(string.format('rm: %d training pairs, %s held-out; %d steps of %d pairs; %s', #train_pairs,
  held_out and tostring(#held_out) or 'no', opts.train_iters, opts.batch_size, tostring(model):match('^[^\n]*')))
local next_batch = recipe.batches(train_pairs, opts.batch_size)
local start, loss_sum, acc_sum, count = clock.now(), 0, 0, 0
for iteration = 1, opts.train_iters do
  logger:begin_iteration(iteration)
  optimizer.lr = lr_at(iteration)
  optimizer:zero_grad()
  local chosen, rejected = scores(next_batch())
  local loss = rl.pairwise_loss(chosen, rejected)
  loss:backward()
  local grad_norm = step.clip_grads(model, optimizer, opts.clip_grad)
  optimizer:step()
  loss_sum, count = loss_sum + loss:item(), count + 1
  acc_sum = acc_sum + recipe.pair_accuracy(chosen:detach():double():totable(), rejected:detach():double():totable())
  if iteration % opts.log_interval == 0 or iteration == opts.train_iters then
    local now = clock.now()
    print(string.format(' iteration %8d/%8d | elapsed time per iteration (ms): %.1f | learning rate: %.6E | ' ..
      'pairwise loss: %.6E | accuracy: %.4f | grad norm: %.3f |', iteration, opts.train_iters,
      (now - start) * 1000 / count, optimizer.lr, loss_sum / count, acc_sum / count, grad_norm))
    start, loss_sum, acc_sum, count = now, 0, 0, 0
  end
end
checkpoints:finish(opts.train_iters, model, optimizer, function() return { model_config = model.config, args = opts } end)
logger:finish(opts.train_iters)
if opts.save_hf then
  model:save_pretrained(opts.save_hf, { model_type = not opts.load and 'llama' or nil, pad_token_id = tokenizer.pad_id })
  print('rm: saved the reward model to ' .. opts.save_hf)
end
if held_out then print(string.format('rm: held-out pairwise accuracy before %.4f after %.4f', before, accuracy(held_out))) end
