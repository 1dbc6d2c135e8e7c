/* The paged KV cache's two ops: writing new keys/values into a block pool, attention over block tables. */
#include "internal.h"
#include <math.h>

#define SHAPE(t, buf) pmp_shape_str((t)->sizes, (t)->ndim, buf, sizeof buf)

static bool is_pool(const pmp_tensor *t) { return t->ndim == 4 && pmp_is_contiguous(t) && pmp_dtype_is_float(t->dtype_id); }

int pmp_paged_kv_write_(pmp_tensor *pool, pmp_tensor *src, pmp_tensor *slots) {
  if (!pool || !src || !slots) return -1;
  char sp[PMP_SHAPE_BUF], ss[PMP_SHAPE_BUF], sl[PMP_SHAPE_BUF];
  if (!pmp_same_device(pool, src, "paged_kv_write") || !pmp_same_device(pool, slots, "paged_kv_write")) return -1;
  if (!is_pool(pool))
    return pmp_fail_code("paged_kv_write: the pool must be a contiguous float tensor [num_blocks, Hkv, block_size, D], "
                         "got %s %s", pmp_dtype_name(pool->dtype_id), SHAPE(pool, sp));
  bool ok = src->ndim == 4 && pmp_dtype_is_float(src->dtype_id) && src->sizes[1] == pool->sizes[1] &&
            src->sizes[3] == pool->sizes[3] && slots->ndim == 2 && slots->sizes[0] == src->sizes[0] &&
            slots->sizes[1] == src->sizes[2] && !pmp_dtype_is_float(slots->dtype_id);
  if (!ok)
    return pmp_fail_code("paged_kv_write: src %s must be float [N, Hkv, T, D] matching the pool %s, and slots an integer "
                         "tensor [N, T], got %s %s",
                         SHAPE(src, ss), SHAPE(pool, sp), pmp_dtype_name(slots->dtype_id), SHAPE(slots, sl));
  pmp_scope s = {0};
  pmp_tensor *flat = pmp_keep(&s, pmp_contiguous(pmp_keep(&s, pmp_to_dtype(slots, PMP_I64))));
  int rc = -1;
  if (flat) {
    pmp_op_args a = {.op = PMP_OP_PAGED_KV_WRITE, .out = pool, .in = {src, flat}, .nin = 2};
    rc = pmp_dispatch(&a);
  }
  pmp_scope_end(&s);
  return rc;
}

pmp_tensor *pmp_paged_attention(pmp_tensor *q, pmp_tensor *k_pool, pmp_tensor *v_pool, pmp_tensor *block_tables,
                                pmp_tensor *lengths, double scale) {
  if (!q || !k_pool || !v_pool || !block_tables || !lengths) return NULL;
  char sq[PMP_SHAPE_BUF], sk[PMP_SHAPE_BUF], sv[PMP_SHAPE_BUF];
  if (!pmp_same_device(q, k_pool, "paged_attention") || !pmp_same_device(q, v_pool, "paged_attention") ||
      !pmp_same_device(q, block_tables, "paged_attention") || !pmp_same_device(q, lengths, "paged_attention"))
    return NULL;
  if (!is_pool(k_pool) || !is_pool(v_pool) || k_pool->dtype_id != v_pool->dtype_id ||
      memcmp(k_pool->sizes, v_pool->sizes, sizeof(int64_t) * 4) != 0)
    return pmp_fail("paged_attention: k_pool %s and v_pool %s must be contiguous float tensors of one dtype and shape "
                    "[num_blocks, Hkv, block_size, D]",
                    SHAPE(k_pool, sk), SHAPE(v_pool, sv));
  bool ok = q->ndim == 4 && pmp_dtype_is_float(q->dtype_id) && q->sizes[3] == k_pool->sizes[3] &&
            q->sizes[1] % k_pool->sizes[1] == 0;
  if (!ok)
    return pmp_fail("paged_attention: q %s must be float [N, Hq, T, D] with D and a multiple of Hkv from the pools %s",
                    SHAPE(q, sq), SHAPE(k_pool, sk));
  int64_t N = q->sizes[0], Hq = q->sizes[1], T = q->sizes[2], D = q->sizes[3];
  if (block_tables->ndim != 2 || block_tables->sizes[0] != N || pmp_dtype_is_float(block_tables->dtype_id) ||
      lengths->ndim != 1 || lengths->sizes[0] != N || pmp_dtype_is_float(lengths->dtype_id))
    return pmp_fail("paged_attention: block_tables %s must be an integer tensor [%lld, M] and lengths %s an integer "
                    "tensor [%lld]",
                    SHAPE(block_tables, sk), (long long)N, SHAPE(lengths, sv), (long long)N);
  if (scale <= 0) scale = 1.0 / sqrt((double)D);
  pmp_scope s = {0};
  pmp_tensor *qc = pmp_keep(&s, pmp_contiguous(q));
  pmp_tensor *tables = pmp_keep(&s, pmp_contiguous(pmp_keep(&s, pmp_to_dtype(block_tables, PMP_I64))));
  pmp_tensor *lens = pmp_keep(&s, pmp_contiguous(pmp_keep(&s, pmp_to_dtype(lengths, PMP_I64))));
  /* as the dense op: the output's memory is [N, T, Hq, D], so merging the heads back is a view */
  int64_t nthd[4] = {N, T, Hq, D}, view_strides[4] = {T * Hq * D, D, Hq * D, 1};
  pmp_tensor *base = pmp_keep(&s, pmp_empty_shape(nthd, 4, q->dtype_id, q->dev));
  pmp_tensor *out = base && qc && tables && lens ? pmp_tensor_new_view(base, q->sizes, view_strides, 4, base->offset)
                                                 : NULL;
  pmp_op_args a = {.op = PMP_OP_PAGED_ATTENTION, .out = out, .in = {qc, k_pool, v_pool, tables, lens}, .nin = 5,
                   .f = {scale}};
  pmp_tensor *inputs[3] = {qc, k_pool, v_pool};
  out = pmp_run_op(&a, inputs, 3, NULL, 0, NULL);
  pmp_scope_end(&s);
  return out;
}
