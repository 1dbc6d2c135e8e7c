/* Small pieces every op front-end and backward rule uses. */
#include "internal.h"

pmp_tensor *pmp_scalar(double v, int dtype, pmp_device device) { return pmp_full(NULL, 0, v, dtype, device); }

pmp_tensor *pmp_keep(pmp_scope *s, pmp_tensor *t) {
  if (t && s->count < (int)(sizeof s->items / sizeof s->items[0])) s->items[s->count++] = t;
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
