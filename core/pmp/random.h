/* The C ABI, random numbers: the engine's generator and numpy's legacy RandomState (core/tensor/).
 * Included through pmp.h, whose conventions hold here; lua/pmp/ffi.lua declares the region between the
 * CDEF markers to LuaJIT, so it holds plain C declarations only. */
#ifndef PMP_RANDOM_H
#define PMP_RANDOM_H

#include <stdint.h>
#include "pmp/tensor.h"

/* PMP_CDEF_BEGIN */

/* ---- random ---- */
/* Seeds the default generator: the one behind rand, randn, randint and sampling without a generator. */
void pmp_manual_seed(uint64_t seed);
/* The default generator's whole state (4 words), so checkpoints can resume the exact random stream. */
void pmp_rng_get_state(uint64_t *state);
void pmp_rng_set_state(const uint64_t *state);
pmp_tensor *pmp_rand(const int64_t *shape, int ndim, int dtype, pmp_device device);
pmp_tensor *pmp_randn(const int64_t *shape, int ndim, int dtype, pmp_device device);
pmp_tensor *pmp_randint(int64_t low, int64_t high, const int64_t *shape, int ndim, int dtype,
                        pmp_device device);

/* ---- generators: streams of their own, apart from the default one ----
 * The same xoshiro256** as the default generator: pmp_generator_seed(g, s) starts the stream that
 * pmp_manual_seed(s) starts. The state is plain data: allocate it from Lua with ffi.new('pmp_generator').
 * Lets a request or a rank draw without moving the default stream (see pmp_sample). */
typedef struct pmp_generator { uint64_t state[4]; } pmp_generator;
void pmp_generator_seed(pmp_generator *g, uint64_t seed);
double pmp_generator_uniform(pmp_generator *g);   /* [0, 1), 53 random bits */

/* ---- numpy's legacy RandomState (core/tensor/random_numpy.c) ----
 * MT19937 seeded and drawn as numpy.random.RandomState(seed) does, and its in-place 1-D shuffle, so the
 * GPT dataset's indices match megatron-core's draw for draw. The state is plain data: allocate it from
 * Lua with ffi.new('pmp_np_random'). */
typedef struct pmp_np_random { uint32_t key[624]; int32_t pos; } pmp_np_random;
void pmp_np_random_seed(pmp_np_random *r, uint32_t seed);
uint32_t pmp_np_random_next_u32(pmp_np_random *r);
uint64_t pmp_np_random_next_u64(pmp_np_random *r);                 /* two outputs, the first is the high half */
uint64_t pmp_np_random_interval(pmp_np_random *r, uint64_t max);   /* uniform in [0, max] (random_interval) */
void pmp_np_random_shuffle_i32(pmp_np_random *r, int32_t *data, int64_t n);   /* RandomState.shuffle */
void pmp_np_random_shuffle_i64(pmp_np_random *r, int64_t *data, int64_t n);

/* PMP_CDEF_END */

#endif
