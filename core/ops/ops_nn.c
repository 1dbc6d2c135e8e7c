/* Neural-network ops with their own kernels: softmax, log-softmax, softmax cross-entropy. */
#include "internal.h"

#define SHAPE(t, buf) pmp_shape_str((t)->sizes, (t)->ndim, buf, sizeof buf)

/* Softmax kernels run on a contiguous [outer, dim, inner] layout. */
static pmp_tensor *softmax_like(pmp_tensor *t, int dim, int op) {
  if (!t) return NULL;
  const char *name = pmp_op_name(op);
  if (!pmp_wrap_dim(&dim, t->ndim, name)) return NULL;
  if (!pmp_dtype_is_float(t->dtype_id)) return pmp_fail("%s: needs a floating-point tensor, got %s", name, pmp_dtype_name(t->dtype_id));
  pmp_tensor *src = pmp_contiguous(t);
  if (!src) return NULL;
  int64_t outer = 1, size = t->ndim ? t->sizes[dim] : 1, inner = 1;
  for (int d = 0; d < t->ndim; d++) {
    if (d < dim) outer *= t->sizes[d];
    if (d > dim) inner *= t->sizes[d];
  }
  pmp_op_args a = {.op = op, .out = pmp_empty_shape(t->sizes, t->ndim, t->dtype_id, t->dev), .in = {src}, .nin = 1,
                   .i = {outer, size, inner}};
  pmp_node *n;
  pmp_tensor *out = pmp_run_op(&a, &t, 1, (pmp_tensor *[]){PMP_SAVED_OUTPUT}, 1, &n);
  pmp_tensor_release(src);
  if (n) n->i[0] = dim;
  return out;
}

pmp_tensor *pmp_softmax(pmp_tensor *t, int dim) { return softmax_like(t, dim, PMP_OP_SOFTMAX); }
pmp_tensor *pmp_log_softmax(pmp_tensor *t, int dim) { return softmax_like(t, dim, PMP_OP_LOG_SOFTMAX); }

/* dx = y * (g - sum(g * y)) */
int pmp_backward_softmax(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *y = n->saved[0];
  int dim = (int)n->i[0];
  pmp_scope s = {0};
  pmp_tensor *dot = pmp_keep(&s, pmp_sum(pmp_keep(&s, pmp_binary(PMP_OP_MUL, g, y)), &dim, 1, 1));
  grads[0] = pmp_binary(PMP_OP_MUL, y, pmp_keep(&s, pmp_binary(PMP_OP_SUB, g, dot)));
  pmp_scope_end(&s);
  return grads[0] ? 0 : -1;
}

/* dx = g - exp(y) * sum(g) */
int pmp_backward_log_softmax(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *y = n->saved[0];
  int dim = (int)n->i[0];
  pmp_scope s = {0};
  pmp_tensor *total = pmp_keep(&s, pmp_sum(g, &dim, 1, 1));
  pmp_tensor *p = pmp_keep(&s, pmp_unary(PMP_OP_EXP, y));
  grads[0] = pmp_binary(PMP_OP_SUB, g, pmp_keep(&s, pmp_binary(PMP_OP_MUL, p, total)));
  pmp_scope_end(&s);
  return grads[0] ? 0 : -1;
}

pmp_tensor *pmp_cross_entropy(pmp_tensor *logits, pmp_tensor *targets, int64_t ignore_index) {
  if (!logits || !targets) return NULL;
  char sl[PMP_SHAPE_BUF], st[PMP_SHAPE_BUF];
  if (!pmp_same_device(logits, targets, "cross_entropy")) return NULL;
  if (logits->ndim != 2 || targets->ndim != 1 || targets->sizes[0] != logits->sizes[0])
    return pmp_fail("cross_entropy: logits must be [N, C] and targets [N], got %s and %s", SHAPE(logits, sl), SHAPE(targets, st));
  if (!pmp_dtype_is_float(logits->dtype_id) || pmp_dtype_is_float(targets->dtype_id))
    return pmp_fail("cross_entropy: needs floating-point logits and integer targets, got %s and %s",
                    pmp_dtype_name(logits->dtype_id), pmp_dtype_name(targets->dtype_id));
  pmp_scope s = {0};
  pmp_tensor *x = pmp_keep(&s, pmp_contiguous(logits));
  pmp_tensor *y = pmp_keep(&s, pmp_contiguous(targets));
  pmp_tensor *out = NULL;
  if (x && y) {
    pmp_op_args a = {.op = PMP_OP_CROSS_ENTROPY, .out = pmp_empty_shape(targets->sizes, 1, logits->dtype_id, logits->dev),
                     .in = {x, y}, .nin = 2, .i = {ignore_index}};
    pmp_node *n;
    out = pmp_run_op(&a, &logits, 1, (pmp_tensor *[]){x, y}, 2, &n);
    if (n) n->i[0] = ignore_index;
  }
  pmp_scope_end(&s);
  return out;
}

/* dlogits[r] = g[r] * (softmax(logits[r]) - onehot(target[r])), zero for ignored rows. */
int pmp_backward_cross_entropy(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *x = n->saved[0], *y = n->saved[1];
  pmp_tensor *cg = pmp_contiguous(g);
  if (!cg) return -1;
  pmp_op_args a = {.op = PMP_OP_CROSS_ENTROPY_BACKWARD, .in = {x, y, cg}, .nin = 3, .i = {n->i[0]}};
  grads[0] = pmp_run_new(&a, x->sizes, x->ndim, x->dtype_id, x->dev);
  pmp_tensor_release(cg);
  return grads[0] ? 0 : -1;
}
