/* Token sampling's front-end: checks the settings, draws each row's uniform from its generator here, in
 * row order, so the kernel (cpu_sample.c) is a pure function of its inputs and free to split the rows
 * over threads. */
#include "internal.h"
#include <math.h>

#define SHAPE(t, buf) pmp_shape_str((t)->sizes, (t)->ndim, buf, sizeof buf)

static bool check_settings(double repetition_penalty, double temperature, int64_t top_k, double top_p) {
  if (!(repetition_penalty > 0) || isinf(repetition_penalty)) {
    pmp_fail("sample: repetition_penalty must be a finite number > 0 (1 = off), got %g", repetition_penalty);
    return false;
  }
  if (!(temperature >= 0) || isinf(temperature)) {
    pmp_fail("sample: temperature must be a finite number >= 0 (0 = greedy), got %g", temperature);
    return false;
  }
  if (top_k < 0) {
    pmp_fail("sample: top_k must be >= 0 (0 = off), got %lld", (long long)top_k);
    return false;
  }
  if (!(top_p > 0 && top_p <= 1)) {
    pmp_fail("sample: top_p must be in (0, 1] (1 = off), got %g", top_p);
    return false;
  }
  return true;
}

/* uniforms[b] from row b's generator, drawn in row order (a generator shared by rows serves them in turn). */
static pmp_tensor *draw_uniforms(int64_t rows, pmp_generator *const *generators) {
  pmp_tensor *u = pmp_empty_shape(&rows, 1, PMP_F64, (pmp_device){PMP_CPU, 0});
  if (!u) return NULL;
  for (int64_t b = 0; b < rows; b++) {
    pmp_generator *g = generators ? generators[b] : pmp_default_generator();
    if (!g) {
      pmp_tensor_release(u);
      return pmp_fail("sample: generator for row %lld is missing", (long long)b);
    }
    ((double *)u->data)[b] = pmp_generator_uniform(g);
  }
  return u;
}

int pmp_sample(pmp_tensor *logits, pmp_tensor *seen, double repetition_penalty, double temperature, int64_t top_k,
               double top_p, pmp_generator *const *generators, pmp_tensor **ids, pmp_tensor **logprobs) {
  *ids = NULL;
  if (logprobs) *logprobs = NULL;
  if (!logits) return -1;
  char sl[PMP_SHAPE_BUF], ss[PMP_SHAPE_BUF];
  if (logits->ndim != 2 || !pmp_dtype_is_float(logits->dtype_id) || logits->sizes[1] == 0)
    return pmp_fail_code("sample: logits must be a floating tensor [batch, vocab] with vocab > 0, got %s %s",
                         pmp_dtype_name(logits->dtype_id), SHAPE(logits, sl));
  if (seen && (seen->ndim != 2 || seen->sizes[0] != logits->sizes[0] || pmp_dtype_is_float(seen->dtype_id) ||
               seen->dtype_id == PMP_BOOL))
    return pmp_fail_code("sample: seen must be an integer tensor [%lld, ids] (one row of ids per logits row), got "
                         "%s %s", (long long)logits->sizes[0], pmp_dtype_name(seen->dtype_id), SHAPE(seen, ss));
  if (seen && !pmp_same_device(logits, seen, "sample")) return -1;
  if (!check_settings(repetition_penalty, temperature, top_k, top_p)) return -1;
  int64_t rows = logits->sizes[0];
  pmp_scope s = {0};
  pmp_tensor *lc = pmp_keep(&s, pmp_contiguous(logits));
  pmp_tensor *sc = NULL;
  bool ready = lc != NULL;
  if (ready && seen && repetition_penalty != 1) {
    sc = pmp_keep(&s, pmp_contiguous(pmp_keep(&s, pmp_to_dtype(seen, PMP_I64))));
    ready = sc != NULL;
  }
  pmp_tensor *uniforms = NULL;
  if (ready && temperature > 0) {
    pmp_tensor *drawn = pmp_keep(&s, draw_uniforms(rows, generators));
    uniforms = pmp_keep(&s, drawn ? pmp_to_device(drawn, logits->dev) : NULL);
    ready = uniforms != NULL;
  }
  int logprob_dtype = logits->dtype_id == PMP_F64 ? PMP_F64 : PMP_F32;
  pmp_op_args a = {.op = PMP_OP_SAMPLE, .in = {lc, sc, uniforms}, .nin = 3,
                   .f = {repetition_penalty, temperature, top_p}, .i = {top_k}};
  if (ready) {
    a.out = pmp_empty_shape(&rows, 1, PMP_I64, logits->dev);
    a.out2 = pmp_empty_shape(&rows, 1, logprob_dtype, logits->dev);
  }
  int rc = a.out && a.out2 && !pmp_check_interrupt("sample") ? pmp_dispatch(&a) : -1;
  pmp_scope_end(&s);
  if (rc != 0) {
    pmp_tensor_release(a.out);
    pmp_tensor_release(a.out2);
    return -1;
  }
  *ids = a.out;
  if (logprobs)
    *logprobs = a.out2;
  else
    pmp_tensor_release(a.out2);
  return 0;
}
