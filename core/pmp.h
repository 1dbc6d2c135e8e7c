/*
 * pmp.h — the flat C ABI of the pmp engine.
 *
 * This is the only header LuaJIT sees: lua/pmp/ffi.lua hands the text between the two CDEF markers to
 * ffi.cdef, so that region holds plain C declarations only (no preprocessor lines).
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

/* PMP_CDEF_BEGIN */

enum { PMP_MAX_DIMS = 8 };

typedef enum pmp_dtype {
  PMP_F64 = 0, PMP_F32 = 1, PMP_BF16 = 2, PMP_F16 = 3,
  PMP_I64 = 4, PMP_I32 = 5, PMP_U8 = 6, PMP_BOOL = 7, PMP_U16 = 8,   /* u16: token ids of indexed datasets */
  PMP_DTYPE_COUNT = 9
} pmp_dtype;

typedef enum pmp_device_type { PMP_CPU = 0, PMP_CUDA = 1, PMP_DEVICE_TYPE_COUNT = 2 } pmp_device_type;

typedef struct pmp_device { int32_t type; int32_t index; } pmp_device;

typedef struct pmp_storage pmp_storage;
typedef struct pmp_node pmp_node;

/* A Tensor is a view of a Storage. Lua reads these fields directly; only the engine writes them. Their
 * names differ from the Lua properties (t.shape, t.dtype, t.device, t.grad, t.requires_grad), which the
 * tensor metatype computes from them. */
typedef struct pmp_tensor {
  pmp_storage *storage;
  char *data;                       /* address of element [0,...,0] = storage base + offset */
  int64_t offset;                   /* bytes from the storage base */
  int64_t sizes[8];
  int64_t strides[8];               /* in elements, may be 0 (expanded) */
  int32_t ndim;
  int32_t dtype_id;                 /* pmp_dtype */
  pmp_device dev;
  int32_t refcount;
  int32_t needs_grad;               /* leaf that wants a gradient, or result of an op on such tensors */
  struct pmp_tensor *grad_acc;      /* accumulated gradient of a leaf, or NULL */
  pmp_node *grad_fn;                /* node that produced this tensor, NULL for leaves */
} pmp_tensor;

/* The op table. Every op the engine can run has one entry: name, a kernel per device, a backward rule. */
typedef enum pmp_op_id {
  /* unary elementwise */
  PMP_OP_NEG, PMP_OP_EXP, PMP_OP_LOG, PMP_OP_SQRT, PMP_OP_RSQRT, PMP_OP_ABS, PMP_OP_SIN, PMP_OP_COS,
  PMP_OP_TANH, PMP_OP_SIGMOID, PMP_OP_RELU, PMP_OP_GELU, PMP_OP_GELU_TANH, PMP_OP_SILU, PMP_OP_SIGN,
  PMP_OP_LOGICAL_NOT,
  /* binary elementwise, broadcasting */
  PMP_OP_ADD, PMP_OP_SUB, PMP_OP_MUL, PMP_OP_DIV, PMP_OP_POW, PMP_OP_MAXIMUM, PMP_OP_MINIMUM,
  PMP_OP_EQ, PMP_OP_NE, PMP_OP_LT, PMP_OP_LE, PMP_OP_GT, PMP_OP_GE,
  PMP_OP_LOGICAL_AND, PMP_OP_LOGICAL_OR,
  PMP_OP_GELU_GRAD, PMP_OP_GELU_TANH_GRAD, PMP_OP_SILU_GRAD,   /* (x, dy) -> dx */
  /* other elementwise */
  PMP_OP_WHERE, PMP_OP_CLAMP, PMP_OP_MASKED_FILL, PMP_OP_TRIL, PMP_OP_TRIU, PMP_OP_COPY,
  /* reductions */
  PMP_OP_SUM, PMP_OP_MEAN, PMP_OP_MAX, PMP_OP_MIN, PMP_OP_ARGMAX, PMP_OP_ARGMIN,
  /* linear algebra */
  PMP_OP_MATMUL,
  /* shape and indexing (views record these for autograd) */
  PMP_OP_VIEW, PMP_OP_PERMUTE, PMP_OP_EXPAND, PMP_OP_NARROW, PMP_OP_CAT, PMP_OP_GATHER,
  PMP_OP_SCATTER_ADD, PMP_OP_INDEX_SELECT, PMP_OP_INDEX_ADD, PMP_OP_TO_DTYPE,
  /* neural-network ops */
  PMP_OP_SOFTMAX, PMP_OP_LOG_SOFTMAX, PMP_OP_CROSS_ENTROPY, PMP_OP_CROSS_ENTROPY_BACKWARD,
  /* creation */
  PMP_OP_FILL, PMP_OP_ARANGE, PMP_OP_RAND, PMP_OP_RANDN, PMP_OP_RANDINT,
  /* fused transformer ops, each checked against the composition of the ops above */
  PMP_OP_RMS_NORM, PMP_OP_RMS_NORM_BACKWARD, PMP_OP_ROPE, PMP_OP_SWIGLU, PMP_OP_SWIGLU_BACKWARD,
  PMP_OP_ATTENTION, PMP_OP_ATTENTION_BACKWARD,
  /* optimizer steps (in place) */
  PMP_OP_ADAMW, PMP_OP_SCALE,
  /* a node whose backward the host supplies (Lua autograd functions, activation recompute) */
  PMP_OP_CUSTOM,
  PMP_OP_COUNT
} pmp_op_id;

