/* Error reporting: a thread-local message describing the last failure, read by Lua to raise it. */
#include "internal.h"
#include <stdarg.h>
#include <stdio.h>

static _Thread_local char last_error[1024];
static volatile int interrupt_requested;

const char *pmp_last_error(void) { return last_error[0] ? last_error : "unknown error"; }

void pmp_clear_error(void) { last_error[0] = 0; }

void pmp_set_error(const char *message) { snprintf(last_error, sizeof last_error, "%s", message); }

static void set_error(const char *fmt, va_list ap) {
  vsnprintf(last_error, sizeof last_error, fmt, ap);
}

void *pmp_fail(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  set_error(fmt, ap);
  va_end(ap);
  return NULL;
}

int pmp_fail_code(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  set_error(fmt, ap);
  va_end(ap);
  return -1;
}

const char *pmp_shape_str(const int64_t *shape, int ndim, char *buf, size_t size) {
  size_t used = (size_t)snprintf(buf, size, "[");
  for (int d = 0; d < ndim && used < size; d++)
    used += (size_t)snprintf(buf + used, size - used, d ? ",%lld" : "%lld", (long long)shape[d]);
  if (used < size) snprintf(buf + used, size - used, "]");
  return buf;
}

/* Called from a signal handler: only touches a volatile int. */
void pmp_request_interrupt(void) { interrupt_requested = 1; }
void pmp_clear_interrupt(void) { interrupt_requested = 0; }

bool pmp_check_interrupt(const char *op) {
  if (!interrupt_requested) return false;
  interrupt_requested = 0;
  pmp_fail("%s: interrupted", op);
  return true;
}
