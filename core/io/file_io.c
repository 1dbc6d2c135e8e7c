/* File-system helpers for the Lua library: durable writes (write, fsync, rename, fsync the directory),
 * directory trees, and read-only file mappings whose views are tensors.
 *
 * Every function reports failure through pmp_last_error() with the path and the system's reason, so
 * Lua can raise an error that names the file. Nothing here aborts on a bad path or a bad file.
 */
#include "internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef O_CLOEXEC
#define O_CLOEXEC 0
#endif

int pmp_getpid(void) { return (int)getpid(); }

int pmp_process_alive(int pid) {
  if (pid <= 0) return 0;
  /* signal 0 checks existence only; EPERM means it exists under another user */
  return kill((pid_t)pid, 0) == 0 || errno != ESRCH;
}

/* ---- plain files ---- */

int pmp_file_open_write(const char *path) {
  int fd;
  do fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  while (fd < 0 && errno == EINTR);
  if (fd < 0) return pmp_fail_code("cannot open %s for writing: %s", path, strerror(errno));
  return fd;
}

int pmp_file_write(int fd, const void *data, int64_t nbytes, const char *path) {
  const char *p = data;
  if (nbytes < 0) return pmp_fail_code("write to %s: negative byte count %lld", path, (long long)nbytes);
  while (nbytes > 0) {
    size_t chunk = nbytes > (int64_t)1 << 30 ? (size_t)1 << 30 : (size_t)nbytes;
    ssize_t n = write(fd, p, chunk);
    if (n < 0) {
      if (errno == EINTR) continue;
      return pmp_fail_code("write to %s failed: %s", path, strerror(errno));
    }
    if (n == 0) return pmp_fail_code("write to %s failed: no progress", path);
    p += n;
    nbytes -= n;
  }
  return 0;
}

/* Writes t's elements in row-major order in t's own dtype. Non-contiguous tensors go through a
 * contiguous copy; tensors on other devices must be brought to the CPU by the caller. */
int pmp_file_write_tensor(int fd, pmp_tensor *t, const char *path) {
  if (t->dev.type != PMP_CPU) return pmp_fail_code("write to %s: the tensor is not on the cpu", path);
  int64_t nbytes = pmp_numel(t) * pmp_dtype_size(t->dtype_id);
  if (nbytes == 0) return 0;
  if (pmp_is_contiguous(t)) return pmp_file_write(fd, t->data, nbytes, path);
  pmp_tensor *c = pmp_contiguous(t);
  if (!c) return -1;
  int rc = pmp_file_write(fd, c->data, nbytes, path);
  pmp_tensor_release(c);
  return rc;
}

int pmp_file_write_tensor_as(int fd, pmp_tensor *t, int dtype, const char *path) {
  if (!pmp_dtype_valid(dtype)) return pmp_fail_code("write to %s: unknown dtype %d", path, dtype);
  if (dtype == t->dtype_id) return pmp_file_write_tensor(fd, t, path);
  if (t->dev.type != PMP_CPU) return pmp_fail_code("write to %s: the tensor is not on the cpu", path);
  if (!pmp_is_contiguous(t)) {
    pmp_tensor *c = pmp_empty_like(t, dtype);
    int rc = c ? pmp_copy_into(c, t) : -1;
    if (rc == 0) rc = pmp_file_write_tensor(fd, c, path);
    pmp_tensor_release(c);
    return rc;
  }
  enum { CHUNK = 1 << 20 };   /* elements per conversion: a few MiB of buffer */
  int in_size = pmp_dtype_size(t->dtype_id), out_size = pmp_dtype_size(dtype);
  int64_t n = pmp_numel(t);
  char *buffer = malloc((size_t)(n < CHUNK ? n : CHUNK) * (size_t)out_size + 1);
  if (!buffer) return pmp_fail_code("write to %s: out of memory for a conversion buffer", path);
  int rc = 0;
  for (int64_t k = 0; k < n && rc == 0; k += CHUNK) {
    int64_t count = n - k < CHUNK ? n - k : CHUNK;
    pmp_convert(buffer, dtype, t->data + k * in_size, t->dtype_id, count);
    rc = pmp_file_write(fd, buffer, count * out_size, path);
  }
  free(buffer);
  return rc;
}

int pmp_file_sync_close(int fd, const char *path) {
  int rc = 0;
  if (fsync(fd) != 0 && errno != EINVAL && errno != EROFS) {
    rc = pmp_fail_code("fsync of %s failed: %s", path, strerror(errno));
  }
  if (close(fd) != 0 && rc == 0 && errno != EINTR) {
    rc = pmp_fail_code("close of %s failed: %s", path, strerror(errno));
  }
  return rc;
}

