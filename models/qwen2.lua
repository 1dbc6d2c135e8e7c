-- Qwen2 / Qwen2.5 (HF model_type 'qwen2', Qwen2ForCausalLM): the Llama block with a bias on q/k/v
-- (always; none on o_proj or the MLP). Sliding-window attention only when use_sliding_window is true, in
-- the layers that layer_types marks 'sliding_attention' (default: layers >= max_window_layers).
local json = require 'pmp.json'
local llama = require 'models.llama'

local M = { model_type = 'qwen2', architectures = { 'Qwen2ForCausalLM' } }

M.mapping = llama.mapping
M.ignore = llama.ignore

-- Per-layer sliding windows as transformers' Qwen2/Qwen3 configs compute them (shared with qwen3).
function M.read_windows(read, num_layers)
  if not read:bool('use_sliding_window', false) then return nil end
  local window = read:number('sliding_window', 4096)
  if window == nil then return nil end
  local types = read('layer_types')
  local windows, any = {}, false
  for i = 1, num_layers do
    local kind
    if types ~= nil then
      kind = types[i]
      if kind == nil then read:fail(string.format('layer_types has %d entries for %d layers', #types, num_layers)) end
    else
      kind = (i - 1) >= read:number('max_window_layers', 28) and 'sliding_attention' or 'full_attention'
    end
    if kind ~= 'sliding_attention' and kind ~= 'full_attention' then
      read:fail(string.format("layer_types entry '%s' is not supported (full_attention, sliding_attention)", tostring(kind)))
    end
    windows[i] = kind == 'sliding_attention' and window or 0
    any = any or windows[i] > 0
  end
  return any and windows or nil
end

function M.write_windows(hf, c)
  local w = c.sliding_window
  hf.use_sliding_window = false
  hf.sliding_window = json.null
  if w == nil or w == 0 then return hf end
  local types, size = {}, nil
  for i = 1, c.num_layers do
    local layer = type(w) == 'table' and w[i] or w
    if layer and layer > 0 then
      if size and size ~= layer then error(M.model_type .. ': sliding windows must all be the same size', 0) end
      size = layer
    end
    types[i] = (layer and layer > 0) and 'sliding_attention' or 'full_attention'
  end
  hf.use_sliding_window, hf.sliding_window, hf.layer_types = true, size, types
  return hf
end

function M.config(read)
  local c = llama.base_config(read)
  c.add_qkv_bias = true
  c.sliding_window = M.read_windows(read, c.num_layers)
  return c
end

function M.hf_config(c)
  if not c.add_qkv_bias or c.add_proj_bias or c.add_mlp_bias then
    error('qwen2: the family has q/k/v biases and no others', 0)
  end
  return M.write_windows(llama.base_hf_config(c), c)
end

return M
