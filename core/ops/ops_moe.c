/* Mixture-of-experts ops: the grouped GEMM over tokens sorted by expert, and the un-permutation that
 * weights each expert row by its routing probability and sums it back into its token's row. (The
 * permutation itself is index_select of the token rows in expert order.) Kernels: cpu_moe.c. */
#include "internal.h"

#define SHAPE(t, buf) pmp_shape_str((t)->sizes, (t)->ndim, buf, sizeof buf)

/* counts: an integer tensor [E] on the CPU with non-negative entries summing to rows. */
static bool check_counts(const pmp_tensor *counts, int64_t experts, int64_t rows, const char *op) {
  char sc[PMP_SHAPE_BUF];
  if (counts->dev.type != PMP_CPU || (counts->dtype_id != PMP_I64 && counts->dtype_id != PMP_I32) || counts->ndim != 1 ||
      counts->sizes[0] != experts) {
    pmp_fail("%s: counts must be a CPU integer tensor [%lld] (one per expert), got %s %s", op, (long long)experts,
             pmp_dtype_name(counts->dtype_id), SHAPE(counts, sc));
    return false;
  }
  int64_t total = 0;
  int es = pmp_dtype_size(counts->dtype_id);
  for (int64_t e = 0; e < experts; e++) {
    int64_t c = pmp_load_as_i64(counts->dtype_id, counts->data + e * counts->strides[0] * es);
    if (c < 0) {
      pmp_fail("%s: counts[%lld] is negative (%lld)", op, (long long)e, (long long)c);
      return false;
    }
    total += c;
  }
  if (total != rows) {
    pmp_fail("%s: counts sum to %lld but the input has %lld rows", op, (long long)total, (long long)rows);
    return false;
  }
  return true;
}

pmp_tensor *pmp_grouped_matmul(pmp_tensor *x, pmp_tensor *w, pmp_tensor *counts) {
  if (!x || !w || !counts) return NULL;
  char sx[PMP_SHAPE_BUF], sw[PMP_SHAPE_BUF];
  if (!pmp_same_device(x, w, "grouped_matmul")) return NULL;
  if (x->ndim != 2 || w->ndim != 3 || w->sizes[2] != x->sizes[1] || !pmp_dtype_is_float(x->dtype_id) ||
      x->dtype_id != w->dtype_id)
    return pmp_fail("grouped_matmul: needs x [rows, in] and weights [experts, out, in] of one floating dtype, got %s %s "
                    "and %s %s", pmp_dtype_name(x->dtype_id), SHAPE(x, sx), pmp_dtype_name(w->dtype_id), SHAPE(w, sw));
  if (!check_counts(counts, w->sizes[0], x->sizes[0], "grouped_matmul")) return NULL;
  pmp_scope s = {0};
  pmp_tensor *cc = pmp_keep(&s, pmp_to_dtype(counts, PMP_I64));
  pmp_tensor *ccont = pmp_keep(&s, cc ? pmp_contiguous(cc) : NULL);
  int64_t shape[2] = {x->sizes[0], w->sizes[1]};
  pmp_tensor *out = NULL;
  if (ccont) {
    pmp_op_args a = {.op = PMP_OP_GROUPED_MATMUL, .out = pmp_empty_shape(shape, 2, x->dtype_id, x->dev),
                     .in = {x, w, ccont}, .nin = 3};
    pmp_tensor *inputs[2] = {x, w};
    out = pmp_run_op(&a, inputs, 2, (pmp_tensor *[]){x, w, ccont}, 3, NULL);
  }
  pmp_scope_end(&s);
  return out;
}

