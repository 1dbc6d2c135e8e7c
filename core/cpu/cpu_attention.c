/* CPU attention kernels: the tiled implementation (cpu_attention_impl.h) computing in f32 or f64. */
#include "internal.h"
#include "cpu/vector_math.h"

/* GEMM_ROWS: rows of C a tile GEMM keeps in registers (with 2 vectors of columns, 16 of AVX-512's 32).
 * FEW_QUERIES: up to this many queries per head (decoding steps), scores are dot products with K's rows
 * as stored, since transposing K for the tile GEMM would cost more than the products. */
enum { BLOCK_Q = 64, BLOCK_K = 64, GEMM_ROWS = 8, FEW_QUERIES = 8 };

typedef struct attention_shape {
  int64_t B, Hq, Hkv, T, S, D, offset, window;
  const int64_t *first_key;   /* per batch row [B] or per query [B, T], or NULL */
  const double *slopes;       /* ALiBi: one per query head [Hq], or NULL */
  double falcon_bias_scale;   /* > 0: transformers' Falcon ALiBi bias (bf16-rounded, absolute key positions) */
  int bias_dtype;             /* q's dtype, which the Falcon bias is rounded to */
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
  } else if (dtype == PMP_F32) {   /* rows are short (a head dim): an inline loop, not a memcpy call */
    const float *s = (const float *)src;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) dst[i] = s[i];
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
    float *d = (float *)dst;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) d[i] = src[i];
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
#define IREAL int32_t   /* an integer of REAL's size: shuffle indices */
#define EXP expf
#define LOG logf
#define SUFFIX f32
#include "cpu/cpu_attention_impl.h"
#undef REAL
#undef IREAL
#undef EXP
#undef LOG
#undef SUFFIX

#define REAL double
#define IREAL int64_t
#define EXP exp
#define LOG log
#define SUFFIX f64
#include "cpu/cpu_attention_impl.h"
#undef REAL
#undef IREAL
#undef EXP
#undef LOG
#undef SUFFIX

/* ---- bf16 on AMX ----
 * When q, k, v (and dO) are bf16 and the CPU has AMX, the tile products run on the bf16 matrix unit:
 * Q K^T and dO V^T multiply bf16 values exactly (only the order of the f32 sums changes); P and dS are
 * rounded to bf16 before P V, P^T dO, dS K and dS^T Q, as PyTorch's CPU flash attention does. The
 * softmax statistics, delta and the O, dQ, dK, dV accumulators stay f32. Elsewhere (f16, f32, f64,
 * mixed dtypes, ALiBi, no AMX, PMP_ATTENTION_NO_AMX=1) the f32/f64 kernels above run. */
#include "cpu/x86/amx.h"
#ifdef PMP_HAVE_AMX
#define HAVE_AMX_ATTENTION 1

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* Operands with rows of a whole number of positions are held PAIRS_SKEW (bf16 pairs or f32) wider:
 * rows 2 KiB apart would put the 16 rows of a tile in two sets of the L1 cache. */
enum { PAIRS_SKEW = 16 };

/* A B operand of k x n values held as pairs: element (p, j) at base[(p / 2) * 2 * width + 2 * j + p % 2],
 * width the padded n. */
typedef struct amx_pairs {
  const uint16_t *base;
  int64_t width;
} amx_pairs;

