-- Qwen3-MoE (HF model_type 'qwen3_moe', Qwen3MoeForCausalLM; Qwen3-30B-A3B, 235B-A22B): Qwen3's
-- attention (per-head q/k RMSNorm, no biases by default) with Qwen2-MoE's routed experts and layer
-- selection (models/qwen2_moe.lua), without shared experts.
local qwen2 = require 'models.qwen2'
local qwen3 = require 'models.qwen3'
local qwen2_moe = require 'models.qwen2_moe'

local M = { model_type = 'qwen3_moe', architectures = { 'Qwen3MoeForCausalLM' } }

M.mapping = qwen2_moe.joined(qwen3.mapping, qwen2_moe.expert_mapping)
M.ignore = qwen3.ignore

function M.config(read)
  local c = qwen3.config(read)
  return qwen2_moe.read_experts(read, c)
end

function M.hf_config(c)
  if (c.moe_shared_expert_intermediate_size or 0) > 0 then error('qwen3_moe: the family has no shared experts', 0) end
  local hf = qwen3.hf_config(c)
  return qwen2_moe.write_experts(hf, c)
end

return M
