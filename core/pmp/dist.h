/* The C ABI, collectives: communicators over MPI (core/dist/).
 * Included through pmp.h, whose conventions hold here; lua/pmp/ffi.lua declares the region between the
 * CDEF markers to LuaJIT, so it holds plain C declarations only. */
#ifndef PMP_DIST_H
#define PMP_DIST_H

#include <stdint.h>
#include "pmp/tensor.h"

/* PMP_CDEF_BEGIN */

/* ==== collectives (core/dist/dist.c): communicators over MPI ====
 * Started by pmp_dist_init when an MPI launcher (mpirun, srun) started the process; otherwise the world
 * is this process alone and every collective is local. Tensors must be contiguous cpu tensors. The
 * _start functions queue the op and return a request (NULL on a bad argument); pmp_dist_wait finishes
 * it, frees it and returns 0, or -1 with pmp_last_error() naming the op, group and ranks involved
 * (mismatched collectives across ranks, or no answer from a peer within the timeout). Ops run in the
 * order they were started; every rank of a group must start the group's collectives in the same order. */
enum { PMP_REDUCE_SUM = 0, PMP_REDUCE_AVG = 1, PMP_REDUCE_MAX = 2, PMP_REDUCE_MIN = 3 };
typedef struct pmp_comm pmp_comm;
typedef struct pmp_dist_request pmp_dist_request;
typedef struct pmp_dist_stats {
  int64_t bytes_sent;        /* payload and headers this process handed to the network */
  int64_t bytes_received;
  int64_t collectives;       /* collectives run */
  double busy_seconds;       /* time the communication thread spent in collectives */
  double wait_seconds;       /* time callers spent blocked in pmp_dist_wait */
  double all_to_all_seconds; /* the part of busy_seconds spent in all-to-alls (MoE token dispatch) */
} pmp_dist_stats;
int pmp_dist_init(double timeout_seconds);      /* timeout <= 0: PMP_DIST_TIMEOUT or 600 s */
int pmp_dist_is_initialized(void);
int pmp_dist_uses_mpi(void);
double pmp_dist_timeout(void);
void pmp_dist_finalize(void);
pmp_comm *pmp_comm_world(void);
/* Collective over parent: ranks passing the same color >= 0 form a group ordered by key; color < 0
 * returns NULL with no error (this rank is in no such group). */
pmp_comm *pmp_comm_split(pmp_comm *parent, int color, int key, const char *name);
int pmp_comm_rank(const pmp_comm *c);
int pmp_comm_size(const pmp_comm *c);
const char *pmp_comm_name(const pmp_comm *c);
int pmp_comm_world_rank(const pmp_comm *c, int rank);
pmp_dist_request *pmp_all_reduce_start(pmp_comm *c, pmp_tensor *t, int op);            /* in place */
pmp_dist_request *pmp_all_gather_start(pmp_comm *c, pmp_tensor *out, pmp_tensor *in);  /* out = size x in */
pmp_dist_request *pmp_reduce_scatter_start(pmp_comm *c, pmp_tensor *out, pmp_tensor *in, int op);
pmp_dist_request *pmp_broadcast_start(pmp_comm *c, pmp_tensor *t, int root);
/* in holds send_counts[k] elements for rank k, back to back in rank order; out receives recv_counts[k]
 * from rank k the same way (counts: one per rank of the group; every rank's send count for rank k must
 * be rank k's receive count from it). */
pmp_dist_request *pmp_all_to_all_start(pmp_comm *c, pmp_tensor *out, pmp_tensor *in, const int64_t *send_counts,
                                       const int64_t *recv_counts);
pmp_dist_request *pmp_send_start(pmp_comm *c, pmp_tensor *t, int peer, int tag);
pmp_dist_request *pmp_recv_start(pmp_comm *c, pmp_tensor *t, int peer, int tag);
pmp_dist_request *pmp_barrier_start(pmp_comm *c);
int pmp_dist_test(pmp_dist_request *r);         /* 1 when finished (pmp_dist_wait still frees it) */
int pmp_dist_wait(pmp_dist_request *r);
const pmp_dist_stats *pmp_dist_stats_get(void);
void pmp_dist_stats_reset(void);

/* PMP_CDEF_END */

#endif
