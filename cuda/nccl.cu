/* Collectives between GPUs with NCCL, on device memory.
 *
 * A NCCL communicator mirrors one pmp_comm (core/dist/dist.c): rank 0 of the group creates NCCL's unique id
 * and the group's MPI broadcast carries it to the others, so NCCL groups follow exactly the Megatron
 * layout pmp.dist.init built. Ops are enqueued on the communicator's own stream; pmp_nccl_wait blocks
 * until they are done. Errors come back as -1 with pmp_last_error() naming the op and the group.
 *
 * Built into build/libpmp_cuda.so by `make cuda`, so the pmp executable itself needs no CUDA. */
#include <cuda_runtime.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "pmp.h"

struct pmp_nccl_comm {
  ncclComm_t comm;
  cudaStream_t stream;
  int rank, size;
  char name[64];
};

static int fail_nccl(const pmp_nccl_comm *c, const char *op, ncclResult_t rc) {
  char message[512];
  snprintf(message, sizeof message, "pmp.dist (nccl): %s on group '%s' (rank %d of %d): %s", op, c ? c->name : "?",
           c ? c->rank : -1, c ? c->size : 0, ncclGetErrorString(rc));
  pmp_set_error(message);
  return -1;
}

static int fail_cuda(const char *op, cudaError_t rc) {
  char message[512];
  snprintf(message, sizeof message, "pmp.dist (nccl): %s: %s", op, cudaGetErrorString(rc));
  pmp_set_error(message);
  return -1;
}

static int nccl_dtype(int dtype, ncclDataType_t *out) {
  switch (dtype) {
  case PMP_F64: *out = ncclFloat64; return 0;
  case PMP_F32: *out = ncclFloat32; return 0;
  case PMP_F16: *out = ncclFloat16; return 0;
  case PMP_BF16: *out = ncclBfloat16; return 0;
  case PMP_I64: *out = ncclInt64; return 0;
  case PMP_I32: *out = ncclInt32; return 0;
  case PMP_U8: case PMP_BOOL: *out = ncclUint8; return 0;
  default: return -1;
  }
}

static int nccl_op(int op, ncclRedOp_t *out) {
  switch (op) {
  case PMP_REDUCE_SUM: *out = ncclSum; return 0;
  case PMP_REDUCE_AVG: *out = ncclAvg; return 0;
  case PMP_REDUCE_MAX: *out = ncclMax; return 0;
  case PMP_REDUCE_MIN: *out = ncclMin; return 0;
  default: return -1;
  }
}

pmp_nccl_comm *pmp_nccl_comm_new(pmp_comm *group, int device) {
  cudaError_t crc = cudaSetDevice(device);
  if (crc != cudaSuccess) return fail_cuda("cudaSetDevice", crc), (pmp_nccl_comm *)NULL;
  pmp_nccl_comm *c = (pmp_nccl_comm *)calloc(1, sizeof *c);
  c->rank = pmp_comm_rank(group);
  c->size = pmp_comm_size(group);
  snprintf(c->name, sizeof c->name, "%s", pmp_comm_name(group));
  ncclUniqueId id;
  if (c->rank == 0) {
    ncclResult_t rc = ncclGetUniqueId(&id);
    if (rc != ncclSuccess) return fail_nccl(c, "ncclGetUniqueId", rc), free(c), (pmp_nccl_comm *)NULL;
  }
  /* the id travels as bytes over the group's MPI broadcast */
  int64_t shape[1] = {(int64_t)sizeof id};
  pmp_device cpu = {PMP_CPU, 0};
  pmp_tensor *bytes = pmp_from_buffer(&id, PMP_U8, shape, 1, PMP_U8, cpu);
  if (!bytes) return free(c), (pmp_nccl_comm *)NULL;
  pmp_dist_request *r = pmp_broadcast_start(group, bytes, 0);
  if (!r || pmp_dist_wait(r) != 0) return pmp_tensor_release(bytes), free(c), (pmp_nccl_comm *)NULL;
  memcpy(&id, bytes->data, sizeof id);
  pmp_tensor_release(bytes);
  ncclResult_t rc = ncclCommInitRank(&c->comm, c->size, id, c->rank);
  if (rc != ncclSuccess) return fail_nccl(c, "ncclCommInitRank", rc), free(c), (pmp_nccl_comm *)NULL;
  crc = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
  if (crc != cudaSuccess) return ncclCommDestroy(c->comm), free(c), fail_cuda("cudaStreamCreate", crc), (pmp_nccl_comm *)NULL;
  return c;
}

