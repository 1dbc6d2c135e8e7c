/*
 * CPU kernels of the fused transformer ops. They compute in f32 (f64 for f64 tensors). For bf16/f16
 * they round intermediate results where Hugging Face's modules do, so outputs match theirs exactly.
 */
#include "internal.h"
#include "cpu/vector_math.h"
#include <omp.h>

/* Loads n elements of any float dtype as double. */
static void load_row(double *dst, const char *src, int dtype, int64_t n) {
  int es = pmp_dtype_size(dtype);
  if (dtype == PMP_F32) {
    for (int64_t k = 0; k < n; k++) dst[k] = ((const float *)src)[k];
  } else if (dtype == PMP_F64) {
    memcpy(dst, src, (size_t)n * sizeof(double));
  } else {
    for (int64_t k = 0; k < n; k++) dst[k] = pmp_load_as_f64(dtype, src + k * es);
  }
}

/* Rounds v to what dtype can hold (identity for f32/f64 compute). */
static double round_to(int dtype, double v) {
  if (dtype == PMP_BF16) return pmp_bf16_to_f32(pmp_f32_to_bf16((float)v));
  if (dtype == PMP_F16) return pmp_f16_to_f32(pmp_f32_to_f16((float)v));
  if (dtype == PMP_F32) return (float)v;
  return v;
}

static bool low_precision(int dtype) { return dtype == PMP_BF16 || dtype == PMP_F16; }

/* f32 and bf16 rows, loaded and stored as f32; `bf16` is a constant in each caller, so the branch folds
 * away and the loops vectorize. */
static inline float load_float(const void *p, int64_t k, bool bf16) {
  return bf16 ? bf16_bits_to_f32(((const uint16_t *)p)[k]) : ((const float *)p)[k];
}

static inline void store_float(void *p, int64_t k, float v, bool bf16) {
  if (bf16) ((uint16_t *)p)[k] = f32_to_bf16_bits(v);
  else ((float *)p)[k] = v;
}

/* RMSNorm's row sums run in double in RMS_LANES interleaved partial sums (element k goes to sum k mod
 * RMS_LANES), added up in lane order at the end: the loop fills the vector lanes, and the order does not
 * depend on the thread count or the data's alignment. */
enum { RMS_LANES = 16 };

/* The RMS_LANES partial sums of term(k) for k < hidden, added up in lane order. */
#define RMS_ROW_SUM(total, hidden, term)                                                                     \
  do {                                                                                                       \
    double acc_[RMS_LANES] = {0};                                                                            \
    int64_t k = 0;                                                                                           \
    for (; k + RMS_LANES <= (hidden); k += RMS_LANES) {                                                      \
      _Pragma("omp simd") for (int j = 0; j < RMS_LANES; j++) acc_[j] += term(k + j);                        \
    }                                                                                                        \
    for (int j = 0; k + j < (hidden); j++) acc_[j] += term(k + j);                                           \
    (total) = 0;                                                                                             \
    for (int j = 0; j < RMS_LANES; j++) (total) += acc_[j];                                                  \
  } while (0)

/* sum over k of x[k]^2 */
static inline __attribute__((always_inline)) double rms_row_squares(const void *x, int64_t hidden, bool bf16) {
  double total;
#define SQUARE(k) ((double)load_float(x, k, bf16) * (double)load_float(x, k, bf16))
  RMS_ROW_SUM(total, hidden, SQUARE);
#undef SQUARE
  return total;
}

/* sum over k of (dy[k] * w[k]) * (x[k] * inv), adding dy[k] * (x[k] * inv) to dw[k] on the way */
static inline __attribute__((always_inline)) double rms_row_dot(const void *x, const void *dy, const double *w,
                                                                double inv, double *dw, int64_t hidden, bool bf16) {
  double total;
#define TERM(k) (((double)load_float(dy, k, bf16) * w[k]) * ((double)load_float(x, k, bf16) * inv))
#define TERM_DW(k) (dw[k] += (double)load_float(dy, k, bf16) * ((double)load_float(x, k, bf16) * inv), TERM(k))
  if (dw) RMS_ROW_SUM(total, hidden, TERM_DW);
  else RMS_ROW_SUM(total, hidden, TERM);
#undef TERM_DW
#undef TERM
  return total;
}

