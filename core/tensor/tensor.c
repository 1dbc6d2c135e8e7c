/* Storage and Tensor: creation, reference counting, strides, copies between layouts and dtypes. */
#include "internal.h"
#include <math.h>
#include <omp.h>
#include <stdio.h>

const char *pmp_version(void) { return PMP_VERSION; }

int pmp_num_threads(void) { return omp_get_max_threads(); }
void pmp_set_num_threads(int n) { omp_set_num_threads(n > 0 ? n : 1); }

static pmp_storage *storage_new(int64_t nbytes, pmp_device device) {
  pmp_storage *s = calloc(1, sizeof *s);
  if (!s) return pmp_fail("out of memory: storage header");
  s->data = pmp_alloc(device.type, nbytes);
  if (!s->data && nbytes > 0) {
    free(s);
    return NULL;
  }
  s->nbytes = nbytes;
  s->dev = device;
  s->refcount = 1;
  return s;
}

static void storage_release(pmp_storage *s) {
  if (!s || --s->refcount > 0) return;
  if (s->release)
    s->release(s->release_ctx);
  else
    pmp_free(s->dev.type, s->data, s->nbytes);
  free(s);
}

void pmp_tensor_retain(pmp_tensor *t) {
  if (t) t->refcount++;
}

void pmp_tensor_release(pmp_tensor *t) {
  if (!t || --t->refcount > 0) return;
  storage_release(t->storage);
  pmp_tensor_release(t->grad_acc);
  pmp_node_release(t->grad_fn);
  free(t);
}

int64_t pmp_numel(const pmp_tensor *t) {
  int64_t n = 1;
  for (int d = 0; d < t->ndim; d++) n *= t->sizes[d];
  return n;
}

void pmp_contiguous_strides(const int64_t *shape, int ndim, int64_t *stride) {
  int64_t s = 1;
  for (int d = ndim - 1; d >= 0; d--) {
    stride[d] = s;
    s *= shape[d];
  }
}

int pmp_is_contiguous(const pmp_tensor *t) {
  int64_t s = 1;
  for (int d = t->ndim - 1; d >= 0; d--) {
    if (t->sizes[d] != 1 && t->strides[d] != s) return 0;
    s *= t->sizes[d];
  }
  return 1;
}

bool pmp_same_shape(const pmp_tensor *a, const pmp_tensor *b) {
  if (a->ndim != b->ndim) return false;
  for (int d = 0; d < a->ndim; d++)
    if (a->sizes[d] != b->sizes[d]) return false;
  return true;
}

static const char *device_name(pmp_device d) { return d.type == PMP_CPU ? "cpu" : "cuda"; }

bool pmp_same_device(const pmp_tensor *a, const pmp_tensor *b, const char *op) {
  if (a->dev.type == b->dev.type && a->dev.index == b->dev.index) return true;
  pmp_fail("%s: tensors are on different devices (%s:%d and %s:%d)", op, device_name(a->dev), a->dev.index,
           device_name(b->dev), b->dev.index);
  return false;
}

bool pmp_wrap_dim(int *dim, int ndim, const char *op) {
  int n = ndim > 0 ? ndim : 1;
  if (*dim < -n || *dim >= n) {
    pmp_fail("%s: dimension %d out of range for a tensor with %d dims", op, *dim, ndim);
    return false;
  }
  if (*dim < 0) *dim += n;
  return true;
}

static bool check_shape(const int64_t *shape, int ndim, const char *op) {
  if (ndim < 0 || ndim > PMP_MAX_DIMS) {
    pmp_fail("%s: %d dims requested, at most %d supported", op, ndim, PMP_MAX_DIMS);
    return false;
  }
  for (int d = 0; d < ndim; d++)
    if (shape[d] < 0) {
      char buf[PMP_SHAPE_BUF];
      pmp_fail("%s: negative size in shape %s", op, pmp_shape_str(shape, ndim, buf, sizeof buf));
      return false;
    }
  return true;
}

