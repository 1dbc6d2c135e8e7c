--- PPO with a critic: rollouts sampled from the actor, rewards from a reward model (--reward-model DIR)
--- or a Lua function (--reward-fn FILE) placed on each answer's last token, a per-token k1 KL penalty to
--- the frozen start policy (--init-kl-coef, adaptive toward --target-kl when given), GAE over answer
--- tokens, whitened advantages, several epochs of clipped policy and value updates over mini-batches.
---   pmp recipes/ppo.lua --load HF_DIR --prompts prompts.jsonl --reward-model RM_DIR [--save-hf OUT]
--- prompts.jsonl holds {"prompt": "text" | [messages]} records (the chat template is applied); reward.lua
--- returns function(prompt, response, sample) -> number. The critic starts as the policy's trunk under a
--- zero score head, or from --critic-model DIR (e.g. the reward model).
---
--- With no --load it runs the embedded default: the sums task (pmp.rl.sums) from the main job's
--- checkpoint fine-tuned on sums, reward 1 for the right sum, and prints the held-out mean reward before
--- and after.
--- Under mpirun each process samples and scores its contiguous share of every rollout's prompts and
--- steps on its share of every mini-batch, the actor's and critic's gradients averaged; every answer is
--- sampled from a stream of its own ((seed, its place in the run), pmp.rl.streams) and advantages are
--- whitened over the whole rollout, so the run logs and trains as one process.
--- --tensor-model-parallel-size N splits the actor, the reference and the critic (its score head whole on
--- each) over N ranks as pretrain.lua does, the data-parallel size being what remains of the world.
local rl, train = pmp.rl, pmp.train
local flags, step = train.flags, train.step
local recipe = require 'pmp.rl.recipe'
local clock = require 'pmp.clock'

local opts = flags.parse(arg, { {
  { '--critic-model', nil, 'Hugging Face directory to start the critic from (default: the policy)' },
  { '--iterations', 80, 'rollout + update rounds', integer = true, min = 0 },
  { '--rollout-batch-size', 64, 'prompts (one answer each) per rollout', integer = true, min = 1 },
  { '--mini-batch-size', 16, 'answers per optimizer step', integer = true, min = 1 },
  { '--ppo-epochs', 4, 'passes over each rollout', integer = true, min = 1 },
  { '--critic-lr', 1e-4, 'critic peak learning rate (the actor\'s schedule otherwise)', min = 0 },
  { '--init-kl-coef', 0.05, 'coefficient of the per-token KL penalty in the reward', min = 0 },
  { '--target-kl', 0, 'adapt the KL coefficient toward this KL per answer (0: fixed)', min = 0 },
  { '--kl-horizon', 10000, 'adaptive KL controller horizon', above = 0 },
  { '--gamma', 1.0, 'discount', min = 0, max = 1 },
  { '--lam', 0.95, 'GAE lambda', min = 0, max = 1 },
  { '--clip-range', 0.2, 'policy ratio clipping', above = 0 },
  { '--value-clip-range', 0.2, 'value clipping around the rollout values', above = 0 },
  { '--vf-coef', 0.1, 'value loss weight', min = 0 },
  { '--log-interval', 1, 'iterations between log lines', integer = true, min = 1 },
}, flags.optimizer, recipe.flags.common, recipe.flags.reference, train.lora.flags, recipe.flags.rollout, flags.checkpoint, {
  -- the shared flags whose defaults or meaning differ here
  { '--load', nil, 'Hugging Face policy directory (default: the embedded sums task)' },
  { '--lr', 1e-4, 'actor peak learning rate' },
  { '--save', nil, 'checkpoint directory (actor/ and critic/; none if not given or ""); one that holds a checkpoint resumes' },
  { '--save-interval', 0, 'iterations between checkpoints (0: only at the end)' },
} }, { usage = 'pmp recipes/ppo.lua [--load HF_DIR --prompts FILE --reward-model DIR] [flags]' })
train.lora.check(opts, opts.save_hf)
recipe.check_tensor_parallel(opts)
local embedded = not opts.load
if opts.rollout_batch_size % opts.mini_batch_size ~= 0 then
  error('--rollout-batch-size must be a multiple of --mini-batch-size', 0)
end

-- The critic's value for answer token t is read where the policy predicts it: at position t - 1.
local function token_values(critic, ids)
  local out = critic(ids)
  return pmp.cat({ pmp.zeros({ out:size(1), 1 }, { dtype = out.dtype }), out:narrow(2, 1, out:size(2) - 1) }, 2)
end

pmp.manual_seed(opts.seed)
local actor, tokenizer, render = recipe.policy(opts)
local prompts = recipe.prompts(opts, tokenizer, render)
local reward = recipe.reward(opts, tokenizer)
local reference = recipe.frozen_copy(actor, opts.ref_dtype)
local critic = opts.critic_model and pmp.models.from_pretrained(opts.critic_model, { head = 'score' })
  or pmp.models.score_model(actor)
