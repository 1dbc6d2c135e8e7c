/* tokenizer_tiktoken.c — tiktoken-format byte-level BPE (Qwen 1's qwen.tiktoken, Llama 3's original
 * tokenizer.model): a ranks file of "base64-token rank" lines, a split regex, and the tiktoken merge
 * rule: within each regex match, repeatedly join the adjacent pair whose joined bytes have the lowest
 * rank (the leftmost of equal ones); a token's id is its rank. Special tokens are cut out by the caller. */
#include "internal.h"
#include <stdio.h>

#define MAX_RANK (1 << 24)

struct pmp_tok_tiktoken {
  pmp_tok_bpe *ranks;          /* bytes -> rank (a pmp_tok_bpe without merges, used as a string table) */
  pmp_tok_regex *split;
  char *bytes;                 /* every token's bytes, back to back */
  size_t bytes_len, bytes_cap;
  int64_t *offset;             /* rank -> start in bytes, -1 when no token has that rank; offset[r+1].. */
  int32_t *length;
  int32_t nranks;              /* one past the highest rank */
  struct tik_part { size_t start; uint32_t rank; } *parts;
  size_t parts_cap;
};

pmp_tok_tiktoken *pmp_tok_tiktoken_new(const char *pattern, int64_t n) {
  pmp_tok_tiktoken *t = calloc(1, sizeof *t);
  if (!t) return pmp_fail("tokenizer: out of memory");
  t->ranks = pmp_tok_bpe_new(0, 0, 0, 0, -1, "", "");
  if (!t->ranks) {
    pmp_tok_tiktoken_free(t);
    return NULL;
  }
  t->split = pmp_tok_regex_new(pattern, n, 0);
  if (!t->split) {
    pmp_tok_tiktoken_free(t);
    return NULL;
  }
  return t;
}

void pmp_tok_tiktoken_free(pmp_tok_tiktoken *t) {
  if (!t) return;
  pmp_tok_bpe_free(t->ranks);
  if (t->split) pmp_tok_regex_free(t->split);
  free(t->bytes);
  free(t->offset);
  free(t->length);
  free(t->parts);
  free(t);
}

