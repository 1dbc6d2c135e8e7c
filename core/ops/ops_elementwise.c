/* Elementwise ops: shape and dtype rules, dispatch, and backward rules. Kernels: cpu_elementwise.c. */
#include "internal.h"
#include <math.h>

static bool is_unary(int op) { return op >= PMP_OP_NEG && op <= PMP_OP_LOGICAL_NOT; }
static bool is_binary(int op) { return op >= PMP_OP_ADD && op <= PMP_OP_SILU_GRAD; }
static bool is_comparison(int op) { return op >= PMP_OP_EQ && op <= PMP_OP_LOGICAL_OR; }

static bool keeps_integers(int op) {
  return op == PMP_OP_NEG || op == PMP_OP_ABS || op == PMP_OP_RELU || op == PMP_OP_SIGN;
}

pmp_tensor *pmp_unary(int op, pmp_tensor *t) {
  if (!t) return NULL;
  if (!is_unary(op)) return pmp_fail("unary: op %d is not a unary op", op);
  int dtype = t->dtype_id;
  if (op == PMP_OP_LOGICAL_NOT)
    dtype = PMP_BOOL;
  else if (!pmp_dtype_is_float(dtype) && !keeps_integers(op))
    dtype = PMP_F32;
  pmp_op_args a = {.op = op, .out = pmp_empty_shape(t->sizes, t->ndim, dtype, t->dev), .in = {t}, .nin = 1};
  return pmp_run_op(&a, &t, 1, (pmp_tensor *[]){t, PMP_SAVED_OUTPUT}, 2, NULL);
}

int pmp_backward_unary(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *x = n->saved[0], *y = n->saved[1];
  pmp_scope s = {0};
#define K(e) pmp_keep(&s, (e))
#define S(v) K(pmp_scalar((v), g->dtype_id, g->dev))
  pmp_tensor *r = NULL;
  switch (n->op) {
  case PMP_OP_NEG: r = pmp_unary(PMP_OP_NEG, g); break;
  case PMP_OP_EXP: r = pmp_binary(PMP_OP_MUL, g, y); break;
  case PMP_OP_LOG: r = pmp_binary(PMP_OP_DIV, g, x); break;
  case PMP_OP_SQRT: r = pmp_binary(PMP_OP_DIV, g, K(pmp_binary(PMP_OP_MUL, y, S(2)))); break;
  case PMP_OP_RSQRT:
    r = pmp_binary(PMP_OP_MUL, g, K(pmp_binary(PMP_OP_MUL, S(-0.5), K(pmp_binary(PMP_OP_POW, y, S(3))))));
    break;
  case PMP_OP_ABS: r = pmp_binary(PMP_OP_MUL, g, K(pmp_unary(PMP_OP_SIGN, x))); break;
  case PMP_OP_SIN: r = pmp_binary(PMP_OP_MUL, g, K(pmp_unary(PMP_OP_COS, x))); break;
  case PMP_OP_COS: r = pmp_binary(PMP_OP_MUL, g, K(pmp_unary(PMP_OP_NEG, K(pmp_unary(PMP_OP_SIN, x))))); break;
  case PMP_OP_TANH:
    r = pmp_binary(PMP_OP_MUL, g, K(pmp_binary(PMP_OP_SUB, S(1), K(pmp_binary(PMP_OP_MUL, y, y)))));
    break;
  case PMP_OP_SIGMOID:
    r = pmp_binary(PMP_OP_MUL, g, K(pmp_binary(PMP_OP_MUL, y, K(pmp_binary(PMP_OP_SUB, S(1), y)))));
    break;
  case PMP_OP_RELU: r = pmp_where(K(pmp_binary(PMP_OP_GT, x, S(0))), g, S(0)); break;
  case PMP_OP_GELU: r = pmp_binary(PMP_OP_GELU_GRAD, x, g); break;
  case PMP_OP_GELU_TANH: r = pmp_binary(PMP_OP_GELU_TANH_GRAD, x, g); break;
  case PMP_OP_SILU: r = pmp_binary(PMP_OP_SILU_GRAD, x, g); break;
  case PMP_OP_SIGN: r = pmp_binary(PMP_OP_MUL, g, S(0)); break;
  }
  pmp_scope_end(&s);
  grads[0] = r;
  return r ? 0 : -1;
}

static int binary_result_dtype(int op, int promoted) {
  if (is_comparison(op)) return PMP_BOOL;
  if ((op == PMP_OP_DIV || op >= PMP_OP_GELU_GRAD) && !pmp_dtype_is_float(promoted)) return PMP_F32;
  return promoted;
}