/* One 32 x 32 (or narrower) block of C += A B: C tiles 0-3, A tiles 4-5, B tiles 6-7. */
AMX_TARGET static inline void amx_block(bool two_m, bool two_n, int64_t k32, const uint16_t *A, int64_t lda,
                                        amx_pairs B, int64_t j, bool accumulate, float *C, int64_t ldc) {
  size_t sa = (size_t)lda * 2, sb = (size_t)B.width * 4, sc = (size_t)ldc * 4;
  const uint16_t *b0 = B.base + 2 * j;
  if (accumulate) {
    _tile_loadd(0, C, sc);
    if (two_n) _tile_loadd(1, C + 16, sc);
    if (two_m) _tile_loadd(2, C + 16 * ldc, sc);
    if (two_m && two_n) _tile_loadd(3, C + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t p = 0; p < k32; p++) {
    _tile_loadd(4, A + 32 * p, sa);
    if (two_m) _tile_loadd(5, A + 16 * lda + 32 * p, sa);
    _tile_loadd(6, b0 + 32 * p * B.width, sb);
    if (two_n) _tile_loadd(7, b0 + 32 * p * B.width + 32, sb);
    _tile_dpbf16ps(0, 4, 6);
    if (two_n) _tile_dpbf16ps(1, 4, 7);
    if (two_m) _tile_dpbf16ps(2, 5, 6);
    if (two_m && two_n) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, C, sc);
  if (two_n) _tile_stored(1, C + 16, sc);
  if (two_m) _tile_stored(2, C + 16 * ldc, sc);
  if (two_m && two_n) _tile_stored(3, C + 16 * ldc + 16, sc);
}

/* C (m16 x n16 tiles, rows ldc floats apart) = (accumulate ? C : 0) + A B, A bf16 rows lda apart with
 * k32 blocks of 32 columns, B as pairs starting at row 0, column 0. */
AMX_TARGET static void amx_gemm(int64_t m16, int64_t n16, int64_t k32, const uint16_t *A, int64_t lda, amx_pairs B,
                                bool accumulate, float *C, int64_t ldc) {
  for (int64_t i = 0; i < m16; i += 2)
    for (int64_t j = 0; j < n16; j += 2)
      amx_block(i + 1 < m16, j + 1 < n16, k32, A + 16 * i * lda, lda, B, 16 * j, accumulate, C + 16 * i * ldc + 16 * j,
                ldc);
}

/* dst (n x D bf16, rows ld apart, columns D..ld zero) = rows pos0.. of a bf16 operand */
AMX_TARGET static void amx_load_rows(uint16_t *dst, int64_t ld, const attention_operand *t, int64_t b, int64_t h,
                                     int64_t pos0, int64_t n, int64_t D) {
  for (int64_t r = 0; r < n; r++) {
    memcpy(dst + r * ld, row_of(t, b, h, pos0 + r), sizeof(uint16_t) * (size_t)D);
    memset(dst + r * ld + D, 0, sizeof(uint16_t) * (size_t)(ld - D));
  }
}

/* As pairs of rows (B = the rows, k = positions, n = D): dst has width ld >= D, a multiple of 32;
 * padding is written with zeros. */
AMX_TARGET static void amx_load_row_pairs(uint16_t *dst, int64_t ld, const attention_operand *t, int64_t b, int64_t h,
                                          int64_t n, int64_t D) {
  for (int64_t r = 0; r < n; r += 2) {
    const uint16_t *even = (const uint16_t *)row_of(t, b, h, r);
    const uint16_t *odd = r + 1 < n ? (const uint16_t *)row_of(t, b, h, r + 1) : NULL;
    uint16_t *out = dst + r * ld;
    for (int64_t d = 0; d < D; d += 32) {
      __mmask32 valid = pmp_first32(D - d);
      __m512i e = _mm512_maskz_loadu_epi16(valid, even + d), low, high;
      __m512i o = odd ? _mm512_maskz_loadu_epi16(valid, odd + d) : _mm512_setzero_si512();
      pmp_interleave_pairs(e, o, &low, &high);
      _mm512_storeu_si512(out + 2 * d, low);
      _mm512_storeu_si512(out + 2 * d + 32, high);
    }
  }
}

/* Sixteen rows r0.. (zero past n) as 16 x 16 (even, odd) pairs of values d0.. (zero past D), each row
 * one register. */
AMX_TARGET static void load_pair_block(__m512i m[16], const attention_operand *t, int64_t b, int64_t h, int64_t r0,
                                       int64_t n, int64_t d0, int64_t D) {
  __mmask32 valid = pmp_first32(D - d0);
  for (int64_t r = 0; r < 16; r++)
    m[r] = r0 + r < n ? _mm512_maskz_loadu_epi16(valid, (const uint16_t *)row_of(t, b, h, r0 + r) + d0)
                      : _mm512_setzero_si512();
}

/* As pairs of columns (B = the rows transposed, k = D, n = positions): dst has width ld >= n rounded up
 * to 16, and round_up(D, 32) / 2 rows; padding is written with zeros. */
AMX_TARGET static void amx_load_column_pairs(uint16_t *dst, int64_t ld, const attention_operand *t, int64_t b,
                                             int64_t h, int64_t n, int64_t D) {
  uint32_t *out = (uint32_t *)dst;
  __m512i m[16];
  for (int64_t r0 = 0; r0 < n; r0 += 16)
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      load_pair_block(m, t, b, h, r0, n, d0, D);
      pmp_transpose_16x16(m);
      for (int64_t q = 0; q < 16; q++) _mm512_storeu_si512(out + (d0 / 2 + q) * ld + r0, m[q]);
    }
}

