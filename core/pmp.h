/*
 * pmp.h — the flat C ABI of the pmp engine: the one header C code includes.
 *
 * It includes one header per area, in dependency order; each holds its declarations between two CDEF
 * markers. lua/pmp/ffi.lua reads the list of area headers below and hands LuaJIT each marked region in
 * this order, so Lua sees exactly what C sees.
 *
 * Conventions
 *  - Dimensions are 0-based here; the Lua layer converts from its 1-based, negative-from-the-end form.
 *  - Every function that returns a pmp_tensor* returns a new reference (release it with
 *    pmp_tensor_release) or NULL on failure. Functions returning int return 0 on success and -1 on
 *    failure. After a failure pmp_last_error() describes it, naming the op and the shapes involved;
 *    messages count dims and rows from 1, as the Lua user does.
 *  - No function aborts on user input. abort() is reserved for broken internal invariants.
 *  - Ops record an autograd node when grad mode is on and an input requires grad.
 */
#ifndef PMP_H
#define PMP_H

#include <stdint.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "pmp/engine.h"
#include "pmp/tensor.h"
#include "pmp/random.h"
#include "pmp/ops.h"
#include "pmp/autograd.h"
#include "pmp/io.h"
#include "pmp/dist.h"
#include "pmp/nccl.h"
#include "pmp/tokenizer.h"

#ifdef __cplusplus
}
#endif
#endif
