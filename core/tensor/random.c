/*
 * Random numbers: xoshiro256** streams seeded through splitmix64. The default generator is seeded by
 * pmp_manual_seed; pmp_generator objects are independent streams of the same kind. Tensors are filled
 * in order on one thread, so a seed gives the same numbers regardless of the thread count.
 */
#include "internal.h"
#include <math.h>

static pmp_generator default_generator = {
    {0x9E3779B97F4A7C15ull, 0xBF58476D1CE4E5B9ull, 0x94D049BB133111EBull, 0x2545F4914F6CDD1Dull}};

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

void pmp_generator_seed(pmp_generator *g, uint64_t seed) {
  for (int k = 0; k < 4; k++) g->state[k] = splitmix64(&seed);
}

static uint64_t next_u64(pmp_generator *g) {
  uint64_t *s = g->state;
  uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return result;
}

double pmp_generator_uniform(pmp_generator *g) { return (double)(next_u64(g) >> 11) * 0x1.0p-53; }

pmp_generator *pmp_default_generator(void) { return &default_generator; }

void pmp_manual_seed(uint64_t seed) { pmp_generator_seed(&default_generator, seed); }

void pmp_rng_get_state(uint64_t *out) { memcpy(out, default_generator.state, sizeof default_generator.state); }

void pmp_rng_set_state(const uint64_t *in) { memcpy(default_generator.state, in, sizeof default_generator.state); }

uint64_t pmp_random_u64(void) { return next_u64(&default_generator); }

double pmp_random_uniform(void) { return pmp_generator_uniform(&default_generator); }

/* f[0]: kind (0 uniform, 1 normal, 2 integer), f[1..2]: integer range [low, high). */
int pmp_cpu_random(const pmp_op_args *a) {
  pmp_tensor *t = a->out;
  int64_t n = pmp_numel(t);
  int es = pmp_dtype_size(t->dtype_id);
  for (int64_t k = 0; k < n; k++) {
    char *p = t->data + k * es;
    switch (a->op) {
    case PMP_OP_RAND: pmp_store_from_f64(t->dtype_id, p, pmp_random_uniform()); break;
    case PMP_OP_RANDN: {
      /* Box-Muller, using both outputs */
      double u1 = 1.0 - pmp_random_uniform(), u2 = pmp_random_uniform();
      double r = sqrt(-2.0 * log(u1));
      pmp_store_from_f64(t->dtype_id, p, r * cos(2 * M_PI * u2));
      if (++k < n) pmp_store_from_f64(t->dtype_id, t->data + k * es, r * sin(2 * M_PI * u2));
      break;
    }
    case PMP_OP_RANDINT: {
      uint64_t span = (uint64_t)(a->i[1] - a->i[0]);
      pmp_store_from_i64(t->dtype_id, p, a->i[0] + (int64_t)(pmp_random_u64() % span));
      break;
    }
    }
  }
  /* bf16/f16 rounding could push a uniform sample to exactly 1; keep rand in [0, 1) */
  if (a->op == PMP_OP_RAND && (t->dtype_id == PMP_BF16 || t->dtype_id == PMP_F16))
    for (int64_t k = 0; k < n; k++)
      if (pmp_load_as_f64(t->dtype_id, t->data + k * es) >= 1.0) pmp_store_from_f64(t->dtype_id, t->data + k * es, 0.0);
  return 0;
}

static pmp_tensor *random_tensor(int op, const int64_t *shape, int ndim, int dtype, pmp_device device, int64_t low,
                                 int64_t high) {
  pmp_op_args a = {.op = op, .i = {low, high}};
  return pmp_run_new(&a, shape, ndim, dtype, device);
}

pmp_tensor *pmp_rand(const int64_t *shape, int ndim, int dtype, pmp_device device) {
  if (!pmp_dtype_is_float(dtype)) return pmp_fail("rand: needs a floating-point dtype, got %s", pmp_dtype_name(dtype));
  return random_tensor(PMP_OP_RAND, shape, ndim, dtype, device, 0, 0);
}

pmp_tensor *pmp_randn(const int64_t *shape, int ndim, int dtype, pmp_device device) {
  if (!pmp_dtype_is_float(dtype)) return pmp_fail("randn: needs a floating-point dtype, got %s", pmp_dtype_name(dtype));
  return random_tensor(PMP_OP_RANDN, shape, ndim, dtype, device, 0, 0);
}

pmp_tensor *pmp_randint(int64_t low, int64_t high, const int64_t *shape, int ndim, int dtype, pmp_device device) {
  if (high <= low) return pmp_fail("randint: empty range [%lld, %lld)", (long long)low, (long long)high);
  return random_tensor(PMP_OP_RANDINT, shape, ndim, dtype, device, low, high);
}
