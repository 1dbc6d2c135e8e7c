-- Core benchmark: `make bench` (= ./pmp tools/bench_core.lua).
--
-- Compares the engine against the floor it is built on, on the same buffers and sizes:
--   * pmp.matmul (f32) against a direct call of the library it runs on (oneDNN's dnnl_sgemm) through
--     the FFI, in GFLOP/s, with BLIS's cblas_sgemm (pmp's f64 BLAS) beside them for scale;
--   * pmp.matmul (bf16) on AMX tiles against the same product through oneDNN (PMP_MATMUL_NO_AMX=1),
--     on the GEMMs of a Llama layer's forward and backward (tokens x hidden x ffn);
--   * few-row products (decoding: 1, 4 and 8 rows against a weight [out, in] used transposed) on pmp's
--     kernels (core/cpu/cpu_gemv.c) against the same product through oneDNN (PMP_MATMUL_NO_GEMV=1) and,
--     in f32, against BLIS's cblas_sgemv called once per row, on the layers of the bench-generate model
--     (hidden 512) and of one twice as wide;
--   * elementwise ops, reductions and dtype conversion against memcpy, in GB/s.
-- Times are wall-clock (CLOCK_MONOTONIC), best of N repetitions after a warm-up. It reports; it
-- never asserts. Targets: pmp/direct within 5% at 1024^3; large elementwise ops >= 50% of memcpy.
--
-- Bytes are counted as bytes read + bytes written by the op, each operand counted once at its own
-- dtype size (write-allocate traffic and cache effects are ignored). memcpy of N bytes thus counts
-- 2N, a + b on N-byte f32 tensors 3N, a:sum() N, a:to('bf16') N + N/2. Operands are sized past the
-- last-level cache (64 MiB at the least), so this is DRAM bandwidth. memcpy runs on one thread; pmp
-- ops on pmp.num_threads(). Results are returned to the caching allocator between repetitions
-- (collectgarbage outside the timed region), so outputs come from its cache, as in a training loop.
local ffi = require 'ffi'
local C = require('pmp.ffi').C

-- Each declaration on its own, so one already made elsewhere does not stop the others.
local function declare(text) pcall(ffi.cdef, text) end
declare [[struct timespec { long tv_sec; long tv_nsec; };]]
declare [[int clock_gettime(int clock_id, struct timespec *tp);]]
declare [[void *memcpy(void *dst, const void *src, size_t n);]]
declare [[void cblas_sgemm(int order, int transa, int transb, int m, int n, int k, float alpha,
                           const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc);]]
declare [[void cblas_sgemv(int order, int trans, int m, int n, float alpha, const float *a, int lda, const float *x,
                           int incx, float beta, float *y, int incy);]]
declare [[int dnnl_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                          int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);]]
declare [[typedef struct { int major; int minor; int patch; const char *hash; unsigned cpu_runtime; unsigned gpu_runtime; } bench_dnnl_version_t;]]
declare [[const bench_dnnl_version_t *dnnl_version(void);]]
declare [[void bli_thread_set_num_threads(long n);]]
declare [[int setenv(const char *name, const char *value, int overwrite);]]
declare [[int unsetenv(const char *name);]]
declare [[long bli_thread_get_num_threads(void);]]
declare [[const char *bli_info_get_version_str(void);]]
declare [[int bli_arch_query_id(void);]]
declare [[const char *bli_arch_string(int id);]]

-- `./pmp tools/bench_core.lua [matmul|bf16|gemv|bandwidth]` runs one part; no argument runs all.
local only = arg and arg[1]
local function wanted(part) return only == nil or only == part end

local CLOCK_MONOTONIC = 1
local CblasRowMajor, CblasNoTrans, CblasTrans = 101, 111, 112

local ts = ffi.new('struct timespec')
local function now()
  C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local function optional(fn)
  local ok, value = pcall(fn)
  if ok then return value end
  return nil
end

