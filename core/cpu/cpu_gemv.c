/* Few-row products: c[rows, m] = a[rows, k] @ b[k, m] for rows <= PMP_GEMV_MAX_ROWS, in f32, bf16 and
 * f16 with f32 accumulation. This is decoding with a KV cache: rows = batch x new tokens against a
 * weight, usually W [m, k] row-major used transposed (x @ W^T), so that each output is the dot product
 * of an input row with one contiguous weight row.
 *
 * GEMM libraries first copy the weight into their packed layout, which for one to a few rows costs as
 * much as the product; BLIS's gemv reads it in place but on one core. Here the outputs are split over
 * all threads in fixed blocks and each thread streams its weight rows once from memory, for every
 * input row at a time. The inputs are converted once to zero-padded f32 rows (small); weights are
 * converted in registers. Kernels for AVX-512 (with its BF16 dot products for bf16 weights by rows) and
 * AVX2 are picked at run time, with a scalar fallback.
 *
 * Determinism: each output is computed by one thread with a reduction order that depends only on k
 * and the kernel the CPU picks, so results do not depend on the thread count. */
#include "internal.h"
#include "cpu/vector_math.h"
#include <immintrin.h>

enum {
  OUT_BLOCK = 64,   /* outputs per unit of work handed to a thread (a multiple of every kernel's width) */
  SUB_BLOCK = 16,   /* outputs whose weights every group of input rows reads in turn (a multiple of the widths) */
  ROW_GROUP = 8,    /* most input rows that share one pass over the weights */
  L1_INPUT_BYTES = 16384,
  PAD = 16,         /* input rows are padded with zeros to a multiple of the widest vector */
};

#define ALWAYS_INLINE __attribute__((always_inline)) inline
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))
#define TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma,f16c")))
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

/* Weight rows handled at once for a group of g input rows: enough independent sums to hide the FMA
 * latency for one row, few enough accumulators to stay in AVX2's 16 registers for eight. */
/* pmp_dtype_size for the three dtypes here, visible to the compiler so that it stays out of the loops */
static inline int elem_size(int dtype) { return dtype == PMP_F32 ? 4 : 2; }

static int weights_per_pass(int g) { return g >= 8 ? 1 : g >= 4 ? 2 : g >= 2 ? 4 : 8; }

/* ---- AVX-512: 16 lanes, tails read with masked loads ---- */

