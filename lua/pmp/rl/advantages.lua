--- Advantage estimators: GAE for PPO with a critic, group-relative advantages for GRPO, whitening.
local tensor = require 'pmp.tensor'
local masked = require 'pmp.rl.masked'

local M = {}

local function rows_of(t, name)
  if not tensor.is_tensor(t) or t:dim() ~= 2 then error('pmp.rl.gae: ' .. name .. ' must be a [B, T] tensor', 3) end
  return t:double():totable()
end

--- rewards, values, mask [B, T] -> advantages, returns [B, T] (f32, 0 outside the mask). Backwards over
--- each row's response tokens: delta_t = r_t + gamma V_next - V_t, A_t = delta_t + gamma lam A_next, where
--- "next" is the next response token (V = 0 after the last one); returns = A + V. Computed in f64.
function M.gae(rewards, values, mask, gamma, lam)
  gamma, lam = gamma or 1, lam or 0.95
  local r, v, m = rows_of(rewards, 'rewards'), rows_of(values, 'values'), rows_of(mask, 'mask')
  local advantages, returns = {}, {}
  for b = 1, #r do
    local a_row, ret_row = {}, {}
    local next_value, next_advantage = 0, 0
    for t = #r[b], 1, -1 do
      if m[b][t] ~= 0 then
        local delta = r[b][t] + gamma * next_value - v[b][t]
        next_advantage = delta + gamma * lam * next_advantage
        next_value = v[b][t]
        a_row[t], ret_row[t] = next_advantage, next_advantage + v[b][t]
      else
        a_row[t], ret_row[t] = 0, 0
      end
    end
    advantages[b], returns[b] = a_row, ret_row
  end
  return tensor.tensor(advantages, { dtype = 'f32' }), tensor.tensor(returns, { dtype = 'f32' })
end

--- (x - masked mean) / sqrt(masked unbiased variance + 1e-8), as TRL's masked_whiten; 0 outside the mask.
function M.whiten(x, mask)
  return (x - masked.mean(x, mask)) * (masked.var(x, mask) + 1e-8):rsqrt() * mask
end

--- rewards [N] (N = groups x group_size, each group's samples consecutive) -> advantages [N]:
--- (r - group mean) / (group std + 1e-4) with the unbiased std, as TRL's GRPO; opts.scale = false leaves
--- out the division (Dr. GRPO).
function M.group_advantages(rewards, group_size, opts)
  local scale = not (opts and opts.scale == false)
  local values = tensor.is_tensor(rewards) and rewards:double():reshape(-1):totable() or rewards
  if type(values) ~= 'table' then error('pmp.rl.group_advantages: rewards must be a tensor or a list of numbers', 2) end
  if type(group_size) ~= 'number' or group_size < 2 or #values % group_size ~= 0 then
    error(string.format('pmp.rl.group_advantages: group_size %s must be >= 2 and divide the %d rewards',
      tostring(group_size), #values), 2)
  end
  local out = {}
  for first = 1, #values, group_size do
    local sum = 0
    for k = first, first + group_size - 1 do sum = sum + values[k] end
    local mean, squares = sum / group_size, 0
    for k = first, first + group_size - 1 do squares = squares + (values[k] - mean) ^ 2 end
    local std = math.sqrt(squares / (group_size - 1))
    for k = first, first + group_size - 1 do
      out[k] = scale and (values[k] - mean) / (std + 1e-4) or values[k] - mean
    end
  end
  return tensor.tensor(out, { dtype = 'f32' })
end

return M
