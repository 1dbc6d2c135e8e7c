/* CPU GEMM: few-row f32/bf16/f16 products (decoding) on our own kernels (core/cpu/cpu_gemv.c); AMX
 * tiles (core/cpu/x86/amx_matmul.c) for bf16 where the CPU has them; oneDNN (core/cpu/blas/onednn_matmul.c)
 * for f32, bf16 and f16; BLAS (core/cpu/blas/blas.h) for f64 and whatever oneDNN declines (bf16/f16 then
 * go through f32); a plain loop for integers. */
#include "internal.h"
#include "cpu/blas/blas.h"
#include <omp.h>

void pmp_blas_sync_threads(void) {
  static int given = -1;
  if (omp_in_parallel()) return;   /* nested calls run on their caller's thread */
  int n = omp_get_max_threads();
  if (n != given) {
    bli_thread_set_num_threads(n);
    given = n;
  }
}

/* How BLAS should read a strided matrix, or false if it needs a contiguous copy first. */
static bool blas_layout(int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride, bool *trans, int64_t *ld) {
  if (col_stride == 1 && (row_stride >= (cols > 1 ? cols : 1) || rows == 1)) {
    *trans = false;
    *ld = rows == 1 ? (cols > 1 ? cols : 1) : row_stride;
    return true;
  }
  if (row_stride == 1 && (col_stride >= (rows > 1 ? rows : 1) || cols == 1)) {
    *trans = true;
    *ld = cols == 1 ? (rows > 1 ? rows : 1) : col_stride;
    return true;
  }
  return false;
}

/* Makes a contiguous f32/f64 copy of one matrix, converting whole stored runs at a time, in parallel,
 * since this runs before every low-precision GEMM. A matrix stored by columns (a transposed view, as
 * the weight is in x @ w:t()) is copied as it is stored and handed to BLAS as transposed (*trans);
 * *ld is the copy's row stride. */
static void *pack(const char *src, int dtype, int64_t rows, int64_t cols, int64_t rs, int64_t cs, int to, bool *trans,
                  int64_t *ld) {
  int es = pmp_dtype_size(dtype), ts = pmp_dtype_size(to);
  char *dst = malloc((size_t)(rows * cols * ts) + 1);
  if (!dst) return NULL;
  *trans = false;
  *ld = cols > 1 ? cols : 1;
  if (cs == 1) {
#pragma omp parallel for if (rows * cols >= PMP_PARALLEL_THRESHOLD) schedule(static)
    for (int64_t r = 0; r < rows; r++) pmp_convert(dst + r * cols * ts, to, src + r * rs * es, dtype, cols);
    return dst;
  }
  if (rs == 1) {
    *trans = true;
    *ld = rows > 1 ? rows : 1;
#pragma omp parallel for if (rows * cols >= PMP_PARALLEL_THRESHOLD) schedule(static)
    for (int64_t c = 0; c < cols; c++) pmp_convert(dst + c * rows * ts, to, src + c * cs * es, dtype, rows);
    return dst;
  }
  for (int64_t r = 0; r < rows; r++)
    for (int64_t c = 0; c < cols; c++)
      pmp_convert(dst + (r * cols + c) * ts, to, src + (r * rs + c * cs) * es, dtype, 1);
  return dst;
}

/* One f64 row times a matrix: GEMV reads B once, where GEMM first copies all of B into its packed
 * layout (f32, bf16 and f16 few-row products have their own kernels, core/cpu/cpu_gemv.c). false when
 * the layout does not fit. */
enum { GEMV_MAX_ROWS = 1 };
static bool gemv_rows(const char *pa, const char *pb, char *pc, int dtype, int64_t n, int64_t k, int64_t m,
                      const int64_t *sa, const int64_t *sb) {
  if (n > GEMV_MAX_ROWS || dtype != PMP_F64 || sa[1] != 1 || k == 0 || m == 0) return false;
  bool b_rows = sb[1] == 1 && sb[0] >= m;        /* B stored [k, m]: y = B^T x */
  bool b_cols = sb[0] == 1 && sb[1] >= k;        /* B = W^T with W stored [m, k]: y = W x */
  if (!b_rows && !b_cols) return false;
  for (int64_t r = 0; r < n; r++)
    cblas_dgemv(CblasRowMajor, b_rows ? CblasTrans : CblasNoTrans, (int)(b_rows ? k : m), (int)(b_rows ? m : k), 1.0,
                (const double *)pb, (int)(b_rows ? sb[0] : sb[1]), (const double *)pa + r * sa[0], 1, 0.0,
                (double *)pc + r * m, 1);
  return true;
}