-- Best wall time of fn() over repetitions: `warmup` untimed calls, then at least min_reps timed ones,
-- more while the total stays under budget seconds (at most max_reps). Garbage is collected between
-- repetitions, outside the timed region, so results go back to the caching allocator and the next
-- repetition is served from its cache rather than fresh (page-faulting) memory.
local function best_time(fn, options)
  options = options or {}
  local warmup, min_reps = options.warmup or 1, options.min_reps or 3
  local max_reps, budget = options.max_reps or 50, options.budget or 0.6
  for _ = 1, warmup do fn() end
  collectgarbage()
  local best, spent, reps = math.huge, 0, 0
  while reps < min_reps or (spent < budget and reps < max_reps) do
    local t0 = now()
    fn()
    local dt = now() - t0
    collectgarbage()
    best = math.min(best, dt)
    spent = spent + dt
    reps = reps + 1
  end
  return best, reps
end

-- Times two functions with their repetitions interleaved, so drift (turbo, neighbours) hits both alike.
local function best_pair(fa, fb, options)
  options = options or {}
  local warmup, min_reps = options.warmup or 1, options.min_reps or 3
  local max_reps, budget = options.max_reps or 50, options.budget or 1.0
  for _ = 1, warmup do fa(); fb() end
  collectgarbage()
  local best_a, best_b, spent, reps = math.huge, math.huge, 0, 0
  while reps < min_reps or (spent < budget and reps < max_reps) do
    local t0 = now()
    fa()
    local t1 = now()
    collectgarbage()
    local t2 = now()
    fb()
    local t3 = now()
    collectgarbage()
    best_a, best_b = math.min(best_a, t1 - t0), math.min(best_b, t3 - t2)
    spent = spent + (t1 - t0) + (t3 - t2)
    reps = reps + 1
  end
  return best_a, best_b, reps
end

local function cpu_model()
  local f = io.open('/proc/cpuinfo', 'r')
  if not f then return '?', 1 end
  local text = f:read('*a')
  f:close()
  local cpus = 0
  for _ in text:gmatch('\nprocessor%s*:') do cpus = cpus + 1 end
  if text:match('^processor%s*:') then cpus = cpus + 1 end
  return (text:match('model name%s*:%s*([^\n]+)') or '?'), math.max(cpus, 1)
end

-- The engine tensor behind a Lua tensor (a handle struct holding .ptr, or the pointer itself).
local function raw(t) return t.ptr or t end
local function float_ptr(t) return ffi.cast('float *', raw(t).data) end

-- Size of the last-level cache, from sysfs (0 if unknown).
local function l3_bytes()
  local best = 0
  for index = 0, 7 do
    local f = io.open('/sys/devices/system/cpu/cpu0/cache/index' .. index .. '/size', 'r')
    if not f then break end
    local text = f:read('*l') or ''
    f:close()
    local n, unit = text:match('^(%d+)([KMG]?)')
    if n then
      local bytes = tonumber(n) * (unit == 'K' and 1024 or unit == 'M' and 1024 ^ 2 or unit == 'G' and 1024 ^ 3 or 1)
      best = math.max(best, bytes)
    end
  end
  return best
end


---------------------------------------------------------------------------------------------------
-- Header

local MiB = 1024 * 1024
local started = now()

local function print_header()
  pmp.matmul(pmp.randn(2, 2), pmp.randn(2, 2))   -- hands BLIS the engine's thread count
  local blas_threads = optional(function() return tonumber(C.bli_thread_get_num_threads()) end)
  local blas_config = optional(function()
    return 'BLIS ' .. ffi.string(C.bli_info_get_version_str()) .. ', ' .. ffi.string(C.bli_arch_string(C.bli_arch_query_id())) .. ' kernels'
  end)
  print(string.format('pmp %s core benchmark: pmp.num_threads() = %d, BLIS threads = %s',
    pmp.version, pmp.num_threads(), tostring(blas_threads or '?')))
  local f = io.open('/proc/loadavg', 'r')
  local load = f and tonumber((f:read('*l') or ''):match('^(%S+)'))
  if f then f:close() end
  local model, cpus = cpu_model()
  print(string.format('cpu: %s, %d logical cpus, last-level cache %d MiB%s', model, cpus, math.floor(l3_bytes() / MiB),
    load and string.format(', load average %.2f', load) or ''))
  if load and load > 0.5 * cpus then
    print('note: other processes are using the cpus; multi-threaded numbers will be low and noisy')
  end
  local v = C.dnnl_version()
  print(string.format('gemm: oneDNN %d.%d.%d (f32/bf16); blas: %s (f64)', v.major, v.minor, v.patch, tostring(blas_config or '?')))
  print('env: OMP_NUM_THREADS=' .. (os.getenv('OMP_NUM_THREADS') or 'unset')
    .. ', BLIS_ARCH_TYPE=' .. (os.getenv('BLIS_ARCH_TYPE') or 'unset')
    .. ', GOMP_SPINCOUNT=' .. (os.getenv('GOMP_SPINCOUNT') or 'unset'))
  print('wall-clock best of N after warm-up; ratio = pmp / reference (1.00 = as fast as the reference)')
