/* Reductions: sum and mean over any set of dims, max/min/argmax/argmin over one dim. */
#include "internal.h"

/*
 * Kernels see a contiguous tensor as [outer, reduced, inner]. When the reduced dims are adjacent in a
 * contiguous input that is the input itself; otherwise the kept dims are permuted to the front and the
 * input copied, so the reduced block becomes the trailing one.
 */
typedef struct reduce_plan {
  pmp_tensor *src;          /* contiguous, owned */
  int64_t outer, reduced, inner;
  int64_t out_shape[PMP_MAX_DIMS];
  int out_ndim;
  int64_t keep_shape[PMP_MAX_DIMS];   /* output shape with reduced dims kept as 1 */
} reduce_plan;

static bool plan_reduce(pmp_tensor *t, const bool *reduce, bool keepdim, reduce_plan *p) {
  int first = -1, last = -1, count = 0;
  p->out_ndim = 0;
  for (int d = 0; d < t->ndim; d++) {
    p->keep_shape[d] = reduce[d] ? 1 : t->sizes[d];
    if (reduce[d]) {
      if (first < 0) first = d;
      last = d;
      count++;
    }
    if (!reduce[d] || keepdim) p->out_shape[p->out_ndim++] = reduce[d] ? 1 : t->sizes[d];
  }
  bool adjacent = count == 0 || last - first + 1 == count;
  p->outer = p->reduced = p->inner = 1;
  if (adjacent && pmp_is_contiguous(t)) {
    for (int d = 0; d < t->ndim; d++) {
      if (count && d < first) p->outer *= t->sizes[d];
      else if (count && d <= last) p->reduced *= t->sizes[d];
      else p->inner *= t->sizes[d];
    }
    if (count == 0) p->outer = p->inner, p->inner = 1;
    pmp_tensor_retain(t);
    p->src = t;
    return true;
  }
  int perm[PMP_MAX_DIMS], n = 0;
  for (int d = 0; d < t->ndim; d++)
    if (!reduce[d]) perm[n++] = d, p->outer *= t->sizes[d];
  for (int d = 0; d < t->ndim; d++)
    if (reduce[d]) perm[n++] = d, p->reduced *= t->sizes[d];
  int previous = pmp_set_grad_enabled(0);
  pmp_tensor *permuted = pmp_permute(t, perm, t->ndim);
  p->src = pmp_contiguous(permuted);
  pmp_set_grad_enabled(previous);
  pmp_tensor_release(permuted);
  return p->src != NULL;
}

static bool dims_to_mask(const pmp_tensor *t, const int *dims, int ndims, bool *reduce, const char *op) {
  for (int d = 0; d < PMP_MAX_DIMS; d++) reduce[d] = ndims == 0;
  for (int k = 0; k < ndims; k++) {
    int d = dims[k];
    if (!pmp_wrap_dim(&d, t->ndim, op)) return false;
    reduce[d] = true;
  }
  return true;
}

static int64_t reduce_mask(const bool *reduce, int ndim) {
  int64_t mask = 0;
  for (int d = 0; d < ndim; d++)
    if (reduce[d]) mask |= (int64_t)1 << d;
  return mask;
}

/* Undoes a reduction's shape change: g reshaped with the reduced dims kept as 1, then expanded. */
static pmp_tensor *spread(pmp_node *n, pmp_tensor *g) {
  int64_t keep[PMP_MAX_DIMS];
  int ndim = n->in[0].ndim;
  for (int d = 0; d < ndim; d++) keep[d] = (n->i[1] >> d & 1) ? 1 : n->in[0].sizes[d];
  pmp_tensor *kept = pmp_reshape(g, keep, ndim);
  pmp_tensor *out = pmp_expand(kept, PMP_IN_SHAPE(n, 0));
  pmp_tensor_release(kept);
  return out;
}

static pmp_tensor *sum_or_mean(pmp_tensor *t, const int *dims, int ndims, int keepdim, int op) {
  if (!t) return NULL;
  const char *name = pmp_op_name(op);
  bool reduce[PMP_MAX_DIMS];
  if (!dims_to_mask(t, dims, ndims, reduce, name)) return NULL;
  reduce_plan p;
  if (!plan_reduce(t, reduce, keepdim != 0, &p)) return NULL;
  int dtype = pmp_dtype_is_float(t->dtype_id) ? t->dtype_id : (op == PMP_OP_MEAN ? PMP_F32 : PMP_I64);
  pmp_op_args a = {.op = op, .out = pmp_empty_shape(p.out_shape, p.out_ndim, dtype, t->dev), .in = {p.src}, .nin = 1,
                   .i = {p.outer, p.reduced, p.inner}};
  pmp_node *n;
  pmp_tensor *out = pmp_run_op(&a, &t, 1, NULL, 0, &n);
  pmp_tensor_release(p.src);
  if (n) n->i[0] = p.reduced, n->i[1] = reduce_mask(reduce, t->ndim);
  return out;
}

pmp_tensor *pmp_sum(pmp_tensor *t, const int *dims, int ndims, int keepdim) {
  return sum_or_mean(t, dims, ndims, keepdim, PMP_OP_SUM);
}

