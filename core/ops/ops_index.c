/* Indexing ops: gather / scatter_add along a dim, index_select / index_add of whole slices. */
#include "internal.h"

#define SHAPE(t, buf) pmp_shape_str((t)->sizes, (t)->ndim, buf, sizeof buf)

static bool check_index_dtype(const pmp_tensor *index, const char *op) {
  if (index->dtype_id == PMP_I64 || index->dtype_id == PMP_I32 || index->dtype_id == PMP_U8) return true;
  pmp_fail("%s: indices must be an integer tensor, got %s", op, pmp_dtype_name(index->dtype_id));
  return false;
}

/* gather/scatter need index of t's rank, no larger than t outside dim (src, when given, at least index). */
static bool check_gather_shapes(const pmp_tensor *t, int dim, const pmp_tensor *index, const pmp_tensor *src,
                                const char *op) {
  char st[PMP_SHAPE_BUF], si[PMP_SHAPE_BUF];
  bool ok = index->ndim == t->ndim;
  for (int d = 0; ok && d < t->ndim; d++) {
    if (d != dim && index->sizes[d] > t->sizes[d]) ok = false;
    if (src && index->sizes[d] > src->sizes[d]) ok = false;
  }
  if (!ok)
    pmp_fail("%s: index of shape %s does not fit a tensor of shape %s along dim %d", op, SHAPE(index, si), SHAPE(t, st), dim + 1);
  return ok;
}

pmp_tensor *pmp_gather(pmp_tensor *t, int dim, pmp_tensor *index) {
  if (!t || !index) return NULL;
  if (!pmp_wrap_dim(&dim, t->ndim, "gather") || !check_index_dtype(index, "gather") ||
      !check_gather_shapes(t, dim, index, NULL, "gather") || !pmp_same_device(t, index, "gather"))
    return NULL;
  pmp_op_args a = {.op = PMP_OP_GATHER, .out = pmp_empty_shape(index->sizes, index->ndim, t->dtype_id, t->dev),
                   .in = {t, index}, .nin = 2, .i = {dim}};
  pmp_node *n;
  pmp_tensor *out = pmp_run_op(&a, &t, 1, &index, 1, &n);
  if (n) n->i[0] = dim;
  return out;
}

int pmp_backward_gather(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *zeros = pmp_full(PMP_IN_SHAPE(n, 0), 0.0, g->dtype_id, g->dev);
  grads[0] = pmp_scatter_add(zeros, (int)n->i[0], n->saved[0], g);
  pmp_tensor_release(zeros);
  return grads[0] ? 0 : -1;
}

pmp_tensor *pmp_scatter_add(pmp_tensor *t, int dim, pmp_tensor *index, pmp_tensor *src) {
  if (!t || !index || !src) return NULL;
  if (!pmp_wrap_dim(&dim, t->ndim, "scatter_add") || !check_index_dtype(index, "scatter_add") ||
      !check_gather_shapes(t, dim, index, src, "scatter_add") || !pmp_same_device(t, src, "scatter_add"))
    return NULL;
  int previous = pmp_set_grad_enabled(0);
  pmp_op_args a = {.op = PMP_OP_SCATTER_ADD, .out = pmp_clone(t), .in = {index, src}, .nin = 2, .i = {dim}};
  pmp_set_grad_enabled(previous);
  pmp_tensor *inputs[2] = {t, src};
  pmp_node *n;
  pmp_tensor *out = pmp_run_op(&a, inputs, 2, &index, 1, &n);
  if (n) n->i[0] = dim;
  return out;
}

int pmp_backward_scatter_add(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  if (PMP_NEEDS(n, 0)) {
    pmp_tensor_retain(g);
    grads[0] = g;
  }
  if (PMP_NEEDS(n, 1)) {
    /* src may be larger than index; its untouched elements get zero gradient */
    pmp_tensor *picked = pmp_gather(g, (int)n->i[0], n->saved[0]);
    pmp_tensor *zeros = picked ? pmp_full(PMP_IN_SHAPE(n, 1), 0.0, g->dtype_id, g->dev) : NULL;
    pmp_tensor *slot = zeros;
    if (zeros) pmp_tensor_retain(slot);
    for (int d = 0; slot && d < picked->ndim; d++) {
      pmp_tensor *narrowed = pmp_narrow(slot, d, 0, picked->sizes[d]);
      pmp_tensor_release(slot);
      slot = narrowed;
    }
    int rc = slot ? pmp_copy_into(slot, picked) : -1;
    pmp_tensor_release(slot);
    pmp_tensor_release(picked);
    if (rc != 0) {
      pmp_tensor_release(zeros);
      return -1;
    }
    grads[1] = zeros;
  }
  return 0;
}