static int gemm_one(const char *pa, const char *pb, char *pc, int dtype, int64_t n, int64_t k, int64_t m,
                    const int64_t *sa, const int64_t *sb) {
  if (gemv_rows(pa, pb, pc, dtype, n, k, m, sa, sb)) return 0;
  bool ta, tb;
  int64_t lda, ldb;
  int blas_dtype = dtype == PMP_F64 ? PMP_F64 : PMP_F32;
  void *own_a = NULL, *own_b = NULL, *own_c = NULL;
  const void *A = pa, *B = pb;
  void *C = pc;
  if (dtype != blas_dtype || !blas_layout(n, k, sa[0], sa[1], &ta, &lda))
    A = own_a = pack(pa, dtype, n, k, sa[0], sa[1], blas_dtype, &ta, &lda);
  if (dtype != blas_dtype || !blas_layout(k, m, sb[0], sb[1], &tb, &ldb))
    B = own_b = pack(pb, dtype, k, m, sb[0], sb[1], blas_dtype, &tb, &ldb);
  if (dtype != blas_dtype) C = own_c = malloc((size_t)(n * m * 4) + 1);
  int rc = 0;
  if (!A || !B || !C) {
    rc = pmp_fail_code("matmul: out of memory packing operands");
  } else if (n > 0 && m > 0) {
    int ldc = m > 1 ? (int)m : 1;
    if (k == 0) {
      memset(C, 0, (size_t)(n * m * pmp_dtype_size(blas_dtype)));
    } else if (blas_dtype == PMP_F32) {
      cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)n, (int)m, (int)k,
                  1.0f, A, (int)lda, B, (int)ldb, 0.0f, C, ldc);
    } else {
      cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)n, (int)m, (int)k,
                  1.0, A, (int)lda, B, (int)ldb, 0.0, C, ldc);
    }
    if (own_c) {
#pragma omp parallel for if (n * m >= PMP_PARALLEL_THRESHOLD) schedule(static)
      for (int64_t r = 0; r < n; r++)
        pmp_convert(pc + r * m * pmp_dtype_size(dtype), dtype, (float *)own_c + r * m, PMP_F32, m);
    }
  }
  free(own_a);
  free(own_b);
  free(own_c);
  return rc;
}

static void gemm_integer(const char *pa, const char *pb, char *pc, int dtype, int64_t n, int64_t k, int64_t m,
                         const int64_t *sa, const int64_t *sb) {
  int es = pmp_dtype_size(dtype);
  for (int64_t r = 0; r < n; r++)
    for (int64_t c = 0; c < m; c++) {
      int64_t acc = 0;
      for (int64_t j = 0; j < k; j++)
        acc += pmp_load_as_i64(dtype, pa + (r * sa[0] + j * sa[1]) * es) * pmp_load_as_i64(dtype, pb + (j * sb[0] + c * sb[1]) * es);
      pmp_store_from_i64(dtype, pc + (r * m + c) * es, acc);
    }
}

/* Element offsets of batch bi (batch dims in row-major order) in a and b. */
static void batch_offsets(const pmp_tensor *a, const pmp_tensor *b, int64_t bi, int64_t *off_a, int64_t *off_b) {
  *off_a = *off_b = 0;
  for (int d = a->ndim - 3; d >= 0; d--) {
    int64_t idx = bi % a->sizes[d];
    bi /= a->sizes[d];
    *off_a += idx * a->strides[d];
    *off_b += idx * b->strides[d];
  }
}

/* The one element stride that walks all batch dims of t in order, or false if there is none. */
static bool batch_stride(const pmp_tensor *t, int64_t *stride) {
  int nd = t->ndim;
  int64_t expected = -1;
  *stride = 0;
  for (int d = nd - 3; d >= 0; d--) {
    if (t->sizes[d] == 1) continue;
    if (expected < 0) *stride = t->strides[d];
    else if (t->strides[d] != expected) return false;
    expected = t->strides[d] * t->sizes[d];
  }
  return true;
}

