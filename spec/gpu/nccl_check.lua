-- Run by tools/gpu_check.sh on a machine with a GPU: the NCCL backend (build/libpmp_cuda.so) on device
-- memory, single rank (the lent machines have one GPU), against the values the host computes.
-- Prints one 'CHECK name ok|FAIL detail' line per case.
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local root = package.loaded['pmp.root']
local nccl = ffi.load(root .. '/build/libpmp_cuda.so')
ffi.cdef [[
int cudaMalloc(void **ptr, size_t size);
int cudaFree(void *ptr);
int cudaMemcpy(void *dst, const void *src, size_t count, int kind);
int cudaGetDeviceCount(int *count);
]]
-- The runtime libpmp_cuda.so was linked against (already loaded with it, found by its soname).
local cudart = ffi.load('libcudart.so.13')
local HOST_TO_DEVICE, DEVICE_TO_HOST = 1, 2

local devices = ffi.new('int[1]')
assert(cudart.cudaGetDeviceCount(devices) == 0 and devices[0] > 0, 'no CUDA device')

pmp.dist.init{}
local world = pmp.dist.group('world')
local comm = nccl.pmp_nccl_comm_new(world.ptr, 0)
if comm == nil then error(ffi.string(C.pmp_last_error())) end

local function check(rc) if rc ~= 0 then error(ffi.string(C.pmp_last_error()), 2) end end

local function to_device(t)
  local bytes = t:numel() * t:element_size()
  local ptr = ffi.new('void *[1]')
  assert(cudart.cudaMalloc(ptr, bytes) == 0, 'cudaMalloc')
  assert(cudart.cudaMemcpy(ptr[0], t.ptr.data, bytes, HOST_TO_DEVICE) == 0, 'cudaMemcpy')
  return ptr[0]
end

local function from_device(ptr, like)
  local t = pmp.empty(like.shape, { dtype = like.dtype })
  assert(cudart.cudaMemcpy(t.ptr.data, ptr, t:numel() * t:element_size(), DEVICE_TO_HOST) == 0, 'cudaMemcpy')
  return t
end

local function report(name, ok, detail)
  print(string.format('CHECK %-28s %s', name, ok and 'ok' or ('FAIL ' .. tostring(detail))))
end

for _, dtype in ipairs({ 'f32', 'bf16', 'f16', 'f64', 'i32' }) do
  local x = (dtype == 'i32') and pmp.randint(-100, 100, { 1000 }):to('i32') or pmp.randn(1000):to(dtype)
  local d = to_device(x)
  check(nccl.pmp_nccl_all_reduce(comm, d, x:numel(), x.ptr.dtype_id, C.PMP_REDUCE_SUM))
  check(nccl.pmp_nccl_wait(comm))
  local got = from_device(d, x)
  report('all_reduce sum ' .. dtype, got:eq(x):all(), 'a single rank must return its input')
  cudart.cudaFree(d)
end

local x = pmp.randn(64)
local dx, dout = to_device(x), to_device(pmp.zeros(64))
check(nccl.pmp_nccl_all_gather(comm, dout, dx, 64, C.PMP_F32))
check(nccl.pmp_nccl_wait(comm))
report('all_gather f32', from_device(dout, x):eq(x):all(), 'differs')
check(nccl.pmp_nccl_reduce_scatter(comm, dout, dx, 64, C.PMP_F32, C.PMP_REDUCE_AVG))
check(nccl.pmp_nccl_wait(comm))
report('reduce_scatter avg f32', from_device(dout, x):eq(x):all(), 'differs')
check(nccl.pmp_nccl_broadcast(comm, dx, 64, C.PMP_F32, 0))
check(nccl.pmp_nccl_wait(comm))
report('broadcast f32', from_device(dx, x):eq(x):all(), 'differs')
local bad = nccl.pmp_nccl_all_reduce(comm, dx, 64, C.PMP_U16, C.PMP_REDUCE_SUM)
report('u16 is refused', bad ~= 0 and ffi.string(C.pmp_last_error()):find('all_reduce') ~= nil, 'accepted')
nccl.pmp_nccl_comm_free(comm)
