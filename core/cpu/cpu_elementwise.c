/* CPU kernels of the elementwise ops; each works on contiguous pieces handed out by iter.c. */
#include "tensor/iter.h"
#include "cpu/vector_math.h"

#define SQRT_HALF 0.70710678118654752440
#define SQRT_2_OVER_PI 0.79788456080286535588
#define INV_SQRT_2PI 0.39894228040143267794

#define MAP1(T, EXPR)                                                                                        \
  do {                                                                                                       \
    const T *x = in[0];                                                                                      \
    T *y = out;                                                                                              \
    _Pragma("omp simd") for (int64_t k = 0; k < n; k++) {                                                                        \
      T v = x[k];                                                                                            \
      y[k] = (EXPR);                                                                                         \
    }                                                                                                        \
  } while (0)

#define MAP2(T, TO, EXPR)                                                                                    \
  do {                                                                                                       \
    const T *x = in[0], *z = in[1];                                                                          \
    TO *y = out;                                                                                             \
    _Pragma("omp simd") for (int64_t k = 0; k < n; k++) {                                                                        \
      T a = x[k], b = z[k];                                                                                  \
      y[k] = (EXPR);                                                                                         \
    }                                                                                                        \
  } while (0)


/* Float unary ops, written once for float (F = f suffix functions) and double. */
#define FLOAT_UNARY(NAME, T, EXP, LOG, SQRT, FABS, SIN, COS, TANH, ERF)                                      \
  WIDE_VECTORS static void NAME(const void *ctx, void *out, const void *const *in, int64_t n) {             \
    switch (*(const int *)ctx) {                                                                             \
    case PMP_OP_NEG: MAP1(T, -v); break;                                                                     \
    case PMP_OP_EXP: MAP1(T, EXP(v)); break;                                                                 \
    case PMP_OP_LOG: MAP1(T, LOG(v)); break;                                                                 \
    case PMP_OP_SQRT: MAP1(T, SQRT(v)); break;                                                               \
    case PMP_OP_RSQRT: MAP1(T, (T)1 / SQRT(v)); break;                                                       \
    case PMP_OP_ABS: MAP1(T, FABS(v)); break;                                                                \
    case PMP_OP_SIN: MAP1(T, SIN(v)); break;                                                                 \
    case PMP_OP_COS: MAP1(T, COS(v)); break;                                                                 \
    case PMP_OP_TANH: MAP1(T, TANH(v)); break;                                                               \
    case PMP_OP_SIGMOID: MAP1(T, (T)1 / ((T)1 + EXP(-v))); break;                                            \
    case PMP_OP_RELU: MAP1(T, v > 0 ? v : (T)0); break;                                                      \
    case PMP_OP_GELU: MAP1(T, (T)0.5 * v * ((T)1 + ERF(v * (T)SQRT_HALF))); break;                            \
    case PMP_OP_GELU_TANH:                                                                                   \
      MAP1(T, (T)0.5 * v * ((T)1 + TANH((T)SQRT_2_OVER_PI * (v + (T)0.044715 * v * v * v))));               \
      break;                                                                                                 \
    case PMP_OP_SILU: MAP1(T, v / ((T)1 + EXP(-v))); break;                                                  \
    case PMP_OP_SIGN: MAP1(T, (T)((v > 0) - (v < 0))); break;                                                \
    }                                                                                                        \
  }

FLOAT_UNARY(unary_f32, float, expf, logf, sqrtf, fabsf, sinf, cosf, tanhf, erff)
FLOAT_UNARY(unary_f64, double, exp, log, sqrt, fabs, sin, cos, tanh, erf)

static void unary_i64(const void *ctx, void *out, const void *const *in, int64_t n) {
  switch (*(const int *)ctx) {
  case PMP_OP_NEG: MAP1(int64_t, -v); break;
  case PMP_OP_ABS: MAP1(int64_t, v < 0 ? -v : v); break;
  case PMP_OP_RELU: MAP1(int64_t, v > 0 ? v : 0); break;
  case PMP_OP_SIGN: MAP1(int64_t, (v > 0) - (v < 0)); break;
  }
}

static void logical_not(const void *ctx, void *out, const void *const *in, int64_t n) {
  (void)ctx;
  MAP1(uint8_t, !v);
}

