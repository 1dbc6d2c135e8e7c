/* bf16 GEMM on AMX tiles: c[n, m] = a[n, k] @ b[k, m], bf16 in and out, f32 sums.
 *
 * oneDNN 2.6 (Debian's) reaches AMX too, but this kernel is 1.0-1.2x faster on a Llama layer's GEMMs
 * (tools/bench_core.lua bf16) and a bf16 training step 8-20%, so bf16 products with unit-stride rows or
 * columns come here first.
 *
 * Layout: b is packed into tiles of 16 (even, odd) k-pairs x 16 columns, the form the tile unit
 * multiplies; a is read in place when its rows are contiguous and whole (tile rows straight from
 * memory) and packed into 16 x 32 tiles otherwise. Each 32 x 32 block of c is summed over all of k in
 * four C tiles and rounded to bf16 once, so every element is one f32 sum in a fixed order: the result
 * does not depend on the thread count. */
#include "internal.h"
#include "cpu/x86/amx.h"

#ifdef PMP_HAVE_AMX

enum { TILE = 512 };   /* bf16 elements in one 16 x 64-byte tile */

static inline __mmask16 first16(int64_t n) { return n >= 16 ? 0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

/* A tile from 16 lines of 32 contiguous values (lines `stride` apart, `lines` and `width` of them
 * valid, the rest zero). Read as 16 x 16 pairs, transposed when the lines run along the tile's columns. */
AMX_TARGET static void tile_from_lines(uint16_t *tile, const uint16_t *src, int64_t stride, int64_t lines, int64_t width,
                                       bool transposed) {
  __m512i r[16];
  __mmask32 valid = pmp_first32(width);
  for (int i = 0; i < 16; i++) r[i] = i < lines ? _mm512_maskz_loadu_epi16(valid, src + i * stride) : _mm512_setzero_si512();
  if (transposed) pmp_transpose_16x16(r);
  for (int i = 0; i < 16; i++) _mm512_store_si512(tile + i * 32, r[i]);
}

/* Two side-by-side tiles from 32 lines of 32 contiguous values: lines 2q and 2q+1 interleave into
 * the pairs of row q, values 0-15 of each line into the first tile and 16-31 into the second;
 * transposed when the lines run along the tiles' rows. */
AMX_TARGET static void tiles_from_line_pairs(uint16_t *first, uint16_t *second, const uint16_t *src, int64_t stride,
                                             int64_t lines, int64_t width, bool transposed) {
  __m512i low[16], high[16];
  __mmask32 valid = pmp_first32(width);
  for (int q = 0; q < 16; q++) {
    __m512i even = 2 * q < lines ? _mm512_maskz_loadu_epi16(valid, src + 2 * q * stride) : _mm512_setzero_si512();
    __m512i odd = 2 * q + 1 < lines ? _mm512_maskz_loadu_epi16(valid, src + (2 * q + 1) * stride) : _mm512_setzero_si512();
    pmp_interleave_pairs(even, odd, &low[q], &high[q]);
  }
  if (transposed) {
    pmp_transpose_16x16(low);
    pmp_transpose_16x16(high);
  }
  for (int i = 0; i < 16; i++) {
    _mm512_store_si512(first + i * 32, low[i]);
    _mm512_store_si512(second + i * 32, high[i]);
  }
}

typedef struct operand {
  const uint16_t *data;
  int64_t row_stride, col_stride;   /* one of them is 1 */
} operand;

/* Blocks [first, last) of an operand into packed[tile - 2 origin][k chunk], two tiles of 16 lines per
 * block: a's rows as 16 x 32-k tiles, or b's columns as 16 k-pairs x 16 columns (the same tiles
 * transposed as pairs). `across` steps from one of a's rows or b's columns to the next, `along` along
 * k; one of them is 1. extent: a's rows or b's columns. */
AMX_TARGET static void pack_blocks(uint16_t *packed, const uint16_t *data, int64_t across, int64_t along, bool columns,
                                   int64_t origin, int64_t first, int64_t last, int64_t extent, int64_t k) {
  int64_t chunks = (k + 31) / 32;
  for (int64_t t = 2 * first; t < 2 * last; t += 2)
    for (int64_t p = 0; p < chunks; p++) {
      uint16_t *tile = packed + ((t - 2 * origin) * chunks + p) * TILE, *next = tile + chunks * TILE;
      if (along == 1) {
        tile_from_lines(tile, data + 16 * t * across + 32 * p, across, extent - 16 * t, k - 32 * p, columns);
        tile_from_lines(next, data + 16 * (t + 1) * across + 32 * p, across, extent - 16 * (t + 1), k - 32 * p, columns);
      } else {
        tiles_from_line_pairs(tile, next, data + 16 * t + 32 * p * along, along, k - 32 * p, extent - 16 * t, !columns);
      }
    }
}

/* One 32 x 32 block of c over all k: a's two row tiles `a_step` elements apart per k chunk with rows
 * `a_stride` bytes apart, b's two column tiles packed. The sums land in `sums` (32 x 32 f32). */
AMX_TARGET static void block_product(const uint16_t *a0, const uint16_t *a1, int64_t a_step, int64_t a_stride,
                                     const uint16_t *b0, const uint16_t *b1, int64_t chunks, float *sums) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  /* Tiles are not renamed: each load is placed after the last product that reads its register's
   * previous contents has been issued, so loads and products overlap. */
  for (int64_t p = 0; p < chunks; p++) {
    _tile_loadd(4, a0 + p * a_step, a_stride);
    _tile_loadd(6, b0 + p * TILE, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b1 + p * TILE, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, a1 + p * a_step, a_stride);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, sums, 128);
  _tile_stored(1, sums + 16, 128);
  _tile_stored(2, sums + 512, 128);
  _tile_stored(3, sums + 528, 128);
}