-- LoRA: the actor trains adapters on its frozen weights (the reference and critic above start from those)
train.lora.setup(actor, opts, not opts.load and 'llama' or nil)
actor:eval()   -- no dropout anywhere: ratios and values compare like with like
critic:eval()
local layout, actor_ddp = recipe.data_parallel(actor, opts.mini_batch_size, '--mini-batch-size',
  opts.tensor_model_parallel_size, { reference })
local critic_ddp = recipe.ddp(recipe.tensor_parallel(critic, layout), layout)
local function say(line) if layout.is_logger then print(line) end end
local sample_opts = recipe.sample_options(opts, tokenizer)
local sums = require 'pmp.rl.sums'
local function held_out() return sums.held_out_reward(actor, tokenizer, { samples_per_prompt = opts.eval_samples }) end
-- the actor's and the critic's checkpoints, in two directories under --save
local function save_dir(part) return opts.save and opts.save ~= '' and opts.save .. '/' .. part or nil end
local resume = train.Checkpoints.info(save_dir('actor'))
local before = embedded and not resume and held_out()
local critic_flags = setmetatable({ lr = opts.critic_lr }, { __index = opts })
local actor_opt = train.optimizer.adamw(actor, opts, actor_ddp)
local critic_opt = train.optimizer.adamw(critic, critic_flags, critic_ddp)
local actor_lr_at = train.optimizer.schedule(opts, opts.iterations)
local critic_lr_at = train.optimizer.schedule(critic_flags, opts.iterations)
local logger = train.Logger(opts, { name = 'ppo', enabled = layout.is_logger, train_iters = opts.iterations })
local function checkpoints_in(part, exit_interval)
  return train.Checkpoints({ save = save_dir(part), save_interval = opts.save_interval,
    exit_interval = exit_interval }, logger)
end
local actor_checkpoints, critic_checkpoints = checkpoints_in('actor', opts.exit_interval), checkpoints_in('critic', 0)
local kl_ctl = rl.AdaptiveKL(opts.init_kl_coef, opts.target_kl > 0 and opts.target_kl or nil, opts.kl_horizon)
say(string.format('ppo: %d prompts, %d per rollout, mini-batches of %d, %d epochs, %d iterations%s; %s', #prompts,
  opts.rollout_batch_size, opts.mini_batch_size, opts.ppo_epochs, opts.iterations,
  recipe.describe_layout(layout), tostring(actor):match('^[^\n]*')))
local next_prompts, prompt_position = recipe.batches(prompts, opts.rollout_batch_size, opts.seed)
local function actor_state()
  return { model_config = actor.config, args = opts, kl_coef = kl_ctl.value, before = before,
    prompt_order = prompt_position.order, prompt_cursor = prompt_position.cursor }
end
local function critic_state() return { model_config = critic.config } end
local iteration = 0
if resume then
  critic_checkpoints:load(save_dir('critic'), critic, critic_opt)
  local state
  iteration, state = actor_checkpoints:load(save_dir('actor'), actor, actor_opt)   -- its RNG state last
  kl_ctl.value, before = state.kl_coef, state.before
  prompt_position.order, prompt_position.cursor = state.prompt_order, state.prompt_cursor
