--- Model FLOPs utilisation: model FLOPs per token (matmuls x 3 for forward + backward) against the GEMM
--- rate measured on this machine now, since a CPU has no single datasheet peak.
local M = {}

--- From the whole model's config (a rank holds only its part): 6 x the matmul parameters (layers,
--- output layer) plus attention's score and value products.
function M.flops_per_token(c, seq_length)
  local per_layer = c.hidden_size * (c.num_attention_heads + 2 * c.num_query_groups) * c.kv_channels
    + c.num_attention_heads * c.kv_channels * c.hidden_size
    + c.hidden_size * c.ffn_hidden_size * (c.activation == 'swiglu' and 3 or 2)
  return 6 * (c.num_layers * per_layer + c.vocab_size * c.hidden_size)
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