/* One row: rstd = 1 / sqrt(mean(x^2) + eps) in f32 as HF does, y = w * (x * rstd); bf16 rounds x * rstd
 * before the weight, as HF's LlamaRMSNorm does (both products are exact in f32, so f32 arithmetic gives
 * what the f64 generic path gives). */
static inline __attribute__((always_inline)) void rms_norm_row(const void *x, const void *w, void *y, float *rstd,
                                                               int64_t hidden, double eps, bool bf16) {
  float inv = 1.0f / sqrtf((float)(rms_row_squares(x, hidden, bf16) / (double)hidden) + (float)eps);
  *rstd = inv;
  if (bf16 && w) {
#pragma omp simd
    for (int64_t k = 0; k < hidden; k++)
      store_float(y, k, load_float(w, k, true) * bf16_bits_to_f32(f32_to_bf16_bits(load_float(x, k, true) * inv)), true);
  } else if (w) {
#pragma omp simd
    for (int64_t k = 0; k < hidden; k++) store_float(y, k, load_float(w, k, false) * (load_float(x, k, false) * inv), false);
  } else {
#pragma omp simd
    for (int64_t k = 0; k < hidden; k++) store_float(y, k, load_float(x, k, bf16) * inv, bf16);
  }
}

/* Rows [lo, hi): one call per thread, so the dispatch to the CPU's build happens once. */
WIDE_VECTORS static void rms_norm_rows_f32(const char *x, const void *w, char *y, float *rstd, int64_t hidden,
                                           int64_t lo, int64_t hi, double eps) {
  for (int64_t r = lo; r < hi; r++) rms_norm_row(x + r * hidden * 4, w, y + r * hidden * 4, rstd + r, hidden, eps, false);
}

WIDE_VECTORS static void rms_norm_rows_bf16(const char *x, const void *w, char *y, float *rstd, int64_t hidden,
                                            int64_t lo, int64_t hi, double eps) {
  for (int64_t r = lo; r < hi; r++) rms_norm_row(x + r * hidden * 2, w, y + r * hidden * 2, rstd + r, hidden, eps, true);
}

int pmp_cpu_rms_norm(const pmp_op_args *a) {
  const pmp_tensor *x = a->in[0], *w = a->in[1];
  pmp_tensor *y = a->out, *rstd = a->out2;
  int64_t rows = a->i[0], hidden = a->i[1];
  int dt = x->dtype_id, es = pmp_dtype_size(dt);
  double eps = a->f[0];
  bool f64 = dt == PMP_F64;
  if ((dt == PMP_F32 || dt == PMP_BF16) && rstd->dtype_id == PMP_F32) {
#pragma omp parallel if (rows * hidden >= PMP_PARALLEL_THRESHOLD)
    {
      int64_t lo, hi;
      pmp_thread_share(rows, &lo, &hi);
      (dt == PMP_BF16 ? rms_norm_rows_bf16 : rms_norm_rows_f32)(x->data, w ? w->data : NULL, y->data,
                                                               (float *)rstd->data, hidden, lo, hi, eps);
    }
    return 0;
  }
#pragma omp parallel if (rows * hidden >= PMP_PARALLEL_THRESHOLD)
  {
    double *row = malloc(sizeof(double) * (size_t)(2 * hidden + 1));
    double *weight = row + hidden;
    if (row && w) load_row(weight, w->data, dt, hidden);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      if (!row) continue;
      load_row(row, x->data + r * hidden * es, dt, hidden);
      double squares = 0;
      for (int64_t k = 0; k < hidden; k++) squares += row[k] * row[k];
      /* HF: variance and rsqrt in f32 */
      double inv = f64 ? 1.0 / sqrt(squares / (double)hidden + eps)
                       : (double)(1.0f / sqrtf((float)(squares / (double)hidden) + (float)eps));
      pmp_store_from_f64(rstd->dtype_id, rstd->data + r * pmp_dtype_size(rstd->dtype_id), inv);
      char *out = y->data + r * hidden * es;
      for (int64_t k = 0; k < hidden; k++) {
        double v = round_to(dt, row[k] * inv);
        if (w) v = weight[k] * v;
        pmp_store_from_f64(dt, out + k * es, v);
      }
    }
    free(row);
  }
  return 0;
}

/* Rows [lo, hi) of dx, and their share of dw, in double with the generic path's operations: the row's
 * dot product mean((dy * w) * xhat), then dx = rstd * (g - xhat * dot) with g = dy * w. */