void pmp_nccl_comm_free(pmp_nccl_comm *c) {
  if (!c) return;
  cudaStreamSynchronize(c->stream);
  ncclCommDestroy(c->comm);
  cudaStreamDestroy(c->stream);
  free(c);
}

int pmp_nccl_all_reduce(pmp_nccl_comm *c, void *data, int64_t count, int dtype, int op) {
  ncclDataType_t t;
  ncclRedOp_t o;
  if (nccl_dtype(dtype, &t) || nccl_op(op, &o)) return fail_nccl(c, "all_reduce", ncclInvalidArgument);
  ncclResult_t rc = ncclAllReduce(data, data, (size_t)count, t, o, c->comm, c->stream);
  return rc == ncclSuccess ? 0 : fail_nccl(c, "all_reduce", rc);
}

int pmp_nccl_all_gather(pmp_nccl_comm *c, void *out, const void *in, int64_t count, int dtype) {
  ncclDataType_t t;
  if (nccl_dtype(dtype, &t)) return fail_nccl(c, "all_gather", ncclInvalidArgument);
  ncclResult_t rc = ncclAllGather(in, out, (size_t)count, t, c->comm, c->stream);
  return rc == ncclSuccess ? 0 : fail_nccl(c, "all_gather", rc);
}

int pmp_nccl_reduce_scatter(pmp_nccl_comm *c, void *out, const void *in, int64_t count, int dtype, int op) {
  ncclDataType_t t;
  ncclRedOp_t o;
  if (nccl_dtype(dtype, &t) || nccl_op(op, &o)) return fail_nccl(c, "reduce_scatter", ncclInvalidArgument);
  ncclResult_t rc = ncclReduceScatter(in, out, (size_t)count, t, o, c->comm, c->stream);
  return rc == ncclSuccess ? 0 : fail_nccl(c, "reduce_scatter", rc);
}

int pmp_nccl_broadcast(pmp_nccl_comm *c, void *data, int64_t count, int dtype, int root) {
  ncclDataType_t t;
  if (nccl_dtype(dtype, &t)) return fail_nccl(c, "broadcast", ncclInvalidArgument);
  ncclResult_t rc = ncclBroadcast(data, data, (size_t)count, t, root, c->comm, c->stream);
  return rc == ncclSuccess ? 0 : fail_nccl(c, "broadcast", rc);
}

int pmp_nccl_send(pmp_nccl_comm *c, const void *data, int64_t count, int dtype, int peer) {
  ncclDataType_t t;
  if (nccl_dtype(dtype, &t)) return fail_nccl(c, "send", ncclInvalidArgument);
  ncclResult_t rc = ncclSend(data, (size_t)count, t, peer, c->comm, c->stream);
  return rc == ncclSuccess ? 0 : fail_nccl(c, "send", rc);
}

int pmp_nccl_recv(pmp_nccl_comm *c, void *data, int64_t count, int dtype, int peer) {
  ncclDataType_t t;
  if (nccl_dtype(dtype, &t)) return fail_nccl(c, "recv", ncclInvalidArgument);
  ncclResult_t rc = ncclRecv(data, (size_t)count, t, peer, c->comm, c->stream);
  return rc == ncclSuccess ? 0 : fail_nccl(c, "recv", rc);
}

int pmp_nccl_wait(pmp_nccl_comm *c) {
  cudaError_t rc = cudaStreamSynchronize(c->stream);
  if (rc != cudaSuccess) return fail_cuda("cudaStreamSynchronize", rc);
  ncclResult_t async_error;
  ncclResult_t nrc = ncclCommGetAsyncError(c->comm, &async_error);
  if (nrc != ncclSuccess) return fail_nccl(c, "ncclCommGetAsyncError", nrc);
  return async_error == ncclSuccess ? 0 : fail_nccl(c, "wait", async_error);
}

}  /* extern "C" */