pmp_tensor *pmp_mean(pmp_tensor *t, const int *dims, int ndims, int keepdim) {
  return sum_or_mean(t, dims, ndims, keepdim, PMP_OP_MEAN);
}

int pmp_backward_sum(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *spread_g = spread(n, g);
  if (n->op == PMP_OP_MEAN && spread_g) {
    pmp_tensor *scale = pmp_scalar(1.0 / (double)(n->i[0] ? n->i[0] : 1), g->dtype_id, g->dev);
    grads[0] = pmp_binary(PMP_OP_MUL, spread_g, scale);
    pmp_tensor_release(scale);
    pmp_tensor_release(spread_g);
  } else {
    grads[0] = spread_g;
  }
  return grads[0] ? 0 : -1;
}

/* max/min/argmax/argmin over one dim. *indices receives the positions when asked for. */
static pmp_tensor *reduce_index(pmp_tensor *t, int dim, int keepdim, pmp_tensor **indices, int op) {
  if (indices) *indices = NULL;
  if (!t) return NULL;
  const char *name = pmp_op_name(op);
  char st[PMP_SHAPE_BUF];
  if (!pmp_wrap_dim(&dim, t->ndim, name)) return NULL;
  if (t->ndim > 0 && t->sizes[dim] == 0)
    return pmp_fail("%s: cannot reduce over the empty dim %d of a tensor of shape %s", name, dim + 1,
                    pmp_shape_str(t->sizes, t->ndim, st, sizeof st));
  bool reduce[PMP_MAX_DIMS] = {0};
  reduce[dim] = t->ndim > 0;
  reduce_plan p;
  if (!plan_reduce(t, reduce, keepdim != 0, &p)) return NULL;
  bool want_values = op == PMP_OP_MAX || op == PMP_OP_MIN;
  pmp_tensor *values = want_values ? pmp_empty_shape(p.out_shape, p.out_ndim, t->dtype_id, t->dev) : NULL;
  pmp_tensor *idx = pmp_empty_shape(p.out_shape, p.out_ndim, PMP_I64, t->dev);
  /* max/min's node saves the indices with the reduced dim kept, for its backward to scatter through */
  pmp_tensor *kept_idx = NULL;
  if (want_values && idx) kept_idx = keepdim || t->ndim == 0 ? (pmp_tensor_retain(idx), idx) : pmp_unsqueeze(idx, dim);
  pmp_op_args a = {.op = op, .out = want_values ? values : idx, .out2 = idx, .in = {p.src}, .nin = 1,
                   .i = {p.outer, p.reduced, p.inner}};
  if (!idx || (want_values && !kept_idx)) {   /* making one of them failed */
    pmp_tensor_release(a.out);
    a.out = NULL;
  }
  pmp_node *n;
  pmp_tensor *out = pmp_run_op(&a, &t, want_values ? 1 : 0, &kept_idx, 1, &n);
  pmp_tensor_release(kept_idx);
  pmp_tensor_release(p.src);
  if (n) n->i[0] = dim, n->i[1] = t->ndim > 0 ? (int64_t)1 << dim : 0;
  if (!want_values) return out;   /* argmax, argmin: the indices are the result */
  if (out && indices)
    *indices = idx;
  else
    pmp_tensor_release(idx);
  return out;
}

pmp_tensor *pmp_max(pmp_tensor *t, int dim, int keepdim, pmp_tensor **indices) {
  return reduce_index(t, dim, keepdim, indices, PMP_OP_MAX);
}
pmp_tensor *pmp_min(pmp_tensor *t, int dim, int keepdim, pmp_tensor **indices) {
  return reduce_index(t, dim, keepdim, indices, PMP_OP_MIN);
}
pmp_tensor *pmp_argmax(pmp_tensor *t, int dim, int keepdim) { return reduce_index(t, dim, keepdim, NULL, PMP_OP_ARGMAX); }
pmp_tensor *pmp_argmin(pmp_tensor *t, int dim, int keepdim) { return reduce_index(t, dim, keepdim, NULL, PMP_OP_ARGMIN); }

/* The gradient goes to the selected position only (the first one on ties). */
int pmp_backward_max(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  if (n->in[0].ndim == 0) {
    pmp_tensor_retain(g);
    grads[0] = g;
    return 0;
  }
  int64_t keep[PMP_MAX_DIMS];
  int ndim = n->in[0].ndim;
  for (int d = 0; d < ndim; d++) keep[d] = d == n->i[0] ? 1 : n->in[0].sizes[d];
  pmp_tensor *kept_g = pmp_reshape(g, keep, ndim);
  pmp_tensor *zeros = pmp_full(PMP_IN_SHAPE(n, 0), 0.0, g->dtype_id, g->dev);
  grads[0] = zeros && kept_g ? pmp_scatter_add(zeros, (int)n->i[0], n->saved[0], kept_g) : NULL;
  pmp_tensor_release(zeros);
  pmp_tensor_release(kept_g);
  return grads[0] ? 0 : -1;
}
