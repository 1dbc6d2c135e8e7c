/* The C ABI, tensors: dtypes, devices, the pmp_tensor struct Lua reads, the caching allocator, creating
 * tensors and reading them back (core/tensor/).
 * Included through pmp.h, whose conventions hold here; lua/pmp/ffi.lua declares the region between the
 * CDEF markers to LuaJIT, so it holds plain C declarations only. */
#ifndef PMP_TENSOR_H
#define PMP_TENSOR_H

#include <stdint.h>

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

/* PMP_CDEF_END */

#endif
