/* CPU kernels: softmax / log-softmax and softmax cross-entropy, computed in f32 (f64 for f64). */
#include "internal.h"
#include "cpu/vector_math.h"
#include <math.h>
#include <omp.h>

/* One softmax row of n values spaced `stride` apart, read and written as doubles. */
static void softmax_row(const pmp_tensor *x, pmp_tensor *y, int64_t base, int64_t n, int64_t stride, bool log_space) {
  int es = pmp_dtype_size(x->dtype_id);
  double peak = -INFINITY;
  for (int64_t k = 0; k < n; k++) {
    double v = pmp_load_as_f64(x->dtype_id, x->data + (base + k * stride) * es);
    if (v > peak || v != v) peak = v;
  }
  double total = 0;
  for (int64_t k = 0; k < n; k++) total += exp(pmp_load_as_f64(x->dtype_id, x->data + (base + k * stride) * es) - peak);
  double log_total = log(total);
  for (int64_t k = 0; k < n; k++) {
    double shifted = pmp_load_as_f64(x->dtype_id, x->data + (base + k * stride) * es) - peak;
    pmp_store_from_f64(y->dtype_id, y->data + (base + k * stride) * es, log_space ? shifted - log_total : exp(shifted) / total);
  }
}

/* The common case: f32 rows, contiguous. */
static void softmax_row_f32(const float *x, float *y, int64_t n, bool log_space) {
  float peak = -INFINITY;
  for (int64_t k = 0; k < n; k++) peak = x[k] > peak || x[k] != x[k] ? x[k] : peak;
  double total = 0;
  for (int64_t k = 0; k < n; k++) total += expf(x[k] - peak);
  if (log_space) {
    float log_total = (float)log(total);
    for (int64_t k = 0; k < n; k++) y[k] = x[k] - peak - log_total;
  } else {
    float inv = (float)(1.0 / total);
    for (int64_t k = 0; k < n; k++) y[k] = expf(x[k] - peak) * inv;
  }
}

int pmp_cpu_softmax(const pmp_op_args *a) {
  const pmp_tensor *x = a->in[0];
  pmp_tensor *y = a->out;
  int64_t outer = a->i[0], n = a->i[1], inner = a->i[2];
  bool log_space = a->op == PMP_OP_LOG_SOFTMAX;
#pragma omp parallel for if (outer * n * inner >= PMP_PARALLEL_THRESHOLD) collapse(2)
  for (int64_t o = 0; o < outer; o++)
    for (int64_t i = 0; i < inner; i++) {
      int64_t base = o * n * inner + i;
      if (inner == 1 && x->dtype_id == PMP_F32)
        softmax_row_f32((const float *)x->data + base, (float *)y->data + base, n, log_space);
      else
        softmax_row(x, y, base, n, inner, log_space);
    }
  return 0;
}

static double row_logsumexp(const pmp_tensor *x, int64_t row, int64_t classes) {
  if (x->dtype_id == PMP_F32) {
    const float *v = (const float *)x->data + row * classes;
    float peak = -INFINITY;
    for (int64_t c = 0; c < classes; c++) peak = v[c] > peak || v[c] != v[c] ? v[c] : peak;
    double total = 0;
    for (int64_t c = 0; c < classes; c++) total += expf(v[c] - peak);
    return peak + log(total);
  }
  int es = pmp_dtype_size(x->dtype_id);
  const char *base = x->data + row * classes * es;
  double peak = -INFINITY, total = 0;
  for (int64_t c = 0; c < classes; c++) {
    double v = pmp_load_as_f64(x->dtype_id, base + c * es);
    if (v > peak || v != v) peak = v;
  }
  for (int64_t c = 0; c < classes; c++) total += exp(pmp_load_as_f64(x->dtype_id, base + c * es) - peak);
  return peak + log(total);
}

static bool target_of(const pmp_tensor *targets, int64_t row, int64_t classes, int64_t ignore, int64_t *target) {
  *target = pmp_load_as_i64(targets->dtype_id, targets->data + row * pmp_dtype_size(targets->dtype_id));
  if (*target == ignore) return true;
  if (*target < 0 || *target >= classes) {
    pmp_fail("cross_entropy: target %lld in row %lld is out of range for %lld classes", (long long)*target,
             (long long)row + 1, (long long)classes);
    return false;
  }
  return true;
}

/* f32 and bf16 logits: each row's exponentials go through an f32 buffer, so the expf loop is a vector
 * one, and the row's sum is CE_LANES interleaved double partial sums added in lane order (independent of
 * the thread count). `bf16` is a constant in each caller. */
enum { CE_CHUNK = 512, CE_LANES = 16 };

static inline float ce_load(const void *row, int64_t k, bool bf16) {
  return bf16 ? bf16_bits_to_f32(((const uint16_t *)row)[k]) : ((const float *)row)[k];
}

