/* Collectives between processes: communicators and ring algorithms over MPI point-to-point messages.
 *
 * Why our own rings instead of MPI_Allreduce and friends:
 *  - every message goes through one place, so the bytes a rank sends are measured, not estimated;
 *  - bf16/f16 reduce natively (MPI has no such types);
 *  - each collective first swaps a small header with its ring neighbours, so ranks that issued different
 *    collectives (another op, size or dtype) fail at once with a message naming both sides, and a peer
 *    that never answers fails after a timeout instead of hanging the job.
 *
 * One worker thread per process owns MPI after initialisation. The caller queues requests and waits on
 * them (pmp_dist_wait), so every op is non-blocking to the caller and overlaps with its compute.
 * Collectives run one at a time in queue order (all ranks of a communicator issue them in the same
 * order); send/recv are posted at once and completed while collectives progress, so a pipeline's
 * send-then-receive pattern cannot deadlock behind a collective.
 *
 * Without an MPI launcher (plain `pmp script.lua`) the world is this one process and every collective
 * is a local copy: the same training script runs both ways. */
#include "internal.h"
#include <mpi.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <time.h>

enum { KIND_ALL_REDUCE, KIND_ALL_GATHER, KIND_REDUCE_SCATTER, KIND_BROADCAST, KIND_SEND, KIND_RECV,
       KIND_BARRIER, KIND_SPLIT, KIND_ALL_TO_ALL };
static const char *kind_names[] = {"all_reduce", "all_gather", "reduce_scatter", "broadcast", "send", "recv",
                                   "barrier", "split", "all_to_all"};
static const char *reduce_names[] = {"sum", "avg", "max", "min"};

/* Tags on a communicator's private duplicate: collective traffic never matches user send/recv. */
enum { TAG_HEADER = 1, TAG_DATA = 2 };

struct pmp_comm {
  MPI_Comm coll;       /* collectives (ours) */
  MPI_Comm p2p;        /* user send/recv */
  int rank, size;
  int world_rank;      /* this process's rank in the world, for messages */
  int *world_ranks;    /* world rank of each member */
  char name[64];
  int has_mpi_comms;            /* coll and p2p are MPI's (a one-process communicator has none) */
  struct pmp_comm *next_made;   /* every communicator made, for finalize to free */
};

struct pmp_dist_request {
  int kind;
  pmp_comm *comm;
  pmp_tensor *a, *b;         /* all_gather/reduce_scatter: a = out, b = in; otherwise a only */
  int reduce_op, peer, tag;
  int color, key;            /* split */
  char split_name[64];
  pmp_comm *result;          /* split */
  int64_t *counts;           /* all_to_all: elements sent to each rank, then received from each */
  MPI_Request mpi;           /* posted send/recv */
  double posted_at;
  int done, failed;
  char error[768];
  struct pmp_dist_request *next;        /* queue link, then active-p2p link */
};

static struct {
  int initialized, uses_mpi;
  double timeout;
  pmp_comm *world;
  pmp_comm *made;                  /* the world and every split, newest first */
  pthread_t thread;
  pthread_mutex_t lock;
  pthread_cond_t work, finished;
  pmp_dist_request *head, *tail;   /* queued */
  pmp_dist_request *active;        /* posted send/recv (worker only) */
  int stop;
  pmp_dist_stats stats;
} D = {.lock = PTHREAD_MUTEX_INITIALIZER, .work = PTHREAD_COND_INITIALIZER,
       .finished = PTHREAD_COND_INITIALIZER};

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void nap(int polls) {
  /* Spin briefly for latency, then sleep so ranks oversubscribed on few cores leave them to compute. */
  if (polls < 64) return;
  struct timespec ts = {0, polls < 1024 ? 20000 : 200000};
  nanosleep(&ts, NULL);
}

static const char *env_any(const char *const *names) {
  for (; *names; names++) {
    const char *v = getenv(*names);
    if (v && *v) return v;
  }
  return NULL;
}

/* ---- describing ops and failures ---- */

static void describe_where(const pmp_dist_request *r, char *buf, size_t size) {
  const pmp_comm *c = r->comm;
  snprintf(buf, size, "pmp.dist: %s on group '%s' (rank %d of %d, world rank %d)", kind_names[r->kind], c->name,
           c->rank, c->size, c->world_rank);
}

static void fail_request(pmp_dist_request *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail_request(pmp_dist_request *r, const char *fmt, ...) {
  char where[256], what[480];
  describe_where(r, where, sizeof where);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  snprintf(r->error, sizeof r->error, "%s: %s", where, what);
  r->failed = 1;
}

static void fail_mpi(pmp_dist_request *r, int code, const char *call) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  fail_request(r, "%s failed: %s", call, text);
}

/* ---- progress: posted send/recv and waits with a deadline ---- */

static void complete(pmp_dist_request *r) {
  pthread_mutex_lock(&D.lock);
  r->done = 1;
  pthread_cond_broadcast(&D.finished);
  pthread_mutex_unlock(&D.lock);
}

