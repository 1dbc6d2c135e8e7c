/* tokenizer_pre.c — pre-tokenization for HF tokenizer.json: the Split / ByteLevel / Metaspace steps
 * with their delimiter behaviours (regexes: tokenizer_regex.c), the added-token matcher (leftmost-longest, with single_word / lstrip / rstrip), and the driver that
 * runs one normalized piece through the steps and the BPE model. */
#include "internal.h"
#include <stdio.h>

int pmp_tok_is_space(int32_t cp);
int pmp_tok_is_word(int32_t cp);
int pmp_tok_byte_to_unicode(int byte);

/* ---- pieces: (start, end, is_match) covering a string, then merged by a delimiter behaviour ---- */

typedef struct {
  int64_t start, end;
  int flag;          /* is_match, later: remove */
} tok_piece;

typedef struct {
  tok_piece *p;
  size_t n, cap;
} piece_vec;

static bool pieces_push(piece_vec *v, int64_t a, int64_t b, int flag) {
  if (v->n == v->cap) {
    size_t cap = v->cap ? v->cap * 2 : 64;
    tok_piece *p = realloc(v->p, cap * sizeof *p);
    if (!p) return false;
    v->p = p;
    v->cap = cap;
  }
  v->p[v->n++] = (tok_piece){a, b, flag};
  return true;
}

static inline size_t char_len_at(const char *s, int64_t i, int64_t n) {
  unsigned char c = (unsigned char)s[i];
  size_t len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  if ((int64_t)len > n - i) len = (size_t)(n - i);
  return len ? len : 1;
}

/* Regex matches and the gaps between them, iterating as the reference's find_iter does: an empty
 * match right where the previous match ended is skipped by one character. */
static int regex_pieces(pmp_tok_regex *re, const char *s, int64_t n, int invert, piece_vec *out) {
  out->n = 0;
  if (n == 0) return pieces_push(out, 0, 0, invert) ? 0 : pmp_fail_code("tokenizer: out of memory");
  int64_t last_end = 0, last_match_end = -1, prev = 0;
  while (last_end <= n) {
    int64_t a, b;
    int rc = pmp_tok_regex_find(re, s, n, last_end, &a, &b);
    if (rc < 0) return -1;
    if (rc == 0) break;
    if (a == b && last_match_end == b) {
      last_end += last_end < n ? (int64_t)char_len_at(s, last_end, n) : 1;
      continue;
    }
    last_end = b;
    last_match_end = b;
    if (prev != a && !pieces_push(out, prev, a, invert)) return pmp_fail_code("tokenizer: out of memory");
    if (!pieces_push(out, a, b, !invert)) return pmp_fail_code("tokenizer: out of memory");
    prev = b;
  }
  if (prev != n && !pieces_push(out, prev, n, invert)) return pmp_fail_code("tokenizer: out of memory");
  return 0;
}

enum { TOK_REMOVED = 0, TOK_ISOLATED = 1, TOK_MERGED_WITH_PREVIOUS = 2, TOK_MERGED_WITH_NEXT = 3, TOK_CONTIGUOUS = 4 };

/* Rewrites the pieces in place: flag becomes "remove". */
static void apply_behavior(piece_vec *v, int behavior) {
  size_t n = v->n, k = 0;
  tok_piece *p = v->p;
  switch (behavior) {
  case TOK_REMOVED:
    return;   /* matches are removed: flag already says so */
  case TOK_ISOLATED:
    for (size_t i = 0; i < n; i++) p[i].flag = 0;
    return;
  case TOK_CONTIGUOUS: {
    int prev_match = 0;
    for (size_t i = 0; i < n; i++) {
      int m = p[i].flag;
      if (m == prev_match && k > 0) p[k - 1].end = p[i].end;
      else p[k++] = (tok_piece){p[i].start, p[i].end, 0};
      prev_match = m;
    }
    v->n = k;
    return;
  }
  case TOK_MERGED_WITH_PREVIOUS: {
    int prev_match = 0;
    for (size_t i = 0; i < n; i++) {
      int m = p[i].flag;
      if (m && !prev_match && k > 0) p[k - 1].end = p[i].end;
      else p[k++] = (tok_piece){p[i].start, p[i].end, 0};
      prev_match = m;
    }
    v->n = k;
    return;
  }
  case TOK_MERGED_WITH_NEXT: {
    /* the mirror image: walk from the right, then the kept pieces are in reverse order */
    int prev_match = 0;
    size_t w = n;   /* write from the end backwards */
    for (size_t i = n; i-- > 0;) {
      int m = p[i].flag;
      tok_piece cur = p[i];
      if (m && !prev_match && w < n) p[w].start = cur.start;
      else p[--w] = (tok_piece){cur.start, cur.end, 0};
      prev_match = m;
    }
    memmove(p, p + w, (n - w) * sizeof *p);
    v->n = n - w;
    return;
  }
  }
}

