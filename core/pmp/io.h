/* The C ABI, files: durable writes, directory trees, file mappings, checksums (core/io/).
 * Included through pmp.h, whose conventions hold here; lua/pmp/ffi.lua declares the region between the
 * CDEF markers to LuaJIT, so it holds plain C declarations only. */
#ifndef PMP_IO_H
#define PMP_IO_H

#include <stdint.h>
#include "pmp/tensor.h"

/* PMP_CDEF_BEGIN */

/* ---- files (core/io/file_io.c): durable writes, directory trees, file mappings ----
 * Failures return -1 (or NULL) with pmp_last_error() naming the path and the system's reason. */
int pmp_getpid(void);
int pmp_process_alive(int pid);                 /* 1 while process pid exists (kill(pid, 0) is not ESRCH) */
int pmp_file_open_write(const char *path);      /* create or truncate; returns a descriptor */
int pmp_file_write(int fd, const void *data, int64_t nbytes, const char *path);
/* t's elements in row-major order, in t's dtype (t must be on the cpu) */
int pmp_file_write_tensor(int fd, pmp_tensor *t, const char *path);
/* the same converted to dtype, through at most one temporary of t's elements in dtype (none for a
 * contiguous t: it converts a few MiB at a time) */
int pmp_file_write_tensor_as(int fd, pmp_tensor *t, int dtype, const char *path);
int pmp_file_sync_close(int fd, const char *path);   /* fsync then close; closes even on failure */
void pmp_file_close(int fd);
int pmp_file_rename(const char *from, const char *to);
int pmp_file_exchange(const char *a, const char *b);  /* atomic swap: 0 done, 1 unsupported, -1 error */
int pmp_file_sync_dir(const char *dir);
int pmp_file_sync_tree(const char *path);       /* fsync every file and directory under path */
int pmp_file_remove(const char *path);          /* a missing file is not an error */
int pmp_file_remove_tree(const char *path);     /* rm -r; links are removed, not followed */
int pmp_file_kind(const char *path);            /* 0 missing, 1 file, 2 directory, 3 other, -1 error */
int64_t pmp_file_size(const char *path);
int pmp_file_mkdir(const char *path);           /* 0 created, 1 was already a directory, -1 error */
typedef struct pmp_dir pmp_dir;
pmp_dir *pmp_dir_open(const char *path);
const char *pmp_dir_next(pmp_dir *dir);         /* next name (no "." or ".."), NULL at the end */
void pmp_dir_close(pmp_dir *dir);
/* A whole file mapped copy-on-write (writes to views never reach the file), reference-counted: each
 * tensor made by pmp_mapping_tensor holds a reference, and the file is unmapped with the last one. */
typedef struct pmp_mapping pmp_mapping;
pmp_mapping *pmp_map_file(const char *path);
const char *pmp_mapping_data(const pmp_mapping *m);
int64_t pmp_mapping_size(const pmp_mapping *m);
void pmp_mapping_release(pmp_mapping *m);
int pmp_mapping_live_count(void);               /* mappings not yet unmapped, for tests */
pmp_tensor *pmp_mapping_tensor(pmp_mapping *m, int64_t offset, int dtype, const int64_t *shape, int ndim);
/* Gives back the pages of a mapping that lie wholly inside t's bytes (t: a view made by
 * pmp_mapping_tensor that nothing wrote to, e.g. a source already copied elsewhere): they leave this
 * process's resident memory and are read from the file again if touched. A tensor that is not such a
 * view is left alone. Returns 0, or -1 if the system refused. */
int pmp_mapping_drop_pages(pmp_tensor *t);

/* ---- checksums (core/io/checksum.c): CRC32C (Castagnoli), as iSCSI and ext4 use it ---- */
uint32_t pmp_crc32c(uint32_t crc, const void *data, int64_t nbytes);  /* continues crc (0 to start) */
int pmp_file_crc32c(const char *path, uint32_t *out);                 /* of the whole file's bytes */

/* PMP_CDEF_END */

#endif
