/* Engine-internal declarations shared by the core's .c files; never seen by Lua. */
#ifndef PMP_INTERNAL_H
#define PMP_INTERNAL_H

#include "pmp.h"
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define PMP_VERSION "0.1.0"

/* ---- errors (error.c) ---- */
/* Records a message for pmp_last_error(); returns NULL so callers can `return pmp_fail(...)`. */
void *pmp_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int pmp_fail_code(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* "[2,3]" into buf; returns buf. */
const char *pmp_shape_str(const int64_t *shape, int ndim, char *buf, size_t size);
#define PMP_SHAPE_BUF 160
/* Fails with "interrupted" when the host asked for it (Ctrl-C). */
bool pmp_check_interrupt(const char *op);

/* ---- dtypes (dtype.c) ---- */
bool pmp_dtype_valid(int dtype);
bool pmp_dtype_is_float(int dtype);
/* The dtype kernels compute in: f64 for f64, f32 for the other floats, i64 for integers and bool. */
int pmp_compute_dtype(int dtype);
float pmp_bf16_to_f32(uint16_t v);
uint16_t pmp_f32_to_bf16(float v);
float pmp_f16_to_f32(uint16_t v);
uint16_t pmp_f32_to_f16(float v);
double pmp_load_as_f64(int dtype, const void *p);
int64_t pmp_load_as_i64(int dtype, const void *p);
void pmp_store_from_f64(int dtype, void *p, double v);
void pmp_store_from_i64(int dtype, void *p, int64_t v);
/* Converts n contiguous elements between dtypes (any pair). */
void pmp_convert(void *dst, int dst_dtype, const void *src, int src_dtype, int64_t n);

/* ---- memory (allocator.c, storage in tensor.c) ---- */
void *pmp_alloc(int device_type, int64_t nbytes);   /* NULL + error on failure */
void pmp_free(int device_type, void *p, int64_t nbytes);

struct pmp_storage {
  char *data;
  int64_t nbytes;
  pmp_device dev;
  int32_t refcount;
  void (*release)(void *ctx);   /* external memory: called instead of pmp_free */
  void *release_ctx;
};

/* ---- tensor helpers (tensor.c) ---- */
pmp_tensor *pmp_tensor_new_view(pmp_tensor *base, const int64_t *shape, const int64_t *stride, int ndim,
                                int64_t offset_bytes);
pmp_tensor *pmp_empty_like(const pmp_tensor *t, int dtype);
pmp_tensor *pmp_empty_shape(const int64_t *shape, int ndim, int dtype, pmp_device device);
/* order[0..ndim-1]: t's dims from the largest stride to the smallest (ties keep their order), the last
 * dim kept last, as kernels that read rows in place need. */
void pmp_dims_by_stride(const pmp_tensor *t, int *order);
/* A new dense tensor shaped like t whose memory orders the dims as pmp_dims_by_stride does (dtype -1:
 * t's), so a result or gradient written into it views back through the ops that made t as freely as t. */
pmp_tensor *pmp_empty_in_layout(const pmp_tensor *t, int dtype);
void pmp_contiguous_strides(const int64_t *shape, int ndim, int64_t *stride);
bool pmp_same_shape(const pmp_tensor *a, const pmp_tensor *b);
bool pmp_same_device(const pmp_tensor *a, const pmp_tensor *b, const char *op);
/* Converts a possibly negative dim into [0, ndim) or fails naming the op. */
bool pmp_wrap_dim(int *dim, int ndim, const char *op);
/* Copies src into the (possibly strided) dst of the same shape, converting dtype. */
int pmp_copy_into(pmp_tensor *dst, const pmp_tensor *src);
/* Sums grad down to shape (undoing broadcasting). */
pmp_tensor *pmp_sum_to_shape(pmp_tensor *grad, const int64_t *shape, int ndim);
bool pmp_broadcast_shapes(const int64_t *a, int na, const int64_t *b, int nb, int64_t *out, int *nout);
/* A view of t expanded to shape (strides 0 on broadcast dims); no autograd. */
pmp_tensor *pmp_broadcast_view(pmp_tensor *t, const int64_t *shape, int ndim);

/* ---- strided iteration over one or more tensors of the same shape ---- */
/* Walks the outer dims of a shape, handing each kernel a 1-D run over the innermost dim. */
typedef struct pmp_iter {
  int ndim;                    /* dims after coalescing; the last one is the inner run */
  int64_t sizes[PMP_MAX_DIMS];
  int64_t strides[4][PMP_MAX_DIMS];  /* bytes, per operand */
  int nops;
  int64_t inner;               /* length of the innermost run */
  int64_t outer;               /* number of runs */
} pmp_iter;
void pmp_iter_init(pmp_iter *it, const int64_t *shape, int ndim, int nops, pmp_tensor *const *ops);
/* Byte offsets of operand k for run number `run`. */
void pmp_iter_offsets(const pmp_iter *it, int64_t run, int64_t *offsets);

/* ---- op table (optable.c) ---- */
typedef struct pmp_op_args {
  int op;
  pmp_tensor *out;
  pmp_tensor *out2;             /* further outputs, e.g. indices of max, gradients of a fused op */
  pmp_tensor *out3;
  pmp_tensor *in[8];
  int nin;
  double f[6];
  int64_t i[8];
} pmp_op_args;

typedef int (*pmp_kernel_fn)(const pmp_op_args *args);
/* Computes gradients of the inputs from the output's gradient; grads[k] stays NULL if not needed.
 * grads has one slot per input of the node. */
typedef int (*pmp_backward_fn)(pmp_node *node, pmp_tensor *grad_out, pmp_tensor **grads);

typedef struct pmp_op_info {
  const char *name;
  pmp_kernel_fn kernel[PMP_DEVICE_TYPE_COUNT];
  pmp_backward_fn backward;
} pmp_op_info;

extern const pmp_op_info pmp_op_table[PMP_OP_COUNT];
/* Runs the op's kernel for the device of args->out. */
int pmp_dispatch(const pmp_op_args *args);
/* core/ops/profile.c: a start time (0 while the profiler is off) and the op's accounting */
int64_t pmp_profile_begin(void);
/* core/cpu/blas/onednn_matmul.c: c = a @ b over batches (strides in elements: batch, row, column); 1 when
 * oneDNN declines the dtype or layout */
int pmp_onednn_matmul(int dtype, int64_t batch, int64_t n, int64_t k, int64_t m, const void *a, const int64_t a_strides[3],
                      const void *b, const int64_t b_strides[3], void *c);
/* core/cpu/x86/amx_matmul.c: bf16 c[n, m] (contiguous) = a[n, k] @ b[k, m] on AMX tiles (strides in elements:
 * row, column, one of them 1); 1 when AMX is absent or off (PMP_MATMUL_NO_AMX=1) or the layout is not
 * one it reads, 0 on success, -1 on failure */
int pmp_amx_matmul(int64_t n, int64_t k, int64_t m, const uint16_t *a, const int64_t a_strides[2], const uint16_t *b,
                   const int64_t b_strides[2], uint16_t *c);
void pmp_profile_end(int op, int64_t start);

/* CPU kernels, one family per file */
int pmp_cpu_unary(const pmp_op_args *a);
int pmp_cpu_binary(const pmp_op_args *a);
int pmp_cpu_where(const pmp_op_args *a);
int pmp_cpu_clamp(const pmp_op_args *a);
int pmp_cpu_masked_fill(const pmp_op_args *a);
int pmp_cpu_tri(const pmp_op_args *a);
int pmp_cpu_copy(const pmp_op_args *a);
int pmp_cpu_reduce(const pmp_op_args *a);
int pmp_cpu_reduce_index(const pmp_op_args *a);
int pmp_cpu_matmul(const pmp_op_args *a);
/* core/cpu/cpu_gemv.c: f32/bf16/f16 c[rows, m] (contiguous) = a[rows, k] @ b[k, m] for 1 <= rows <=
 * PMP_GEMV_MAX_ROWS (strides in elements: row, column; b stored by rows or by columns); 1 when it
 * declines the dtype, shape or layout or is off (PMP_MATMUL_NO_GEMV=1), 0 on success, -1 on failure */
enum { PMP_GEMV_MAX_ROWS = 8 };
int pmp_cpu_gemv(int dtype, int64_t rows, int64_t k, int64_t m, const void *a, const int64_t sa[2], const void *b,
                 const int64_t sb[2], void *c);

/* An environment switch such as PMP_MATMUL_NO_AMX=1: set to anything but empty or "0". Read at each
 * call, so benchmarks and specs can flip it between products. */
static inline bool pmp_env_switch(const char *name) {
  const char *value = getenv(name);
  return value && *value && strcmp(value, "0") != 0;
}

int pmp_cpu_gather(const pmp_op_args *a);
int pmp_cpu_scatter_add(const pmp_op_args *a);
int pmp_cpu_index_select(const pmp_op_args *a);
int pmp_cpu_index_add(const pmp_op_args *a);
int pmp_cpu_softmax(const pmp_op_args *a);
int pmp_cpu_cross_entropy(const pmp_op_args *a);
int pmp_cpu_cross_entropy_backward(const pmp_op_args *a);
int pmp_cpu_fill(const pmp_op_args *a);
int pmp_cpu_arange(const pmp_op_args *a);
int pmp_cpu_random(const pmp_op_args *a);
int pmp_cpu_rms_norm(const pmp_op_args *a);
int pmp_cpu_rms_norm_backward(const pmp_op_args *a);
int pmp_cpu_rope(const pmp_op_args *a);
int pmp_cpu_swiglu(const pmp_op_args *a);
int pmp_cpu_swiglu_backward(const pmp_op_args *a);
int pmp_cpu_attention(const pmp_op_args *a);
int pmp_cpu_attention_backward(const pmp_op_args *a);
int pmp_cpu_adamw(const pmp_op_args *a);
int pmp_cpu_scale(const pmp_op_args *a);
int pmp_cpu_grouped_matmul(const pmp_op_args *a);
int pmp_cpu_grouped_matmul_weight_grad(const pmp_op_args *a);
int pmp_cpu_moe_unpermute(const pmp_op_args *a);
int pmp_cpu_moe_unpermute_backward(const pmp_op_args *a);
int pmp_cpu_paged_kv_write(const pmp_op_args *a);
int pmp_cpu_paged_attention(const pmp_op_args *a);
int pmp_cpu_sample(const pmp_op_args *a);

/* Backward rules, defined next to their forward ops */
int pmp_backward_unary(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_binary(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_where(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_clamp(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_masked_fill(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_tri(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_identity(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_sum(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_max(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_matmul(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_view(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_permute(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_expand(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_narrow(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_cat(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_gather(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_scatter_add(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_index_select(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_index_add(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_to_dtype(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_softmax(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_log_softmax(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_cross_entropy(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_rms_norm(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_rope(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_swiglu(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_attention(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_custom(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
void pmp_custom_node_freed(pmp_node *n);
int pmp_backward_grouped_matmul(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);
int pmp_backward_moe_unpermute(pmp_node *n, pmp_tensor *g, pmp_tensor **grads);

/* ---- autograd (autograd.c) ---- */
enum { PMP_NODE_MAX_SAVED = 7 };

/* Where one input's gradient goes: the node that produced it, or the leaf itself. */
typedef struct pmp_edge {
  pmp_node *next;
  pmp_tensor *leaf;
  bool needs_grad;
  int32_t ndim;
  int32_t dtype_id;
  int64_t sizes[PMP_MAX_DIMS];
} pmp_edge;

struct pmp_node {
  int32_t refcount;
  int32_t op;
  bool freed;                                  /* saved tensors released after backward */
  pmp_tensor *saved[PMP_NODE_MAX_SAVED];       /* tensors the backward rule reads */
  double f[4];
  int64_t i[8];
  int64_t *ivec;                               /* variable-length parameters (cat sizes, permutation) */
  int32_t nivec;
  /* backward bookkeeping */
  pmp_tensor *grad_acc;                        /* accumulated gradient of this node's output */
  int32_t pending;                             /* consumers yet to deliver their gradient */
  uint32_t epoch;                              /* marks nodes visited by the current backward */
  int32_t ninputs;
  pmp_edge in[];
};

/* True when an op on these inputs must record a node. */
bool pmp_needs_grad(pmp_tensor *const *inputs, int n);
/* Records a node producing `out` from `inputs`; saved (may be NULL entries) are retained. */
pmp_node *pmp_record(int op, pmp_tensor *out, pmp_tensor *const *inputs, int ninputs,
                     pmp_tensor *const *saved, int nsaved);
void pmp_node_release(pmp_node *n);
/* Fails if the node's saved tensors were freed by an earlier backward. */
bool pmp_node_check_alive(const pmp_node *n);

/* ---- random (random.c) ---- */
uint64_t pmp_random_u64(void);
double pmp_random_uniform(void);    /* [0, 1) */
pmp_generator *pmp_default_generator(void);

/* ---- threading ---- */
/* Elements from which a kernel splits its loop over the OpenMP team. Small enough that a training
 * step's [batch*seq, hidden] activations of a small model (98k elements in the nanoGPT-sized
 * benchmark) use both cores: measured 15-20% faster per step there than with 262144. */
#define PMP_PARALLEL_THRESHOLD 32768

/* Inside a parallel region: this thread's contiguous share [*lo, *hi) of n items, split as evenly as
 * `schedule(static)` does, so a kernel can hand each thread one long run instead of one call per item. */
static inline void pmp_thread_share(int64_t n, int64_t *lo, int64_t *hi) {
  int64_t t = omp_get_thread_num(), nt = omp_get_num_threads(), q = n / nt, r = n % nt;
  *lo = t * q + (t < r ? t : r);
  *hi = *lo + q + (t < r);
}

/* ---- helpers for op front-ends and backward rules (ops/ops_common.c) ---- */
/* A 0-d tensor holding v in dtype. */
pmp_tensor *pmp_scalar(double v, int dtype, pmp_device device);
/* Temporaries of one op or backward rule, released together at its end. */
typedef struct pmp_scope {
  pmp_tensor *items[24];
  int count;
} pmp_scope;
/* Adds t (NULL is let through) to the scope and returns it. No rule needs more than a handful, so a
 * full scope is a bug in the engine: it aborts rather than let the temporary leak unnoticed. */
pmp_tensor *pmp_keep(pmp_scope *s, pmp_tensor *t);
void pmp_scope_end(pmp_scope *s);
/* Makes a fresh output and runs the op on it; NULL on failure. For kernels inside backward rules and
 * creation functions: op front-ends end with pmp_run_op. */
pmp_tensor *pmp_run_new(pmp_op_args *args, const int64_t *shape, int ndim, int dtype, pmp_device device);

/* In the saved list of pmp_run_op and pmp_record_op, the op's output. It is saved detached: a node
 * holding its own output would be a reference cycle. */
extern pmp_tensor pmp_saved_output_marker;
#define PMP_SAVED_OUTPUT (&pmp_saved_output_marker)
/* The tail every op front-end that runs a kernel ends with, once its checks passed and its operands
 * are ready. It takes over args->out, the fresh output the caller made (NULL when making it or an
 * operand failed), fails with "<op>: interrupted" when the host asked for it (Ctrl-C), runs the op's
 * kernel, and records the op's node through pmp_record_op. On any failure it releases the output and
 * returns NULL. *node (node may be NULL) gets the recorded node, or NULL when none was recorded, for
 * the caller to store the op's parameters in. */
pmp_tensor *pmp_run_op(pmp_op_args *args, pmp_tensor *const *inputs, int ninputs, pmp_tensor *const *saved,
                       int nsaved, pmp_node **node);
/* Records op's node on *out when autograd wants one: the op has a backward rule, *out is
 * floating-point and one of inputs needs grad. Returns the node, or NULL when none was wanted (*out
 * kept) or recording failed (*out released and set to NULL). */
pmp_node *pmp_record_op(int op, pmp_tensor **out, pmp_tensor *const *inputs, int ninputs, pmp_tensor *const *saved,
                        int nsaved);
/* The shape stored for input k of a node. */
#define PMP_IN_SHAPE(node, k) (node)->in[k].sizes, (node)->in[k].ndim
#define PMP_NEEDS(node, k) ((node)->in[k].needs_grad)

#endif
