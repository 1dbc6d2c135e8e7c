-- Mistral (HF model_type 'mistral', MistralForCausalLM): the Llama block without biases, GQA, and a
-- sliding attention window over the last `sliding_window` keys in every layer (null: full attention;
-- absent: transformers' default 4096). head_dim may differ from hidden_size / heads (Mistral-NeMo).
local llama = require 'models.llama'

local M = { model_type = 'mistral', architectures = { 'MistralForCausalLM' } }

-- The weight names and layouts are Llama's: the same table.
M.mapping = llama.mapping
M.ignore = llama.ignore

function M.config(read)
  local c = llama.base_config(read)
  if read.raw.sliding_window == nil then
    c.sliding_window = 4096
  else
    c.sliding_window = read:number('sliding_window')
  end
  return c
end

function M.hf_config(c)
  if c.add_qkv_bias or c.add_proj_bias or c.add_mlp_bias then error('mistral: the family has no biases', 0) end
  if type(c.sliding_window) == 'table' then error('mistral: the sliding window is the same in every layer', 0) end
  local hf = llama.base_hf_config(c)
  hf.sliding_window = (c.sliding_window and c.sliding_window > 0) and c.sliding_window or require('pmp.json').null
  return hf
end

return M