/* ---- lists of pre-tokens ---- */

typedef struct {
  int64_t off, len;
  int at0;           /* starts at offset 0 of the original text */
} tok_span;

typedef struct {
  char *buf;
  size_t len, cap;
  tok_span *spans;
  size_t n, cap_spans;
} tok_list;

static void list_clear(tok_list *l) {
  l->len = 0;
  l->n = 0;
}

static bool list_reserve(tok_list *l, size_t bytes) {
  if (l->len + bytes <= l->cap) return true;
  size_t cap = l->cap ? l->cap : 1024;
  while (cap < l->len + bytes) cap *= 2;
  char *b = realloc(l->buf, cap);
  if (!b) return false;
  l->buf = b;
  l->cap = cap;
  return true;
}

/* Starts a new span; its bytes are appended with list_put. */
static bool list_begin(tok_list *l, int at0) {
  if (l->n == l->cap_spans) {
    size_t cap = l->cap_spans ? l->cap_spans * 2 : 256;
    tok_span *s = realloc(l->spans, cap * sizeof *s);
    if (!s) return false;
    l->spans = s;
    l->cap_spans = cap;
  }
  l->spans[l->n++] = (tok_span){(int64_t)l->len, 0, at0};
  return true;
}

static bool list_put(tok_list *l, const void *data, size_t n) {
  if (!list_reserve(l, n)) return false;
  memcpy(l->buf + l->len, data, n);
  l->len += n;
  l->spans[l->n - 1].len += (int64_t)n;
  return true;
}

static bool list_add(tok_list *l, const char *data, size_t n, int at0) {
  if (n == 0) return true;   /* empty splits are dropped */
  return list_begin(l, at0) && list_put(l, data, n);
}

/* ---- the pipeline ---- */

enum { STEP_SPLIT = 0, STEP_BYTE_LEVEL = 1, STEP_METASPACE = 2 };
enum { PREPEND_ALWAYS = 0, PREPEND_FIRST = 1, PREPEND_NEVER = 2 };

typedef struct {
  int kind;
  pmp_tok_regex *re;
  int behavior, invert;
  int add_prefix_space, map_bytes;
  char rep[8];
  size_t rep_len;
  int prepend_scheme, split;
} tok_step;

struct pmp_tok_pre {
  tok_step *steps;
  int nsteps;
  tok_list lists[2];
  int result;        /* which list holds the last run's pre-tokens */
  piece_vec pieces;
  char *tmp;
  size_t tmp_cap;
};

pmp_tok_pre *pmp_tok_pre_new(void) {
  pmp_tok_pre *p = calloc(1, sizeof *p);
  if (!p) return pmp_fail("tokenizer: out of memory");
  return p;
}

void pmp_tok_pre_free(pmp_tok_pre *p) {
  if (!p) return;
  for (int i = 0; i < p->nsteps; i++) pmp_tok_regex_free(p->steps[i].re);
  free(p->steps);
  for (int i = 0; i < 2; i++) {
    free(p->lists[i].buf);
    free(p->lists[i].spans);
  }
  free(p->pieces.p);
  free(p->tmp);
  free(p);
}

