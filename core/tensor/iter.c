/*
 * Strided iteration. Elementwise kernels see only contiguous runs of a compute dtype: this file walks
 * any layout (views, broadcasts with stride 0, mixed dtypes), gathers each piece into a small buffer
 * when it is not already contiguous in the right dtype, calls the kernel, and scatters the result.
 * Contiguous same-dtype operands are passed through without copying, which is the fast path.
 *
 * Work is cut into pieces of at most PMP_PIECE elements that start at multiples of PMP_PIECE within
 * each inner run, and consecutive pieces that need no copying are handed to the kernel as one call.
 * Keeping those boundaries fixed keeps results independent of threading: a kernel's vector loop splits
 * its elements between the vector body and the scalar tail the same way (libmvec and libm may differ
 * in the last bit).
 */
#include "tensor/iter.h"
#include "cpu/vector_math.h"

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

/* The outer index of a run and its operands' byte offsets, stepped run by run without divisions. */
typedef struct cursor {
  int64_t idx[PMP_MAX_DIMS];
  int64_t off[4];
} cursor;

static void cursor_at(const pmp_iter *it, int64_t run, cursor *c) {
  pmp_iter_offsets(it, run, c->off);
  for (int d = it->ndim - 2; d >= 0; d--) {
    c->idx[d] = run % it->sizes[d];
    run /= it->sizes[d];
  }
}

