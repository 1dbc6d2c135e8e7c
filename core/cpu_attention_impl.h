/*
 * Tiled causal attention, written once for a real type (included by cpu_attention.c with REAL = float
 * or double). Blocks of BLOCK_Q queries meet blocks of BLOCK_K
 * keys; an online softmax keeps a running max and sum per query, so only a BLOCK_Q x BLOCK_K tile of
 * scores exists at a time. The backward pass recomputes the tiles from the saved log-sum-exp.
 */
#define NAME2(a, b) a##b
#define NAME(a, b) NAME2(a, b)
#define VEC NAME(vec_, SUFFIX)
#define LANES ((int64_t)(32 / sizeof(REAL)))

typedef REAL VEC __attribute__((vector_size(32)));

/* C = (accumulate ? C : 0) + alpha A B on one tile: A is m x k with element (i, p) at A[i * a_rs + p * a_cs]
 * (so a transposed tile costs nothing), B is k x n with rows ldb apart, C is m x n with rows ldc apart.
 * At tile sizes (64 x 64 x head_dim) a BLAS call spends more on setup than on arithmetic, so this is a
 * small register-blocked kernel: 4 rows of C by 2 vectors of columns stay in registers while p runs. */
WIDE_VECTORS static void NAME(tile_gemm_, SUFFIX)(int64_t m, int64_t n, int64_t k, REAL alpha, const REAL *A,
                                                 int64_t a_rs, int64_t a_cs, const REAL *B, int64_t ldb,
                                                 bool accumulate, REAL *C, int64_t ldc) {
  enum { ROWS = 4 };
  const int64_t cols = 2 * LANES;
  int64_t i = 0;
  for (; i + ROWS <= m; i += ROWS) {
    int64_t j = 0;
    for (; j + cols <= n; j += cols) {
      /* named accumulators, so they live in registers rather than in an array on the stack */
      VEC c00 = {0}, c01 = {0}, c10 = {0}, c11 = {0}, c20 = {0}, c21 = {0}, c30 = {0}, c31 = {0};
      const REAL *a0 = A + i * a_rs, *a1 = a0 + a_rs, *a2 = a1 + a_rs, *a3 = a2 + a_rs;
      for (int64_t p = 0; p < k; p++) {
        VEC b0, b1;
        memcpy(&b0, B + p * ldb + j, sizeof b0);
        memcpy(&b1, B + p * ldb + j + LANES, sizeof b1);
        REAL x0 = a0[p * a_cs], x1 = a1[p * a_cs], x2 = a2[p * a_cs], x3 = a3[p * a_cs];
        c00 += x0 * b0, c01 += x0 * b1;
        c10 += x1 * b0, c11 += x1 * b1;
        c20 += x2 * b0, c21 += x2 * b1;
        c30 += x3 * b0, c31 += x3 * b1;
      }
      VEC acc[ROWS][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
      for (int r = 0; r < ROWS; r++) {
        REAL *c = C + (i + r) * ldc + j;
        for (int h = 0; h < 2; h++) {
          VEC out = alpha * acc[r][h];
          if (accumulate) {
            VEC old;
            memcpy(&old, c + h * LANES, sizeof old);
            out += old;
          }
          memcpy(c + h * LANES, &out, sizeof out);
        }
      }
    }
    for (; j < n; j++)
      for (int r = 0; r < ROWS; r++) {
        REAL sum = 0;
        for (int64_t p = 0; p < k; p++) sum += A[(i + r) * a_rs + p * a_cs] * B[p * ldb + j];
        C[(i + r) * ldc + j] = alpha * sum + (accumulate ? C[(i + r) * ldc + j] : 0);
      }
  }
  for (; i < m; i++)
    for (int64_t j = 0; j < n; j++) {
      REAL sum = 0;
      for (int64_t p = 0; p < k; p++) sum += A[i * a_rs + p * a_cs] * B[p * ldb + j];
      C[i * ldc + j] = alpha * sum + (accumulate ? C[i * ldc + j] : 0);
    }
}

/* row[c] = exp(row[c] - shift) for c in [0, n); returns their sum. Vectorized (libmvec) in its own
 * function so it gets the wide build. */
WIDE_VECTORS static REAL NAME(exp_shifted_, SUFFIX)(REAL *row, int64_t n, REAL shift) {
  REAL total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t c = 0; c < n; c++) total += (row[c] = EXP(row[c] - shift));
  return total;
}

