/* Scaled dot-product attention (causal, GQA, sliding window) as one op with its own backward. */
#include "internal.h"
#include <math.h>

#define SHAPE(t, buf) pmp_shape_str((t)->sizes, (t)->ndim, buf, sizeof buf)

pmp_tensor *pmp_attention(pmp_tensor *q, pmp_tensor *k, pmp_tensor *v, pmp_tensor *first_key, double scale, int causal,
                          int64_t window) {
  if (!q || !k || !v) return NULL;
  char sq[PMP_SHAPE_BUF], sk[PMP_SHAPE_BUF], sv[PMP_SHAPE_BUF];
  if (pmp_check_interrupt("attention") || !pmp_same_device(q, k, "attention") || !pmp_same_device(q, v, "attention"))
    return NULL;
  bool ok = q->ndim == 4 && k->ndim == 4 && v->ndim == 4 && k->sizes[0] == q->sizes[0] && v->sizes[0] == q->sizes[0] &&
            k->sizes[3] == q->sizes[3] && v->sizes[3] == q->sizes[3] && v->sizes[1] == k->sizes[1] &&
            v->sizes[2] == k->sizes[2] && k->sizes[1] > 0 && q->sizes[1] % k->sizes[1] == 0;
  if (!ok)
    return pmp_fail("attention: q %s must be [B, Hq, T, D] and k %s, v %s [B, Hkv, S, D] with Hq a multiple of Hkv",
                    SHAPE(q, sq), SHAPE(k, sk), SHAPE(v, sv));
  if (!pmp_dtype_is_float(q->dtype_id))
    return pmp_fail("attention: needs floating-point inputs, got %s", pmp_dtype_name(q->dtype_id));
  bool per_row = first_key && first_key->ndim == 1 && first_key->sizes[0] == q->sizes[0];
  bool per_query = first_key && first_key->ndim == 2 && first_key->sizes[0] == q->sizes[0] &&
                   first_key->sizes[1] == q->sizes[2];
  if (first_key && ((!per_row && !per_query) || pmp_dtype_is_float(first_key->dtype_id)))
    return pmp_fail("attention: first_key must be an integer tensor [%lld] or [%lld, %lld], got %s %s",
                    (long long)q->sizes[0], (long long)q->sizes[0], (long long)q->sizes[2],
                    pmp_dtype_name(first_key->dtype_id), SHAPE(first_key, sv));
  if (scale <= 0) scale = 1.0 / sqrt((double)q->sizes[3]);
  /* bf16/f16 attend in f32: conversions are recorded, so gradients come back in the input dtype */
  int compute = pmp_compute_dtype(pmp_promote_types(q->dtype_id, pmp_promote_types(k->dtype_id, v->dtype_id)));
  pmp_scope s = {0};
  pmp_tensor *qc = pmp_keep(&s, pmp_contiguous(pmp_keep(&s, pmp_to_dtype(q, compute))));
  pmp_tensor *kc = pmp_keep(&s, pmp_contiguous(pmp_keep(&s, pmp_to_dtype(k, compute))));
  pmp_tensor *vc = pmp_keep(&s, pmp_contiguous(pmp_keep(&s, pmp_to_dtype(v, compute))));
  pmp_tensor *starts = first_key ? pmp_keep(&s, pmp_contiguous(pmp_keep(&s, pmp_to_dtype(first_key, PMP_I64)))) : NULL;
  int64_t lse_shape[3] = {q->sizes[0], q->sizes[1], q->sizes[2]};
  pmp_tensor *lse = pmp_keep(&s, pmp_empty_shape(lse_shape, 3, compute, q->dev));
  pmp_tensor *out = NULL;
  if (qc && kc && vc && lse && (starts || !first_key)) {
    pmp_op_args a = {.op = PMP_OP_ATTENTION, .out2 = lse, .in = {qc, kc, vc, starts}, .nin = 4, .f = {scale},
                     .i = {causal != 0, window}};
    out = pmp_run_new(&a, q->sizes, 4, compute, q->dev);
  }
  pmp_tensor *inputs[3] = {qc, kc, vc};
  if (out && pmp_needs_grad(inputs, 3)) {
    pmp_tensor *o = pmp_detach(out);
    pmp_tensor *saved[6] = {qc, kc, vc, o, lse, starts};
    pmp_node *n = o ? pmp_record(PMP_OP_ATTENTION, out, inputs, 3, saved, 6) : NULL;
    pmp_tensor_release(o);
    if (!n) {
      pmp_tensor_release(out);
      out = NULL;
    } else {
      n->f[0] = scale;
      n->i[0] = causal != 0;
      n->i[1] = window;
    }
  }
  pmp_tensor *result = out;
  if (out && out->dtype_id != q->dtype_id) {
    result = pmp_to_dtype(out, q->dtype_id);
    pmp_tensor_release(out);
  }
  pmp_scope_end(&s);
  return result;
}

int pmp_backward_attention(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *q = n->saved[0], *k = n->saved[1], *v = n->saved[2], *o = n->saved[3], *lse = n->saved[4];
  pmp_tensor *starts = n->saved[5];
  pmp_tensor *gc = pmp_contiguous(g);
  pmp_tensor *dq = pmp_empty_like(q, -1), *dk = pmp_empty_like(k, -1), *dv = pmp_empty_like(v, -1);
  pmp_op_args a = {.op = PMP_OP_ATTENTION_BACKWARD, .out = dq, .out2 = dk, .out3 = dv,
                   .in = {q, k, v, o, lse, gc, starts}, .nin = 7, .f = {n->f[0]}, .i = {n->i[0], n->i[1]}};
  int rc = gc && dq && dk && dv ? pmp_dispatch(&a) : -1;
  pmp_tensor_release(gc);
  if (rc != 0) {
    pmp_tensor_release(dq);
    pmp_tensor_release(dk);
    pmp_tensor_release(dv);
    return -1;
  }
  grads[0] = dq;
  grads[1] = dk;
  grads[2] = dv;
  return 0;
}
