/* CPU reduction kernels over a contiguous [outer, reduced, inner] layout (see ops_reduce.c). */
#include "internal.h"
#include <math.h>

/* Loads row r of a contiguous [.., inner] block as doubles; f32 sums accumulate in double for accuracy. */
static void accumulate_row(double *acc, const char *src, int dtype, int64_t inner) {
  switch (dtype) {
  case PMP_F32: for (int64_t k = 0; k < inner; k++) acc[k] += ((const float *)src)[k]; break;
  case PMP_F64: for (int64_t k = 0; k < inner; k++) acc[k] += ((const double *)src)[k]; break;
  default: {
    int es = pmp_dtype_size(dtype);
    for (int64_t k = 0; k < inner; k++) acc[k] += pmp_load_as_f64(dtype, src + k * es);
  }
  }
}

static double sum_contiguous(const char *src, int dtype, int64_t n) {
  double total = 0;
  if (dtype == PMP_F32) {
    const float *x = (const float *)src;
    /* several partial sums keep the loop vectorizable and the rounding error small */
    double part[8] = {0};
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
      for (int j = 0; j < 8; j++) part[j] += x[k + j];
    for (; k < n; k++) total += x[k];
    for (int j = 0; j < 8; j++) total += part[j];
    return total;
  }
  int es = pmp_dtype_size(dtype);
  for (int64_t k = 0; k < n; k++) total += pmp_load_as_f64(dtype, src + k * es);
  return total;
}

static int64_t sum_integers(const char *src, int dtype, int64_t n, int64_t stride) {
  int es = pmp_dtype_size(dtype);
  int64_t total = 0;
  for (int64_t k = 0; k < n; k++) total += pmp_load_as_i64(dtype, src + k * stride * es);
  return total;
}

int pmp_cpu_reduce(const pmp_op_args *a) {
  const pmp_tensor *x = a->in[0];
  pmp_tensor *y = a->out;
  int64_t outer = a->i[0], reduced = a->i[1], inner = a->i[2];
  int in_es = pmp_dtype_size(x->dtype_id), out_es = pmp_dtype_size(y->dtype_id);
  double scale = a->op == PMP_OP_MEAN ? 1.0 / (double)reduced : 1.0;
  if (!pmp_dtype_is_float(x->dtype_id) && a->op == PMP_OP_SUM) {
#pragma omp parallel for if (outer * reduced * inner >= PMP_PARALLEL_THRESHOLD) collapse(2)
    for (int64_t o = 0; o < outer; o++)
      for (int64_t i = 0; i < inner; i++)
        pmp_store_from_i64(y->dtype_id, y->data + (o * inner + i) * out_es,
                           sum_integers(x->data + (o * reduced * inner + i) * in_es, x->dtype_id, reduced, inner));
    return 0;
  }
  if (inner == 1 && outer == 1 && reduced >= PMP_PARALLEL_THRESHOLD) {
    /* one long row: fixed-size chunks summed in parallel, then added in chunk order (deterministic) */
    enum { SPAN = 65536 };
    int64_t spans = (reduced + SPAN - 1) / SPAN;
    double *partial = malloc(sizeof(double) * (size_t)spans);
    if (!partial) return pmp_fail_code("%s: out of memory", pmp_op_name(a->op));
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < spans; k++) {
      int64_t len = reduced - k * SPAN < SPAN ? reduced - k * SPAN : SPAN;
      partial[k] = sum_contiguous(x->data + k * SPAN * in_es, x->dtype_id, len);
    }
    double total = 0;
    for (int64_t k = 0; k < spans; k++) total += partial[k];
    free(partial);
    pmp_store_from_f64(y->dtype_id, y->data, total * scale);
    return 0;
  }
  if (inner == 1) {
#pragma omp parallel for if (outer * reduced >= PMP_PARALLEL_THRESHOLD) schedule(static)
    for (int64_t o = 0; o < outer; o++)
      pmp_store_from_f64(y->dtype_id, y->data + o * out_es, scale * sum_contiguous(x->data + o * reduced * in_es, x->dtype_id, reduced));
    return 0;
  }
  /* Rows of `inner` elements are added into a double accumulator, chunked so threads split the work. */
  enum { CHUNK = 1024 };
  int64_t chunks = (inner + CHUNK - 1) / CHUNK;
#pragma omp parallel for if (outer * reduced * inner >= PMP_PARALLEL_THRESHOLD) schedule(static)
  for (int64_t job = 0; job < outer * chunks; job++) {
    double acc[CHUNK];
    int64_t o = job / chunks, start = (job % chunks) * CHUNK;
    int64_t len = inner - start < CHUNK ? inner - start : CHUNK;
    for (int64_t k = 0; k < len; k++) acc[k] = 0;
    for (int64_t r = 0; r < reduced; r++)
      accumulate_row(acc, x->data + ((o * reduced + r) * inner + start) * in_es, x->dtype_id, len);
    for (int64_t k = 0; k < len; k++)
      pmp_store_from_f64(y->dtype_id, y->data + (o * inner + start + k) * out_es, acc[k] * scale);
  }
  return 0;
}

int pmp_cpu_reduce_index(const pmp_op_args *a) {
  const pmp_tensor *x = a->in[0];
  int64_t outer = a->i[0], reduced = a->i[1], inner = a->i[2];
  bool want_max = a->op == PMP_OP_MAX || a->op == PMP_OP_ARGMAX;
  bool write_values = a->op == PMP_OP_MAX || a->op == PMP_OP_MIN;
  int es = pmp_dtype_size(x->dtype_id);
  int64_t *idx = (int64_t *)a->out2->data;
#pragma omp parallel for if (outer * reduced * inner >= PMP_PARALLEL_THRESHOLD) collapse(2)
  for (int64_t o = 0; o < outer; o++)
    for (int64_t i = 0; i < inner; i++) {
      const char *base = x->data + (o * reduced * inner + i) * es;
      double best = pmp_load_as_f64(x->dtype_id, base);
      int64_t best_at = 0;
      /* NaN wins, as in PyTorch: a NaN anywhere makes the result NaN */
      for (int64_t r = 1; r < reduced && best == best; r++) {
        double v = pmp_load_as_f64(x->dtype_id, base + r * inner * es);
        if (v != v || (want_max ? v > best : v < best)) best = v, best_at = r;
      }
      idx[o * inner + i] = best_at;
      if (write_values) memcpy(a->out->data + (o * inner + i) * es, base + best_at * inner * es, (size_t)es);
    }
  return 0;
}
