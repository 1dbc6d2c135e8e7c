/* CPU attention kernels: the tiled implementation (cpu_attention_impl.h) computing in f32 or f64. */
#include "internal.h"
#include "vector_math.h"

/* GEMM_ROWS: rows of C a tile GEMM keeps in registers (with 2 vectors of columns, 16 of AVX-512's 32) */
enum { BLOCK_Q = 64, BLOCK_K = 64, GEMM_ROWS = 8 };

typedef struct attention_shape {
  int64_t B, Hq, Hkv, T, S, D, offset, window;
  const int64_t *first_key;   /* per batch row [B] or per query [B, T], or NULL */
  int64_t first_key_row, first_key_col;   /* its strides */
  bool causal;
  double scale;
} attention_shape;

/* A [B, H, T, D] tensor as the kernels see it: any strides over B, H, T (in elements), rows of D
 * contiguous values of any float dtype. */
typedef struct attention_operand {
  char *data;
  int dtype;
  int64_t elem, batch, head, pos;
} attention_operand;

static attention_operand operand_of(const pmp_tensor *t) {
  return (attention_operand){.data = t ? t->data : NULL, .dtype = t ? t->dtype_id : PMP_F32,
                             .elem = t ? pmp_dtype_size(t->dtype_id) : 0, .batch = t ? t->strides[0] : 0,
                             .head = t ? t->strides[1] : 0, .pos = t ? t->strides[2] : 0};
}

static inline char *row_of(const attention_operand *t, int64_t b, int64_t h, int64_t pos) {
  return t->data + (b * t->batch + h * t->head + pos * t->pos) * t->elem;
}

/* Rows in and out of the compute dtype; bf16 as bit operations so the loops vectorize. Inlined into
 * the wide builds of the tile loaders. */
__attribute__((always_inline)) static inline void load_row_f32(float *dst, const char *src, int dtype, int64_t n) {
  if (dtype == PMP_BF16) {
    const uint16_t *s = (const uint16_t *)src;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_bits_to_f32(s[i]);
  } else if (dtype == PMP_F32) {
    memcpy(dst, src, sizeof(float) * (size_t)n);
  } else {
    pmp_convert(dst, PMP_F32, src, dtype, n);
  }
}

__attribute__((always_inline)) static inline void store_row_f32(char *dst, int dtype, const float *src, int64_t n) {
  if (dtype == PMP_BF16) {
    uint16_t *d = (uint16_t *)dst;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16_bits(src[i]);
  } else if (dtype == PMP_F32) {
    memcpy(dst, src, sizeof(float) * (size_t)n);
  } else {
    pmp_convert(dst, dtype, src, PMP_F32, n);
  }
}

__attribute__((always_inline)) static inline void load_row_f64(double *dst, const char *src, int dtype, int64_t n) {
  if (dtype == PMP_F64) memcpy(dst, src, sizeof(double) * (size_t)n);
  else pmp_convert(dst, PMP_F64, src, dtype, n);
}

__attribute__((always_inline)) static inline void store_row_f64(char *dst, int dtype, const double *src, int64_t n) {
  if (dtype == PMP_F64) memcpy(dst, src, sizeof(double) * (size_t)n);
  else pmp_convert(dst, dtype, src, PMP_F64, n);
}

#define REAL float
#define EXP expf
#define LOG logf
#define SUFFIX f32
#include "cpu_attention_impl.h"
#undef REAL
#undef EXP
#undef LOG
#undef SUFFIX

#define REAL double
#define EXP exp
#define LOG log
#define SUFFIX f64
#include "cpu_attention_impl.h"
#undef REAL
#undef EXP
#undef LOG
#undef SUFFIX

static attention_shape shape_of(const pmp_op_args *a, const pmp_tensor *first_key) {
  const pmp_tensor *q = a->in[0], *k = a->in[1];
  attention_shape sh = {.B = q->sizes[0], .Hq = q->sizes[1], .Hkv = k->sizes[1], .T = q->sizes[2], .S = k->sizes[2],
                        .D = q->sizes[3], .causal = a->i[0] != 0, .window = a->i[1], .scale = a->f[0]};
  sh.offset = sh.S - sh.T;
  sh.first_key = first_key ? (const int64_t *)first_key->data : NULL;
  bool per_query = first_key && first_key->ndim == 2;
  sh.first_key_row = per_query ? sh.T : 1;
  sh.first_key_col = per_query ? 1 : 0;
  return sh;
}

/* in: q, k, v (rows of D contiguous, any float dtypes), first keys (i64 [B] or NULL); out: o (q's dtype);
 * out2: log-sum-exp per query (compute dtype, contiguous); out3: NULL or o in the compute dtype. The
 * compute dtype is out2's. */
int pmp_cpu_attention(const pmp_op_args *a) {
  attention_shape sh = shape_of(a, a->in[3]);
  attention_operand q = operand_of(a->in[0]), k = operand_of(a->in[1]), v = operand_of(a->in[2]);
  attention_operand o = operand_of(a->out), exact = operand_of(a->out3);
  int rc = a->out2->dtype_id == PMP_F64
               ? attention_forward_f64(&sh, &q, &k, &v, &o, &exact, (double *)a->out2->data)
               : attention_forward_f32(&sh, &q, &k, &v, &o, &exact, (float *)a->out2->data);
  return rc == 0 ? 0 : pmp_fail_code("attention: out of memory for its work buffers");
}

/* in: q, k, v, o (compute dtype), lse, dO, first keys; out: dq, out2: dk, out3: dv, each in its input's
 * dtype and any strides with rows contiguous. */
int pmp_cpu_attention_backward(const pmp_op_args *a) {
  attention_shape sh = shape_of(a, a->in[6]);
  attention_operand q = operand_of(a->in[0]), k = operand_of(a->in[1]), v = operand_of(a->in[2]);
  attention_operand o = operand_of(a->in[3]), dout = operand_of(a->in[5]);
  attention_operand dq = operand_of(a->out), dk = operand_of(a->out2), dv = operand_of(a->out3);
  int rc = a->in[4]->dtype_id == PMP_F64
               ? attention_backward_f64(&sh, &q, &k, &v, &o, (const double *)a->in[4]->data, &dout, &dq, &dk, &dv)
               : attention_backward_f32(&sh, &q, &k, &v, &o, (const float *)a->in[4]->data, &dout, &dq, &dk, &dv);
  return rc == 0 ? 0 : pmp_fail_code("attention backward: out of memory for its work buffers");
}
