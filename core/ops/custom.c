/*
 * Custom autograd nodes: their backward is a function the host supplies (in pmp, Lua code through one
 * registered callback). Freed nodes are queued rather than reported by callback, because nodes are
 * often freed by the garbage collector, where calling back into Lua is not safe.
 */
#include "internal.h"

static pmp_custom_backward_fn custom_backward;
static int64_t *freed_ids;
static size_t freed_count, freed_capacity;

void pmp_set_custom_backward(pmp_custom_backward_fn fn) { custom_backward = fn; }

int pmp_custom_record(pmp_tensor *out, pmp_tensor *const *inputs, int ninputs, int64_t function_id) {
  if (!out) return -1;
  if (out->grad_fn) return pmp_fail_code("custom function: its output was recorded by another op");
  if (!pmp_needs_grad(inputs, ninputs)) return 0;
  pmp_node *n = pmp_record(PMP_OP_CUSTOM, out, inputs, ninputs, NULL, 0);
  if (!n) return -1;
  n->i[0] = function_id;
  return 0;
}

int pmp_backward_custom(pmp_node *n, pmp_tensor *g, pmp_tensor **grads) {
  if (!custom_backward) return pmp_fail_code("custom function: no backward callback is registered");
  return custom_backward(n->i[0], g, grads, n->ninputs);
}

void pmp_custom_node_freed(pmp_node *n) {
  if (freed_count == freed_capacity) {
    size_t cap = freed_capacity ? freed_capacity * 2 : 64;
    int64_t *grown = realloc(freed_ids, cap * sizeof *grown);
    if (!grown) return; /* the host then keeps that function's state: a leak, not a wrong result */
    freed_ids = grown;
    freed_capacity = cap;
  }
  freed_ids[freed_count++] = n->i[0];
}

int pmp_custom_take_freed(int64_t *ids, int max) {
  int n = 0;
  while (freed_count > 0 && n < max) ids[n++] = freed_ids[--freed_count];
  return n;
}