/* dst (D x n bf16, rows ld apart) = the rows transposed: as pairs of columns, each pair then split
 * into its even and odd row. dst has width ld >= n rounded up to 16 and round_up(D, 32) rows; padding is
 * written with zeros. */
AMX_TARGET static void amx_load_transposed(uint16_t *dst, int64_t ld, const attention_operand *t, int64_t b,
                                           int64_t h, int64_t n, int64_t D) {
  __m512i m[16];
  for (int64_t r0 = 0; r0 < n; r0 += 16)
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      load_pair_block(m, t, b, h, r0, n, d0, D);
      pmp_transpose_16x16(m);
      for (int64_t q = 0; q < 16; q++) {
        _mm256_storeu_si256((__m256i *)(dst + (d0 + 2 * q) * ld + r0), _mm512_cvtepi32_epi16(m[q]));
        _mm256_storeu_si256((__m256i *)(dst + (d0 + 2 * q + 1) * ld + r0), _mm512_cvtepi32_epi16(_mm512_srli_epi32(m[q], 16)));
      }
    }
}

/* exp(x) for 16 floats: x = n ln2 + r with |r| <= ln2/2, e^r by Cephes' expf polynomial (about 1
 * ulp), times 2^n by scalef, which also gives 0 below the f32 range and inf above it. */
AMX_TARGET static inline __m512 exp16(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));   /* also maps -inf to a finite argument */
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

/* Lanes first..first+15 that lie in [lo, hi] and below cols. */
AMX_TARGET static inline __mmask16 visible_lanes(int64_t first, int64_t lo, int64_t hi, int64_t cols) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t from = lo > first ? lo - first : 0, to = (hi < cols - 1 ? hi : cols - 1) - first;
  if (to < from || from > 15 || to < 0) return 0;
  return _mm512_cmp_epi32_mask(iota, _mm512_set1_epi32((int)from), _MM_CMPINT_NLT) &
         _mm512_cmp_epi32_mask(iota, _mm512_set1_epi32((int)(to < 15 ? to : 15)), _MM_CMPINT_LE);
}

/* The online-softmax step of the forward pass on a tile of raw scores Q K^T (rows x cols <= 64), one
 * pass per row in registers: scale, keep row r's columns [lo[r], hi[r]], update the running max and
 * sum, rescale the row's output accumulator when the max moved, and write P = exp(scaled - max) as
 * bf16 into pb (zero past cols up to width). Same arithmetic as softmax_tile_f32 after a scale. */
AMX_TARGET static void amx_softmax_tile(const float *scores, uint16_t *pb, int64_t rows, int64_t cols, int64_t width,
                                        const int64_t *lo, const int64_t *hi, float scale, float *row_max,
                                        float *row_sum, float *acc, int64_t Dp) {
  const __m512 minus_inf = _mm512_set1_ps(-INFINITY), scale_v = _mm512_set1_ps(scale);
  int64_t vectors = (cols + 15) / 16;
  for (int64_t r = 0; r < rows; r++) {
    const float *srow = scores + r * BLOCK_K;
    uint16_t *prow = pb + r * BLOCK_K;
    __m512 x[BLOCK_K / 16];
    __mmask16 seen[BLOCK_K / 16];
    __m512 top = _mm512_set1_ps(row_max[r]);
    for (int64_t j = 0; j < vectors; j++) {
      seen[j] = visible_lanes(16 * j, lo[r], hi[r], cols);
      x[j] = _mm512_mask_mul_ps(minus_inf, seen[j], _mm512_maskz_loadu_ps(seen[j], srow + 16 * j), scale_v);
      top = _mm512_max_ps(top, x[j]);
    }
    float peak = _mm512_reduce_max_ps(top);
    if (peak == -INFINITY) {
      memset(prow, 0, sizeof(uint16_t) * (size_t)width);
      continue;
    }
    __m512 shift = _mm512_set1_ps(peak), total = _mm512_setzero_ps();
    for (int64_t j = 0; j < width / 16; j++) {
      __m512 e = j < vectors ? _mm512_maskz_mov_ps(seen[j], exp16(_mm512_sub_ps(x[j], shift))) : _mm512_setzero_ps();
      total = _mm512_add_ps(total, e);
      _mm256_storeu_si256((__m256i *)(prow + 16 * j), (__m256i)_mm512_cvtneps_pbh(e));
    }
    float rescale = expf(row_max[r] - peak);
    row_sum[r] = row_sum[r] * rescale + _mm512_reduce_add_ps(total);
    row_max[r] = peak;
    if (rescale == 1) continue; /* the common case of an unchanged maximum: scaling by one is exact */
    __m512 factor = _mm512_set1_ps(rescale);
    float *arow = acc + r * Dp;
    for (int64_t d = 0; d < Dp; d += 16) _mm512_storeu_ps(arow + d, _mm512_mul_ps(_mm512_loadu_ps(arow + d), factor));
  }
}