static tok_step *add_step(pmp_tok_pre *p, int kind) {
  tok_step *s = realloc(p->steps, (size_t)(p->nsteps + 1) * sizeof *s);
  if (!s) return pmp_fail("tokenizer: out of memory");
  p->steps = s;
  tok_step *st = &s[p->nsteps++];
  memset(st, 0, sizeof *st);
  st->kind = kind;
  return st;
}

int pmp_tok_pre_add_split(pmp_tok_pre *p, const char *pattern, int64_t n, int literal, int behavior, int invert) {
  if (behavior < TOK_REMOVED || behavior > TOK_CONTIGUOUS) return pmp_fail_code("Split: unknown behavior %d", behavior);
  pmp_tok_regex *re = pmp_tok_regex_new(pattern, n, literal);
  if (!re) return -1;
  tok_step *st = add_step(p, STEP_SPLIT);
  if (!st) {
    pmp_tok_regex_free(re);
    return -1;
  }
  st->re = re;
  st->behavior = behavior;
  st->invert = invert;
  return 0;
}

static const char gpt2_pattern[] =
  "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/* map_bytes: turn the bytes into GPT-2's byte-to-unicode characters (not needed when the BPE model
 * runs in byte-level mode and this is the last step). */
int pmp_tok_pre_add_byte_level(pmp_tok_pre *p, int add_prefix_space, int use_regex, int map_bytes) {
  pmp_tok_regex *re = NULL;
  if (use_regex) {
    re = pmp_tok_regex_new(gpt2_pattern, (int64_t)sizeof gpt2_pattern - 1, 0);
    if (!re) return -1;
  }
  tok_step *st = add_step(p, STEP_BYTE_LEVEL);
  if (!st) {
    pmp_tok_regex_free(re);
    return -1;
  }
  st->re = re;
  st->behavior = TOK_ISOLATED;
  st->add_prefix_space = add_prefix_space;
  st->map_bytes = map_bytes;
  return 0;
}

/* prepend_scheme: 0 always, 1 first, 2 never. */
int pmp_tok_pre_add_metaspace(pmp_tok_pre *p, const char *replacement, int64_t n, int prepend_scheme, int split) {
  if (n < 1 || n > 4) return pmp_fail_code("Metaspace: replacement must be one character");
  if (prepend_scheme < 0 || prepend_scheme > 2) return pmp_fail_code("Metaspace: unknown prepend_scheme");
  pmp_tok_regex *re = NULL;
  if (split) {
    re = pmp_tok_regex_new(replacement, n, 1);
    if (!re) return -1;
  }
  tok_step *st = add_step(p, STEP_METASPACE);
  if (!st) {
    pmp_tok_regex_free(re);
    return -1;
  }
  st->re = re;
  memcpy(st->rep, replacement, (size_t)n);
  st->rep_len = (size_t)n;
  st->prepend_scheme = prepend_scheme;
  st->split = split;
  st->behavior = TOK_MERGED_WITH_NEXT;
  return 0;
}

int pmp_tok_pre_count_steps(const pmp_tok_pre *p) { return p->nsteps; }

/* Splits s by re with the given behaviour into out (at0 as for the whole of s). */
static int split_into(pmp_tok_pre *p, pmp_tok_regex *re, int behavior, int invert, const char *s, int64_t n,
                      int at0, tok_list *out) {
  if (regex_pieces(re, s, n, invert, &p->pieces) < 0) return -1;
  apply_behavior(&p->pieces, behavior);
  for (size_t i = 0; i < p->pieces.n; i++) {
    tok_piece pc = p->pieces.p[i];
    if (pc.flag) continue;
    if (!list_add(out, s + pc.start, (size_t)(pc.end - pc.start), at0 && pc.start == 0))
      return pmp_fail_code("tokenizer: out of memory");
  }
  return 0;
}

static bool ensure_tmp(pmp_tok_pre *p, size_t n) {
  if (n <= p->tmp_cap) return true;
  size_t cap = p->tmp_cap ? p->tmp_cap : 1024;
  while (cap < n) cap *= 2;
  char *t = realloc(p->tmp, cap);
  if (!t) return false;
  p->tmp = t;
  p->tmp_cap = cap;
  return true;
}

