/* Optimizer steps: fused in-place updates, outside autograd. Kernels: cpu_optim.c. */
#include "internal.h"
#include "cpu/vector_math.h"

#define SHAPE(t, buf) pmp_shape_str((t)->sizes, (t)->ndim, buf, sizeof buf)

static bool same_shape_contiguous(pmp_tensor *ref, pmp_tensor *t, const char *what) {
  char sr[PMP_SHAPE_BUF], st[PMP_SHAPE_BUF];
  if (!pmp_same_shape(ref, t)) {
    pmp_fail("adamw: %s of shape %s does not match the parameter's shape %s", what, SHAPE(t, st), SHAPE(ref, sr));
    return false;
  }
  if (!pmp_is_contiguous(t)) {
    pmp_fail("adamw: %s must be contiguous", what);
    return false;
  }
  return true;
}

int pmp_adamw_step_(pmp_tensor *param, pmp_tensor *grad, pmp_tensor *exp_avg, pmp_tensor *exp_avg_sq,
                    pmp_tensor *master, double lr, double beta1, double beta2, double eps, double weight_decay,
                    int64_t step) {
  if (!param || !grad || !exp_avg || !exp_avg_sq) return pmp_fail_code("adamw: missing parameter, gradient or state");
  if (step < 1) return pmp_fail_code("adamw: step counts from 1, got %lld", (long long)step);
  if (!same_shape_contiguous(param, param, "parameter") || !same_shape_contiguous(param, grad, "gradient") ||
      !same_shape_contiguous(param, exp_avg, "exp_avg") || !same_shape_contiguous(param, exp_avg_sq, "exp_avg_sq") ||
      (master && !same_shape_contiguous(param, master, "master weights")))
    return -1;
  pmp_tensor *state = master ? master : param;
  if (!pmp_dtype_is_float(state->dtype_id) || exp_avg->dtype_id != state->dtype_id || exp_avg_sq->dtype_id != state->dtype_id)
    return pmp_fail_code("adamw: optimizer state must have the dtype of the %s (%s), got %s and %s",
                         master ? "master weights" : "parameter", pmp_dtype_name(state->dtype_id),
                         pmp_dtype_name(exp_avg->dtype_id), pmp_dtype_name(exp_avg_sq->dtype_id));
  pmp_op_args a = {.op = PMP_OP_ADAMW, .out = param, .out2 = master, .in = {grad, exp_avg, exp_avg_sq}, .nin = 3,
                   .f = {lr, beta1, beta2, eps, weight_decay}, .i = {step}};
  return pmp_dispatch(&a);
}

int pmp_scale_(pmp_tensor *t, double factor) {
  if (!t) return -1;
  if (!pmp_is_contiguous(t)) return pmp_fail_code("scale_: the tensor must be contiguous");
  pmp_op_args a = {.op = PMP_OP_SCALE, .out = t, .f = {factor}};
  return pmp_dispatch(&a);
}

/* Squares of one block summed in f64 over eight interleaved partial sums, so the loop vectorizes
 * (products of f32 and bf16 values are exact in f64; only the order of the additions is ours). */
enum { SQUARES_BLOCK = 1 << 16 };

WIDE_VECTORS static double block_squares_f32(const float *x, int64_t n) {
  double acc[8] = {0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
#pragma omp simd
    for (int j = 0; j < 8; j++) acc[j] += (double)x[k + j] * x[k + j];
  for (; k < n; k++) acc[0] += (double)x[k] * x[k];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

WIDE_VECTORS static double block_squares_bf16(const uint16_t *x, int64_t n) {
  double acc[8] = {0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
#pragma omp simd
    for (int j = 0; j < 8; j++) {
      double v = bf16_bits_to_f32(x[k + j]);
      acc[j] += v * v;
    }
  for (; k < n; k++) {
    double v = bf16_bits_to_f32(x[k]);
    acc[0] += v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

static double block_squares(const char *data, int dt, int64_t n) {
  if (dt == PMP_F32) return block_squares_f32((const float *)data, n);
  if (dt == PMP_BF16) return block_squares_bf16((const uint16_t *)data, n);
  double total = 0;
  int es = pmp_dtype_size(dt);
  for (int64_t k = 0; k < n; k++) {
    double v = pmp_load_as_f64(dt, data + k * es);
    total += v * v;
  }
  return total;
}

/* Blocks are summed in order after the parallel pass, so the result does not depend on the thread
 * count (a gradient norm computed on 1 or 2 threads, or resumed on another machine, is the same). */
int pmp_sum_squares(pmp_tensor *t, double *result) {
  if (!t) return -1;
  pmp_tensor *c = pmp_contiguous(t);
  if (!c) return -1;
  int64_t n = pmp_numel(c), blocks = (n + SQUARES_BLOCK - 1) / SQUARES_BLOCK;
  int dt = c->dtype_id, es = pmp_dtype_size(dt);
  double one_block, *partial = blocks > 1 ? malloc(sizeof(double) * (size_t)blocks) : &one_block;
  if (!partial) {
    pmp_tensor_release(c);
    return pmp_fail_code("sum_squares: out of memory");
  }
#pragma omp parallel for if (n >= PMP_PARALLEL_THRESHOLD) schedule(static)
  for (int64_t b = 0; b < blocks; b++) {
    int64_t start = b * SQUARES_BLOCK, len = n - start < SQUARES_BLOCK ? n - start : SQUARES_BLOCK;
    partial[b] = block_squares(c->data + start * es, dt, len);
  }
  double total = 0;
  for (int64_t b = 0; b < blocks; b++) total += partial[b];
  if (partial != &one_block) free(partial);
  pmp_tensor_release(c);
  *result = total;
  return 0;
}