/* ---- library ---- */
const char *pmp_version(void);
const char *pmp_last_error(void);
void pmp_clear_error(void);
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

/* ---- op profiler: while on, every kernel run is counted and timed per op (wall clock, calling
 * thread), so a training step can be broken down without an external profiler ---- */
void pmp_profile_enable(int on);
void pmp_profile_reset(void);
/* the calls and nanoseconds recorded for op (a pmp_op_id) since the last reset */
void pmp_profile_read(int op, int64_t *calls, int64_t *nanoseconds);

/* ---- memory: a caching allocator per device ---- */
typedef struct pmp_memory_stats {
  int64_t in_use;        /* bytes held by live storages */
  int64_t peak;          /* high-water mark of in_use since the last reset */
  int64_t cached;        /* bytes kept in the cache for reuse */
  int64_t allocs;        /* allocation requests */
  int64_t cache_hits;    /* requests served from the cache */
  int64_t allocated;     /* bytes handed out since start (monotonic) */
} pmp_memory_stats;
const pmp_memory_stats *pmp_memory_stats_of(int device_type);
void pmp_memory_reset_peak(int device_type);
void pmp_memory_empty_cache(int device_type);
void pmp_memory_set_cache_limit(int device_type, int64_t bytes);

/* ---- tensor lifecycle ---- */
void pmp_tensor_retain(pmp_tensor *t);
void pmp_tensor_release(pmp_tensor *t);
int pmp_is_contiguous(const pmp_tensor *t);
int64_t pmp_numel(const pmp_tensor *t);
pmp_tensor *pmp_empty(const int64_t *shape, int ndim, int dtype, pmp_device device);
pmp_tensor *pmp_full(const int64_t *shape, int ndim, double value, int dtype, pmp_device device);
pmp_tensor *pmp_arange(double start, double end, double step, int dtype, pmp_device device);
pmp_tensor *pmp_from_buffer(const void *data, int src_dtype, const int64_t *shape, int ndim, int dtype,
                            pmp_device device);
/* A storage over memory the caller owns (e.g. an mmap); release(ctx) runs when the last view goes. */
pmp_tensor *pmp_from_external(void *data, int64_t nbytes, int dtype, const int64_t *shape, int ndim,
                              pmp_device device, void (*release)(void *ctx), void *ctx);
/* Writes the elements in row-major order, converted to dst_dtype. */
int pmp_copy_to_buffer(const pmp_tensor *t, void *dst, int dst_dtype);
int pmp_item(const pmp_tensor *t, double *value);
double pmp_load_element(const pmp_tensor *t, int64_t element_offset);   /* offset in elements */

/* ---- random ---- */
void pmp_manual_seed(uint64_t seed);
/* The generator's whole state (4 words), so checkpoints can resume the exact random stream. */
void pmp_rng_get_state(uint64_t *state);
void pmp_rng_set_state(const uint64_t *state);
pmp_tensor *pmp_rand(const int64_t *shape, int ndim, int dtype, pmp_device device);
pmp_tensor *pmp_randn(const int64_t *shape, int ndim, int dtype, pmp_device device);
pmp_tensor *pmp_randint(int64_t low, int64_t high, const int64_t *shape, int ndim, int dtype,
                        pmp_device device);

