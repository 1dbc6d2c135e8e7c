-- DPO (and IPO, hinge) on preference pairs: the policy's summed answer log-probs against a frozen
-- reference (the start policy), computed on the fly.
--   pmp recipes/dpo.lua --load HF_DIR --data-path prefs.jsonl [--eval-data-path held.jsonl] --save-hf OUT
-- prefs.jsonl holds TRL's preference records: {"prompt", "chosen", "rejected"} strings, or
-- "chosen"/"rejected" message lists (with or without a "prompt" list); the chat template is applied.
-- --loss-type ipo uses per-token mean log-probs (the IPO authors' normalisation, as TRL).
--
-- With no --load it runs the embedded default: pairs of the sums task (pmp.rl.sums), the right sum
-- chosen over a wrong one, from the main job's checkpoint fine-tuned on sums, and prints the held-out
-- preference accuracy (pairs where the implicit reward beta (log pi - log pi_ref) of the chosen answer
-- is the higher; ties, as at the start, count half) before and after.
local rl = pmp.rl
local recipe = require 'pmp.rl.recipe'
local clock = require 'pmp.clock'

local FLAGS = recipe.flags('preference', {
  { '--load', nil, 'Hugging Face policy directory (default: the embedded sums task)' },
  { '--train-iters', 200, 'optimizer steps' },
  { '--batch-size', 32, 'pairs per step' },
  { '--lr', 2e-5, 'AdamW learning rate' },
  { '--beta', 0.1, 'DPO beta' },
  { '--label-smoothing', 0.0, 'cDPO label smoothing (sigmoid loss)' },
  { '--loss-type', 'sigmoid', 'sigmoid, ipo or hinge' },
  { '--log-interval', 20, 'steps between log lines' },
})
local opts, fail = recipe.parse('dpo', FLAGS, 'pmp recipes/dpo.lua [--load HF_DIR --data-path FILE.jsonl] [flags]')
if opts.load and not opts.data_path then fail('--data-path FILE.jsonl is required with --load') end

local ok, err = pcall(function()
  pmp.manual_seed(opts.seed)
  local policy, tokenizer, render = recipe.policy(opts)
  local reference = recipe.frozen_copy(policy)
  policy:eval()   -- no dropout
  local train, held_out = recipe.preference_pairs(opts, tokenizer, render)
  local pad = tokenizer.pad_id or 0
  local mean_per_token = opts.loss_type == 'ipo'

  -- summed (or, for IPO, per-token mean) answer log-probs of chosen and rejected under a model
  local function logps(model, batch, n)
    local per_token = rl.sequence_logprobs(model, batch.ids, batch.mask)
    local total = per_token:sum(2)
    if mean_per_token then total = total / batch.mask:sum(2) end
    return total:narrow(1, 1, n), total:narrow(1, n + 1, n)
  end
  local function accuracy(pairs)
    local chosen, rejected = {}, {}
    for first = 1, #pairs, 64 do
      local part = { unpack(pairs, first, math.min(first + 63, #pairs)) }
      local batch = rl.preference.collate(part, pad, opts.max_length)
      pmp.no_grad(function()
        local pc, pr = logps(policy, batch, #part)
        local rc, rr = logps(reference, batch, #part)
        local _, c, r = rl.dpo_loss(pc, pr, rc, rr, { beta = opts.beta })
        for _, v in ipairs(c:double():totable()) do chosen[#chosen + 1] = v end
        for _, v in ipairs(r:double():totable()) do rejected[#rejected + 1] = v end
      end)
    end
    return recipe.pair_accuracy(chosen, rejected)
  end
  local before = held_out and accuracy(held_out)
  local optimizer = pmp.optim.AdamW(pmp.optim.decay_groups(policy), { lr = opts.lr, weight_decay = 0 })
  local params = policy:parameters()
  print(string.format('dpo: %d training pairs, %s held-out; %d steps of %d pairs; loss %s, beta %g; %s', #train,
    held_out and tostring(#held_out) or 'no', opts.train_iters, opts.batch_size, opts.loss_type, opts.beta,
    tostring(policy):match('^[^\n]*')))
  local next_batch = recipe.batches(train, opts.batch_size)
  local start, loss_sum, acc_sum, margin_sum, count = clock.now(), 0, 0, 0, 0
  for iteration = 1, opts.train_iters do
    local pairs = next_batch()
    local batch = rl.preference.collate(pairs, pad, opts.max_length)
    local rc, rr = pmp.no_grad(logps, reference, batch, #pairs)
    optimizer:zero_grad()
    local pc, pr = logps(policy, batch, #pairs)
    local loss, chosen, rejected = rl.dpo_loss(pc, pr, rc, rr, { beta = opts.beta,
      label_smoothing = opts.label_smoothing, loss_type = opts.loss_type })
    loss:backward()
    local grad_norm = opts.clip_grad > 0 and pmp.optim.clip_grad_norm(params, opts.clip_grad) or pmp.optim.grad_norm(params)
    optimizer:step()
    loss_sum, count = loss_sum + loss:item(), count + 1
    acc_sum = acc_sum + recipe.pair_accuracy(chosen:double():totable(), rejected:double():totable())
    margin_sum = margin_sum + (chosen - rejected):mean():item()
    if iteration % opts.log_interval == 0 or iteration == opts.train_iters then
      local now = clock.now()
      print(string.format(' iteration %8d/%8d | elapsed time per iteration (ms): %.1f | learning rate: %.6E | ' ..
        'dpo loss: %.6E | rewards accuracy: %.4f | rewards margin: %.4f | grad norm: %.3f |', iteration, opts.train_iters,
        (now - start) * 1000 / count, opts.lr, loss_sum / count, acc_sum / count, margin_sum / count, grad_norm))
      start, loss_sum, acc_sum, margin_sum, count = now, 0, 0, 0, 0
    end
  end
  if opts.save then
    pmp.checkpoint.save(opts.save, opts.train_iters, policy, optimizer, { model_config = policy.config, args = opts })
    print(' saved checkpoint to ' .. opts.save)
  end
  if opts.save_hf then
    policy:save_pretrained(opts.save_hf, { model_type = not opts.load and 'llama' or nil })
    print('dpo: saved the policy to ' .. opts.save_hf)
  end
  if held_out then print(string.format('dpo: held-out preference accuracy before %.4f after %.4f', before, accuracy(held_out))) end
end)
if not ok then fail(err) end