static inline __attribute__((always_inline)) void rms_backward_rows(const char *x, const char *dy, const double *w,
                                                                    const float *rstd, char *dx, double *dw,
                                                                    int64_t hidden, int64_t lo, int64_t hi, bool bf16) {
  int64_t row_bytes = hidden * (bf16 ? 2 : 4);
  for (int64_t r = lo; r < hi; r++) {
    const char *xr = x + r * row_bytes, *dyr = dy + r * row_bytes;
    double inv = rstd[r], dot = rms_row_dot(xr, dyr, w, inv, dw, hidden, bf16) / (double)hidden;
#pragma omp simd
    for (int64_t k = 0; k < hidden; k++) {
      double xhat = (double)load_float(xr, k, bf16) * inv, g = (double)load_float(dyr, k, bf16) * w[k];
      store_float(dx + r * row_bytes, k, (float)(inv * (g - xhat * dot)), bf16);
    }
  }
}

WIDE_VECTORS static void rms_backward_f32(const char *x, const char *dy, const double *w, const float *rstd, char *dx,
                                          double *dw, int64_t hidden, int64_t lo, int64_t hi) {
  rms_backward_rows(x, dy, w, rstd, dx, dw, hidden, lo, hi, false);
}

WIDE_VECTORS static void rms_backward_bf16(const char *x, const char *dy, const double *w, const float *rstd, char *dx,
                                           double *dw, int64_t hidden, int64_t lo, int64_t hi) {
  rms_backward_rows(x, dy, w, rstd, dx, dw, hidden, lo, hi, true);
}

/* f32/bf16 with an f32 rstd. dw sums over the rows each thread takes from the same static schedule as the
 * generic path, so its partial sums and their total are the same. */
static int rms_norm_backward_fast(const pmp_op_args *a, int threads, double *dw_parts, double *weight) {
  const pmp_tensor *x = a->in[0], *rstd = a->in[2], *dy = a->in[3];
  int64_t rows = a->i[0], hidden = a->i[1];
#pragma omp parallel num_threads(threads) if (rows * hidden >= PMP_PARALLEL_THRESHOLD)
  {
    int64_t lo, hi;
    pmp_thread_share(rows, &lo, &hi);
    (x->dtype_id == PMP_BF16 ? rms_backward_bf16 : rms_backward_f32)(
        x->data, dy->data, weight, (const float *)rstd->data, a->out->data,
        dw_parts ? dw_parts + omp_get_thread_num() * hidden : NULL, hidden, lo, hi);
  }
  return 0;
}

/* dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w;  dw = sum over rows of dy * xhat. */
int pmp_cpu_rms_norm_backward(const pmp_op_args *a) {
  const pmp_tensor *x = a->in[0], *w = a->in[1], *rstd = a->in[2], *dy = a->in[3];
  pmp_tensor *dx = a->out, *dw = a->out2;
  int64_t rows = a->i[0], hidden = a->i[1];
  int dt = x->dtype_id, es = pmp_dtype_size(dt), gdt = dy->dtype_id, ges = pmp_dtype_size(gdt);
  int threads = omp_get_max_threads();
  bool fast = (dt == PMP_F32 || dt == PMP_BF16) && gdt == dt && rstd->dtype_id == PMP_F32;
  /* the fast path's weight in double, ones without a weight (multiplying by 1 changes nothing) */
  size_t extra = fast ? (size_t)hidden : 0;
  double *dw_parts = dw || fast ? calloc((size_t)(threads * hidden) + extra + 1, sizeof(double)) : NULL;
  if ((dw || fast) && !dw_parts) return pmp_fail_code("rms_norm backward: out of memory");
  if (fast) {
    double *weight = dw_parts + threads * hidden;
    if (w) load_row(weight, w->data, dt, hidden);
    else
      for (int64_t k = 0; k < hidden; k++) weight[k] = 1.0;
    rms_norm_backward_fast(a, threads, dw ? dw_parts : NULL, weight);
  } else {
#pragma omp parallel num_threads(threads) if (rows * hidden >= PMP_PARALLEL_THRESHOLD)
    {
      double *buf = malloc(sizeof(double) * (size_t)(3 * hidden + 1));
      double *xhat = buf, *g = buf ? buf + hidden : NULL, *weight = buf ? buf + 2 * hidden : NULL;
      double *my_dw = dw ? dw_parts + omp_get_thread_num() * hidden : NULL;
      if (buf && w) load_row(weight, w->data, dt, hidden);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; r++) {
        if (!buf) continue;
        double inv = pmp_load_as_f64(rstd->dtype_id, rstd->data + r * pmp_dtype_size(rstd->dtype_id));
        load_row(xhat, x->data + r * hidden * es, dt, hidden);
        load_row(g, dy->data + r * hidden * ges, gdt, hidden);
        double dot = 0;
        for (int64_t k = 0; k < hidden; k++) {
          xhat[k] *= inv;
          if (my_dw) my_dw[k] += g[k] * xhat[k];
          if (w) g[k] *= weight[k];
          dot += g[k] * xhat[k];
        }
        dot /= (double)hidden;
        char *out = dx->data + r * hidden * es;
        for (int64_t k = 0; k < hidden; k++) pmp_store_from_f64(dt, out + k * es, inv * (g[k] - xhat[k] * dot));
      }
      free(buf);
    }
  }
  if (dw) {
    for (int64_t k = 0; k < hidden; k++) {
      double total = 0;
      for (int t = 0; t < threads; t++) total += dw_parts[t * hidden + k];
      pmp_store_from_f64(dw->dtype_id, dw->data + k * pmp_dtype_size(dw->dtype_id), total);
    }
  }
  free(dw_parts);
  return 0;
}