/* dst (cols x D, rows BLOCK_K apart) = src^T for a block of cols rows of D values. */
static void NAME(transpose_block_, SUFFIX)(const REAL *src, int64_t cols, int64_t D, REAL *dst) {
  for (int64_t c = 0; c < cols; c++)
    for (int64_t d = 0; d < D; d++) dst[d * BLOCK_K + c] = src[c * D + d];
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

static void NAME(attention_forward_, SUFFIX)(const attention_shape *sh, const REAL *q, const REAL *k, const REAL *v,
                                             REAL *o, REAL *lse) {
  int64_t qblocks = (sh->T + BLOCK_Q - 1) / BLOCK_Q;
  int64_t tasks = sh->B * sh->Hq * qblocks;
  int64_t group = sh->Hq / sh->Hkv, D = sh->D;
#pragma omp parallel
  {
    REAL *scores = malloc(sizeof(REAL) * BLOCK_Q * BLOCK_K);
    REAL *acc = malloc(sizeof(REAL) * BLOCK_Q * (size_t)D);
    REAL *kt = malloc(sizeof(REAL) * BLOCK_K * (size_t)D);
    REAL row_max[BLOCK_Q], row_sum[BLOCK_Q];
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; task++) {
      if (!scores || !acc || !kt) continue;
      int64_t qb = task % qblocks, bh = task / qblocks, b = bh / sh->Hq, h = bh % sh->Hq;
      int64_t t0 = qb * BLOCK_Q, rows = sh->T - t0 < BLOCK_Q ? sh->T - t0 : BLOCK_Q;
      const REAL *qi = q + (bh * sh->T + t0) * D;
      const REAL *kh = k + (b * sh->Hkv + h / group) * sh->S * D, *vh = v + (b * sh->Hkv + h / group) * sh->S * D;
      int64_t first, last, lo = sh->S, hi = -1;
      for (int64_t r = 0; r < rows; r++) {
        NAME(visible_keys_, SUFFIX)(sh, b, t0 + r, &first, &last);
        if (first < lo) lo = first;
        if (last > hi) hi = last;
        row_max[r] = -INFINITY;
        row_sum[r] = 0;
      }
      memset(acc, 0, sizeof(REAL) * (size_t)(rows * D));
      for (int64_t s0 = lo - lo % BLOCK_K; s0 <= hi; s0 += BLOCK_K) {
        int64_t cols = sh->S - s0 < BLOCK_K ? sh->S - s0 : BLOCK_K;
        NAME(transpose_block_, SUFFIX)(kh + s0 * D, cols, D, kt);
        NAME(tile_gemm_, SUFFIX)(rows, cols, D, (REAL)sh->scale, qi, D, 1, kt, BLOCK_K, false, scores, BLOCK_K);
        for (int64_t r = 0; r < rows; r++) {
          REAL *srow = scores + r * BLOCK_K;
          NAME(visible_keys_, SUFFIX)(sh, b, t0 + r, &first, &last);
          REAL peak = row_max[r];
          for (int64_t c = 0; c < cols; c++) {
            if (s0 + c < first || s0 + c > last) srow[c] = -INFINITY;
            else if (srow[c] > peak) peak = srow[c];
          }
          if (peak == -INFINITY) {
            for (int64_t c = 0; c < cols; c++) srow[c] = 0;
            continue;
          }
          REAL rescale = EXP(row_max[r] - peak), total = NAME(exp_shifted_, SUFFIX)(srow, cols, peak);
          row_sum[r] = row_sum[r] * rescale + total;
          row_max[r] = peak;
          REAL *arow = acc + r * D;
          for (int64_t d = 0; d < D; d++) arow[d] *= rescale;
        }
        NAME(tile_gemm_, SUFFIX)(rows, D, cols, (REAL)1, scores, BLOCK_K, 1, vh + s0 * D, D, true, acc, D);
      }
      for (int64_t r = 0; r < rows; r++) {
        REAL *orow = o + (bh * sh->T + t0 + r) * D;
        REAL inv = row_sum[r] > 0 ? (REAL)1 / row_sum[r] : 0;
        for (int64_t d = 0; d < D; d++) orow[d] = acc[r * D + d] * inv;
        lse[bh * sh->T + t0 + r] = row_sum[r] > 0 ? row_max[r] + LOG(row_sum[r]) : -INFINITY;
      }
    }
    free(scores);
    free(acc);
    free(kt);
  }
}

