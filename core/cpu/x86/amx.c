/* Whether this process may run AMX tile instructions (see amx.h). */
#include "internal.h"
#include "cpu/x86/amx.h"
#include <stdlib.h>
#include <string.h>

#ifdef PMP_HAVE_AMX
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

/* AMX needs the CPU bits and the kernel's permission (arch_prctl ARCH_REQ_XCOMP_PERM for
 * XFEATURE_XTILEDATA) before the first tile instruction. */
static bool amx_check(void) {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  bool tiles = (d >> 24 & 1) && (d >> 22 & 1);
  if (!tiles || !__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512dq") || !__builtin_cpu_supports("avx512vl") ||
      !__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("fma"))
    return false;
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

static bool amx_usable(void) {
  static int state = -1;   /* -1 unknown, 0 no, 1 yes; checking twice is harmless */
  int s = __atomic_load_n(&state, __ATOMIC_ACQUIRE);
  if (s < 0) {
    s = amx_check();
    __atomic_store_n(&state, s, __ATOMIC_RELEASE);
  }
  return s == 1;
}

bool pmp_amx_enabled(const char *off) { return !pmp_env_switch(off) && amx_usable(); }
#endif