static void cursor_next(const pmp_iter *it, cursor *c) {
  for (int d = it->ndim - 2; d >= 0; d--) {
    for (int op = 0; op < it->nops; op++) c->off[op] += it->strides[op][d];
    if (++c->idx[d] < it->sizes[d]) return;
    for (int op = 0; op < it->nops; op++) c->off[op] -= it->strides[op][d] * it->sizes[d];
    c->idx[d] = 0;
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

WIDE_VECTORS void pmp_iter_splat(void *dst, const void *value, int es, int64_t n) {
  switch (es) {
  case 1: memset(dst, *(const uint8_t *)value, (size_t)n); break;
  case 2: {
    uint16_t v, *d = dst;
    memcpy(&v, value, 2);
#pragma omp simd
    for (int64_t k = 0; k < n; k++) d[k] = v;
    break;
  }
  case 4: {
    uint32_t v, *d = dst;
    memcpy(&v, value, 4);
#pragma omp simd
    for (int64_t k = 0; k < n; k++) d[k] = v;
    break;
  }
  default: {
    uint64_t v, *d = dst;
    memcpy(&v, value, 8);
#pragma omp simd
    for (int64_t k = 0; k < n; k++) d[k] = v;
    break;
  }
  }
}

/* A piece's operand: n elements of buf_dtype starting at src, copied into buf only when needed. A
 * broadcast (stride 0) buffer is kept while the source element stays the same. */
typedef struct operand {
  int dtype, buf_dtype, es;
  const char *splat_src;  /* the element buf holds splat_n copies of */
  int64_t splat_n;
} operand;

static const void *load_piece(operand *o, const char *src, int64_t stride, int64_t n, void *buf, void *tmp) {
  if (stride == o->es && o->dtype == o->buf_dtype) return src;
  if (stride == 0) {
    if (o->splat_src != src || o->splat_n < n) {
      char value[8];
      pmp_convert(value, o->buf_dtype, src, o->dtype, 1);
      pmp_iter_splat(buf, value, pmp_dtype_size(o->buf_dtype), n);
      o->splat_src = src;
      o->splat_n = n;
    }
    return buf;
  }
  if (stride == o->es) {
    pmp_convert(buf, o->buf_dtype, src, o->dtype, n);
    return buf;
  }
  gather(o->dtype == o->buf_dtype ? buf : tmp, src, stride, o->es, n);
  if (o->dtype != o->buf_dtype) pmp_convert(buf, o->buf_dtype, tmp, o->dtype, n);
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
  int out_es = pmp_dtype_size(e->out->dtype_id), last = it.ndim - 1;
  int64_t os = it.strides[0][last];
  bool out_direct = os == out_es && e->out->dtype_id == e->out_buf_dtype;
  /* all operands used in place: a thread's pieces of one run go to the kernel as one call */
  bool direct = out_direct;
  for (int k = 0; k < e->nin; k++)
    direct = direct && it.strides[k + 1][last] == pmp_dtype_size(e->in[k]->dtype_id) && e->in[k]->dtype_id == e->in_buf_dtype[k];

#pragma omp parallel if (parallel)
  {
    _Alignas(64) char bufs[4][PMP_PIECE * 8];
    _Alignas(64) char tmp[PMP_PIECE * 8];
    operand in_ops[3];
    for (int k = 0; k < e->nin; k++)
      in_ops[k] = (operand){.dtype = e->in[k]->dtype_id, .buf_dtype = e->in_buf_dtype[k],
                            .es = pmp_dtype_size(e->in[k]->dtype_id)};
    int64_t lo, hi;
    pmp_thread_share(pieces, &lo, &hi);
    cursor c;
    if (lo < hi) cursor_at(&it, lo / chunks, &c);
    for (int64_t p = lo; p < hi;) {
      int64_t chunk = p % chunks, start = chunk * PMP_PIECE;
      int64_t span = direct ? (hi - p < chunks - chunk ? hi - p : chunks - chunk) : 1;
      int64_t end = (chunk + span) * PMP_PIECE, n = (end < it.inner ? end : it.inner) - start;
      const void *in_ptrs[3];
      for (int k = 0; k < e->nin; k++) {
        int64_t s = it.strides[k + 1][last];
        in_ptrs[k] = load_piece(&in_ops[k], ops[k + 1]->data + c.off[k + 1] + start * s, s, n, bufs[k + 1], tmp);
      }
      char *dst = e->out->data + c.off[0] + start * os;
      void *out_ptr = out_direct ? (void *)dst : (void *)bufs[0];
      e->fn(e->ctx, out_ptr, in_ptrs, n);
      if (!out_direct) {
        if (os == out_es) {
          pmp_convert(dst, e->out->dtype_id, bufs[0], e->out_buf_dtype, n);
        } else if (e->out->dtype_id == e->out_buf_dtype) {
          scatter(dst, os, bufs[0], out_es, n);
        } else {
          pmp_convert(tmp, e->out->dtype_id, bufs[0], e->out_buf_dtype, n);
          scatter(dst, os, tmp, out_es, n);
        }
      }
      p += span;
      if (chunk + span == chunks && p < hi) cursor_next(&it, &c);
    }
  }
  return 0;
}

bool pmp_iter_copy_runs(pmp_tensor *dst, const pmp_tensor *src) {
  pmp_tensor *ops[2] = {dst, (pmp_tensor *)src};
  pmp_iter it;
  pmp_iter_init(&it, dst->sizes, dst->ndim, 2, ops);
  int ddt = dst->dtype_id, sdt = src->dtype_id, des = pmp_dtype_size(ddt), ses = pmp_dtype_size(sdt);
  int last = it.ndim - 1;
  if (it.strides[0][last] != des || it.strides[1][last] != ses) return false;
  if (it.inner == 0) return true;
  /* one long run is split between the threads, many runs are dealt out whole */
  int64_t split = it.outer == 1 ? (it.inner + PMP_PIECE - 1) / PMP_PIECE : 1;
  int64_t items = it.outer * split;
#pragma omp parallel if (it.outer * it.inner >= PMP_PARALLEL_THRESHOLD)
  {
    int64_t lo, hi;
    pmp_thread_share(items, &lo, &hi);
    if (lo < hi) {
      if (split > 1) {
        int64_t start = lo * PMP_PIECE, end = hi * PMP_PIECE < it.inner ? hi * PMP_PIECE : it.inner;
        pmp_convert(dst->data + start * des, ddt, src->data + start * ses, sdt, end - start);
      } else {
        cursor c;
        cursor_at(&it, lo, &c);
        for (int64_t r = lo; r < hi; r++) {
          pmp_convert(dst->data + c.off[0], ddt, src->data + c.off[1], sdt, it.inner);
          cursor_next(&it, &c);
        }
      }
    }
  }
  return true;
}

enum { TILE = 32 };

/* dst[i][k] = src[k][i] over a rows x cols tile; dst rows are ds bytes apart, src rows ss. The inner
 * loop reads along src's contiguous rows, which measured faster than writing along dst's. */
#define TRANSPOSE_TILE(T)                                                                                   \
  for (int64_t k = 0; k < cols; k++)                                                                        \
    for (int64_t i = 0; i < rows; i++) *(T *)(d + i * ds + k * sizeof(T)) = *(const T *)(s + k * ss + i * sizeof(T))

static void transpose_tile(char *d, int64_t ds, const char *s, int64_t ss, int es, int64_t rows, int64_t cols) {
  switch (es) {
  case 1: TRANSPOSE_TILE(uint8_t); break;
  case 2: TRANSPOSE_TILE(uint16_t); break;
  case 4: TRANSPOSE_TILE(uint32_t); break;
  default: TRANSPOSE_TILE(uint64_t); break;
  }
}

bool pmp_iter_copy_transposed(pmp_tensor *dst, const pmp_tensor *src) {
  int es = pmp_dtype_size(dst->dtype_id);
  if (src->dtype_id != dst->dtype_id) return false;
  pmp_tensor *ops[2] = {dst, (pmp_tensor *)src};
  pmp_iter it;
  pmp_iter_init(&it, dst->sizes, dst->ndim, 2, ops);
  int last = it.ndim - 1, j = -1;
  if (it.strides[0][last] != es || it.strides[1][last] == es) return false;
  for (int d = 0; d < last; d++)
    if (it.strides[1][d] == es) j = d;
  if (it.outer * it.inner == 0) return true;
  if (j < 0) return false;
  /* the other dims, walked by a cursor over an iterator without dims j and last */
  pmp_iter batch = {.nops = 2, .ndim = 0};
  for (int d = 0; d < last; d++) {
    if (d == j) continue;
    batch.sizes[batch.ndim] = it.sizes[d];
    for (int op = 0; op < 2; op++) batch.strides[op][batch.ndim] = it.strides[op][d];
    batch.ndim++;
  }
  batch.sizes[batch.ndim] = 1;
  batch.ndim++;
  batch.outer = 1;
  for (int d = 0; d < batch.ndim - 1; d++) batch.outer *= batch.sizes[d];
  int64_t rows = it.sizes[j], cols = it.inner, row_tiles = (rows + TILE - 1) / TILE;
  int64_t ds = it.strides[0][j], ss = it.strides[1][last];
#pragma omp parallel if (batch.outer * rows * cols >= PMP_PARALLEL_THRESHOLD)
  {
    int64_t lo, hi;
    pmp_thread_share(batch.outer * row_tiles, &lo, &hi);
    cursor c;
    if (lo < hi) cursor_at(&batch, lo / row_tiles, &c);
    for (int64_t t = lo; t < hi; t++) {
      int64_t r0 = t % row_tiles * TILE, nr = rows - r0 < TILE ? rows - r0 : TILE;
      for (int64_t k0 = 0; k0 < cols; k0 += TILE)
        transpose_tile(dst->data + c.off[0] + r0 * ds + k0 * es, ds, src->data + c.off[1] + r0 * es + k0 * ss, ss, es,
                       nr, cols - k0 < TILE ? cols - k0 : TILE);
      if (t % row_tiles == row_tiles - 1 && t + 1 < hi) cursor_next(&batch, &c);
    }
  }
  return true;
}