static int run_step(pmp_tok_pre *p, tok_step *st, const char *s, int64_t n, int at0, tok_list *out) {
  switch (st->kind) {
  case STEP_SPLIT:
    return split_into(p, st->re, st->behavior, st->invert, s, n, at0, out);
  case STEP_BYTE_LEVEL: {
    const char *src = s;
    int64_t len = n;
    if (st->add_prefix_space && (n == 0 || s[0] != ' ')) {
      if (!ensure_tmp(p, (size_t)n + 1)) return pmp_fail_code("tokenizer: out of memory");
      p->tmp[0] = ' ';
      memcpy(p->tmp + 1, s, (size_t)n);
      src = p->tmp;
      len = n + 1;
    }
    size_t first = out->n;
    if (st->re) {
      if (split_into(p, st->re, TOK_ISOLATED, 0, src, len, at0, out) < 0) return -1;
    } else if (!list_add(out, src, (size_t)len, at0)) {
      return pmp_fail_code("tokenizer: out of memory");
    }
    if (st->map_bytes) {
      /* each new span is rewritten as GPT-2 characters, appended after the buffer's end */
      for (size_t i = first; i < out->n; i++) {
        tok_span sp = out->spans[i];
        if (!list_reserve(out, (size_t)sp.len * 2)) return pmp_fail_code("tokenizer: out of memory");
        const unsigned char *from = (const unsigned char *)out->buf + sp.off;
        char *to = out->buf + out->len;
        size_t o = 0;
        for (int64_t k = 0; k < sp.len; k++) {
          int cp = pmp_tok_byte_to_unicode(from[k]);
          if (cp < 0x80) {
            to[o++] = (char)cp;
          } else {
            to[o++] = (char)(0xC0 | (cp >> 6));
            to[o++] = (char)(0x80 | (cp & 0x3F));
          }
        }
        out->spans[i].off = (int64_t)out->len;
        out->spans[i].len = (int64_t)o;
        out->len += o;
      }
    }
    return 0;
  }
  case STEP_METASPACE: {
    /* spaces become the replacement, then the replacement may be prepended */
    size_t count = 0;
    for (int64_t i = 0; i < n; i++) count += s[i] == ' ';
    if (!ensure_tmp(p, (size_t)n + count * st->rep_len + st->rep_len)) return pmp_fail_code("tokenizer: out of memory");
    size_t o = 0;
    bool starts = n > 0 && (s[0] == ' ' || ((size_t)n >= st->rep_len && memcmp(s, st->rep, st->rep_len) == 0));
    bool prepend = !starts && (st->prepend_scheme == PREPEND_ALWAYS || (st->prepend_scheme == PREPEND_FIRST && at0));
    if (prepend) {
      memcpy(p->tmp, st->rep, st->rep_len);
      o = st->rep_len;
    }
    for (int64_t i = 0; i < n; i++) {
      if (s[i] == ' ') {
        memcpy(p->tmp + o, st->rep, st->rep_len);
        o += st->rep_len;
      } else {
        p->tmp[o++] = s[i];
      }
    }
    if (!st->split) return list_add(out, p->tmp, o, at0) ? 0 : pmp_fail_code("tokenizer: out of memory");
    /* split_into reads p->tmp while writing out: out never aliases tmp */
    return split_into(p, st->re, TOK_MERGED_WITH_NEXT, 0, p->tmp, (int64_t)o, at0, out);
  }
  }
  return pmp_fail_code("tokenizer: bad pre-tokenizer step");
}

/* Runs the steps over one normalized piece; the pre-tokens are then in lists[p->result]. */
static int pre_run(pmp_tok_pre *p, const char *s, int64_t n, int at_start) {
  tok_list *cur = &p->lists[0];
  list_clear(cur);
  if (!list_add(cur, s, (size_t)n, at_start)) return pmp_fail_code("tokenizer: out of memory");
  int which = 0;
  for (int k = 0; k < p->nsteps; k++) {
    tok_list *next = &p->lists[1 - which];
    list_clear(next);
    cur = &p->lists[which];
    for (size_t i = 0; i < cur->n; i++) {
      tok_span sp = cur->spans[i];
      if (run_step(p, &p->steps[k], cur->buf + sp.off, sp.len, sp.at0, next) < 0) return -1;
    }
    which = 1 - which;
  }
  p->result = which;
  return 0;
}

