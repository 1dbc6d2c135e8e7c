/* CPU optimizer kernels: one pass over each parameter. */
#include "internal.h"
#include "cpu/vector_math.h"
#include <math.h>
#include <omp.h>

/*
 * PyTorch's AdamW, term for term: p -= lr * wd * p; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
 * p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps). Low-precision params with master
 * weights update the f32 master and store its rounding into the param.
 */
/* The f32 form of the step, shared by f32 parameters and f32 master weights. */
typedef struct adam_f32 { float b1, b2, decay, step_size, bc2_sqrt, eps; } adam_f32;

static adam_f32 adam_f32_of(double b1, double b2, double decay, double step_size, double bc2_sqrt, double eps) {
  return (adam_f32){(float)b1, (float)b2, (float)decay, (float)step_size, (float)bc2_sqrt, (float)eps};
}

enum { ADAM_BLOCK = 512 };

/*
 * The step on one block. ISO C keeps every product and sum separately rounded, so the vector loops give
 * the scalar results. sqrtf has a loop of its own, and the Makefile builds this file with
 * -fno-math-errno: otherwise sqrtf is a call that may set errno and keeps its loop scalar (v is never
 * negative, so it never does; IEEE square roots are exactly rounded at any vector width).
 */
WIDE_VECTORS static void adam_block(const adam_f32 *h, float *p, float *m, float *v, const float *g, int64_t n) {
  float root[ADAM_BLOCK];
#pragma omp simd
  for (int64_t k = 0; k < n; k++) {
    m[k] = h->b1 * m[k] + (1.0f - h->b1) * g[k];
    v[k] = h->b2 * v[k] + (1.0f - h->b2) * g[k] * g[k];
  }
#pragma omp simd
  for (int64_t k = 0; k < n; k++) root[k] = sqrtf(v[k]);
#pragma omp simd
  for (int64_t k = 0; k < n; k++) p[k] = p[k] * h->decay - h->step_size * m[k] / (root[k] / h->bc2_sqrt + h->eps);
}

/* f32 parameters (out NULL), or f32 master weights whose bf16 rounding goes to out; g16: bf16 grads. */
WIDE_VECTORS static void adamw_f32(const adam_f32 *h, float *p, float *m, float *v, const void *grad, bool g16,
                                   uint16_t *out, int64_t n) {
  float g32[ADAM_BLOCK];
  for (int64_t b = 0; b < n; b += ADAM_BLOCK) {
    int64_t len = n - b < ADAM_BLOCK ? n - b : ADAM_BLOCK;
    const float *g = (const float *)grad + b;
    if (g16) {
      const uint16_t *g_bf16 = (const uint16_t *)grad + b;
#pragma omp simd
      for (int64_t k = 0; k < len; k++) g32[k] = bf16_bits_to_f32(g_bf16[k]);
      g = g32;
    }
    adam_block(h, p + b, m + b, v + b, g, len);
    if (out) {
#pragma omp simd
      for (int64_t k = 0; k < len; k++) out[b + k] = f32_to_bf16_bits(p[b + k]);
    }
  }
}