/* ---- numpy's legacy RandomState (core/tensor/random_numpy.c) ----
 * MT19937 seeded and drawn as numpy.random.RandomState(seed) does, and its in-place 1-D shuffle, so the
 * GPT dataset's indices match megatron-core's draw for draw. The state is plain data: allocate it from
 * Lua with ffi.new('pmp_np_random'). */
typedef struct pmp_np_random { uint32_t key[624]; int32_t pos; } pmp_np_random;
void pmp_np_random_seed(pmp_np_random *r, uint32_t seed);
uint32_t pmp_np_random_next_u32(pmp_np_random *r);
uint64_t pmp_np_random_next_u64(pmp_np_random *r);                 /* two outputs, the first is the high half */
uint64_t pmp_np_random_interval(pmp_np_random *r, uint64_t max);   /* uniform in [0, max] (random_interval) */
void pmp_np_random_shuffle_i32(pmp_np_random *r, int32_t *data, int64_t n);   /* RandomState.shuffle */
void pmp_np_random_shuffle_i64(pmp_np_random *r, int64_t *data, int64_t n);

/* ---- conversion ---- */
pmp_tensor *pmp_to_dtype(pmp_tensor *t, int dtype);
pmp_tensor *pmp_to_device(pmp_tensor *t, pmp_device device);
pmp_tensor *pmp_contiguous(pmp_tensor *t);
pmp_tensor *pmp_clone(pmp_tensor *t);
pmp_tensor *pmp_detach(pmp_tensor *t);

/* ---- views and shape ---- */
pmp_tensor *pmp_view(pmp_tensor *t, const int64_t *shape, int ndim);      /* -1 infers one dim */
pmp_tensor *pmp_reshape(pmp_tensor *t, const int64_t *shape, int ndim);   /* view if possible */
pmp_tensor *pmp_permute(pmp_tensor *t, const int *dims, int ndim);
pmp_tensor *pmp_transpose(pmp_tensor *t, int dim0, int dim1);
pmp_tensor *pmp_unsqueeze(pmp_tensor *t, int dim);
pmp_tensor *pmp_squeeze(pmp_tensor *t, int dim);                          /* dim < 0: all size-1 dims */
pmp_tensor *pmp_expand(pmp_tensor *t, const int64_t *shape, int ndim);    /* -1 keeps a dim */
pmp_tensor *pmp_narrow(pmp_tensor *t, int dim, int64_t start, int64_t length);
pmp_tensor *pmp_cat(pmp_tensor *const *tensors, int count, int dim);
pmp_tensor *pmp_gather(pmp_tensor *t, int dim, pmp_tensor *index);
pmp_tensor *pmp_scatter_add(pmp_tensor *t, int dim, pmp_tensor *index, pmp_tensor *src);
pmp_tensor *pmp_index_select(pmp_tensor *t, int dim, pmp_tensor *index);
pmp_tensor *pmp_index_add(pmp_tensor *t, int dim, pmp_tensor *index, pmp_tensor *src);
pmp_tensor *pmp_masked_fill(pmp_tensor *t, pmp_tensor *mask, double value);
pmp_tensor *pmp_tril(pmp_tensor *t, int64_t diagonal);
pmp_tensor *pmp_triu(pmp_tensor *t, int64_t diagonal);

/* ---- in place (never recorded by autograd: use on leaves outside the graph, e.g. optimizer steps) ---- */
int pmp_copy_(pmp_tensor *dst, pmp_tensor *src);     /* src broadcast to dst's shape, dtype converted */
int pmp_fill_(pmp_tensor *t, double value);

/* ---- elementwise math ---- */
pmp_tensor *pmp_unary(int op, pmp_tensor *t);
pmp_tensor *pmp_binary(int op, pmp_tensor *a, pmp_tensor *b);
pmp_tensor *pmp_where(pmp_tensor *cond, pmp_tensor *a, pmp_tensor *b);
pmp_tensor *pmp_clamp(pmp_tensor *t, double min, double max);             /* +-inf for no bound */