/* For inspection and tests: the pre-tokens of s, read back with pmp_tok_pre_piece. */
int64_t pmp_tok_pre_run(pmp_tok_pre *p, const char *s, int64_t n, int at_start) {
  if (pre_run(p, s, n, at_start) < 0) return -1;
  return (int64_t)p->lists[p->result].n;
}

const char *pmp_tok_pre_piece(pmp_tok_pre *p, int64_t i, int64_t *len) {
  tok_list *l = &p->lists[p->result];
  if (i < 0 || (size_t)i >= l->n) return pmp_fail("pre-token %lld out of range", (long long)i);
  *len = l->spans[i].len;
  return l->buf + l->spans[i].off;
}

/* Pre-tokenizes one normalized piece (p may be NULL: one pre-token) and BPE-encodes every pre-token,
 * appending the ids to out. at_start: the piece begins at offset 0 of the original text. */
int pmp_tok_encode_piece(pmp_tok_pre *p, pmp_tok_bpe *m, const char *s, int64_t n, int at_start, pmp_tok_ids *out) {
  if (n <= 0) return 0;
  if (!p || p->nsteps == 0) return pmp_tok_bpe_encode(m, s, n, out);
  /* the common shape (one Split, then a mapping-free ByteLevel): encode straight from the matches */
  if (p->nsteps <= 2 && p->steps[0].kind == STEP_SPLIT && p->steps[0].behavior == TOK_ISOLATED &&
      !p->steps[0].invert &&
      (p->nsteps == 1 || (p->steps[1].kind == STEP_BYTE_LEVEL && !p->steps[1].add_prefix_space && !p->steps[1].re &&
                          !p->steps[1].map_bytes))) {
    pmp_tok_regex *re = p->steps[0].re;
    int64_t last_end = 0, last_match_end = -1, prev = 0;
    while (last_end <= n) {
      int64_t a, b;
      int rc = pmp_tok_regex_find(re, s, n, last_end, &a, &b);
      if (rc < 0) return -1;
      if (rc == 0) break;
      if (a == b && last_match_end == b) {
        last_end += last_end < n ? (int64_t)char_len_at(s, last_end, n) : 1;
        continue;
      }
      last_end = b;
      last_match_end = b;
      if (prev != a && pmp_tok_bpe_encode(m, s + prev, a - prev, out) < 0) return -1;
      if (pmp_tok_bpe_encode(m, s + a, b - a, out) < 0) return -1;
      prev = b;
    }
    if (prev != n && pmp_tok_bpe_encode(m, s + prev, n - prev, out) < 0) return -1;
    return 0;
  }
  if (pre_run(p, s, n, at_start) < 0) return -1;
  tok_list *l = &p->lists[p->result];
  for (size_t i = 0; i < l->n; i++)
    if (pmp_tok_bpe_encode(m, l->buf + l->spans[i].off, l->spans[i].len, out) < 0) return -1;
  return 0;
}

/* ---- added tokens: a byte trie, matched leftmost-longest ---- */

typedef struct {
  uint64_t key;      /* node << 8 | byte, + 1 (0 = empty slot) */
  int32_t child;
} tok_edge;

typedef struct {
  int32_t id;
  int single_word, lstrip, rstrip;
} tok_added_pattern;

struct pmp_tok_added {
  tok_edge *edges;
  size_t edge_mask, edge_count;
  int32_t *terminal;            /* per node: pattern index, -1 */
  size_t nodes, nodes_cap;
  tok_added_pattern *patterns;
  size_t npatterns;
  uint8_t first[256];
  int64_t *spans;
  size_t nspans, spans_cap;
};