int pmp_cpu_adamw(const pmp_op_args *a) {
  pmp_tensor *param = a->out, *master = a->out2;
  const pmp_tensor *grad = a->in[0];
  pmp_tensor *m = a->in[1], *v = a->in[2];
  double lr = a->f[0], b1 = a->f[1], b2 = a->f[2], eps = a->f[3], wd = a->f[4];
  int64_t step = a->i[0], n = pmp_numel(param);
  double bc1 = 1.0 - pow(b1, (double)step), bc2_sqrt = sqrt(1.0 - pow(b2, (double)step));
  double step_size = lr / bc1, decay = 1.0 - lr * wd;
  pmp_tensor *state = master ? master : param;
  bool f32 = !master && param->dtype_id == PMP_F32 && grad->dtype_id == PMP_F32;
  /* bf16 parameters with f32 master weights: the f32 step on the master, then its rounded copy */
  bool bf16_master = master && master->dtype_id == PMP_F32 && m->dtype_id == PMP_F32 &&
                     param->dtype_id == PMP_BF16 && (grad->dtype_id == PMP_F32 || grad->dtype_id == PMP_BF16);
  if (f32 || bf16_master) {
    float *p = (float *)state->data, *mm = (float *)m->data, *vv = (float *)v->data;
    bool g16 = grad->dtype_id == PMP_BF16;
    int ges = pmp_dtype_size(grad->dtype_id);
    adam_f32 h = adam_f32_of(b1, b2, decay, step_size, bc2_sqrt, eps);
#pragma omp parallel if (n >= PMP_PARALLEL_THRESHOLD)
    {
      int64_t lo, hi;
      pmp_thread_share(n, &lo, &hi);
      adamw_f32(&h, p + lo, mm + lo, vv + lo, grad->data + lo * ges, g16,
                bf16_master ? (uint16_t *)param->data + lo : NULL, hi - lo);
    }
    return 0;
  }
  int sdt = state->dtype_id, ses = pmp_dtype_size(sdt), gdt = grad->dtype_id, ges = pmp_dtype_size(gdt);
  int pdt = param->dtype_id, pes = pmp_dtype_size(pdt);
#pragma omp parallel for if (n >= PMP_PARALLEL_THRESHOLD) schedule(static)
  for (int64_t k = 0; k < n; k++) {
    double g = pmp_load_as_f64(gdt, grad->data + k * ges);
    double p = pmp_load_as_f64(sdt, state->data + k * ses) * decay;
    double mk = b1 * pmp_load_as_f64(sdt, m->data + k * ses) + (1.0 - b1) * g;
    double vk = b2 * pmp_load_as_f64(sdt, v->data + k * ses) + (1.0 - b2) * g * g;
    pmp_store_from_f64(sdt, m->data + k * ses, mk);
    pmp_store_from_f64(sdt, v->data + k * ses, vk);
    mk = pmp_load_as_f64(sdt, m->data + k * ses);
    vk = pmp_load_as_f64(sdt, v->data + k * ses);
    p -= step_size * mk / (sqrt(vk) / bc2_sqrt + eps);
    pmp_store_from_f64(sdt, state->data + k * ses, p);
    if (master) pmp_store_from_f64(pdt, param->data + k * pes, pmp_load_as_f64(sdt, state->data + k * ses));
  }
  return 0;
}

/* bf16 goes through f64 and f32 on its way back, as pmp_store_from_f64 rounds. */
WIDE_VECTORS static void scale_f32(float *x, float f, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; k++) x[k] *= f;
}

WIDE_VECTORS static void scale_bf16(uint16_t *x, double f, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; k++) x[k] = f32_to_bf16_bits((float)((double)bf16_bits_to_f32(x[k]) * f));
}

int pmp_cpu_scale(const pmp_op_args *a) {
  pmp_tensor *t = a->out;
  int64_t n = pmp_numel(t);
  int dt = t->dtype_id, es = pmp_dtype_size(dt);
  double factor = a->f[0];
  if (dt == PMP_F32 || dt == PMP_BF16) {
#pragma omp parallel if (n >= PMP_PARALLEL_THRESHOLD)
    {
      int64_t lo, hi;
      pmp_thread_share(n, &lo, &hi);
      if (dt == PMP_F32)
        scale_f32((float *)t->data + lo, (float)factor, hi - lo);
      else
        scale_bf16((uint16_t *)t->data + lo, factor, hi - lo);
    }
    return 0;
  }
#pragma omp parallel for if (n >= PMP_PARALLEL_THRESHOLD) schedule(static)
  for (int64_t k = 0; k < n; k++) pmp_store_from_f64(dt, t->data + k * es, pmp_load_as_f64(dt, t->data + k * es) * factor);
  return 0;
}
