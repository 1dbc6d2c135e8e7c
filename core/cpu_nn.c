/* CPU kernels: softmax / log-softmax and softmax cross-entropy, computed in f32 (f64 for f64). */
#include "internal.h"
#include <math.h>

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

int pmp_cpu_cross_entropy(const pmp_op_args *a) {
  const pmp_tensor *x = a->in[0], *targets = a->in[1];
  pmp_tensor *loss = a->out;
  int64_t rows = x->sizes[0], classes = x->sizes[1], ignore = a->i[0];
  int es = pmp_dtype_size(x->dtype_id);
  for (int64_t r = 0; r < rows; r++) {
    int64_t t;
    if (!target_of(targets, r, classes, ignore, &t)) return -1;
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
