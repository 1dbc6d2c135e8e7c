/* Dtypes: names, sizes, promotion and conversion between every pair. */
#include "internal.h"
#include "cpu/vector_math.h"
#include <math.h>

static const char *const dtype_names[PMP_DTYPE_COUNT] = {"f64", "f32", "bf16", "f16", "i64",
                                                         "i32", "u8",  "bool", "u16"};
static const int dtype_sizes[PMP_DTYPE_COUNT] = {8, 4, 2, 2, 8, 4, 1, 1, 2};

bool pmp_dtype_valid(int dtype) { return dtype >= 0 && dtype < PMP_DTYPE_COUNT; }
const char *pmp_dtype_name(int dtype) { return pmp_dtype_valid(dtype) ? dtype_names[dtype] : "?"; }
int pmp_dtype_size(int dtype) { return pmp_dtype_valid(dtype) ? dtype_sizes[dtype] : 0; }
bool pmp_dtype_is_float(int dtype) { return dtype >= PMP_F64 && dtype <= PMP_F16; }

int pmp_dtype_from_name(const char *name) {
  for (int d = 0; d < PMP_DTYPE_COUNT; d++)
    if (strcmp(name, dtype_names[d]) == 0) return d;
  return -1;
}

int pmp_compute_dtype(int dtype) {
  if (dtype == PMP_F64) return PMP_F64;
  return pmp_dtype_is_float(dtype) ? PMP_F32 : PMP_I64;
}

/* Floats beat integers; wider beats narrower; bf16 with f16 meet at f32 (neither holds the other). */
int pmp_promote_types(int a, int b) {
  if (a == b) return a;
  bool fa = pmp_dtype_is_float(a), fb = pmp_dtype_is_float(b);
  if (fa && !fb) return a;
  if (fb && !fa) return b;
  if (fa && fb) {
    if (a == PMP_F64 || b == PMP_F64) return PMP_F64;
    return PMP_F32;
  }
  static const int int_rank[PMP_DTYPE_COUNT] = {0, 0, 0, 0, 5, 4, 2, 1, 3};
  return int_rank[a] > int_rank[b] ? a : b;
}

float pmp_bf16_to_f32(uint16_t v) { return bf16_bits_to_f32(v); }

/* Round to nearest even; NaN stays a quiet NaN. */
uint16_t pmp_f32_to_bf16(float f) { return f32_to_bf16_bits(f); }

float pmp_f16_to_f32(uint16_t v) {
  _Float16 h;
  memcpy(&h, &v, 2);
  return (float)h;
}

uint16_t pmp_f32_to_f16(float f) {
  _Float16 h = (_Float16)f;
  uint16_t v;
  memcpy(&v, &h, 2);
  return v;
}

double pmp_load_as_f64(int dtype, const void *p) {
  switch (dtype) {
  case PMP_F64: return *(const double *)p;
  case PMP_F32: return *(const float *)p;
  case PMP_BF16: return pmp_bf16_to_f32(*(const uint16_t *)p);
  case PMP_F16: return pmp_f16_to_f32(*(const uint16_t *)p);
  case PMP_I64: return (double)*(const int64_t *)p;
  case PMP_I32: return *(const int32_t *)p;
  case PMP_U8: return *(const uint8_t *)p;
  case PMP_BOOL: return *(const uint8_t *)p ? 1.0 : 0.0;
  case PMP_U16: return *(const uint16_t *)p;
  }
  return 0;
}

int64_t pmp_load_as_i64(int dtype, const void *p) {
  switch (dtype) {
  case PMP_I64: return *(const int64_t *)p;
  case PMP_I32: return *(const int32_t *)p;
  case PMP_U8: return *(const uint8_t *)p;
  case PMP_BOOL: return *(const uint8_t *)p != 0;
  case PMP_U16: return *(const uint16_t *)p;
  default: return (int64_t)pmp_load_as_f64(dtype, p);
  }
}

