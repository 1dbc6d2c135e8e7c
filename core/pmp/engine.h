/* The C ABI, engine-wide: version, errors, names of ops and dtypes, threads, interrupts,
 * stop requests (core/error.c, core/stop_signals.c, core/tensor/, core/ops/optable.c).
 * Included through pmp.h, whose conventions hold here; lua/pmp/ffi.lua declares the region between the
 * CDEF markers to LuaJIT, so it holds plain C declarations only. */
#ifndef PMP_ENGINE_H
#define PMP_ENGINE_H

/* PMP_CDEF_BEGIN */

/* ---- library ---- */
const char *pmp_version(void);
const char *pmp_last_error(void);
void pmp_clear_error(void);
/* sets the message pmp_last_error() returns (host callbacks report their failures with it) */
void pmp_set_error(const char *message);
const char *pmp_op_name(int op);
const char *pmp_dtype_name(int dtype);
int pmp_dtype_from_name(const char *name);        /* -1 if unknown */
int pmp_dtype_size(int dtype);
int pmp_promote_types(int a, int b);
int pmp_num_threads(void);
void pmp_set_num_threads(int n);
/* The host sets this on SIGINT; the next op fails with "interrupted" and clears it. */
void pmp_request_interrupt(void);
void pmp_clear_interrupt(void);

/* ---- stop requests (core/stop_signals.c) ----
 * While watched, SIGTERM (sigterm != 0) and SIGINT (sigint != 0) only record that a stop was asked, so
 * that a training loop can save a checkpoint and exit at the end of its iteration; a SIGINT after that
 * ends the process. pmp_stop_signal() is the first watched signal received (its number), 0 if none.
 * pmp_stop_signals_release() restores the handlers that were there before. */
int pmp_stop_signals_watch(int sigterm, int sigint);
void pmp_stop_signals_release(void);
int pmp_stop_signal(void);

/* PMP_CDEF_END */

#endif
