/* Matrix multiplication with numpy semantics: 1-D operands, batch broadcasting, and its backward. */
#include "internal.h"

/* Core batched product: a [..., n, k] and b [..., k, m] with identical batch dims (possibly stride 0). */
static pmp_tensor *batched_matmul(pmp_tensor *a, pmp_tensor *b) {
  int nd = a->ndim;
  int64_t shape[PMP_MAX_DIMS];
  memcpy(shape, a->sizes, sizeof shape);
  shape[nd - 1] = b->sizes[nd - 1];
  pmp_op_args args = {.op = PMP_OP_MATMUL, .out = pmp_empty_shape(shape, nd, a->dtype_id, a->dev), .in = {a, b}, .nin = 2};
  pmp_tensor *inputs[2] = {a, b};
  return pmp_run_op(&args, inputs, 2, inputs, 2, NULL);
}

int pmp_backward_matmul(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *a = n->saved[0], *b = n->saved[1];
  int nd = a->ndim;
  if (PMP_NEEDS(n, 0)) {
    pmp_tensor *bt = pmp_transpose(b, nd - 2, nd - 1);
    grads[0] = bt ? batched_matmul(g, bt) : NULL;
    pmp_tensor_release(bt);
    if (!grads[0]) return -1;
  }
  if (PMP_NEEDS(n, 1)) {
    /* b stored by columns is a weight used transposed (x @ w:t()): its gradient is computed as
     * (g^T a)^T, so that after the transpose's backward the weight gets a contiguous gradient it can
     * keep, instead of a transposed view that has to be copied. */
    bool by_columns = b->strides[nd - 2] == 1 && b->strides[nd - 1] >= b->sizes[nd - 2] && b->sizes[nd - 1] > 1;
    if (by_columns) {
      pmp_tensor *gt = pmp_transpose(g, nd - 2, nd - 1);
      pmp_tensor *prod = gt ? batched_matmul(gt, a) : NULL;
      grads[1] = prod ? pmp_transpose(prod, nd - 2, nd - 1) : NULL;
      pmp_tensor_release(gt);
      pmp_tensor_release(prod);
    } else {
      pmp_tensor *at = pmp_transpose(a, nd - 2, nd - 1);
      grads[1] = at ? batched_matmul(at, g) : NULL;
      pmp_tensor_release(at);
    }
    if (!grads[1]) return -1;
  }
  return 0;
}

static pmp_tensor *matmul_nd(pmp_tensor *a, pmp_tensor *b) {
  char sa[PMP_SHAPE_BUF], sb[PMP_SHAPE_BUF];
  if (a->sizes[a->ndim - 1] != b->sizes[b->ndim - 2])
    return pmp_fail("matmul: shapes %s and %s are not aligned", pmp_shape_str(a->sizes, a->ndim, sa, sizeof sa),
                    pmp_shape_str(b->sizes, b->ndim, sb, sizeof sb));
  /* x [..., n, k] @ w [k, m]: fold the batch into rows, one large GEMM instead of many small ones */
  if (b->ndim == 2 && a->ndim > 2) {
    int64_t rows[2] = {-1, a->sizes[a->ndim - 1]};
    pmp_tensor *flat = pmp_reshape(a, rows, 2);
    pmp_tensor *prod = flat ? batched_matmul(flat, b) : NULL;
    int64_t shape[PMP_MAX_DIMS];
    memcpy(shape, a->sizes, sizeof shape);
    shape[a->ndim - 1] = b->sizes[1];
    pmp_tensor *out = prod ? pmp_view(prod, shape, a->ndim) : NULL;
    pmp_tensor_release(flat);
    pmp_tensor_release(prod);
    return out;
  }
  int64_t batch[PMP_MAX_DIMS];
  int nbatch;
  if (!pmp_broadcast_shapes(a->sizes, a->ndim - 2, b->sizes, b->ndim - 2, batch, &nbatch))
    return pmp_fail("matmul: batch dims of shapes %s and %s cannot be broadcast together",
                    pmp_shape_str(a->sizes, a->ndim, sa, sizeof sa), pmp_shape_str(b->sizes, b->ndim, sb, sizeof sb));
  int64_t sha[PMP_MAX_DIMS], shb[PMP_MAX_DIMS];
  memcpy(sha, batch, sizeof(int64_t) * (size_t)nbatch);
  memcpy(shb, batch, sizeof(int64_t) * (size_t)nbatch);
  sha[nbatch] = a->sizes[a->ndim - 2], sha[nbatch + 1] = a->sizes[a->ndim - 1];
  shb[nbatch] = b->sizes[b->ndim - 2], shb[nbatch + 1] = b->sizes[b->ndim - 1];
  pmp_tensor *ea = pmp_expand(a, sha, nbatch + 2);
  pmp_tensor *eb = pmp_expand(b, shb, nbatch + 2);
  pmp_tensor *out = ea && eb ? batched_matmul(ea, eb) : NULL;
  pmp_tensor_release(ea);
  pmp_tensor_release(eb);
  return out;
}

pmp_tensor *pmp_matmul(pmp_tensor *a, pmp_tensor *b) {
  if (!a || !b) return NULL;
  if (!pmp_same_device(a, b, "matmul")) return NULL;
  char sa[PMP_SHAPE_BUF], sb[PMP_SHAPE_BUF];
  if (a->ndim == 0 || b->ndim == 0)
    return pmp_fail("matmul: both operands need at least 1 dim, got shapes %s and %s",
                    pmp_shape_str(a->sizes, a->ndim, sa, sizeof sa), pmp_shape_str(b->sizes, b->ndim, sb, sizeof sb));
  int64_t inner_a = a->sizes[a->ndim - 1], inner_b = b->sizes[b->ndim > 1 ? b->ndim - 2 : 0];
  if (inner_a != inner_b)
    return pmp_fail("matmul: shapes %s and %s are not aligned", pmp_shape_str(a->sizes, a->ndim, sa, sizeof sa),
                    pmp_shape_str(b->sizes, b->ndim, sb, sizeof sb));
  int dtype = pmp_promote_types(a->dtype_id, b->dtype_id);
  pmp_scope s = {0};
  pmp_tensor *ca = a->dtype_id == dtype ? a : pmp_keep(&s, pmp_to_dtype(a, dtype));
  pmp_tensor *cb = b->dtype_id == dtype ? b : pmp_keep(&s, pmp_to_dtype(b, dtype));
  /* a 1-D left operand is a row vector, a 1-D right operand a column vector; the extra dim goes away after */
  bool a_vec = a->ndim == 1, b_vec = b->ndim == 1;
  if (a_vec) ca = pmp_keep(&s, pmp_unsqueeze(ca, 0));
  if (b_vec) cb = pmp_keep(&s, pmp_unsqueeze(cb, 1));
  pmp_tensor *out = ca && cb ? matmul_nd(ca, cb) : NULL;
  if (out && a_vec) out = pmp_squeeze(pmp_keep(&s, out), out->ndim - 2);
  if (out && b_vec) out = pmp_squeeze(pmp_keep(&s, out), out->ndim - 1);
  pmp_scope_end(&s);
  return out;
}