end

---------------------------------------------------------------------------------------------------
-- GEMM: pmp.matmul against dnnl_sgemm and cblas_sgemm on the same operands

local function bench_gemm(label, m, n, k, transposed_b)
  local a = pmp.randn(m, k)
  -- b is [k, n], or for the transposed case an [n, k] weight used through its transposed view
  local w = transposed_b and pmp.randn(n, k) or pmp.randn(k, n)
  local b = transposed_b and w:t() or w
  local c = pmp.empty(m, n)
  local pa, pw, pc = float_ptr(a), float_ptr(w), float_ptr(c)
  local tb = transposed_b and CblasTrans or CblasNoTrans
  local ldb = transposed_b and k or n
  local function run_pmp() local _ = pmp.matmul(a, b) end
  local N, T = string.byte('N'), string.byte('T')
  local function run_direct() C.dnnl_sgemm(N, transposed_b and T or N, m, n, k, 1, pa, k, pw, ldb, 0, pc, n) end
  local function run_blis() C.cblas_sgemm(CblasRowMajor, CblasNoTrans, tb, m, n, k, 1, pa, k, pw, ldb, 0, pc, n) end
  local flops = 2 * m * n * k
  local big = flops > 1e10   -- seconds per call with slow kernels: one warm-up, a fixed few repetitions
  local options = { warmup = big and 1 or 2, min_reps = 3, max_reps = 200, budget = big and 2.0 or 1.0 }
  local tp, td, reps = best_pair(run_pmp, run_direct, options)
  C.bli_thread_set_num_threads(pmp.num_threads())
  local _, tb_blis = best_pair(run_pmp, run_blis, options)
  -- the results must agree, or the comparison means nothing
  local diff = pmp.matmul(a, b):sub(c):abs():max():item()
  local note = diff > 1e-2 and string.format('  MISMATCH max|diff| = %g', diff) or ''
  print(string.format('%-34s %10.1f %10.1f %10.1f %7.2f %5d%s', label, flops / tp * 1e-9, flops / td * 1e-9,
    flops / tb_blis * 1e-9, td / tp, reps, note))
end

local function bench_matmul()
  print()
  print(string.format('%-34s %10s %10s %10s %7s %5s', 'matmul (f32)', 'pmp GF/s', 'oneDNN', 'BLIS', 'ratio', 'reps'))
  print(string.rep('-', 81))
  pmp.manual_seed(1)
  bench_gemm('256^3', 256, 256, 256)
  bench_gemm('512^3', 512, 512, 512)
  bench_gemm('1024^3', 1024, 1024, 1024)
  bench_gemm('[4096,1024] @ [4096,1024]:t()', 8 * 512, 4096, 1024, true)
  collectgarbage()
end

---------------------------------------------------------------------------------------------------
-- bf16 GEMM: the AMX kernel against oneDNN on the products of a training step's linear layers

-- a @ b through oneDNN: the engine reads PMP_MATMUL_NO_AMX at each call
local function onednn_matmul(a, b)
  C.setenv('PMP_MATMUL_NO_AMX', '1', 1)
  local c = pmp.matmul(a, b)
  C.unsetenv('PMP_MATMUL_NO_AMX')
  return c
end

local function bench_bf16_gemm(label, a, b)
  local function run_amx() local _ = pmp.matmul(a, b) end
  local function run_onednn() local _ = onednn_matmul(a, b) end
  local flops = 2 * a.shape[1] * a.shape[2] * b.shape[2]
  local ta, td, reps = best_pair(run_amx, run_onednn, { warmup = 2, min_reps = 5, max_reps = 100, budget = 1.5 })
  local via_amx = pmp.matmul(a, b):float()
  local via_onednn = onednn_matmul(a, b):float()
  local diff = via_amx:sub(via_onednn):abs():max():item() / via_onednn:abs():max():item()
  local note = diff > 2 ^ -7 and string.format('  MISMATCH max rel diff %g', diff) or ''
  print(string.format('%-40s %10.1f %10.1f %7.2f %5d%s', label, flops / ta * 1e-9, flops / td * 1e-9, td / ta, reps, note))