static void progress_p2p(void) {
  pmp_dist_request **link = &D.active;
  while (*link) {
    pmp_dist_request *r = *link;
    int flag = 0;
    int rc = MPI_Test(&r->mpi, &flag, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) {
      fail_mpi(r, rc, r->kind == KIND_SEND ? "MPI_Isend" : "MPI_Irecv");
      flag = 1;
    } else if (!flag && now_seconds() - r->posted_at > D.timeout) {
      fail_request(r, "no matching %s from rank %d (tag %d) within %.0f s: the peer died, hung or issued "
                   "different operations", r->kind == KIND_SEND ? "recv" : "send", r->peer, r->tag, D.timeout);
      flag = 1;
    }
    if (flag) {
      *link = r->next;
      complete(r);
    } else {
      link = &r->next;
    }
  }
}

/* Waits for MPI requests of collective r, advancing posted send/recv meanwhile. */
static int wait_all(pmp_dist_request *r, MPI_Request *reqs, int n, int peer_hint) {
  double start = now_seconds();
  for (int polls = 0;; polls++) {
    int flag = 0;
    int rc = MPI_Testall(n, reqs, &flag, MPI_STATUSES_IGNORE);
    if (rc != MPI_SUCCESS) {
      fail_mpi(r, rc, "MPI_Testall");
      return -1;
    }
    if (flag) return 0;
    progress_p2p();
    if (now_seconds() - start > D.timeout) {
      fail_request(r, "no progress within %.0f s waiting for rank %d: a peer died, hung or issued a different "
                   "collective (set the timeout with pmp.dist.init{timeout=} or PMP_DIST_TIMEOUT)",
                   D.timeout, peer_hint);
      return -1;
    }
    nap(polls);
  }
}

static int exchange(pmp_dist_request *r, const void *sendbuf, int64_t send_bytes, int to, void *recvbuf,
                    int64_t recv_bytes, int from, int tag) {
  MPI_Request reqs[2];
  int n = 0, rc;
  if (recv_bytes > INT32_MAX || send_bytes > INT32_MAX) {
    fail_request(r, "a message of more than 2 GiB; split the tensor");
    return -1;
  }
  if (recvbuf) {
    rc = MPI_Irecv(recvbuf, (int)recv_bytes, MPI_BYTE, from, tag, r->comm->coll, &reqs[n++]);
    if (rc != MPI_SUCCESS) return fail_mpi(r, rc, "MPI_Irecv"), -1;
  }
  if (sendbuf) {
    rc = MPI_Isend(sendbuf, (int)send_bytes, MPI_BYTE, to, tag, r->comm->coll, &reqs[n++]);
    if (rc != MPI_SUCCESS) return fail_mpi(r, rc, "MPI_Isend"), -1;
    D.stats.bytes_sent += send_bytes;
  }
  if (recvbuf) D.stats.bytes_received += recv_bytes;
  return wait_all(r, reqs, n, recvbuf ? from : to);
}

/* ---- headers: ranks agree on what they are doing before moving data ---- */

typedef struct header { int64_t kind, dtype, count, reduce_op, root; } header;

static void header_text(const header *h, char *buf, size_t size) {
  snprintf(buf, size, "%s of %lld %s elements", kind_names[h->kind], (long long)h->count, pmp_dtype_name((int)h->dtype));
  if (h->kind == KIND_ALL_REDUCE || h->kind == KIND_REDUCE_SCATTER) {
    size_t used = strlen(buf);
    snprintf(buf + used, size - used, " (%s)", reduce_names[h->reduce_op]);
  } else if (h->kind == KIND_BROADCAST) {
    size_t used = strlen(buf);
    snprintf(buf + used, size - used, " from rank %lld", (long long)h->root);
  }
}

/* Sends our header to `to` and checks the one from `from`. */
static int check_header(pmp_dist_request *r, const header *mine, int to, int from) {
  header theirs;
  if (exchange(r, mine, sizeof *mine, to, &theirs, sizeof theirs, from, TAG_HEADER) != 0) return -1;
  if (memcmp(mine, &theirs, sizeof theirs) != 0) {
    char a[160], b[160];
    header_text(mine, a, sizeof a);
    header_text(&theirs, b, sizeof b);
    fail_request(r, "mismatched collectives: this rank issued %s, rank %d issued %s", a, from, b);
    return -1;
  }
  return 0;
}

/* ---- reductions on raw buffers ---- */

