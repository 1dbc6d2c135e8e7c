/*
 * Tiled causal attention, written once for a real type (included by cpu_attention.c with REAL = float
 * or double). Blocks of BLOCK_Q queries meet blocks of BLOCK_K
 * keys; an online softmax keeps a running max and sum per query, so only a BLOCK_Q x BLOCK_K tile of
 * scores exists at a time. The backward pass recomputes the tiles from the saved log-sum-exp.
 * Operands are read where they lie (any strides over batch, head and position) and converted to REAL
 * as they are loaded into per-thread buffers; results are rounded into their dtype once, when stored.
 */
#define NAME2(a, b) a##b
#define NAME(a, b) NAME2(a, b)
#define VEC NAME(vec_, SUFFIX)
#define LANES ((int64_t)(64 / sizeof(REAL)))

/* 64 bytes: one AVX-512 register, two AVX2 ones */
typedef REAL VEC __attribute__((vector_size(64)));
typedef IREAL NAME(index_vec_, SUFFIX) __attribute__((vector_size(64)));

/* C[rows x vecs vectors] = (accumulate ? C : 0) + alpha A B for up to GEMM_ROWS rows and 2 vectors of columns
 * at A, B, C (see tile_gemm). rows and vecs are constants where this is inlined, so the loops unroll and
 * the accumulators stay in registers. */
__attribute__((always_inline)) static inline void NAME(gemm_block_, SUFFIX)(int rows, int vecs, int64_t k, REAL alpha,
                                                                            const REAL *A, int64_t a_rs, int64_t a_cs,
                                                                            const REAL *B, int64_t ldb, bool accumulate,
                                                                            REAL *C, int64_t ldc) {
  VEC acc[GEMM_ROWS][2];
#pragma GCC unroll 8
  for (int r = 0; r < rows; r++)
#pragma GCC unroll 2
    for (int h = 0; h < vecs; h++) acc[r][h] = (VEC){0};
  for (int64_t p = 0; p < k; p++) {
    VEC b[2];
#pragma GCC unroll 2
    for (int h = 0; h < vecs; h++) memcpy(&b[h], B + p * ldb + h * LANES, sizeof b[h]);
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++) {
      REAL x = A[r * a_rs + p * a_cs];
#pragma GCC unroll 2
      for (int h = 0; h < vecs; h++) acc[r][h] += x * b[h];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < rows; r++)
#pragma GCC unroll 2
    for (int h = 0; h < vecs; h++) {
      REAL *c = C + r * ldc + h * LANES;
      VEC out = alpha * acc[r][h];
      if (accumulate) {
        VEC old;
        memcpy(&old, c, sizeof old);
        out += old;
      }
      memcpy(c, &out, sizeof out);
    }
}

/* C = (accumulate ? C : 0) + alpha A B on one tile: A is m x k with element (i, p) at A[i * a_rs + p * a_cs]
 * (so a transposed tile costs nothing), B is k x n with rows ldb apart, C is m x n with rows ldc apart.
 * At tile sizes (64 x 64 x head_dim) a BLAS call spends more on setup than on arithmetic, so this is a
 * small register-blocked kernel: 8 rows of C by 2 vectors of columns stay in registers while p runs
 * (16 of AVX-512's 32 registers).
 * Masks make much of a tile zero. Per block of GEMM_ROWS rows of C: terms (NULL: all) gives the terms
 * [terms[0], terms[1]) of the sums where A may be nonzero (the rest are zero and skipped, which leaves
 * every finite sum as it was); col_end (NULL: n) the columns [0, col_end) of C the rows need (the others
 * are left as they were). */
