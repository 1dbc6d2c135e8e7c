--- Megatron-LM's Adam state from a legacy torch checkpoint (the 'optimizer' entry of
--- model_optim_rng.pt) into pmp's AdamW. Megatron saves torch's optimizer state_dict: 'state' keyed by
--- each parameter's index, counted through 'param_groups' in order. Megatron-Core builds the groups
--- (megatron/core/optimizer _get_param_groups) from named_parameters: first the parameters with weight
--- decay, then those without (wd_mult 0: biases and 1-D weights), each in module order, which is the
--- order of the weights in the checkpoint's 'model'. Read here: one process's checkpoint (TP 1, PP 1,
--- one model chunk) of an f32 run (Megatron's FP32Optimizer). The distributed optimizer's
--- distrib_optim.pt, the f16/bf16 optimizers' main-parameter copies and split checkpoints are refused by
--- name; torch_dist checkpoints bring their weights only.
local ffi = require 'ffi'
local P = require 'pmp.checkpoint.torch_pickle'
local io_ = require 'pmp.io'

local M = {}

local function fail(fmt, ...) error('megatron checkpoint: ' .. string.format(fmt, ...), 0) end

local function no_weight_decay(name, t) return name:match('%.bias$') ~= nil or #t.shape == 1 end

--- The names of the checkpoint's weights in the order of its optimizer state's indices.
function M.state_order(ckpt, optimizer_state, source)
  local model_sd = ckpt:file(0, 0).chunks[1]
  local with, without = {}, {}
  for _, key in ipairs(P.keys(model_sd)) do
    local name = require('pmp.checkpoint.megatron').name_from_megatron(key)
    if name then
      local list = no_weight_decay(name, model_sd[key]) and without or with
      list[#list + 1] = name
    end
  end
  local order = {}
  local remaining = { [1.0] = with, [0.0] = without }
  for k, group in ipairs(optimizer_state.param_groups) do
    local wd_mult = group.wd_mult == nil and 1.0 or group.wd_mult
    local names = remaining[wd_mult]
    if not names then fail("%s: param_groups[%d] has wd_mult %s; pmp reads Megatron's standard groups (1 and 0)", source, k, tostring(wd_mult)) end
    if #group.params ~= #names then
      fail('%s: param_groups[%d] holds %d parameters, the model has %d %s weight decay', source, k, #group.params, #names,
        wd_mult == 0 and 'without' or 'with')
    end
    for i, index in ipairs(group.params) do order[index + 1] = names[i] end
    remaining[wd_mult] = nil
  end
  return order
end

-- Every group's one value of key (Megatron gives all groups the same betas and eps).
local function shared(groups, key, source)
  local value = groups[1][key]
  for k, group in ipairs(groups) do
    local v = group[key]
    if type(value) == 'table' then
      if v[1] ~= value[1] or v[2] ~= value[2] then fail('%s: param_groups[%d] has other %s than the first', source, k, key) end
    elseif v ~= value then
      fail('%s: param_groups[%d] has another %s than the first', source, k, key)
    end
  end
  return value
end

--- Loads the Adam state of the opened Megatron checkpoint (pmp.checkpoint.megatron.open) into optimizer,
--- a pmp.optim.AdamW over model's f32 parameters, restoring each parameter's moments and step count and
--- the betas and eps the state was made with (as torch's load_state_dict does). Returns false when the
--- checkpoint holds no optimizer state (saved with --no-save-optim) or is a torch_dist one (whose state
--- pmp does not read).
function M.load(ckpt, model, optimizer)
  -- a torch_dist checkpoint's optimizer state is not read: its weights start a fresh optimizer, as before
  if not ckpt.files then return false end
  local f = ckpt:file(0, 0)
  local saved = f.value.optimizer
  if saved == nil then return false end
  local source = f.path
  local function refuse(what) fail('%s: pmp does not read %s; give --no-load-optim to start a fresh optimizer', source, what) end
  if ckpt.tp ~= 1 or ckpt.pp ~= 1 or ckpt.chunks ~= 1 then
    refuse(string.format('the optimizer state of a checkpoint split over ranks (TP %d, PP %d)', ckpt.tp, ckpt.pp))
  end
  if io_.is_file(io_.join(io_.dirname(source), 'distrib_optim.pt')) then refuse("the distributed optimizer's distrib_optim.pt") end
  if P.kind_of(saved) ~= 'Dict' or saved.state == nil or saved.param_groups == nil then
    refuse("this optimizer state (f16/bf16 runs' main parameters; only an f32 run's Adam state)")
  end
  local chunks = require('pmp.dist.pipeline').chunks(model)
  if #chunks ~= 1 or chunks[1].tensor_parallel or chunks[1].pipeline then
    refuse('optimizer state into a model split over ranks (tensor or pipeline parallel)')
  end
  if not optimizer.state or (optimizer.state[1] and not optimizer.state[1].param) then
    refuse('optimizer state into the distributed optimizer (--use-distributed-optimizer)')
  end
  local groups = {}
  for k, group in ipairs(saved.param_groups) do groups[k] = group end
  saved.param_groups = groups
  local order = M.state_order(ckpt, saved, source)
  local by_name = {}
  for _, pair in ipairs(model:named_parameters()) do by_name[pair[1]] = pair[2] end
  -- keyed by the engine tensor's address (two Lua handles of one tensor are different cdata)
  local function address(t) return tostring(ffi.cast('void *', t.ptr)) end
  local state_of = {}
  for _, s in ipairs(optimizer.state) do state_of[address(s.param)] = s end
  local loaded = 0
  for index, name in pairs(order) do
    local entry = saved.state[index - 1]
    local param = by_name[name]
    if not param then fail('%s: the model has no parameter %s', source, name) end
    local s = state_of[address(param)]
    if not s then fail('%s: the optimizer does not update %s', source, name) end
    if param.dtype ~= 'f32' then refuse(string.format('Adam state into %s %s (an f32 run\'s state, f32 model)', param.dtype, name)) end
    if entry ~= nil then
      for _, key in ipairs({ 'exp_avg', 'exp_avg_sq' }) do
        local t = entry[key]
        if t == nil then fail('%s: the state of %s lacks %s', source, name, key) end
        if table.concat(t.shape, 'x') ~= table.concat(param.shape, 'x') then
          fail('%s: %s of %s is [%s], the parameter is [%s]', source, key, name, table.concat(t.shape, ', '),
            table.concat(param.shape, ', '))
        end
        s[key]:copy_(t)
      end
      local step = entry.step
      s.step = type(step) == 'number' and step or step:item()
      loaded = loaded + 1
    end
  end
  local betas = shared(groups, 'betas', source)
  optimizer.betas = { betas[1], betas[2] }
  optimizer.eps = shared(groups, 'eps', source)
  return true, loaded
end

return M
