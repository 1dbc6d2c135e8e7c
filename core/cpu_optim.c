/* CPU optimizer kernels: one pass over each parameter. */
#include "internal.h"
#include "vector_math.h"
#include <math.h>

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

static inline void adam_f32_update(const adam_f32 *h, float *p, float *m, float *v, float g) {
  float decayed = *p * h->decay;
  *m = h->b1 * *m + (1.0f - h->b1) * g;
  *v = h->b2 * *v + (1.0f - h->b2) * g * g;
  *p = decayed - h->step_size * *m / (sqrtf(*v) / h->bc2_sqrt + h->eps);
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
  if (state->dtype_id == PMP_F32 && grad->dtype_id == PMP_F32 && !master) {
    float *p = (float *)param->data, *mm = (float *)m->data, *vv = (float *)v->data;
    const float *g = (const float *)grad->data;
    adam_f32 h = adam_f32_of(b1, b2, decay, step_size, bc2_sqrt, eps);
#pragma omp parallel for if (n >= PMP_PARALLEL_THRESHOLD) schedule(static)
    for (int64_t k = 0; k < n; k++) adam_f32_update(&h, p + k, mm + k, vv + k, g[k]);
    return 0;
  }
  if (master && master->dtype_id == PMP_F32 && m->dtype_id == PMP_F32 && param->dtype_id == PMP_BF16 &&
      (grad->dtype_id == PMP_F32 || grad->dtype_id == PMP_BF16)) {
    /* bf16 parameters with f32 master weights: the f32 step above, then the rounded copy */
    float *p = (float *)master->data, *mm = (float *)m->data, *vv = (float *)v->data;
    uint16_t *out = (uint16_t *)param->data;
    bool g16 = grad->dtype_id == PMP_BF16;
    adam_f32 h = adam_f32_of(b1, b2, decay, step_size, bc2_sqrt, eps);
#pragma omp parallel for if (n >= PMP_PARALLEL_THRESHOLD) schedule(static)
    for (int64_t k = 0; k < n; k++) {
      float gk = g16 ? bf16_bits_to_f32(((const uint16_t *)grad->data)[k]) : ((const float *)grad->data)[k];
      adam_f32_update(&h, p + k, mm + k, vv + k, gk);
      out[k] = f32_to_bf16_bits(p[k]);
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

int pmp_cpu_scale(const pmp_op_args *a) {
  pmp_tensor *t = a->out;
  int64_t n = pmp_numel(t);
  int dt = t->dtype_id, es = pmp_dtype_size(dt);
  double factor = a->f[0];
  if (dt == PMP_F32) {
    float *x = (float *)t->data, f = (float)factor;
#pragma omp parallel for if (n >= PMP_PARALLEL_THRESHOLD) schedule(static)
    for (int64_t k = 0; k < n; k++) x[k] *= f;
    return 0;
  }
#pragma omp parallel for if (n >= PMP_PARALLEL_THRESHOLD) schedule(static)
  for (int64_t k = 0; k < n; k++) pmp_store_from_f64(dt, t->data + k * es, pmp_load_as_f64(dt, t->data + k * es) * factor);
  return 0;
}
