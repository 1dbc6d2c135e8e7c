/*
 * The caching allocator. Freed blocks are kept in per-size free lists and handed out again, so a
 * training loop that allocates the same shapes every step stops calling malloc after the first one.
 * Sizes are rounded up (512 B below 1 MiB, 1 MiB above) so near-equal requests share blocks. The cache
 * is bounded; past the bound, or when malloc fails, cached blocks are returned to the system.
 */
#include "internal.h"
#include <stdio.h>

enum { BUCKETS = 1024, ALIGNMENT = 64 };

typedef struct block {
  struct block *next;
  void *ptr;
  int64_t size;
} block;

typedef struct device_cache {
  block *free_lists[BUCKETS];   /* hashed by size; a chain may mix sizes */
  pmp_memory_stats stats;
  int64_t limit;
} device_cache;

static device_cache caches[PMP_DEVICE_TYPE_COUNT] = {
    [PMP_CPU] = {.limit = (int64_t)4 << 30},
};

static int64_t round_size(int64_t n) {
  if (n <= 0) return ALIGNMENT;
  int64_t unit = n < ((int64_t)1 << 20) ? 512 : ((int64_t)1 << 20);
  return (n + unit - 1) / unit * unit;
}

static unsigned bucket_of(int64_t size) { return (unsigned)((uint64_t)size * 0x9E3779B97F4A7C15ull >> 54) % BUCKETS; }

static void release_cached(device_cache *c, int64_t target) {
  for (int b = 0; b < BUCKETS && c->stats.cached > target; b++) {
    while (c->free_lists[b] && c->stats.cached > target) {
      block *blk = c->free_lists[b];
      c->free_lists[b] = blk->next;
      c->stats.cached -= blk->size;
      free(blk->ptr);
      free(blk);
    }
  }
}

void *pmp_alloc(int device_type, int64_t nbytes) {
  if (device_type != PMP_CPU) return pmp_fail("alloc: no allocator for device type %d in this build", device_type);
  device_cache *c = &caches[device_type];
  int64_t size = round_size(nbytes);
  c->stats.allocs++;
  c->stats.allocated += size;
  unsigned b = bucket_of(size);
  for (block **link = &c->free_lists[b]; *link; link = &(*link)->next) {
    if ((*link)->size != size) continue;
    block *blk = *link;
    *link = blk->next;
    void *p = blk->ptr;
    free(blk);
    c->stats.cached -= size;
    c->stats.cache_hits++;
    c->stats.in_use += size;
    if (c->stats.in_use > c->stats.peak) c->stats.peak = c->stats.in_use;
    return p;
  }
  void *p = aligned_alloc(ALIGNMENT, (size_t)size);
  if (!p && c->stats.cached > 0) {
    release_cached(c, 0);
    p = aligned_alloc(ALIGNMENT, (size_t)size);
  }
  if (!p)
    return pmp_fail("out of memory: cannot allocate %lld bytes on cpu (%lld bytes in use)", (long long)size,
                    (long long)c->stats.in_use);
  c->stats.in_use += size;
  if (c->stats.in_use > c->stats.peak) c->stats.peak = c->stats.in_use;
  return p;
}

void pmp_free(int device_type, void *p, int64_t nbytes) {
  if (!p) return;
  device_cache *c = &caches[device_type];
  int64_t size = round_size(nbytes);
  c->stats.in_use -= size;
  block *blk = size <= c->limit ? malloc(sizeof *blk) : NULL;
  if (!blk) {
    free(p);
    return;
  }
  blk->ptr = p;
  blk->size = size;
  unsigned b = bucket_of(size);
  blk->next = c->free_lists[b];
  c->free_lists[b] = blk;
  c->stats.cached += size;
  if (c->stats.cached > c->limit) release_cached(c, c->limit / 2);
}

const pmp_memory_stats *pmp_memory_stats_of(int device_type) {
  if (device_type < 0 || device_type >= PMP_DEVICE_TYPE_COUNT) return NULL;
  return &caches[device_type].stats;
}

void pmp_memory_reset_peak(int device_type) {
  if (device_type >= 0 && device_type < PMP_DEVICE_TYPE_COUNT)
    caches[device_type].stats.peak = caches[device_type].stats.in_use;
}

void pmp_memory_empty_cache(int device_type) {
  if (device_type >= 0 && device_type < PMP_DEVICE_TYPE_COUNT) release_cached(&caches[device_type], 0);
}

void pmp_memory_set_cache_limit(int device_type, int64_t bytes) {
  if (device_type < 0 || device_type >= PMP_DEVICE_TYPE_COUNT) return;
  caches[device_type].limit = bytes < 0 ? 0 : bytes;
  release_cached(&caches[device_type], caches[device_type].limit);
}
