/* CPU kernels of the paged KV cache: block writes and one-pass attention over block tables. */
#include "internal.h"
#include <math.h>

int pmp_cpu_paged_kv_write(const pmp_op_args *a) {
  pmp_tensor *pool = a->out, *src = a->in[0];
  const int64_t *slots = (const int64_t *)a->in[1]->data;
  int64_t blocks = pool->sizes[0], H = pool->sizes[1], block_size = pool->sizes[2], D = pool->sizes[3];
  int64_t N = src->sizes[0], T = src->sizes[2];
  size_t pool_elem = pmp_dtype_size(pool->dtype_id), src_elem = pmp_dtype_size(src->dtype_id);
  for (int64_t i = 0; i < N * T; i++)
    if (slots[i] >= blocks * block_size)
      return pmp_fail_code("paged_kv_write: slot %lld of row %lld is past the pool's %lld blocks of %lld",
                           (long long)slots[i], (long long)i, (long long)blocks, (long long)block_size);
  for (int64_t n = 0; n < N; n++)
    for (int64_t t = 0; t < T; t++) {
      int64_t slot = slots[n * T + t];
      if (slot < 0) continue;
      int64_t block = slot / block_size, offset = slot % block_size;
      for (int64_t h = 0; h < H; h++) {
        char *dst = pool->data + (((block * H + h) * block_size + offset) * D) * (int64_t)pool_elem;
        const char *row = src->data + (n * src->strides[0] + h * src->strides[1] + t * src->strides[2]) * (int64_t)src_elem;
        if (src->strides[3] == 1) {
          pmp_convert(dst, pool->dtype_id, row, src->dtype_id, D);
        } else {
          for (int64_t d = 0; d < D; d++)
            pmp_convert(dst + d * (int64_t)pool_elem, pool->dtype_id, row + d * src->strides[3] * (int64_t)src_elem,
                        src->dtype_id, 1);
        }
      }
    }
  return 0;
}

/* Key s of a sequence's kv_head in a pool: read in place when the pool holds the compute dtype, else
 * converted into buf. */
static inline const void *pool_row_at(void *buf, const pmp_tensor *pool, const int64_t *table, int64_t s,
                                      int64_t kv_head, int compute) {
  int64_t H = pool->sizes[1], block_size = pool->sizes[2], D = pool->sizes[3];
  const char *row = pool->data + ((table[s / block_size] * H + kv_head) * block_size + s % block_size) * D *
                                     (int64_t)pmp_dtype_size(pool->dtype_id);
  if (pool->dtype_id == compute) return row;
  pmp_convert(buf, compute, row, pool->dtype_id, D);
  return buf;
}
#define pool_row(REAL, buf, pool, table, s, kv_head, compute) \
  ((const REAL *)pool_row_at(buf, pool, table, s, kv_head, compute))

/* One query row against its visible keys: scores into `scores`, a two-pass softmax, then the weighted
 * sum of values into out. Rows come in any float dtype and are converted to REAL as they are read. */
#define DEFINE_PAGED_ROW(REAL, SUFFIX, EXP, DTYPE_ID)                                                                  \
  static void paged_row_##SUFFIX(const REAL *q, REAL *key, REAL *out, REAL *scores, const pmp_tensor *k_pool,          \
                                 const pmp_tensor *v_pool, const int64_t *table, int64_t visible, int64_t kv_head,     \
                                 REAL scale) {                                                                         \
    int64_t D = k_pool->sizes[3];                                                                                      \
    REAL peak = -INFINITY;                                                                                             \
    for (int64_t s = 0; s < visible; s++) {                                                                            \
      const REAL *k_row = pool_row(REAL, key, k_pool, table, s, kv_head, DTYPE_ID);                                     \
      REAL dot = 0;                                                                                                    \
      _Pragma("omp simd reduction(+ : dot)") for (int64_t d = 0; d < D; d++) dot += q[d] * k_row[d];                   \
      scores[s] = dot * scale;                                                                                         \
      if (scores[s] > peak) peak = scores[s];                                                                          \
    }                                                                                                                  \
    REAL total = 0;                                                                                                    \
    for (int64_t d = 0; d < D; d++) out[d] = 0;                                                                        \
    for (int64_t s = 0; s < visible; s++) {                                                                            \
      REAL p = EXP(scores[s] - peak);                                                                                  \
      total += p;                                                                                                      \
      const REAL *v_row = pool_row(REAL, key, v_pool, table, s, kv_head, DTYPE_ID);                                     \
      _Pragma("omp simd") for (int64_t d = 0; d < D; d++) out[d] += p * v_row[d];                                      \
    }                                                                                                                  \
    for (int64_t d = 0; d < D; d++) out[d] /= total;                                                                   \
  }