/* ---- reductions: dims lists the reduced dims; ndims == 0 reduces all of them ---- */
pmp_tensor *pmp_sum(pmp_tensor *t, const int *dims, int ndims, int keepdim);
pmp_tensor *pmp_mean(pmp_tensor *t, const int *dims, int ndims, int keepdim);
/* max/min over one dim; *indices (may be NULL) receives the i64 positions */
pmp_tensor *pmp_max(pmp_tensor *t, int dim, int keepdim, pmp_tensor **indices);
pmp_tensor *pmp_min(pmp_tensor *t, int dim, int keepdim, pmp_tensor **indices);
pmp_tensor *pmp_argmax(pmp_tensor *t, int dim, int keepdim);
pmp_tensor *pmp_argmin(pmp_tensor *t, int dim, int keepdim);

/* ---- linear algebra: batched, broadcasting over leading dims; 1-D operands as in numpy ---- */
pmp_tensor *pmp_matmul(pmp_tensor *a, pmp_tensor *b);

/* ---- neural-network ops ---- */
pmp_tensor *pmp_softmax(pmp_tensor *t, int dim);
pmp_tensor *pmp_log_softmax(pmp_tensor *t, int dim);
/* logits [N, C], targets [N] integer; returns per-row losses [N], 0 where target == ignore_index */
pmp_tensor *pmp_cross_entropy(pmp_tensor *logits, pmp_tensor *targets, int64_t ignore_index);

/* ---- fused transformer ops ---- */
/* x [..., H], weight [H] or NULL: x / sqrt(mean(x^2) + eps) * weight, normalized in f32 (f64 for f64);
 * for bf16/f16 the normalized value is rounded to x's dtype before the weight multiplies it, as HF does. */
pmp_tensor *pmp_rms_norm(pmp_tensor *x, pmp_tensor *weight, double eps);
/* x [..., T, D]; cos, sin broadcastable to [..., T, rotary_dim] with rotary_dim <= D (the rest passes
 * through). interleaved = 0 rotates halves (Llama/NeoX), 1 rotates adjacent pairs (GPT-J/GLM). */
pmp_tensor *pmp_rope(pmp_tensor *x, pmp_tensor *cos, pmp_tensor *sin, int interleaved);
/* x [..., 2F] laid out as [gate | up]: silu(gate) * up -> [..., F] */
pmp_tensor *pmp_swiglu(pmp_tensor *x);
/* q [B, Hq, T, D], k and v [B, Hkv, S, D] with Hq a multiple of Hkv (GQA/MQA). Tiled with an online
 * softmax: the T x S score matrix is never stored. causal: query t sees keys up to t + (S - T);
 * window > 0 also hides keys more than window - 1 positions back (sliding window); first_key (NULL or
 * an integer tensor [B] or [B, T]) hides the keys before first_key[b] in row b (left padding), or
 * before first_key[b, t] for query t (packed documents: the start of the query's document). Queries
 * that see no key at all output zeros. */
pmp_tensor *pmp_attention(pmp_tensor *q, pmp_tensor *k, pmp_tensor *v, pmp_tensor *first_key, double scale, int causal,
                          int64_t window);

/* ---- optimizer steps: in place, outside autograd ---- */
/* One AdamW step (decoupled weight decay, PyTorch's formula). master (f32, may be NULL) holds the
 * full-precision copy of a low-precision param; then the update happens there and param gets the
 * rounded result. step counts from 1. */
int pmp_adamw_step_(pmp_tensor *param, pmp_tensor *grad, pmp_tensor *exp_avg, pmp_tensor *exp_avg_sq,
                    pmp_tensor *master, double lr, double beta1, double beta2, double eps, double weight_decay,
                    int64_t step);
int pmp_scale_(pmp_tensor *t, double factor);
/* sum of squares of all elements, accumulated in double (for global gradient norms) */
int pmp_sum_squares(pmp_tensor *t, double *result);

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
void pmp_set_error(const char *message);

/* ---- files (file_io.c): durable writes, directory trees, file mappings ----
 * Failures return -1 (or NULL) with pmp_last_error() naming the path and the system's reason. */