int pmp_cpu_unary(const pmp_op_args *a) {
  int op = a->op;
  pmp_elementwise e = {.out = a->out, .in = {a->in[0]}, .nin = 1, .ctx = &op};
  int cd = pmp_compute_dtype(a->out->dtype_id);
  if (op == PMP_OP_LOGICAL_NOT) {
    cd = PMP_BOOL;
    e.fn = logical_not;
  } else {
    e.fn = cd == PMP_F64 ? unary_f64 : cd == PMP_F32 ? unary_f32 : unary_i64;
  }
  e.out_buf_dtype = e.in_buf_dtype[0] = cd;
  return pmp_elementwise_run(&e);
}

/* Binary ops whose result has the operands' dtype. The exactly rounded ones get the widest vectors; the
 * others stay on one build, since libmvec's variants for different vector widths may differ in the
 * last bit. */
#define FLOAT_ARITH(NAME, T)                                                                                 \
  WIDE_VECTORS static void NAME(const void *ctx, void *out, const void *const *in, int64_t n) {             \
    switch (*(const int *)ctx) {                                                                             \
    case PMP_OP_ADD: MAP2(T, T, a + b); break;                                                               \
    case PMP_OP_SUB: MAP2(T, T, a - b); break;                                                               \
    case PMP_OP_MUL: MAP2(T, T, a * b); break;                                                               \
    case PMP_OP_DIV: MAP2(T, T, a / b); break;                                                               \
    case PMP_OP_MAXIMUM: MAP2(T, T, (a > b || a != a) ? a : b); break;                                       \
    case PMP_OP_MINIMUM: MAP2(T, T, (a < b || a != a) ? a : b); break;                                       \
    }                                                                                                        \
  }

FLOAT_ARITH(arith_f32, float)
FLOAT_ARITH(arith_f64, double)

/* bf16 operands computed in f32 and rounded once on store, as converting to f32 pieces would. */
#define MAP2_BF16(EXPR)                                                                                      \
  do {                                                                                                       \
    const uint16_t *x = in[0], *z = in[1];                                                                   \
    uint16_t *y = out;                                                                                       \
    _Pragma("omp simd") for (int64_t k = 0; k < n; k++) {                                                    \
      float a = bf16_bits_to_f32(x[k]), b = bf16_bits_to_f32(z[k]);                                          \
      y[k] = f32_to_bf16_bits(EXPR);                                                                         \
    }                                                                                                        \
  } while (0)

WIDE_VECTORS static void arith_bf16(const void *ctx, void *out, const void *const *in, int64_t n) {
  switch (*(const int *)ctx) {
  case PMP_OP_ADD: MAP2_BF16(a + b); break;
  case PMP_OP_SUB: MAP2_BF16(a - b); break;
  case PMP_OP_MUL: MAP2_BF16(a * b); break;
  case PMP_OP_DIV: MAP2_BF16(a / b); break;
  case PMP_OP_MAXIMUM: MAP2_BF16((a > b || a != a) ? a : b); break;
  case PMP_OP_MINIMUM: MAP2_BF16((a < b || a != a) ? a : b); break;
  }
}

static bool is_arith(int op) {
  return op == PMP_OP_ADD || op == PMP_OP_SUB || op == PMP_OP_MUL || op == PMP_OP_DIV || op == PMP_OP_MAXIMUM ||
         op == PMP_OP_MINIMUM;
}

#define FLOAT_BINARY(NAME, T, POW, EXP, ERF, TANH)                                                          \
  static void NAME(const void *ctx, void *out, const void *const *in, int64_t n) {                          \
    switch (*(const int *)ctx) {                                                                             \
    case PMP_OP_POW: MAP2(T, T, POW(a, b)); break;                                                           \
    case PMP_OP_GELU_GRAD:                                                                                   \
      MAP2(T, T, b * ((T)0.5 * ((T)1 + ERF(a * (T)SQRT_HALF)) + a * (T)INV_SQRT_2PI * EXP((T)-0.5 * a * a))); \
      break;                                                                                                 \
    case PMP_OP_GELU_TANH_GRAD: {                                                                            \
      const T *x = in[0], *dy = in[1];                                                                       \
      T *y = out;                                                                                            \
      for (int64_t k = 0; k < n; k++) {                                                                      \
        T v = x[k], u = (T)SQRT_2_OVER_PI * (v + (T)0.044715 * v * v * v), t = TANH(u);                     \
        T du = (T)SQRT_2_OVER_PI * ((T)1 + (T)3 * (T)0.044715 * v * v);                                     \
        y[k] = dy[k] * ((T)0.5 * ((T)1 + t) + (T)0.5 * v * ((T)1 - t * t) * du);                            \
      }                                                                                                      \
      break;                                                                                                 \
    }                                                                                                        \
    case PMP_OP_SILU_GRAD: {                                                                                 \
      const T *x = in[0], *dy = in[1];                                                                       \
      T *y = out;                                                                                            \
      for (int64_t k = 0; k < n; k++) {                                                                      \
        T s = (T)1 / ((T)1 + EXP(-x[k]));                                                                    \
        y[k] = dy[k] * s * ((T)1 + x[k] * ((T)1 - s));                                                       \
      }                                                                                                      \
      break;                                                                                                 \
    }                                                                                                        \
    }                                                                                                        \
  }

