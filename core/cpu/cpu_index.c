/* CPU kernels of the indexing ops. Every index is bounds-checked: a bad id is an error, not a crash. */
#include "internal.h"
#include "cpu/vector_math.h"

static bool load_index(const pmp_tensor *index, int64_t at, int64_t size, int64_t *value, const char *op, int dim) {
  int64_t v = pmp_load_as_i64(index->dtype_id, index->data + at * pmp_dtype_size(index->dtype_id));
  if (v < 0 || v >= size) {
    pmp_fail("%s: index %lld is out of range for dim %d of size %lld", op, (long long)v, dim + 1, (long long)size);
    return false;
  }
  *value = v;
  return true;
}

/* Element offset of position pos (a multi-index) in t, with pos[dim] replaced by along. */
static int64_t offset_of(const pmp_tensor *t, const int64_t *pos, int dim, int64_t along) {
  int64_t off = 0;
  for (int d = 0; d < t->ndim; d++) off += (d == dim ? along : pos[d]) * t->strides[d];
  return off;
}

static void next_position(int64_t *pos, const int64_t *shape, int ndim) {
  for (int d = ndim - 1; d >= 0; d--) {
    if (++pos[d] < shape[d]) return;
    pos[d] = 0;
  }
}

int pmp_cpu_gather(const pmp_op_args *a) {
  const pmp_tensor *t = a->in[0], *index = a->in[1];
  pmp_tensor *out = a->out;
  int dim = (int)a->i[0], es = pmp_dtype_size(t->dtype_id);
  int64_t pos[PMP_MAX_DIMS] = {0}, n = pmp_numel(index);
  for (int64_t k = 0; k < n; k++, next_position(pos, index->sizes, index->ndim)) {
    int64_t along;
    if (!load_index(index, offset_of(index, pos, -1, 0), t->sizes[dim], &along, "gather", dim)) return -1;
    memcpy(out->data + k * es, t->data + offset_of(t, pos, dim, along) * es, (size_t)es);
  }
  return 0;
}

int pmp_cpu_scatter_add(const pmp_op_args *a) {
  const pmp_tensor *index = a->in[0], *src = a->in[1];
  pmp_tensor *out = a->out;
  int dim = (int)a->i[0], es = pmp_dtype_size(out->dtype_id), ses = pmp_dtype_size(src->dtype_id);
  int64_t pos[PMP_MAX_DIMS] = {0}, n = pmp_numel(index);
  for (int64_t k = 0; k < n; k++, next_position(pos, index->sizes, index->ndim)) {
    int64_t along;
    if (!load_index(index, offset_of(index, pos, -1, 0), out->sizes[dim], &along, "scatter_add", dim)) return -1;
    char *dst = out->data + offset_of(out, pos, dim, along) * es;
    double v = pmp_load_as_f64(src->dtype_id, src->data + offset_of(src, pos, -1, 0) * ses);
    if (pmp_dtype_is_float(out->dtype_id))
      pmp_store_from_f64(out->dtype_id, dst, pmp_load_as_f64(out->dtype_id, dst) + v);
    else
      pmp_store_from_i64(out->dtype_id, dst, pmp_load_as_i64(out->dtype_id, dst) + (int64_t)v);
  }
  return 0;
}

/* t and index contiguous: copy whole [inner] slices for each (outer, selected) pair. */
int pmp_cpu_index_select(const pmp_op_args *a) {
  const pmp_tensor *t = a->in[0], *index = a->in[1];
  pmp_tensor *out = a->out;
  int dim = (int)a->i[0], es = pmp_dtype_size(t->dtype_id);
  int64_t size = t->ndim ? t->sizes[dim] : 1, count = pmp_numel(index);
  int64_t outer = 1, inner = 1;
  for (int d = 0; d < t->ndim; d++) {
    if (d < dim) outer *= t->sizes[d];
    if (d > dim) inner *= t->sizes[d];
  }
  int64_t *rows = malloc(sizeof(int64_t) * (size_t)(count + 1));
  if (!rows) return pmp_fail_code("index_select: out of memory");
  for (int64_t k = 0; k < count; k++)
    if (!load_index(index, k, size, &rows[k], "index_select", dim)) {
      free(rows);
      return -1;
    }
  size_t slice = (size_t)(inner * es);
#pragma omp parallel for if (outer * count * inner >= PMP_PARALLEL_THRESHOLD) collapse(2)
  for (int64_t o = 0; o < outer; o++)
    for (int64_t k = 0; k < count; k++)
      memcpy(out->data + (o * count + k) * slice, t->data + (o * size + rows[k]) * slice, slice);
  free(rows);
  return 0;
}

/* out contiguous (a copy of t), src contiguous in out's dtype: out[.., index[k], ..] += src[.., k, ..]. */
/* The sum of two bf16 values rounded once to bf16, as the generic path's f64 sum does (exact in f32
 * up to that rounding), with the vectorizable bit conversions. */
WIDE_VECTORS static void add_bf16_row(uint16_t *dst, const uint16_t *src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) dst[i] = f32_to_bf16_bits(bf16_bits_to_f32(dst[i]) + bf16_bits_to_f32(src[i]));
}

/* Rows are short (one embedding row): even an OpenMP region that decides not to fork costs a call
 * into the runtime, more than adding the row, so only very long rows are split across threads. */
WIDE_VECTORS static void add_f32_row(float *dst, const float *src, int64_t n) {
  if (n >= PMP_PARALLEL_THRESHOLD) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) dst[i] += src[i];
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; i++) dst[i] += src[i];
}

int pmp_cpu_index_add(const pmp_op_args *a) {
  const pmp_tensor *index = a->in[0], *src = a->in[1];
  pmp_tensor *out = a->out;
  int dim = (int)a->i[0], es = pmp_dtype_size(out->dtype_id);
  int64_t size = out->ndim ? out->sizes[dim] : 1, count = pmp_numel(index);
  int64_t outer = 1, inner = 1;
  for (int d = 0; d < out->ndim; d++) {
    if (d < dim) outer *= out->sizes[d];
    if (d > dim) inner *= out->sizes[d];
  }
  for (int64_t k = 0; k < count; k++) {
    int64_t row;
    if (!load_index(index, k, size, &row, "index_add", dim)) return -1;
    /* repeated indices accumulate, so rows run in order */
    for (int64_t o = 0; o < outer; o++) {
      char *dst = out->data + (o * size + row) * inner * es;
      const char *from = src->data + (o * count + k) * inner * es;
      if (out->dtype_id == PMP_F32) {
        add_f32_row((float *)dst, (const float *)from, inner);
      } else if (out->dtype_id == PMP_BF16) {
        add_bf16_row((uint16_t *)dst, (const uint16_t *)from, inner);
      } else {
        for (int64_t i = 0; i < inner; i++)
          pmp_store_from_f64(out->dtype_id, dst + i * es,
                             pmp_load_as_f64(out->dtype_id, dst + i * es) + pmp_load_as_f64(out->dtype_id, from + i * es));
      }
    }
  }
  return 0;
}
