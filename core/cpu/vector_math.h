/* Vector math for `omp simd` loops: glibc's libmvec has vector versions of these libm functions, and
 * declaring them lets the loops call them 4-16 lanes at a time instead of once per element (within
 * 4 ulp, per glibc's documentation). WIDE_VECTORS builds a function three times, for x86-64-v4 (AVX-512),
 * x86-64-v3 (AVX2 and FMA) and the baseline, and the loader picks the one the CPU runs. The bf16 conversions below are
 * written as bit operations for the same reason: so those loops vectorize. */
#ifndef PMP_VECTOR_MATH_H
#define PMP_VECTOR_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
float logf(float);
#pragma omp declare simd notinbranch
float sinf(float);
#pragma omp declare simd notinbranch
float cosf(float);
#pragma omp declare simd notinbranch
float tanhf(float);
#pragma omp declare simd notinbranch
float erff(float);

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define WIDE_VECTORS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WIDE_VECTORS
#endif

/* bf16 <-> f32 as plain bit operations (round to nearest even, NaN kept quiet), so loops over bf16
 * data vectorize. */
static inline float bf16_bits_to_f32(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

static inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return (uint16_t)((bits & 0x7fffffffu) > 0x7f800000u ? (bits >> 16) | 0x40u : rounded);
}

#endif
