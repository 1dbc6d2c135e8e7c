/* Vector math for `omp simd` loops: glibc's libmvec has vector versions of these libm functions, and
 * declaring them lets the loops call them 4-16 lanes at a time instead of once per element (within
 * 4 ulp, per glibc's documentation). WIDE_VECTORS builds a function twice, for x86-64-v3 (AVX2 and
 * FMA) and the baseline, and the loader picks the one the CPU runs. */
#ifndef PMP_VECTOR_MATH_H
#define PMP_VECTOR_MATH_H

#include <math.h>

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
#define WIDE_VECTORS __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define WIDE_VECTORS
#endif

#endif
