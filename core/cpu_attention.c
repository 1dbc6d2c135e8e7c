/* CPU attention kernels: the tiled implementation (cpu_attention_impl.h) for f32 and f64. */
#include "internal.h"
#include "vector_math.h"

enum { BLOCK_Q = 64, BLOCK_K = 64 };

typedef struct attention_shape {
  int64_t B, Hq, Hkv, T, S, D, offset, window;
  const int64_t *first_key;   /* per batch row [B] or per query [B, T], or NULL */
  int64_t first_key_row, first_key_col;   /* its strides */
  bool causal;
  double scale;
} attention_shape;

#define REAL float
#define EXP expf
#define LOG logf
#define SUFFIX f32
#include "cpu_attention_impl.h"
#undef REAL
#undef EXP
#undef LOG
#undef SUFFIX

#define REAL double
#define EXP exp
#define LOG log
#define SUFFIX f64
#include "cpu_attention_impl.h"
#undef REAL
#undef EXP
#undef LOG
#undef SUFFIX

static attention_shape shape_of(const pmp_op_args *a, const pmp_tensor *first_key) {
  const pmp_tensor *q = a->in[0], *k = a->in[1];
  attention_shape sh = {.B = q->sizes[0], .Hq = q->sizes[1], .Hkv = k->sizes[1], .T = q->sizes[2], .S = k->sizes[2],
                        .D = q->sizes[3], .causal = a->i[0] != 0, .window = a->i[1], .scale = a->f[0]};
  sh.offset = sh.S - sh.T;
  sh.first_key = first_key ? (const int64_t *)first_key->data : NULL;
  bool per_query = first_key && first_key->ndim == 2;
  sh.first_key_row = per_query ? sh.T : 1;
  sh.first_key_col = per_query ? 1 : 0;
  return sh;
}

/* in: q, k, v (contiguous, f32 or f64), first keys (i64 [B] or NULL); out: o; out2: log-sum-exp per query. */
int pmp_cpu_attention(const pmp_op_args *a) {
  attention_shape sh = shape_of(a, a->in[3]);
  if (a->in[0]->dtype_id == PMP_F64)
    attention_forward_f64(&sh, (const double *)a->in[0]->data, (const double *)a->in[1]->data,
                          (const double *)a->in[2]->data, (double *)a->out->data, (double *)a->out2->data);
  else
    attention_forward_f32(&sh, (const float *)a->in[0]->data, (const float *)a->in[1]->data,
                          (const float *)a->in[2]->data, (float *)a->out->data, (float *)a->out2->data);
  return 0;
}

/* in: q, k, v, o, lse, dO, first keys; out: dq, out2: dk, out3: dv. */
int pmp_cpu_attention_backward(const pmp_op_args *a) {
  attention_shape sh = shape_of(a, a->in[6]);
  if (a->in[0]->dtype_id == PMP_F64)
    attention_backward_f64(&sh, (const double *)a->in[0]->data, (const double *)a->in[1]->data,
                           (const double *)a->in[2]->data, (const double *)a->in[3]->data,
                           (const double *)a->in[4]->data, (const double *)a->in[5]->data, (double *)a->out->data,
                           (double *)a->out2->data, (double *)a->out3->data);
  else
    attention_backward_f32(&sh, (const float *)a->in[0]->data, (const float *)a->in[1]->data,
                           (const float *)a->in[2]->data, (const float *)a->in[3]->data, (const float *)a->in[4]->data,
                           (const float *)a->in[5]->data, (float *)a->out->data, (float *)a->out2->data,
                           (float *)a->out3->data);
  return 0;
}
