--- GRPO: G sampled answers per prompt, each rewarded, advantages relative to the prompt's group
--- ((r - group mean) / (group std + 1e-4), Dr. GRPO's unscaled form with --no-scale-rewards), the
--- clipped policy loss over answer tokens plus a k3 KL term to the frozen start policy (--kl-coef), no critic.
---   pmp recipes/grpo.lua --load HF_DIR --prompts prompts.jsonl --reward-fn reward.lua [--save-hf OUT]
--- prompts.jsonl holds {"prompt": "text" | [messages]} records (the chat template is applied);
--- reward.lua returns function(prompt, response, sample) -> number; --reward-model DIR scores with a
--- *ForSequenceClassification model instead.
---
--- With no --load it runs the embedded default: the sums task (pmp.rl.sums) from the main job's
--- checkpoint fine-tuned on sums, reward 1 for the right sum, and prints the held-out mean reward before
--- and after.
--- Under mpirun each process samples and scores its contiguous share of every iteration's prompts and
--- steps on its share of every mini-batch, the gradients averaged; every answer is sampled from a stream
--- of its own ((seed, its place in the run), pmp.rl.streams), so the run logs and trains as one process.
--- --tensor-model-parallel-size N splits the policy and the reference over N ranks as pretrain.lua does
--- (they sample together, each answer from its own stream), the data-parallel size being what remains.
local rl, train = pmp.rl, pmp.train
local flags, step = train.flags, train.step
local recipe = require 'pmp.rl.recipe'
local clock = require 'pmp.clock'

local opts = flags.parse(arg, { {
  { '--load', nil, 'Hugging Face policy directory (default: the embedded sums task)' },
  { '--iterations', 100, 'rollouts', integer = true, min = 0 },
  { '--prompts-per-iteration', 32, 'prompts sampled per rollout', integer = true, min = 1 },
  { '--num-generations', 4, 'answers per prompt (G)', integer = true, min = 2 },
  { '--epochs', 4, 'passes over each rollout (TRL\'s num_iterations, mu); later passes are clipped', integer = true, min = 1 },
  { '--mini-batch-size', 32, 'answers per optimizer step', integer = true, min = 1 },
  { '--kl-coef', 0.01, 'weight of the k3 KL to the start policy in the loss', min = 0 },
  { '--clip-range', 0.2, 'policy ratio clipping', above = 0 },
  { '--no-scale-rewards', false, 'only centre rewards in each group (Dr. GRPO)' },
  { '--log-interval', 1, 'iterations between log lines', integer = true, min = 1 },
}, flags.optimizer, recipe.flags.common, recipe.flags.reference, train.lora.flags, recipe.flags.rollout, flags.checkpoint, recipe.flags.resume, {
  -- the shared flags whose defaults or meaning differ here
  { '--load', nil, 'Hugging Face policy directory (default: the embedded sums task)' },
  { '--lr', 5e-5, 'AdamW peak learning rate' },
  { '--lr-decay-style', 'cosine', 'cosine, linear, constant or WSD' },
} }, { usage = 'pmp recipes/grpo.lua [--load HF_DIR --prompts FILE --reward-fn FILE] [flags]' })
train.lora.check(opts, opts.save_hf)
recipe.check_tensor_parallel(opts)
local embedded = not opts.load

pmp.manual_seed(opts.seed)
local policy, tokenizer, render = recipe.policy(opts)
local prompts = recipe.prompts(opts, tokenizer, render)
local reward = recipe.reward(opts, tokenizer)
local reference = recipe.frozen_copy(policy, opts.ref_dtype)
-- LoRA: the policy trains adapters on its frozen weights (the reference above is a copy of those)
train.lora.setup(policy, opts, not opts.load and 'llama' or nil)
local G = opts.num_generations
local sample_opts = recipe.sample_options(opts, tokenizer)
local sums = require 'pmp.rl.sums'
local function held_out() return sums.held_out_reward(policy, tokenizer, { samples_per_prompt = opts.eval_samples }) end
policy:eval()   -- no dropout: the ratio compares the sampled distribution with itself
local layout, ddp = recipe.data_parallel(policy, opts.prompts_per_iteration, '--prompts-per-iteration',
  opts.tensor_model_parallel_size, { reference })
local mini_batch_size = math.min(opts.mini_batch_size, opts.prompts_per_iteration * G)   -- at most the rollout
if mini_batch_size % layout.dp ~= 0 or (opts.prompts_per_iteration * G) % mini_batch_size ~= 0 then
  error(string.format('--mini-batch-size %d must divide the %d answers per iteration and be a multiple of the %d ' ..
    'data-parallel processes', opts.mini_batch_size, opts.prompts_per_iteration * G, layout.dp), 0)
end
local function say(line) if layout.is_logger then print(line) end end
local optimizer = train.optimizer.adamw(policy, opts, ddp)
local lr_at = train.optimizer.schedule(opts, opts.iterations)
local logger = train.Logger(opts, { name = 'grpo', enabled = layout.is_logger, train_iters = opts.iterations })
local checkpoints = train.Checkpoints(opts, logger)
local resume = train.Checkpoints.info(checkpoints.dir)
local before = embedded and not resume and held_out()
say(string.format('grpo: %d prompts, %d per iteration x %d answers, %d iterations%s; %s', #prompts,
  opts.prompts_per_iteration, G, opts.iterations, recipe.describe_layout(layout),
  tostring(policy):match('^[^\n]*')))
local next_prompts, prompt_position = recipe.batches(prompts, opts.prompts_per_iteration, opts.seed)
local function checkpoint_state()
  return { model_config = policy.config, args = opts, before = before, prompt_order = prompt_position.order,
    prompt_cursor = prompt_position.cursor }
end
local iteration = 0
if resume then   -- after everything that draws random numbers: the restored generators are the ones used
  local state
  iteration, state = checkpoints:load(checkpoints.dir, policy, optimizer)
  before, prompt_position.order, prompt_position.cursor = state.before, state.prompt_order, state.prompt_cursor
end
local first_iteration = iteration
while iteration < opts.iterations do
  iteration = iteration + 1
  logger:begin_iteration(iteration)
  local t0 = clock.now()
  optimizer.lr = lr_at(iteration)
  -- this rank's prompts, G answers each; answer g to the run's prompt number n samples from (seed, n, g)
  local first_prompt = prompt_position.cursor + layout.dp_rank * opts.prompts_per_iteration / layout.dp
  local batch_prompts, row_seeds = {}, {}
  for k, p in ipairs(recipe.rank_share(next_prompts(), layout)) do
    for g = 1, G do
      batch_prompts[#batch_prompts + 1] = p
      row_seeds[#row_seeds + 1] = rl.streams.key(opts.seed, 'sample', first_prompt + k, g)
    end
  end
  sample_opts.row_seeds = row_seeds
  local samples = rl.rollout.sample(policy, batch_prompts, sample_opts)
  local rewards = reward(samples, tokenizer)
  local advantages = rl.group_advantages(rewards, G, { scale = not opts.no_scale_rewards })
  local rows = {}
  for k, s in ipairs(samples) do rows[k] = { s.prompt, s.response } end
  local batch = rl.sequences.collate(rows, tokenizer.pad_id or 0)
  local t1 = clock.now()
  local ref_logp = pmp.no_grad(rl.sequence_logprobs, reference, batch.ids, batch.mask, { temperature = opts.temperature })
  local t2 = clock.now()
  local old_logp = pmp.no_grad(rl.sequence_logprobs, policy, batch.ids, batch.mask, { temperature = opts.temperature })
  local token_advantages = advantages:view(-1, 1) * batch.mask
  local sums_of = { loss = 0, kl = 0, entropy = 0, clipfrac = 0, grad_norm = 0, steps = 0 }
  for epoch = 1, opts.epochs do
    local order = rl.streams.key(opts.seed, 'minibatches', iteration, epoch)
    for _, index in ipairs(recipe.minibatches(#samples * layout.dp, mini_batch_size, order, layout)) do
      local function rows_of(t) return t:index_select(1, index) end
      local m = rows_of(batch.mask)
      -- token means over this rank's rows, weighted into their part of the whole mini-batch's
      local share = recipe.token_share(m, layout)
      step.zero_grad(optimizer, ddp)
      local logp, entropy = rl.sequence_logprobs(policy, rows_of(batch.ids), m, { temperature = opts.temperature, entropy = true })
      local policy_loss, clipfrac = rl.ppo_policy_loss(logp, rows_of(old_logp), rows_of(token_advantages), m, opts.clip_range)
      local kl = (rl.kl(logp, rows_of(ref_logp), 'k3') * m):sum() / m:sum()
      local loss = policy_loss + kl * opts.kl_coef
      ;(share == 1 and loss or loss * share):backward()
      step.finish_grads(policy, ddp)
      local grad_norm = step.clip_grads(policy, optimizer, opts.clip_grad)
      optimizer:step()
      sums_of.loss, sums_of.kl = sums_of.loss + loss:item() * share, sums_of.kl + kl:item() * share
      sums_of.entropy = sums_of.entropy + (entropy:sum() / m:sum()):item() * share
      sums_of.clipfrac, sums_of.grad_norm = sums_of.clipfrac + clipfrac * share, sums_of.grad_norm + grad_norm
      sums_of.steps = sums_of.steps + 1
    end
  end
  local reward_mean, response_length, loss_mean, kl_mean, entropy_mean, clipfrac_mean = unpack(recipe.mean_over_ranks({
    rl.rollout.mean(rewards), batch.mask:sum():item() / #samples, sums_of.loss / sums_of.steps, sums_of.kl / sums_of.steps,
    sums_of.entropy / sums_of.steps, sums_of.clipfrac / sums_of.steps }, layout))
  local t3 = clock.now()
  -- every rank evaluates (tensor-parallel ranks generate together), the logging one prints
  if embedded and opts.eval_interval > 0 and iteration % opts.eval_interval == 0 and iteration < opts.iterations then
    say(string.format(' iteration %6d/%6d | held-out mean reward: %.4f |', iteration, opts.iterations, held_out()))
  end
  if layout.is_logger and (iteration % opts.log_interval == 0 or iteration == opts.iterations) then
    local n = sums_of.steps
    print(string.format(' iteration %6d/%6d | reward mean: %.4f | kl: %.5f | entropy: %.4f | loss: %.5f | ' ..
      'clipfrac: %.4f | response length: %.2f | grad norm: %.3f | time (s) rollout %.2f reference %.2f update %.2f |',
      iteration, opts.iterations, reward_mean, kl_mean, entropy_mean, loss_mean, clipfrac_mean, response_length,
      sums_of.grad_norm / n, t1 - t0, t2 - t1, t3 - t2))
  end
  local n = sums_of.steps
  recipe.scalars(logger, iteration, { ['reward mean'] = reward_mean, kl = kl_mean, entropy = entropy_mean,
    loss = loss_mean, clipfrac = clipfrac_mean, ['response length'] = response_length,
    ['grad-norm'] = sums_of.grad_norm / n, ['learning-rate'] = optimizer.lr })
  checkpoints:save_if_due(iteration, policy, optimizer, checkpoint_state)
  if checkpoints:exit_due(iteration) then break end
end
checkpoints:finish(iteration, policy, optimizer, checkpoint_state)
logger:finish(iteration - first_iteration)
recipe.save_model(policy, layout, opts, { model_type = embedded and 'llama' or nil }, 'grpo: saved the policy to')
if embedded then say(string.format('grpo: held-out mean reward before %.4f after %.4f', before, held_out())) end