end
local first_iteration = iteration
while iteration < opts.iterations do
  iteration = iteration + 1
  logger:begin_iteration(iteration)
  actor_opt.lr, critic_opt.lr = actor_lr_at(iteration), critic_lr_at(iteration)
  local t0 = clock.now()
  -- this rank's prompts; the answer to the run's prompt number n samples from (seed, n)
  local first_prompt = prompt_position.cursor + layout.dp_rank * opts.rollout_batch_size / layout.dp
  local batch_prompts = recipe.rank_share(next_prompts(), layout)
  local row_seeds = {}
  for k = 1, #batch_prompts do row_seeds[k] = rl.streams.key(opts.seed, 'sample', first_prompt + k) end
  sample_opts.row_seeds = row_seeds
  local samples = rl.rollout.sample(actor, batch_prompts, sample_opts)
  local scores = reward(samples, tokenizer)
  local rows = {}
  for k, s in ipairs(samples) do rows[k] = { s.prompt, s.response } end
  local batch = rl.sequences.collate(rows, tokenizer.pad_id or 0)
  local mask = batch.mask
  local old_logp, old_values = pmp.no_grad(function()
    return rl.sequence_logprobs(actor, batch.ids, mask, { temperature = opts.temperature }), token_values(critic, batch.ids) * mask
  end)
  local t1 = clock.now()
  local ref_logp = pmp.no_grad(rl.sequence_logprobs, reference, batch.ids, mask, { temperature = opts.temperature })
  local t2 = clock.now()
  -- rewards: -beta KL on every answer token, the score added on the last one
  local kl = rl.kl(old_logp, ref_logp, 'k1') * mask
  local score_at_end = {}
  for b, s in ipairs(scores) do
    score_at_end[b] = {}
    for t = 1, batch.ids:size(2) do score_at_end[b][t] = t == batch.last[b] and s or 0 end
  end
  local rewards = pmp.tensor(score_at_end, { dtype = 'f32' }) - kl * kl_ctl.value
  local advantages, returns = rl.gae(rewards, old_values, mask, opts.gamma, opts.lam)
  advantages = recipe.whiten(advantages, mask, layout)
  local sums_of = { policy = 0, value = 0, clipfrac = 0, entropy = 0, steps = 0 }
  for epoch = 1, opts.ppo_epochs do
    local order = rl.streams.key(opts.seed, 'minibatches', iteration, epoch)
    for _, index in ipairs(recipe.minibatches(opts.rollout_batch_size, opts.mini_batch_size, order, layout)) do
      local function rows_of(t) return t:index_select(1, index) end
      local ids, m = rows_of(batch.ids), rows_of(mask)
      -- token means over this rank's rows, weighted into their part of the whole mini-batch's
      local share = recipe.token_share(m, layout)
      step.zero_grad(actor_opt, actor_ddp)
      step.zero_grad(critic_opt, critic_ddp)
      local logp, entropy = rl.sequence_logprobs(actor, ids, m, { temperature = opts.temperature, entropy = true })
      local policy_loss, clipfrac = rl.ppo_policy_loss(logp, rows_of(old_logp), rows_of(advantages), m, opts.clip_range)
      local value_loss = rl.value_loss(token_values(critic, ids), rows_of(old_values), rows_of(returns), m,
        opts.value_clip_range)
      local loss = policy_loss + value_loss * opts.vf_coef
      ;(share == 1 and loss or loss * share):backward()
      step.finish_grads(actor, actor_ddp)
      step.finish_grads(critic, critic_ddp)
      step.clip_grads(actor, actor_opt, opts.clip_grad)
      step.clip_grads(critic, critic_opt, opts.clip_grad)
      actor_opt:step()
      critic_opt:step()
      sums_of.policy = sums_of.policy + policy_loss:item() * share
      sums_of.value = sums_of.value + value_loss:item() * share
      sums_of.clipfrac = sums_of.clipfrac + clipfrac * share
      sums_of.entropy = sums_of.entropy + ((entropy:sum()) / m:sum()):item() * share
      sums_of.steps = sums_of.steps + 1
    end
  end
  local n = sums_of.steps
  local reward_mean, kl_per_answer, response_length, policy_loss, value_loss, clipfrac, entropy = unpack(
    recipe.mean_over_ranks({ rl.rollout.mean(scores), kl:sum():item() / #samples, mask:sum():item() / #samples,
      sums_of.policy / n, sums_of.value / n, sums_of.clipfrac / n, sums_of.entropy / n }, layout))
  local t3 = clock.now()
  local coef = kl_ctl.value
  kl_ctl:update(kl_per_answer, opts.rollout_batch_size)
  -- every rank evaluates (tensor-parallel ranks generate together), the logging one prints
  if embedded and opts.eval_interval > 0 and iteration % opts.eval_interval == 0 and iteration < opts.iterations then
    say(string.format(' iteration %6d/%6d | held-out mean reward: %.4f |', iteration, opts.iterations, held_out()))
  end
  if layout.is_logger and (iteration % opts.log_interval == 0 or iteration == opts.iterations) then
    print(string.format(' iteration %6d/%6d | reward mean: %.4f | kl: %.5f | kl coef: %.4f | entropy: %.4f | ' ..
      'policy loss: %.5f | value loss: %.5f | clipfrac: %.4f | response length: %.2f | ' ..
      'time (s) rollout %.2f reference %.2f update %.2f |', iteration, opts.iterations, reward_mean,
      kl_per_answer, coef, entropy, policy_loss, value_loss, clipfrac, response_length, t1 - t0, t2 - t1, t3 - t2))
  end
  recipe.scalars(logger, iteration, { ['reward mean'] = reward_mean, kl = kl_per_answer, ['kl coef'] = coef,
    entropy = entropy, ['policy loss'] = policy_loss, ['value loss'] = value_loss, clipfrac = clipfrac,
    ['response length'] = response_length, ['learning-rate'] = actor_opt.lr })
  actor_checkpoints:save_if_due(iteration, actor, actor_opt, actor_state)
  critic_checkpoints:save_if_due(iteration, critic, critic_opt, critic_state)
  if actor_checkpoints:exit_due(iteration) then break end
end
actor_checkpoints:finish(iteration, actor, actor_opt, actor_state)
critic_checkpoints:finish(iteration, critic, critic_opt, critic_state)
logger:finish(iteration - first_iteration)
recipe.save_model(actor, layout, opts, { model_type = embedded and 'llama' or nil }, 'ppo: saved the actor to')
if embedded then say(string.format('ppo: held-out mean reward before %.4f after %.4f', before, held_out())) end
