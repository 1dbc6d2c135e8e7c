/* The op profiler behind pmp_profile_*: pmp_dispatch asks pmp_profile_begin for a start time and
 * hands it back to pmp_profile_end. Off, it costs one branch per op. */
#include "internal.h"
#include <time.h>

static bool enabled;
static int64_t calls[PMP_OP_COUNT], nanoseconds[PMP_OP_COUNT];

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

void pmp_profile_enable(int on) { enabled = on != 0; }

void pmp_profile_reset(void) {
  memset(calls, 0, sizeof calls);
  memset(nanoseconds, 0, sizeof nanoseconds);
}

void pmp_profile_read(int op, int64_t *n, int64_t *ns) {
  bool known = op >= 0 && op < PMP_OP_COUNT;
  *n = known ? calls[op] : 0;
  *ns = known ? nanoseconds[op] : 0;
}

int64_t pmp_profile_begin(void) { return enabled ? now_ns() : 0; }

/* Plain counters: ops are issued by the one host thread (the communication thread runs no ops). */
void pmp_profile_end(int op, int64_t start) {
  if (!enabled || start == 0) return;
  int64_t t = now_ns() - start;
  calls[op]++;
  nanoseconds[op] += t;
}
