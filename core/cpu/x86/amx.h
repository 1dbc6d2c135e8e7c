/* Intel AMX (the bf16 tile unit of Sapphire Rapids and later) for the kernels that use it: the
 * attention tile products and the bf16 GEMM. Every tile is configured as 16 rows of 64 bytes:
 * A tiles 16 x 32 bf16, B tiles 16 rows of 16 (even, odd) bf16 pairs, C tiles 16 x 16 f32. */
#ifndef PMP_AMX_H
#define PMP_AMX_H

#include <stdbool.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define PMP_HAVE_AMX 1
#include <immintrin.h>

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma,bmi,bmi2")))

/* True when the CPU has AMX-BF16 (and the AVX-512 the kernels around the tiles use), the kernel
 * granted this process the tile state (asked once per process), and the environment variable `off`
 * is unset, "" or "0" (PMP_ATTENTION_NO_AMX, PMP_MATMUL_NO_AMX: a kernel's switch back to its non-AMX
 * path). */
bool pmp_amx_enabled(const char *off);

/* The first n (0..32) of 32 lanes. */
static inline __mmask32 pmp_first32(int64_t n) { return n >= 32 ? 0xffffffffu : n <= 0 ? 0 : (1u << n) - 1; }

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

/* Sixteen 16 x 32-bit rows transposed in registers. */
AMX_TARGET static inline void pmp_transpose_16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; j++) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; j++) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}


/* Two lines of 32 bf16 interleaved into (even, odd) pairs: low gets the pairs of values 0-15, high
 * those of 16-31 (the rows of B tiles when the lines are consecutive k). */
AMX_TARGET static inline void pmp_interleave_pairs(__m512i even, __m512i odd, __m512i *low, __m512i *high) {
  static const uint16_t low_pairs[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                         8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  static const uint16_t high_pairs[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                          24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  *low = _mm512_permutex2var_epi16(even, _mm512_loadu_si512(low_pairs), odd);
  *high = _mm512_permutex2var_epi16(even, _mm512_loadu_si512(high_pairs), odd);
}

#else
static inline bool pmp_amx_enabled(const char *off) { (void)off; return false; }
#endif

#endif