WIDE_VECTORS static void NAME(tile_gemm_, SUFFIX)(int64_t m, int64_t n, int64_t k, REAL alpha, const REAL *A,
                                                 int64_t a_rs, int64_t a_cs, const REAL *B, int64_t ldb,
                                                 bool accumulate, REAL *C, int64_t ldc, const int64_t (*terms)[2],
                                                 const int64_t *col_end) {
#define GEMM_BLOCK(ROWS, VECS)                                                                                       \
  do {                                                                                                               \
    int64_t p0 = terms ? terms[i / GEMM_ROWS][0] : 0, p1 = terms ? terms[i / GEMM_ROWS][1] : k;                      \
    if (p1 < p0) p1 = p0;                                                                                            \
    if (!col_end || j < col_end[i / GEMM_ROWS])                                                                      \
      NAME(gemm_block_, SUFFIX)(ROWS, VECS, p1 - p0, alpha, A + i * a_rs + p0 * a_cs, a_rs, a_cs, B + p0 * ldb + j,   \
                                ldb, accumulate, C + i * ldc + j, ldc);                                              \
  } while (0)
  int64_t j = 0;
  for (; j + 2 * LANES <= n; j += 2 * LANES) {
    int64_t i = 0;
    for (; i + GEMM_ROWS <= m; i += GEMM_ROWS) GEMM_BLOCK(GEMM_ROWS, 2);
    for (; i < m; i++) GEMM_BLOCK(1, 2);
  }
  for (; j + LANES <= n; j += LANES) {
    int64_t i = 0;
    for (; i + GEMM_ROWS <= m; i += GEMM_ROWS) GEMM_BLOCK(GEMM_ROWS, 1);
    for (; i < m; i++) GEMM_BLOCK(1, 1);
  }
#undef GEMM_BLOCK
  for (int64_t i = 0; i < m; i++)
    for (int64_t jj = j; jj < n; jj++) {
      REAL sum = 0;
      for (int64_t p = 0; p < k; p++) sum += A[i * a_rs + p * a_cs] * B[p * ldb + jj];
      C[i * ldc + jj] = alpha * sum + (accumulate ? C[i * ldc + jj] : 0);
    }
}

/* scores[r][c] = alpha q_r . k_c (rows r BLOCK_K apart) for the columns [lo[r], hi[r]] that query row r
 * sees, with K as rows of D (keys x D); the other columns keep what they hold. For a few queries. */
WIDE_VECTORS static void NAME(key_row_scores_, SUFFIX)(int64_t rows, int64_t cols, int64_t D, REAL alpha,
                                                       const REAL *Q, const REAL *K, const int64_t *lo,
                                                       const int64_t *hi, REAL *scores) {
  for (int64_t r = 0; r < rows; r++) {
    const REAL *q = Q + r * D;
    int64_t first = lo[r] > 0 ? lo[r] : 0, last = hi[r] < cols - 1 ? hi[r] : cols - 1;
    for (int64_t c = first; c <= last; c++) {
      const REAL *key = K + c * D;
      REAL dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; d++) dot += q[d] * key[d];
      scores[r * BLOCK_K + c] = alpha * dot;
    }
  }
}

/* acc[r] += sum over the columns [lo[r], hi[r]] of p[r][c] v_c (rows of p BLOCK_K apart, V as rows of D):
 * the products after key_row_scores, vectorized over D. */
WIDE_VECTORS static void NAME(key_row_values_, SUFFIX)(int64_t rows, int64_t cols, int64_t D, const REAL *P,
                                                       const REAL *V, const int64_t *lo, const int64_t *hi,
                                                       REAL *acc) {
  for (int64_t r = 0; r < rows; r++) {
    REAL *out = acc + r * D;
    int64_t first = lo[r] > 0 ? lo[r] : 0, last = hi[r] < cols - 1 ? hi[r] : cols - 1;
    for (int64_t c = first; c <= last; c++) {
      const REAL *value = V + c * D, weight = P[r * BLOCK_K + c];
#pragma omp simd
      for (int64_t d = 0; d < D; d++) out[d] += weight * value[d];
    }
  }
}

/* terms and col_end (see tile_gemm) of a tile whose query row r sees key columns [lo[r], hi[r]]:
 * by_queries for products with a row per query (terms, or columns, are keys), by_keys for those with a
 * row per key (terms are queries). */
static void NAME(spans_by_queries_, SUFFIX)(int64_t rows, int64_t cols, const int64_t *lo, const int64_t *hi,
                                            int64_t (*terms)[2], int64_t *col_end) {
  for (int64_t r0 = 0; r0 < rows; r0 += GEMM_ROWS) {
    int64_t first = cols, last = -1;
    for (int64_t r = r0; r < rows && r < r0 + GEMM_ROWS; r++)
      if (lo[r] <= hi[r]) {
        if (lo[r] < first) first = lo[r];
        if (hi[r] > last) last = hi[r];
      }
    terms[r0 / GEMM_ROWS][0] = first < 0 ? 0 : first;
    terms[r0 / GEMM_ROWS][1] = last + 1 > cols ? cols : last + 1;
    col_end[r0 / GEMM_ROWS] = last + 1;
  }
}