/* Rounds `rows` x `cols` (each <= 32) of the block's sums to bf16 into c (rows `ldc` apart). */
AMX_TARGET static void store_block(uint16_t *c, int64_t ldc, const float *sums, int64_t rows, int64_t cols) {
  __mmask16 left = first16(cols), right = first16(cols - 16);
  for (int64_t i = 0; i < rows; i++) {
    _mm256_mask_storeu_epi16(c + i * ldc, left, (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sums + 32 * i)));
    if (right) _mm256_mask_storeu_epi16(c + i * ldc + 16, right, (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sums + 32 * i + 16)));
  }
}

/* Packing scratch of the calling thread, kept between calls: a training step asks for the same sizes
 * every iteration, and fresh pages for each product cost more than a small GEMM. */
static _Thread_local uint16_t *scratch;
static _Thread_local size_t scratch_bytes;

static uint16_t *scratch_for(size_t bytes) {
  if (bytes > scratch_bytes) {
    free(scratch);
    scratch = aligned_alloc(64, bytes);
    scratch_bytes = scratch ? bytes : 0;
  }
  return scratch;
}

/* Scratch is bounded by packing a piece at a time: b in pieces of 32-column blocks of about
 * PIECE_BYTES, a (when it is packed) in chunks of row blocks of about ROWS_BYTES, each swept by all
 * of b's pieces. Within a piece, columns go in groups of about PANEL_BYTES of packed b, which stays in
 * L2 while a's row blocks sweep it. */
enum { PANEL_BYTES = 512 * 1024, PIECE_BYTES = 8 * 1024 * 1024, ROWS_BYTES = 8 * 1024 * 1024 };

typedef struct plan {
  int64_t chunks, row_blocks, col_blocks;
  int64_t piece;        /* column blocks packed at a time */
  int64_t group;        /* column blocks swept by a's row blocks at a time */
  int64_t rows;         /* row blocks per chunk of a; all of them when a is read in place */
  bool in_place;
} plan;

static int64_t clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

/* a is read in place when its rows are contiguous, whole 32-row blocks and whole 32-value k chunks,
 * and rows are not a multiple of 2 KiB apart (16 such rows would share two L1 sets). */
static plan plan_for(operand a, int64_t n, int64_t k, int64_t m) {
  plan p = {.chunks = (k + 31) / 32, .row_blocks = (n + 31) / 32, .col_blocks = (m + 31) / 32};
  int64_t block_bytes = 2 * p.chunks * TILE * (int64_t)sizeof(uint16_t);   /* a packed 32-row or 32-column block */
  p.in_place = a.col_stride == 1 && n % 32 == 0 && k % 32 == 0 && (a.row_stride * 2) % 2048 != 0;
  p.piece = clamp(PIECE_BYTES / block_bytes, 1, p.col_blocks);
  p.group = clamp(PANEL_BYTES / block_bytes, 1, p.piece);
  p.rows = clamp(p.in_place ? p.row_blocks : ROWS_BYTES / block_bytes, 1, p.row_blocks);
  return p;
}

static size_t scratch_bytes_for(const plan *p) {
  return (size_t)(p->piece + (p->in_place ? 0 : p->rows)) * 2 * (size_t)p->chunks * TILE * sizeof(uint16_t);
}

