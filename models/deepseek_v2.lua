-- DeepSeek-V2 / V2-Lite (HF model_type 'deepseek_v2', DeepseekV2ForCausalLM): DeepSeek-V3's multi-latent
-- attention and expert layout (models/deepseek_v3.lua), RoPE always on adjacent pairs, and a softmax
-- router without renormalisation: the top num_experts_per_tok of all experts (topk_method 'greedy') or
-- of the topk_group of n_group groups with the highest single expert score ('group_limited_greedy'),
-- times routed_scaling_factor. No expert bias.
local deepseek_v3 = require 'models.deepseek_v3'

local M = { model_type = 'deepseek_v2', architectures = { 'DeepseekV2ForCausalLM' } }

M.mapping = deepseek_v3.mapping
M.ignore = deepseek_v3.ignore

function M.config(read)
  local c = deepseek_v3.base_config(read)
  c.moe_router_pre_softmax = true
  local method = read('topk_method') or 'greedy'
  if method == 'group_limited_greedy' then
    c.moe_router_num_groups, c.moe_router_group_topk = read:positive_int('n_group'), read:positive_int('topk_group')
    c.moe_router_group_score_topk = 1   -- a group scores as its best expert
  elseif method ~= 'greedy' then
    read:fail(string.format("topk_method '%s' is not supported (greedy, group_limited_greedy)", tostring(method)))
  end
  return c
end

function M.hf_config(c)
  if (c.moe_router_score_function or 'softmax') ~= 'softmax' or not c.moe_router_pre_softmax or c.moe_router_enable_expert_bias then
    error('deepseek_v2: the router takes the softmax top-k without renormalising, and no expert bias', 0)
  end
  if c.mla_rope_interleaved == false then error('deepseek_v2: RoPE rotates adjacent pairs', 0) end
  if c.moe_router_num_groups and (c.moe_router_group_score_topk or 0) ~= 1 then
    error('deepseek_v2: groups are scored by their best expert (moe_router_group_score_topk 1)', 0)
  end
  local hf = deepseek_v3.base_hf_config(c, 'deepseek_v2')
  hf.topk_method = c.moe_router_num_groups and 'group_limited_greedy' or 'greedy'
  return hf
end

return M