/* The transposed tiles of the backward pass, keys as rows and queries as columns (BLOCK_Q apart):
 * P^T = exp(scale S^T - lse) where query r sees key c (lo[r] <= c <= hi[r], lse[r] finite), zero
 * elsewhere, for keys rows; pb = bf16(P^T). Queries past the block's last are given lo > hi; width is
 * a multiple of 16. */
AMX_TARGET static void amx_probabilities_transposed(float *p, uint16_t *pb, int64_t keys, int64_t width,
                                                    const int64_t *lo, const int64_t *hi, const float *lse,
                                                    float scale) {
  __m512i first[BLOCK_Q / 16], last[BLOCK_Q / 16];
  __m512 shift[BLOCK_Q / 16];
  __mmask16 finite[BLOCK_Q / 16];
  int32_t lo32[BLOCK_Q], hi32[BLOCK_Q];
  for (int64_t r = 0; r < width; r++) {
    lo32[r] = (int32_t)(lo[r] < INT32_MAX ? lo[r] : INT32_MAX);
    hi32[r] = (int32_t)(hi[r] > -1 ? hi[r] : -1);
  }
  for (int64_t j = 0; j < width / 16; j++) {
    first[j] = _mm512_loadu_si512(lo32 + 16 * j);
    last[j] = _mm512_loadu_si512(hi32 + 16 * j);
    shift[j] = _mm512_loadu_ps(lse + 16 * j);
    finite[j] = _mm512_cmp_ps_mask(shift[j], _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
  }
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t c = 0; c < keys; c++) {
    __m512i key = _mm512_set1_epi32((int)c);
    float *prow = p + c * BLOCK_Q;
    uint16_t *brow = pb + c * BLOCK_Q;
    for (int64_t j = 0; j < width / 16; j++) {
      __mmask16 seen = finite[j] & _mm512_cmp_epi32_mask(first[j], key, _MM_CMPINT_LE) &
                       _mm512_cmp_epi32_mask(key, last[j], _MM_CMPINT_LE);
      __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(prow + 16 * j), scale_v, shift[j]);
      __m512 e = _mm512_maskz_mov_ps(seen, exp16(x));
      _mm512_storeu_ps(prow + 16 * j, e);
      _mm256_storeu_si256((__m256i *)(brow + 16 * j), (__m256i)_mm512_cvtneps_pbh(e));
    }
  }
}

/* dS^T = scale P^T (dP^T - delta) on the transposed tiles: dsb = bf16(dS^T) as rows (queries padded
 * with zeros to width, a multiple of 16), dsp = the same as pairs of rows; keys32 keys, a multiple of 32. */
AMX_TARGET static void amx_score_grad_transposed(const float *p, const float *dp, uint16_t *dsb, uint32_t *dsp,
                                                 int64_t keys32, int64_t width, const float *delta, float scale) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t c = 0; c < keys32; c += 2)
    for (int64_t j = 0; j < width; j += 16) {
      __m512 d = _mm512_loadu_ps(delta + j);
      const float *p0 = p + c * BLOCK_Q + j, *dp0 = dp + c * BLOCK_Q + j;
      __m512 even = _mm512_mul_ps(_mm512_mul_ps(scale_v, _mm512_loadu_ps(p0)), _mm512_sub_ps(_mm512_loadu_ps(dp0), d));
      __m512 odd = _mm512_mul_ps(_mm512_mul_ps(scale_v, _mm512_loadu_ps(p0 + BLOCK_Q)),
                                 _mm512_sub_ps(_mm512_loadu_ps(dp0 + BLOCK_Q), d));
      __m256i even16 = (__m256i)_mm512_cvtneps_pbh(even), odd16 = (__m256i)_mm512_cvtneps_pbh(odd);
      _mm256_storeu_si256((__m256i *)(dsb + c * BLOCK_Q + j), even16);
      _mm256_storeu_si256((__m256i *)(dsb + (c + 1) * BLOCK_Q + j), odd16);
      __m512i pairs = _mm512_or_si512(_mm512_cvtepu16_epi32(even16), _mm512_slli_epi32(_mm512_cvtepu16_epi32(odd16), 16));
      _mm512_storeu_si512(dsp + (c / 2) * BLOCK_Q + j, pairs);
    }
}

