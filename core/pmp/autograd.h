/* The C ABI, autograd: grad mode, backward, and custom nodes whose backward the host supplies
 * (core/ops/autograd.c, core/ops/custom.c).
 * Included through pmp.h, whose conventions hold here; lua/pmp/ffi.lua declares the region between the
 * CDEF markers to LuaJIT, so it holds plain C declarations only. */
#ifndef PMP_AUTOGRAD_H
#define PMP_AUTOGRAD_H

#include <stdint.h>
#include "pmp/tensor.h"

/* PMP_CDEF_BEGIN */

/* ---- autograd ---- */
int pmp_set_grad_enabled(int enabled);          /* returns the previous mode */
int pmp_is_grad_enabled(void);
int pmp_set_requires_grad(pmp_tensor *t, int flag);
int pmp_set_grad(pmp_tensor *t, pmp_tensor *grad);   /* grad may be NULL to clear */
/* grad NULL means ones (t must then hold one element). Frees the graph unless retain_graph. */
int pmp_backward(pmp_tensor *t, pmp_tensor *grad, int retain_graph);
int pmp_node_op(const pmp_node *node);

/* Custom autograd functions. The host registers one backward callback; it receives the function id
 * given to pmp_custom_record, the output's gradient, and one slot per input to fill with a new
 * reference (or leave NULL); it returns 0 or -1 (with pmp_last_error set through pmp_set_error). */
typedef int (*pmp_custom_backward_fn)(int64_t function_id, pmp_tensor *grad_output, pmp_tensor **grad_inputs,
                                      int ninputs);
void pmp_set_custom_backward(pmp_custom_backward_fn fn);
/* Makes `out` (computed with grad mode off) the output of a custom node over the inputs. */
int pmp_custom_record(pmp_tensor *out, pmp_tensor *const *inputs, int ninputs, int64_t function_id);
/* Ids of custom nodes freed since the last call (up to max), so the host can drop their state
 * without being called back from inside a garbage collector. Returns how many were written. */
int pmp_custom_take_freed(int64_t *ids, int max);

/* PMP_CDEF_END */

#endif