static void NAME(spans_by_keys_, SUFFIX)(int64_t rows, int64_t cols, const int64_t *lo, const int64_t *hi,
                                         int64_t (*terms)[2]) {
  for (int64_t c0 = 0; c0 < cols; c0 += GEMM_ROWS) {
    int64_t c1 = c0 + GEMM_ROWS - 1 < cols - 1 ? c0 + GEMM_ROWS - 1 : cols - 1, first = rows, last = -1;
    for (int64_t r = 0; r < rows; r++)
      if (lo[r] <= hi[r] && lo[r] <= c1 && hi[r] >= c0) {
        if (r < first) first = r;
        last = r;
      }
    terms[c0 / GEMM_ROWS][0] = first;
    terms[c0 / GEMM_ROWS][1] = last + 1;
  }
}

/* dst (n x D, contiguous) = rows pos0 .. pos0 + n - 1 of head h of batch row b of t, in the compute dtype. */
WIDE_VECTORS static void NAME(load_rows_, SUFFIX)(REAL *dst, const attention_operand *t, int64_t b, int64_t h,
                                                  int64_t pos0, int64_t n, int64_t D) {
  for (int64_t r = 0; r < n; r++) NAME(load_row_, SUFFIX)(dst + r * D, row_of(t, b, h, pos0 + r), t->dtype, D);
}

/* The same rows transposed: dst is D x n with rows ld apart, tmp holds n x D. */
WIDE_VECTORS static void NAME(load_rows_transposed_, SUFFIX)(REAL *dst, int64_t ld, REAL *tmp, const attention_operand *t,
                                                             int64_t b, int64_t h, int64_t n, int64_t D) {
  for (int64_t r = 0; r < n; r++) NAME(load_row_, SUFFIX)(tmp + r * D, row_of(t, b, h, r), t->dtype, D);
  /* Whole LANES x LANES blocks in registers: step w swaps the off-diagonal w x w blocks of row pairs
   * (i, i + w), so after every power of two each element's row and column bits are exchanged. An
   * element at a time, the transpose cost as much as the tile products that use it. */
  NAME(index_vec_, SUFFIX) low[LANES], high[LANES];
  for (int w = 1, s = 0; w < LANES; w *= 2, s++)
    for (int l = 0; l < LANES; l++) {
      low[s][l] = (l & w) ? LANES + l - w : l;
      high[s][l] = (l & w) ? LANES + l : l + w;
    }
  int64_t n_whole = n - n % LANES, d_whole = D - D % LANES;
  for (int64_t c0 = 0; c0 < n_whole; c0 += LANES)
    for (int64_t d0 = 0; d0 < d_whole; d0 += LANES) {
      VEC m[LANES];
#pragma GCC unroll 16
      for (int r = 0; r < LANES; r++) memcpy(&m[r], tmp + (c0 + r) * D + d0, sizeof m[r]);
#pragma GCC unroll 4
      for (int w = 1, s = 0; w < LANES; w *= 2, s++)
#pragma GCC unroll 16
        for (int i = 0; i < LANES; i++)
          if (!(i & w)) {
            VEC x = m[i], y = m[i + w];
            m[i] = __builtin_shuffle(x, y, low[s]);
            m[i + w] = __builtin_shuffle(x, y, high[s]);
          }
#pragma GCC unroll 16
      for (int r = 0; r < LANES; r++) memcpy(dst + (d0 + r) * ld + c0, &m[r], sizeof m[r]);
    }
  for (int64_t d = 0; d < D; d++)
    for (int64_t c = d < d_whole ? n_whole : 0; c < n; c++) dst[d * ld + c] = tmp[c * D + d];
}

