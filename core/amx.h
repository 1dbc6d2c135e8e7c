/* Intel AMX (the bf16 tile unit of Sapphire Rapids and later) for the kernels that use it: the
 * attention tile products and the bf16 GEMM. Every tile is configured as 16 rows of 64 bytes:
 * A tiles 16 x 32 bf16, B tiles 16 rows of 16 (even, odd) bf16 pairs, C tiles 16 x 16 f32. */
#ifndef PMP_AMX_H
#define PMP_AMX_H

#include <stdbool.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define PMP_HAVE_AMX 1
#include <immintrin.h>

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma,bmi,bmi2")))

/* True when the CPU has AMX-BF16 (and the AVX-512 the kernels around the tiles use) and the kernel
 * granted this process the tile state; asked once per process. */
bool pmp_amx_usable(void);

/* Loads the 16 x 64-byte configuration into the calling thread's tile registers; pair with
 * _tile_release() when the thread is done. */
AMX_TARGET static inline void pmp_amx_configure(void) {
  struct { unsigned char palette, start_row, reserved[14]; unsigned short colsb[16]; unsigned char rows[16]; } cfg = {.palette = 1};
  for (int t = 0; t < 8; t++) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}
#else
static inline bool pmp_amx_usable(void) { return false; }
#endif

#endif