static bool has_negative(pmp_tensor *t) {
  int64_t n = pmp_numel(t);
  pmp_tensor *c = pmp_contiguous(t);
  bool found = false;
  for (int64_t k = 0; c && k < n && !found; k++) found = pmp_load_as_i64(c->dtype_id, c->data + k * pmp_dtype_size(c->dtype_id)) < 0;
  pmp_tensor_release(c);
  return found;
}

pmp_tensor *pmp_binary(int op, pmp_tensor *a, pmp_tensor *b) {
  if (!a || !b) return NULL;
  if (!is_binary(op)) return pmp_fail("binary: op %d is not a binary op", op);
  const char *name = pmp_op_name(op);
  if (!pmp_same_device(a, b, name)) return NULL;
  int64_t shape[PMP_MAX_DIMS];
  int ndim;
  if (!pmp_broadcast_shapes(a->sizes, a->ndim, b->sizes, b->ndim, shape, &ndim)) {
    char sa[PMP_SHAPE_BUF], sb[PMP_SHAPE_BUF];
    return pmp_fail("%s: shapes %s and %s cannot be broadcast together", name,
                    pmp_shape_str(a->sizes, a->ndim, sa, sizeof sa), pmp_shape_str(b->sizes, b->ndim, sb, sizeof sb));
  }
  int promoted = pmp_promote_types(a->dtype_id, b->dtype_id);
  int operand_dtype = binary_result_dtype(op, promoted);
  if (is_comparison(op)) operand_dtype = promoted;
  pmp_scope s = {0};
  pmp_tensor *ca = a->dtype_id == operand_dtype ? a : pmp_keep(&s, pmp_to_dtype(a, operand_dtype));
  pmp_tensor *cb = b->dtype_id == operand_dtype ? b : pmp_keep(&s, pmp_to_dtype(b, operand_dtype));
  pmp_tensor *out = NULL;
  if (ca && cb && op == PMP_OP_POW && !pmp_dtype_is_float(operand_dtype) && has_negative(cb)) {
    pmp_scope_end(&s);
    return pmp_fail("pow: integers cannot be raised to negative integer powers (convert to a float dtype first)");
  }
  if (ca && cb) {
    pmp_tensor *va = pmp_keep(&s, pmp_broadcast_view(ca, shape, ndim));
    pmp_tensor *vb = pmp_keep(&s, pmp_broadcast_view(cb, shape, ndim));
    pmp_op_args args = {.op = op, .in = {va, vb}, .nin = 2};
    if (va && vb) args.out = pmp_empty_shape(shape, ndim, binary_result_dtype(op, promoted), a->dev);
    pmp_tensor *inputs[2] = {ca, cb};
    out = pmp_run_op(&args, inputs, 2, (pmp_tensor *[]){ca, cb, PMP_SAVED_OUTPUT}, 3, NULL);
  }
  pmp_scope_end(&s);
  return out;
}

/* The gradient of each input is the given expression summed back to that input's shape. */
static pmp_tensor *reduce_to_input(pmp_node *n, int k, pmp_tensor *full) {
  if (!full) return NULL;
  pmp_tensor *r = pmp_sum_to_shape(full, PMP_IN_SHAPE(n, k));
  pmp_tensor_release(full);
  return r;
}

