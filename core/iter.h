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
#endif