pmp_tok_added *pmp_tok_added_new(void) {
  pmp_tok_added *a = calloc(1, sizeof *a);
  if (!a) return pmp_fail("tokenizer: out of memory");
  a->terminal = malloc(sizeof *a->terminal * 64);
  if (!a->terminal) {
    free(a);
    return pmp_fail("tokenizer: out of memory");
  }
  a->nodes_cap = 64;
  a->nodes = 1;
  a->terminal[0] = -1;
  return a;
}

void pmp_tok_added_free(pmp_tok_added *a) {
  if (!a) return;
  free(a->edges);
  free(a->terminal);
  free(a->patterns);
  free(a->spans);
  free(a);
}

static inline size_t edge_hash(uint64_t k) {
  k *= 0x9E3779B97F4A7C15ull;
  return (size_t)(k ^ (k >> 29));
}

static int32_t edge_get(const pmp_tok_added *a, int32_t node, unsigned char b) {
  if (!a->edges) return -1;
  uint64_t k = (((uint64_t)node << 8) | b) + 1;
  for (size_t i = edge_hash(k) & a->edge_mask;; i = (i + 1) & a->edge_mask) {
    if (a->edges[i].key == 0) return -1;
    if (a->edges[i].key == k) return a->edges[i].child;
  }
}

static bool edge_grow(pmp_tok_added *a) {
  size_t n = a->edges ? (a->edge_mask + 1) * 2 : 1024;
  tok_edge *e = calloc(n, sizeof *e);
  if (!e) return false;
  if (a->edges)
    for (size_t i = 0; i <= a->edge_mask; i++) {
      if (!a->edges[i].key) continue;
      size_t j = edge_hash(a->edges[i].key) & (n - 1);
      while (e[j].key) j = (j + 1) & (n - 1);
      e[j] = a->edges[i];
    }
  free(a->edges);
  a->edges = e;
  a->edge_mask = n - 1;
  return true;
}

/* Adds one token. Later additions of the same content replace the earlier one. */
int pmp_tok_added_add(pmp_tok_added *a, const char *s, int64_t n, int32_t id, int single_word, int lstrip, int rstrip) {
  if (n <= 0) return 0;   /* empty tokens never match */
  int32_t node = 0;
  for (int64_t i = 0; i < n; i++) {
    unsigned char b = (unsigned char)s[i];
    int32_t child = edge_get(a, node, b);
    if (child < 0) {
      if (!a->edges || (a->edge_count + 1) * 2 > a->edge_mask + 1)
        if (!edge_grow(a)) return pmp_fail_code("tokenizer: out of memory");
      if (a->nodes == a->nodes_cap) {
        int32_t *t = realloc(a->terminal, a->nodes_cap * 2 * sizeof *t);
        if (!t) return pmp_fail_code("tokenizer: out of memory");
        a->terminal = t;
        a->nodes_cap *= 2;
      }
      child = (int32_t)a->nodes++;
      a->terminal[child] = -1;
      uint64_t k = (((uint64_t)node << 8) | b) + 1;
      size_t j = edge_hash(k) & a->edge_mask;
      while (a->edges[j].key) j = (j + 1) & a->edge_mask;
      a->edges[j].key = k;
      a->edges[j].child = child;
      a->edge_count++;
    }
    node = child;
  }
  tok_added_pattern *p = realloc(a->patterns, (a->npatterns + 1) * sizeof *p);
  if (!p) return pmp_fail_code("tokenizer: out of memory");
  a->patterns = p;
  p[a->npatterns] = (tok_added_pattern){id, single_word, lstrip, rstrip};
  a->terminal[node] = (int32_t)a->npatterns++;
  a->first[(unsigned char)s[0]] = 1;
  return 0;
}

int64_t pmp_tok_added_count(const pmp_tok_added *a) { return (int64_t)a->npatterns; }