/* bf16 products on AMX, one batch at a time; 1 when the AMX kernel declines (then for every batch). */
static int amx_batches(const pmp_tensor *a, const pmp_tensor *b, pmp_tensor *c, int64_t batches, int64_t n, int64_t k,
                       int64_t m) {
  int nd = a->ndim;
  const int64_t sa[2] = {a->strides[nd - 2], a->strides[nd - 1]}, sb[2] = {b->strides[nd - 2], b->strides[nd - 1]};
  for (int64_t bi = 0; bi < batches; bi++) {
    int64_t off_a, off_b;
    batch_offsets(a, b, bi, &off_a, &off_b);
    int rc = pmp_amx_matmul(n, k, m, (const uint16_t *)a->data + off_a, sa, (const uint16_t *)b->data + off_b, sb,
                            (uint16_t *)c->data + bi * n * m);
    if (rc != 0) return rc;
  }
  return 0;
}

/* All batches in one oneDNN call where the batch dims collapse, else one call per batch; 1 when
 * oneDNN declines the layout. */
static int onednn_batches(const pmp_tensor *a, const pmp_tensor *b, pmp_tensor *c, int64_t batches, int64_t n, int64_t k,
                          int64_t m) {
  int nd = a->ndim, es = pmp_dtype_size(a->dtype_id);
  int64_t sa[3] = {0, a->strides[nd - 2], a->strides[nd - 1]}, sb[3] = {0, b->strides[nd - 2], b->strides[nd - 1]};
  if (n == 0 || m == 0 || k == 0) return 1;
  if (batches == 1 || (batch_stride(a, &sa[0]) && batch_stride(b, &sb[0]) && sb[0] != 0))
    return pmp_onednn_matmul(a->dtype_id, batches, n, k, m, a->data, sa, b->data, sb, c->data);
  for (int64_t bi = 0; bi < batches; bi++) {
    int64_t off_a, off_b;
    batch_offsets(a, b, bi, &off_a, &off_b);
    int rc = pmp_onednn_matmul(a->dtype_id, 1, n, k, m, a->data + off_a * es, sa, b->data + off_b * es, sb,
                               c->data + bi * n * m * es);
    if (rc != 0) return rc;   /* declined layouts are declined for every batch: the first one decides */
  }
  return 0;
}

int pmp_cpu_matmul(const pmp_op_args *args) {
  const pmp_tensor *a = args->in[0], *b = args->in[1];
  pmp_tensor *c = args->out;
  int nd = a->ndim, es = pmp_dtype_size(a->dtype_id);
  int64_t n = a->sizes[nd - 2], k = a->sizes[nd - 1], m = b->sizes[nd - 1];
  int64_t batches = 1;
  for (int d = 0; d < nd - 2; d++) batches *= a->sizes[d];
  if (batches == 1 && n <= PMP_GEMV_MAX_ROWS) {
    const int64_t sa[2] = {a->strides[nd - 2], a->strides[nd - 1]}, sb[2] = {b->strides[nd - 2], b->strides[nd - 1]};
    int rc = pmp_cpu_gemv(a->dtype_id, n, k, m, a->data, sa, b->data, sb, c->data);
    if (rc <= 0) return rc;
  }
  if (a->dtype_id == PMP_BF16) {
    int rc = amx_batches(a, b, c, batches, n, k, m);
    if (rc <= 0) return rc;
  }
  if (pmp_dtype_is_float(a->dtype_id) && a->dtype_id != PMP_F64) {
    int rc = onednn_batches(a, b, c, batches, n, k, m);
    if (rc <= 0) return rc;
  }
  pmp_blas_sync_threads();
  for (int64_t bi = 0; bi < batches; bi++) {
    int64_t off_a, off_b;
    batch_offsets(a, b, bi, &off_a, &off_b);
    const char *pa = a->data + off_a * es, *pb = b->data + off_b * es;
    char *pc = c->data + bi * n * m * es;
    const int64_t sa[2] = {a->strides[nd - 2], a->strides[nd - 1]}, sb[2] = {b->strides[nd - 2], b->strides[nd - 1]};
    if (!pmp_dtype_is_float(a->dtype_id)) {
      gemm_integer(pa, pb, pc, a->dtype_id, n, k, m, sa, sb);
    } else if (gemm_one(pa, pb, pc, a->dtype_id, n, k, m, sa, sb) != 0) {
      return -1;
    }
  }
  return 0;
}
