-- Reading the Megatron-format log lines of recipes/pretrain.lua and recipes/sft.lua in specs.
local train_log = {}

-- iteration -> the lm loss logged for it
function train_log.losses(log)
  local out = {}
  for it, loss in log:gmatch('iteration%s+(%d+)/%s*%d+ |.-lm loss: ([%d.E+-]+) |') do out[tonumber(it)] = tonumber(loss) end
  return out
end

return train_log
