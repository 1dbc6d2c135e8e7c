--- Means and variances over the positions where mask is 1 (the response tokens of a batch).
local M = {}

function M.count(mask)
  local n = mask:sum():item()
  if n <= 0 then error('pmp.rl: the mask selects no token', 3) end
  return n
end

function M.mean(x, mask) return (x * mask):sum() / M.count(mask) end

--- unbiased (n - 1 in the denominator) as TRL's masked_var is by default
function M.var(x, mask)
  local n = M.count(mask)
  if n < 2 then error('pmp.rl: a masked variance needs at least 2 tokens', 3) end
  local centered = x - M.mean(x, mask)
  return (centered:square() * mask):sum() / (n - 1)
end

return M
