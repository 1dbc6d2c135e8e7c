/* Views (no copy) and shape ops: view, reshape, permute, expand, narrow, cat, conversions. */
#include "internal.h"
#include <stdio.h>

#define SHAPE(t, buf) pmp_shape_str((t)->sizes, (t)->ndim, buf, sizeof buf)

/* Records a view op's node; on failure releases out. */
static pmp_tensor *record_view(int op, pmp_tensor *out, pmp_tensor *in) {
  if (!out || !pmp_needs_grad(&in, 1)) return out;
  if (!pmp_record(op, out, &in, 1, NULL, 0)) {
    pmp_tensor_release(out);
    return NULL;
  }
  return out;
}

pmp_tensor *pmp_detach(pmp_tensor *t) {
  if (!t) return NULL;
  return pmp_tensor_new_view(t, t->sizes, t->strides, t->ndim, t->offset);
}

/* Fills in a -1 dim; fails unless the element count matches. */
static bool resolve_shape(const pmp_tensor *t, const int64_t *shape, int ndim, int64_t *out, const char *op) {
  char st[PMP_SHAPE_BUF], sn[PMP_SHAPE_BUF];
  if (ndim < 0 || ndim > PMP_MAX_DIMS) {
    pmp_fail("%s: %d dims requested, at most %d supported", op, ndim, PMP_MAX_DIMS);
    return false;
  }
  int infer = -1;
  int64_t known = 1;
  for (int d = 0; d < ndim; d++) {
    out[d] = shape[d];
    if (shape[d] == -1 && infer < 0) {
      infer = d;
      continue;
    }
    if (shape[d] < 0) {
      pmp_fail("%s: invalid size %lld in shape %s", op, (long long)shape[d], pmp_shape_str(shape, ndim, sn, sizeof sn));
      return false;
    }
    known *= shape[d];
  }
  int64_t n = pmp_numel(t);
  if (infer >= 0) {
    if (known == 0 || n % known != 0) {
      pmp_fail("%s: shape %s is invalid for a tensor of shape %s", op, pmp_shape_str(shape, ndim, sn, sizeof sn), SHAPE(t, st));
      return false;
    }
    out[infer] = n / known;
    known = n;
  }
  if (known != n) {
    pmp_fail("%s: shape %s is invalid for a tensor of shape %s (%lld elements)", op,
             pmp_shape_str(shape, ndim, sn, sizeof sn), SHAPE(t, st), (long long)n);
    return false;
  }
  return true;
}

/* Strides for viewing t as shape without copying, or false when the layout does not allow it. */
static bool view_strides(const pmp_tensor *t, const int64_t *shape, int ndim, int64_t *stride) {
  if (pmp_numel(t) == 0 || pmp_is_contiguous(t)) {
    pmp_contiguous_strides(shape, ndim, stride);
    return true;
  }
  /* Walk the old dims in chunks that are contiguous among themselves; each chunk maps onto new dims. */
  int view_d = ndim - 1;
  int64_t chunk_base_stride = t->strides[t->ndim - 1];
  int64_t tensor_numel = 1, view_numel = 1;
  for (int d = t->ndim - 1; d >= 0; d--) {
    tensor_numel *= t->sizes[d];
    if (d == 0 || (t->sizes[d - 1] != 1 && t->strides[d - 1] != tensor_numel * chunk_base_stride)) {
      while (view_d >= 0 && (view_numel < tensor_numel || shape[view_d] == 1)) {
        stride[view_d] = view_numel * chunk_base_stride;
        view_numel *= shape[view_d];
        view_d--;
      }
      if (view_numel != tensor_numel) return false;
      if (d > 0) {
        chunk_base_stride = t->strides[d - 1];
        tensor_numel = 1;
        view_numel = 1;
      }
    }
  }
  return view_d == -1;
}