AMX_TARGET static void gemm(const plan *pl, operand a, operand b, uint16_t *c, int64_t n, int64_t k, int64_t m,
                            uint16_t *scratch) {
  int64_t chunks = pl->chunks, block = 2 * chunks * TILE;   /* elements in a packed block */
  uint16_t *packed_b = scratch, *packed_a = scratch + pl->piece * block;
#pragma omp parallel
  {
    pmp_amx_configure();
    float sums[32 * 32] __attribute__((aligned(64)));
    for (int64_t r0 = 0; r0 < pl->row_blocks; r0 += pl->rows) {
      int64_t r1 = r0 + pl->rows < pl->row_blocks ? r0 + pl->rows : pl->row_blocks, lo, hi;
      for (int64_t p0 = 0; p0 < pl->col_blocks; p0 += pl->piece) {
        int64_t p1 = p0 + pl->piece < pl->col_blocks ? p0 + pl->piece : pl->col_blocks;
        pmp_thread_share(p1 - p0, &lo, &hi);
        pack_blocks(packed_b, b.data, b.col_stride, b.row_stride, true, p0, p0 + lo, p0 + hi, m, k);
        if (!pl->in_place && p0 == 0) {
          pmp_thread_share(r1 - r0, &lo, &hi);
          pack_blocks(packed_a, a.data, a.row_stride, a.col_stride, false, r0, r0 + lo, r0 + hi, n, k);
        }
#pragma omp barrier
        /* Rows are split between threads when there are enough of them, else columns. */
        int64_t i0 = r0, i1 = r1, j0 = p0, j1 = p1;
        bool split_rows = r1 - r0 >= omp_get_num_threads();
        pmp_thread_share(split_rows ? r1 - r0 : p1 - p0, &lo, &hi);
        if (split_rows) i0 = r0 + lo, i1 = r0 + hi;
        else j0 = p0 + lo, j1 = p0 + hi;
        for (int64_t g = j0; g < j1; g += pl->group)
          for (int64_t i = i0; i < i1; i++) {
            const uint16_t *a0, *a1;
            int64_t a_step, a_stride;
            if (pl->in_place) {
              a0 = a.data + 32 * i * a.row_stride, a1 = a0 + 16 * a.row_stride;
              a_step = 32, a_stride = 2 * a.row_stride;
            } else {
              a0 = packed_a + (i - r0) * block, a1 = a0 + chunks * TILE;
              a_step = TILE, a_stride = 64;
            }
            for (int64_t j = g; j < g + pl->group && j < j1; j++) {
              const uint16_t *b0 = packed_b + (j - p0) * block;
              block_product(a0, a1, a_step, a_stride, b0, b0 + chunks * TILE, chunks, sums);
              store_block(c + 32 * i * m + 32 * j, m, sums, n - 32 * i < 32 ? n - 32 * i : 32, m - 32 * j < 32 ? m - 32 * j : 32);
            }
          }
        /* the next piece's packing overwrites what this one read */
#pragma omp barrier
      }
    }
    _tile_release();
  }
}

int pmp_amx_matmul(int64_t n, int64_t k, int64_t m, const uint16_t *a, const int64_t a_strides[2], const uint16_t *b,
                   const int64_t b_strides[2], uint16_t *c) {
  /* Under 32 rows (decoding) the tiles would mostly multiply padding, and packing b would cost more
   * than reading it once: oneDNN's vector kernels are the better fit. */
  if (!pmp_amx_enabled("PMP_MATMUL_NO_AMX") || n < 32 || m == 0 || k == 0) return 1;
  operand oa = {a, a_strides[0], a_strides[1]}, ob = {b, b_strides[0], b_strides[1]};
  if ((oa.row_stride != 1 && oa.col_stride != 1) || (ob.row_stride != 1 && ob.col_stride != 1)) return 1;
  plan pl = plan_for(oa, n, k, m);
  uint16_t *scratch = scratch_for(scratch_bytes_for(&pl));
  if (!scratch) return pmp_fail_code("matmul: out of memory packing a %lld x %lld bf16 product for AMX", (long long)n, (long long)m);
  gemm(&pl, oa, ob, c, n, k, m, scratch);
  return 0;
}

#else

int pmp_amx_matmul(int64_t n, int64_t k, int64_t m, const uint16_t *a, const int64_t a_strides[2], const uint16_t *b,
                   const int64_t b_strides[2], uint16_t *c) {
  (void)n, (void)k, (void)m, (void)a, (void)a_strides, (void)b, (void)b_strides, (void)c;
  return 1;
}

#endif