WIDE_VECTORS static void NAME(store_rows_, SUFFIX)(const attention_operand *t, int64_t b, int64_t h, int64_t pos0,
                                                   int64_t n, int64_t D, const REAL *src) {
  for (int64_t r = 0; r < n; r++) NAME(store_row_, SUFFIX)(row_of(t, b, h, pos0 + r), t->dtype, src + r * D, D);
}

/* row[c] = exp(row[c] - shift) for the visible columns [first, last]; masked columns become exp(0)
 * for the caller to zero. They must reach the exp in range: libmvec's expf takes a slow scalar path on
 * a vector holding -inf. The selects and the exp vectorize only in loops of their own. */
__attribute__((always_inline)) static inline void NAME(exp_visible_, SUFFIX)(REAL *row, int64_t cols, int64_t first,
                                                                            int64_t last, REAL shift) {
  if (first > 0 || last < cols - 1)
#pragma omp simd
    for (int64_t c = 0; c < cols; c++) row[c] = (c < first) | (c > last) ? shift : row[c];
#pragma omp simd
  for (int64_t c = 0; c < cols; c++) row[c] = EXP(row[c] - shift);
}

/* The online-softmax step for a tile of scores whose row r sees columns [lo[r], hi[r]]: turns scores
 * into exp(score - running max), zero where masked, and rescales the row's sum and output accumulator. */
WIDE_VECTORS static void NAME(softmax_tile_, SUFFIX)(REAL *scores, int64_t rows, int64_t cols, const int64_t *lo,
                                                     const int64_t *hi, REAL *row_max, REAL *row_sum, REAL *acc,
                                                     int64_t D) {
  for (int64_t r = 0; r < rows; r++) {
    REAL *srow = scores + r * BLOCK_K;
    int64_t first = lo[r], last = hi[r];
    REAL peak = row_max[r];
#pragma omp simd reduction(max : peak)
    for (int64_t c = 0; c < cols; c++) {
      REAL x = (c < first) | (c > last) ? -INFINITY : srow[c];
      peak = x > peak ? x : peak;
    }
    if (peak == -INFINITY) {
      for (int64_t c = 0; c < cols; c++) srow[c] = 0;
      continue;
    }
    NAME(exp_visible_, SUFFIX)(srow, cols, first, last, peak);
    REAL rescale = EXP(row_max[r] - peak), total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t c = 0; c < cols; c++) {
      REAL e = (c < first) | (c > last) ? 0 : srow[c];
      srow[c] = e;
      total += e;
    }
    row_sum[r] = row_sum[r] * rescale + total;
    row_max[r] = peak;
    if (rescale == 1) continue; /* the common case of an unchanged maximum: scaling by one is exact */
    REAL *arow = acc + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; d++) arow[d] *= rescale;
  }
}

/* P = exp(scores - lse) on a tile whose row r sees columns [lo[r], hi[r]], zero elsewhere (masked
 * columns pass through exp_visible_ first). */
WIDE_VECTORS static void NAME(probabilities_tile_, SUFFIX)(REAL *p, int64_t rows, int64_t cols, const int64_t *lo,
                                                           const int64_t *hi, const REAL *lse) {
  for (int64_t r = 0; r < rows; r++) {
    REAL *prow = p + r * BLOCK_K, l = lse[r];
    int64_t first = lo[r], last = hi[r];
    if (l == -INFINITY) {
      for (int64_t c = 0; c < cols; c++) prow[c] = 0;
      continue;
    }
    NAME(exp_visible_, SUFFIX)(prow, cols, first, last, l);
    if (first > 0 || last < cols - 1)
#pragma omp simd
      for (int64_t c = 0; c < cols; c++) prow[c] = (c < first) | (c > last) ? 0 : prow[c];
  }
}

/* dS = P (dP - delta) in place of dP */
WIDE_VECTORS static void NAME(score_grad_tile_, SUFFIX)(REAL *dp, const REAL *p, int64_t rows, int64_t cols,
                                                        const REAL *delta) {
  for (int64_t r = 0; r < rows; r++) {
    REAL *drow = dp + r * BLOCK_K, dr = delta[r];
    const REAL *prow = p + r * BLOCK_K;
#pragma omp simd
    for (int64_t c = 0; c < cols; c++) drow[c] = prow[c] * (drow[c] - dr);
  }
}