FLOAT_BINARY(binary_f32, float, powf, expf, erff, tanhf)
FLOAT_BINARY(binary_f64, double, pow, exp, erf, tanh)

static int64_t ipow(int64_t base, int64_t e) {
  if (e < 0) return base == 1 ? 1 : base == -1 ? (e % 2 ? -1 : 1) : 0;
  int64_t r = 1;
  while (e) {
    if (e & 1) r *= base;
    base *= base;
    e >>= 1;
  }
  return r;
}

static void binary_i64(const void *ctx, void *out, const void *const *in, int64_t n) {
  switch (*(const int *)ctx) {
  case PMP_OP_ADD: MAP2(int64_t, int64_t, a + b); break;
  case PMP_OP_SUB: MAP2(int64_t, int64_t, a - b); break;
  case PMP_OP_MUL: MAP2(int64_t, int64_t, a * b); break;
  case PMP_OP_POW: MAP2(int64_t, int64_t, ipow(a, b)); break;
  case PMP_OP_MAXIMUM: MAP2(int64_t, int64_t, a > b ? a : b); break;
  case PMP_OP_MINIMUM: MAP2(int64_t, int64_t, a < b ? a : b); break;
  }
}

#define COMPARE(NAME, T)                                                                                     \
  static void NAME(const void *ctx, void *out, const void *const *in, int64_t n) {                          \
    switch (*(const int *)ctx) {                                                                             \
    case PMP_OP_EQ: MAP2(T, uint8_t, a == b); break;                                                         \
    case PMP_OP_NE: MAP2(T, uint8_t, a != b); break;                                                         \
    case PMP_OP_LT: MAP2(T, uint8_t, a < b); break;                                                          \
    case PMP_OP_LE: MAP2(T, uint8_t, a <= b); break;                                                         \
    case PMP_OP_GT: MAP2(T, uint8_t, a > b); break;                                                          \
    case PMP_OP_GE: MAP2(T, uint8_t, a >= b); break;                                                         \
    case PMP_OP_LOGICAL_AND: MAP2(T, uint8_t, a && b); break;                                                \
    case PMP_OP_LOGICAL_OR: MAP2(T, uint8_t, a || b); break;                                                 \
    }                                                                                                        \
  }

COMPARE(compare_f32, float)
COMPARE(compare_f64, double)
COMPARE(compare_i64, int64_t)

/* The operands' compute dtype is that of in[0] (the front-end has promoted both to one dtype). */
int pmp_cpu_binary(const pmp_op_args *a) {
  int op = a->op;
  int cd = pmp_compute_dtype(a->in[0]->dtype_id);
  pmp_elementwise e = {.out = a->out, .in = {a->in[0], a->in[1]}, .nin = 2, .ctx = &op,
                       .in_buf_dtype = {cd, cd}};
  if (op >= PMP_OP_EQ && op <= PMP_OP_LOGICAL_OR) {
    e.fn = cd == PMP_F64 ? compare_f64 : cd == PMP_F32 ? compare_f32 : compare_i64;
    e.out_buf_dtype = PMP_BOOL;
  } else if (is_arith(op) && cd != PMP_I64) {
    bool bf16 = a->in[0]->dtype_id == PMP_BF16 && a->in[1]->dtype_id == PMP_BF16 && a->out->dtype_id == PMP_BF16;
    if (bf16) e.in_buf_dtype[0] = e.in_buf_dtype[1] = PMP_BF16;
    e.fn = bf16 ? arith_bf16 : cd == PMP_F64 ? arith_f64 : arith_f32;
    e.out_buf_dtype = bf16 ? PMP_BF16 : cd;
  } else {
    e.fn = cd == PMP_F64 ? binary_f64 : cd == PMP_F32 ? binary_f32 : binary_i64;
    e.out_buf_dtype = cd;
  }
  return pmp_elementwise_run(&e);
}

