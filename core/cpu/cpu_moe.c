/* CPU kernels of the mixture-of-experts ops (core/ops/ops_moe.c). The grouped GEMM runs one GEMM per
 * expert on views of the sorted rows, so each expert's tokens are one large product whatever their
 * count, and empty experts cost nothing. */
#include "internal.h"

/* A 2-D view header on the stack (never retained or released): rows [start, start + count) of t. */
static pmp_tensor rows_of(const pmp_tensor *t, int64_t start, int64_t count) {
  pmp_tensor v = *t;
  v.sizes[0] = count;
  v.data = t->data + start * t->strides[0] * pmp_dtype_size(t->dtype_id);
  return v;
}

/* Matrix e of w [E, a, b] as a [a, b] view, or transposed as [b, a]. */
static pmp_tensor matrix_of(const pmp_tensor *w, int64_t e, bool transposed) {
  pmp_tensor v = *w;
  v.ndim = 2;
  v.data = w->data + e * w->strides[0] * pmp_dtype_size(w->dtype_id);
  v.sizes[0] = w->sizes[transposed ? 2 : 1], v.sizes[1] = w->sizes[transposed ? 1 : 2];
  v.strides[0] = w->strides[transposed ? 2 : 1], v.strides[1] = w->strides[transposed ? 1 : 2];
  return v;
}

static int run_matmul(pmp_tensor *out, pmp_tensor *a, pmp_tensor *b) {
  pmp_op_args m = {.op = PMP_OP_MATMUL, .out = out, .in = {a, b}, .nin = 2};
  return pmp_cpu_matmul(&m);
}

/* out [M, N]: rows of expert e = x_e [c_e, K] @ w[e]^T ([K, N]). */
int pmp_cpu_grouped_matmul(const pmp_op_args *a) {
  const pmp_tensor *x = a->in[0], *w = a->in[1];
  const int64_t *counts = (const int64_t *)a->in[2]->data;
  int64_t start = 0;
  for (int64_t e = 0; e < w->sizes[0]; e++) {
    int64_t c = counts[e];
    if (c == 0) continue;
    pmp_tensor xs = rows_of(x, start, c), we = matrix_of(w, e, true), os = rows_of(a->out, start, c);
    if (run_matmul(&os, &xs, &we) != 0) return -1;
    start += c;
  }
  return 0;
}

/* out [E, N, K]: expert e's weight gradient g_e^T [N, c_e] @ x_e [c_e, K]; zero for empty experts. */
int pmp_cpu_grouped_matmul_weight_grad(const pmp_op_args *a) {
  const pmp_tensor *g = a->in[0], *x = a->in[1];
  const int64_t *counts = (const int64_t *)a->in[2]->data;
  pmp_tensor *out = a->out;
  int64_t start = 0, per_expert = out->sizes[1] * out->sizes[2];
  int es = pmp_dtype_size(out->dtype_id);
  for (int64_t e = 0; e < out->sizes[0]; e++) {
    int64_t c = counts[e];
    pmp_tensor oe = matrix_of(out, e, false);
    if (c == 0) {
      memset(oe.data, 0, (size_t)(per_expert * es));
      continue;
    }
    pmp_tensor gs = rows_of(g, start, c), xs = rows_of(x, start, c);
    pmp_tensor gt = gs;   /* g_e transposed: [N, c] */
    gt.sizes[0] = gs.sizes[1], gt.sizes[1] = gs.sizes[0];
    gt.strides[0] = gs.strides[1], gt.strides[1] = gs.strides[0];
    if (run_matmul(&oe, &gt, &xs) != 0) return -1;
    start += c;
  }
  return 0;
}

/* out [T, H] = sum over i with rows[i] = t of probs[i] * y[i]; accumulated in f64, in the order of i. */
int pmp_cpu_moe_unpermute(const pmp_op_args *a) {
  const pmp_tensor *y = a->in[0], *probs = a->in[1], *rows = a->in[2];
  pmp_tensor *out = a->out;
  int64_t n = y->sizes[0], h = y->sizes[1], tokens = out->sizes[0];
  int dtype = y->dtype_id, es = pmp_dtype_size(dtype);
  const int64_t *r = (const int64_t *)rows->data;
  for (int64_t i = 0; i < n; i++)
    if (r[i] < 0 || r[i] >= tokens)
      return pmp_fail_code("moe_unpermute: token row %lld is out of range for %lld tokens", (long long)r[i], (long long)tokens);
  double *acc = calloc((size_t)(tokens * h) + 1, sizeof *acc);
  double *row = malloc(sizeof *row * (size_t)(h + 1));
  if (!acc || !row) {
    free(acc);
    free(row);
    return pmp_fail_code("moe_unpermute: out of memory");
  }
  for (int64_t i = 0; i < n; i++) {
    double p = pmp_load_as_f64(dtype, probs->data + i * es);
    pmp_convert(row, PMP_F64, y->data + i * h * es, dtype, h);
    double *dst = acc + r[i] * h;
    for (int64_t j = 0; j < h; j++) dst[j] += p * row[j];
  }
  pmp_convert(out->data, dtype, acc, PMP_F64, tokens * h);
  free(acc);
  free(row);
  return 0;
}

/* dy[i] = probs[i] * g[rows[i]], dprobs[i] = <g[rows[i]], y[i]>. */
int pmp_cpu_moe_unpermute_backward(const pmp_op_args *a) {
  const pmp_tensor *y = a->in[0], *probs = a->in[1], *rows = a->in[2], *g = a->in[3];
  int64_t n = y->sizes[0], h = y->sizes[1];
  int dtype = y->dtype_id, es = pmp_dtype_size(dtype);
  const int64_t *r = (const int64_t *)rows->data;
  int failed = 0;
#pragma omp parallel if (n * h >= PMP_PARALLEL_THRESHOLD)
  {
    double *gy = malloc(sizeof *gy * (size_t)(2 * h + 1));
    if (!gy) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; i++) {
      if (!gy) continue;
      double *yrow = gy + h;
      double p = pmp_load_as_f64(dtype, probs->data + i * es), dot = 0;
      pmp_convert(gy, PMP_F64, g->data + r[i] * h * es, dtype, h);
      pmp_convert(yrow, PMP_F64, y->data + i * h * es, dtype, h);
      for (int64_t j = 0; j < h; j++) {
        dot += gy[j] * yrow[j];
        gy[j] *= p;
      }
      pmp_convert(a->out->data + i * h * es, dtype, gy, PMP_F64, h);
      pmp_store_from_f64(dtype, a->out2->data + i * es, dot);
    }
    free(gy);
  }
  return failed ? pmp_fail_code("moe_unpermute: out of memory") : 0;
}