int pmp_backward_grouped_matmul(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *x = n->saved[0], *w = n->saved[1], *counts = n->saved[2];
  pmp_tensor *gc = pmp_contiguous(g);
  if (!gc) return -1;
  int rc = 0;
  if (PMP_NEEDS(n, 0)) {
    /* dx_e = g_e w_e: the same product with each expert's matrix transposed */
    pmp_tensor *wt = pmp_transpose(w, 1, 2);
    grads[0] = wt ? pmp_grouped_matmul(gc, wt, counts) : NULL;
    pmp_tensor_release(wt);
    if (!grads[0]) rc = -1;
  }
  if (rc == 0 && PMP_NEEDS(n, 1)) {
    pmp_op_args a = {.op = PMP_OP_GROUPED_MATMUL_WEIGHT_GRAD, .out = pmp_empty_like(w, -1), .in = {gc, x, counts}, .nin = 3};
    if (!a.out || pmp_dispatch(&a) != 0) {
      pmp_tensor_release(a.out);
      rc = -1;
    } else {
      grads[1] = a.out;
    }
  }
  pmp_tensor_release(gc);
  return rc;
}

pmp_tensor *pmp_moe_unpermute(pmp_tensor *y, pmp_tensor *probs, pmp_tensor *rows, int64_t num_tokens) {
  if (!y || !probs || !rows) return NULL;
  char sy[PMP_SHAPE_BUF], sp[PMP_SHAPE_BUF], sr[PMP_SHAPE_BUF];
  if (!pmp_same_device(y, probs, "moe_unpermute") || !pmp_same_device(y, rows, "moe_unpermute")) return NULL;
  if (y->ndim != 2 || probs->ndim != 1 || rows->ndim != 1 || probs->sizes[0] != y->sizes[0] ||
      rows->sizes[0] != y->sizes[0] || !pmp_dtype_is_float(y->dtype_id) ||
      (rows->dtype_id != PMP_I64 && rows->dtype_id != PMP_I32) || num_tokens < 0)
    return pmp_fail("moe_unpermute: needs expert rows [n, hidden] (floating), probabilities [n] and integer token "
                    "rows [n], got %s %s, %s and %s %s", pmp_dtype_name(y->dtype_id), SHAPE(y, sy), SHAPE(probs, sp),
                    pmp_dtype_name(rows->dtype_id), SHAPE(rows, sr));
  pmp_scope s = {0};
  pmp_tensor *yc = pmp_keep(&s, pmp_contiguous(y));
  pmp_tensor *pc = pmp_keep(&s, pmp_contiguous(pmp_keep(&s, pmp_to_dtype(probs, y->dtype_id))));
  pmp_tensor *rc = pmp_keep(&s, pmp_contiguous(pmp_keep(&s, pmp_to_dtype(rows, PMP_I64))));
  int64_t shape[2] = {num_tokens, y->sizes[1]};
  pmp_tensor *out = NULL;
  if (yc && pc && rc) {
    pmp_op_args a = {.op = PMP_OP_MOE_UNPERMUTE, .out = pmp_empty_shape(shape, 2, y->dtype_id, y->dev),
                     .in = {yc, pc, rc}, .nin = 3};
    pmp_tensor *inputs[2] = {y, probs};
    out = pmp_run_op(&a, inputs, 2, (pmp_tensor *[]){yc, pc, rc}, 3, NULL);
  }
  pmp_scope_end(&s);
  return out;
}

int pmp_backward_moe_unpermute(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  pmp_tensor *y = n->saved[0], *probs = n->saved[1], *rows = n->saved[2];
  pmp_tensor *gc = pmp_contiguous(g);
  pmp_op_args a = {.op = PMP_OP_MOE_UNPERMUTE_BACKWARD, .out = pmp_empty_like(y, -1), .out2 = pmp_empty_like(probs, -1),
                   .in = {y, probs, rows, gc}, .nin = 4};
  int rc = gc && a.out && a.out2 ? pmp_dispatch(&a) : -1;
  pmp_tensor_release(gc);
  if (rc != 0) {
    pmp_tensor_release(a.out);
    pmp_tensor_release(a.out2);
    return -1;
  }
  if (PMP_NEEDS(n, 0)) grads[0] = a.out; else pmp_tensor_release(a.out);
  if (PMP_NEEDS(n, 1)) grads[1] = a.out2; else pmp_tensor_release(a.out2);
  return 0;
}