/* One task per (batch, kv head): it owns dK/dV of that head and dQ of the query heads sharing it. */
static void NAME(attention_backward_, SUFFIX)(const attention_shape *sh, const REAL *q, const REAL *k, const REAL *v,
                                              const REAL *o, const REAL *lse, const REAL *dout, REAL *dq, REAL *dk,
                                              REAL *dv) {
  int64_t group = sh->Hq / sh->Hkv, D = sh->D, T = sh->T, S = sh->S;
  int64_t tasks = sh->B * sh->Hkv;
  memset(dq, 0, sizeof(REAL) * (size_t)(sh->B * sh->Hq * T * D));
  memset(dk, 0, sizeof(REAL) * (size_t)(sh->B * sh->Hkv * S * D));
  memset(dv, 0, sizeof(REAL) * (size_t)(sh->B * sh->Hkv * S * D));
#pragma omp parallel
  {
    REAL *p = malloc(sizeof(REAL) * BLOCK_Q * BLOCK_K);
    REAL *dp = malloc(sizeof(REAL) * BLOCK_Q * BLOCK_K);
    REAL *delta = malloc(sizeof(REAL) * (size_t)(T > 0 ? T : 1));
    REAL *kt = malloc(sizeof(REAL) * BLOCK_K * (size_t)D), *vt = malloc(sizeof(REAL) * BLOCK_K * (size_t)D);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; task++) {
      if (!p || !dp || !delta || !kt || !vt) continue;
      int64_t b = task / sh->Hkv, hk = task % sh->Hkv;
      const REAL *kh = k + task * S * D, *vh = v + task * S * D;
      REAL *dkh = dk + task * S * D, *dvh = dv + task * S * D;
      for (int64_t h = hk * group; h < (hk + 1) * group; h++) {
        int64_t bh = b * sh->Hq + h;
        const REAL *qh = q + bh * T * D, *oh = o + bh * T * D, *doh = dout + bh * T * D, *lh = lse + bh * T;
        REAL *dqh = dq + bh * T * D;
        for (int64_t t = 0; t < T; t++) {
          REAL dot = 0;
          for (int64_t d = 0; d < D; d++) dot += doh[t * D + d] * oh[t * D + d];
          delta[t] = dot;
        }
        for (int64_t t0 = 0; t0 < T; t0 += BLOCK_Q) {
          int64_t rows = T - t0 < BLOCK_Q ? T - t0 : BLOCK_Q;
          int64_t first, last, lo = S, hi = -1;
          for (int64_t r = 0; r < rows; r++) {
            NAME(visible_keys_, SUFFIX)(sh, b, t0 + r, &first, &last);
            if (first < lo) lo = first;
            if (last > hi) hi = last;
          }
          for (int64_t s0 = lo - lo % BLOCK_K; s0 <= hi; s0 += BLOCK_K) {
            int64_t cols = S - s0 < BLOCK_K ? S - s0 : BLOCK_K;
            NAME(transpose_block_, SUFFIX)(kh + s0 * D, cols, D, kt);
            NAME(transpose_block_, SUFFIX)(vh + s0 * D, cols, D, vt);
            NAME(tile_gemm_, SUFFIX)(rows, cols, D, (REAL)sh->scale, qh + t0 * D, D, 1, kt, BLOCK_K, false, p, BLOCK_K);
            for (int64_t r = 0; r < rows; r++) {
              NAME(visible_keys_, SUFFIX)(sh, b, t0 + r, &first, &last);
              REAL l = lh[t0 + r], *prow = p + r * BLOCK_K;
              /* visible keys are one run [first, last]: exp over the tile, then zero the rest */
              int64_t lo_c = first - s0 > 0 ? first - s0 : 0, hi_c = last - s0 < cols - 1 ? last - s0 : cols - 1;
              if (l == -INFINITY || lo_c > hi_c) {
                for (int64_t c = 0; c < cols; c++) prow[c] = 0;
                continue;
              }
              NAME(exp_shifted_, SUFFIX)(prow + lo_c, hi_c - lo_c + 1, l);
              for (int64_t c = 0; c < lo_c; c++) prow[c] = 0;
              for (int64_t c = hi_c + 1; c < cols; c++) prow[c] = 0;
            }
            /* dV += P^T dO ; dP = dO V^T */
            NAME(tile_gemm_, SUFFIX)(cols, D, rows, (REAL)1, p, 1, BLOCK_K, doh + t0 * D, D, true, dvh + s0 * D, D);
            NAME(tile_gemm_, SUFFIX)(rows, cols, D, (REAL)1, doh + t0 * D, D, 1, vt, BLOCK_K, false, dp, BLOCK_K);
            /* dS = P (dP - delta), reusing dp */
            for (int64_t r = 0; r < rows; r++)
              for (int64_t c = 0; c < cols; c++)
                dp[r * BLOCK_K + c] = p[r * BLOCK_K + c] * (dp[r * BLOCK_K + c] - delta[t0 + r]);
            /* dQ += scale dS K ; dK += scale dS^T Q */
            NAME(tile_gemm_, SUFFIX)(rows, D, cols, (REAL)sh->scale, dp, BLOCK_K, 1, kh + s0 * D, D, true, dqh + t0 * D, D);
            NAME(tile_gemm_, SUFFIX)(cols, D, rows, (REAL)sh->scale, dp, 1, BLOCK_K, qh + t0 * D, D, true, dkh + s0 * D, D);
          }
        }
      }
    }
    free(p);
    free(dp);
    free(delta);
    free(kt);
    free(vt);
  }
}

#undef VEC
#undef LANES
#undef NAME
#undef NAME2