static bool check_select_index(const pmp_tensor *index, const char *op) {
  char si[PMP_SHAPE_BUF];
  if (!check_index_dtype(index, op)) return false;
  if (index->ndim > 1) {
    pmp_fail("%s: index must be 1-D, got shape %s", op, SHAPE(index, si));
    return false;
  }
  return true;
}

pmp_tensor *pmp_index_select(pmp_tensor *t, int dim, pmp_tensor *index) {
  if (!t || !index) return NULL;
  if (!pmp_wrap_dim(&dim, t->ndim, "index_select") || !check_select_index(index, "index_select") ||
      !pmp_same_device(t, index, "index_select"))
    return NULL;
  pmp_scope s = {0};
  pmp_tensor *src = pmp_keep(&s, pmp_contiguous(t));
  pmp_tensor *idx = pmp_keep(&s, pmp_contiguous(index));
  int64_t shape[PMP_MAX_DIMS];
  memcpy(shape, t->sizes, sizeof shape);
  if (t->ndim > 0) shape[dim] = pmp_numel(index);
  pmp_tensor *out = NULL;
  if (src && idx) {
    pmp_op_args a = {.op = PMP_OP_INDEX_SELECT, .out = pmp_empty_shape(shape, t->ndim, t->dtype_id, t->dev),
                     .in = {src, idx}, .nin = 2, .i = {dim}};
    pmp_node *n;
    out = pmp_run_op(&a, &t, 1, &idx, 1, &n);
    if (n) n->i[0] = dim;
  }
  pmp_scope_end(&s);
  return out;
}

int pmp_backward_index_select(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *zeros = pmp_full(PMP_IN_SHAPE(n, 0), 0.0, g->dtype_id, g->dev);
  grads[0] = pmp_index_add(zeros, (int)n->i[0], n->saved[0], g);
  pmp_tensor_release(zeros);
  return grads[0] ? 0 : -1;
}

pmp_tensor *pmp_index_add(pmp_tensor *t, int dim, pmp_tensor *index, pmp_tensor *src) {
  if (!t || !index || !src) return NULL;
  char st[PMP_SHAPE_BUF], ss[PMP_SHAPE_BUF];
  if (!pmp_wrap_dim(&dim, t->ndim, "index_add") || !check_select_index(index, "index_add") ||
      !pmp_same_device(t, src, "index_add"))
    return NULL;
  bool fits = src->ndim == t->ndim;
  for (int d = 0; fits && d < t->ndim; d++) fits = d == dim ? src->sizes[d] == pmp_numel(index) : src->sizes[d] == t->sizes[d];
  if (!fits)
    return pmp_fail("index_add: source of shape %s does not match a tensor of shape %s with %lld indices along dim %d",
                    SHAPE(src, ss), SHAPE(t, st), (long long)pmp_numel(index), dim + 1);
  pmp_scope s = {0};
  pmp_tensor *csrc = pmp_keep(&s, pmp_to_dtype(src, t->dtype_id));
  pmp_tensor *contiguous_src = pmp_keep(&s, pmp_contiguous(csrc));
  pmp_tensor *idx = pmp_keep(&s, pmp_contiguous(index));
  pmp_op_args a = {.op = PMP_OP_INDEX_ADD, .out = pmp_empty_like(t, -1), .in = {idx, contiguous_src}, .nin = 2,
                   .i = {dim}};
  if (a.out && (!contiguous_src || !idx || pmp_copy_into(a.out, t) != 0)) {
    pmp_tensor_release(a.out);
    a.out = NULL;
  }
  pmp_tensor *inputs[2] = {t, csrc};
  pmp_node *n;
  pmp_tensor *out = pmp_run_op(&a, inputs, 2, &idx, 1, &n);
  if (n) n->i[0] = dim;
  pmp_scope_end(&s);
  return out;
}

int pmp_backward_index_add(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  if (PMP_NEEDS(n, 0)) {
    pmp_tensor_retain(g);
    grads[0] = g;
  }
  if (PMP_NEEDS(n, 1) && !(grads[1] = pmp_index_select(g, (int)n->i[0], n->saved[0]))) return -1;
  return 0;
}
