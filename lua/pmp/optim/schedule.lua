--- Learning-rate schedules as Megatron-LM's OptimizerParamScheduler computes them: linear warmup from 0,
--- then cosine / linear / constant / WSD decay from max_lr to min_lr over decay_iters.
local M = {}

--- options: max_lr, min_lr (0), warmup_iters (0), decay_iters, style ('cosine'|'linear'|'constant'|'wsd'),
--- wsd_decay_iters (WSD: length of the final decay), wsd_decay_style ('linear'|'cosine'|'exponential'|'minus_sqrt').
--- schedule.new(options) -> lr(iteration), a function giving the learning rate at an iteration.
function M.new(options)
  local max_lr, min_lr = assert(options.max_lr, 'schedule: max_lr is required'), options.min_lr or 0
  local warmup = options.warmup_iters or 0
  local decay_iters = options.decay_iters or warmup
  local style = options.style or 'cosine'
  local known = { cosine = true, linear = true, constant = true, wsd = true }
  if not known[style] then error("schedule: unknown style '" .. tostring(style) .. "' (cosine, linear, constant, wsd)", 2) end
  return function(iteration)
    if warmup > 0 and iteration <= warmup then return max_lr * iteration / warmup end
    if style == 'constant' then return max_lr end
    if iteration > decay_iters then return min_lr end
    local span = decay_iters - warmup
    local ratio = span > 0 and (iteration - warmup) / span or 1
    local delta = max_lr - min_lr
    if style == 'linear' then return min_lr + delta * (1 - ratio) end
    if style == 'cosine' then return min_lr + delta * 0.5 * (math.cos(math.pi * ratio) + 1) end
    -- WSD: hold max_lr, then anneal over the last wsd_decay_iters
    local anneal = options.wsd_decay_iters or 0
    local anneal_start = decay_iters - anneal
    if iteration <= anneal_start then return max_lr end
    local r = (iteration - anneal_start) / math.max(anneal, 1)
    local kind = options.wsd_decay_style or 'linear'
    local coefficient
    if kind == 'linear' then coefficient = 1 - r
    elseif kind == 'cosine' then coefficient = 0.5 * (math.cos(math.pi * r) + 1)
    elseif kind == 'exponential' then coefficient = (2 * 0.5 ^ r - 1)
    elseif kind == 'minus_sqrt' then coefficient = 1 - math.sqrt(r)
    else error("schedule: unknown wsd_decay_style '" .. tostring(kind) .. "'", 2) end
    return min_lr + delta * coefficient
  end
end

return M