pmp_tensor *pmp_view(pmp_tensor *t, const int64_t *shape, int ndim) {
  if (!t) return NULL;
  int64_t resolved[PMP_MAX_DIMS], stride[PMP_MAX_DIMS];
  if (!resolve_shape(t, shape, ndim, resolved, "view")) return NULL;
  if (!view_strides(t, resolved, ndim, stride)) {
    char st[PMP_SHAPE_BUF], sn[PMP_SHAPE_BUF];
    return pmp_fail("view: shape %s is not compatible with the layout of a non-contiguous tensor of shape %s "
                    "(use reshape, which copies)",
                    pmp_shape_str(resolved, ndim, sn, sizeof sn), SHAPE(t, st));
  }
  return record_view(PMP_OP_VIEW, pmp_tensor_new_view(t, resolved, stride, ndim, t->offset), t);
}

pmp_tensor *pmp_reshape(pmp_tensor *t, const int64_t *shape, int ndim) {
  if (!t) return NULL;
  int64_t resolved[PMP_MAX_DIMS], stride[PMP_MAX_DIMS];
  if (!resolve_shape(t, shape, ndim, resolved, "reshape")) return NULL;
  if (view_strides(t, resolved, ndim, stride)) return pmp_view(t, resolved, ndim);
  pmp_tensor *c = pmp_contiguous(t);
  pmp_tensor *v = pmp_view(c, resolved, ndim);
  pmp_tensor_release(c);
  return v;
}

int pmp_backward_view(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  grads[0] = pmp_reshape(g, PMP_IN_SHAPE(n, 0));
  return grads[0] ? 0 : -1;
}

pmp_tensor *pmp_permute(pmp_tensor *t, const int *dims, int ndim) {
  if (!t) return NULL;
  char st[PMP_SHAPE_BUF];
  if (ndim != t->ndim) return pmp_fail("permute: %d dims given for a tensor of shape %s", ndim, SHAPE(t, st));
  int64_t shape[PMP_MAX_DIMS], stride[PMP_MAX_DIMS];
  bool seen[PMP_MAX_DIMS] = {0};
  int wrapped[PMP_MAX_DIMS];
  for (int k = 0; k < ndim; k++) {
    int d = dims[k];
    if (!pmp_wrap_dim(&d, ndim, "permute")) return NULL;
    if (seen[d]) return pmp_fail("permute: dim %d repeated in the permutation of a tensor of shape %s", d + 1, SHAPE(t, st));
    seen[d] = true;
    wrapped[k] = d;
    shape[k] = t->sizes[d];
    stride[k] = t->strides[d];
  }
  pmp_tensor *out = record_view(PMP_OP_PERMUTE, pmp_tensor_new_view(t, shape, stride, ndim, t->offset), t);
  if (out && out->grad_fn) {
    out->grad_fn->ivec = malloc(sizeof(int64_t) * (size_t)ndim);
    if (!out->grad_fn->ivec) {
      pmp_tensor_release(out);
      return pmp_fail("permute: out of memory");
    }
    for (int k = 0; k < ndim; k++) out->grad_fn->ivec[k] = wrapped[k];
    out->grad_fn->nivec = ndim;
  }
  return out;
}

int pmp_backward_permute(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  int inverse[PMP_MAX_DIMS];
  for (int k = 0; k < n->nivec; k++) inverse[n->ivec[k]] = k;
  grads[0] = pmp_permute(g, inverse, n->nivec);
  return grads[0] ? 0 : -1;
}

pmp_tensor *pmp_transpose(pmp_tensor *t, int dim0, int dim1) {
  if (!t) return NULL;
  if (!pmp_wrap_dim(&dim0, t->ndim, "transpose") || !pmp_wrap_dim(&dim1, t->ndim, "transpose")) return NULL;
  int dims[PMP_MAX_DIMS];
  for (int k = 0; k < t->ndim; k++) dims[k] = k;
  dims[dim0] = dim1;
  dims[dim1] = dim0;
  return pmp_permute(t, dims, t->ndim);
}

