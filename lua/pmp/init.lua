--- pmp: the Lua library over the engine. `pmp` is a preloaded global in the pmp executable.
--- Tensors (pmp.zeros, pmp.tensor, ...), pmp.nn, pmp.optim, pmp.models, pmp.tokenizer, pmp.generate;
--- help() in the REPL lists them all.
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local tensor = require 'pmp.tensor'

local pmp = {}
for name, value in pairs(tensor) do
  if name ~= 'methods' and name ~= 'fields' and name ~= 'wrap' and name ~= 'set_gc_step' then pmp[name] = value end
end

pmp.version = ffi.string(C.pmp_version())
pmp.tensor_methods = tensor.methods
pmp.tensor_fields = tensor.fields
pmp.nn = require 'pmp.nn'
pmp.F = pmp.nn.functional
local sampling = require 'pmp.sampling'
pmp.sample, pmp.Generator = sampling.sample, sampling.Generator

--- Runs fn(...) with gradient recording off, restoring the previous mode even if fn fails; returns fn's results.
function pmp.no_grad(fn, ...)
  local previous = C.pmp_set_grad_enabled(0)
  local results = { pcall(fn, ...) }
  C.pmp_set_grad_enabled(previous)
  if not results[1] then error(results[2], 0) end
  return unpack(results, 2, table.maxn(results))
end

--- Runs fn(...) with gradient recording on (inside no_grad), restoring the previous mode afterwards.
function pmp.enable_grad(fn, ...)
  local previous = C.pmp_set_grad_enabled(1)
  local results = { pcall(fn, ...) }
  C.pmp_set_grad_enabled(previous)
  if not results[1] then error(results[2], 0) end
  return unpack(results, 2, table.maxn(results))
end

--- Whether operations record the autograd graph now.
function pmp.is_grad_enabled() return C.pmp_is_grad_enabled() ~= 0 end

-- Engine memory, per device: bytes in use, the peak, and what the caching allocator holds for reuse.
pmp.memory = {}
--- {in_use, peak, cached, allocs, cache_hits} of the engine's allocator (bytes), for device ('cpu').
function pmp.memory.stats(device)
  local s = C.pmp_memory_stats_of(device == nil and C.PMP_CPU or (device:match('^cuda') and C.PMP_CUDA or C.PMP_CPU))
  return {
    in_use = tonumber(s.in_use), peak = tonumber(s.peak), cached = tonumber(s.cached),
    allocs = tonumber(s.allocs), cache_hits = tonumber(s.cache_hits),
  }
end
--- Starts measuring memory.stats().peak afresh.
function pmp.memory.reset_peak() C.pmp_memory_reset_peak(C.PMP_CPU) end
--- Gives the memory the caching allocator holds for reuse back to the system.
function pmp.memory.empty_cache() C.pmp_memory_empty_cache(C.PMP_CPU) end
-- Bytes of unreferenced tensors allowed to pile up before the garbage collector runs (256 MiB).
pmp.memory.set_gc_step = tensor.set_gc_step

--- The number of threads the engine's kernels use.
function pmp.num_threads() return C.pmp_num_threads() end
--- Sets the number of threads the engine's kernels use.
function pmp.set_num_threads(n) C.pmp_set_num_threads(n) end

-- Other parts of the library (pmp.optim, pmp.safetensors, ...) load on first use from lua/pmp/<name>.
-- Not cached in pmp itself, so pmp.<name> is always what require('pmp.<name>') gives (busted unloads
-- modules between spec files).
-- The modules that can load on first use, for the REPL's completion of `pmp.`.
local function lazy_module_names()
  local names, root = {}, require('pmp.ffi').root .. '/lua/pmp'
  local listing = io.popen('ls ' .. root .. ' 2>/dev/null')
  if not listing then return names end
  for entry in listing:lines() do
    local name = entry:match('^([%a_][%w_]*)%.lua$') or entry:match('^([%a_][%w_]*)$')
    if name and name ~= 'init' and rawget(pmp, name) == nil then names[#names + 1] = name end
  end
  listing:close()
  return names
end

setmetatable(pmp, {
  __pmp_members = lazy_module_names,
  __index = function(_, key)
    if type(key) ~= 'string' then return nil end
    local name = 'pmp.' .. key
    local loaded = package.loaded[name]
    if loaded ~= nil then return loaded end
    if not package.searchpath(name, package.path) then return nil end
    return require(name)
  end,
})

return pmp