TARGET_AVX512 static ALWAYS_INLINE __m512 load16(int dtype, const void *p, __mmask16 mask) {
  if (dtype == PMP_F32) return _mm512_maskz_loadu_ps(mask, p);
  __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  if (dtype == PMP_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

/* out[i * ldo + j] = x_i . w_j for g input rows x (f32, zero-padded) and r weight rows w. */
TARGET_AVX512 static ALWAYS_INLINE void dot_avx512(int dtype, int g, int r, const float *x, int64_t ldx, const char *w,
                                                   int64_t ldw, int64_t k, float *out, int64_t ldo) {
  int es = elem_size(dtype);
  __m512 acc[8][ROW_GROUP];
#pragma GCC unroll 8
  for (int j = 0; j < r; j++)
#pragma GCC unroll 8
    for (int i = 0; i < g; i++) acc[j][i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k; p += 16) {
    __mmask16 mask = k - p >= 16 ? 0xffff : (__mmask16)((1u << (k - p)) - 1);
#pragma GCC unroll 8
    for (int j = 0; j < r; j++) {
      __m512 wv = load16(dtype, w + (j * ldw + p) * es, mask);
#pragma GCC unroll 8
      for (int i = 0; i < g; i++) acc[j][i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * ldx + p), wv, acc[j][i]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < r; j++)
#pragma GCC unroll 8
    for (int i = 0; i < g; i++) out[i * ldo + j] = _mm512_reduce_add_ps(acc[j][i]);
}

/* out[i * ldo + j] = sum_p x_i[p] b[p, j] for g input rows and 16 columns of b (stored by rows). */
TARGET_AVX512 static ALWAYS_INLINE void axpy_avx512(int dtype, int g, const float *x, int64_t ldx, const char *b,
                                                    int64_t ldb, int64_t k, int64_t cols, float *out, int64_t ldo) {
  int es = elem_size(dtype);
  __mmask16 mask = cols >= 16 ? 0xffff : (__mmask16)((1u << cols) - 1);
  __m512 acc[ROW_GROUP];
#pragma GCC unroll 8
  for (int i = 0; i < g; i++) acc[i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k; p++) {
    __m512 bv = load16(dtype, b + p * ldb * es, mask);
#pragma GCC unroll 8
    for (int i = 0; i < g; i++) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * ldx + p]), bv, acc[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < g; i++) _mm512_mask_storeu_ps(out + i * ldo, mask, acc[i]);
}

/* ---- AVX2: 8 lanes; what is left of k or of the columns is added one element at a time ---- */

TARGET_AVX2 static ALWAYS_INLINE __m256 load8(int dtype, const void *p) {
  if (dtype == PMP_F32) return _mm256_loadu_ps(p);
  __m128i h = _mm_loadu_si128(p);
  if (dtype == PMP_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

TARGET_AVX2 static ALWAYS_INLINE float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static float load1(int dtype, const char *p) {
  if (dtype == PMP_F32) return *(const float *)p;
  return dtype == PMP_BF16 ? bf16_bits_to_f32(*(const uint16_t *)p) : pmp_f16_to_f32(*(const uint16_t *)p);
}

TARGET_AVX2 static ALWAYS_INLINE void dot_avx2(int dtype, int g, int r, const float *x, int64_t ldx, const char *w,
                                               int64_t ldw, int64_t k, float *out, int64_t ldo) {
  int es = elem_size(dtype);
  int64_t whole = k / 8 * 8;
  __m256 acc[8][ROW_GROUP];
#pragma GCC unroll 8
  for (int j = 0; j < r; j++)
#pragma GCC unroll 8
    for (int i = 0; i < g; i++) acc[j][i] = _mm256_setzero_ps();
  for (int64_t p = 0; p < whole; p += 8) {
#pragma GCC unroll 8
    for (int j = 0; j < r; j++) {
      __m256 wv = load8(dtype, w + (j * ldw + p) * es);
#pragma GCC unroll 8
      for (int i = 0; i < g; i++) acc[j][i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * ldx + p), wv, acc[j][i]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < r; j++)
#pragma GCC unroll 8
    for (int i = 0; i < g; i++) {
      float sum = sum8(acc[j][i]);
      for (int64_t p = whole; p < k; p++) sum += x[i * ldx + p] * load1(dtype, w + (j * ldw + p) * es);
      out[i * ldo + j] = sum;
    }
}

/* Eight whole columns. */
TARGET_AVX2 static ALWAYS_INLINE void axpy_avx2(int dtype, int g, const float *x, int64_t ldx, const char *b,
                                                int64_t ldb, int64_t k, float *out, int64_t ldo) {
  int es = elem_size(dtype);
  __m256 acc[ROW_GROUP];
#pragma GCC unroll 8
  for (int i = 0; i < g; i++) acc[i] = _mm256_setzero_ps();
  for (int64_t p = 0; p < k; p++) {
    __m256 bv = load8(dtype, b + p * ldb * es);
#pragma GCC unroll 8
    for (int i = 0; i < g; i++) acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(x[i * ldx + p]), bv, acc[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < g; i++) _mm256_storeu_ps(out + i * ldo, acc[i]);
}

/* ---- Outputs [j0, j1) for a group of g input rows, per instruction set ---- */

typedef struct gemv_args {
  int dtype;
  bool weight_rows;     /* b is W^T with W [m, k] stored by rows; else b [k, m] is stored by rows */
  const char *b;
  int64_t ldb, k, m;    /* ldb: elements between W's rows (weight_rows) or b's rows */
  const float *x;       /* the input rows as f32, each padded with zeros to ldx */
  int64_t ldx;
  const uint16_t *x_bf16;   /* bf16 inputs only: the rows as they are, padded with zeros to ldx_bf16 */
  int64_t ldx_bf16;
  float *y;             /* [rows, m] f32 results */
} gemv_args;

/* Without AVX2: the same sums one element at a time, in order of k. */
static void outputs_scalar(const gemv_args *s, int g, const float *x, float *y, int64_t j0, int64_t j1) {
  int es = elem_size(s->dtype);
  int64_t step_k = s->weight_rows ? 1 : s->ldb, step_j = s->weight_rows ? s->ldb : 1;
  for (int64_t j = j0; j < j1; j++)
    for (int i = 0; i < g; i++) {
      float sum = 0;
      for (int64_t p = 0; p < s->k; p++) sum += x[i * s->ldx + p] * load1(s->dtype, s->b + (p * step_k + j * step_j) * es);
      y[i * s->m + j] = sum;
    }
}

TARGET_AVX512 static ALWAYS_INLINE void outputs_avx512_typed(int dtype, int g, const gemv_args *s, const float *x,
                                                             float *y, int64_t j0, int64_t j1) {
  int es = elem_size(dtype), r = weights_per_pass(g);
  if (s->weight_rows) {
    int64_t j = j0;
    for (; j + r <= j1; j += r) dot_avx512(dtype, g, r, x, s->ldx, s->b + j * s->ldb * es, s->ldb, s->k, y + j, s->m);
    for (; j < j1; j++) dot_avx512(dtype, g, 1, x, s->ldx, s->b + j * s->ldb * es, s->ldb, s->k, y + j, s->m);
  } else {
    for (int64_t j = j0; j < j1; j += 16) axpy_avx512(dtype, g, x, s->ldx, s->b + j * es, s->ldb, s->k, j1 - j, y + j, s->m);
  }
}

/* The group sizes and dtypes as constants, so that each kernel's accumulators live in registers. */
TARGET_AVX512 static void outputs_avx512(const gemv_args *s, int g, const float *x, float *y, int64_t j0, int64_t j1) {
  switch (s->dtype) {
  case PMP_F32:
    return g == 8 ? outputs_avx512_typed(PMP_F32, 8, s, x, y, j0, j1) : g == 4 ? outputs_avx512_typed(PMP_F32, 4, s, x, y, j0, j1)
         : g == 2 ? outputs_avx512_typed(PMP_F32, 2, s, x, y, j0, j1) : outputs_avx512_typed(PMP_F32, 1, s, x, y, j0, j1);
  case PMP_BF16:
    return g == 8 ? outputs_avx512_typed(PMP_BF16, 8, s, x, y, j0, j1) : g == 4 ? outputs_avx512_typed(PMP_BF16, 4, s, x, y, j0, j1)
         : g == 2 ? outputs_avx512_typed(PMP_BF16, 2, s, x, y, j0, j1) : outputs_avx512_typed(PMP_BF16, 1, s, x, y, j0, j1);
  default:
    return g == 8 ? outputs_avx512_typed(PMP_F16, 8, s, x, y, j0, j1) : g == 4 ? outputs_avx512_typed(PMP_F16, 4, s, x, y, j0, j1)
         : g == 2 ? outputs_avx512_typed(PMP_F16, 2, s, x, y, j0, j1) : outputs_avx512_typed(PMP_F16, 1, s, x, y, j0, j1);
  }
}

TARGET_AVX2 static ALWAYS_INLINE void outputs_avx2_typed(int dtype, int g, const gemv_args *s, const float *x, float *y,
                                                         int64_t j0, int64_t j1) {
  int es = elem_size(dtype), r = weights_per_pass(g);
  if (s->weight_rows) {
    int64_t j = j0;
    for (; j + r <= j1; j += r) dot_avx2(dtype, g, r, x, s->ldx, s->b + j * s->ldb * es, s->ldb, s->k, y + j, s->m);
    for (; j < j1; j++) dot_avx2(dtype, g, 1, x, s->ldx, s->b + j * s->ldb * es, s->ldb, s->k, y + j, s->m);
  } else {
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) axpy_avx2(dtype, g, x, s->ldx, s->b + j * es, s->ldb, s->k, y + j, s->m);
    outputs_scalar(s, g, x, y, j, j1);
  }
}

TARGET_AVX2 static void outputs_avx2(const gemv_args *s, int g, const float *x, float *y, int64_t j0, int64_t j1) {
  switch (s->dtype) {
  case PMP_F32:
    return g == 8 ? outputs_avx2_typed(PMP_F32, 8, s, x, y, j0, j1) : g == 4 ? outputs_avx2_typed(PMP_F32, 4, s, x, y, j0, j1)
         : g == 2 ? outputs_avx2_typed(PMP_F32, 2, s, x, y, j0, j1) : outputs_avx2_typed(PMP_F32, 1, s, x, y, j0, j1);
  case PMP_BF16:
    return g == 8 ? outputs_avx2_typed(PMP_BF16, 8, s, x, y, j0, j1) : g == 4 ? outputs_avx2_typed(PMP_BF16, 4, s, x, y, j0, j1)
         : g == 2 ? outputs_avx2_typed(PMP_BF16, 2, s, x, y, j0, j1) : outputs_avx2_typed(PMP_BF16, 1, s, x, y, j0, j1);
  default:
    return g == 8 ? outputs_avx2_typed(PMP_F16, 8, s, x, y, j0, j1) : g == 4 ? outputs_avx2_typed(PMP_F16, 4, s, x, y, j0, j1)
         : g == 2 ? outputs_avx2_typed(PMP_F16, 2, s, x, y, j0, j1) : outputs_avx2_typed(PMP_F16, 1, s, x, y, j0, j1);
  }
}

/* ---- AVX-512 BF16: bf16 weights by rows against bf16 inputs, 32 products per instruction ---- */

/* vdpbf16ps multiplies pairs of bf16 exactly and adds both to an f32 lane: twice the products of an
 * FMA and no conversion of the weights. out[i * ldo + j] = x_i . w_j as in dot_avx512. */
TARGET_AVX512_BF16 static ALWAYS_INLINE void dot_bf16_pairs(int g, int r, const uint16_t *x, int64_t ldx, const uint16_t *w,
                                                            int64_t ldw, int64_t k, float *out, int64_t ldo) {
  __m512 acc[8][ROW_GROUP];
#pragma GCC unroll 8
  for (int j = 0; j < r; j++)
#pragma GCC unroll 8
    for (int i = 0; i < g; i++) acc[j][i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k; p += 32) {
    __mmask32 mask = k - p >= 32 ? 0xffffffffu : (__mmask32)((1u << (k - p)) - 1);
#pragma GCC unroll 8
    for (int j = 0; j < r; j++) {
      __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + j * ldw + p);
#pragma GCC unroll 8
      for (int i = 0; i < g; i++) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], (__m512bh)_mm512_loadu_si512(x + i * ldx + p), wv);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < r; j++)
#pragma GCC unroll 8
    for (int i = 0; i < g; i++) out[i * ldo + j] = _mm512_reduce_add_ps(acc[j][i]);
}

TARGET_AVX512_BF16 static ALWAYS_INLINE void outputs_bf16_pairs_typed(int g, const gemv_args *s, const uint16_t *x, float *y,
                                                                      int64_t j0, int64_t j1) {
  const uint16_t *b = (const uint16_t *)s->b;
  int r = weights_per_pass(g);
  int64_t j = j0;
  for (; j + r <= j1; j += r) dot_bf16_pairs(g, r, x, s->ldx_bf16, b + j * s->ldb, s->ldb, s->k, y + j, s->m);
  for (; j < j1; j++) dot_bf16_pairs(g, 1, x, s->ldx_bf16, b + j * s->ldb, s->ldb, s->k, y + j, s->m);
}

TARGET_AVX512_BF16 static void outputs_avx512_bf16(const gemv_args *s, int g, const float *x, float *y, int64_t j0, int64_t j1) {
  if (s->dtype != PMP_BF16 || !s->weight_rows) return outputs_avx512(s, g, x, y, j0, j1);
  const uint16_t *x_bf16 = s->x_bf16 + (x - s->x) / s->ldx * s->ldx_bf16;   /* the same input row */
  return g == 8 ? outputs_bf16_pairs_typed(8, s, x_bf16, y, j0, j1) : g == 4 ? outputs_bf16_pairs_typed(4, s, x_bf16, y, j0, j1)
       : g == 2 ? outputs_bf16_pairs_typed(2, s, x_bf16, y, j0, j1) : outputs_bf16_pairs_typed(1, s, x_bf16, y, j0, j1);
}

typedef void (*outputs_fn)(const gemv_args *s, int g, const float *x, float *y, int64_t j0, int64_t j1);

/* The widest kernel the CPU runs, or a narrower one named by PMP_GEMV_KERNEL=avx512, avx2 or scalar (so
 * that the fallbacks are tested on any machine), read at each call. */
static outputs_fn pick_kernel(void) {
  static int widest = -1;   /* 3: AVX-512 with BF16, 2: AVX-512, 1: AVX2, 0: scalar */
  if (widest < 0) {
    __builtin_cpu_init();
    bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    widest = avx512 && __builtin_cpu_supports("avx512bf16")                                              ? 3
           : avx512                                                                                       ? 2
           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") ? 1
                                                                                                          : 0;
  }
  const char *asked = getenv("PMP_GEMV_KERNEL");
  int level = widest;
  if (asked && strcmp(asked, "scalar") == 0) level = 0;
  else if (asked && strcmp(asked, "avx2") == 0 && level > 1) level = 1;
  else if (asked && strcmp(asked, "avx512") == 0 && level > 2) level = 2;
  static const outputs_fn kernels[] = {outputs_scalar, outputs_avx2, outputs_avx512, outputs_avx512_bf16};
  return kernels[level];
}

/* Input rows as f32, padded with zeros so that every kernel reads whole vectors of them. */
static float *pack_rows(int dtype, int64_t rows, int64_t k, const char *a, const int64_t sa[2], int64_t ldx) {
  float *x = aligned_alloc(64, (size_t)(rows * ldx) * sizeof(float));
  if (!x) return NULL;
  int es = elem_size(dtype);
  for (int64_t i = 0; i < rows; i++) {
    float *row = x + i * ldx;
    if (sa[1] == 1) pmp_convert(row, PMP_F32, a + i * sa[0] * es, dtype, k);
    else
      for (int64_t p = 0; p < k; p++) row[p] = (float)pmp_load_as_f64(dtype, a + (i * sa[0] + p * sa[1]) * es);
    memset(row + k, 0, (size_t)(ldx - k) * sizeof(float));
  }
  return x;
}


int pmp_cpu_gemv(int dtype, int64_t rows, int64_t k, int64_t m, const void *a, const int64_t sa[2], const void *b,
                 const int64_t sb[2], void *c) {
  /* PMP_MATMUL_NO_GEMV=1 hands these products to the GEMM paths (for benchmarks) */
  if (pmp_env_switch("PMP_MATMUL_NO_GEMV") || (dtype != PMP_F32 && dtype != PMP_BF16 && dtype != PMP_F16) || rows < 1 || rows > PMP_GEMV_MAX_ROWS || k < 1 || m < 1)
    return 1;
  gemv_args s = {.dtype = dtype, .b = b, .k = k, .m = m, .ldx = (k + PAD - 1) / PAD * PAD};
  if (sb[0] == 1 && sb[1] >= k) s.weight_rows = true, s.ldb = sb[1];
  else if (sb[1] == 1 && sb[0] >= m) s.weight_rows = false, s.ldb = sb[0];
  else return 1;
  float *x = pack_rows(dtype, rows, k, a, sa, s.ldx);
  uint16_t *x_bf16 = NULL;
  if (dtype == PMP_BF16 && x) {   /* exact: the f32 rows hold bf16 values */
    s.ldx_bf16 = (k + 31) / 32 * 32;
    x_bf16 = calloc((size_t)(rows * s.ldx_bf16), sizeof(uint16_t));
    for (int64_t i = 0; x_bf16 && i < rows; i++) pmp_convert(x_bf16 + i * s.ldx_bf16, PMP_BF16, x + i * s.ldx, PMP_F32, k);
  }
  s.x_bf16 = x_bf16;
  float *y = dtype == PMP_F32 ? c : malloc((size_t)(rows * m) * sizeof(float));
  if (!x || !y || (dtype == PMP_BF16 && !x_bf16)) {
    free(x);
    free(x_bf16);
    if (y != c) free(y);
    return pmp_fail_code("matmul: out of memory for a %lld-row product", (long long)rows);
  }
  s.x = x, s.y = y;
  outputs_fn outputs = pick_kernel();
  int64_t blocks = (m + OUT_BLOCK - 1) / OUT_BLOCK;
  /* eight input rows at once only while they fit in half the L1 cache beside the weights streaming
   * through (k <= 512 in f32, 1024 in bf16 pairs): measured 1.5x slower for f32 k = 1408 than two
   * groups of four */
  bool bf16_pairs = outputs == outputs_avx512_bf16 && dtype == PMP_BF16 && s.weight_rows;
  int64_t row_bytes = bf16_pairs ? s.ldx_bf16 * 2 : s.ldx * 4;
  int widest = ROW_GROUP * row_bytes <= L1_INPUT_BYTES ? 8 : 4;
#pragma omp parallel for if (rows * k * m >= PMP_PARALLEL_THRESHOLD) schedule(static)
  for (int64_t blk = 0; blk < blocks; blk++) {
    int64_t j0 = blk * OUT_BLOCK, j1 = j0 + OUT_BLOCK < m ? j0 + OUT_BLOCK : m;
    /* Input rows in groups of up to `widest` share a pass over 16 weight rows, which stay in cache for the
     * next group: weights come from memory once. */
    for (int64_t q0 = j0; q0 < j1; q0 += SUB_BLOCK) {
      int64_t q1 = q0 + SUB_BLOCK < j1 ? q0 + SUB_BLOCK : j1;
      for (int64_t i = 0, g; i < rows; i += g) {
        g = rows - i >= 8 && widest == 8 ? 8 : rows - i >= 4 ? 4 : rows - i >= 2 ? 2 : 1;
        outputs(&s, (int)g, x + i * s.ldx, y + i * m, q0, q1);
      }
    }
    if (dtype != PMP_F32)
      for (int64_t i = 0; i < rows; i++) pmp_convert((char *)c + (i * m + j0) * 2, dtype, y + i * m + j0, PMP_F32, j1 - j0);
  }
  free(x);
  free(x_bf16);
  if (y != c) free(y);
  return 0;
}