/* Walks the rows (every index but the last dim's) of views that share x's shape, keeping each view's
 * element offset: x and y may be strided views (q as a transpose of [B, T, H, D] memory) and the tables
 * broadcast ones. The dims go in the order of x's strides, so that x and y (which has x's layout) are read
 * and written in memory order: in index order a transposed view's rows lie far apart and each costs
 * cache misses. */
typedef struct {
  int nd;
  int64_t size[PMP_MAX_DIMS], stride[4][PMP_MAX_DIMS], idx[PMP_MAX_DIMS], off[4];
} row_walk;

static void walk_start(row_walk *w, const pmp_tensor *const t[4], int64_t r) {
  const pmp_tensor *x = t[0];
  int order[PMP_MAX_DIMS];
  w->nd = x->ndim - 1;
  pmp_dims_by_stride(x, order);
  for (int k = 0; k < w->nd; k++) {
    w->size[k] = x->sizes[order[k]];
    for (int j = 0; j < 4; j++) w->stride[j][k] = t[j]->strides[order[k]];
  }
  for (int d = w->nd - 1; d >= 0; d--) {
    w->idx[d] = r % w->size[d];
    r /= w->size[d];
  }
  for (int j = 0; j < 4; j++) {
    w->off[j] = 0;
    for (int d = 0; d < w->nd; d++) w->off[j] += w->idx[d] * w->stride[j][d];
  }
}

static void walk_next(row_walk *w) {
  for (int d = w->nd - 1; d >= 0; d--) {
    for (int j = 0; j < 4; j++) w->off[j] += w->stride[j][d];
    if (++w->idx[d] < w->size[d]) return;
    for (int j = 0; j < 4; j++) w->off[j] -= w->idx[d] * w->stride[j][d];
    w->idx[d] = 0;
  }
}

/* The rotate-half layout in f32 with contiguous tables, as straight loops the compiler vectorizes. */
static inline __attribute__((always_inline)) void rope_half_row_f32(const float *x, float *y, const float *c,
                                                                    const float *s, int64_t half, bool transpose) {
  const float *x1 = x, *x2 = x + half, *c1 = c, *c2 = c + half, *s1 = s, *s2 = s + half;
  float *y1 = y, *y2 = y + half;
  if (transpose) {
#pragma omp simd
    for (int64_t p = 0; p < half; p++) {
      y1[p] = x1[p] * c1[p] + x2[p] * s2[p];
      y2[p] = x2[p] * c2[p] - x1[p] * s1[p];
    }
  } else {
#pragma omp simd
    for (int64_t p = 0; p < half; p++) {
      y1[p] = x1[p] * c1[p] - x2[p] * s1[p];
      y2[p] = x2[p] * c2[p] + x1[p] * s2[p];
    }
  }
}

static inline __attribute__((always_inline)) double round_bf16(double v) {
  return bf16_bits_to_f32(f32_to_bf16_bits((float)v));
}

