/*
 * CPU kernels of the fused transformer ops. They compute in f32 (f64 for f64 tensors). For bf16/f16
 * they round intermediate results where Hugging Face's modules do, so outputs match theirs exactly.
 */
#include "internal.h"
#include "vector_math.h"
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

int pmp_cpu_rms_norm(const pmp_op_args *a) {
  const pmp_tensor *x = a->in[0], *w = a->in[1];
  pmp_tensor *y = a->out, *rstd = a->out2;
  int64_t rows = a->i[0], hidden = a->i[1];
  int dt = x->dtype_id, es = pmp_dtype_size(dt);
  double eps = a->f[0];
  bool f64 = dt == PMP_F64;
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
      if (dt == PMP_F32) {
        float *o = (float *)out, finv = (float)inv;
        for (int64_t k = 0; k < hidden; k++) o[k] = w ? (float)weight[k] * ((float)row[k] * finv) : (float)row[k] * finv;
        continue;
      }
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

/* dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w;  dw = sum over rows of dy * xhat. */
int pmp_cpu_rms_norm_backward(const pmp_op_args *a) {
  const pmp_tensor *x = a->in[0], *w = a->in[1], *rstd = a->in[2], *dy = a->in[3];
  pmp_tensor *dx = a->out, *dw = a->out2;
  int64_t rows = a->i[0], hidden = a->i[1];
  int dt = x->dtype_id, es = pmp_dtype_size(dt), gdt = dy->dtype_id, ges = pmp_dtype_size(gdt);
  int threads = omp_get_max_threads();
  double *dw_parts = dw ? calloc((size_t)(threads * hidden) + 1, sizeof(double)) : NULL;
  if (dw && !dw_parts) return pmp_fail_code("rms_norm backward: out of memory");
#pragma omp parallel num_threads(threads) if (rows * hidden >= PMP_PARALLEL_THRESHOLD)
  {
    double *buf = malloc(sizeof(double) * (size_t)(3 * hidden + 1));
    double *xhat = buf, *g = buf ? buf + hidden : NULL, *weight = buf ? buf + 2 * hidden : NULL;
    double *my_dw = dw_parts ? dw_parts + omp_get_thread_num() * hidden : NULL;
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
      if (dt == PMP_F32) {
        for (int64_t k = 0; k < hidden; k++) ((float *)out)[k] = (float)(inv * (g[k] - xhat[k] * dot));
        continue;
      }
      for (int64_t k = 0; k < hidden; k++) pmp_store_from_f64(dt, out + k * es, inv * (g[k] - xhat[k] * dot));
    }
    free(buf);
  }
  if (dw) {
    for (int64_t k = 0; k < hidden; k++) {
      double total = 0;
      for (int t = 0; t < threads; t++) total += dw_parts[t * hidden + k];
      pmp_store_from_f64(dw->dtype_id, dw->data + k * pmp_dtype_size(dw->dtype_id), total);
    }
    free(dw_parts);
  }
  return 0;
}

/* Element offset of row r of a (possibly broadcast) view whose last dim is contiguous or stride 1. */
static int64_t row_offset(const pmp_tensor *t, int64_t r) {
  int64_t off = 0;
  for (int d = t->ndim - 2; d >= 0; d--) {
    int64_t idx = r % t->sizes[d];
    r /= t->sizes[d];
    off += idx * t->strides[d];
  }
  return off;
}

/* The rotate-half layout in f32 with contiguous tables, as straight loops the compiler vectorizes. */
WIDE_VECTORS static void rope_half_row_f32(const float *x, float *y, const float *c, const float *s, int64_t half,
                                           bool transpose) {
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

/* Rotates pairs (i, j): forward y_i = x_i c_i - x_j s_i, y_j = x_j c_j + x_i s_j; the transpose (for the
 * gradient) y_i = x_i c_i + x_j s_j, y_j = x_j c_j - x_i s_i. Pairs are (k, k + R/2) or (2k, 2k + 1). */
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
  if (dt == PMP_F32 && cs->dtype_id == PMP_F32 && sn->dtype_id == PMP_F32 && cstride == 1 && sstride == 1) {
#pragma omp parallel for if (rows * dim >= PMP_PARALLEL_THRESHOLD) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const float *xr = (const float *)x->data + r * dim;
      float *yr = (float *)y->data + r * dim;
      const float *c = (const float *)cs->data + row_offset(cs, r), *sv = (const float *)sn->data + row_offset(sn, r);
      if (!interleaved) {
        rope_half_row_f32(xr, yr, c, sv, half, transpose);
        if (rotary < dim) memcpy(yr + rotary, xr + rotary, (size_t)(dim - rotary) * sizeof(float));
        continue;
      }
      for (int64_t p = 0; p < half; p++) {
        int64_t i = interleaved ? 2 * p : p, j = interleaved ? 2 * p + 1 : p + half;
        float xi = xr[i], xj = xr[j];
        yr[i] = transpose ? xi * c[i] + xj * sv[j] : xi * c[i] - xj * sv[i];
        yr[j] = transpose ? xj * c[j] - xi * sv[i] : xj * c[j] + xi * sv[j];
      }
      if (rotary < dim) memcpy(yr + rotary, xr + rotary, (size_t)(dim - rotary) * sizeof(float));
    }
    return 0;
  }
#pragma omp parallel for if (rows * dim >= PMP_PARALLEL_THRESHOLD) schedule(static)
  for (int64_t r = 0; r < rows; r++) {
    const char *xr = x->data + r * dim * es;
    char *yr = y->data + r * dim * es;
    const char *cr = cs->data + row_offset(cs, r) * ces, *sr = sn->data + row_offset(sn, r) * ses;
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
    if (rotary < dim) memcpy(yr + rotary * es, xr + rotary * es, (size_t)((dim - rotary) * es));
  }
  return 0;
}

static double silu(double v) { return v / (1.0 + exp(-v)); }

WIDE_VECTORS static void swiglu_row_f32(const float *gate, const float *up, float *out, int64_t width) {
#pragma omp simd
  for (int64_t k = 0; k < width; k++) out[k] = gate[k] / (1.0f + expf(-gate[k])) * up[k];
}

/* bf16: silu(gate) in f32 rounded to bf16, times up, rounded again, as PyTorch's bf16 modules do */
WIDE_VECTORS static void swiglu_row_bf16(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t width) {
#pragma omp simd
  for (int64_t k = 0; k < width; k++) {
    float g = bf16_bits_to_f32(gate[k]);
    float activated = bf16_bits_to_f32(f32_to_bf16_bits(g / (1.0f + expf(-g))));
    out[k] = f32_to_bf16_bits(activated * bf16_bits_to_f32(up[k]));
  }
}

WIDE_VECTORS static void swiglu_backward_row_bf16(const uint16_t *gate, const uint16_t *up, const uint16_t *g,
                                                  uint16_t *dgate, uint16_t *dup, int64_t width) {
#pragma omp simd
  for (int64_t k = 0; k < width; k++) {
    float v = bf16_bits_to_f32(gate[k]), u = bf16_bits_to_f32(up[k]), grad = bf16_bits_to_f32(g[k]);
    float s = 1.0f / (1.0f + expf(-v));
    dgate[k] = f32_to_bf16_bits(grad * u * s * (1.0f + v * (1.0f - s)));
    dup[k] = f32_to_bf16_bits(grad * v * s);
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
