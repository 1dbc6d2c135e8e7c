/*
 * Strided iteration. Elementwise kernels see only contiguous runs of a compute dtype: this file walks
 * any layout (views, broadcasts with stride 0, mixed dtypes), gathers each piece into a small buffer
 * when it is not already contiguous in the right dtype, calls the kernel, and scatters the result.
 * Contiguous same-dtype operands are passed through without copying, which is the fast path.
 */
#include "iter.h"
#include <omp.h>

void pmp_iter_init(pmp_iter *it, const int64_t *shape, int ndim, int nops, pmp_tensor *const *ops) {
  it->nops = nops;
  it->ndim = 0;
  for (int d = 0; d < ndim; d++) {
    if (shape[d] == 1) continue;
    int k = it->ndim;
    bool merge = k > 0;
    for (int op = 0; op < nops && merge; op++) {
      int64_t es = pmp_dtype_size(ops[op]->dtype_id);
      merge = it->strides[op][k - 1] == ops[op]->strides[d] * es * shape[d];
    }
    if (merge) {
      it->sizes[k - 1] *= shape[d];
      for (int op = 0; op < nops; op++) it->strides[op][k - 1] = ops[op]->strides[d] * pmp_dtype_size(ops[op]->dtype_id);
      continue;
    }
    it->sizes[k] = shape[d];
    for (int op = 0; op < nops; op++) it->strides[op][k] = ops[op]->strides[d] * pmp_dtype_size(ops[op]->dtype_id);
    it->ndim++;
  }
  if (it->ndim == 0) {
    it->ndim = 1;
    it->sizes[0] = 1;
    for (int op = 0; op < nops; op++) it->strides[op][0] = pmp_dtype_size(ops[op]->dtype_id);
  }
  for (int d = 0; d < ndim; d++)
    if (shape[d] == 0) it->sizes[0] = 0;
  it->inner = it->sizes[it->ndim - 1];
  it->outer = 1;
  for (int d = 0; d < it->ndim - 1; d++) it->outer *= it->sizes[d];
}

void pmp_iter_offsets(const pmp_iter *it, int64_t run, int64_t *offsets) {
  for (int op = 0; op < it->nops; op++) offsets[op] = 0;
  for (int d = it->ndim - 2; d >= 0; d--) {
    int64_t idx = run % it->sizes[d];
    run /= it->sizes[d];
    for (int op = 0; op < it->nops; op++) offsets[op] += idx * it->strides[op][d];
  }
}

static void gather(void *dst, const char *src, int64_t stride, int es, int64_t n) {
  switch (es) {
  case 1: for (int64_t k = 0; k < n; k++) ((uint8_t *)dst)[k] = *(const uint8_t *)(src + k * stride); break;
  case 2: for (int64_t k = 0; k < n; k++) ((uint16_t *)dst)[k] = *(const uint16_t *)(src + k * stride); break;
  case 4: for (int64_t k = 0; k < n; k++) ((uint32_t *)dst)[k] = *(const uint32_t *)(src + k * stride); break;
  default: for (int64_t k = 0; k < n; k++) ((uint64_t *)dst)[k] = *(const uint64_t *)(src + k * stride); break;
  }
}

static void scatter(char *dst, int64_t stride, const void *src, int es, int64_t n) {
  switch (es) {
  case 1: for (int64_t k = 0; k < n; k++) *(uint8_t *)(dst + k * stride) = ((const uint8_t *)src)[k]; break;
  case 2: for (int64_t k = 0; k < n; k++) *(uint16_t *)(dst + k * stride) = ((const uint16_t *)src)[k]; break;
  case 4: for (int64_t k = 0; k < n; k++) *(uint32_t *)(dst + k * stride) = ((const uint32_t *)src)[k]; break;
  default: for (int64_t k = 0; k < n; k++) *(uint64_t *)(dst + k * stride) = ((const uint64_t *)src)[k]; break;
  }
}

/* Makes a pointer to n elements of buf_dtype starting at src, copying only when needed. */
static const void *load_piece(const char *src, int64_t stride, int dtype, int buf_dtype, int64_t n, void *buf,
                              void *tmp) {
  int es = pmp_dtype_size(dtype);
  if (stride == es && dtype == buf_dtype) return src;
  if (stride == 0) {
    pmp_convert(buf, buf_dtype, src, dtype, 1);
    switch (pmp_dtype_size(buf_dtype)) {
    case 1: memset(buf, *(uint8_t *)buf, (size_t)n); break;
    case 2: for (int64_t k = 1; k < n; k++) ((uint16_t *)buf)[k] = ((uint16_t *)buf)[0]; break;
    case 4: for (int64_t k = 1; k < n; k++) ((uint32_t *)buf)[k] = ((uint32_t *)buf)[0]; break;
    default: for (int64_t k = 1; k < n; k++) ((uint64_t *)buf)[k] = ((uint64_t *)buf)[0]; break;
    }
    return buf;
  }
  if (stride == es) {
    pmp_convert(buf, buf_dtype, src, dtype, n);
    return buf;
  }
  gather(dtype == buf_dtype ? buf : tmp, src, stride, es, n);
  if (dtype != buf_dtype) pmp_convert(buf, buf_dtype, tmp, dtype, n);
  return buf;
}

int pmp_elementwise_run(const pmp_elementwise *e) {
  pmp_tensor *ops[4] = {e->out};
  for (int k = 0; k < e->nin; k++) ops[k + 1] = e->in[k];
  pmp_iter it;
  pmp_iter_init(&it, e->out->sizes, e->out->ndim, e->nin + 1, ops);
  if (it.inner == 0) return 0;
  int64_t chunks = (it.inner + PMP_PIECE - 1) / PMP_PIECE;
  int64_t pieces = it.outer * chunks;
  bool parallel = it.outer * it.inner >= PMP_PARALLEL_THRESHOLD && !e->serial;
  int out_es = pmp_dtype_size(e->out->dtype_id);

#pragma omp parallel for if (parallel) schedule(static)
  for (int64_t p = 0; p < pieces; p++) {
    _Alignas(64) char bufs[4][PMP_PIECE * 8];
    _Alignas(64) char tmp[PMP_PIECE * 8];
    int64_t run = p / chunks, start = (p % chunks) * PMP_PIECE;
    int64_t n = it.inner - start < PMP_PIECE ? it.inner - start : PMP_PIECE;
    int64_t off[4];
    pmp_iter_offsets(&it, run, off);
    const void *in_ptrs[3];
    for (int k = 0; k < e->nin; k++) {
      int64_t s = it.strides[k + 1][it.ndim - 1];
      in_ptrs[k] = load_piece(ops[k + 1]->data + off[k + 1] + start * s, s, ops[k + 1]->dtype_id, e->in_buf_dtype[k],
                              n, bufs[k + 1], tmp);
    }
    int64_t os = it.strides[0][it.ndim - 1];
    char *dst = e->out->data + off[0] + start * os;
    bool direct = os == out_es && e->out->dtype_id == e->out_buf_dtype;
    void *out_ptr = direct ? (void *)dst : (void *)bufs[0];
    e->fn(e->ctx, out_ptr, in_ptrs, n);
    if (direct) continue;
    if (os == out_es) {
      pmp_convert(dst, e->out->dtype_id, bufs[0], e->out_buf_dtype, n);
    } else if (e->out->dtype_id == e->out_buf_dtype) {
      scatter(dst, os, bufs[0], out_es, n);
    } else {
      pmp_convert(tmp, e->out->dtype_id, bufs[0], e->out_buf_dtype, n);
      scatter(dst, os, tmp, out_es, n);
    }
  }
  return 0;
}