/* The rotate-half layout for bf16 x with contiguous f32 or bf16 tables, in double with the generic path's
 * operations and rounding points, so results are the same bits. */
static inline __attribute__((always_inline)) void rope_half_row_bf16(const uint16_t *x, uint16_t *y, const void *c,
                                                                     const void *s, int64_t half, bool transpose,
                                                                     bool bf16_tables) {
  if (transpose) {
#pragma omp simd
    for (int64_t p = 0; p < half; p++) {
      double x1 = bf16_bits_to_f32(x[p]), x2 = bf16_bits_to_f32(x[p + half]);
      double c1 = load_float(c, p, bf16_tables), c2 = load_float(c, p + half, bf16_tables);
      double s1 = load_float(s, p, bf16_tables), s2 = load_float(s, p + half, bf16_tables);
      y[p] = f32_to_bf16_bits((float)(x1 * c1 + x2 * s2));
      y[p + half] = f32_to_bf16_bits((float)(x2 * c2 - x1 * s1));
    }
  } else {
    /* HF: (x * cos) + (rotate_half(x) * sin), each product rounded to the activation dtype. In f32, which
     * gives the generic path's bits: a bf16 times an f32 is exact in double, so rounding it to f32 is the
     * f32 product; two bf16 values' sum is exact in double or far below f32's half ulp of the larger. */
#pragma omp simd
    for (int64_t p = 0; p < half; p++) {
      float x1 = bf16_bits_to_f32(x[p]), x2 = bf16_bits_to_f32(x[p + half]);
      float c1 = load_float(c, p, bf16_tables), c2 = load_float(c, p + half, bf16_tables);
      float s1 = load_float(s, p, bf16_tables), s2 = load_float(s, p + half, bf16_tables);
      y[p] = f32_to_bf16_bits(bf16_bits_to_f32(f32_to_bf16_bits(x1 * c1)) + bf16_bits_to_f32(f32_to_bf16_bits(-x2 * s1)));
      y[p + half] = f32_to_bf16_bits(bf16_bits_to_f32(f32_to_bf16_bits(x2 * c2)) + bf16_bits_to_f32(f32_to_bf16_bits(x1 * s2)));
    }
  }
}

/* The rotate-half rows [first, end) of a fast case (f32, or bf16 with f32 or bf16 tables), walked in one
 * call per thread so that the rows (often short: one head) cost no call each. */
enum rope_kind { ROPE_F32, ROPE_BF16_F32_TABLES, ROPE_BF16_BF16_TABLES };

static inline __attribute__((always_inline)) void rope_half_rows(const pmp_tensor *x, pmp_tensor *y,
                                                                 const pmp_tensor *cs, const pmp_tensor *sn,
                                                                 int64_t first, int64_t end, bool transpose,
                                                                 enum rope_kind kind) {
  int es = kind == ROPE_F32 ? 4 : 2, tes = kind == ROPE_BF16_BF16_TABLES ? 2 : 4;
  int64_t dim = x->sizes[x->ndim - 1], rotary = cs->sizes[cs->ndim - 1], half = rotary / 2;
  row_walk walk;
  walk_start(&walk, (const pmp_tensor *const[4]){x, y, cs, sn}, first);
  for (int64_t r = first; r < end; r++, walk_next(&walk)) {
    const char *xr = x->data + walk.off[0] * es;
    char *yr = y->data + walk.off[1] * es;
    const char *cr = cs->data + walk.off[2] * tes, *sr = sn->data + walk.off[3] * tes;
    if (rotary < dim) memcpy(yr + rotary * es, xr + rotary * es, (size_t)((dim - rotary) * es));
    if (kind == ROPE_F32)
      rope_half_row_f32((const float *)xr, (float *)yr, (const float *)cr, (const float *)sr, half, transpose);
    else
      rope_half_row_bf16((const uint16_t *)xr, (uint16_t *)yr, cr, sr, half, transpose, kind == ROPE_BF16_BF16_TABLES);
  }
}

WIDE_VECTORS static void rope_half_rows_f32(const pmp_tensor *x, pmp_tensor *y, const pmp_tensor *cs,
                                            const pmp_tensor *sn, int64_t first, int64_t end, bool transpose) {
  rope_half_rows(x, y, cs, sn, first, end, transpose, ROPE_F32);
}