pmp_tensor *pmp_unsqueeze(pmp_tensor *t, int dim) {
  if (!t) return NULL;
  if (t->ndim >= PMP_MAX_DIMS) return pmp_fail("unsqueeze: a tensor already has the maximum of %d dims", PMP_MAX_DIMS);
  if (!pmp_wrap_dim(&dim, t->ndim + 1, "unsqueeze")) return NULL;
  int64_t shape[PMP_MAX_DIMS], stride[PMP_MAX_DIMS];
  for (int k = 0, src = 0; k <= t->ndim; k++) {
    if (k == dim) {
      shape[k] = 1;
      stride[k] = src < t->ndim ? t->strides[src] * t->sizes[src] : 1;
      continue;
    }
    shape[k] = t->sizes[src];
    stride[k] = t->strides[src];
    src++;
  }
  return record_view(PMP_OP_VIEW, pmp_tensor_new_view(t, shape, stride, t->ndim + 1, t->offset), t);
}

pmp_tensor *pmp_squeeze(pmp_tensor *t, int dim) {
  if (!t) return NULL;
  bool all = dim < 0;
  if (!all && dim >= (t->ndim ? t->ndim : 1))
    return pmp_fail("squeeze: dimension %d out of range for a tensor with %d dims", dim, t->ndim);
  int64_t shape[PMP_MAX_DIMS], stride[PMP_MAX_DIMS];
  int ndim = 0;
  for (int k = 0; k < t->ndim; k++) {
    if (t->sizes[k] == 1 && (all || k == dim)) continue;
    shape[ndim] = t->sizes[k];
    stride[ndim] = t->strides[k];
    ndim++;
  }
  return record_view(PMP_OP_VIEW, pmp_tensor_new_view(t, shape, stride, ndim, t->offset), t);
}

pmp_tensor *pmp_expand(pmp_tensor *t, const int64_t *shape, int ndim) {
  if (!t) return NULL;
  char st[PMP_SHAPE_BUF], sn[PMP_SHAPE_BUF];
  if (ndim < t->ndim || ndim > PMP_MAX_DIMS)
    return pmp_fail("expand: cannot expand a tensor of shape %s to %d dims", SHAPE(t, st), ndim);
  int64_t resolved[PMP_MAX_DIMS], stride[PMP_MAX_DIMS];
  int lead = ndim - t->ndim;
  for (int k = 0; k < ndim; k++) {
    int64_t want = shape[k];
    if (k < lead) {
      if (want < 0) return pmp_fail("expand: size -1 is not allowed for the new leading dim %d", k + 1);
      resolved[k] = want;
      stride[k] = 0;
      continue;
    }
    int64_t have = t->sizes[k - lead];
    if (want == -1) want = have;
    if (want != have && have != 1)
      return pmp_fail("expand: cannot expand a tensor of shape %s to %s", SHAPE(t, st), pmp_shape_str(shape, ndim, sn, sizeof sn));
    resolved[k] = want;
    stride[k] = want == have ? t->strides[k - lead] : 0;
  }
  return record_view(PMP_OP_EXPAND, pmp_tensor_new_view(t, resolved, stride, ndim, t->offset), t);
}

int pmp_backward_expand(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  grads[0] = pmp_sum_to_shape(g, PMP_IN_SHAPE(n, 0));
  return grads[0] ? 0 : -1;
}

pmp_tensor *pmp_narrow(pmp_tensor *t, int dim, int64_t start, int64_t length) {
  if (!t) return NULL;
  char st[PMP_SHAPE_BUF];
  if (t->ndim == 0) return pmp_fail("narrow: cannot narrow a 0-dim tensor");
  if (!pmp_wrap_dim(&dim, t->ndim, "narrow")) return NULL;
  if (start < 0) start += t->sizes[dim];
  if (start < 0 || length < 0 || start + length > t->sizes[dim])
    return pmp_fail("narrow: start %lld and length %lld are out of range for dim %d of a tensor of shape %s",
                    (long long)start, (long long)length, dim + 1, SHAPE(t, st));
  int64_t shape[PMP_MAX_DIMS];
  memcpy(shape, t->sizes, sizeof shape);
  shape[dim] = length;
  int64_t offset = t->offset + start * t->strides[dim] * pmp_dtype_size(t->dtype_id);
  pmp_tensor *out = record_view(PMP_OP_NARROW, pmp_tensor_new_view(t, shape, t->strides, t->ndim, offset), t);
  if (out && out->grad_fn) {
    out->grad_fn->i[0] = dim;
    out->grad_fn->i[1] = start;
  }
  return out;
}

