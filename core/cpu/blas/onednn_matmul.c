/* f32, bf16 and f16 GEMM through oneDNN's matmul primitive (2-D f32 products through its sgemm).
 * oneDNN picks its kernels by CPU feature at run time (AVX-512, AVX-512 BF16, AMX tiles for bf16 on
 * Sapphire Rapids, down to SSE4.1), reads strided and transposed operands in place, and accumulates in
 * f32 for bf16/f16 inputs. Its OpenMP build shares our thread pool.
 *
 * Creating a primitive costs far more than running a small one, so primitives are cached by shape,
 * dtype and strides: a training step asks for the same few dozen GEMMs every iteration. */
#include "internal.h"
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_debug.h>
#include <pthread.h>

typedef struct gemm_key {
  int64_t batch, n, k, m;
  int64_t a_strides[3], b_strides[3];   /* batch, row, column strides in elements */
  int32_t dtype;
} gemm_key;

typedef struct gemm_entry {
  gemm_key key;
  dnnl_primitive_t primitive;           /* NULL: oneDNN has no fast kernel for this key */
  dnnl_memory_desc_t a, b, c;
  dnnl_memory_t mem_a, mem_b, mem_c;    /* pointed at each call's operands (creating them costs more) */
  bool used;
} gemm_entry;

enum { CACHE_SLOTS = 1024, CACHE_LIMIT = 512 };   /* emptied when full: shapes of one run are few */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static dnnl_engine_t engine;
static dnnl_stream_t stream;
static gemm_entry cache[CACHE_SLOTS];
static int cached;

static uint64_t key_hash(const gemm_key *k) {
  const unsigned char *p = (const unsigned char *)k;
  uint64_t h = 1469598103934665603ULL;
  for (size_t i = 0; i < sizeof *k; i++) h = (h ^ p[i]) * 1099511628211ULL;
  return h;
}

static void cache_clear(void) {
  for (int i = 0; i < CACHE_SLOTS; i++) {
    if (!cache[i].used || !cache[i].primitive) continue;
    dnnl_primitive_destroy(cache[i].primitive);
    dnnl_memory_destroy(cache[i].mem_a);
    dnnl_memory_destroy(cache[i].mem_b);
    dnnl_memory_destroy(cache[i].mem_c);
  }
  memset(cache, 0, sizeof cache);
  cached = 0;
}

static dnnl_data_type_t dnnl_type(int dtype) {
  return dtype == PMP_BF16 ? dnnl_bf16 : dtype == PMP_F16 ? dnnl_f16 : dnnl_f32;
}

/* Builds the primitive for a key. Leaves entry->primitive NULL when oneDNN cannot describe the layout
 * or offers only its reference (scalar) implementation, which is slower than packing the operands and
 * asking again; when creation itself fails (memory) the caller's fallback path reports it. */
static void build(gemm_entry *e) {
  const gemm_key *k = &e->key;
  dnnl_data_type_t t = dnnl_type(k->dtype);
  dnnl_dims_t a_dims = {k->batch, k->n, k->k}, b_dims = {k->batch, k->k, k->m}, c_dims = {k->batch, k->n, k->m};
  dnnl_dims_t a_str = {k->a_strides[0], k->a_strides[1], k->a_strides[2]};
  dnnl_dims_t b_str = {k->b_strides[0], k->b_strides[1], k->b_strides[2]};
  dnnl_dims_t c_str = {k->n * k->m, k->m, 1};
  /* One batch is described as plain matrices: oneDNN takes a size-1 batch dim with an arbitrary
   * stride for a non-plain layout and would run its reference kernel. */
  int nd = k->batch == 1 ? 2 : 3, first = 3 - nd;
  if (dnnl_memory_desc_init_by_strides(&e->a, nd, a_dims + first, t, a_str + first) ||
      dnnl_memory_desc_init_by_strides(&e->b, nd, b_dims + first, t, b_str + first) ||
      dnnl_memory_desc_init_by_strides(&e->c, nd, c_dims + first, t, c_str + first))
    return;
  dnnl_matmul_desc_t desc;
  dnnl_primitive_desc_t pd;
  if (dnnl_matmul_desc_init(&desc, &e->a, &e->b, NULL, &e->c) || dnnl_primitive_desc_create(&pd, &desc, NULL, engine, NULL))
    return;
  const char *impl = "";
  dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl);
  if (strncmp(impl, "ref", 3) != 0 && dnnl_primitive_create(&e->primitive, pd) != dnnl_success) e->primitive = NULL;
  dnnl_primitive_desc_destroy(pd);
  if (e->primitive && (dnnl_memory_create(&e->mem_a, &e->a, engine, DNNL_MEMORY_NONE) != dnnl_success ||
                       dnnl_memory_create(&e->mem_b, &e->b, engine, DNNL_MEMORY_NONE) != dnnl_success ||
                       dnnl_memory_create(&e->mem_c, &e->c, engine, DNNL_MEMORY_NONE) != dnnl_success)) {
    if (e->mem_a) dnnl_memory_destroy(e->mem_a);
    if (e->mem_b) dnnl_memory_destroy(e->mem_b);
    dnnl_primitive_destroy(e->primitive);
    e->primitive = NULL;
  }
}