end

local function bench_bf16()
  print()
  print(string.format('%-40s %10s %10s %7s %5s', 'matmul (bf16), tokens 2048', 'AMX GF/s', 'oneDNN', 'ratio', 'reps'))
  print(string.rep('-', 77))
  pmp.manual_seed(1)
  local tokens, hidden, ffn = 2048, 512, 1408
  local function r(...) return pmp.randn(...):to('bf16') end
  local x, g_qkv, w_qkv = r(tokens, hidden), r(tokens, 3 * hidden), r(3 * hidden, hidden)
  local h, g_fc2, w_fc2 = r(tokens, ffn), r(tokens, hidden), r(hidden, ffn)
  bench_bf16_gemm('qkv forward   x @ W:t()', x, w_qkv:t())
  bench_bf16_gemm('qkv dgrad     g @ W', g_qkv, w_qkv)
  bench_bf16_gemm('qkv wgrad     g:t() @ x', g_qkv:t(), x)
  bench_bf16_gemm('fc2 forward   h @ W:t()', h, w_fc2:t())
  bench_bf16_gemm('fc2 dgrad     g @ W', g_fc2, w_fc2)
  bench_bf16_gemm('fc2 wgrad     g:t() @ h', g_fc2:t(), h)
  bench_bf16_gemm('1024^3', r(1024, 1024), r(1024, 1024))
  collectgarbage()
end

---------------------------------------------------------------------------------------------------
-- Few-row products (decode steps): pmp's kernels against oneDNN and BLIS's gemv

local function bench_gemv_case(label, dtype, rows, k, m)
  local x, w = pmp.randn(rows, k):to(dtype), pmp.randn(m, k):to(dtype)
  local wt = w:t()
  local function run_pmp() local _ = pmp.matmul(x, wt) end
  local function via_onednn()
    C.setenv('PMP_MATMUL_NO_GEMV', '1', 1)
    local c = pmp.matmul(x, wt)
    C.unsetenv('PMP_MATMUL_NO_GEMV')
    return c
  end
  local options = { warmup = 2, min_reps = 5, max_reps = 200, budget = 0.4 }
  local tp, to, reps = best_pair(run_pmp, via_onednn, options)
  local blis = '-'
  if dtype == 'f32' then
    local y = pmp.empty(rows, m)
    local px, pw, py = float_ptr(x), float_ptr(w), float_ptr(y)
    local function run_blis()
      for r = 0, rows - 1 do C.cblas_sgemv(CblasRowMajor, CblasNoTrans, m, k, 1, pw, k, px + r * k, 1, 0, py + r * m, 1) end
    end
    C.bli_thread_set_num_threads(pmp.num_threads())
    local _, tb = best_pair(run_pmp, run_blis, options)
    blis = string.format('%.1f (%.2f)', 2 * rows * k * m / tb * 1e-9, tb / tp)
  end
  local want = via_onednn():float()
  local diff = (pmp.matmul(x, wt):float() - want):abs():max():item() / want:abs():max():item()
  local note = diff > (dtype == 'f32' and 1e-5 or 2 ^ -7) and string.format('  MISMATCH max rel diff %g', diff) or ''
  local flops = 2 * rows * k * m
  print(string.format('%-22s %4s %4d %9.1f %9.1f %7.2f %16s %5d%s', label, dtype, rows, flops / tp * 1e-9,
    flops / to * 1e-9, to / tp, blis, reps, note))
end

local function bench_gemv()
  print()
  print(string.format('%-22s %4s %4s %9s %9s %7s %16s %5s', 'x @ W:t() (decode)', '', 'rows', 'pmp GF/s', 'oneDNN',
    'ratio', 'BLIS gemv (ratio)', 'reps'))
  print(string.rep('-', 84))
  pmp.manual_seed(1)
  local layers = {
    { 'attn  512 -> 512', 512, 512 }, { 'ffn   512 -> 1408', 512, 1408 }, { 'ffn  1408 -> 512', 1408, 512 },
    { 'head  512 -> 32000', 512, 32000 }, { 'attn 1024 -> 1024', 1024, 1024 }, { 'ffn  1024 -> 2816', 1024, 2816 },
    { 'head 1024 -> 32000', 1024, 32000 },
  }
  for _, dtype in ipairs({ 'f32', 'bf16', 'f16' }) do
    for _, layer in ipairs(layers) do
      for _, rows in ipairs({ 1, 4, 8 }) do bench_gemv_case(layer[1], dtype, rows, layer[2], layer[3]) end
      collectgarbage()
    end
  end
