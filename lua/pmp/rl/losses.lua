--- The losses of RLHF: PPO's clipped policy and value losses, DPO (sigmoid / IPO / hinge) and the
--- Bradley-Terry pairwise loss of reward models. All keep autograd through their tensor inputs.
local masked = require 'pmp.rl.masked'

local M = {}

-- log sigmoid(x), with its exact gradient 1 - sigmoid(x) everywhere: below -30 it is x to f32 precision
-- (and sigmoid would underflow to 0 under the log).
local function log_sigmoid(x)
  return x:lt(-30):where(x, x:clamp(-30, nil):sigmoid():log())
end
M.log_sigmoid = log_sigmoid

--- Token mean over the mask of max(-A r, -A clip(r, 1 - clip, 1 + clip)) with r = exp(logp - old_logp).
--- Returns the loss (a 0-d tensor) and clipfrac, the share of masked tokens where the clipped term won.
function M.ppo_policy_loss(logp, old_logp, advantages, mask, clip)
  clip = clip or 0.2
  local ratio = (logp - old_logp):exp()
  local unclipped = -advantages * ratio
  local clipped = -advantages * ratio:clamp(1 - clip, 1 + clip)
  local loss = masked.mean(unclipped:maximum(clipped), mask)
  local clipfrac = masked.mean(clipped:gt(unclipped):float(), mask):item()
  return loss, clipfrac
end

--- ½ masked mean of max((V - R)², (clip(V, V_old ± clip) - R)²); returns the loss and the share of
--- masked tokens where the clipped error was the larger.
function M.value_loss(values, old_values, returns, mask, clip)
  clip = clip or 0.2
  local clipped_values = old_values + (values - old_values):clamp(-clip, clip)
  local plain = (values - returns):square()
  local clipped = (clipped_values - returns):square()
  local loss = masked.mean(plain:maximum(clipped), mask) * 0.5
  return loss, masked.mean(clipped:gt(plain):float(), mask):item()
end

--- DPO on summed sequence log-probs [B]. With delta = (policy_chosen - ref_chosen) -
--- (policy_rejected - ref_rejected), per pair:
---   sigmoid: -(1 - ls) log sigmoid(beta delta) - ls log sigmoid(-beta delta)   (cDPO label smoothing ls)
---   ipo:     (delta - 1 / (2 beta))²        (length-normalised IPO: pass per-token mean log-probs)
---   hinge:   relu(1 - beta delta)
--- Returns the batch-mean loss and the implicit rewards beta (policy - ref) of chosen and rejected
--- (detached).
function M.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, opts)
  opts = opts or {}
  local beta, smoothing, kind = opts.beta or 0.1, opts.label_smoothing or 0, opts.loss_type or 'sigmoid'
  local chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
  local delta = chosen_ratio - rejected_ratio
  local losses
  if kind == 'sigmoid' then
    losses = -log_sigmoid(delta * beta) * (1 - smoothing)
    if smoothing ~= 0 then losses = losses - log_sigmoid(delta * -beta) * smoothing end
  elseif kind == 'ipo' then
    losses = (delta - 1 / (2 * beta)):square()
  elseif kind == 'hinge' then
    losses = (1 - delta * beta):relu()
  else
    error("pmp.rl.dpo_loss: loss_type must be 'sigmoid', 'ipo' or 'hinge', got " .. tostring(kind), 2)
  end
  return losses:mean(), (chosen_ratio * beta):detach(), (rejected_ratio * beta):detach()
end

--- Bradley-Terry: mean of -log sigmoid(chosen - rejected).
function M.pairwise_loss(chosen_scores, rejected_scores)
  return (-log_sigmoid(chosen_scores - rejected_scores)):mean()
end

return M