int pmp_getpid(void);
int pmp_file_open_write(const char *path);      /* create or truncate; returns a descriptor */
int pmp_file_write(int fd, const void *data, int64_t nbytes, const char *path);
/* t's elements in row-major order, in t's dtype (t must be on the cpu) */
int pmp_file_write_tensor(int fd, pmp_tensor *t, const char *path);
int pmp_file_sync_close(int fd, const char *path);   /* fsync then close; closes even on failure */
void pmp_file_close(int fd);
int pmp_file_rename(const char *from, const char *to);
int pmp_file_exchange(const char *a, const char *b);  /* atomic swap: 0 done, 1 unsupported, -1 error */
int pmp_file_sync_dir(const char *dir);
int pmp_file_sync_tree(const char *path);       /* fsync every file and directory under path */
int pmp_file_remove(const char *path);          /* a missing file is not an error */
int pmp_file_remove_tree(const char *path);     /* rm -r; links are removed, not followed */
int pmp_file_kind(const char *path);            /* 0 missing, 1 file, 2 directory, 3 other, -1 error */
int64_t pmp_file_size(const char *path);
int pmp_file_mkdir(const char *path);           /* 0 created, 1 was already a directory, -1 error */
typedef struct pmp_dir pmp_dir;
pmp_dir *pmp_dir_open(const char *path);
const char *pmp_dir_next(pmp_dir *dir);         /* next name (no "." or ".."), NULL at the end */
void pmp_dir_close(pmp_dir *dir);
/* A whole file mapped copy-on-write (writes to views never reach the file), reference-counted: each
 * tensor made by pmp_mapping_tensor holds a reference, and the file is unmapped with the last one. */
typedef struct pmp_mapping pmp_mapping;
pmp_mapping *pmp_map_file(const char *path);
const char *pmp_mapping_data(const pmp_mapping *m);
int64_t pmp_mapping_size(const pmp_mapping *m);
void pmp_mapping_release(pmp_mapping *m);
int pmp_mapping_live_count(void);               /* mappings not yet unmapped, for tests */
pmp_tensor *pmp_mapping_tensor(pmp_mapping *m, int64_t offset, int dtype, const int64_t *shape, int ndim);

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
pmp_dist_request *pmp_send_start(pmp_comm *c, pmp_tensor *t, int peer, int tag);
pmp_dist_request *pmp_recv_start(pmp_comm *c, pmp_tensor *t, int peer, int tag);
pmp_dist_request *pmp_barrier_start(pmp_comm *c);
int pmp_dist_test(pmp_dist_request *r);         /* 1 when finished (pmp_dist_wait still frees it) */
int pmp_dist_wait(pmp_dist_request *r);
const pmp_dist_stats *pmp_dist_stats_get(void);
void pmp_dist_stats_reset(void);

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

/* ==== tokenizer (core/tokenizer/): the fast parts of Hugging Face tokenizer.json support ====
 * Used by lua/pmp/tokenizer. Failures return -1 or NULL with pmp_last_error() set. Text arguments
 * are byte strings with explicit lengths; text returned as const char * lives in a per-thread
 * buffer until the next call of the same family. */
typedef struct pmp_tok_ids { int32_t *data; int64_t len; int64_t cap; } pmp_tok_ids;
pmp_tok_ids *pmp_tok_ids_new(void);
void pmp_tok_ids_free(pmp_tok_ids *b);
int pmp_tok_ids_push(pmp_tok_ids *b, int32_t id);

/* BPE model. byte_level: vocabulary strings of GPT-2 byte-to-unicode characters are keyed by the
 * bytes they stand for, and pre-tokens are raw bytes. unk_id -1: none. */
typedef struct pmp_tok_bpe pmp_tok_bpe;
pmp_tok_bpe *pmp_tok_bpe_new(int byte_level, int ignore_merges, int byte_fallback, int fuse_unk, int32_t unk_id,
                             const char *continuing_subword_prefix, const char *end_of_word_suffix);
void pmp_tok_bpe_free(pmp_tok_bpe *m);
int pmp_tok_bpe_add_token(pmp_tok_bpe *m, const char *s, int64_t n, int32_t id);
int pmp_tok_bpe_add_merge(pmp_tok_bpe *m, const char *a, int64_t an, const char *b, int64_t bn);  /* rank = order */
int pmp_tok_bpe_finish(pmp_tok_bpe *m);
int32_t pmp_tok_bpe_lookup(pmp_tok_bpe *m, const char *s, int64_t n);   /* in the model's key space; -1 */
int64_t pmp_tok_bpe_merge_count(const pmp_tok_bpe *m);
void pmp_tok_bpe_set_cache(pmp_tok_bpe *m, int enabled);
int pmp_tok_bpe_encode(pmp_tok_bpe *m, const char *s, int64_t n, pmp_tok_ids *out);   /* one pre-token */
int pmp_tok_byte_to_unicode(int byte);

