/* Elementwise iteration machinery shared by the CPU kernels (see iter.c). */
#ifndef PMP_ITER_H
#define PMP_ITER_H
#include "internal.h"

enum { PMP_PIECE = 2048 };

/* Computes n outputs from n inputs, all contiguous in their buffer dtypes. */
typedef void (*pmp_piece_fn)(const void *ctx, void *out, const void *const *in, int64_t n);

typedef struct pmp_elementwise {
  pmp_tensor *out;          /* any layout */
  int out_buf_dtype;
  pmp_tensor *in[3];        /* already broadcast to out's shape */
  int in_buf_dtype[3];
  int nin;
  pmp_piece_fn fn;
  const void *ctx;
  bool serial;              /* the kernel keeps state across pieces (e.g. random streams) */
} pmp_elementwise;

int pmp_elementwise_run(const pmp_elementwise *e);
/* n copies of the es-byte element at value. */
void pmp_iter_splat(void *dst, const void *value, int es, int64_t n);
/* Copies src into dst (same shape) when the innermost dim is contiguous in both, one run at a time,
 * converting dtype; false, with nothing done, for other layouts. */
bool pmp_iter_copy_runs(pmp_tensor *dst, const pmp_tensor *src);
/* The same for a same-dtype copy whose innermost dim is contiguous in dst and another dim is in src
 * (a transpose), in tiles. */
bool pmp_iter_copy_transposed(pmp_tensor *dst, const pmp_tensor *src);
#endif
