--- YaRN rotary scaling (Peng et al. 2023) as Hugging Face computes it for rope_type 'yarn' (DeepSeek-V3,
--- Qwen long context): each frequency blends its interpolated (divided by factor) and original value
--- along a linear ramp between the dims that turn beta_fast and beta_slow times over the original
--- context, and cos/sin are multiplied by an attention factor. Multi-latent attention also scales its
--- scores by mscale(factor, mscale_all_dim)^2.
local tensor = require 'pmp.tensor'

local M = {}

-- YaRN's Eq. 21: 0.1 mscale ln(factor) + 1 (1 for factor <= 1).
function M.get_mscale(factor, mscale)
  if factor <= 1 then return 1 end
  return 0.1 * (mscale or 1) * math.log(factor) + 1
end

local function need(s, key)
  local v = s[key]
  if type(v) ~= 'number' then error("rope scaling 'yarn': missing number '" .. key .. "'", 4) end
  return v
end

--- inv_freq (f32 [rotary_dim / 2], the unscaled frequencies of base), rotary_dim, base and the scaling
--- table -> the YaRN frequencies and the factor on cos/sin.
function M.inv_freq(inv_freq, rotary_dim, base, s)
  local factor, original = need(s, 'factor'), need(s, 'original_max_position_embeddings')
  local attention = s.attention_factor
  if type(attention) ~= 'number' then
    if s.mscale and s.mscale_all_dim and s.mscale ~= 0 and s.mscale_all_dim ~= 0 then
      attention = M.get_mscale(factor, s.mscale) / M.get_mscale(factor, s.mscale_all_dim)
    else
      attention = M.get_mscale(factor)
    end
  end
  local beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1
  local function correction_dim(rotations)
    return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))
  end
  local low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if s.truncate ~= false then low, high = math.floor(low), math.ceil(high) end
  low, high = math.max(low, 0), math.min(high, rotary_dim - 1)
  if low == high then high = high + 0.001 end
  local ramp = ((tensor.arange(0, rotary_dim / 2):float() - low) / (high - low)):clamp(0, 1)
  local extrapolation = 1 - ramp
  return (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation, attention
end

--- The factor multi-latent attention puts on its softmax scale: mscale(factor, mscale_all_dim)^2 under
--- scaled RoPE with mscale_all_dim, else 1.
function M.softmax_scale_factor(scaling)
  if not scaling or not scaling.mscale_all_dim or scaling.mscale_all_dim == 0 then return 1 end
  local m = M.get_mscale(scaling.factor, scaling.mscale_all_dim)
  return m * m
end

return M