/* Regexes: PCRE2 with UTF and Unicode properties, JIT-compiled when available; patterns are rewritten
 * first so their classes match what the reference's Oniguruma matches. */
typedef struct pmp_tok_regex pmp_tok_regex;
pmp_tok_regex *pmp_tok_regex_new(const char *pattern, int64_t n, int literal);
void pmp_tok_regex_free(pmp_tok_regex *r);
int pmp_tok_regex_jit(const pmp_tok_regex *r);
int pmp_tok_regex_find(pmp_tok_regex *r, const char *s, int64_t n, int64_t from, int64_t *start, int64_t *end);
/* the pattern as handed to PCRE2 (Unicode classes widened to the reference's tables) */
const char *pmp_tok_regex_translate(const char *pattern, int64_t n, int64_t *out_len);

/* Pre-tokenizer pipeline. behavior: 0 removed, 1 isolated, 2 merged_with_previous, 3 merged_with_next,
 * 4 contiguous. prepend_scheme: 0 always, 1 first, 2 never. */
typedef struct pmp_tok_pre pmp_tok_pre;
pmp_tok_pre *pmp_tok_pre_new(void);
void pmp_tok_pre_free(pmp_tok_pre *p);
int pmp_tok_pre_add_split(pmp_tok_pre *p, const char *pattern, int64_t n, int literal, int behavior, int invert);
int pmp_tok_pre_add_byte_level(pmp_tok_pre *p, int add_prefix_space, int use_regex, int map_bytes);
int pmp_tok_pre_add_metaspace(pmp_tok_pre *p, const char *replacement, int64_t n, int prepend_scheme, int split);
int pmp_tok_pre_count_steps(const pmp_tok_pre *p);
int64_t pmp_tok_pre_run(pmp_tok_pre *p, const char *s, int64_t n, int at_start);
const char *pmp_tok_pre_piece(pmp_tok_pre *p, int64_t i, int64_t *len);
/* pre-tokenize one normalized piece (p may be NULL) and BPE-encode it, appending to out */
int pmp_tok_encode_piece(pmp_tok_pre *p, pmp_tok_bpe *m, const char *s, int64_t n, int at_start, pmp_tok_ids *out);

/* Added tokens, matched leftmost-longest on the text. split returns (start, end, id) triples, id -1
 * for the text between tokens. */
typedef struct pmp_tok_added pmp_tok_added;
pmp_tok_added *pmp_tok_added_new(void);
void pmp_tok_added_free(pmp_tok_added *a);
int pmp_tok_added_add(pmp_tok_added *a, const char *s, int64_t n, int32_t id, int single_word, int lstrip, int rstrip);
int64_t pmp_tok_added_count(const pmp_tok_added *a);
const int64_t *pmp_tok_added_split(pmp_tok_added *a, const char *s, int64_t n, int64_t *count);

/* Text: UTF-8 check (-1 when valid, else the offset of the first bad byte), lossy decoding (bad
 * sequences become U+FFFD), normalization (form 0 NFC, 1 NFD, 2 NFKC, 3 NFKD), lowercase, accent
 * stripping, and White_Space trimming. */
int64_t pmp_tok_utf8_check(const char *s, int64_t n);
const char *pmp_tok_utf8_lossy(const char *s, int64_t n, int64_t *out_len);
const char *pmp_tok_normalize(const char *s, int64_t n, int form, int64_t *out_len);
const char *pmp_tok_lowercase(const char *s, int64_t n, int64_t *out_len);
const char *pmp_tok_strip_accents(const char *s, int64_t n, int64_t *out_len);
void pmp_tok_strip_space(const char *s, int64_t n, int left, int right, int64_t *start, int64_t *end);
int pmp_tok_is_space(int32_t cp);
int pmp_tok_is_word(int32_t cp);
/* ==== end of tokenizer ==== */

/* PMP_CDEF_END */

#ifdef __cplusplus
}
#endif
#endif
