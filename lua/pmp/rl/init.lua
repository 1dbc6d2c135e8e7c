--- pmp.rl: the pieces of RLHF loops (reward models, DPO, PPO, GRPO) that users compose in their own
--- scripts; recipes/rm.lua, dpo.lua, ppo.lua and grpo.lua are built on them.
--- Tensors are f32 [B, T] with 1-based dims; `mask` is 1 on response tokens and 0 elsewhere.
---
---   sequence_logprobs(model, ids, mask [, opts])      per-token log-probs of ids[:, t] given the prefix
---   sequence_scores(model, ids, pad_id)               a score head's value at each row's last non-pad token
---   kl(logp, ref_logp, 'k1' | 'k2' | 'k3')            per-token KL estimators
---   gae(rewards, values, mask, gamma, lam)            advantages, returns
---   whiten(x, mask)                                   masked mean/variance normalisation
---   group_advantages(rewards, group_size [, opts])    GRPO's group-relative advantages
---   ppo_policy_loss / value_loss / dpo_loss / pairwise_loss
---   AdaptiveKL(init_coef, target, horizon)            Ziegler et al.'s KL coefficient controller
---   preference                                        preference-pair data (pmp.rl.preference)
---   sequences                                         prompt + answer lists as [B, T] tensors
---   rollout                                           sampling answers and scoring them with a reward
---   streams                                           random streams keyed by (seed, place in the run)
local M = {}
for _, part in ipairs({ 'pmp.rl.logprobs', 'pmp.rl.kl', 'pmp.rl.advantages', 'pmp.rl.losses' }) do
  for name, fn in pairs(require(part)) do M[name] = fn end
end
M.preference = require 'pmp.rl.preference'
M.sequences = require 'pmp.rl.sequences'
M.rollout = require 'pmp.rl.rollout'
M.streams = require 'pmp.rl.streams'
return M