static void reduce_into(void *dst, const void *src, int64_t n, int dtype, int op) {
#define REDUCE_LOOP(T)                                                                   \
  {                                                                                      \
    T *d = dst;                                                                          \
    const T *s = src;                                                                    \
    if (op == PMP_REDUCE_MAX)                                                            \
      for (int64_t i = 0; i < n; i++) d[i] = s[i] > d[i] ? s[i] : d[i];                  \
    else if (op == PMP_REDUCE_MIN)                                                       \
      for (int64_t i = 0; i < n; i++) d[i] = s[i] < d[i] ? s[i] : d[i];                  \
    else                                                                                 \
      for (int64_t i = 0; i < n; i++) d[i] = (T)(d[i] + s[i]);                           \
    return;                                                                              \
  }
  switch (dtype) {
  case PMP_F64: REDUCE_LOOP(double)
  case PMP_F32: REDUCE_LOOP(float)
  case PMP_I64: REDUCE_LOOP(int64_t)
  case PMP_I32: REDUCE_LOOP(int32_t)
  case PMP_U16: REDUCE_LOOP(uint16_t)
  case PMP_U8: REDUCE_LOOP(uint8_t)
  case PMP_BOOL: {
    uint8_t *d = dst;
    const uint8_t *s = src;
    for (int64_t i = 0; i < n; i++) d[i] = op == PMP_REDUCE_MIN ? (d[i] && s[i]) : (d[i] || s[i]);
    return;
  }
  default: break;
  }
#undef REDUCE_LOOP
  /* bf16 and f16: in f32, rounded back once per step, as NCCL does */
  uint16_t *d = dst;
  const uint16_t *s = src;
  int bf = dtype == PMP_BF16;
  for (int64_t i = 0; i < n; i++) {
    float x = bf ? pmp_bf16_to_f32(d[i]) : pmp_f16_to_f32(d[i]);
    float y = bf ? pmp_bf16_to_f32(s[i]) : pmp_f16_to_f32(s[i]);
    float z = op == PMP_REDUCE_MAX ? (y > x ? y : x) : op == PMP_REDUCE_MIN ? (y < x ? y : x) : x + y;
    d[i] = bf ? pmp_f32_to_bf16(z) : pmp_f32_to_f16(z);
  }
}

static void divide_by(void *data, int64_t n, int dtype, int by) {
  for (int64_t i = 0; i < n; i++) {
    char *p = (char *)data + i * pmp_dtype_size(dtype);
    pmp_store_from_f64(dtype, p, pmp_load_as_f64(dtype, p) / by);
  }
}

/* ---- ring algorithms ---- */

/* Chunk c of a count-element buffer split n ways as evenly as possible. */
static void chunk_range(int64_t count, int n, int c, int64_t *start, int64_t *len) {
  int64_t base = count / n, extra = count % n;
  *start = c * base + (c < extra ? c : extra);
  *len = base + (c < extra ? 1 : 0);
}

/* Afterwards chunk `rank` of buf holds the reduction over all ranks; other chunks hold partial sums. */
static int ring_reduce_scatter(pmp_dist_request *r, char *buf, int64_t count, int dtype, int op) {
  int n = r->comm->size, me = r->comm->rank, right = (me + 1) % n, left = (me + n - 1) % n;
  int esize = pmp_dtype_size(dtype);
  int64_t max_len = count / n + 1;
  char *scratch = malloc((size_t)(max_len * esize));
  if (!scratch) return fail_request(r, "out of memory for a %lld-byte buffer", (long long)(max_len * esize)), -1;
  int rc = 0;
  for (int s = 0; s < n - 1 && rc == 0; s++) {
    int send_chunk = ((me - s - 1) % n + n) % n, recv_chunk = ((me - s - 2) % n + n) % n;
    int64_t s0, sl, r0, rl;
    chunk_range(count, n, send_chunk, &s0, &sl);
    chunk_range(count, n, recv_chunk, &r0, &rl);
    rc = exchange(r, buf + s0 * esize, sl * esize, right, scratch, rl * esize, left, TAG_DATA);
    if (rc == 0) reduce_into(buf + r0 * esize, scratch, rl, dtype, op);
  }
  free(scratch);
  return rc;
}

/* Chunk `rank` of buf is ours; afterwards every chunk is filled. */
static int ring_all_gather(pmp_dist_request *r, char *buf, int64_t count, int esize, int even) {
  int n = r->comm->size, me = r->comm->rank, right = (me + 1) % n, left = (me + n - 1) % n;
  for (int s = 0; s < n - 1; s++) {
    int send_chunk = ((me - s) % n + n) % n, recv_chunk = ((me - s - 1) % n + n) % n;
    int64_t s0, sl, r0, rl;
    if (even) {
      s0 = send_chunk * count, sl = count, r0 = recv_chunk * count, rl = count;
    } else {
      chunk_range(count, n, send_chunk, &s0, &sl);
      chunk_range(count, n, recv_chunk, &r0, &rl);
    }
    if (exchange(r, buf + s0 * esize, sl * esize, right, buf + r0 * esize, rl * esize, left, TAG_DATA) != 0)
      return -1;
  }
  return 0;
}

static int run_all_reduce(pmp_dist_request *r) {
  pmp_tensor *t = r->a;
  int n = r->comm->size, dtype = t->dtype_id;
  int64_t count = pmp_numel(t);
  header h = {KIND_ALL_REDUCE, dtype, count, r->reduce_op, 0};
  int me = r->comm->rank;
  if (check_header(r, &h, (me + 1) % n, (me + n - 1) % n) != 0) return -1;
  int op = r->reduce_op == PMP_REDUCE_AVG ? PMP_REDUCE_SUM : r->reduce_op;
  if (ring_reduce_scatter(r, t->data, count, dtype, op) != 0) return -1;
  if (r->reduce_op == PMP_REDUCE_AVG) {
    int64_t start, len;
    chunk_range(count, n, me, &start, &len);
    divide_by(t->data + start * pmp_dtype_size(dtype), len, dtype, n);
  }
  return ring_all_gather(r, t->data, count, pmp_dtype_size(dtype), 0);
}