void pmp_store_from_f64(int dtype, void *p, double v) {
  switch (dtype) {
  case PMP_F64: *(double *)p = v; break;
  case PMP_F32: *(float *)p = (float)v; break;
  case PMP_BF16: *(uint16_t *)p = pmp_f32_to_bf16((float)v); break;
  case PMP_F16: *(uint16_t *)p = pmp_f32_to_f16((float)v); break;
  case PMP_I64: *(int64_t *)p = (int64_t)v; break;
  case PMP_I32: *(int32_t *)p = (int32_t)v; break;
  case PMP_U8: *(uint8_t *)p = (uint8_t)(int64_t)v; break;
  case PMP_BOOL: *(uint8_t *)p = v != 0; break;
  case PMP_U16: *(uint16_t *)p = (uint16_t)(int64_t)v; break;
  }
}

void pmp_store_from_i64(int dtype, void *p, int64_t v) {
  switch (dtype) {
  case PMP_I64: *(int64_t *)p = v; break;
  case PMP_I32: *(int32_t *)p = (int32_t)v; break;
  case PMP_U8: *(uint8_t *)p = (uint8_t)v; break;
  case PMP_BOOL: *(uint8_t *)p = v != 0; break;
  case PMP_U16: *(uint16_t *)p = (uint16_t)v; break;
  default: pmp_store_from_f64(dtype, p, (double)v); break;
  }
}

/* Fast paths for the conversions training uses; everything else goes element by element. */
/* The bf16 <-> f32 runs that every kernel's loads and stores go through, built for the widest vectors
 * the CPU has. */
WIDE_VECTORS static void bf16_to_f32_run(float *dst, const uint16_t *src, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; k++) dst[k] = bf16_bits_to_f32(src[k]);
}

WIDE_VECTORS static void f32_to_bf16_run(uint16_t *dst, const float *src, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; k++) dst[k] = f32_to_bf16_bits(src[k]);
}

void pmp_convert(void *dst, int dst_dtype, const void *src, int src_dtype, int64_t n) {
  if (dst_dtype == src_dtype) {
    memcpy(dst, src, (size_t)(n * pmp_dtype_size(dst_dtype)));
    return;
  }
  if (src_dtype == PMP_F32 && dst_dtype == PMP_BF16) {
    f32_to_bf16_run(dst, src, n);
    return;
  }
  if (src_dtype == PMP_BF16 && dst_dtype == PMP_F32) {
    bf16_to_f32_run(dst, src, n);
    return;
  }
  if (src_dtype == PMP_F16 && dst_dtype == PMP_F32) {
    const uint16_t *s = src;
    float *d = dst;
    for (int64_t k = 0; k < n; k++) d[k] = pmp_f16_to_f32(s[k]);
    return;
  }
  if (src_dtype == PMP_F32 && dst_dtype == PMP_F16) {
    const float *s = src;
    uint16_t *d = dst;
    for (int64_t k = 0; k < n; k++) d[k] = pmp_f32_to_f16(s[k]);
    return;
  }
  if (src_dtype == PMP_F32 && dst_dtype == PMP_F64) {
    const float *s = src;
    double *d = dst;
    for (int64_t k = 0; k < n; k++) d[k] = s[k];
    return;
  }
  if (src_dtype == PMP_F64 && dst_dtype == PMP_F32) {
    const double *s = src;
    float *d = dst;
    for (int64_t k = 0; k < n; k++) d[k] = (float)s[k];
    return;
  }
  int ss = pmp_dtype_size(src_dtype), ds = pmp_dtype_size(dst_dtype);
  const char *s = src;
  char *d = dst;
  if (!pmp_dtype_is_float(src_dtype) && !pmp_dtype_is_float(dst_dtype)) {
    for (int64_t k = 0; k < n; k++) pmp_store_from_i64(dst_dtype, d + k * ds, pmp_load_as_i64(src_dtype, s + k * ss));
    return;
  }
  for (int64_t k = 0; k < n; k++) pmp_store_from_f64(dst_dtype, d + k * ds, pmp_load_as_f64(src_dtype, s + k * ss));
}
