--- Model FLOPs utilisation: model FLOPs per token (matmuls x 3 for forward + backward) against the GEMM
--- rate measured on this machine now, since a CPU has no single datasheet peak.
local M = {}

--- From the whole model's config (a rank holds only its part): 6 x the matmul parameters a token
--- passes through (layers, output layer; in a MoE layer the router, its top-k experts and the shared
--- experts) plus attention's score and value products.
function M.flops_per_token(c, seq_length)
  local attention = c.hidden_size * (c.num_attention_heads + 2 * c.num_query_groups) * c.kv_channels
    + c.num_attention_heads * c.kv_channels * c.hidden_size
  local matrices = c.activation == 'swiglu' and 3 or 2
  local moe, parameters = require 'pmp.nn.moe', 0
  for layer = 1, c.num_layers do
    local width = c.ffn_hidden_size
    if moe.is_moe_layer(c, layer) then
      width = c.moe_router_topk * c.moe_ffn_hidden_size + (c.moe_shared_expert_intermediate_size or 0)
      parameters = parameters + c.num_moe_experts * c.hidden_size
    end
    parameters = parameters + attention + c.hidden_size * width * matrices
  end
  return 6 * (parameters + c.vocab_size * c.hidden_size)
    + 12 * c.num_layers * seq_length * c.num_attention_heads * c.kv_channels
end

--- FLOP/s of 1024^3 GEMMs in the training dtype (bf16 ones run on other units, AMX or AVX512-BF16,
--- than f32 ones), over 0.3 s. Draws random numbers: call it at the same point of every run.
function M.measured_peak_flops(dtype)
  local tensor, clock = require 'pmp.tensor', require 'pmp.clock'
  local a, b = tensor.randn(1024, 1024):to(dtype), tensor.randn(1024, 1024):to(dtype)
  tensor.matmul(a, b)
  local start, n = clock.now(), 0
  while clock.now() - start < 0.3 do
    tensor.matmul(a, b)
    n = n + 1
  end
  return n * 2 * 1024 ^ 3 / (clock.now() - start)
end

return M