/* delta[t] = dO[t] . O[t] for the T rows of one head; orow holds one row of O. */
WIDE_VECTORS static void NAME(row_dots_, SUFFIX)(REAL *delta, const REAL *dout, const attention_operand *o, int64_t b,
                                                 int64_t h, int64_t T, int64_t D, REAL *orow) {
  for (int64_t t = 0; t < T; t++) {
    NAME(load_row_, SUFFIX)(orow, row_of(o, b, h, t), o->dtype, D);
    REAL dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; d++) dot += dout[t * D + d] * orow[d];
    delta[t] = dot;
  }
}

/* transformers' Falcon ALiBi bias (build_alibi_tensor, then the division by sqrt(head_dim) in the model's
 * dtype): bf16(bf16(slope) * bf16(position)) * scale, rounded to the model's dtype. PyTorch multiplies the
 * bf16 slopes by the integer positions in bf16, so the positions are rounded too (past 256 they lose
 * bits); the product of two bf16 values is exact in double, so rounding it once is PyTorch's multiply. */
static inline REAL NAME(falcon_bias_, SUFFIX)(double slope_bf16, int64_t position, double scale, int dtype) {
  double position_bf16 = (double)pmp_bf16_to_f32(pmp_f32_to_bf16((float)position));
  double bias = (double)pmp_bf16_to_f32(pmp_f32_to_bf16((float)(slope_bf16 * position_bf16))) * scale;
  if (dtype == PMP_BF16) return (REAL)pmp_bf16_to_f32(pmp_f32_to_bf16((float)bias));
  if (dtype == PMP_F16) return (REAL)pmp_f16_to_f32(pmp_f32_to_f16((float)bias));
  return (REAL)bias;
}

/* ALiBi on a tile of scaled scores of batch row b starting at query t0 and key s0: adds slope * (key -
 * query position) to every column of each row (masked columns too: they stay finite and are dropped by
 * the softmax), or with falcon_bias_scale the Falcon bias of the key's position from the row's first key. */
WIDE_VECTORS static void NAME(alibi_tile_, SUFFIX)(const attention_shape *sh, int64_t b, int64_t h, REAL *scores,
                                                   int64_t t0, int64_t rows, int64_t s0, int64_t cols) {
  double slope = sh->slopes[h];
  if (sh->falcon_bias_scale > 0) {
    double slope_bf16 = (double)pmp_bf16_to_f32(pmp_f32_to_bf16((float)slope));
    for (int64_t r = 0; r < rows; r++) {
      REAL *srow = scores + r * BLOCK_K;
      int64_t first = sh->first_key ? sh->first_key[b * sh->first_key_row + (t0 + r) * sh->first_key_col] : 0;
      for (int64_t c = 0; c < cols; c++)
        srow[c] += NAME(falcon_bias_, SUFFIX)(slope_bf16, s0 + c - first, sh->falcon_bias_scale, sh->bias_dtype);
    }
    return;
  }
  for (int64_t r = 0; r < rows; r++) {
    REAL *srow = scores + r * BLOCK_K;
    int64_t distance0 = s0 - (t0 + r + sh->offset);
#pragma omp simd
    for (int64_t c = 0; c < cols; c++) srow[c] += (REAL)(slope * (double)(distance0 + c));
  }
}

/* Key range [first, last] visible to query t of batch row b (empty when first > last). */
static inline void NAME(visible_keys_, SUFFIX)(const attention_shape *sh, int64_t b, int64_t t, int64_t *first,
                                               int64_t *last) {
  int64_t pos = t + sh->offset;
  *last = sh->causal ? (pos < sh->S - 1 ? pos : sh->S - 1) : sh->S - 1;
  *first = sh->window > 0 ? (pos - sh->window + 1 > 0 ? pos - sh->window + 1 : 0) : 0;
  if (sh->first_key) {
    int64_t start = sh->first_key[b * sh->first_key_row + t * sh->first_key_col];
    if (start > *first) *first = start;
  }
}

/* Visible columns [lo[r], hi[r]] of each query row of a tile starting at query t0 and key s0. */
static void NAME(tile_ranges_, SUFFIX)(const attention_shape *sh, int64_t b, int64_t t0, int64_t rows, int64_t s0,
                                       int64_t *lo, int64_t *hi) {
  for (int64_t r = 0; r < rows; r++) {
    NAME(visible_keys_, SUFFIX)(sh, b, t0 + r, &lo[r], &hi[r]);
    lo[r] -= s0;
    hi[r] -= s0;
  }
}

