/* Scaled dot-product attention (causal, GQA, sliding window, ALiBi) as one op with its own backward. */
#include "internal.h"
#include <math.h>

#define SHAPE(t, buf) pmp_shape_str((t)->sizes, (t)->ndim, buf, sizeof buf)

/* The kernels read any strides over [B, H, T] but want each row of D values contiguous. */
static pmp_tensor *rows_contiguous(pmp_tensor *t) {
  if (t->strides[3] == 1 || t->sizes[3] == 1) {
    pmp_tensor_retain(t);
    return t;
  }
  return pmp_contiguous(t);
}

pmp_tensor *pmp_attention(pmp_tensor *q, pmp_tensor *k, pmp_tensor *v, pmp_tensor *first_key, double scale, int causal,
                          int64_t window) {
  return pmp_attention_alibi(q, k, v, first_key, NULL, scale, causal, window);
}

/* bias_scale 0: the exact relative ALiBi bias; > 0: transformers' Falcon bias. The kernels get it as f[1]. */
static pmp_tensor *attention_op(pmp_tensor *q, pmp_tensor *k, pmp_tensor *v, pmp_tensor *first_key, pmp_tensor *slopes,
                                double bias_scale, double scale, int causal, int64_t window) {
  if (!q || !k || !v) return NULL;
  char sq[PMP_SHAPE_BUF], sk[PMP_SHAPE_BUF], sv[PMP_SHAPE_BUF];
  if (!pmp_same_device(q, k, "attention") || !pmp_same_device(q, v, "attention")) return NULL;
  bool ok = q->ndim == 4 && k->ndim == 4 && v->ndim == 4 && k->sizes[0] == q->sizes[0] && v->sizes[0] == q->sizes[0] &&
            k->sizes[3] == q->sizes[3] && v->sizes[3] == q->sizes[3] && v->sizes[1] == k->sizes[1] &&
            v->sizes[2] == k->sizes[2] && k->sizes[1] > 0 && q->sizes[1] % k->sizes[1] == 0;
  if (!ok)
    return pmp_fail("attention: q %s must be [B, Hq, T, D] and k %s, v %s [B, Hkv, S, D] with Hq a multiple of Hkv",
                    SHAPE(q, sq), SHAPE(k, sk), SHAPE(v, sv));
  if (!pmp_dtype_is_float(q->dtype_id) || !pmp_dtype_is_float(k->dtype_id) || !pmp_dtype_is_float(v->dtype_id))
    return pmp_fail("attention: needs floating-point inputs, got %s, %s, %s", pmp_dtype_name(q->dtype_id),
                    pmp_dtype_name(k->dtype_id), pmp_dtype_name(v->dtype_id));
  bool per_row = first_key && first_key->ndim == 1 && first_key->sizes[0] == q->sizes[0];
  bool per_query = first_key && first_key->ndim == 2 && first_key->sizes[0] == q->sizes[0] &&
                   first_key->sizes[1] == q->sizes[2];
  if (first_key && ((!per_row && !per_query) || pmp_dtype_is_float(first_key->dtype_id)))
    return pmp_fail("attention: first_key must be an integer tensor [%lld] or [%lld, %lld], got %s %s",
                    (long long)q->sizes[0], (long long)q->sizes[0], (long long)q->sizes[2],
                    pmp_dtype_name(first_key->dtype_id), SHAPE(first_key, sv));
  if (slopes && (slopes->ndim != 1 || slopes->sizes[0] != q->sizes[1] || !pmp_dtype_is_float(slopes->dtype_id)))
    return pmp_fail("attention: ALiBi slopes must be a float tensor [%lld] (one per query head), got %s %s",
                    (long long)q->sizes[1], pmp_dtype_name(slopes->dtype_id), SHAPE(slopes, sv));
  if (slopes && !pmp_same_device(q, slopes, "attention")) return NULL;
  if (scale <= 0) scale = 1.0 / sqrt((double)q->sizes[3]);
  /* The kernels load q, k, v in place, converting rows to the compute dtype (f32 for bf16/f16) as they
   * go, and round the output once into q's dtype. */
  int compute = pmp_compute_dtype(pmp_promote_types(q->dtype_id, pmp_promote_types(k->dtype_id, v->dtype_id)));
  int64_t B = q->sizes[0], Hq = q->sizes[1], T = q->sizes[2], D = q->sizes[3];
  pmp_scope s = {0};
  pmp_tensor *qc = pmp_keep(&s, rows_contiguous(q)), *kc = pmp_keep(&s, rows_contiguous(k));
  pmp_tensor *vc = pmp_keep(&s, rows_contiguous(v));
  pmp_tensor *starts = first_key ? pmp_keep(&s, pmp_contiguous(pmp_keep(&s, pmp_to_dtype(first_key, PMP_I64)))) : NULL;
  /* the kernels read the slopes as doubles, whatever the dtype of q */
  pmp_tensor *alibi = slopes ? pmp_keep(&s, pmp_contiguous(pmp_keep(&s, pmp_to_dtype(slopes, PMP_F64)))) : NULL;
  int64_t lse_shape[3] = {B, Hq, T};
  pmp_tensor *lse = pmp_keep(&s, pmp_empty_shape(lse_shape, 3, compute, q->dev));
  /* The output's memory is [B, T, Hq, D], so merging the heads back into [B, T, Hq * D] is a view. */
  int64_t bthd[4] = {B, T, Hq, D}, view_strides[4] = {T * Hq * D, D, Hq * D, 1};
  pmp_tensor *base = pmp_keep(&s, pmp_empty_shape(bthd, 4, q->dtype_id, q->dev));
  pmp_tensor *out = base ? pmp_tensor_new_view(base, q->sizes, view_strides, 4, base->offset) : NULL;
  /* the backward pass wants the output before rounding: keep a compute-dtype copy when they differ */
  pmp_tensor *exact = q->dtype_id == compute ? NULL : pmp_keep(&s, pmp_empty_shape(q->sizes, 4, compute, q->dev));
  bool ready = qc && kc && vc && lse && (starts || !first_key) && (alibi || !slopes) && (exact || q->dtype_id == compute);
  if (out && !ready) {
    pmp_tensor_release(out);
    out = NULL;
  }
  pmp_op_args a = {.op = PMP_OP_ATTENTION, .out = out, .out2 = lse, .out3 = exact, .in = {qc, kc, vc, starts, alibi},
                   .nin = 5, .f = {scale, bias_scale}, .i = {causal != 0, window}};
  pmp_tensor *inputs[3] = {qc, kc, vc};
  pmp_node *n;
  out = pmp_run_op(&a, inputs, 3, (pmp_tensor *[]){qc, kc, vc, exact ? exact : PMP_SAVED_OUTPUT, lse, starts, alibi}, 7,
                   &n);
  if (n) n->f[0] = scale, n->f[1] = bias_scale, n->i[0] = causal != 0, n->i[1] = window;
  pmp_scope_end(&s);
  return out;
}