end

---------------------------------------------------------------------------------------------------
-- Bandwidth: elementwise ops, reductions and a cast against memcpy

local function bench_bandwidth()
  -- Operands at least as large as the last-level cache (64 MiB at the least), so the numbers are
  -- DRAM bandwidth rather than cache bandwidth: with a 300 MiB L3, 64 MiB operands stay in cache.
  local bytes = 64 * MiB
  local llc = l3_bytes()
  while bytes < llc and bytes < 1024 * MiB do bytes = bytes * 2 end
  local n = bytes / 4
  local cols = 4096
  local rows = n / cols

  print()
  print(string.format('%-34s %10s %10s %7s %5s', string.format('bandwidth (%d MiB f32 operands)', bytes / MiB),
    'GB/s', 'ms', 'memcpy', 'reps'))
  print(string.rep('-', 70))

  local a = pmp.rand(n):add(0.5)
  local b = pmp.rand(n):add(0.5)
  local dst = pmp.empty(n)
  local m = a:view(rows, cols)
  local src_ptr, dst_ptr = raw(a).data, raw(dst).data

  local function row(label, seconds, moved, reps, reference)
    local gbs = moved / seconds * 1e-9
    local ratio = reference and string.format('%7.2f', gbs / reference) or string.format('%7s', '1.00')
    print(string.format('%-34s %10.1f %10.2f %s %5d', label, gbs, seconds * 1e3, ratio, reps))
    return gbs
  end

  local opts = { warmup = 1, min_reps = 3, max_reps = 30, budget = 0.8 }
  local t, reps = best_time(function() C.memcpy(dst_ptr, src_ptr, bytes) end, opts)
  local memcpy_gbs = row('memcpy (1 thread, libc)', t, 2 * bytes, reps)

  local shape = '[' .. rows .. ',' .. cols .. ']'
  local cases = {
    { 'clone  a:clone()',               function() return a:clone() end,    2 * bytes },
    { 'add    a + b',                   function() return a + b end,        3 * bytes },
    { 'mul    a * b',                   function() return a * b end,        3 * bytes },
    { 'scalar a * 2',                   function() return a * 2 end,        2 * bytes },
    { 'exp    a:exp()',                 function() return a:exp() end,      2 * bytes },
    { 'sum    a:sum()',                 function() return a:sum() end,      bytes },
    { 'sum    ' .. shape .. ':sum(-1)', function() return m:sum(-1) end,    bytes + rows * 4 },
    { 'sum    ' .. shape .. ':sum(1)',  function() return m:sum(1) end,     bytes + cols * 4 },
    { "cast   a:to('bf16')",            function() return a:to('bf16') end, bytes + bytes / 2 },
  }
  for _, case in ipairs(cases) do
    local label, fn, moved = case[1], case[2], case[3]
    local ok, seconds, count = pcall(best_time, fn, opts)
    if ok then
      row(label, seconds, moved, count, memcpy_gbs)
    else
      print(string.format('%-34s failed: %s', label, tostring(seconds)))
    end
  end
end

---------------------------------------------------------------------------------------------------

-- Compiled traces can hold a part's closures (and through their upvalues its tensors) as constants;
-- flushing them lets the collector give the part's memory back before the next one.
local function release()
  jit.flush()
  collectgarbage()
  collectgarbage()
end

print_header()
if wanted('matmul') then bench_matmul(); release() end
if wanted('bf16') then bench_bf16(); release() end
if wanted('gemv') then bench_gemv(); release() end
if wanted('bandwidth') then bench_bandwidth(); release() end
local st = pmp.memory.stats()
print()
print(string.format('engine memory: in_use %.0f MiB, peak %.0f MiB, cached %.0f MiB, %d allocs, %d cache hits',
  st.in_use / MiB, st.peak / MiB, st.cached / MiB, st.allocs, st.cache_hits))
print(string.format('total %.1f s', now() - started))