void pmp_file_close(int fd) {
  if (fd >= 0) close(fd);
}

int pmp_file_rename(const char *from, const char *to) {
  if (rename(from, to) != 0) return pmp_fail_code("cannot rename %s to %s: %s", from, to, strerror(errno));
  return 0;
}

/* Swaps two paths atomically where the system can (Linux renameat2 RENAME_EXCHANGE). Returns 0 when
 * swapped, 1 when the system or file system cannot do it (the caller falls back), -1 on other errors. */
int pmp_file_exchange(const char *a, const char *b) {
#if defined(__linux__) && defined(RENAME_EXCHANGE)
  if (renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) == 0) return 0;
  if (errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP) return 1;
  return pmp_fail_code("cannot exchange %s and %s: %s", a, b, strerror(errno));
#else
  (void)a;
  (void)b;
  return 1;
#endif
}

static int sync_path(const char *path, int flags) {
  int fd;
  do fd = open(path, flags | O_CLOEXEC);
  while (fd < 0 && errno == EINTR);
  if (fd < 0) return pmp_fail_code("cannot open %s to sync it: %s", path, strerror(errno));
  int rc = 0;
  /* Some file systems cannot fsync a directory (EINVAL); that is not a failure of the write. */
  if (fsync(fd) != 0 && errno != EINVAL && errno != EROFS && errno != EBADF)
    rc = pmp_fail_code("fsync of %s failed: %s", path, strerror(errno));
  close(fd);
  return rc;
}

int pmp_file_sync_dir(const char *dir) {
#ifdef O_DIRECTORY
  return sync_path(dir, O_RDONLY | O_DIRECTORY);
#else
  return sync_path(dir, O_RDONLY);
#endif
}

int pmp_file_remove(const char *path) {
  if (unlink(path) != 0 && errno != ENOENT) return pmp_fail_code("cannot remove %s: %s", path, strerror(errno));
  return 0;
}

/* 0: nothing there, 1: regular file, 2: directory, 3: something else; -1 when stat fails otherwise.
 * Symbolic links are followed. */
int pmp_file_kind(const char *path) {
  struct stat st;
  if (stat(path, &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) return 0;
    return pmp_fail_code("cannot stat %s: %s", path, strerror(errno));
  }
  if (S_ISREG(st.st_mode)) return 1;
  if (S_ISDIR(st.st_mode)) return 2;
  return 3;
}

int64_t pmp_file_size(const char *path) {
  struct stat st;
  if (stat(path, &st) != 0) return pmp_fail_code("cannot stat %s: %s", path, strerror(errno));
  return (int64_t)st.st_size;
}

/* 0 created, 1 already a directory, -1 error (including "exists but is not a directory"). */
int pmp_file_mkdir(const char *path) {
  if (mkdir(path, 0777) == 0) return 0;
  int err = errno;
  if (err == EEXIST) {
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) return 1;
    return pmp_fail_code("cannot create directory %s: it exists and is not a directory", path);
  }
  return pmp_fail_code("cannot create directory %s: %s", path, strerror(err));
}

/* ---- directory listing ---- */

struct pmp_dir {
  DIR *dir;
};

pmp_dir *pmp_dir_open(const char *path) {
  DIR *d = opendir(path);
  if (!d) return pmp_fail("cannot list directory %s: %s", path, strerror(errno));
  pmp_dir *h = malloc(sizeof *h);
  if (!h) {
    closedir(d);
    return pmp_fail("out of memory listing %s", path);
  }
  h->dir = d;
  return h;
}

/* The next entry's name (never "." or ".."), or NULL at the end. */
const char *pmp_dir_next(pmp_dir *h) {
  if (!h || !h->dir) return NULL;
  for (;;) {
    struct dirent *e = readdir(h->dir);
    if (!e) return NULL;
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
    return e->d_name;
  }
}

void pmp_dir_close(pmp_dir *h) {
  if (!h) return;
  if (h->dir) closedir(h->dir);
  free(h);
}

/* ---- trees ---- */

static char *join_path(const char *dir, const char *name) {
  size_t a = strlen(dir), b = strlen(name);
  char *p = malloc(a + b + 2);
  if (!p) return NULL;
  memcpy(p, dir, a);
  p[a] = '/';
  memcpy(p + a + 1, name, b + 1);
  return p;
}

/* Calls visit(child) for each entry of the directory except . and .., stopping at the first failure. */
static int for_each_child(const char *path, int (*visit)(const char *), const char *doing) {
  DIR *d = opendir(path);
  if (!d) return pmp_fail_code("cannot list directory %s: %s", path, strerror(errno));
  int rc = 0;
  struct dirent *e;
  while (rc == 0 && (e = readdir(d)) != NULL) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
    char *child = join_path(path, e->d_name);
    if (!child) {
      rc = pmp_fail_code("out of memory %s %s", doing, path);
      break;
    }
    rc = visit(child);
    free(child);
  }
  closedir(d);
  return rc;
}

