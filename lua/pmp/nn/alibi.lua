-- ALiBi (Press et al., "Train Short, Test Long"): no position embedding; each attention head adds
-- slope * (key position - query position) to its scores, so distant keys weigh less, each head at its
-- own rate. The fused attention op takes the slopes (F.attention's alibi_slopes); this file says what
-- they are. GPTModel uses them with config.position_embedding_type = 'alibi' (BLOOM, Baichuan-13B, and
-- Falcon-RW, whose config.alibi_slope_scale = 1/sqrt(head_dim) because it adds the biases before
-- dividing the scores by sqrt(head_dim)).
local tensor = require 'pmp.tensor'

local M = {}

--- slopes(num_heads, scale) -> f64 tensor [num_heads]: the geometric sequence 2^(-8 i / m), i = 1..m,
--- for the largest power of two m <= num_heads; the heads past m take the odd terms (i = 1, 3, 5, ...)
--- of the sequence for 2m. This is how BLOOM's and Baichuan's code (and transformers) compute them.
--- Each is multiplied by scale (default 1).
function M.slopes(num_heads, scale)
  if type(num_heads) ~= 'number' or num_heads < 1 or num_heads ~= math.floor(num_heads) then
    error('alibi.slopes: the number of heads must be a positive integer, got ' .. tostring(num_heads), 2)
  end
  scale = scale or 1
  local m = 1
  while m * 2 <= num_heads do m = m * 2 end
  local out = {}
  for i = 1, m do out[i] = scale * 2 ^ (-8 * i / m) end
  for j = 1, num_heads - m do out[m + j] = scale * 2 ^ (-8 * (2 * j - 1) / (2 * m)) end
  return tensor.tensor(out, { dtype = 'f64' })
end

return M