int pmp_backward_narrow(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *full = pmp_full(PMP_IN_SHAPE(n, 0), 0.0, g->dtype_id, g->dev);
  pmp_tensor *slot = full ? pmp_narrow(full, (int)n->i[0], n->i[1], g->sizes[n->i[0]]) : NULL;
  int rc = slot ? pmp_copy_into(slot, g) : -1;
  pmp_tensor_release(slot);
  if (rc != 0) {
    pmp_tensor_release(full);
    return -1;
  }
  grads[0] = full;
  return 0;
}

pmp_tensor *pmp_cat(pmp_tensor *const *tensors, int count, int dim) {
  if (count <= 0) return pmp_fail("cat: needs at least one tensor");
  for (int k = 0; k < count; k++)
    if (!tensors[k]) return NULL;
  pmp_tensor *first = tensors[0];
  char st[PMP_SHAPE_BUF], sf[PMP_SHAPE_BUF];
  if (first->ndim == 0) return pmp_fail("cat: zero-dimensional tensors cannot be concatenated");
  if (!pmp_wrap_dim(&dim, first->ndim, "cat")) return NULL;
  int dtype = first->dtype_id;
  int64_t shape[PMP_MAX_DIMS];
  memcpy(shape, first->sizes, sizeof shape);
  shape[dim] = 0;
  for (int k = 0; k < count; k++) {
    pmp_tensor *t = tensors[k];
    if (!pmp_same_device(first, t, "cat")) return NULL;
    bool fits = t->ndim == first->ndim;
    for (int d = 0; fits && d < t->ndim; d++) fits = d == dim || t->sizes[d] == first->sizes[d];
    if (!fits)
      return pmp_fail("cat: tensor %d has shape %s, which does not match %s outside dim %d", k + 1, SHAPE(t, st),
                      SHAPE(first, sf), dim + 1);
    dtype = pmp_promote_types(dtype, t->dtype_id);
    shape[dim] += t->sizes[dim];
  }
  pmp_tensor *out = pmp_empty_shape(shape, first->ndim, dtype, first->dev);
  if (!out) return NULL;
  int64_t at = 0;
  for (int k = 0; k < count; k++) {
    int64_t len = tensors[k]->sizes[dim];
    pmp_tensor *slot = pmp_tensor_new_view(out, out->sizes, out->strides, out->ndim,
                                           out->offset + at * out->strides[dim] * pmp_dtype_size(dtype));
    int rc = slot ? 0 : -1;
    if (slot) {
      slot->sizes[dim] = len;
      rc = pmp_copy_into(slot, tensors[k]);
      pmp_tensor_release(slot);
    }
    if (rc != 0) {
      pmp_tensor_release(out);
      return NULL;
    }
    at += len;
  }
  pmp_node *n = pmp_record_op(PMP_OP_CAT, &out, tensors, count, NULL, 0);
  if (n) n->i[0] = dim;
  return out;
}

int pmp_backward_cat(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  int dim = (int)n->i[0];
  int64_t at = 0;
  for (int k = 0; k < n->ninputs; k++) {
    int64_t len = n->in[k].sizes[dim];
    if (PMP_NEEDS(n, k)) {
      pmp_tensor *part = pmp_narrow(g, dim, at, len);
      grads[k] = part ? pmp_contiguous(part) : NULL;
      pmp_tensor_release(part);
      if (!grads[k]) return -1;
    }
    at += len;
  }
  return 0;
}

static pmp_tensor *copy_op(pmp_tensor *t, int dtype, int op) {
  pmp_tensor *out = pmp_empty_shape(t->sizes, t->ndim, dtype, t->dev);
  if (!out) return NULL;
  if (pmp_copy_into(out, t) != 0) {
    pmp_tensor_release(out);
    return NULL;
  }
  if (pmp_dtype_is_float(dtype) && pmp_dtype_is_float(t->dtype_id)) return record_view(op, out, t);
  return out;
}

