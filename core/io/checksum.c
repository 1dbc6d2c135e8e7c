/* CRC32C (Castagnoli) of a file's bytes: the per-file checksum checkpoints record and verify on load,
 * so a block zeroed or flipped on disk is found before its tensors are used. The SSE4.2 crc32
 * instruction computes it where the CPU has one (about 8 bytes a cycle); elsewhere a table does, with
 * the same result. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#ifndef O_CLOEXEC
#define O_CLOEXEC 0
#endif

#define CRC32C_POLY_REFLECTED 0x82F63B78u

static uint32_t crc_table[256];

static void build_table(void) {
  for (uint32_t b = 0; b < 256; b++) {
    uint32_t c = b;
    for (int k = 0; k < 8; k++) c = (c >> 1) ^ (CRC32C_POLY_REFLECTED & (0u - (c & 1u)));
    crc_table[b] = c;
  }
}

static uint32_t crc_by_table(uint32_t crc, const unsigned char *p, size_t n) {
  while (n--) crc = crc_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc_by_instruction(uint32_t crc, const unsigned char *p, size_t n) {
  uint64_t c = crc;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t word;
    memcpy(&word, p, 8);
    c = __builtin_ia32_crc32di(c, word);
  }
  crc = (uint32_t)c;
  while (n--) crc = __builtin_ia32_crc32qi(crc, *p++);
  return crc;
}
#endif

static uint32_t (*crc_update)(uint32_t, const unsigned char *, size_t);

static void choose_implementation(void) {
  build_table();
  crc_update = crc_by_table;
#if defined(__x86_64__)
  if (__builtin_cpu_supports("sse4.2")) crc_update = crc_by_instruction;
#endif
}

uint32_t pmp_crc32c(uint32_t crc, const void *data, int64_t nbytes) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, choose_implementation);
  return ~crc_update(~crc, data, nbytes > 0 ? (size_t)nbytes : 0);
}

int pmp_file_crc32c(const char *path, uint32_t *out) {
  int fd;
  do fd = open(path, O_RDONLY | O_CLOEXEC);
  while (fd < 0 && errno == EINTR);
  if (fd < 0) return pmp_fail_code("cannot open %s: %s", path, strerror(errno));
  enum { CHUNK = 1 << 20 };
  unsigned char *buffer = malloc(CHUNK);
  if (!buffer) {
    close(fd);
    return pmp_fail_code("checksum of %s: out of memory", path);
  }
  uint32_t crc = 0;
  int rc = 0;
  for (;;) {
    ssize_t n = read(fd, buffer, CHUNK);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      rc = pmp_fail_code("cannot read %s: %s", path, strerror(errno));
      break;
    }
    if (n == 0) break;
    crc = pmp_crc32c(crc, buffer, n);
  }
  free(buffer);
  close(fd);
  if (rc == 0) *out = crc;
  return rc;
}