#define SELECT(NAME, T)                                                                                      \
  static void NAME(const void *ctx, void *out, const void *const *in, int64_t n) {                          \
    (void)ctx;                                                                                               \
    const uint8_t *c = in[0];                                                                                \
    const T *x = in[1], *z = in[2];                                                                          \
    T *y = out;                                                                                              \
    for (int64_t k = 0; k < n; k++) y[k] = c[k] ? x[k] : z[k];                                               \
  }
SELECT(select_1, uint8_t)
SELECT(select_2, uint16_t)
SELECT(select_4, uint32_t)
SELECT(select_8, uint64_t)

/* Selection moves bits, so it runs in the output dtype itself. */
int pmp_cpu_where(const pmp_op_args *a) {
  int dt = a->out->dtype_id, es = pmp_dtype_size(dt);
  pmp_elementwise e = {.out = a->out, .out_buf_dtype = dt, .in = {a->in[0], a->in[1], a->in[2]},
                       .in_buf_dtype = {PMP_BOOL, dt, dt}, .nin = 3,
                       .fn = es == 1 ? select_1 : es == 2 ? select_2 : es == 4 ? select_4 : select_8};
  return pmp_elementwise_run(&e);
}

static void clamp_f32(const void *ctx, void *out, const void *const *in, int64_t n) {
  const double *b = ctx;
  float lo = (float)b[0], hi = (float)b[1];
  MAP1(float, v < lo ? lo : v > hi ? hi : v);
}
static void clamp_f64(const void *ctx, void *out, const void *const *in, int64_t n) {
  const double *b = ctx;
  MAP1(double, v < b[0] ? b[0] : v > b[1] ? b[1] : v);
}
static void clamp_i64(const void *ctx, void *out, const void *const *in, int64_t n) {
  const double *b = ctx;
  MAP1(int64_t, (double)v < b[0] ? (int64_t)ceil(b[0]) : (double)v > b[1] ? (int64_t)floor(b[1]) : v);
}

int pmp_cpu_clamp(const pmp_op_args *a) {
  int cd = pmp_compute_dtype(a->out->dtype_id);
  pmp_elementwise e = {.out = a->out, .out_buf_dtype = cd, .in = {a->in[0]}, .in_buf_dtype = {cd}, .nin = 1,
                       .fn = cd == PMP_F64 ? clamp_f64 : cd == PMP_F32 ? clamp_f32 : clamp_i64, .ctx = a->f};
  return pmp_elementwise_run(&e);
}

static void fill_masked_f64(const void *ctx, void *out, const void *const *in, int64_t n) {
  double value = *(const double *)ctx;
  const double *x = in[0];
  const uint8_t *m = in[1];
  double *y = out;
  for (int64_t k = 0; k < n; k++) y[k] = m[k] ? value : x[k];
}
static void fill_masked_f32(const void *ctx, void *out, const void *const *in, int64_t n) {
  float value = (float)*(const double *)ctx;
  const float *x = in[0];
  const uint8_t *m = in[1];
  float *y = out;
  for (int64_t k = 0; k < n; k++) y[k] = m[k] ? value : x[k];
}
static void fill_masked_i64(const void *ctx, void *out, const void *const *in, int64_t n) {
  int64_t value = (int64_t)*(const double *)ctx;
  const int64_t *x = in[0];
  const uint8_t *m = in[1];
  int64_t *y = out;
  for (int64_t k = 0; k < n; k++) y[k] = m[k] ? value : x[k];
}

int pmp_cpu_masked_fill(const pmp_op_args *a) {
  int cd = pmp_compute_dtype(a->out->dtype_id);
  pmp_elementwise e = {.out = a->out, .out_buf_dtype = cd, .in = {a->in[0], a->in[1]},
                       .in_buf_dtype = {cd, PMP_BOOL}, .nin = 2, .ctx = a->f,
                       .fn = cd == PMP_F64 ? fill_masked_f64 : cd == PMP_F32 ? fill_masked_f32 : fill_masked_i64};
  return pmp_elementwise_run(&e);
}