WIDE_VECTORS static void rope_half_rows_bf16_f32_tables(const pmp_tensor *x, pmp_tensor *y, const pmp_tensor *cs,
                                                        const pmp_tensor *sn, int64_t first, int64_t end,
                                                        bool transpose) {
  rope_half_rows(x, y, cs, sn, first, end, transpose, ROPE_BF16_F32_TABLES);
}

WIDE_VECTORS static void rope_half_rows_bf16_bf16_tables(const pmp_tensor *x, pmp_tensor *y, const pmp_tensor *cs,
                                                         const pmp_tensor *sn, int64_t first, int64_t end,
                                                         bool transpose) {
  rope_half_rows(x, y, cs, sn, first, end, transpose, ROPE_BF16_BF16_TABLES);
}

/* Rotates pairs (i, j): forward y_i = x_i c_i - x_j s_i, y_j = x_j c_j + x_i s_j; the transpose (for the
 * gradient) y_i = x_i c_i + x_j s_j, y_j = x_j c_j - x_i s_i. Pairs are (k, k + R/2) or (2k, 2k + 1). The last
 * dims of x and y are contiguous; their other dims may have any strides. */
int pmp_cpu_rope(const pmp_op_args *a) {
  const pmp_tensor *x = a->in[0], *cs = a->in[1], *sn = a->in[2];
  pmp_tensor *y = a->out;
  bool interleaved = a->i[0], transpose = a->i[1];
  int dt = x->dtype_id, es = pmp_dtype_size(dt);
  int64_t dim = x->sizes[x->ndim - 1], rotary = cs->sizes[cs->ndim - 1], half = rotary / 2;
  int64_t rows = dim ? pmp_numel(x) / dim : 0;
  int64_t cstride = cs->strides[cs->ndim - 1], sstride = sn->strides[sn->ndim - 1];
  int ces = pmp_dtype_size(cs->dtype_id), ses = pmp_dtype_size(sn->dtype_id);
  bool round_products = low_precision(dt) && !transpose;
  bool tables_dense = cstride == 1 && sstride == 1 && cs->dtype_id == sn->dtype_id;
  bool f32 = dt == PMP_F32 && cs->dtype_id == PMP_F32 && tables_dense;
  bool bf16 = dt == PMP_BF16 && !interleaved && tables_dense && (cs->dtype_id == PMP_F32 || cs->dtype_id == PMP_BF16);
  void (*half_rows)(const pmp_tensor *, pmp_tensor *, const pmp_tensor *, const pmp_tensor *, int64_t, int64_t, bool) =
      bf16 ? (cs->dtype_id == PMP_BF16 ? rope_half_rows_bf16_bf16_tables : rope_half_rows_bf16_f32_tables)
      : f32 && !interleaved ? rope_half_rows_f32 : NULL;
#pragma omp parallel if (rows * dim >= PMP_PARALLEL_THRESHOLD)
  {
    int threads = omp_get_num_threads(), me = omp_get_thread_num();
    int64_t first = rows * me / threads, end = rows * (me + 1) / threads;
    if (half_rows) {
      if (first < end) half_rows(x, y, cs, sn, first, end, transpose);
      first = end;
    }
    row_walk walk;
    if (first < end) walk_start(&walk, (const pmp_tensor *const[4]){x, y, cs, sn}, first);
    for (int64_t r = first; r < end; r++, walk_next(&walk)) {
      const char *xr = x->data + walk.off[0] * es;
      char *yr = y->data + walk.off[1] * es;
      const char *cr = cs->data + walk.off[2] * ces, *sr = sn->data + walk.off[3] * ses;
      if (rotary < dim) memcpy(yr + rotary * es, xr + rotary * es, (size_t)((dim - rotary) * es));
      if (f32) {
        const float *xf = (const float *)xr, *c = (const float *)cr, *sv = (const float *)sr;
        float *yf = (float *)yr;
        for (int64_t p = 0; p < half; p++) {
          float xi = xf[2 * p], xj = xf[2 * p + 1];
          yf[2 * p] = transpose ? xi * c[2 * p] + xj * sv[2 * p + 1] : xi * c[2 * p] - xj * sv[2 * p];
          yf[2 * p + 1] = transpose ? xj * c[2 * p + 1] - xi * sv[2 * p] : xj * c[2 * p + 1] + xi * sv[2 * p + 1];
        }
        continue;
      }
      for (int64_t p = 0; p < half; p++) {
        int64_t i = interleaved ? 2 * p : p, j = interleaved ? 2 * p + 1 : p + half;
        double xi = pmp_load_as_f64(dt, xr + i * es), xj = pmp_load_as_f64(dt, xr + j * es);
        double ci = pmp_load_as_f64(cs->dtype_id, cr + i * cstride * ces), cj = pmp_load_as_f64(cs->dtype_id, cr + j * cstride * ces);
        double si = pmp_load_as_f64(sn->dtype_id, sr + i * sstride * ses), sj = pmp_load_as_f64(sn->dtype_id, sr + j * sstride * ses);
        double yi, yj;
        if (transpose) {
          yi = xi * ci + xj * sj;
          yj = xj * cj - xi * si;
        } else if (round_products) {
          /* HF: (x * cos) + (rotate_half(x) * sin), each product rounded to the activation dtype */
          yi = round_to(dt, xi * ci) + round_to(dt, -xj * si);
          yj = round_to(dt, xj * cj) + round_to(dt, xi * sj);
        } else {
          yi = xi * ci - xj * si;
          yj = xj * cj + xi * sj;
        }
        pmp_store_from_f64(dt, yr + i * es, yi);
        pmp_store_from_f64(dt, yr + j * es, yj);
      }
    }
  }
  return 0;
}