/* The cache entry for a key, built on first use; NULL when oneDNN has no CPU engine here. */
static gemm_entry *lookup(const gemm_key *key) {
  static bool engine_failed;
  if (!engine && !engine_failed) {
    engine_failed = dnnl_engine_create(&engine, dnnl_cpu, 0) != dnnl_success ||
                    dnnl_stream_create(&stream, engine, dnnl_stream_default_flags) != dnnl_success;
  }
  if (engine_failed) return NULL;
  uint64_t slot = key_hash(key) % CACHE_SLOTS;
  for (;; slot = (slot + 1) % CACHE_SLOTS) {
    if (!cache[slot].used) break;
    if (memcmp(&cache[slot].key, key, sizeof *key) == 0) return &cache[slot];
  }
  if (cached >= CACHE_LIMIT) {
    cache_clear();
    slot = key_hash(key) % CACHE_SLOTS;
  }
  gemm_entry *e = &cache[slot];
  e->key = *key;
  e->used = true;
  cached++;
  build(e);
  return e;
}

static int run(gemm_entry *e, const void *a, const void *b, void *c) {
  dnnl_status_t s = dnnl_memory_set_data_handle(e->mem_a, (void *)a);
  if (s == dnnl_success) s = dnnl_memory_set_data_handle(e->mem_b, (void *)b);
  if (s == dnnl_success) s = dnnl_memory_set_data_handle(e->mem_c, c);
  if (s == dnnl_success) {
    dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, e->mem_a}, {DNNL_ARG_WEIGHTS, e->mem_b}, {DNNL_ARG_DST, e->mem_c}};
    s = dnnl_primitive_execute(e->primitive, stream, 3, args);
    if (s == dnnl_success) s = dnnl_stream_wait(stream);
  }
  return s == dnnl_success ? 0 : pmp_fail_code("matmul: oneDNN %s", dnnl_status2str(s));
}

/* A 2-D f32 product of SGEMM_MIN_ROWS rows or more, each operand row- or column-major, goes to oneDNN's
 * sgemm, which skips the primitive's per-call setup: 4-9% at 256^3 to 1024^3 (make bench). With fewer
 * rows (decoding) sgemm was up to 1.5x slower than the primitive on a large transposed weight. 1 when
 * the product is not one for sgemm. */
enum { SGEMM_MIN_ROWS = 256 };
static int sgemm(int64_t n, int64_t k, int64_t m, const float *a, const int64_t a_strides[3], const float *b,
                 const int64_t b_strides[3], float *c) {
  char ta, tb;
  int64_t lda, ldb;
  if (n < SGEMM_MIN_ROWS) return 1;
  if (a_strides[2] == 1 && a_strides[1] >= (k > 1 ? k : 1)) ta = 'N', lda = a_strides[1];
  else if (a_strides[1] == 1 && a_strides[2] >= (n > 1 ? n : 1)) ta = 'T', lda = a_strides[2];
  else return 1;
  if (b_strides[2] == 1 && b_strides[1] >= (m > 1 ? m : 1)) tb = 'N', ldb = b_strides[1];
  else if (b_strides[1] == 1 && b_strides[2] >= (k > 1 ? k : 1)) tb = 'T', ldb = b_strides[2];
  else return 1;
  dnnl_status_t s = dnnl_sgemm(ta, tb, n, m, k, 1.0f, a, lda, b, ldb, 0.0f, c, m);
  return s == dnnl_success ? 0 : pmp_fail_code("matmul: oneDNN sgemm %s", dnnl_status2str(s));
}

/* c[batch, n, m] (contiguous) = a[batch, n, k] @ b[batch, k, m], a and b given by element strides.
 * Returns 1 when oneDNN has no fast kernel for this layout (the caller then packs or uses BLAS), 0 on
 * success, -1 on failure. */
int pmp_onednn_matmul(int dtype, int64_t batch, int64_t n, int64_t k, int64_t m, const void *a, const int64_t a_strides[3],
                      const void *b, const int64_t b_strides[3], void *c) {
  if (dtype != PMP_F32 && dtype != PMP_BF16 && dtype != PMP_F16) return 1;
  if (dtype == PMP_F32 && batch == 1) {
    int rc = sgemm(n, k, m, a, a_strides, b, b_strides, c);
    if (rc <= 0) return rc;
  }
  gemm_key key;
  memset(&key, 0, sizeof key);   /* the key is hashed and compared bytewise, padding included */
  key.batch = batch, key.n = n, key.k = k, key.m = m, key.dtype = dtype;
  for (int i = 0; i < 3; i++) key.a_strides[i] = a_strides[i], key.b_strides[i] = b_strides[i];
  pthread_mutex_lock(&lock);
  gemm_entry *e = lookup(&key);
  int rc = e && e->primitive ? run(e, a, b, c) : 1;
  pthread_mutex_unlock(&lock);
  return rc;
}
