--- Autograd functions written in Lua, and activation recompute built on them.
---
---   local y = pmp.autograd.custom({x, w}, y_computed_without_grad, function(grad_y)
---     return {grad_x, grad_w}          -- one entry per input (nil for none), shapes of the inputs
---   end)
---
--- The engine calls back into Lua during backward through one registered FFI callback.
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local tensor = require 'pmp.tensor'

local M = {}

local functions = {}   -- id -> backward function
local next_id = 0
local freed = ffi.new('int64_t[256]')

local function drop_freed()
  repeat
    local n = C.pmp_custom_take_freed(freed, 256)
    for k = 0, n - 1 do functions[tonumber(freed[k])] = nil end
  until n < 256
end

local function run_backward(id, grad_output, grad_inputs, ninputs)
  local fn = functions[tonumber(id)]
  if not fn then
    C.pmp_set_error('custom function: its backward is no longer registered')
    return -1
  end
  C.pmp_tensor_retain(grad_output)
  local ok, result = pcall(fn, tensor.wrap(grad_output))
  if not ok then
    C.pmp_set_error('custom function backward: ' .. tostring(result))
    return -1
  end
  for k = 1, ninputs do
    local g = result and result[k]
    if g ~= nil then
      if not tensor.is_tensor(g) then
        C.pmp_set_error('custom function backward: gradient ' .. k .. ' is not a tensor')
        return -1
      end
      C.pmp_tensor_retain(g.ptr)
      grad_inputs[k - 1] = g.ptr
    end
  end
  return 0
end

-- Kept in a module-level variable so the callback is never collected.
local callback = ffi.cast('pmp_custom_backward_fn', run_backward)
C.pmp_set_custom_backward(callback)

--- Makes output (computed with grad mode off) depend on inputs through backward_fn.
function M.custom(inputs, output, backward_fn)
  drop_freed()
  if C.pmp_is_grad_enabled() == 0 then return output end
  next_id = next_id + 1
  local id = next_id
  local ptrs = ffi.new('pmp_tensor *[?]', math.max(#inputs, 1))
  for k, t in ipairs(inputs) do ptrs[k - 1] = t.ptr end
  functions[id] = backward_fn
  if C.pmp_custom_record(output.ptr, ptrs, #inputs, id) ~= 0 then
    functions[id] = nil
    error(ffi.string(C.pmp_last_error()), 2)
  end
  if output.ptr.grad_fn == nil then functions[id] = nil end
  return output
end

local function rng_state()
  local state = ffi.new('uint64_t[4]')
  C.pmp_rng_get_state(state)
  return state
end

--- Runs fn(...) without keeping its activations; backward runs it again (with the random state it
--- first saw, so dropout masks repeat) and backpropagates through that. Gradients equal those of fn
--- itself; parameters used inside fn receive theirs during the re-run.
function M.recompute(fn, ...)
  local args, n = { ... }, select('#', ...)
  if C.pmp_is_grad_enabled() == 0 then return fn(...) end
  local rng_at_forward = rng_state()
  local previous = C.pmp_set_grad_enabled(0)
  local ok, output = pcall(fn, ...)
  C.pmp_set_grad_enabled(previous)
  if not ok then error(output, 0) end
  local inputs, positions = {}, {}
  for k = 1, n do
    local a = args[k]
    if tensor.is_tensor(a) and a.requires_grad then
      inputs[#inputs + 1] = a
      positions[#positions + 1] = k
    end
  end
  return M.custom(inputs, output, function(grad)
    local rng_now = rng_state()
    C.pmp_rng_set_state(rng_at_forward)
    local rerun_args = {}
    for k = 1, n do
      local a = args[k]
      if tensor.is_tensor(a) then
        rerun_args[k] = a:detach()
        if a.requires_grad then rerun_args[k]:requires_grad_() end
      else
        rerun_args[k] = a
      end
    end
    local before = C.pmp_set_grad_enabled(1)
    local ok2, rerun = pcall(fn, unpack(rerun_args, 1, n))
    C.pmp_set_grad_enabled(before)
    C.pmp_rng_set_state(rng_now)
    if not ok2 then error(rerun, 0) end
    rerun:backward(grad)
    local grads = {}
    for j, k in ipairs(positions) do grads[j] = rerun_args[k].grad end
    return grads
  end)
end

return M
