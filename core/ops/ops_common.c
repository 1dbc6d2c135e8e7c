/* Small pieces every op front-end and backward rule uses. */
#include "internal.h"
#include <stdio.h>

pmp_tensor *pmp_scalar(double v, int dtype, pmp_device device) { return pmp_full(NULL, 0, v, dtype, device); }

pmp_tensor *pmp_keep(pmp_scope *s, pmp_tensor *t) {
  if (!t) return NULL;
  int capacity = (int)(sizeof s->items / sizeof s->items[0]);
  if (s->count == capacity) {
    fprintf(stderr, "pmp: internal error: a scope of temporaries is full (%d); raise pmp_scope's capacity\n", capacity);
    abort();
  }
  s->items[s->count++] = t;
  return t;
}

void pmp_scope_end(pmp_scope *s) {
  for (int k = 0; k < s->count; k++) pmp_tensor_release(s->items[k]);
  s->count = 0;
}

pmp_tensor *pmp_run_new(pmp_op_args *args, const int64_t *shape, int ndim, int dtype, pmp_device device) {
  pmp_tensor *out = pmp_empty_shape(shape, ndim, dtype, device);
  if (!out) return NULL;
  args->out = out;
  if (pmp_dispatch(args) != 0) {
    pmp_tensor_release(out);
    return NULL;
  }
  return out;
}

pmp_tensor pmp_saved_output_marker;

pmp_node *pmp_record_op(int op, pmp_tensor **out, pmp_tensor *const *inputs, int ninputs, pmp_tensor *const *saved,
                        int nsaved) {
  pmp_tensor *result = *out;
  if (!result || !pmp_op_table[op].backward || !pmp_dtype_is_float(result->dtype_id) || !pmp_needs_grad(inputs, ninputs))
    return NULL;
  if (nsaved > PMP_NODE_MAX_SAVED) {
    fprintf(stderr, "pmp: internal error: %s saves %d tensors, a node holds %d\n", pmp_op_name(op), nsaved,
            PMP_NODE_MAX_SAVED);
    abort();
  }
  pmp_tensor *kept[PMP_NODE_MAX_SAVED], *detached = NULL;
  bool ready = true;
  for (int k = 0; k < nsaved; k++) {
    kept[k] = saved[k];
    if (saved[k] != PMP_SAVED_OUTPUT) continue;
    if (!detached) detached = pmp_detach(result);
    kept[k] = detached;
    ready = detached != NULL;
  }
  pmp_node *n = ready ? pmp_record(op, result, inputs, ninputs, kept, nsaved) : NULL;
  pmp_tensor_release(detached);
  if (!n) {
    pmp_tensor_release(result);
    *out = NULL;
  }
  return n;
}

pmp_tensor *pmp_run_op(pmp_op_args *args, pmp_tensor *const *inputs, int ninputs, pmp_tensor *const *saved,
                       int nsaved, pmp_node **node) {
  if (node) *node = NULL;
  pmp_tensor *out = args->out;
  if (!out) return NULL;
  if (pmp_check_interrupt(pmp_op_name(args->op)) || pmp_dispatch(args) != 0) {
    pmp_tensor_release(out);
    return NULL;
  }
  pmp_node *n = pmp_record_op(args->op, &out, inputs, ninputs, saved, nsaved);
  if (node) *node = n;
  return out;
}

pmp_tensor *pmp_full(const int64_t *shape, int ndim, double value, int dtype, pmp_device device) {
  pmp_op_args a = {.op = PMP_OP_FILL, .f = {value}};
  return pmp_run_new(&a, shape, ndim, dtype, device);
}

pmp_tensor *pmp_arange(double start, double end, double step, int dtype, pmp_device device) {
  if (step == 0) return pmp_fail("arange: step must be nonzero");
  if ((end - start) / step > 1e12) return pmp_fail("arange: %g to %g by %g is too long", start, end, step);
  double count = (end - start) / step;
  int64_t n = count <= 0 ? 0 : (int64_t)count;
  if (n < count) n++;
  pmp_op_args a = {.op = PMP_OP_ARANGE, .f = {start, step}};
  return pmp_run_new(&a, &n, 1, dtype, device);
}