/* Keys [*lo, *hi] some query of the block [t0, t0 + rows) sees. */
static void NAME(block_keys_, SUFFIX)(const attention_shape *sh, int64_t b, int64_t t0, int64_t rows, int64_t *lo,
                                      int64_t *hi) {
  int64_t first, last;
  *lo = sh->S;
  *hi = -1;
  for (int64_t r = 0; r < rows; r++) {
    NAME(visible_keys_, SUFFIX)(sh, b, t0 + r, &first, &last);
    if (first < *lo) *lo = first;
    if (last > *hi) *hi = last;
  }
}

/* Writes o (and exact, the same in the compute dtype, when its data is set) and lse; -1 when out of memory.
 * One task per query head, so its K (transposed) and V are converted once. */
static int NAME(attention_forward_, SUFFIX)(const attention_shape *sh, const attention_operand *q,
                                            const attention_operand *k, const attention_operand *v,
                                            const attention_operand *o, const attention_operand *exact, REAL *lse) {
  int64_t tasks = sh->B * sh->Hq, group = sh->Hq / sh->Hkv, D = sh->D, S = sh->S;
  bool few = sh->T <= FEW_QUERIES;   /* then kt holds K's rows, not K transposed */
  int failed = 0;
#pragma omp parallel
  {
    size_t tile = sizeof(REAL) * BLOCK_Q * (size_t)(D > 0 ? D : 1), keys = sizeof(REAL) * (size_t)(S * D > 0 ? S * D : 1);
    REAL *scores = malloc(sizeof(REAL) * BLOCK_Q * BLOCK_K);
    REAL *acc = malloc(tile), *qt = malloc(tile), *kt = malloc(keys), *vh = malloc(keys);
    REAL row_max[BLOCK_Q], row_sum[BLOCK_Q];
    int64_t lo_c[BLOCK_Q], hi_c[BLOCK_Q], q_terms[BLOCK_Q / GEMM_ROWS][2], q_cols[BLOCK_Q / GEMM_ROWS];
    bool ok = scores && acc && qt && kt && vh;
    if (!ok) {
#pragma omp atomic write
      failed = 1;
    } else {
      /* score columns no query of a row block sees are not computed: keep what they hold finite */
      memset(scores, 0, sizeof(REAL) * BLOCK_Q * BLOCK_K);
    }
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < tasks; bh++) {
      if (!ok) continue;
      int64_t b = bh / sh->Hq, h = bh % sh->Hq, hk = h / group;
      /* vh doubles as the scratch for K's rows before they are transposed */
      if (few) NAME(load_rows_, SUFFIX)(kt, k, b, hk, 0, S, D);
      else NAME(load_rows_transposed_, SUFFIX)(kt, S, vh, k, b, hk, S, D);
      NAME(load_rows_, SUFFIX)(vh, v, b, hk, 0, S, D);
      for (int64_t t0 = 0; t0 < sh->T; t0 += BLOCK_Q) {
        int64_t rows = sh->T - t0 < BLOCK_Q ? sh->T - t0 : BLOCK_Q, lo, hi;
        NAME(load_rows_, SUFFIX)(qt, q, b, h, t0, rows, D);
        NAME(block_keys_, SUFFIX)(sh, b, t0, rows, &lo, &hi);
        for (int64_t r = 0; r < rows; r++) {
          row_max[r] = -INFINITY;
          row_sum[r] = 0;
        }
        memset(acc, 0, sizeof(REAL) * (size_t)(rows * D));
        /* key blocks no query of the block sees (above the causal diagonal, before a window) are skipped */
        for (int64_t s0 = lo - lo % BLOCK_K; s0 <= hi; s0 += BLOCK_K) {
          int64_t cols = S - s0 < BLOCK_K ? S - s0 : BLOCK_K;
          NAME(tile_ranges_, SUFFIX)(sh, b, t0, rows, s0, lo_c, hi_c);
          NAME(spans_by_queries_, SUFFIX)(rows, cols, lo_c, hi_c, q_terms, q_cols);
          if (few)
            NAME(key_row_scores_, SUFFIX)(rows, cols, D, (REAL)sh->scale, qt, kt + s0 * D, lo_c, hi_c, scores);
          else
            NAME(tile_gemm_, SUFFIX)(rows, cols, D, (REAL)sh->scale, qt, D, 1, kt + s0, S, false, scores, BLOCK_K,
                                     NULL, q_cols);
          if (sh->slopes) NAME(alibi_tile_, SUFFIX)(sh, b, h, scores, t0, rows, s0, cols);
          NAME(softmax_tile_, SUFFIX)(scores, rows, cols, lo_c, hi_c, row_max, row_sum, acc, D);
          if (few)
            NAME(key_row_values_, SUFFIX)(rows, cols, D, scores, vh + s0 * D, lo_c, hi_c, acc);
          else
            NAME(tile_gemm_, SUFFIX)(rows, D, cols, (REAL)1, scores, BLOCK_K, 1, vh + s0 * D, D, true, acc, D,
                                     q_terms, NULL);
        }
        for (int64_t r = 0; r < rows; r++) {
          REAL *arow = acc + r * D;
          REAL inv = row_sum[r] > 0 ? (REAL)1 / row_sum[r] : 0;
          for (int64_t d = 0; d < D; d++) arow[d] *= inv;
          lse[bh * sh->T + t0 + r] = row_sum[r] > 0 ? row_max[r] + LOG(row_sum[r]) : -INFINITY;
        }
        NAME(store_rows_, SUFFIX)(o, b, h, t0, rows, D, acc);
        if (exact->data) NAME(store_rows_, SUFFIX)(exact, b, h, t0, rows, D, acc);
      }
    }
    free(scores);
    free(acc);
    free(qt);
    free(kt);
    free(vh);
  }
  return failed ? -1 : 0;
}