int pmp_backward_binary(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *a = n->saved[0], *b = n->saved[1], *y = n->saved[2];
  bool need_a = PMP_NEEDS(n, 0), need_b = PMP_NEEDS(n, 1);
  pmp_scope s = {0};
  pmp_tensor *ga = NULL, *gb = NULL;
  switch (n->op) {
  case PMP_OP_ADD:   /* both inputs share g: autograd adds into a gradient in place only when it alone holds it */
    if (need_a) ga = (pmp_tensor_retain(g), g);
    if (need_b) gb = (pmp_tensor_retain(g), g);
    break;
  case PMP_OP_SUB:
    if (need_a) ga = (pmp_tensor_retain(g), g);
    if (need_b) gb = pmp_unary(PMP_OP_NEG, g);
    break;
  case PMP_OP_MUL:
    if (need_a) ga = pmp_binary(PMP_OP_MUL, g, b);
    if (need_b) gb = pmp_binary(PMP_OP_MUL, g, a);
    break;
  case PMP_OP_DIV:
    if (need_a) ga = pmp_binary(PMP_OP_DIV, g, b);
    if (need_b) gb = pmp_unary(PMP_OP_NEG, K(pmp_binary(PMP_OP_DIV, K(pmp_binary(PMP_OP_MUL, g, y)), b)));
    break;
  case PMP_OP_POW:
    if (need_a)
      ga = pmp_binary(PMP_OP_MUL, K(pmp_binary(PMP_OP_MUL, g, b)),
                      K(pmp_binary(PMP_OP_POW, a, K(pmp_binary(PMP_OP_SUB, b, S(1))))));
    if (need_b) gb = pmp_binary(PMP_OP_MUL, K(pmp_binary(PMP_OP_MUL, g, y)), K(pmp_unary(PMP_OP_LOG, a)));
    break;
  case PMP_OP_MAXIMUM:
  case PMP_OP_MINIMUM: {
    /* ties split the gradient evenly, as PyTorch does */
    int wins = n->op == PMP_OP_MAXIMUM ? PMP_OP_GT : PMP_OP_LT;
    pmp_tensor *share = K(pmp_binary(PMP_OP_ADD, K(pmp_to_dtype(K(pmp_binary(wins, a, b)), g->dtype_id)),
                                     K(pmp_binary(PMP_OP_MUL, S(0.5), K(pmp_to_dtype(K(pmp_binary(PMP_OP_EQ, a, b)), g->dtype_id))))));
    if (need_a) ga = pmp_binary(PMP_OP_MUL, g, share);
    if (need_b) gb = pmp_binary(PMP_OP_MUL, g, K(pmp_binary(PMP_OP_SUB, S(1), share)));
    break;
  }
  }
  pmp_scope_end(&s);
  if (need_a) grads[0] = reduce_to_input(n, 0, ga);
  if (need_b) grads[1] = reduce_to_input(n, 1, gb);
  return (need_a && !grads[0]) || (need_b && !grads[1]) ? -1 : 0;
}

pmp_tensor *pmp_where(pmp_tensor *cond, pmp_tensor *a, pmp_tensor *b) {
  if (!cond || !a || !b) return NULL;
  if (!pmp_same_device(cond, a, "where") || !pmp_same_device(a, b, "where")) return NULL;
  int64_t ab[PMP_MAX_DIMS], shape[PMP_MAX_DIMS];
  int nab, ndim;
  char sc[PMP_SHAPE_BUF], sa[PMP_SHAPE_BUF], sb[PMP_SHAPE_BUF];
  if (!pmp_broadcast_shapes(a->sizes, a->ndim, b->sizes, b->ndim, ab, &nab) ||
      !pmp_broadcast_shapes(cond->sizes, cond->ndim, ab, nab, shape, &ndim))
    return pmp_fail("where: shapes %s (condition), %s and %s cannot be broadcast together",
                    pmp_shape_str(cond->sizes, cond->ndim, sc, sizeof sc), pmp_shape_str(a->sizes, a->ndim, sa, sizeof sa),
                    pmp_shape_str(b->sizes, b->ndim, sb, sizeof sb));
  int dtype = pmp_promote_types(a->dtype_id, b->dtype_id);
  pmp_scope s = {0};
  pmp_tensor *ca = a->dtype_id == dtype ? a : pmp_keep(&s, pmp_to_dtype(a, dtype));
  pmp_tensor *cb = b->dtype_id == dtype ? b : pmp_keep(&s, pmp_to_dtype(b, dtype));
  pmp_tensor *cc = cond->dtype_id == PMP_BOOL ? cond : pmp_keep(&s, pmp_to_dtype(cond, PMP_BOOL));
  pmp_tensor *out = NULL;
  if (ca && cb && cc) {
    pmp_op_args args = {.op = PMP_OP_WHERE, .nin = 3,
                        .in = {pmp_keep(&s, pmp_broadcast_view(cc, shape, ndim)), pmp_keep(&s, pmp_broadcast_view(ca, shape, ndim)),
                               pmp_keep(&s, pmp_broadcast_view(cb, shape, ndim))}};
    args.out = pmp_empty_shape(shape, ndim, dtype, a->dev);
    pmp_tensor *inputs[2] = {ca, cb};
    out = pmp_run_op(&args, inputs, 2, &cc, 1, NULL);
  }
  pmp_scope_end(&s);
  return out;
}

int pmp_backward_where(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *cond = n->saved[0];
  pmp_scope s = {0};
  pmp_tensor *zero = S(0);
  if (PMP_NEEDS(n, 0)) grads[0] = reduce_to_input(n, 0, pmp_where(cond, g, zero));
  if (PMP_NEEDS(n, 1)) grads[1] = reduce_to_input(n, 1, pmp_where(cond, zero, g));
  pmp_scope_end(&s);
  return (PMP_NEEDS(n, 0) && !grads[0]) || (PMP_NEEDS(n, 1) && !grads[1]) ? -1 : 0;
}

