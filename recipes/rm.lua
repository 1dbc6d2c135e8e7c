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
--- Under mpirun each process takes its share of every batch of pairs and the gradients are averaged;
--- --tensor-model-parallel-size N splits the model over N ranks as pretrain.lua does (the score head
--- stays whole on each), the data-parallel size being what remains of the world.
--- --lora-rank N trains LoRA adapters on the frozen trunk and the whole score head beside them (PEFT's
--- SEQ_CLS task: --save-lora writes both, as PEFT's modules_to_save keeps the head; --merge-lora --save-hf
--- the merged reward model).
local rl, train = pmp.rl, pmp.train
local flags = train.flags
local recipe = require 'pmp.rl.recipe'
local pair_training = require 'pmp.rl.pair_training'

local opts = flags.parse(arg, { {
  { '--train-iters', 300, 'optimizer steps', integer = true, min = 0 },
  { '--batch-size', 32, 'pairs per step (over all processes)', integer = true, min = 1 },
  { '--log-interval', 20, 'steps between log lines', integer = true, min = 1 },
}, flags.optimizer, recipe.flags.common, train.lora.flags, recipe.flags.preference, flags.checkpoint, recipe.flags.resume, {
  -- the shared flags whose defaults or meaning differ here
  { '--lr', 1e-4, 'AdamW peak learning rate' },
  { '--lr-decay-style', 'cosine', 'cosine, linear, constant or WSD' },
} }, { usage = 'pmp recipes/rm.lua [--load HF_DIR --data-path FILE.jsonl] [flags]' })
train.lora.check(opts, opts.save_hf)
recipe.check_tensor_parallel(opts)
if opts.load and not opts.data_path then error('--data-path FILE.jsonl is required with --load', 0) end

pmp.manual_seed(opts.seed)
local model, tokenizer, render = recipe.policy(opts, { head = 'score' })
if pmp.no_grad(function() return model.score.weight:abs():sum():item() end) == 0 then
  -- a head made for a causal LM starts at zero; small random values give the pairs different scores
  pmp.no_grad(function() model.score.weight:copy_(pmp.randn(model.score.weight.shape) * 0.02) end)
end
train.lora.setup(model, opts, not opts.load and 'llama' or nil)
model:eval()   -- no dropout
local layout, ddp = recipe.data_parallel(model, opts.batch_size, '--batch-size', opts.tensor_model_parallel_size)
local train_pairs, held_out = recipe.preference_pairs(opts, tokenizer, render)
local pad = tokenizer.pad_id or 0

-- chosen and rejected scores of a list of pairs
local function scores(pairs)
  local batch = rl.preference.collate(pairs, pad, opts.max_length)
  local s = rl.sequence_scores(model, batch.ids, batch.last)
  return s:narrow(1, 1, #pairs), s:narrow(1, #pairs + 1, #pairs)
end
local function accuracy(pairs) return recipe.pairs_accuracy(pairs, scores) end
local trainer = pair_training.new(opts, { name = 'rm', model = model, layout = layout, ddp = ddp, pairs = train_pairs,
  metrics = { { 'pairwise loss', '%.6E' }, { 'accuracy', '%.4f' } } })
local state = { before = held_out and not trainer.resuming and accuracy(held_out) or nil }
trainer.logger:line(string.format('rm: %d training pairs, %s held-out; %d steps of %d pairs%s; %s', #train_pairs,
  held_out and tostring(#held_out) or 'no', opts.train_iters, opts.batch_size,
  recipe.describe_layout(layout), tostring(model):match('^[^\n]*')))
trainer:train(function(pairs)
  local chosen, rejected = scores(pairs)
  return rl.pairwise_loss(chosen, rejected),
    { recipe.pair_accuracy(chosen:detach():double():totable(), rejected:detach():double():totable()) }
end, state)
recipe.save_model(model, layout, opts, { model_type = not opts.load and 'llama' or nil, pad_token_id = tokenizer.pad_id },
  'rm: saved the reward model to')
if held_out then   -- every rank scores (tensor-parallel ranks compute together), the logging one prints
  local after = accuracy(held_out)
  trainer.logger:line(string.format('rm: held-out pairwise accuracy before %.4f after %.4f', state.before, after))
end