/* rows of src (rows ld apart) into n rows of t, D values each */
AMX_TARGET static void amx_store_rows(const attention_operand *t, int64_t b, int64_t h, int64_t pos0, int64_t n,
                                      int64_t D, const float *src, int64_t ld) {
  for (int64_t r = 0; r < n; r++) store_row_f32(row_of(t, b, h, pos0 + r), t->dtype, src + r * ld, D);
}

/* The forward kernel of attention_forward_f32 with bf16 tile products; same outputs and failure. */
AMX_TARGET static int attention_forward_amx(const attention_shape *sh, const attention_operand *q,
                                            const attention_operand *k, const attention_operand *v,
                                            const attention_operand *o, const attention_operand *exact, float *lse) {
  int64_t tasks = sh->B * sh->Hq, group = sh->Hq / sh->Hkv, D = sh->D, S = sh->S;
  int64_t Dp = round_up(D > 0 ? D : 1, 32), Sp = round_up(S > 0 ? S : 1, BLOCK_K), Sw = Sp + PAIRS_SKEW;
  float scale = (float)sh->scale;
  int failed = 0;
#pragma omp parallel
  {
    size_t keys = sizeof(uint16_t) * (size_t)(Sw * Dp);
    float *scores = malloc(sizeof(float) * BLOCK_Q * BLOCK_K), *acc = malloc(sizeof(float) * BLOCK_Q * (size_t)Dp);
    uint16_t *qb = malloc(sizeof(uint16_t) * BLOCK_Q * (size_t)Dp), *pb = malloc(sizeof(uint16_t) * BLOCK_Q * BLOCK_K);
    uint16_t *kt = malloc(keys), *vp = malloc(keys);
    float row_max[BLOCK_Q], row_sum[BLOCK_Q];
    int64_t lo_c[BLOCK_Q], hi_c[BLOCK_Q];
    bool ok = scores && acc && qb && pb && kt && vp;
    if (!ok) {
#pragma omp atomic write
      failed = 1;
    } else {
      pmp_amx_configure();
      /* tile rows past the last query or key are computed and never read: keep them finite */
      memset(qb, 0, sizeof(uint16_t) * BLOCK_Q * (size_t)Dp);
      memset(pb, 0, sizeof(uint16_t) * BLOCK_Q * BLOCK_K);
    }
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < tasks; bh++) {
      if (!ok) continue;
      int64_t b = bh / sh->Hq, h = bh % sh->Hq, hk = h / group;
      memset(kt, 0, keys);
      memset(vp, 0, keys);
      amx_load_column_pairs(kt, Sw, k, b, hk, S, D);
      amx_load_row_pairs(vp, Dp, v, b, hk, S, D);
      for (int64_t t0 = 0; t0 < sh->T; t0 += BLOCK_Q) {
        int64_t rows = sh->T - t0 < BLOCK_Q ? sh->T - t0 : BLOCK_Q, lo, hi, m16 = (rows + 15) / 16;
        amx_load_rows(qb, Dp, q, b, h, t0, rows, D);
        block_keys_f32(sh, b, t0, rows, &lo, &hi);
        for (int64_t r = 0; r < rows; r++) {
          row_max[r] = -INFINITY;
          row_sum[r] = 0;
        }
        memset(acc, 0, sizeof(float) * BLOCK_Q * (size_t)Dp);
        for (int64_t s0 = lo - lo % BLOCK_K; s0 <= hi; s0 += BLOCK_K) {
          int64_t cols = S - s0 < BLOCK_K ? S - s0 : BLOCK_K, width = round_up(cols, 32);
          amx_gemm(m16, (cols + 15) / 16, Dp / 32, qb, Dp, (amx_pairs){kt + 2 * s0, Sw}, false, scores, BLOCK_K);
          tile_ranges_f32(sh, b, t0, rows, s0, lo_c, hi_c);
          amx_softmax_tile(scores, pb, rows, cols, width, lo_c, hi_c, scale, row_max, row_sum, acc, Dp);
          amx_gemm(m16, Dp / 16, width / 32, pb, BLOCK_K, (amx_pairs){vp + s0 * Dp, Dp}, true, acc, Dp);
        }
        for (int64_t r = 0; r < rows; r++) {
          float *arow = acc + r * Dp;
          float inv = row_sum[r] > 0 ? 1.0f / row_sum[r] : 0;
          for (int64_t d = 0; d < D; d++) arow[d] *= inv;
          lse[bh * sh->T + t0 + r] = row_sum[r] > 0 ? row_max[r] + logf(row_sum[r]) : -INFINITY;
        }
        amx_store_rows(o, b, h, t0, rows, D, acc, Dp);
        if (exact->data) amx_store_rows(exact, b, h, t0, rows, D, acc, Dp);
      }
    }
    if (ok) _tile_release();
    free(scores);
    free(acc);
    free(qb);
    free(pb);
    free(kt);
    free(vp);
  }
  return failed ? -1 : 0;
}

