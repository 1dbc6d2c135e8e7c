/* numpy.random.RandomState's generator and its shuffle, so that pmp's GPT dataset builds the very
 * document, sample and shuffle indices megatron-core builds (lua/pmp/data/gpt_dataset.lua).
 *
 * Why this exists: megatron.core's GPTDataset orders its training samples with
 * numpy.random.RandomState(seed).shuffle (gpt_dataset.py: _build_document_index, then
 * _build_shuffle_index). Giving a run the same samples in the same order as Megatron-LM needs that
 * generator and that shuffle exactly, draw for draw. What numpy does (numpy/random: mtrand.pyx
 * RandomState.shuffle and _shuffle_raw, _mt19937.pyx _legacy_seeding, src/mt19937/mt19937.{c,h},
 * src/distributions/distributions.c random_interval):
 *  - RandomState(s) for an integer s in [0, 2^32) is MT19937 whose 624 words are filled by the
 *    reference init_genrand recurrence (multiplier 1812433253); the first draw twists the whole table.
 *    Outputs are the reference tempered words, so RandomState(5489) gives std::mt19937's sequence.
 *  - shuffle(x) of a non-empty 1-D array goes i = n-1, n-2, ..., 1: j = a uniform draw in [0, i], then
 *    x[i] and x[j] swap (also when j == i; a swap with itself changes nothing but the draw counts).
 *  - the uniform draw in [0, max]: mask = the smallest 2^k - 1 >= max; take outputs & mask until one
 *    is <= max. While max fits 32 bits each try uses one 32-bit output; beyond that a try is a 64-bit
 *    value made of two consecutive outputs, the first being the high half.
 * One RandomState serves all of Megatron's shuffles in order (the document index, then the shuffle
 * index, each in one or two parts), so the caller passes the same state through them in that order.
 */
#include "pmp.h"

#define MT_N 624
#define MT_SHIFT 397

void pmp_np_random_seed(pmp_np_random *r, uint32_t seed) {
  uint32_t v = seed;
  for (int k = 0; k < MT_N; k++) {
    r->key[k] = v;
    v = 1812433253u * (v ^ (v >> 30)) + (uint32_t)(k + 1);
  }
  r->pos = MT_N;   /* the first draw twists */
}

/* One MT19937 twist of the whole table, in place and in increasing order (later words read the ones
 * already replaced, as the reference does). */
static uint32_t mix(uint32_t upper_from, uint32_t lower_from, uint32_t shifted) {
  uint32_t y = (upper_from & 0x80000000u) | (lower_from & 0x7fffffffu);
  return shifted ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
}

static void twist(pmp_np_random *r) {
  uint32_t *w = r->key;
  int k = 0;
  for (; k < MT_N - MT_SHIFT; k++) w[k] = mix(w[k], w[k + 1], w[k + MT_SHIFT]);
  for (; k < MT_N - 1; k++) w[k] = mix(w[k], w[k + 1], w[k + MT_SHIFT - MT_N]);
  w[MT_N - 1] = mix(w[MT_N - 1], w[0], w[MT_SHIFT - 1]);
  r->pos = 0;
}

uint32_t pmp_np_random_next_u32(pmp_np_random *r) {
  if (r->pos >= MT_N) twist(r);
  uint32_t y = r->key[r->pos++];
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  return y ^ (y >> 18);
}

uint64_t pmp_np_random_next_u64(pmp_np_random *r) {
  uint64_t high = pmp_np_random_next_u32(r);
  uint64_t low = pmp_np_random_next_u32(r);
  return (high << 32) | low;
}

uint64_t pmp_np_random_interval(pmp_np_random *r, uint64_t max) {
  if (max == 0) return 0;   /* no draw */
  uint64_t mask = max;
  for (int s = 1; s < 64; s <<= 1) mask |= mask >> s;
  uint64_t v;
  if (max <= 0xffffffffu) {
    do v = pmp_np_random_next_u32(r) & mask;
    while (v > max);
  } else {
    do v = pmp_np_random_next_u64(r) & mask;
    while (v > max);
  }
  return v;
}

void pmp_np_random_shuffle_i32(pmp_np_random *r, int32_t *data, int64_t n) {
  for (int64_t i = n - 1; i >= 1; i--) {
    int64_t j = (int64_t)pmp_np_random_interval(r, (uint64_t)i);
    int32_t t = data[j];
    data[j] = data[i];
    data[i] = t;
  }
}

void pmp_np_random_shuffle_i64(pmp_np_random *r, int64_t *data, int64_t n) {
  for (int64_t i = n - 1; i >= 1; i--) {
    int64_t j = (int64_t)pmp_np_random_interval(r, (uint64_t)i);
    int64_t t = data[j];
    data[j] = data[i];
    data[i] = t;
  }
}