/* The row's maximum; a NaN anywhere makes it NaN. */
static inline __attribute__((always_inline)) float ce_peak(const void *row, int64_t n, bool bf16) {
  float lane[CE_LANES];
  for (int j = 0; j < CE_LANES; j++) lane[j] = -INFINITY;
  int64_t k = 0;
  for (; k + CE_LANES <= n; k += CE_LANES) {
#pragma omp simd
    for (int j = 0; j < CE_LANES; j++) {
      float v = ce_load(row, k + j, bf16);
      lane[j] = v > lane[j] || v != v ? v : lane[j];
    }
  }
  float peak = -INFINITY;
  for (; k < n; k++) {
    float v = ce_load(row, k, bf16);
    peak = v > peak || v != v ? v : peak;
  }
  for (int j = 0; j < CE_LANES; j++) peak = lane[j] > peak || lane[j] != lane[j] ? lane[j] : peak;
  return peak;
}

static inline __attribute__((always_inline)) double ce_logsumexp(const void *row, int64_t n, bool bf16) {
  float peak = ce_peak(row, n, bf16), e[CE_CHUNK];
  double acc[CE_LANES] = {0};
  for (int64_t start = 0; start < n; start += CE_CHUNK) {
    int64_t len = n - start < CE_CHUNK ? n - start : CE_CHUNK, k = 0;
#pragma omp simd
    for (int64_t i = 0; i < len; i++) e[i] = expf(ce_load(row, start + i, bf16) - peak);
    for (; k + CE_LANES <= len; k += CE_LANES) {
#pragma omp simd
      for (int j = 0; j < CE_LANES; j++) acc[j] += e[k + j];
    }
    for (int j = 0; k + j < len; j++) acc[j] += e[k + j];
  }
  double total = 0;
  for (int j = 0; j < CE_LANES; j++) total += acc[j];
  return peak + log(total);
}

/* loss[r] = logsumexp(x[r]) - x[r][t] (0 for ignored rows) for rows [lo, hi). */
static inline __attribute__((always_inline)) void ce_forward_rows(const void *x, const pmp_tensor *targets,
                                                                  void *loss, int64_t classes, int64_t ignore,
                                                                  int64_t lo, int64_t hi, bool bf16) {
  for (int64_t r = lo; r < hi; r++) {
    int64_t t = pmp_load_as_i64(targets->dtype_id, targets->data + r * pmp_dtype_size(targets->dtype_id));
    const char *row = (const char *)x + r * classes * (bf16 ? 2 : 4);
    double value = t == ignore ? 0.0 : ce_logsumexp(row, classes, bf16) - (double)ce_load(row, t, bf16);
    pmp_store_from_f64(bf16 ? PMP_BF16 : PMP_F32, (char *)loss + r * (bf16 ? 2 : 4), value);
  }
}

WIDE_VECTORS static void ce_forward_f32(const void *x, const pmp_tensor *targets, void *loss, int64_t classes,
                                        int64_t ignore, int64_t lo, int64_t hi) {
  ce_forward_rows(x, targets, loss, classes, ignore, lo, hi, false);
}

WIDE_VECTORS static void ce_forward_bf16(const void *x, const pmp_tensor *targets, void *loss, int64_t classes,
                                         int64_t ignore, int64_t lo, int64_t hi) {
  ce_forward_rows(x, targets, loss, classes, ignore, lo, hi, true);
}

/* dx[r] = g[r] * (softmax(x[r]) - onehot(t)) in f32 for rows [lo, hi); bf16 rounds the f32 result. */
static inline __attribute__((always_inline)) void ce_backward_rows(const void *x, const pmp_tensor *targets,
                                                                   const pmp_tensor *g, void *dx, int64_t classes,
                                                                   int64_t ignore, int64_t lo, int64_t hi, bool bf16) {
  float d[CE_CHUNK];
  int es = bf16 ? 2 : 4;
  for (int64_t r = lo; r < hi; r++) {
    int64_t t = pmp_load_as_i64(targets->dtype_id, targets->data + r * pmp_dtype_size(targets->dtype_id));
    double scale = t == ignore ? 0.0 : pmp_load_as_f64(g->dtype_id, g->data + r * es);
    const char *row = (const char *)x + r * classes * es;
    char *out = (char *)dx + r * classes * es;
    float fscale = (float)scale, flse = scale == 0 ? 0.0f : (float)ce_logsumexp(row, classes, bf16);
    for (int64_t start = 0; start < classes; start += CE_CHUNK) {
      int64_t len = classes - start < CE_CHUNK ? classes - start : CE_CHUNK;
      if (scale == 0) {
        memset(d, 0, sizeof(float) * (size_t)len);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < len; i++) d[i] = fscale * expf(ce_load(row, start + i, bf16) - flse);
        if (t >= start && t < start + len) d[t - start] -= fscale;
      }
      if (bf16) {
#pragma omp simd
        for (int64_t i = 0; i < len; i++) ((uint16_t *)out)[start + i] = f32_to_bf16_bits(d[i]);
      } else {
        memcpy(out + start * es, d, sizeof(float) * (size_t)len);
      }
    }
  }
}