/* One task per (batch, kv head): it owns dK/dV of that head and dQ of the query heads sharing it, and
 * accumulates them in the compute dtype before storing each once. -1 when out of memory. */
static int NAME(attention_backward_, SUFFIX)(const attention_shape *sh, const attention_operand *q,
                                             const attention_operand *k, const attention_operand *v,
                                             const attention_operand *o, const REAL *lse,
                                             const attention_operand *dout, const attention_operand *dq,
                                             const attention_operand *dk, const attention_operand *dv) {
  int64_t group = sh->Hq / sh->Hkv, D = sh->D, T = sh->T, S = sh->S;
  int64_t tasks = sh->B * sh->Hkv;
  int failed = 0;
#pragma omp parallel
  {
    size_t keys = sizeof(REAL) * (size_t)(S * D > 0 ? S * D : 1), queries = sizeof(REAL) * (size_t)(T * D > 0 ? T * D : 1);
    REAL *p = malloc(sizeof(REAL) * BLOCK_Q * BLOCK_K), *dp = malloc(sizeof(REAL) * BLOCK_Q * BLOCK_K);
    REAL *delta = malloc(sizeof(REAL) * (size_t)(T > 0 ? T : 1)), *orow = malloc(sizeof(REAL) * (size_t)(D > 0 ? D : 1));
    /* K and V rows, both transposed (D x S), and the dK/dV accumulators of the task's kv head */
    REAL *kh = malloc(keys), *vh = malloc(keys), *kt = malloc(keys), *vt = malloc(keys);
    REAL *dkh = malloc(keys), *dvh = malloc(keys);
    /* Q, dO and the dQ accumulator of one query head */
    REAL *qh = malloc(queries), *doh = malloc(queries), *dqh = malloc(queries);
    int64_t lo_c[BLOCK_Q], hi_c[BLOCK_Q], q_terms[BLOCK_Q / GEMM_ROWS][2], q_cols[BLOCK_Q / GEMM_ROWS];
    int64_t k_terms[BLOCK_K / GEMM_ROWS][2];
    bool ok = p && dp && delta && orow && kh && vh && kt && vt && dkh && dvh && qh && doh && dqh;
    if (!ok) {
#pragma omp atomic write
      failed = 1;
    } else {
      /* tile columns no query of a row block sees are not computed: keep what they hold finite */
      memset(p, 0, sizeof(REAL) * BLOCK_Q * BLOCK_K);
      memset(dp, 0, sizeof(REAL) * BLOCK_Q * BLOCK_K);
    }
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; task++) {
      if (!ok) continue;
      int64_t b = task / sh->Hkv, hk = task % sh->Hkv;
      NAME(load_rows_transposed_, SUFFIX)(kt, S, kh, k, b, hk, S, D);
      NAME(load_rows_transposed_, SUFFIX)(vt, S, vh, v, b, hk, S, D);
      memset(dkh, 0, keys);
      memset(dvh, 0, keys);
      for (int64_t h = hk * group; h < (hk + 1) * group; h++) {
        const REAL *lh = lse + (b * sh->Hq + h) * T;
        NAME(load_rows_, SUFFIX)(qh, q, b, h, 0, T, D);
        NAME(load_rows_, SUFFIX)(doh, dout, b, h, 0, T, D);
        memset(dqh, 0, queries);
        NAME(row_dots_, SUFFIX)(delta, doh, o, b, h, T, D, orow);
        for (int64_t t0 = 0; t0 < T; t0 += BLOCK_Q) {
          int64_t rows = T - t0 < BLOCK_Q ? T - t0 : BLOCK_Q, lo, hi;
          NAME(block_keys_, SUFFIX)(sh, b, t0, rows, &lo, &hi);
          for (int64_t s0 = lo - lo % BLOCK_K; s0 <= hi; s0 += BLOCK_K) {
            int64_t cols = S - s0 < BLOCK_K ? S - s0 : BLOCK_K;
            NAME(tile_ranges_, SUFFIX)(sh, b, t0, rows, s0, lo_c, hi_c);
            NAME(spans_by_queries_, SUFFIX)(rows, cols, lo_c, hi_c, q_terms, q_cols);
            NAME(spans_by_keys_, SUFFIX)(rows, cols, lo_c, hi_c, k_terms);
            NAME(tile_gemm_, SUFFIX)(rows, cols, D, (REAL)sh->scale, qh + t0 * D, D, 1, kt + s0, S, false, p, BLOCK_K,
                                     NULL, q_cols);
            if (sh->slopes) NAME(alibi_tile_, SUFFIX)(sh, b, h, p, t0, rows, s0, cols);
            NAME(probabilities_tile_, SUFFIX)(p, rows, cols, lo_c, hi_c, lh + t0);
            /* dV += P^T dO ; dP = dO V^T */
            NAME(tile_gemm_, SUFFIX)(cols, D, rows, (REAL)1, p, 1, BLOCK_K, doh + t0 * D, D, true, dvh + s0 * D, D,
                                     k_terms, NULL);
            NAME(tile_gemm_, SUFFIX)(rows, cols, D, (REAL)1, doh + t0 * D, D, 1, vt + s0, S, false, dp, BLOCK_K, NULL,
                                     q_cols);
            NAME(score_grad_tile_, SUFFIX)(dp, p, rows, cols, delta + t0);
            /* dQ += scale dS K ; dK += scale dS^T Q */
            NAME(tile_gemm_, SUFFIX)(rows, D, cols, (REAL)sh->scale, dp, BLOCK_K, 1, kh + s0 * D, D, true, dqh + t0 * D,
                                     D, q_terms, NULL);
            NAME(tile_gemm_, SUFFIX)(cols, D, rows, (REAL)sh->scale, dp, 1, BLOCK_K, qh + t0 * D, D, true, dkh + s0 * D,
                                     D, k_terms, NULL);
          }
        }
        NAME(store_rows_, SUFFIX)(dq, b, h, 0, T, D, dqh);
      }
      NAME(store_rows_, SUFFIX)(dk, b, hk, 0, S, D, dkh);
      NAME(store_rows_, SUFFIX)(dv, b, hk, 0, S, D, dvh);
    }
    free(p);
    free(dp);
    free(delta);
    free(orow);
    free(kh);
    free(vh);
    free(kt);
    free(vt);
    free(dkh);
    free(dvh);
    free(qh);
    free(doh);
    free(dqh);
  }
  return failed ? -1 : 0;
}

#undef VEC
#undef LANES
#undef NAME
#undef NAME2