static double silu(double v) { return v / (1.0 + exp(-v)); }

WIDE_VECTORS static void swiglu_row_f32(const float *gate, const float *up, float *out, int64_t width) {
#pragma omp simd
  for (int64_t k = 0; k < width; k++) out[k] = gate[k] / (1.0f + expf(-gate[k])) * up[k];
}

/* bf16 rows go through f32 chunks so that the expf loop is the f32 one, which vectorizes (libmvec);
 * a loop mixing expf with the bf16 bit conversions stays scalar. */
enum { SWIGLU_CHUNK = 256 };

/* bf16: silu(gate) in f32 rounded to bf16, times up, rounded again, as PyTorch's bf16 modules do */
WIDE_VECTORS static void swiglu_row_bf16(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t width) {
  float g[SWIGLU_CHUNK], activated[SWIGLU_CHUNK];
  for (int64_t start = 0; start < width; start += SWIGLU_CHUNK) {
    int64_t n = width - start < SWIGLU_CHUNK ? width - start : SWIGLU_CHUNK;
#pragma omp simd
    for (int64_t k = 0; k < n; k++) g[k] = bf16_bits_to_f32(gate[start + k]);
#pragma omp simd
    for (int64_t k = 0; k < n; k++) activated[k] = g[k] / (1.0f + expf(-g[k]));
#pragma omp simd
    for (int64_t k = 0; k < n; k++)
      out[start + k] = f32_to_bf16_bits(bf16_bits_to_f32(f32_to_bf16_bits(activated[k])) * bf16_bits_to_f32(up[start + k]));
  }
}

WIDE_VECTORS static void swiglu_backward_row_bf16(const uint16_t *gate, const uint16_t *up, const uint16_t *g,
                                                  uint16_t *dgate, uint16_t *dup, int64_t width) {
  float v[SWIGLU_CHUNK], s[SWIGLU_CHUNK];
  for (int64_t start = 0; start < width; start += SWIGLU_CHUNK) {
    int64_t n = width - start < SWIGLU_CHUNK ? width - start : SWIGLU_CHUNK;
#pragma omp simd
    for (int64_t k = 0; k < n; k++) v[k] = bf16_bits_to_f32(gate[start + k]);
#pragma omp simd
    for (int64_t k = 0; k < n; k++) s[k] = 1.0f / (1.0f + expf(-v[k]));
#pragma omp simd
    for (int64_t k = 0; k < n; k++) {
      float u = bf16_bits_to_f32(up[start + k]), grad = bf16_bits_to_f32(g[start + k]);
      dgate[start + k] = f32_to_bf16_bits(grad * u * s[k] * (1.0f + v[k] * (1.0f - s[k])));
      dup[start + k] = f32_to_bf16_bits(grad * v[k] * s[k]);
    }
  }
}

