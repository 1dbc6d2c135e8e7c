/* Fused transformer ops (RMSNorm, RoPE, SwiGLU): shape rules, dispatch, backward. Kernels: cpu_fused.c. */
#include "internal.h"

#define SHAPE(t, buf) pmp_shape_str((t)->sizes, (t)->ndim, buf, sizeof buf)

pmp_tensor *pmp_rms_norm(pmp_tensor *x, pmp_tensor *weight, double eps) {
  if (!x) return NULL;
  char sx[PMP_SHAPE_BUF], sw[PMP_SHAPE_BUF];
  if (x->ndim < 1 || !pmp_dtype_is_float(x->dtype_id))
    return pmp_fail("rms_norm: needs a floating-point tensor with at least 1 dim, got %s %s", pmp_dtype_name(x->dtype_id), SHAPE(x, sx));
  int64_t hidden = x->sizes[x->ndim - 1];
  if (weight && (weight->ndim != 1 || weight->sizes[0] != hidden))
    return pmp_fail("rms_norm: weight of shape %s does not match the last dim of input %s", SHAPE(weight, sw), SHAPE(x, sx));
  if (weight && !pmp_same_device(x, weight, "rms_norm")) return NULL;
  pmp_scope s = {0};
  pmp_tensor *xc = pmp_keep(&s, pmp_contiguous(x));
  pmp_tensor *wc = weight ? pmp_keep(&s, pmp_contiguous(pmp_keep(&s, pmp_to_dtype(weight, x->dtype_id)))) : NULL;
  int64_t rows = hidden ? pmp_numel(x) / hidden : 0;
  pmp_tensor *rstd = pmp_keep(&s, pmp_empty_shape(&rows, 1, pmp_compute_dtype(x->dtype_id), x->dev));
  pmp_tensor *out = NULL;
  if (xc && rstd && (wc || !weight)) {
    pmp_op_args a = {.op = PMP_OP_RMS_NORM, .out = pmp_empty_shape(x->sizes, x->ndim, x->dtype_id, x->dev), .out2 = rstd,
                     .in = {xc, wc}, .nin = 2, .f = {eps}, .i = {rows, hidden}};
    pmp_tensor *inputs[2] = {xc, wc};
    pmp_node *n;
    out = pmp_run_op(&a, inputs, 2, (pmp_tensor *[]){xc, wc, rstd}, 3, &n);
    if (n) n->i[0] = rows, n->i[1] = hidden;
  }
  pmp_scope_end(&s);
  return out;
}

int pmp_backward_rms_norm(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *x = n->saved[0], *w = n->saved[1], *rstd = n->saved[2];
  pmp_tensor *gc = pmp_contiguous(g);
  pmp_tensor *dx = pmp_empty_like(x, -1);
  pmp_tensor *dw = w && PMP_NEEDS(n, 1) ? pmp_empty_like(w, -1) : NULL;
  pmp_op_args a = {.op = PMP_OP_RMS_NORM_BACKWARD, .out = dx, .out2 = dw, .in = {x, w, rstd, gc}, .nin = 4,
                   .i = {n->i[0], n->i[1]}};
  int rc = gc && dx && (dw || !(w && PMP_NEEDS(n, 1))) ? pmp_dispatch(&a) : -1;
  pmp_tensor_release(gc);
  if (rc != 0) {
    pmp_tensor_release(dx);
    pmp_tensor_release(dw);
    return -1;
  }
  grads[0] = dx;
  grads[1] = dw;
  return 0;
}

/* cos/sin become views of shape x.shape[:-1] + [rotary_dim], broadcast where they are smaller. */
static pmp_tensor *rope_table(pmp_tensor *table, pmp_tensor *x, int64_t rotary, const char *name) {
  int64_t shape[PMP_MAX_DIMS];
  char st[PMP_SHAPE_BUF], sx[PMP_SHAPE_BUF];
  memcpy(shape, x->sizes, sizeof shape);
  shape[x->ndim - 1] = rotary;
  int64_t out[PMP_MAX_DIMS];
  int nout;
  if (table->ndim > x->ndim || !pmp_broadcast_shapes(table->sizes, table->ndim, shape, x->ndim, out, &nout) ||
      memcmp(out, shape, sizeof(int64_t) * (size_t)x->ndim) != 0)
    return pmp_fail("rope: %s of shape %s does not broadcast against input %s", name, SHAPE(table, st), SHAPE(x, sx));
  return pmp_broadcast_view(table, shape, x->ndim);
}

