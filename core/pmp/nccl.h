/* The C ABI, GPU collectives with NCCL (cuda/nccl.cu, built apart by `make cuda`).
 * Included through pmp.h, whose conventions hold here; lua/pmp/ffi.lua declares the region between the
 * CDEF markers to LuaJIT, so it holds plain C declarations only. */
#ifndef PMP_NCCL_H
#define PMP_NCCL_H

#include <stdint.h>
#include "pmp/dist.h"

/* PMP_CDEF_BEGIN */

/* ---- GPU collectives with NCCL (cuda/nccl.cu, in build/libpmp_cuda.so made by `make cuda`) ----
 * On device memory; a NCCL communicator mirrors a pmp_comm (its unique id goes over that group's MPI
 * broadcast). Ops are queued on the communicator's stream; pmp_nccl_wait waits for them. */
typedef struct pmp_nccl_comm pmp_nccl_comm;
pmp_nccl_comm *pmp_nccl_comm_new(pmp_comm *group, int device);
void pmp_nccl_comm_free(pmp_nccl_comm *c);
int pmp_nccl_all_reduce(pmp_nccl_comm *c, void *data, int64_t count, int dtype, int op);
int pmp_nccl_all_gather(pmp_nccl_comm *c, void *out, const void *in, int64_t count, int dtype);  /* count per rank */
int pmp_nccl_reduce_scatter(pmp_nccl_comm *c, void *out, const void *in, int64_t count, int dtype, int op);
int pmp_nccl_broadcast(pmp_nccl_comm *c, void *data, int64_t count, int dtype, int root);
int pmp_nccl_send(pmp_nccl_comm *c, const void *data, int64_t count, int dtype, int peer);
int pmp_nccl_recv(pmp_nccl_comm *c, void *data, int64_t count, int dtype, int peer);
int pmp_nccl_wait(pmp_nccl_comm *c);

/* PMP_CDEF_END */

#endif