pmp_tensor *pmp_empty_shape(const int64_t *shape, int ndim, int dtype, pmp_device device) {
  if (!check_shape(shape, ndim, "empty")) return NULL;
  if (!pmp_dtype_valid(dtype)) return pmp_fail("empty: unknown dtype %d", dtype);
  if (device.type != PMP_CPU) return pmp_fail("empty: device cuda:%d is not available in this build", device.index);
  int64_t n = 1;
  for (int d = 0; d < ndim; d++) {
    if (shape[d] && n > INT64_MAX / 16 / shape[d]) return pmp_fail("empty: shape too large");
    n *= shape[d];
  }
  pmp_tensor *t = calloc(1, sizeof *t);
  if (!t) return pmp_fail("out of memory: tensor header");
  t->storage = storage_new(n * pmp_dtype_size(dtype), device);
  if (!t->storage) {
    free(t);
    return NULL;
  }
  t->data = t->storage->data;
  t->ndim = ndim;
  t->dtype_id = dtype;
  t->dev = device;
  t->refcount = 1;
  if (ndim > 0) memcpy(t->sizes, shape, sizeof(int64_t) * (size_t)ndim);   /* a 0-d shape may be NULL */
  pmp_contiguous_strides(shape, ndim, t->strides);
  return t;
}

pmp_tensor *pmp_empty(const int64_t *shape, int ndim, int dtype, pmp_device device) {
  return pmp_empty_shape(shape, ndim, dtype, device);
}

pmp_tensor *pmp_empty_like(const pmp_tensor *t, int dtype) {
  return pmp_empty_shape(t->sizes, t->ndim, dtype < 0 ? t->dtype_id : dtype, t->dev);
}

void pmp_dims_by_stride(const pmp_tensor *t, int *order) {
  int n = t->ndim;
  for (int d = 0; d < n - 1; d++) {
    int k = d;
    for (; k > 0 && t->strides[order[k - 1]] < t->strides[d]; k--) order[k] = order[k - 1];
    order[k] = d;
  }
  if (n > 0) order[n - 1] = n - 1;
}

pmp_tensor *pmp_empty_in_layout(const pmp_tensor *t, int dtype) {
  int n = t->ndim, order[PMP_MAX_DIMS];
  pmp_dims_by_stride(t, order);
  int64_t strides[PMP_MAX_DIMS], step = 1, numel = pmp_numel(t);
  for (int k = n - 1; k >= 0; k--) {
    strides[order[k]] = step;
    step *= t->sizes[order[k]];
  }
  pmp_tensor *base = pmp_empty_shape(&numel, 1, dtype < 0 ? t->dtype_id : dtype, t->dev);
  pmp_tensor *out = base ? pmp_tensor_new_view(base, t->sizes, strides, n, 0) : NULL;
  pmp_tensor_release(base);
  return out;
}

pmp_tensor *pmp_tensor_new_view(pmp_tensor *base, const int64_t *shape, const int64_t *stride, int ndim,
                                int64_t offset_bytes) {
  pmp_tensor *t = calloc(1, sizeof *t);
  if (!t) return pmp_fail("out of memory: tensor header");
  t->storage = base->storage;
  t->storage->refcount++;
  t->offset = offset_bytes;
  t->data = t->storage->data + offset_bytes;
  t->ndim = ndim;
  t->dtype_id = base->dtype_id;
  t->dev = base->dev;
  t->refcount = 1;
  if (ndim > 0) {   /* a 0-d view's shape and strides may be NULL */
    memcpy(t->sizes, shape, sizeof(int64_t) * (size_t)ndim);
    memcpy(t->strides, stride, sizeof(int64_t) * (size_t)ndim);
  }
  return t;
}