static int run_reduce_scatter(pmp_dist_request *r) {
  pmp_tensor *out = r->a, *in = r->b;
  int n = r->comm->size, me = r->comm->rank, dtype = in->dtype_id, esize = pmp_dtype_size(dtype);
  int64_t count = pmp_numel(out);
  header h = {KIND_REDUCE_SCATTER, dtype, count, r->reduce_op, 0};
  if (check_header(r, &h, (me + 1) % n, (me + n - 1) % n) != 0) return -1;
  /* work on a copy: the input stays as the caller gave it */
  char *work = malloc((size_t)(count * n * esize));
  if (!work) return fail_request(r, "out of memory for a %lld-byte buffer", (long long)(count * n * esize)), -1;
  memcpy(work, in->data, (size_t)(count * n * esize));
  int op = r->reduce_op == PMP_REDUCE_AVG ? PMP_REDUCE_SUM : r->reduce_op;
  /* with count*n elements split n ways, chunk c is exactly [c*count, (c+1)*count) */
  int rc = ring_reduce_scatter(r, work, count * n, dtype, op);
  if (rc == 0) {
    memcpy(out->data, work + (int64_t)me * count * esize, (size_t)(count * esize));
    if (r->reduce_op == PMP_REDUCE_AVG) divide_by(out->data, count, dtype, n);
  }
  free(work);
  return rc;
}

static int run_all_gather(pmp_dist_request *r) {
  pmp_tensor *out = r->a, *in = r->b;
  int n = r->comm->size, me = r->comm->rank, esize = pmp_dtype_size(in->dtype_id);
  int64_t count = pmp_numel(in);
  header h = {KIND_ALL_GATHER, in->dtype_id, count, 0, 0};
  if (check_header(r, &h, (me + 1) % n, (me + n - 1) % n) != 0) return -1;
  memcpy(out->data + (int64_t)me * count * esize, in->data, (size_t)(count * esize));
  return ring_all_gather(r, out->data, count, esize, 1);
}

/* Binomial tree from the root: ceil(log2 n) rounds. Headers travel down the same tree. */
static int run_broadcast(pmp_dist_request *r) {
  pmp_tensor *t = r->a;
  int n = r->comm->size, me = r->comm->rank, root = r->peer;
  int64_t bytes = pmp_numel(t) * pmp_dtype_size(t->dtype_id);
  header h = {KIND_BROADCAST, t->dtype_id, pmp_numel(t), 0, root};
  int rel = (me - root + n) % n, mask = 1;
  while (mask < n) {
    if (rel & mask) {   /* receive once from the parent */
      int parent = (rel - mask + root) % n;
      header theirs;
      if (exchange(r, NULL, 0, 0, &theirs, sizeof theirs, parent, TAG_HEADER) != 0) return -1;
      if (memcmp(&h, &theirs, sizeof h) != 0) {
        char a[160], b[160];
        header_text(&h, a, sizeof a);
        header_text(&theirs, b, sizeof b);
        fail_request(r, "mismatched collectives: this rank issued %s, rank %d issued %s", a, parent, b);
        return -1;
      }
      if (exchange(r, NULL, 0, 0, t->data, bytes, parent, TAG_DATA) != 0) return -1;
      break;
    }
    mask <<= 1;
  }
  for (mask >>= 1; mask > 0; mask >>= 1) {
    if (rel + mask < n) {
      int child = (rel + mask + root) % n;
      if (exchange(r, &h, sizeof h, child, NULL, 0, 0, TAG_HEADER) != 0) return -1;
      if (exchange(r, t->data, bytes, child, NULL, 0, 0, TAG_DATA) != 0) return -1;
    }
  }
  return 0;
}

static int run_barrier(pmp_dist_request *r) {
  /* a ring of headers in both directions: nobody leaves before everybody has arrived */
  int n = r->comm->size, me = r->comm->rank;
  header h = {KIND_BARRIER, 0, 0, 0, 0};
  for (int round = 0; round < 2; round++)
    for (int s = 0; s < n - 1; s++)
      if (check_header(r, &h, (me + 1) % n, (me + n - 1) % n) != 0) return -1;
  return 0;
}

/* Pairwise exchanges: in round s each rank sends its part for rank + s and receives from rank - s, so
 * every pair meets once and no rank waits on two peers at a time. */
