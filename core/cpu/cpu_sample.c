/* CPU kernel of token sampling (pmp_sample). Each row is processed alone, in doubles, from its own
 * uniform, so rows split over threads give the same tokens as one thread. */
#include "internal.h"
#include "cpu/vector_math.h"
#include <math.h>

/* libmvec's vector exp for the `omp simd` loops below (vector_math.h declares the float ones) */
#pragma omp declare simd notinbranch
double exp(double);

/* A row's failure, reported after the parallel loop for the first failing row. */
enum { ROW_OK, ROW_SEEN_OUT_OF_RANGE, ROW_NOT_FINITE, ROW_ALL_MASKED, ROW_NO_MEMORY };

typedef struct candidate {
  double value, weight;
  int64_t index;
} candidate;

/* One thread's buffers, sized for one row. */
typedef struct scratch {
  double *value;           /* the processed logits */
  double *weight;          /* exp(value - peak): unnormalised probabilities */
  double *heap;            /* top_k's k largest values, a min-heap */
  candidate *candidates;   /* top_p's tokens, partitioned around the nucleus' end */
} scratch;

static bool scratch_init(scratch *s, int64_t vocab, int64_t heap_size, bool sampling, bool nucleus) {
  *s = (scratch){malloc(vocab * sizeof(double)), sampling ? malloc(vocab * sizeof(double)) : NULL,
                 heap_size ? malloc(heap_size * sizeof(double)) : NULL,
                 nucleus ? malloc(vocab * sizeof(candidate)) : NULL};
  return s->value && (!sampling || s->weight) && (!heap_size || s->heap) && (!nucleus || s->candidates);
}

static void scratch_free(scratch *s) {
  free(s->value);
  free(s->weight);
  free(s->heap);
  free(s->candidates);
}

static void load_row(const pmp_tensor *logits, int64_t row, int64_t vocab, double *value) {
  int64_t base = row * vocab;
  switch (logits->dtype_id) {
  case PMP_F32:
    for (int64_t v = 0; v < vocab; v++) value[v] = ((const float *)logits->data)[base + v];
    break;
  case PMP_BF16:
    for (int64_t v = 0; v < vocab; v++) value[v] = pmp_bf16_to_f32(((const uint16_t *)logits->data)[base + v]);
    break;
  default: {
    int es = pmp_dtype_size(logits->dtype_id);
    for (int64_t v = 0; v < vocab; v++) value[v] = pmp_load_as_f64(logits->dtype_id, logits->data + (base + v) * es);
  }
  }
}

/* transformers' RepetitionPenaltyLogitsProcessor: each seen id's logit, from the unpenalised one, so an
 * id seen twice is penalised once. */
static int penalise(const pmp_tensor *logits, const pmp_tensor *seen, int64_t row, int64_t vocab, double penalty,
                    double *value, int64_t *bad_id) {
  int64_t count = seen->sizes[1];
  const int64_t *ids = (const int64_t *)seen->data + row * count;
  int es = pmp_dtype_size(logits->dtype_id);
  for (int64_t s = 0; s < count; s++) {
    int64_t id = ids[s];
    if (id < 0) continue;
    if (id >= vocab) {
      *bad_id = id;
      return ROW_SEEN_OUT_OF_RANGE;
    }
    double original = pmp_load_as_f64(logits->dtype_id, logits->data + (row * vocab + id) * es);
    value[id] = original < 0 ? original * penalty : original / penalty;
  }
  return ROW_OK;
}

/* torch.argmax's choice: the first largest value, or the first NaN if there is one. */
static int64_t first_largest(const double *value, int64_t vocab) {
  int64_t best = 0;
  for (int64_t v = 1; v < vocab; v++) {
    if (value[best] != value[best]) break;
    if (value[v] > value[best] || value[v] != value[v]) best = v;
  }
  return best;
}

/* The row's exp passes over the whole vocabulary, as `omp simd` loops (libmvec's exp): the sums' order
 * is fixed by the build and the CPU, never by the thread count. */
WIDE_VECTORS static double log_sum_exp_shifted(const double *value, int64_t vocab, double peak) {
  double total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t v = 0; v < vocab; v++) total += exp(value[v] - peak);
  return log(total);
}

/* weight = exp(value - peak); *mass gets their sum, *kept_mass that of the values at least floor. */
WIDE_VECTORS static void weigh_row(const double *value, double *weight, int64_t vocab, double peak, double floor,
                                   double *mass, double *kept_mass) {
  double all = 0;
#pragma omp simd reduction(+ : all)
  for (int64_t v = 0; v < vocab; v++) {
    weight[v] = exp(value[v] - peak);
    all += weight[v];
  }
  double kept = 0;
  if (floor > -INFINITY)
    for (int64_t v = 0; v < vocab; v++) kept += value[v] >= floor ? weight[v] : 0;
  *mass = all;
  *kept_mass = floor > -INFINITY ? kept : all;
}