typedef struct fill_value {
  char bits[8];
  int es;
} fill_value;

static void fill_piece(const void *ctx, void *out, const void *const *in, int64_t n) {
  (void)in;
  const fill_value *v = ctx;
  pmp_iter_splat(out, v->bits, v->es, n);
}

static int fill(pmp_tensor *out, const fill_value *v) {
  pmp_elementwise e = {.out = out, .out_buf_dtype = out->dtype_id, .fn = fill_piece, .ctx = v};
  return pmp_elementwise_run(&e);
}

/* ctx: {destination dtype, source dtype}; converting here keeps a dtype change to one pass. */
static void copy_piece(const void *ctx, void *out, const void *const *in, int64_t n) {
  const int *dtypes = ctx;
  pmp_convert(out, dtypes[0], in[0], dtypes[1], n);
}

int pmp_cpu_copy(const pmp_op_args *a) {
  const pmp_tensor *src = a->in[0];
  bool one_element = true;
  for (int d = 0; d < src->ndim; d++) one_element = one_element && (src->strides[d] == 0 || src->sizes[d] == 1);
  if (one_element) {
    /* a broadcast scalar, as fill_ copies: convert it once */
    fill_value v = {.es = pmp_dtype_size(a->out->dtype_id)};
    pmp_convert(v.bits, a->out->dtype_id, src->data, src->dtype_id, 1);
    return fill(a->out, &v);
  }
  if (pmp_iter_copy_runs(a->out, src) || pmp_iter_copy_transposed(a->out, src)) return 0;
  int dtypes[2] = {a->out->dtype_id, src->dtype_id};
  pmp_elementwise e = {.out = a->out, .out_buf_dtype = dtypes[0], .in = {a->in[0]}, .in_buf_dtype = {dtypes[1]},
                       .nin = 1, .fn = copy_piece, .ctx = dtypes};
  return pmp_elementwise_run(&e);
}

/* The element is the value converted as a store through f64 (floats) or i64 (integers) would be. */
int pmp_cpu_fill(const pmp_op_args *a) {
  int dt = a->out->dtype_id;
  fill_value v = {.es = pmp_dtype_size(dt)};
  if (pmp_dtype_is_float(dt))
    pmp_store_from_f64(dt, v.bits, a->f[0]);
  else
    pmp_store_from_i64(dt, v.bits, (int64_t)a->f[0]);
  return fill(a->out, &v);
}

int pmp_cpu_arange(const pmp_op_args *a) {
  int64_t n = pmp_numel(a->out);
  int es = pmp_dtype_size(a->out->dtype_id);
  for (int64_t k = 0; k < n; k++) {
    if (pmp_dtype_is_float(a->out->dtype_id))
      pmp_store_from_f64(a->out->dtype_id, a->out->data + k * es, a->f[0] + (double)k * a->f[1]);
    else
      pmp_store_from_i64(a->out->dtype_id, a->out->data + k * es, (int64_t)a->f[0] + k * (int64_t)a->f[1]);
  }
  return 0;
}

/* tril/triu on a contiguous [batch, rows, cols] tensor: i[0] = diagonal, i[1] = 1 for tril. */
int pmp_cpu_tri(const pmp_op_args *a) {
  const pmp_tensor *x = a->in[0];
  pmp_tensor *y = a->out;
  int64_t rows = x->sizes[x->ndim - 2], cols = x->sizes[x->ndim - 1];
  int64_t batch = pmp_numel(x) / (rows * cols > 0 ? rows * cols : 1);
  int es = pmp_dtype_size(x->dtype_id);
  int64_t diagonal = a->i[0];
  bool lower = a->i[1];
  for (int64_t b = 0; b < batch; b++)
    for (int64_t r = 0; r < rows; r++) {
      const char *src = x->data + ((b * rows + r) * cols) * es;
      char *dst = y->data + ((b * rows + r) * cols) * es;
      for (int64_t c = 0; c < cols; c++) {
        bool keep = lower ? c - r <= diagonal : c - r >= diagonal;
        if (keep)
          memcpy(dst + c * es, src + c * es, (size_t)es);
        else
          memset(dst + c * es, 0, (size_t)es);
      }
    }
  return 0;
}