/* The backward kernel of attention_backward_f32 with bf16 tile products; same outputs and failure.
 * Its tiles are transposed (keys as rows) so that P^T and dS^T, the A operands of dV += P^T dO and
 * dK += dS^T Q, come out as rows; dQ is accumulated transposed, dQ^T += K^T dS^T. */
AMX_TARGET static int attention_backward_amx(const attention_shape *sh, const attention_operand *q,
                                             const attention_operand *k, const attention_operand *v,
                                             const attention_operand *o, const float *lse,
                                             const attention_operand *dout, const attention_operand *dq,
                                             const attention_operand *dk, const attention_operand *dv) {
  int64_t group = sh->Hq / sh->Hkv, D = sh->D, T = sh->T, S = sh->S, tasks = sh->B * sh->Hkv;
  int64_t Dp = round_up(D > 0 ? D : 1, 32), Sp = round_up(S > 0 ? S : 1, BLOCK_K), Tp = round_up(T > 0 ? T : 1, BLOCK_Q);
  int64_t Sw = Sp + 2 * PAIRS_SKEW, Tw = Tp + PAIRS_SKEW;
  float scale = (float)sh->scale;
  int failed = 0;
#pragma omp parallel
  {
    size_t keys = sizeof(uint16_t) * (size_t)(Sw * Dp), queries = sizeof(uint16_t) * (size_t)(Tw * Dp);
    size_t tile = sizeof(float) * BLOCK_Q * BLOCK_K, half_tile = sizeof(uint16_t) * BLOCK_Q * BLOCK_K;
    float *p = malloc(tile), *dp = malloc(tile), *delta = malloc(sizeof(float) * (size_t)Tp);
    float *orow = malloc(sizeof(float) * (size_t)Dp), *dorow = malloc(sizeof(float) * (size_t)Dp);
    uint16_t *pb = malloc(half_tile), *dsb = malloc(half_tile);
    uint32_t *dsp = malloc(half_tile);
    /* K and V as rows, K transposed (the A operands) */
    uint16_t *kb = malloc(keys), *vb = malloc(keys), *kt = malloc(keys);
    /* Q and dO as pairs of columns (for K Q^T, V dO^T) and of rows (for dS^T Q, P^T dO) */
    uint16_t *qc = malloc(queries), *qr = malloc(queries), *doc = malloc(queries), *dor = malloc(queries);
    float *dkh = malloc(2 * keys), *dvh = malloc(2 * keys), *dqt = malloc(2 * queries);
    int64_t lo_c[BLOCK_Q], hi_c[BLOCK_Q];
    float lrow[BLOCK_Q];
    bool ok = p && dp && delta && orow && dorow && pb && dsb && dsp && kb && vb && kt && qc && qr && doc && dor &&
              dkh && dvh && dqt;
    if (!ok) {
#pragma omp atomic write
      failed = 1;
    } else {
      pmp_amx_configure();
      /* Padding past T, S and D is zero once and for all: the tasks write the same places. Tile
       * entries past the last query or key are computed and never read, but must stay finite. */
      memset(p, 0, tile);
      memset(dp, 0, tile);
      memset(delta, 0, sizeof(float) * (size_t)Tp);
      memset(kb, 0, keys);
      memset(vb, 0, keys);
      memset(kt, 0, keys);
      memset(qc, 0, queries);
      memset(qr, 0, queries);
      memset(doc, 0, queries);
      memset(dor, 0, queries);
    }
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; task++) {
      if (!ok) continue;
      int64_t b = task / sh->Hkv, hk = task % sh->Hkv;
      amx_load_rows(kb, Dp, k, b, hk, 0, S, D);
      amx_load_rows(vb, Dp, v, b, hk, 0, S, D);
      amx_load_transposed(kt, Sw, k, b, hk, S, D);
      memset(dkh, 0, 2 * keys);
      memset(dvh, 0, 2 * keys);
      for (int64_t h = hk * group; h < (hk + 1) * group; h++) {
        const float *lh = lse + (b * sh->Hq + h) * T;
        amx_load_column_pairs(qc, Tw, q, b, h, T, D);
        amx_load_column_pairs(doc, Tw, dout, b, h, T, D);
        amx_load_row_pairs(qr, Dp, q, b, h, T, D);
        amx_load_row_pairs(dor, Dp, dout, b, h, T, D);
        memset(dqt, 0, 2 * queries);
        for (int64_t t = 0; t < T; t++) {
          load_row_f32(orow, row_of(o, b, h, t), o->dtype, D);
          load_row_f32(dorow, row_of(dout, b, h, t), dout->dtype, D);
          float dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; d++) dot += dorow[d] * orow[d];
          delta[t] = dot;
        }
        for (int64_t t0 = 0; t0 < T; t0 += BLOCK_Q) {
          int64_t rows = T - t0 < BLOCK_Q ? T - t0 : BLOCK_Q, lo, hi, m16 = (rows + 15) / 16, height = round_up(rows, 32);
          block_keys_f32(sh, b, t0, rows, &lo, &hi);
          for (int64_t r = 0; r < BLOCK_Q; r++) {
            lrow[r] = r < rows ? lh[t0 + r] : -INFINITY;
            lo_c[r] = 1;
            hi_c[r] = 0;
          }
          for (int64_t s0 = lo - lo % BLOCK_K; s0 <= hi; s0 += BLOCK_K) {
            int64_t cols = S - s0 < BLOCK_K ? S - s0 : BLOCK_K, width = round_up(cols, 32), n16 = (cols + 15) / 16;
            /* S^T = K Q^T, P^T; dV += P^T dO */
            amx_gemm(n16, m16, Dp / 32, kb + s0 * Dp, Dp, (amx_pairs){qc + 2 * t0, Tw}, false, p, BLOCK_Q);
            tile_ranges_f32(sh, b, t0, rows, s0, lo_c, hi_c);
            amx_probabilities_transposed(p, pb, width, height, lo_c, hi_c, lrow, scale);
            amx_gemm(n16, Dp / 16, height / 32, pb, BLOCK_Q, (amx_pairs){dor + t0 * Dp, Dp}, true, dvh + s0 * Dp, Dp);
            /* dP^T = V dO^T, dS^T; dK += scale dS^T Q ; dQ^T += scale K^T dS^T */
            amx_gemm(n16, m16, Dp / 32, vb + s0 * Dp, Dp, (amx_pairs){doc + 2 * t0, Tw}, false, dp, BLOCK_Q);
            amx_score_grad_transposed(p, dp, dsb, dsp, width, height, delta + t0, scale);
            amx_gemm(n16, Dp / 16, height / 32, dsb, BLOCK_Q, (amx_pairs){qr + t0 * Dp, Dp}, true, dkh + s0 * Dp, Dp);
            amx_gemm(Dp / 16, m16, width / 32, kt + s0, Sw, (amx_pairs){(uint16_t *)dsp, BLOCK_Q}, true, dqt + t0, Tw);
          }
        }
        for (int64_t t = 0; t < T; t++) {
          for (int64_t d = 0; d < D; d++) orow[d] = dqt[d * Tw + t];
          store_row_f32(row_of(dq, b, h, t), dq->dtype, orow, D);
        }
      }
      amx_store_rows(dk, b, hk, 0, S, D, dkh, Dp);
      amx_store_rows(dv, b, hk, 0, S, D, dvh, Dp);
    }
    if (ok) _tile_release();
    free(p);
    free(dp);
    free(delta);
    free(orow);
    free(dorow);
    free(pb);
    free(dsb);
    free(dsp);
    free(kb);
    free(vb);
    free(kt);
    free(qc);
    free(qr);
    free(doc);
    free(dor);
    free(dkh);
    free(dvh);
    free(dqt);
  }
  return failed ? -1 : 0;
}
#endif