static bool spans_push(pmp_tok_added *a, int64_t start, int64_t end, int64_t id) {
  if (a->nspans + 3 > a->spans_cap) {
    size_t cap = a->spans_cap ? a->spans_cap * 2 : 96;
    int64_t *s = realloc(a->spans, cap * sizeof *s);
    if (!s) return false;
    a->spans = s;
    a->spans_cap = cap;
  }
  a->spans[a->nspans++] = start;
  a->spans[a->nspans++] = end;
  a->spans[a->nspans++] = id;
  return true;
}

static int32_t cp_before(const unsigned char *s, int64_t i, int64_t *start) {
  int64_t k = i - 1;
  while (k > 0 && (s[k] & 0xC0) == 0x80) k--;
  unsigned char b = s[k];
  int32_t cp;
  if (b < 0x80) cp = b;
  else if (b < 0xE0) cp = ((b & 0x1F) << 6) | (s[k + 1] & 0x3F);
  else if (b < 0xF0) cp = ((b & 0x0F) << 12) | ((s[k + 1] & 0x3F) << 6) | (s[k + 2] & 0x3F);
  else cp = ((b & 0x07) << 18) | ((s[k + 1] & 0x3F) << 12) | ((s[k + 2] & 0x3F) << 6) | (s[k + 3] & 0x3F);
  *start = k;
  return cp;
}

static int32_t cp_at(const unsigned char *s, int64_t i, int64_t n, int64_t *len) {
  unsigned char b = s[i];
  *len = (int64_t)char_len_at((const char *)s, i, n);
  if (b < 0x80) return b;
  if (b < 0xE0) return ((b & 0x1F) << 6) | (s[i + 1] & 0x3F);
  if (b < 0xF0) return ((b & 0x0F) << 12) | ((s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
  return ((b & 0x07) << 18) | ((s[i + 1] & 0x3F) << 12) | ((s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
}

/* Splits s (valid UTF-8) around the added tokens it contains. Returns triples (start, end, id) with
 * id -1 for the text between tokens, covering s; *count gets the number of triples. The array lives
 * until the next call. */
const int64_t *pmp_tok_added_split(pmp_tok_added *a, const char *s, int64_t n, int64_t *count) {
  const unsigned char *u = (const unsigned char *)s;
  a->nspans = 0;
  int64_t start_offset = 0;
  int64_t i = 0;
  if (a->npatterns)
    while (i < n) {
      if (!a->first[u[i]]) {
        i++;
        continue;
      }
      /* longest pattern starting at i */
      int32_t node = 0, best = -1;
      int64_t best_end = -1;
      for (int64_t j = i; j < n; j++) {
        node = edge_get(a, node, u[j]);
        if (node < 0) break;
        if (a->terminal[node] >= 0) {
          best = a->terminal[node];
          best_end = j + 1;
        }
      }
      if (best < 0) {
        i++;
        continue;
      }
      tok_added_pattern *pat = &a->patterns[best];
      int64_t start = i, stop = best_end;
      i = best_end;   /* matching resumes after the match, kept or not */
      if (pat->single_word) {
        int64_t k, len;
        bool start_space = start == 0 || !pmp_tok_is_word(cp_before(u, start, &k));
        bool stop_space = stop == n || !pmp_tok_is_word(cp_at(u, stop, n, &len));
        if (!start_space || !stop_space) continue;
      }
      if (pat->lstrip) {
        int64_t newstart = start, k;
        while (newstart > 0 && pmp_tok_is_space(cp_before(u, newstart, &k))) newstart = k;
        start = newstart > start_offset ? newstart : start_offset;
      }
      if (pat->rstrip) {
        int64_t len;
        while (stop < n && pmp_tok_is_space(cp_at(u, stop, n, &len))) stop += len;
      }
      if (start_offset < start && !spans_push(a, start_offset, start, -1)) return pmp_fail("tokenizer: out of memory");
      if (!spans_push(a, start, stop, pat->id)) return pmp_fail("tokenizer: out of memory");
      start_offset = stop;
    }
  if (start_offset < n && !spans_push(a, start_offset, n, -1)) return pmp_fail("tokenizer: out of memory");
  *count = (int64_t)(a->nspans / 3);
  static const int64_t none[3];
  return a->spans ? a->spans : none;
}
