/* The engine's BLAS: BLIS built on OpenMP (its CBLAS interface), so BLAS and our kernels share one
 * thread pool. BLIS picks its kernels from CPU features (AVX2, AVX-512) rather than from a list of CPU
 * models, so a CPU newer than the library still gets vector kernels. */
#ifndef PMP_BLAS_H
#define PMP_BLAS_H

#include <blis.h>
#include <cblas.h>

/* BLIS does not follow omp_set_num_threads: before a top-level GEMM, hand it the engine's count. */
void pmp_blas_sync_threads(void);

#endif