pmp_tensor *pmp_clamp(pmp_tensor *t, double min, double max) {
  if (!t) return NULL;
  if (min > max) return pmp_fail("clamp: min %g is greater than max %g", min, max);
  pmp_op_args a = {.op = PMP_OP_CLAMP, .out = pmp_empty_shape(t->sizes, t->ndim, t->dtype_id, t->dev), .in = {t},
                   .nin = 1, .f = {min, max}};
  pmp_node *n;
  pmp_tensor *out = pmp_run_op(&a, &t, 1, &t, 1, &n);
  if (n) n->f[0] = min, n->f[1] = max;
  return out;
}

int pmp_backward_clamp(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *x = n->saved[0];
  pmp_scope s = {0};
  pmp_tensor *inside = K(pmp_binary(PMP_OP_LOGICAL_AND, K(pmp_binary(PMP_OP_GE, x, S(n->f[0]))),
                                    K(pmp_binary(PMP_OP_LE, x, S(n->f[1])))));
  grads[0] = pmp_where(inside, g, S(0));
  pmp_scope_end(&s);
  return grads[0] ? 0 : -1;
}

pmp_tensor *pmp_masked_fill(pmp_tensor *t, pmp_tensor *mask, double value) {
  if (!t || !mask) return NULL;
  if (!pmp_same_device(t, mask, "masked_fill")) return NULL;
  int64_t shape[PMP_MAX_DIMS];
  int ndim;
  char st[PMP_SHAPE_BUF], sm[PMP_SHAPE_BUF];
  if (!pmp_broadcast_shapes(t->sizes, t->ndim, mask->sizes, mask->ndim, shape, &ndim) || ndim != t->ndim ||
      memcmp(shape, t->sizes, sizeof(int64_t) * (size_t)ndim) != 0)
    return pmp_fail("masked_fill: mask of shape %s does not broadcast to the tensor's shape %s",
                    pmp_shape_str(mask->sizes, mask->ndim, sm, sizeof sm), pmp_shape_str(t->sizes, t->ndim, st, sizeof st));
  if (pmp_dtype_is_float(mask->dtype_id))
    return pmp_fail("masked_fill: the mask must be bool (or integer), got %s", pmp_dtype_name(mask->dtype_id));
  pmp_scope s = {0};
  pmp_tensor *m = mask->dtype_id == PMP_BOOL ? mask : pmp_keep(&s, pmp_to_dtype(mask, PMP_BOOL));
  pmp_tensor *out = NULL;
  if (m) {
    pmp_op_args a = {.op = PMP_OP_MASKED_FILL, .in = {t, pmp_keep(&s, pmp_broadcast_view(m, shape, ndim))}, .nin = 2,
                     .f = {value}};
    a.out = pmp_empty_shape(shape, ndim, t->dtype_id, t->dev);
    out = pmp_run_op(&a, &t, 1, &m, 1, NULL);
  }
  pmp_scope_end(&s);
  return out;
}

int pmp_backward_masked_fill(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  grads[0] = pmp_masked_fill(g, n->saved[0], 0.0);
  return grads[0] ? 0 : -1;
}

static pmp_tensor *tri(pmp_tensor *t, int64_t diagonal, bool lower) {
  if (!t) return NULL;
  const char *name = lower ? "tril" : "triu";
  char st[PMP_SHAPE_BUF];
  if (t->ndim < 2)
    return pmp_fail("%s: needs a tensor with at least 2 dims, got shape %s", name, pmp_shape_str(t->sizes, t->ndim, st, sizeof st));
  pmp_tensor *c = pmp_is_contiguous(t) ? (pmp_tensor_retain(t), t) : pmp_contiguous(t);
  if (!c) return NULL;
  pmp_op_args a = {.op = lower ? PMP_OP_TRIL : PMP_OP_TRIU, .out = pmp_empty_shape(t->sizes, t->ndim, t->dtype_id, t->dev),
                   .in = {c}, .nin = 1, .i = {diagonal, lower}};
  pmp_node *n;
  pmp_tensor *out = pmp_run_op(&a, &t, 1, NULL, 0, &n);
  pmp_tensor_release(c);
  if (n) n->i[0] = diagonal;
  return out;
}

pmp_tensor *pmp_tril(pmp_tensor *t, int64_t diagonal) { return tri(t, diagonal, true); }
pmp_tensor *pmp_triu(pmp_tensor *t, int64_t diagonal) { return tri(t, diagonal, false); }

int pmp_backward_tri(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  grads[0] = tri(g, n->i[0], n->op == PMP_OP_TRIL);
  return grads[0] ? 0 : -1;
}
#undef K
#undef S