DEFINE_PAGED_ROW(float, f32, expf, PMP_F32)
DEFINE_PAGED_ROW(double, f64, exp, PMP_F64)

int pmp_cpu_paged_attention(const pmp_op_args *a) {
  pmp_tensor *out = a->out, *q = a->in[0], *k_pool = a->in[1], *v_pool = a->in[2];
  const int64_t *tables = (const int64_t *)a->in[3]->data, *lengths = (const int64_t *)a->in[4]->data;
  int64_t N = q->sizes[0], Hq = q->sizes[1], T = q->sizes[2], D = q->sizes[3], M = a->in[3]->sizes[1];
  int64_t blocks = k_pool->sizes[0], Hkv = k_pool->sizes[1], block_size = k_pool->sizes[2];
  int64_t longest = 0;
  for (int64_t n = 0; n < N; n++) {
    if (lengths[n] < T || lengths[n] > M * block_size)
      return pmp_fail_code("paged_attention: sequence %lld has %lld keys; it needs at least its %lld queries and at most "
                           "its block table's %lld x %lld",
                           (long long)n, (long long)lengths[n], (long long)T, (long long)M, (long long)block_size);
    for (int64_t b = 0; b < (lengths[n] + block_size - 1) / block_size; b++)
      if (tables[n * M + b] < 0 || tables[n * M + b] >= blocks)
        return pmp_fail_code("paged_attention: block table entry [%lld, %lld] = %lld is outside the pool's %lld blocks",
                             (long long)n, (long long)b, (long long)tables[n * M + b], (long long)blocks);
    if (lengths[n] > longest) longest = lengths[n];
  }
  bool wide = q->dtype_id == PMP_F64 || k_pool->dtype_id == PMP_F64;
  size_t real = wide ? sizeof(double) : sizeof(float), elem = pmp_dtype_size(q->dtype_id);
  int64_t rows = N * Hq * T, per_group = Hq / Hkv;
  int failed = 0;
#pragma omp parallel if (rows * longest * D > PMP_PARALLEL_THRESHOLD)
  {
    /* per thread: the query, one key or value row, the output row, and the scores */
    char *scratch = malloc(real * (size_t)(3 * D + longest));
    if (!scratch) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      if (!scratch) continue;
      int64_t n = r / (Hq * T), h = r / T % Hq, t = r % T;
      int64_t visible = lengths[n] - T + t + 1;
      const char *q_row = q->data + ((n * Hq + h) * T + t) * D * (int64_t)elem;
      char *o_row = out->data + (n * out->strides[0] + h * out->strides[1] + t * out->strides[2]) * (int64_t)elem;
      if (wide) {
        double *qv = (double *)scratch, *key = qv + D, *o = key + D, *scores = o + D;
        pmp_convert(qv, PMP_F64, q_row, q->dtype_id, D);
        paged_row_f64(qv, key, o, scores, k_pool, v_pool, tables + n * M, visible, h / per_group, a->f[0]);
        pmp_convert(o_row, out->dtype_id, o, PMP_F64, D);
      } else {
        float *qv = (float *)scratch, *key = qv + D, *o = key + D, *scores = o + D;
        pmp_convert(qv, PMP_F32, q_row, q->dtype_id, D);
        paged_row_f32(qv, key, o, scores, k_pool, v_pool, tables + n * M, visible, h / per_group, (float)a->f[0]);
        pmp_convert(o_row, out->dtype_id, o, PMP_F32, D);
      }
    }
    free(scratch);
  }
  if (failed) return pmp_fail_code("paged_attention: out of memory for %lld scores", (long long)longest);
  return 0;
}