/* Removes path and everything under it; symbolic links are removed, never followed. A missing path
 * is not an error. */
int pmp_file_remove_tree(const char *path) {
  struct stat st;
  if (lstat(path, &st) != 0) {
    if (errno == ENOENT) return 0;
    return pmp_fail_code("cannot stat %s: %s", path, strerror(errno));
  }
  if (!S_ISDIR(st.st_mode)) return pmp_file_remove(path);
  int rc = for_each_child(path, pmp_file_remove_tree, "removing");
  if (rc != 0) return rc;
  if (rmdir(path) != 0 && errno != ENOENT) return pmp_fail_code("cannot remove directory %s: %s", path, strerror(errno));
  return 0;
}

/* fsyncs every regular file and directory under path (path included), without following links. */
int pmp_file_sync_tree(const char *path) {
  struct stat st;
  if (lstat(path, &st) != 0) return pmp_fail_code("cannot stat %s: %s", path, strerror(errno));
  if (S_ISREG(st.st_mode)) return sync_path(path, O_RDONLY);
  if (!S_ISDIR(st.st_mode)) return 0;
  int rc = for_each_child(path, pmp_file_sync_tree, "syncing");
  if (rc != 0) return rc;
  return pmp_file_sync_dir(path);
}

/* ---- file mappings ---- */

/* A whole file mapped copy-on-write: tensors viewing it may be written in place (the file never
 * changes). Reference-counted: the loader holds one reference and every tensor view holds one; the
 * mapping goes when the last is released. */
struct pmp_mapping {
  char *data;
  int64_t nbytes;
  atomic_int refcount;
  int watch_slot;   /* its entry in `watched`, -1 if none was free */
};

static atomic_int live_mappings;

/* A file that shrinks while mapped makes reads past its new end fault with SIGBUS, which would end the
 * process with a bare "Bus error". The mapped ranges are kept here so the handler can name the file and
 * say what happened; the faulting read cannot be resumed, so the process then dies of the signal as it
 * would have. The handler only reads the table (without the lock: slots are published by their begin). */
enum { WATCHED_MAPPINGS = 1024, WATCHED_PATH = 512 };
typedef struct {
  _Atomic(uintptr_t) begin;
  uintptr_t end;
  char path[WATCHED_PATH];
} watched_mapping;
static watched_mapping watched[WATCHED_MAPPINGS];
static pthread_mutex_t watched_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction sigbus_before;
static bool sigbus_installed;

static void say(const char *text) {
  ssize_t unused = write(2, text, strlen(text));
  (void)unused;
}

static void on_sigbus(int signal_number, siginfo_t *info, void *context) {
  (void)context;
  uintptr_t address = (uintptr_t)info->si_addr;
  for (int k = 0; k < WATCHED_MAPPINGS; k++) {
    uintptr_t begin = atomic_load(&watched[k].begin);
    if (begin && address >= begin && address < watched[k].end) {
      say("pmp: fatal: ");
      say(watched[k].path);
      say(" shrank while memory-mapped (truncated or rewritten in place after it was loaded): tensors viewing it "
          "lost their data. Replace model files by writing a new file and renaming it, or load with copies "
          "(pmp.models.from_pretrained without mmap = true; pmp.safetensors.load with copy = true).\n");
      break;
    }
  }
  /* back to the previous action; returning re-runs the read, which faults again under it */
  sigaction(signal_number, &sigbus_before, NULL);
}

static void watch_mapping(pmp_mapping *m, const char *path) {
  m->watch_slot = -1;
  pthread_mutex_lock(&watched_lock);
  if (!sigbus_installed) {
    struct sigaction action = {0};
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    sigbus_installed = sigaction(SIGBUS, &action, &sigbus_before) == 0;
  }
  for (int k = 0; k < WATCHED_MAPPINGS; k++) {
    if (atomic_load(&watched[k].begin) == 0) {
      snprintf(watched[k].path, WATCHED_PATH, "%s", path);
      watched[k].end = (uintptr_t)m->data + (uintptr_t)m->nbytes;
      atomic_store(&watched[k].begin, (uintptr_t)m->data);
      m->watch_slot = k;
      break;
    }
  }
  pthread_mutex_unlock(&watched_lock);
}

static void unwatch_mapping(pmp_mapping *m) {
  if (m->watch_slot < 0) return;
  pthread_mutex_lock(&watched_lock);
  atomic_store(&watched[m->watch_slot].begin, 0);
  pthread_mutex_unlock(&watched_lock);
}

