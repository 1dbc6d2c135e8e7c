-- The single-process reference the distributed workers compare against: a GPTModel trained with
-- pmp.optim.AdamW for #data steps on whole global batches, clipping like pmp.optim.clip_grad_norm.
local M = {}

-- config: GPTModel config; data: list of {ids, targets}; options: seed (model init), adam (AdamW
-- options), max_norm. Returns {model, optimizer, initial (state_dict copies before training), losses,
-- norms}.
function M.train(config, data, options)
  pmp.manual_seed(options.seed)
  local model = pmp.nn.GPTModel(config)
  local initial = {}
  for name, t in pairs(model:state_dict()) do initial[name] = t:clone() end
  local optimizer = pmp.optim.AdamW(pmp.optim.decay_groups(model), options.adam)
  local losses, norms = {}, {}
  for step, batch in ipairs(data) do
    optimizer:zero_grad()
    local loss = model(batch.ids, batch.targets)
    loss:backward()
    norms[step] = pmp.optim.clip_grad_norm(model:parameters(), options.max_norm)
    optimizer:step()
    losses[step] = loss:item()
  end
  return { model = model, optimizer = optimizer, initial = initial, losses = losses, norms = norms }
end

return M