pmp_tensor *pmp_attention_alibi(pmp_tensor *q, pmp_tensor *k, pmp_tensor *v, pmp_tensor *first_key, pmp_tensor *slopes,
                                double scale, int causal, int64_t window) {
  return attention_op(q, k, v, first_key, slopes, 0, scale, causal, window);
}

pmp_tensor *pmp_attention_alibi_hf_falcon(pmp_tensor *q, pmp_tensor *k, pmp_tensor *v, pmp_tensor *first_key,
                                          pmp_tensor *slopes, double bias_scale, double scale, int causal,
                                          int64_t window) {
  if (!slopes || !(bias_scale > 0))
    return pmp_fail("attention: the Falcon ALiBi bias needs slopes and a positive bias scale, got %s and %g",
                    slopes ? "slopes" : "no slopes", bias_scale);
  return attention_op(q, k, v, first_key, slopes, bias_scale, scale, causal, window);
}

int pmp_backward_attention(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *q = n->saved[0], *k = n->saved[1], *v = n->saved[2], *o = n->saved[3], *lse = n->saved[4];
  pmp_tensor *starts = n->saved[5], *alibi = n->saved[6];
  pmp_tensor *gc = rows_contiguous(g);
  pmp_tensor *dq = pmp_empty_in_layout(q, q->dtype_id), *dk = pmp_empty_in_layout(k, k->dtype_id);
  pmp_tensor *dv = pmp_empty_in_layout(v, v->dtype_id);
  pmp_op_args a = {.op = PMP_OP_ATTENTION_BACKWARD, .out = dq, .out2 = dk, .out3 = dv,
                   .in = {q, k, v, o, lse, gc, starts, alibi}, .nin = 8, .f = {n->f[0], n->f[1]}, .i = {n->i[0], n->i[1]}};
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
