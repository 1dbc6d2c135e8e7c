--- Hugging Face activation names (transformers' ACT2FN keys) <-> the MLP activations of pmp.nn.
--- Only names whose function pmp computes exactly are accepted; any other is an error naming the key.
local M = {}

local FROM_HF = { relu = 'relu', gelu = 'gelu', gelu_new = 'gelu_tanh', gelu_pytorch_tanh = 'gelu_tanh',
  silu = 'swiglu', swish = 'swiglu' }

--- The pmp activation of config key `key` (default when absent), through a pmp.models reader; `allowed`
--- is the list of HF names the family accepts.
function M.read(read, key, default, allowed)
  local name = read(key)
  if name == nil then name = default end
  for _, ok in ipairs(allowed) do
    if ok == name then return FROM_HF[name] end
  end
  read:fail(string.format("%s '%s' is not supported (supported: %s)", key, tostring(name), table.concat(allowed, ', ')))
end

--- The HF name for a pmp activation among a family's `allowed` names (the first that matches).
function M.write(activation, allowed, family)
  for _, name in ipairs(allowed) do
    if FROM_HF[name] == activation then return name end
  end
  error(string.format("%s: activation '%s' has no name in this family (%s)", family, tostring(activation),
    table.concat(allowed, ', ')), 0)
end

return M