/* The rotation of x as op arguments, xc being x with its rows contiguous (a new reference the caller
 * releases). The output takes x's memory layout: a strided view (q as a transpose of [B, T, H, D]
 * memory) gives the same kind of view back and nothing is copied either way. */
static pmp_op_args rope_args(pmp_tensor *x, pmp_tensor *cos_view, pmp_tensor *sin_view, int interleaved, int transpose,
                             pmp_tensor **xc) {
  *xc = x->strides[x->ndim - 1] == 1 ? (pmp_tensor_retain(x), x) : pmp_contiguous(x);
  return (pmp_op_args){.op = PMP_OP_ROPE, .out = *xc ? pmp_empty_in_layout(*xc, -1) : NULL,
                       .in = {*xc, cos_view, sin_view}, .nin = 3, .i = {interleaved, transpose}};
}

pmp_tensor *pmp_rope(pmp_tensor *x, pmp_tensor *cos, pmp_tensor *sin, int interleaved) {
  if (!x || !cos || !sin) return NULL;
  char sx[PMP_SHAPE_BUF], sc[PMP_SHAPE_BUF];
  if (!pmp_same_device(x, cos, "rope") || !pmp_same_device(x, sin, "rope")) return NULL;
  if (x->ndim < 2 || !pmp_dtype_is_float(x->dtype_id))
    return pmp_fail("rope: needs a floating-point [..., T, D] input, got %s %s", pmp_dtype_name(x->dtype_id), SHAPE(x, sx));
  int64_t rotary = cos->ndim ? cos->sizes[cos->ndim - 1] : 0;
  if (rotary <= 0 || rotary % 2 || rotary > x->sizes[x->ndim - 1] || sin->ndim < 1 || sin->sizes[sin->ndim - 1] != rotary)
    return pmp_fail("rope: cos %s and sin must share an even last dim no larger than the head dim of input %s",
                    SHAPE(cos, sc), SHAPE(x, sx));
  pmp_scope s = {0};
  pmp_tensor *cv = pmp_keep(&s, rope_table(cos, x, rotary, "cos"));
  pmp_tensor *sv = pmp_keep(&s, rope_table(sin, x, rotary, "sin"));
  pmp_tensor *out = NULL;
  if (cv && sv) {
    pmp_tensor *xc;
    pmp_op_args a = rope_args(x, cv, sv, interleaved, 0, &xc);
    pmp_node *n;
    out = pmp_run_op(&a, &x, 1, (pmp_tensor *[]){cv, sv}, 2, &n);
    pmp_tensor_release(xc);
    if (n) n->i[0] = interleaved;
  }
  pmp_scope_end(&s);
  return out;
}

/* The rotation is orthogonal, so its gradient is the transposed rotation of the output gradient. */
int pmp_backward_rope(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *gc;
  pmp_op_args a = rope_args(g, n->saved[0], n->saved[1], (int)n->i[0], 1, &gc);
  grads[0] = pmp_run_op(&a, NULL, 0, NULL, 0, NULL);
  pmp_tensor_release(gc);
  return grads[0] ? 0 : -1;
}

pmp_tensor *pmp_swiglu(pmp_tensor *x) {
  if (!x) return NULL;
  char sx[PMP_SHAPE_BUF];
  if (x->ndim < 1 || x->sizes[x->ndim - 1] % 2 || !pmp_dtype_is_float(x->dtype_id))
    return pmp_fail("swiglu: needs a floating-point input whose last dim is even ([gate | up]), got %s %s",
                    pmp_dtype_name(x->dtype_id), SHAPE(x, sx));
  pmp_tensor *xc = pmp_contiguous(x);
  if (!xc) return NULL;
  int64_t shape[PMP_MAX_DIMS];
  memcpy(shape, x->sizes, sizeof shape);
  shape[x->ndim - 1] /= 2;
  pmp_op_args a = {.op = PMP_OP_SWIGLU, .out = pmp_empty_shape(shape, x->ndim, x->dtype_id, x->dev), .in = {xc}, .nin = 1};
  pmp_tensor *out = pmp_run_op(&a, &xc, 1, &xc, 1, NULL);
  pmp_tensor_release(xc);
  return out;
}

int pmp_backward_swiglu(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *x = n->saved[0];
  pmp_tensor *gc = pmp_contiguous(g);
  pmp_op_args a = {.op = PMP_OP_SWIGLU_BACKWARD, .in = {x, gc}, .nin = 2};
  grads[0] = gc ? pmp_run_new(&a, x->sizes, x->ndim, x->dtype_id, x->dev) : NULL;
  pmp_tensor_release(gc);
  return grads[0] ? 0 : -1;
}
