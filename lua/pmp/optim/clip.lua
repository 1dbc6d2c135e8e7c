--- Global gradient norm and clipping over a list of parameters, as Megatron and PyTorch compute them.
local ffi = require 'ffi'
local C = require('pmp.ffi').C

local M = {}

local sum_buffer = ffi.new('double[1]')

-- The L2 norm of all gradients together (parameters without a gradient count as zero). Gradients are
-- read from the engine's tensors: p.grad would make a tensor handle per parameter for the collector.
--- grad_norm(params): the L2 norm of all gradients together (parameters without one count as zero).
function M.grad_norm(params)
  local total = 0
  for _, p in ipairs(params) do
    local g = p.ptr.grad_acc
    if g ~= nil then
      if C.pmp_sum_squares(g, sum_buffer) ~= 0 then error(ffi.string(C.pmp_last_error()), 2) end
      total = total + sum_buffer[0]
    end
  end
  return math.sqrt(total)
end

--- Scales the gradients in place so their global norm is at most max_norm; returns the norm before.
function M.clip_grad_norm(params, max_norm)
  local norm = M.grad_norm(params)
  local factor = max_norm / (norm + 1e-6)
  if factor < 1 then
    for _, p in ipairs(params) do
      local g = p.ptr.grad_acc
      if g ~= nil then
        if C.pmp_is_contiguous(g) == 0 then
          p.grad = p.grad:contiguous()
          g = p.ptr.grad_acc
        end
        if C.pmp_scale_(g, factor) ~= 0 then error(ffi.string(C.pmp_last_error()), 2) end
      end
    end
  end
  return norm
end

return M