WIDE_VECTORS static void ce_backward_f32(const void *x, const pmp_tensor *targets, const pmp_tensor *g, void *dx,
                                         int64_t classes, int64_t ignore, int64_t lo, int64_t hi) {
  ce_backward_rows(x, targets, g, dx, classes, ignore, lo, hi, false);
}

WIDE_VECTORS static void ce_backward_bf16(const void *x, const pmp_tensor *targets, const pmp_tensor *g, void *dx,
                                          int64_t classes, int64_t ignore, int64_t lo, int64_t hi) {
  ce_backward_rows(x, targets, g, dx, classes, ignore, lo, hi, true);
}

static bool ce_fast(const pmp_tensor *x, const pmp_tensor *other) {
  return (x->dtype_id == PMP_F32 || x->dtype_id == PMP_BF16) && other->dtype_id == x->dtype_id;
}

int pmp_cpu_cross_entropy(const pmp_op_args *a) {
  const pmp_tensor *x = a->in[0], *targets = a->in[1];
  pmp_tensor *loss = a->out;
  int64_t rows = x->sizes[0], classes = x->sizes[1], ignore = a->i[0];
  int es = pmp_dtype_size(x->dtype_id);
  for (int64_t r = 0; r < rows; r++) {
    int64_t t;
    if (!target_of(targets, r, classes, ignore, &t)) return -1;
  }
  if (ce_fast(x, loss)) {
#pragma omp parallel if (rows * classes >= PMP_PARALLEL_THRESHOLD)
    {
      int64_t lo, hi;
      pmp_thread_share(rows, &lo, &hi);
      (x->dtype_id == PMP_BF16 ? ce_forward_bf16 : ce_forward_f32)(x->data, targets, loss->data, classes, ignore, lo, hi);
    }
    return 0;
  }
#pragma omp parallel for if (rows * classes >= PMP_PARALLEL_THRESHOLD)
  for (int64_t r = 0; r < rows; r++) {
    int64_t t;
    target_of(targets, r, classes, ignore, &t);
    double value = t == ignore ? 0.0 : row_logsumexp(x, r, classes) - pmp_load_as_f64(x->dtype_id, x->data + (r * classes + t) * es);
    pmp_store_from_f64(loss->dtype_id, loss->data + r * es, value);
  }
  return 0;
}

int pmp_cpu_cross_entropy_backward(const pmp_op_args *a) {
  const pmp_tensor *x = a->in[0], *targets = a->in[1], *g = a->in[2];
  pmp_tensor *dx = a->out;
  int64_t rows = x->sizes[0], classes = x->sizes[1], ignore = a->i[0];
  int es = pmp_dtype_size(x->dtype_id);
  if (ce_fast(x, dx) && g->dtype_id == x->dtype_id) {
#pragma omp parallel if (rows * classes >= PMP_PARALLEL_THRESHOLD)
    {
      int64_t lo, hi;
      pmp_thread_share(rows, &lo, &hi);
      (x->dtype_id == PMP_BF16 ? ce_backward_bf16 : ce_backward_f32)(x->data, targets, g, dx->data, classes, ignore, lo, hi);
    }
    return 0;
  }
#pragma omp parallel for if (rows * classes >= PMP_PARALLEL_THRESHOLD)
  for (int64_t r = 0; r < rows; r++) {
    int64_t t;
    target_of(targets, r, classes, ignore, &t); /* validated by the forward pass */
    double scale = t == ignore ? 0.0 : pmp_load_as_f64(g->dtype_id, g->data + r * es);
    double lse = t == ignore ? 0.0 : row_logsumexp(x, r, classes);
    if (x->dtype_id == PMP_F32 && dx->dtype_id == PMP_F32) {
      const float *v = (const float *)x->data + r * classes;
      float *d = (float *)dx->data + r * classes, fscale = (float)scale, flse = (float)lse;
      for (int64_t c = 0; c < classes; c++) d[c] = scale == 0 ? 0.0f : fscale * expf(v[c] - flse);
      if (scale != 0) d[t] -= fscale;
      continue;
    }
    for (int64_t c = 0; c < classes; c++) {
      double p = scale == 0 ? 0 : exp(pmp_load_as_f64(x->dtype_id, x->data + (r * classes + c) * es) - lse);
      pmp_store_from_f64(dx->dtype_id, dx->data + (r * classes + c) * es, scale * (p - (c == t ? 1.0 : 0.0)));
    }
  }
  return 0;
}