WIDE_VECTORS static void swiglu_backward_row_f32(const float *gate, const float *up, const float *g, float *dgate,
                                                 float *dup, int64_t width) {
#pragma omp simd
  for (int64_t k = 0; k < width; k++) {
    float s = 1.0f / (1.0f + expf(-gate[k]));
    dgate[k] = g[k] * up[k] * s * (1.0f + gate[k] * (1.0f - s));
    dup[k] = g[k] * gate[k] * s;
  }
}

int pmp_cpu_swiglu(const pmp_op_args *a) {
  const pmp_tensor *x = a->in[0];
  pmp_tensor *y = a->out;
  int dt = x->dtype_id, es = pmp_dtype_size(dt);
  int64_t width = y->sizes[y->ndim - 1], rows = width ? pmp_numel(y) / width : 0;
  if (dt == PMP_F32) {
#pragma omp parallel for if (rows * width >= PMP_PARALLEL_THRESHOLD) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const float *gate = (const float *)x->data + r * 2 * width;
      swiglu_row_f32(gate, gate + width, (float *)y->data + r * width, width);
    }
    return 0;
  }
  if (dt == PMP_BF16) {
#pragma omp parallel for if (rows * width >= PMP_PARALLEL_THRESHOLD) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const uint16_t *gate = (const uint16_t *)x->data + r * 2 * width;
      swiglu_row_bf16(gate, gate + width, (uint16_t *)y->data + r * width, width);
    }
    return 0;
  }
#pragma omp parallel for if (rows * width >= PMP_PARALLEL_THRESHOLD) schedule(static)
  for (int64_t r = 0; r < rows; r++) {
    const char *gate = x->data + r * 2 * width * es, *up = gate + width * es;
    char *out = y->data + r * width * es;
    for (int64_t k = 0; k < width; k++) {
      double activated = round_to(dt, silu(pmp_load_as_f64(dt, gate + k * es)));
      pmp_store_from_f64(dt, out + k * es, activated * pmp_load_as_f64(dt, up + k * es));
    }
  }
  return 0;
}

/* d gate = dy * up * silu'(gate), d up = dy * silu(gate), silu'(v) = s (1 + v (1 - s)) with s = sigmoid(v). */
int pmp_cpu_swiglu_backward(const pmp_op_args *a) {
  const pmp_tensor *x = a->in[0], *dy = a->in[1];
  pmp_tensor *dx = a->out;
  int dt = x->dtype_id, es = pmp_dtype_size(dt), ges = pmp_dtype_size(dy->dtype_id);
  int64_t width = dy->sizes[dy->ndim - 1], rows = width ? pmp_numel(dy) / width : 0;
  if (dt == PMP_F32 && dy->dtype_id == PMP_F32) {
#pragma omp parallel for if (rows * width >= PMP_PARALLEL_THRESHOLD) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const float *gate = (const float *)x->data + r * 2 * width, *up = gate + width;
      float *dgate = (float *)dx->data + r * 2 * width;
      swiglu_backward_row_f32(gate, up, (const float *)dy->data + r * width, dgate, dgate + width, width);
    }
    return 0;
  }
  if (dt == PMP_BF16 && dy->dtype_id == PMP_BF16) {
#pragma omp parallel for if (rows * width >= PMP_PARALLEL_THRESHOLD) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const uint16_t *gate = (const uint16_t *)x->data + r * 2 * width;
      uint16_t *dgate = (uint16_t *)dx->data + r * 2 * width;
      swiglu_backward_row_bf16(gate, gate + width, (const uint16_t *)dy->data + r * width, dgate, dgate + width, width);
    }
    return 0;
  }
#pragma omp parallel for if (rows * width >= PMP_PARALLEL_THRESHOLD) schedule(static)
  for (int64_t r = 0; r < rows; r++) {
    const char *gate = x->data + r * 2 * width * es, *up = gate + width * es;
    const char *g = dy->data + r * width * ges;
    char *dgate = dx->data + r * 2 * width * es, *dup = dgate + width * es;
    for (int64_t k = 0; k < width; k++) {
      double v = pmp_load_as_f64(dt, gate + k * es), u = pmp_load_as_f64(dt, up + k * es);
      double grad = pmp_load_as_f64(dy->dtype_id, g + k * ges);
      double s = 1.0 / (1.0 + exp(-v));
      pmp_store_from_f64(dt, dgate + k * es, grad * u * s * (1.0 + v * (1.0 - s)));
      pmp_store_from_f64(dt, dup + k * es, grad * v * s);
    }
  }
  return 0;
}