static int base64_value(unsigned char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

/* Decodes standard padded base64 (what tiktoken writes) onto t->bytes; returns the length or -1. */
static int64_t base64_append(pmp_tok_tiktoken *t, const unsigned char *s, size_t n, int64_t line) {
  if (n == 0 || n % 4) return pmp_fail_code("line %lld: token '%.*s' is not base64 (length %zu is not a multiple of 4)",
                                            (long long)line, (int)(n < 60 ? n : 60), (const char *)s, n);
  size_t need = t->bytes_len + n / 4 * 3;
  if (need > t->bytes_cap) {
    size_t cap = t->bytes_cap ? t->bytes_cap : 1 << 16;
    while (cap < need) cap *= 2;
    char *b = realloc(t->bytes, cap);
    if (!b) return pmp_fail_code("tokenizer: out of memory");
    t->bytes = b;
    t->bytes_cap = cap;
  }
  size_t o = t->bytes_len;
  for (size_t i = 0; i < n; i += 4) {
    int v[4], pad = 0;
    for (int k = 0; k < 4; k++) {
      unsigned char c = s[i + k];
      if (c == '=' && i + 4 == n && k >= 2 && (k == 3 || s[i + 3] == '=')) {
        v[k] = 0;
        pad++;
      } else if ((v[k] = base64_value(c)) < 0) {
        return pmp_fail_code("line %lld: token '%.*s' is not base64 (character %zu)", (long long)line,
                             (int)(n < 60 ? n : 60), (const char *)s, i + k + 1);
      }
    }
    uint32_t w = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | (uint32_t)v[3];
    t->bytes[o++] = (char)(w >> 16);
    if (pad < 2) t->bytes[o++] = (char)(w >> 8);
    if (pad < 1) t->bytes[o++] = (char)w;
  }
  int64_t len = (int64_t)(o - t->bytes_len);
  return len;
}

/* rank -> (offset, length) of its bytes, growing the table as ranks appear. */
static int set_rank(pmp_tok_tiktoken *t, int32_t rank, size_t start, int64_t len, int64_t line) {
  if (rank >= t->nranks) {
    size_t cap = (size_t)rank + 1 > (size_t)t->nranks * 2 ? (size_t)rank + 1 : (size_t)t->nranks * 2;
    int64_t *off = realloc(t->offset, cap * sizeof *off);
    if (off) t->offset = off;
    int32_t *lens = realloc(t->length, cap * sizeof *lens);
    if (lens) t->length = lens;
    if (!off || !lens) return pmp_fail_code("tokenizer: out of memory");
    for (size_t r = (size_t)t->nranks; r < cap; r++) t->offset[r] = -1;
    t->nranks = (int32_t)cap;
  }
  if (t->offset[rank] >= 0) return pmp_fail_code("line %lld: rank %d is given to a second token", (long long)line, rank);
  t->offset[rank] = (int64_t)start;
  t->length[rank] = (int32_t)len;
  return 0;
}

/* Parses a whole ranks file: one "token rank" per line (blank lines skipped), as tiktoken's
 * load_tiktoken_bpe reads it. Errors name the line. */
int pmp_tok_tiktoken_load(pmp_tok_tiktoken *t, const char *data, int64_t n) {
  const unsigned char *s = (const unsigned char *)data;
  int64_t line = 0;
  int32_t max_rank = -1;
  for (size_t i = 0; i < (size_t)n;) {
    line++;
    size_t end = i;
    while (end < (size_t)n && s[end] != '\n') end++;
    size_t stop = end;
    if (stop > i && s[stop - 1] == '\r') stop--;
    size_t a = i;
    while (a < stop && (s[a] == ' ' || s[a] == '\t')) a++;
    if (a < stop) {
      size_t b = a;
      while (b < stop && s[b] != ' ' && s[b] != '\t') b++;
      size_t c = b;
      while (c < stop && (s[c] == ' ' || s[c] == '\t')) c++;
      size_t d = c;
      int64_t rank = 0;
      while (d < stop && s[d] >= '0' && s[d] <= '9' && rank <= 0x7fffffff) rank = rank * 10 + (s[d++] - '0');
      size_t e = d;
      while (e < stop && (s[e] == ' ' || s[e] == '\t')) e++;
      if (c == b || d == c || e != stop)
        return pmp_fail_code("line %lld: expected 'base64-token rank', got '%.*s'", (long long)line,
                             (int)(stop - i < 80 ? stop - i : 80), (const char *)s + i);
      /* ids index a table; real vocabularies stay far below this */
      if (rank >= MAX_RANK) return pmp_fail_code("line %lld: rank %lld is not below %d", (long long)line, (long long)rank, MAX_RANK);
      size_t start = t->bytes_len;
      int64_t len = base64_append(t, s + a, b - a, line);
      if (len < 0) return -1;
      if (pmp_tok_bpe_lookup(t->ranks, t->bytes + start, len) >= 0)
        return pmp_fail_code("line %lld: token '%.*s' is listed twice", (long long)line, (int)(b - a), (const char *)s + a);
      if (pmp_tok_bpe_add_token(t->ranks, t->bytes + start, len, (int32_t)rank) != 0) return -1;
      if (set_rank(t, (int32_t)rank, start, len, line) != 0) return -1;
      t->bytes_len += (size_t)len;
      if (rank > max_rank) max_rank = (int32_t)rank;
    }
    i = end + 1;
  }
  t->nranks = max_rank + 1;
  for (int b = 0; b < 256; b++) {
    char c = (char)b;
    if (pmp_tok_bpe_lookup(t->ranks, &c, 1) < 0)
      return pmp_fail_code("byte 0x%02X has no rank: tiktoken needs every single byte", b);
  }
  return 0;
}

int32_t pmp_tok_tiktoken_size(const pmp_tok_tiktoken *t) { return t->nranks; }

/* The bytes of the token of a rank (NULL when no token has it). */
const char *pmp_tok_tiktoken_token(const pmp_tok_tiktoken *t, int32_t rank, int64_t *len) {
  if (rank < 0 || rank >= t->nranks || t->offset[rank] < 0) return NULL;
  *len = t->length[rank];
  return t->bytes + t->offset[rank];
}

int32_t pmp_tok_tiktoken_rank(pmp_tok_tiktoken *t, const char *s, int64_t n) { return pmp_tok_bpe_lookup(t->ranks, s, n); }

static inline uint32_t rank_of(pmp_tok_tiktoken *t, const char *s, size_t n) {
  int32_t r = pmp_tok_bpe_lookup(t->ranks, s, (int64_t)n);
  return r < 0 ? UINT32_MAX : (uint32_t)r;
}

/* tiktoken's merge loop over one regex match (parts hold the start of each current token and the
 * rank of it joined with its right neighbour). */
static int byte_pair_encode(pmp_tok_tiktoken *t, const char *s, size_t n, pmp_tok_ids *out) {
  if (n == 1) return pmp_tok_ids_push(out, (int32_t)rank_of(t, s, 1));
  if (n + 1 > t->parts_cap) {
    size_t cap = t->parts_cap ? t->parts_cap : 64;
    while (cap < n + 1) cap *= 2;
    struct tik_part *p = realloc(t->parts, cap * sizeof *p);
    if (!p) return pmp_fail_code("tokenizer: out of memory");
    t->parts = p;
    t->parts_cap = cap;
  }
  struct tik_part *parts = t->parts;
  size_t count = 0;
  for (size_t i = 0; i + 1 < n; i++) parts[count++] = (struct tik_part){i, rank_of(t, s + i, 2)};
  parts[count++] = (struct tik_part){n - 1, UINT32_MAX};
  parts[count++] = (struct tik_part){n, UINT32_MAX};
  for (;;) {
    uint32_t min_rank = UINT32_MAX;
    size_t at = 0;
    for (size_t i = 0; i + 1 < count; i++)
      if (parts[i].rank < min_rank) min_rank = parts[i].rank, at = i;
    if (min_rank == UINT32_MAX) break;
    if (at > 0)
      parts[at - 1].rank = at + 2 < count ? rank_of(t, s + parts[at - 1].start, parts[at + 2].start - parts[at - 1].start)
                                          : UINT32_MAX;
    parts[at].rank = at + 3 < count ? rank_of(t, s + parts[at].start, parts[at + 3].start - parts[at].start) : UINT32_MAX;
    memmove(parts + at + 1, parts + at + 2, (count - at - 2) * sizeof *parts);
    count--;
  }
  for (size_t i = 0; i + 1 < count; i++) {
    uint32_t r = rank_of(t, s + parts[i].start, parts[i + 1].start - parts[i].start);
    if (pmp_tok_ids_push(out, (int32_t)r) != 0) return -1;
  }
  return 0;
}

/* Encodes text that holds no special tokens: every regex match is one token when it has a rank,
 * else it is merged; text between matches is dropped, as tiktoken drops it. */
int pmp_tok_tiktoken_encode_ordinary(pmp_tok_tiktoken *t, const char *s, int64_t n, pmp_tok_ids *out) {
  int64_t from = 0, start, end;
  while (from <= n) {
    int rc = pmp_tok_regex_find(t->split, s, n, from, &start, &end);
    if (rc < 0) return -1;
    if (rc == 0) break;
    if (end == start) {   /* an empty match: step over one character */
      from = end + 1;
      while (from < n && ((unsigned char)s[from] & 0xC0) == 0x80) from++;
      continue;
    }
    int32_t whole = pmp_tok_bpe_lookup(t->ranks, s + start, end - start);
    if (whole >= 0 ? pmp_tok_ids_push(out, whole) : byte_pair_encode(t, s + start, (size_t)(end - start), out)) return -1;
    from = end;
  }
  return 0;
}