static int run_all_to_all(pmp_dist_request *r) {
  pmp_tensor *out = r->a, *in = r->b;
  int n = r->comm->size, me = r->comm->rank, esize = pmp_dtype_size(in->dtype_id);
  const int64_t *send = r->counts, *recv = r->counts + n;
  header h = {KIND_ALL_TO_ALL, in->dtype_id, 0, 0, 0};
  if (check_header(r, &h, (me + 1) % n, (me + n - 1) % n) != 0) return -1;
  int64_t *send_at = malloc(sizeof(int64_t) * (size_t)(2 * n));
  if (!send_at) return fail_request(r, "out of memory"), -1;
  int64_t *recv_at = send_at + n;
  send_at[0] = recv_at[0] = 0;
  for (int k = 1; k < n; k++) send_at[k] = send_at[k - 1] + send[k - 1], recv_at[k] = recv_at[k - 1] + recv[k - 1];
  memcpy(out->data + recv_at[me] * esize, in->data + send_at[me] * esize, (size_t)(send[me] * esize));
  int rc = 0;
  for (int s = 1; s < n && rc == 0; s++) {
    int to = (me + s) % n, from = (me + n - s) % n;
    rc = exchange(r, in->data + send_at[to] * esize, send[to] * esize, to, out->data + recv_at[from] * esize,
                  recv[from] * esize, from, TAG_DATA);
  }
  free(send_at);
  return rc;
}

/* Communicators live until pmp_dist_finalize (Lua holds bare pointers to them); each is listed here so
 * finalize can free it. Called by the thread that makes it: the main one for the world, the worker
 * for splits, which the main thread waits on; finalize runs after the worker has stopped. */
static void remember(pmp_comm *c) {
  pthread_mutex_lock(&D.lock);
  c->next_made = D.made;
  D.made = c;
  pthread_mutex_unlock(&D.lock);
}

static pmp_comm *comm_from_mpi(MPI_Comm mpi_comm, const char *name) {
  pmp_comm *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  remember(c);
  c->has_mpi_comms = 1;
  MPI_Comm_dup(mpi_comm, &c->coll);
  MPI_Comm_dup(mpi_comm, &c->p2p);
  MPI_Comm_rank(mpi_comm, &c->rank);
  MPI_Comm_size(mpi_comm, &c->size);
  MPI_Comm_rank(MPI_COMM_WORLD, &c->world_rank);
  c->world_ranks = malloc(sizeof(int) * (size_t)c->size);
  MPI_Allgather(&c->world_rank, 1, MPI_INT, c->world_ranks, 1, MPI_INT, mpi_comm);
  snprintf(c->name, sizeof c->name, "%s", name);
  return c;
}

static int run_split(pmp_dist_request *r) {
  MPI_Comm sub;
  int rc = MPI_Comm_split(r->comm->coll, r->color < 0 ? MPI_UNDEFINED : r->color, r->key, &sub);
  if (rc != MPI_SUCCESS) return fail_mpi(r, rc, "MPI_Comm_split"), -1;
  if (sub == MPI_COMM_NULL) return 0;
  r->result = comm_from_mpi(sub, r->split_name);
  MPI_Comm_free(&sub);
  if (!r->result) return fail_request(r, "out of memory"), -1;
  return 0;
}

static void post_p2p(pmp_dist_request *r) {
  pmp_tensor *t = r->a;
  int64_t bytes = pmp_numel(t) * pmp_dtype_size(t->dtype_id);
  if (bytes > INT32_MAX) {
    fail_request(r, "a message of more than 2 GiB; split the tensor");
    complete(r);
    return;
  }
  int rc;
  if (r->kind == KIND_SEND) {
    rc = MPI_Isend(t->data, (int)bytes, MPI_BYTE, r->peer, r->tag, r->comm->p2p, &r->mpi);
    D.stats.bytes_sent += bytes;
  } else {
    rc = MPI_Irecv(t->data, (int)bytes, MPI_BYTE, r->peer, r->tag, r->comm->p2p, &r->mpi);
    D.stats.bytes_received += bytes;
  }
  if (rc != MPI_SUCCESS) {
    fail_mpi(r, rc, r->kind == KIND_SEND ? "MPI_Isend" : "MPI_Irecv");
    complete(r);
    return;
  }
  r->posted_at = now_seconds();
  r->next = D.active;
  D.active = r;
}

static void run_request(pmp_dist_request *r) {
  if (r->kind == KIND_SEND || r->kind == KIND_RECV) {
    post_p2p(r);
    return;
  }
  double start = now_seconds();
  switch (r->kind) {
  case KIND_ALL_REDUCE: run_all_reduce(r); break;
  case KIND_ALL_GATHER: run_all_gather(r); break;
  case KIND_REDUCE_SCATTER: run_reduce_scatter(r); break;
  case KIND_BROADCAST: run_broadcast(r); break;
  case KIND_BARRIER: run_barrier(r); break;
  case KIND_SPLIT: run_split(r); break;
  case KIND_ALL_TO_ALL: run_all_to_all(r); break;
  }
  double seconds = now_seconds() - start;
  D.stats.busy_seconds += seconds;
  if (r->kind == KIND_ALL_TO_ALL) D.stats.all_to_all_seconds += seconds;
  D.stats.collectives += 1;
  complete(r);
}