pmp_tensor *pmp_to_dtype(pmp_tensor *t, int dtype) {
  if (!t) return NULL;
  if (!pmp_dtype_valid(dtype)) return pmp_fail("to: unknown dtype %d", dtype);
  if (t->dtype_id == dtype) {
    pmp_tensor_retain(t);
    return t;
  }
  return copy_op(t, dtype, PMP_OP_TO_DTYPE);
}

int pmp_backward_to_dtype(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  (void)n;
  pmp_tensor_retain(g);
  grads[0] = g; /* the engine converts it back to the input's dtype */
  return 0;
}

pmp_tensor *pmp_to_device(pmp_tensor *t, pmp_device device) {
  if (!t) return NULL;
  if (device.type == t->dev.type && device.index == t->dev.index) {
    pmp_tensor_retain(t);
    return t;
  }
  return pmp_fail("to: device %s:%d is not available in this build", device.type == PMP_CUDA ? "cuda" : "?", device.index);
}

pmp_tensor *pmp_contiguous(pmp_tensor *t) {
  if (!t) return NULL;
  if (pmp_is_contiguous(t)) {
    pmp_tensor_retain(t);
    return t;
  }
  return copy_op(t, t->dtype_id, PMP_OP_COPY);
}

pmp_tensor *pmp_clone(pmp_tensor *t) {
  if (!t) return NULL;
  return copy_op(t, t->dtype_id, PMP_OP_COPY);
}

int pmp_backward_identity(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  (void)n;
  pmp_tensor_retain(g);
  grads[0] = g;
  return 0;
}

pmp_tensor *pmp_sum_to_shape(pmp_tensor *grad, const int64_t *shape, int ndim) {
  int dims[PMP_MAX_DIMS], count = 0;
  int lead = grad->ndim - ndim;
  for (int d = 0; d < grad->ndim; d++)
    if (d < lead || (shape[d - lead] == 1 && grad->sizes[d] != 1)) dims[count++] = d;
  if (count == 0) {
    pmp_tensor_retain(grad);
    return grad;
  }
  pmp_tensor *summed = pmp_sum(grad, dims, count, 1);
  pmp_tensor *out = pmp_view(summed, shape, ndim);
  pmp_tensor_release(summed);
  return out;
}

static bool check_in_place(pmp_tensor *t, const char *op) {
  if (pmp_is_grad_enabled() && t->needs_grad) {
    pmp_fail("%s: in-place change of a tensor that requires grad while grad mode is on (wrap it in pmp.no_grad)", op);
    return false;
  }
  return true;
}

int pmp_copy_(pmp_tensor *dst, pmp_tensor *src) {
  if (!dst || !src) return -1;
  char sd[PMP_SHAPE_BUF], ss[PMP_SHAPE_BUF];
  if (!check_in_place(dst, "copy_") || !pmp_same_device(dst, src, "copy_")) return -1;
  int64_t shape[PMP_MAX_DIMS];
  int ndim;
  if (!pmp_broadcast_shapes(dst->sizes, dst->ndim, src->sizes, src->ndim, shape, &ndim) || ndim != dst->ndim ||
      memcmp(shape, dst->sizes, sizeof(int64_t) * (size_t)ndim) != 0)
    return pmp_fail_code("copy_: source of shape %s does not broadcast to the destination's shape %s",
                         SHAPE(src, ss), SHAPE(dst, sd));
  pmp_tensor *view = pmp_broadcast_view(src, dst->sizes, dst->ndim);
  int rc = view ? pmp_copy_into(dst, view) : -1;
  pmp_tensor_release(view);
  return rc;
}

int pmp_fill_(pmp_tensor *t, double value) {
  if (!t) return -1;
  if (!check_in_place(t, "fill_")) return -1;
  pmp_tensor *v = pmp_scalar(value, t->dtype_id, t->dev);
  int rc = v ? pmp_copy_(t, v) : -1;
  pmp_tensor_release(v);
  return rc;
}