static void sift_down(double *heap, int64_t size, int64_t at) {
  for (;;) {
    int64_t smallest = at, left = 2 * at + 1, right = left + 1;
    if (left < size && heap[left] < heap[smallest]) smallest = left;
    if (right < size && heap[right] < heap[smallest]) smallest = right;
    if (smallest == at) return;
    double t = heap[at];
    heap[at] = heap[smallest];
    heap[smallest] = t;
    at = smallest;
  }
}

/* The k-th largest value counting repeats (torch.topk(values, k)[0][-1]), through a min-heap of the k
 * largest seen so far. */
static double kth_largest(const double *value, int64_t vocab, int64_t k, double *heap) {
  for (int64_t v = 0; v < k; v++) heap[v] = value[v];
  for (int64_t at = k / 2 - 1; at >= 0; at--) sift_down(heap, k, at);
  for (int64_t v = k; v < vocab; v++)
    if (value[v] > heap[0]) {
      heap[0] = value[v];
      sift_down(heap, k, 0);
    }
  return heap[0];
}

/* Draws from the tokens whose value is at least floor, in index order: the first whose running weight
 * passes uniform * total. The last token with weight wins a draw that rounding pushed past the end. */
static int64_t draw_at_or_above(const double *value, const double *weight, int64_t vocab, double floor, double total,
                                double uniform) {
  double target = uniform * total, running = 0;
  int64_t last = 0;
  for (int64_t v = 0; v < vocab; v++) {
    if (value[v] < floor || weight[v] == 0) continue;
    running += weight[v];
    last = v;
    if (target < running) return v;
  }
  return last;
}

/* The order top_p walks tokens in: larger value first, then the smaller index (a total order, so the
 * nucleus never depends on how the candidates were arranged). */
static bool ranks_before(const candidate *a, const candidate *b) {
  return a->value > b->value || (a->value == b->value && a->index < b->index);
}

static void swap_candidates(candidate *a, candidate *b) {
  candidate t = *a;
  *a = *b;
  *b = t;
}

/* The nucleus' size: tokens in ranking order while the mass ranked above each is below target. Found
 * by quickselect on the cumulative weight instead of a sort, so a nucleus of thousands of tokens costs
 * O(n): on return the nucleus is c[0, size), in no particular order. */
static int64_t select_nucleus(candidate *c, int64_t n, double target) {
  int64_t lo = 0, hi = n;   /* c[0, lo) is in the nucleus; its last token lies in c[lo, hi) */
  while (hi - lo > 1) {
    /* median of three as the pivot, moved to c[hi - 1] */
    int64_t mid = lo + (hi - lo) / 2, last = hi - 1;
    if (ranks_before(&c[mid], &c[lo])) swap_candidates(&c[mid], &c[lo]);
    if (ranks_before(&c[last], &c[lo])) swap_candidates(&c[last], &c[lo]);
    if (ranks_before(&c[mid], &c[last])) swap_candidates(&c[mid], &c[last]);
    int64_t m = lo;
    double above = 0;
    for (int64_t i = lo; i < last; i++)
      if (ranks_before(&c[i], &c[last])) {
        above += c[i].weight;
        swap_candidates(&c[i], &c[m++]);
      }
    swap_candidates(&c[m], &c[last]);
    if (above >= target) {
      hi = m;
    } else if (above + c[m].weight >= target) {
      return m + 1;
    } else {
      target -= above + c[m].weight;
      lo = m + 1;
    }
  }
  return hi;   /* hi == n when rounding left the whole mass short of target */
}

/* top_p's draw: among the tokens at least floor (top_k's cut) with any weight, the nucleus holding
 * top_p of the mass kept by top_k, drawn from in proportion to weight. */
static int64_t draw_nucleus(const double *value, const double *weight, candidate *candidates, int64_t vocab,
                            double floor, double kept_mass, double top_p, double uniform) {
  int64_t n = 0;
  for (int64_t v = 0; v < vocab; v++)
    if (value[v] >= floor && weight[v] > 0) candidates[n++] = (candidate){value[v], weight[v], v};
  int64_t size = select_nucleus(candidates, n, top_p * kept_mass);
  double total = 0;
  for (int64_t j = 0; j < size; j++) total += candidates[j].weight;
  double draw = uniform * total, running = 0;
  for (int64_t j = 0; j < size; j++) {
    running += candidates[j].weight;
    if (draw < running) return candidates[j].index;
  }
  return candidates[size - 1].index;   /* rounding pushed the draw past the end */
}