pmp_tensor *pmp_from_external(void *data, int64_t nbytes, int dtype, const int64_t *shape, int ndim,
                              pmp_device device, void (*release)(void *ctx), void *ctx) {
  if (!check_shape(shape, ndim, "from_external")) return NULL;
  if (!pmp_dtype_valid(dtype)) return pmp_fail("from_external: unknown dtype %d", dtype);
  int64_t n = 1;
  for (int d = 0; d < ndim; d++) n *= shape[d];
  if (n * pmp_dtype_size(dtype) > nbytes)
    return pmp_fail("from_external: %lld elements of %s need %lld bytes but the buffer holds %lld", (long long)n,
                    pmp_dtype_name(dtype), (long long)(n * pmp_dtype_size(dtype)), (long long)nbytes);
  pmp_tensor *t = calloc(1, sizeof *t);
  pmp_storage *s = calloc(1, sizeof *s);
  if (!t || !s) {
    free(t);
    free(s);
    return pmp_fail("out of memory: tensor header");
  }
  s->data = data;
  s->nbytes = nbytes;
  s->dev = device;
  s->refcount = 1;
  s->release = release;
  s->release_ctx = ctx;
  t->storage = s;
  t->data = data;
  t->ndim = ndim;
  t->dtype_id = dtype;
  t->dev = device;
  t->refcount = 1;
  if (ndim > 0) memcpy(t->sizes, shape, sizeof(int64_t) * (size_t)ndim);
  pmp_contiguous_strides(shape, ndim, t->strides);
  return t;
}

pmp_tensor *pmp_from_buffer(const void *data, int src_dtype, const int64_t *shape, int ndim, int dtype,
                            pmp_device device) {
  if (!pmp_dtype_valid(src_dtype)) return pmp_fail("from_buffer: unknown source dtype %d", src_dtype);
  pmp_tensor *t = pmp_empty_shape(shape, ndim, dtype, device);
  if (!t) return NULL;
  pmp_convert(t->data, dtype, data, src_dtype, pmp_numel(t));
  return t;
}

int pmp_copy_to_buffer(const pmp_tensor *t, void *dst, int dst_dtype) {
  if (!pmp_dtype_valid(dst_dtype)) return pmp_fail_code("copy_to_buffer: unknown dtype %d", dst_dtype);
  if (pmp_is_contiguous(t)) {
    pmp_convert(dst, dst_dtype, t->data, t->dtype_id, pmp_numel(t));
    return 0;
  }
  pmp_tensor *c = pmp_empty_like(t, dst_dtype);
  if (!c) return -1;
  int rc = pmp_copy_into(c, t);
  if (rc == 0) memcpy(dst, c->data, (size_t)(pmp_numel(c) * pmp_dtype_size(dst_dtype)));
  pmp_tensor_release(c);
  return rc;
}

double pmp_load_element(const pmp_tensor *t, int64_t element_offset) {
  return pmp_load_as_f64(t->dtype_id, t->data + element_offset * pmp_dtype_size(t->dtype_id));
}

int pmp_item(const pmp_tensor *t, double *value) {
  int64_t n = pmp_numel(t);
  if (n != 1) {
    char buf[PMP_SHAPE_BUF];
    return pmp_fail_code("item: a tensor of shape %s has %lld elements, item() needs exactly one",
                         pmp_shape_str(t->sizes, t->ndim, buf, sizeof buf), (long long)n);
  }
  *value = pmp_load_as_f64(t->dtype_id, t->data);
  return 0;
}

int pmp_copy_into(pmp_tensor *dst, const pmp_tensor *src) {
  pmp_op_args a = {.op = PMP_OP_COPY, .out = dst, .in = {(pmp_tensor *)src}, .nin = 1};
  return pmp_dispatch(&a);
}

bool pmp_broadcast_shapes(const int64_t *a, int na, const int64_t *b, int nb, int64_t *out, int *nout) {
  int n = na > nb ? na : nb;
  for (int k = 0; k < n; k++) {
    int64_t da = k < n - na ? 1 : a[k - (n - na)];
    int64_t db = k < n - nb ? 1 : b[k - (n - nb)];
    if (da != db && da != 1 && db != 1) return false;
    out[k] = da == 1 ? db : da;
  }
  *nout = n;
  return true;
}

pmp_tensor *pmp_broadcast_view(pmp_tensor *t, const int64_t *shape, int ndim) {
  int64_t stride[PMP_MAX_DIMS];
  int lead = ndim - t->ndim;
  for (int k = 0; k < ndim; k++) {
    if (k < lead) {
      stride[k] = 0;
      continue;
    }
    int64_t size = t->sizes[k - lead];
    stride[k] = size == shape[k] ? t->strides[k - lead] : 0;
  }
  return pmp_tensor_new_view(t, shape, stride, ndim, t->offset);
}