static attention_shape shape_of(const pmp_op_args *a, const pmp_tensor *first_key, const pmp_tensor *slopes) {
  const pmp_tensor *q = a->in[0], *k = a->in[1];
  attention_shape sh = {.B = q->sizes[0], .Hq = q->sizes[1], .Hkv = k->sizes[1], .T = q->sizes[2], .S = k->sizes[2],
                        .D = q->sizes[3], .causal = a->i[0] != 0, .window = a->i[1], .scale = a->f[0]};
  sh.offset = sh.S - sh.T;
  sh.first_key = first_key ? (const int64_t *)first_key->data : NULL;
  sh.slopes = slopes ? (const double *)slopes->data : NULL;
  sh.falcon_bias_scale = a->f[1];
  sh.bias_dtype = q->dtype_id;
  bool per_query = first_key && first_key->ndim == 2;
  sh.first_key_row = per_query ? sh.T : 1;
  sh.first_key_col = per_query ? 1 : 0;
  return sh;
}

/* in: q, k, v (rows of D contiguous, any float dtypes), first keys (i64 [B] or NULL), ALiBi slopes (f64 [Hq] or
 * NULL); out: o (q's dtype);
 * out2: log-sum-exp per query (compute dtype, contiguous); out3: NULL or o in the compute dtype. The
 * compute dtype is out2's. */