typedef struct settings {
  double penalty, temperature, top_p;
  int64_t top_k;
} settings;

static int sample_row(const pmp_op_args *a, const settings *set, int64_t row, scratch *s, int64_t *token,
                      double *logprob, int64_t *bad_id) {
  const pmp_tensor *logits = a->in[0], *seen = a->in[1], *uniforms = a->in[2];
  int64_t vocab = logits->sizes[1];
  double *value = s->value, *weight = s->weight;
  load_row(logits, row, vocab, value);
  if (seen) {
    int rc = penalise(logits, seen, row, vocab, set->penalty, value, bad_id);
    if (rc != ROW_OK) return rc;
  }
  if (set->temperature == 0) {
    *token = first_largest(value, vocab);
    double peak = value[*token];
    *logprob = value[*token] - peak - log_sum_exp_shifted(value, vocab, peak);
    return ROW_OK;
  }
  double peak = -INFINITY;
  for (int64_t v = 0; v < vocab; v++) {
    value[v] /= set->temperature;
    if (value[v] != value[v] || value[v] == INFINITY) return ROW_NOT_FINITE;
    if (value[v] > peak) peak = value[v];
  }
  if (peak == -INFINITY) return ROW_ALL_MASKED;
  double floor = set->top_k > 0 && set->top_k < vocab ? kth_largest(value, vocab, set->top_k, s->heap) : -INFINITY;
  double mass, kept_mass;
  weigh_row(value, weight, vocab, peak, floor, &mass, &kept_mass);
  double uniform = ((const double *)uniforms->data)[row];
  *token = set->top_p < 1 ? draw_nucleus(value, weight, s->candidates, vocab, floor, kept_mass, set->top_p, uniform)
                          : draw_at_or_above(value, weight, vocab, floor, kept_mass, uniform);
  *logprob = value[*token] - peak - log(mass);
  return ROW_OK;
}

int pmp_cpu_sample(const pmp_op_args *a) {
  const pmp_tensor *logits = a->in[0];
  int64_t rows = logits->sizes[0], vocab = logits->sizes[1];
  settings set = {.penalty = a->f[0], .temperature = a->f[1], .top_p = a->f[2], .top_k = a->i[0]};
  bool sampling = set.temperature > 0;
  int64_t heap_size = sampling && set.top_k > 0 && set.top_k < vocab ? set.top_k : 0;
  bool nucleus = sampling && set.top_p < 1;
  int *status = calloc(rows ? rows : 1, sizeof *status);
  int64_t *bad_ids = calloc(rows ? rows : 1, sizeof *bad_ids);
  if (!status || !bad_ids) {
    free(status);
    free(bad_ids);
    return pmp_fail_code("sample: out of memory for %lld rows", (long long)rows);
  }
  int64_t *tokens = (int64_t *)a->out->data;
#pragma omp parallel if (rows > 1 && rows * vocab >= PMP_PARALLEL_THRESHOLD)
  {
    scratch s;
    bool ready = scratch_init(&s, vocab, heap_size, sampling, nucleus);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < rows; b++) {
      double logprob = 0;
      status[b] = ready ? sample_row(a, &set, b, &s, &tokens[b], &logprob, &bad_ids[b]) : ROW_NO_MEMORY;
      pmp_store_from_f64(a->out2->dtype_id, a->out2->data + b * pmp_dtype_size(a->out2->dtype_id), logprob);
    }
    scratch_free(&s);
  }
  int rc = 0;
  for (int64_t b = 0; b < rows && rc == 0; b++) {
    switch (status[b]) {
    case ROW_OK: break;
    case ROW_SEEN_OUT_OF_RANGE:
      rc = pmp_fail_code("sample: seen id %lld in row %lld is outside the vocabulary of %lld", (long long)bad_ids[b],
                         (long long)b, (long long)vocab);
      break;
    case ROW_NOT_FINITE:
      rc = pmp_fail_code("sample: row %lld of logits holds NaN or +inf after the repetition penalty and temperature",
                         (long long)b);
      break;
    case ROW_ALL_MASKED: rc = pmp_fail_code("sample: every logit of row %lld is -inf", (long long)b); break;
    default: rc = pmp_fail_code("sample: out of memory for a row of %lld logits", (long long)vocab);
    }
  }
  free(status);
  free(bad_ids);
  return rc;
}