pmp_mapping *pmp_map_file(const char *path) {
  int fd;
  do fd = open(path, O_RDONLY | O_CLOEXEC);
  while (fd < 0 && errno == EINTR);
  if (fd < 0) return pmp_fail("cannot open %s: %s", path, strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int err = errno;
    close(fd);
    return pmp_fail("cannot stat %s: %s", path, strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return pmp_fail("cannot map %s: not a regular file", path);
  }
  pmp_mapping *m = calloc(1, sizeof *m);
  if (!m) {
    close(fd);
    return pmp_fail("out of memory mapping %s", path);
  }
  m->nbytes = (int64_t)st.st_size;
  if (m->nbytes > 0) {
    /* Private and writable: in-place writes to a loaded tensor copy the page instead of faulting. */
    void *p = mmap(NULL, (size_t)m->nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) p = mmap(NULL, (size_t)m->nbytes, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      close(fd);
      free(m);
      return pmp_fail("cannot map %s (%lld bytes): %s", path, (long long)st.st_size, strerror(err));
    }
    m->data = p;
    watch_mapping(m, path);
  } else {
    m->watch_slot = -1;
  }
  close(fd);
  atomic_init(&m->refcount, 1);
  atomic_fetch_add(&live_mappings, 1);
  return m;
}

const char *pmp_mapping_data(const pmp_mapping *m) { return m ? m->data : NULL; }
int64_t pmp_mapping_size(const pmp_mapping *m) { return m ? m->nbytes : 0; }
int pmp_mapping_live_count(void) { return atomic_load(&live_mappings); }

void pmp_mapping_release(pmp_mapping *m) {
  if (!m) return;
  if (atomic_fetch_sub(&m->refcount, 1) != 1) return;
  if (m->data) {
    unwatch_mapping(m);
    munmap(m->data, (size_t)m->nbytes);
  }
  free(m);
  atomic_fetch_sub(&live_mappings, 1);
}

static void release_mapping_ctx(void *ctx) { pmp_mapping_release(ctx); }

/* A contiguous tensor over bytes [offset, offset + numel * size) of the mapping, holding a reference
 * to it. Fails (no crash) if the range is outside the file. */
pmp_tensor *pmp_mapping_tensor(pmp_mapping *m, int64_t offset, int dtype, const int64_t *shape, int ndim) {
  if (!m) return pmp_fail("mapping_tensor: no mapping");
  if (!pmp_dtype_valid(dtype)) return pmp_fail("mapping_tensor: unknown dtype %d", dtype);
  if (ndim < 0 || ndim > PMP_MAX_DIMS) return pmp_fail("mapping_tensor: %d dims (at most %d)", ndim, PMP_MAX_DIMS);
  int64_t numel = 1;
  for (int d = 0; d < ndim; d++) {
    if (shape[d] < 0) return pmp_fail("mapping_tensor: negative size %lld", (long long)shape[d]);
    if (shape[d] != 0 && numel > INT64_MAX / 16 / shape[d])
      return pmp_fail("mapping_tensor: shape too large");
    numel *= shape[d];
  }
  int64_t nbytes = numel * pmp_dtype_size(dtype);
  if (offset < 0 || offset > m->nbytes || nbytes > m->nbytes - offset)
    return pmp_fail("mapping_tensor: bytes [%lld, %lld) are outside the %lld-byte file", (long long)offset,
                    (long long)(offset + nbytes), (long long)m->nbytes);
  atomic_fetch_add(&m->refcount, 1);
  pmp_device cpu = {PMP_CPU, 0};
  pmp_tensor *t = pmp_from_external(m->data ? m->data + offset : NULL, nbytes, dtype, shape, ndim, cpu,
                                    release_mapping_ctx, m);
  if (!t) pmp_mapping_release(m);
  return t;
}

int pmp_mapping_drop_pages(pmp_tensor *t) {
  if (!t || !t->storage || t->storage->release != release_mapping_ctx || !pmp_is_contiguous(t)) return 0;
  uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
  uintptr_t begin = ((uintptr_t)t->data + page - 1) / page * page;
  uintptr_t end = ((uintptr_t)t->data + (uintptr_t)(pmp_numel(t) * pmp_dtype_size(t->dtype_id))) / page * page;
  if (end <= begin) return 0;
  /* MADV_DONTNEED on a private file mapping: unwritten pages simply go; the file is untouched. */
  if (madvise((void *)begin, end - begin, MADV_DONTNEED) != 0)
    return pmp_fail_code("madvise of a mapped tensor failed: %s", strerror(errno));
  return 0;
}