static void *worker_main(void *arg) {
  (void)arg;
  for (int idle = 0;; idle++) {
    pthread_mutex_lock(&D.lock);
    while (!D.head && !D.active && !D.stop) pthread_cond_wait(&D.work, &D.lock);
    pmp_dist_request *r = D.head;
    if (r) {
      D.head = r->next;
      if (!D.head) D.tail = NULL;
      r->next = NULL;
    }
    int stop = D.stop && !r && !D.active;
    pthread_mutex_unlock(&D.lock);
    if (stop) return NULL;
    if (r) {
      run_request(r);
      idle = 0;
    } else {
      progress_p2p();
      nap(idle);
    }
  }
}

/* ---- public API ---- */

int pmp_dist_init(double timeout_seconds) {
  if (D.initialized) return 0;
  static const char *const launcher_vars[] = {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", NULL};
  const char *env_timeout = getenv("PMP_DIST_TIMEOUT");
  D.timeout = timeout_seconds > 0 ? timeout_seconds : env_timeout ? atof(env_timeout) : 600;
  if (D.timeout <= 0) D.timeout = 600;
  D.uses_mpi = env_any(launcher_vars) != NULL;
  if (D.uses_mpi) {
    int provided = 0;
    if (MPI_Init_thread(NULL, NULL, MPI_THREAD_MULTIPLE, &provided) != MPI_SUCCESS)
      return pmp_fail_code("pmp.dist.init: MPI_Init_thread failed");
    if (provided < MPI_THREAD_SERIALIZED)
      return pmp_fail_code("pmp.dist.init: this MPI library does not allow calls from a helper thread");
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    D.world = comm_from_mpi(MPI_COMM_WORLD, "world");
    if (pthread_create(&D.thread, NULL, worker_main, NULL) != 0)
      return pmp_fail_code("pmp.dist.init: cannot start the communication thread");
  } else {
    D.world = calloc(1, sizeof *D.world);
    if (!D.world) return pmp_fail_code("pmp.dist.init: out of memory");
    remember(D.world);
    D.world->size = 1;
    D.world->world_ranks = calloc(1, sizeof(int));
    snprintf(D.world->name, sizeof D.world->name, "world");
  }
  D.initialized = 1;
  return 0;
}

int pmp_dist_is_initialized(void) { return D.initialized; }
int pmp_dist_uses_mpi(void) { return D.uses_mpi; }
double pmp_dist_timeout(void) { return D.timeout; }

void pmp_dist_finalize(void) {
  if (!D.initialized) return;
  if (D.uses_mpi) {
    pthread_mutex_lock(&D.lock);
    D.stop = 1;
    pthread_cond_broadcast(&D.work);
    pthread_mutex_unlock(&D.lock);
    pthread_join(D.thread, NULL);
  }
  while (D.made) {
    pmp_comm *c = D.made;
    D.made = c->next_made;
    if (c->has_mpi_comms) {
      MPI_Comm_free(&c->coll);
      MPI_Comm_free(&c->p2p);
    }
    free(c->world_ranks);
    free(c);
  }
  D.world = NULL;
  if (D.uses_mpi) MPI_Finalize();
  D.initialized = 0;
}

pmp_comm *pmp_comm_world(void) {
  if (!D.initialized) return pmp_fail("pmp.dist: not initialized (call pmp.dist.init first)");
  return D.world;
}

int pmp_comm_rank(const pmp_comm *c) { return c->rank; }
int pmp_comm_size(const pmp_comm *c) { return c->size; }
const char *pmp_comm_name(const pmp_comm *c) { return c->name; }
int pmp_comm_world_rank(const pmp_comm *c, int rank) {
  return rank >= 0 && rank < c->size ? c->world_ranks[rank] : -1;
}

static pmp_dist_request *new_request(int kind, pmp_comm *c, pmp_tensor *a, pmp_tensor *b) {
  pmp_dist_request *r = calloc(1, sizeof *r);
  if (!r) return pmp_fail("pmp.dist.%s: out of memory", kind_names[kind]);
  r->kind = kind;
  r->comm = c;
  r->a = a;
  r->b = b;
  if (a) pmp_tensor_retain(a);
  if (b) pmp_tensor_retain(b);
  return r;
}

static void free_request(pmp_dist_request *r) {
  if (r->a) pmp_tensor_release(r->a);
  if (r->b) pmp_tensor_release(r->b);
  free(r->counts);
  free(r);
}

static pmp_dist_request *submit(pmp_dist_request *r) {
  if (!D.uses_mpi || r->comm->size == 1) {
    r->done = 1;      /* a group of one: the caller's local work was all there is */
    return r;
  }
  pthread_mutex_lock(&D.lock);
  if (D.tail) D.tail->next = r;
  else D.head = r;
  D.tail = r;
  pthread_cond_signal(&D.work);
  pthread_mutex_unlock(&D.lock);
  return r;
}

static bool check_tensor(pmp_comm *c, const pmp_tensor *t, const char *op, const char *role) {
  if (!c) return pmp_fail("pmp.dist.%s: no communicator", op), false;
  if (!D.initialized) return pmp_fail("pmp.dist.%s: not initialized (call pmp.dist.init first)", op), false;
  if (!t) return pmp_fail("pmp.dist.%s: no %s tensor", op, role), false;
  if (t->dev.type != PMP_CPU)
    return pmp_fail("pmp.dist.%s on group '%s': the %s tensor is on a CUDA device; the MPI backend moves cpu "
                    "tensors", op, c->name, role), false;
  if (!pmp_is_contiguous(t))
    return pmp_fail("pmp.dist.%s on group '%s': the %s tensor must be contiguous", op, c->name, role), false;
  return true;
}

static bool check_reduce_op(pmp_comm *c, int op, int dtype, const char *name) {
  if (op < 0 || op > PMP_REDUCE_MIN) return pmp_fail("pmp.dist.%s on group '%s': unknown reduction %d", name, c->name, op), false;
  if (op == PMP_REDUCE_AVG && !pmp_dtype_is_float(dtype))
    return pmp_fail("pmp.dist.%s on group '%s': avg needs a floating dtype, got %s", name, c->name,
                    pmp_dtype_name(dtype)), false;
  return true;
}

pmp_dist_request *pmp_all_reduce_start(pmp_comm *c, pmp_tensor *t, int op) {
  if (!check_tensor(c, t, "all_reduce", "") || !check_reduce_op(c, op, t->dtype_id, "all_reduce")) return NULL;
  pmp_dist_request *r = new_request(KIND_ALL_REDUCE, c, t, NULL);
  if (!r) return NULL;
  r->reduce_op = op;
  return submit(r);
}

pmp_dist_request *pmp_all_gather_start(pmp_comm *c, pmp_tensor *out, pmp_tensor *in) {
  if (!check_tensor(c, out, "all_gather", "output") || !check_tensor(c, in, "all_gather", "input")) return NULL;
  if (out->dtype_id != in->dtype_id || pmp_numel(out) != pmp_numel(in) * c->size)
    return pmp_fail("pmp.dist.all_gather on group '%s': the output must hold %d x %lld %s elements, it has "
                    "%lld %s", c->name, c->size, (long long)pmp_numel(in), pmp_dtype_name(in->dtype_id),
                    (long long)pmp_numel(out), pmp_dtype_name(out->dtype_id));
  pmp_dist_request *r = new_request(KIND_ALL_GATHER, c, out, in);
  if (!r) return NULL;
  if (c->size == 1 || !D.uses_mpi) memcpy(out->data, in->data, (size_t)(pmp_numel(in) * pmp_dtype_size(in->dtype_id)));
  return submit(r);
}

pmp_dist_request *pmp_reduce_scatter_start(pmp_comm *c, pmp_tensor *out, pmp_tensor *in, int op) {
  if (!check_tensor(c, out, "reduce_scatter", "output") || !check_tensor(c, in, "reduce_scatter", "input") ||
      !check_reduce_op(c, op, in->dtype_id, "reduce_scatter"))
    return NULL;
  if (out->dtype_id != in->dtype_id || pmp_numel(out) * c->size != pmp_numel(in))
    return pmp_fail("pmp.dist.reduce_scatter on group '%s': the input must hold %d x %lld %s elements (the "
                    "output's count times the group size), it has %lld %s", c->name, c->size,
                    (long long)pmp_numel(out), pmp_dtype_name(out->dtype_id), (long long)pmp_numel(in),
                    pmp_dtype_name(in->dtype_id));
  pmp_dist_request *r = new_request(KIND_REDUCE_SCATTER, c, out, in);
  if (!r) return NULL;
  r->reduce_op = op;
  if (c->size == 1 || !D.uses_mpi) memcpy(out->data, in->data, (size_t)(pmp_numel(in) * pmp_dtype_size(in->dtype_id)));
  return submit(r);
}

pmp_dist_request *pmp_all_to_all_start(pmp_comm *c, pmp_tensor *out, pmp_tensor *in, const int64_t *send_counts,
                                       const int64_t *recv_counts) {
  if (!check_tensor(c, out, "all_to_all", "output") || !check_tensor(c, in, "all_to_all", "input")) return NULL;
  int64_t sent = 0, received = 0;
  for (int k = 0; k < c->size; k++) {
    if (send_counts[k] < 0 || recv_counts[k] < 0)
      return pmp_fail("pmp.dist.all_to_all on group '%s': negative count for rank %d", c->name, k);
    sent += send_counts[k];
    received += recv_counts[k];
  }
  if (out->dtype_id != in->dtype_id || pmp_numel(in) != sent || pmp_numel(out) != received)
    return pmp_fail("pmp.dist.all_to_all on group '%s': the counts send %lld and receive %lld elements, but the input "
                    "holds %lld %s and the output %lld %s", c->name, (long long)sent, (long long)received,
                    (long long)pmp_numel(in), pmp_dtype_name(in->dtype_id), (long long)pmp_numel(out),
                    pmp_dtype_name(out->dtype_id));
  if (c->size == 1 || !D.uses_mpi) {
    if (sent != received)
      return pmp_fail("pmp.dist.all_to_all on group '%s' of one: sends %lld elements to itself but receives %lld",
                      c->name, (long long)sent, (long long)received);
    memcpy(out->data, in->data, (size_t)(sent * pmp_dtype_size(in->dtype_id)));
  }
  pmp_dist_request *r = new_request(KIND_ALL_TO_ALL, c, out, in);
  if (!r) return NULL;
  r->counts = malloc(sizeof(int64_t) * (size_t)(2 * c->size));
  if (!r->counts) {
    free_request(r);
    return pmp_fail("pmp.dist.all_to_all: out of memory");
  }
  memcpy(r->counts, send_counts, sizeof(int64_t) * (size_t)c->size);
  memcpy(r->counts + c->size, recv_counts, sizeof(int64_t) * (size_t)c->size);
  return submit(r);
}

pmp_dist_request *pmp_broadcast_start(pmp_comm *c, pmp_tensor *t, int root) {
  if (!check_tensor(c, t, "broadcast", "")) return NULL;
  if (root < 0 || root >= c->size)
    return pmp_fail("pmp.dist.broadcast on group '%s': root %d is not a rank of this group of %d", c->name, root,
                    c->size);
  pmp_dist_request *r = new_request(KIND_BROADCAST, c, t, NULL);
  if (!r) return NULL;
  r->peer = root;
  return submit(r);
}

static pmp_dist_request *p2p_start(int kind, pmp_comm *c, pmp_tensor *t, int peer, int tag) {
  const char *name = kind_names[kind];
  if (!check_tensor(c, t, name, "")) return NULL;
  if (peer < 0 || peer >= c->size || peer == c->rank)
    return pmp_fail("pmp.dist.%s on group '%s' (rank %d of %d): peer %d is not another rank of this group", name,
                    c->name, c->rank, c->size, peer);
  if (tag < 0) return pmp_fail("pmp.dist.%s: tag must be >= 0, got %d", name, tag);
  pmp_dist_request *r = new_request(kind, c, t, NULL);
  if (!r) return NULL;
  r->peer = peer;
  r->tag = tag;
  return submit(r);
}

pmp_dist_request *pmp_send_start(pmp_comm *c, pmp_tensor *t, int peer, int tag) {
  return p2p_start(KIND_SEND, c, t, peer, tag);
}

pmp_dist_request *pmp_recv_start(pmp_comm *c, pmp_tensor *t, int peer, int tag) {
  return p2p_start(KIND_RECV, c, t, peer, tag);
}

pmp_dist_request *pmp_barrier_start(pmp_comm *c) {
  if (!c) return pmp_fail("pmp.dist.barrier: no communicator");
  pmp_dist_request *r = new_request(KIND_BARRIER, c, NULL, NULL);
  return r ? submit(r) : NULL;
}

int pmp_dist_test(pmp_dist_request *r) {
  pthread_mutex_lock(&D.lock);
  int done = r->done;
  pthread_mutex_unlock(&D.lock);
  return done;
}

int pmp_dist_wait(pmp_dist_request *r) {
  double start = now_seconds();
  pthread_mutex_lock(&D.lock);
  while (!r->done) pthread_cond_wait(&D.finished, &D.lock);
  pthread_mutex_unlock(&D.lock);
  D.stats.wait_seconds += now_seconds() - start;
  int failed = r->failed;
  if (failed) pmp_set_error(r->error);
  free_request(r);
  return failed ? -1 : 0;
}

pmp_comm *pmp_comm_split(pmp_comm *parent, int color, int key, const char *name) {
  if (!parent) return pmp_fail("pmp.dist.split: no communicator");
  if (!D.uses_mpi || parent->size == 1) {
    if (color < 0) return NULL;
    pmp_comm *c = calloc(1, sizeof *c);
    if (!c) return pmp_fail("pmp.dist.split: out of memory");
    remember(c);
    c->size = 1;
    c->world_rank = parent->world_rank;
    c->world_ranks = malloc(sizeof(int));
    c->world_ranks[0] = parent->world_rank;
    snprintf(c->name, sizeof c->name, "%s", name);
    return c;
  }
  pmp_dist_request *r = new_request(KIND_SPLIT, parent, NULL, NULL);
  if (!r) return NULL;
  r->color = color;
  r->key = key;
  snprintf(r->split_name, sizeof r->split_name, "%s", name);
  submit(r);
  pmp_comm *result = NULL;
  pthread_mutex_lock(&D.lock);
  while (!r->done) pthread_cond_wait(&D.finished, &D.lock);
  pthread_mutex_unlock(&D.lock);
  if (r->failed) pmp_set_error(r->error);
  else result = r->result;
  free_request(r);
  return result;
}

const pmp_dist_stats *pmp_dist_stats_get(void) { return &D.stats; }
void pmp_dist_stats_reset(void) { memset(&D.stats, 0, sizeof D.stats); }