int pmp_cpu_attention(const pmp_op_args *a) {
  attention_shape sh = shape_of(a, a->in[3], a->in[4]);
  attention_operand q = operand_of(a->in[0]), k = operand_of(a->in[1]), v = operand_of(a->in[2]);
  attention_operand o = operand_of(a->out), exact = operand_of(a->out3);
  int rc;
#ifdef HAVE_AMX_ATTENTION
  if (q.dtype == PMP_BF16 && k.dtype == PMP_BF16 && v.dtype == PMP_BF16 && a->out2->dtype_id == PMP_F32 && !sh.slopes &&
      pmp_amx_enabled("PMP_ATTENTION_NO_AMX"))
    rc = attention_forward_amx(&sh, &q, &k, &v, &o, &exact, (float *)a->out2->data);
  else
#endif
    rc = a->out2->dtype_id == PMP_F64 ? attention_forward_f64(&sh, &q, &k, &v, &o, &exact, (double *)a->out2->data)
                                      : attention_forward_f32(&sh, &q, &k, &v, &o, &exact, (float *)a->out2->data);
  return rc == 0 ? 0 : pmp_fail_code("attention: out of memory for its work buffers");
}

/* in: q, k, v, o (compute dtype), lse, dO, first keys, slopes; out: dq, out2: dk, out3: dv, each in its input's
 * dtype and any strides with rows contiguous. */
int pmp_cpu_attention_backward(const pmp_op_args *a) {
  attention_shape sh = shape_of(a, a->in[6], a->in[7]);
  attention_operand q = operand_of(a->in[0]), k = operand_of(a->in[1]), v = operand_of(a->in[2]);
  attention_operand o = operand_of(a->in[3]), dout = operand_of(a->in[5]);
  attention_operand dq = operand_of(a->out), dk = operand_of(a->out2), dv = operand_of(a->out3);
  int rc;
#ifdef HAVE_AMX_ATTENTION
  if (q.dtype == PMP_BF16 && k.dtype == PMP_BF16 && v.dtype == PMP_BF16 && dout.dtype == PMP_BF16 &&
      a->in[4]->dtype_id == PMP_F32 && !sh.slopes && pmp_amx_enabled("PMP_ATTENTION_NO_AMX"))
    rc = attention_backward_amx(&sh, &q, &k, &v, &o, (const float *)a->in[4]->data, &dout, &dq, &dk, &dv);
  else
#endif
    rc = a->in[4]->dtype_id == PMP_F64
             ? attention_backward_f64(&sh, &q, &k, &v, &o, (const double *)a->in[4]->data, &dout, &dq, &dk, &dv)
             : attention_backward_f32(&sh, &q, &k, &v, &o, (const float *)a->in[4]->data, &dout, &dq, &dk, &dv);
  return rc == 0 ? 0 : pmp_fail_code("attention backward: out of memory for its work buffers");
}
