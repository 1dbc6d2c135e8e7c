--- Per-token KL estimators (Schulman, "Approximating KL divergence") and the adaptive KL coefficient.
local M = {}

--- logp, ref_logp [B, T]: k1 = logp - ref (unbiased, what goes into PPO's reward), k2 = ½(logp - ref)²,
--- k3 = exp(ref - logp) - (ref - logp) - 1 (non-negative, low variance: GRPO's loss term).
function M.kl(logp, ref_logp, kind)
  local log_ratio = logp - ref_logp
  if kind == 'k1' then return log_ratio end
  if kind == 'k2' then return log_ratio:square() * 0.5 end
  if kind == 'k3' then return (-log_ratio):exp() + log_ratio - 1 end
  error("pmp.rl.kl: kind must be 'k1', 'k2' or 'k3', got " .. tostring(kind), 2)
end

--- Ziegler et al. (2019): the coefficient grows when the measured KL exceeds the target and shrinks
--- below it, by at most 20% of n_steps/horizon per update. Without a target it stays fixed.
function M.AdaptiveKL(init_coef, target, horizon)
  local controller = { value = init_coef, target = target, horizon = horizon or 10000 }
  function controller.update(self, current_kl, n_steps)
    if not self.target then return self.value end
    local err = math.max(-0.2, math.min(0.2, current_kl / self.target - 1))
    self.value = self.value * (1 + err * n_steps / self.horizon)
    return self.value
  end
  return controller
end

return M
