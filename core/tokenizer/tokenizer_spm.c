/* tokenizer_spm.c — SentencePiece models (tokenizer.model) as the `sentencepiece` library runs them:
 * the normalizer (precompiled charsmap, dummy prefix, whitespace rules), then the BPE or Unigram model
 * over the whole normalized text, then byte fallback for unknown pieces.
 *
 * Pieces are given in id order. Like the library, pieces of type NORMAL, USER_DEFINED and UNUSED can be
 * produced by the model; CONTROL, UNKNOWN and BYTE are reserved and only reached by id. User-defined
 * pieces are matched first, longest first, and never normalized or split. Piece dictionaries reuse the
 * BPE model's string table (a pmp_tok_bpe without merges). Float arithmetic follows the library's types
 * (f32 scores, one f64 term for user-defined pieces) so ties resolve the same way. */
#include "internal.h"
#include <float.h>
#include <stdio.h>

enum { PIECE_NORMAL = 1, PIECE_UNKNOWN = 2, PIECE_CONTROL = 3, PIECE_USER_DEFINED = 4, PIECE_UNUSED = 5, PIECE_BYTE = 6 };
enum { MODEL_UNIGRAM = 1, MODEL_BPE = 2 };

static const char SPACE_SYMBOL[3] = {(char)0xE2, (char)0x96, (char)0x81};   /* U+2581 */

struct pmp_tok_spm {
  int model_type, byte_fallback;
  int add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces;
  pmp_tok_bpe *pieces;      /* NORMAL, USER_DEFINED, UNUSED: what the model can produce */
  pmp_tok_bpe *reserved;    /* CONTROL, UNKNOWN, BYTE */
  pmp_tok_bpe *user;        /* USER_DEFINED only */
  /* byte trie of the producible pieces, for Unigram's search of every piece starting at a position:
   * edges (node << 8 | byte) -> child in an open-addressing table; node_piece: the piece ending there */
  struct spm_edge { uint64_t key; int32_t child; } *edges;
  size_t edge_mask, edge_count;
  int32_t *node_piece;
  size_t node_count, node_cap;
  bool user_first[256];     /* bytes that start a user-defined piece */
  float *score;
  unsigned char *type;
  int32_t count, cap;
  int32_t unk_id;
  int32_t byte_id[256];
  size_t max_user_len;
  float min_score, max_score;
  /* precompiled charsmap: a darts-clone double array over input bytes, and the replacement strings */
  uint32_t *units;
  size_t nunits;
  char *replacements;
  size_t replacements_len;
  /* scratch */
  char *norm;
  size_t norm_cap;
  struct spm_symbol { int32_t prev, next; uint32_t off, len; bool freeze; } *sym;
  size_t sym_cap;
  struct spm_pair { float score; int32_t left, right; uint32_t size; } *heap;
  size_t heap_cap;
  struct spm_best { float score; int32_t start, id; } *best;
  size_t best_cap;
};

static bool grow(void **p, size_t *cap, size_t need, size_t elem) {
  if (need <= *cap) return true;
  size_t c = *cap ? *cap : 64;
  while (c < need) c *= 2;
  void *q = realloc(*p, c * elem);
  if (!q) return false;
  *p = q;
  *cap = c;
  return true;
}

pmp_tok_spm *pmp_tok_spm_new(int model_type, int byte_fallback) {
  if (model_type != MODEL_UNIGRAM && model_type != MODEL_BPE)
    return pmp_fail("tokenizer: SentencePiece model type %d is not supported (1 Unigram and 2 BPE are)", model_type);
  pmp_tok_spm *m = calloc(1, sizeof *m);
  if (!m) return pmp_fail("tokenizer: out of memory");
  m->model_type = model_type;
  m->byte_fallback = byte_fallback;
  m->add_dummy_prefix = m->remove_extra_whitespaces = m->escape_whitespaces = 1;
  m->unk_id = -1;
  m->pieces = pmp_tok_bpe_new(0, 0, 0, 0, -1, "", "");
  m->reserved = pmp_tok_bpe_new(0, 0, 0, 0, -1, "", "");
  m->user = pmp_tok_bpe_new(0, 0, 0, 0, -1, "", "");
  m->node_piece = malloc(sizeof *m->node_piece);
  if (m->node_piece) m->node_piece[0] = -1, m->node_count = m->node_cap = 1;
  if (!m->pieces || !m->reserved || !m->user || !m->node_piece) {
    pmp_tok_spm_free(m);
    return pmp_fail("tokenizer: out of memory");
  }
  return m;
}

void pmp_tok_spm_free(pmp_tok_spm *m) {
  if (!m) return;
  pmp_tok_bpe_free(m->pieces);
  pmp_tok_bpe_free(m->reserved);
  pmp_tok_bpe_free(m->user);
  free(m->edges);
  free(m->node_piece);
  free(m->score);
  free(m->type);
  free(m->units);
  free(m->replacements);
  free(m->norm);
  free(m->sym);
  free(m->heap);
  free(m->best);
  free(m);
}

static inline size_t edge_hash(uint64_t k) {
  k ^= k >> 31;
  k *= 0x9E3779B97F4A7C15ull;
  k ^= k >> 29;
  return (size_t)k;
}

static inline int32_t trie_child(const pmp_tok_spm *m, int32_t node, unsigned char byte) {
  if (!m->edges) return -1;
  uint64_t key = (uint64_t)node << 8 | byte;
  for (size_t i = edge_hash(key) & m->edge_mask;; i = (i + 1) & m->edge_mask) {
    if (m->edges[i].child < 0) return -1;
    if (m->edges[i].key == key) return m->edges[i].child;
  }
}

static void edges_put(struct spm_edge *edges, size_t mask, uint64_t key, int32_t child) {
  size_t i = edge_hash(key) & mask;
  while (edges[i].child >= 0) i = (i + 1) & mask;
  edges[i].key = key;
  edges[i].child = child;

}

static int trie_insert(pmp_tok_spm *m, const unsigned char *s, size_t n, int32_t id) {
  int32_t node = 0;
  for (size_t k = 0; k < n; k++) {
    int32_t child = trie_child(m, node, s[k]);
    if (child < 0) {
      if (!m->edges || (m->edge_count + 1) * 2 > m->edge_mask + 1) {
        size_t size = m->edges ? (m->edge_mask + 1) * 2 : 4096;
        struct spm_edge *e = malloc(size * sizeof *e);
        if (!e) return pmp_fail_code("tokenizer: out of memory");
        for (size_t i = 0; i < size; i++) e[i].child = -1;
        for (size_t i = 0; m->edges && i <= m->edge_mask; i++)
          if (m->edges[i].child >= 0) edges_put(e, size - 1, m->edges[i].key, m->edges[i].child);
        free(m->edges);
        m->edges = e;
        m->edge_mask = size - 1;
      }
      if (!grow((void **)&m->node_piece, &m->node_cap, m->node_count + 1, sizeof *m->node_piece))
        return pmp_fail_code("tokenizer: out of memory");
      child = (int32_t)m->node_count++;
      m->node_piece[child] = -1;
      edges_put(m->edges, m->edge_mask, (uint64_t)node << 8 | s[k], child);
      m->edge_count++;
    }
    node = child;
  }
  m->node_piece[node] = id;
  return 0;
}

int pmp_tok_spm_add_piece(pmp_tok_spm *m, const char *s, int64_t n, float score, int type) {
  if (type < PIECE_NORMAL || type > PIECE_BYTE) return pmp_fail_code("piece %d has unknown type %d", m->count, type);
  if (n <= 0) return pmp_fail_code("piece %d is empty", m->count);
  if (m->count == m->cap) {
    int32_t cap = m->cap ? m->cap * 2 : 1024;
    float *sc = realloc(m->score, (size_t)cap * sizeof *sc);
    if (sc) m->score = sc;
    unsigned char *ty = realloc(m->type, (size_t)cap);
    if (ty) m->type = ty;
    if (!sc || !ty) return pmp_fail_code("tokenizer: out of memory");
    m->cap = cap;
  }
  bool producible = type == PIECE_NORMAL || type == PIECE_USER_DEFINED || type == PIECE_UNUSED;
  pmp_tok_bpe *dict = producible ? m->pieces : m->reserved;
  if (pmp_tok_bpe_lookup(dict, s, n) >= 0 ||
      pmp_tok_bpe_lookup(producible ? m->reserved : m->pieces, s, n) >= 0)
    return pmp_fail_code("piece %d '%.*s' is already defined", m->count, (int)(n < 60 ? n : 60), s);
  int32_t id = m->count;
  if (pmp_tok_bpe_add_token(dict, s, n, id) != 0) return -1;
  if (type == PIECE_USER_DEFINED) {
    if (pmp_tok_bpe_add_token(m->user, s, n, id) != 0) return -1;
    if ((size_t)n > m->max_user_len) m->max_user_len = (size_t)n;
    m->user_first[(unsigned char)s[0]] = true;
  }
  if (producible && trie_insert(m, (const unsigned char *)s, (size_t)n, id) != 0) return -1;
  if (type == PIECE_UNKNOWN) {
    if (m->unk_id >= 0) return pmp_fail_code("piece %d: a second UNKNOWN piece (the first is %d)", id, m->unk_id);
    m->unk_id = id;
  }
  if (type == PIECE_UNUSED && m->model_type == MODEL_BPE)
    return pmp_fail_code("piece %d: UNUSED pieces in a BPE model (resegmentation) are not supported", id);
  m->score[id] = score;
  m->type[id] = (unsigned char)type;
  m->count++;
  return 0;
}

void pmp_tok_spm_set_normalizer(pmp_tok_spm *m, int add_dummy_prefix, int remove_extra_whitespaces, int escape_whitespaces) {
  m->add_dummy_prefix = add_dummy_prefix;
  m->remove_extra_whitespaces = remove_extra_whitespaces;
  m->escape_whitespaces = escape_whitespaces;
}

/* The blob: a little-endian u32 byte size of the double array, the array, then NUL-terminated
 * replacement strings that the array's values index. */
int pmp_tok_spm_set_charsmap(pmp_tok_spm *m, const char *blob, int64_t n) {
  if (n == 0) return 0;
  if (n < 4) return pmp_fail_code("precompiled_charsmap: %lld bytes, too short for its header", (long long)n);
  const unsigned char *u = (const unsigned char *)blob;
  uint32_t trie_bytes = (uint32_t)u[0] | (uint32_t)u[1] << 8 | (uint32_t)u[2] << 16 | (uint32_t)u[3] << 24;
  if (trie_bytes % 4 || trie_bytes == 0 || (uint64_t)trie_bytes + 4 > (uint64_t)n)
    return pmp_fail_code("precompiled_charsmap: double array of %u bytes does not fit the %lld-byte blob",
                         trie_bytes, (long long)n);
  m->nunits = trie_bytes / 4;
  m->units = malloc(trie_bytes);
  m->replacements_len = (size_t)n - 4 - trie_bytes;
  m->replacements = malloc(m->replacements_len + 1);
  if (!m->units || !m->replacements) return pmp_fail_code("tokenizer: out of memory");
  for (size_t i = 0; i < m->nunits; i++) {
    const unsigned char *p = u + 4 + 4 * i;
    m->units[i] = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
  }
  memcpy(m->replacements, u + 4 + trie_bytes, m->replacements_len);
  m->replacements[m->replacements_len] = 0;
  return 0;
}

int pmp_tok_spm_finish(pmp_tok_spm *m) {
  if (m->unk_id < 0) return pmp_fail_code("no piece of type UNKNOWN (sentencepiece requires one)");
  m->min_score = FLT_MAX;
  m->max_score = FLT_MIN;   /* the library's starting values: the maximum is never below FLT_MIN */
  bool has_byte = false;
  for (int32_t i = 0; i < m->count; i++) {
    if (m->type[i] == PIECE_NORMAL) {
      if (m->score[i] < m->min_score) m->min_score = m->score[i];
      if (m->score[i] > m->max_score) m->max_score = m->score[i];
    }
    if (m->type[i] == PIECE_BYTE) has_byte = true;
  }
  if (has_byte && !m->byte_fallback) return pmp_fail_code("BYTE pieces in a model without byte_fallback");
  if (m->byte_fallback && !has_byte) return pmp_fail_code("byte_fallback is set but the model has no BYTE pieces");
  for (int b = 0; b < 256; b++) {
    char name[8];
    snprintf(name, sizeof name, "<0x%02X>", b);
    int32_t id = pmp_tok_bpe_lookup(m->reserved, name, 6);
    if (id < 0) id = pmp_tok_bpe_lookup(m->pieces, name, 6);
    m->byte_id[b] = id < 0 ? m->unk_id : id;
  }
  return 0;
}

/* ---- normalizer ---- */

static inline size_t utf8_len_at(const unsigned char *s, size_t n) {
  unsigned char c = s[0];
  size_t len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  return len < n ? len : n;
}

/* Longest user-defined piece at the start of s (0 when none). */
static size_t user_prefix(pmp_tok_spm *m, const char *s, size_t n) {
  if (!m->user_first[(unsigned char)s[0]]) return 0;
  size_t max = n < m->max_user_len ? n : m->max_user_len;
  for (size_t len = max; len > 0; len--)
    if (pmp_tok_bpe_lookup(m->user, s, (int64_t)len) >= 0) return len;
  return 0;
}

/* The longest charsmap rule at the start of s: 1 with its input length and replacement (a
 * NUL-terminated string), 0 when none matches, -1 when the rule points outside the table. */
static int charsmap_prefix(pmp_tok_spm *m, const unsigned char *s, size_t n, size_t *in_len, const char **rep) {
  if (!m->units) return 0;
  const uint32_t *a = m->units;
  size_t pos = 0, best = 0;
  uint32_t best_value = 0;
#define UNIT_OFFSET(u) (((u) >> 10) << (((u) & (1u << 9)) >> 6))
  pos ^= UNIT_OFFSET(a[0]);
  for (size_t i = 0; i < n; i++) {
    pos ^= s[i];
    if (pos >= m->nunits) break;
    uint32_t unit = a[pos];
    if ((unit & ((1u << 31) | 0xFF)) != s[i]) break;
    pos ^= UNIT_OFFSET(unit);
    if (pos >= m->nunits) break;
    if ((unit >> 8) & 1) {
      best = i + 1;
      best_value = a[pos] & ((1u << 31) - 1);
    }
  }
#undef UNIT_OFFSET
  if (!best) return 0;
  if (best_value > m->replacements_len)
    return pmp_fail_code("precompiled_charsmap: a rule points at byte %u of %zu-byte replacements", best_value,
                         m->replacements_len);
  *in_len = best;
  *rep = m->replacements + best_value;
  return 1;
}

/* One normalized unit at the start of s: a user-defined piece as it is, a charsmap rule's replacement,
 * or one character. Returns the input bytes it covers (> 0), or -1. */
static int64_t next_unit(pmp_tok_spm *m, const char *s, size_t n, const char **piece, size_t *piece_len) {
  size_t ul = user_prefix(m, s, n);
  if (ul) {
    *piece = s;
    *piece_len = ul;
    return (int64_t)ul;
  }
  size_t in_len = 0;
  int r = charsmap_prefix(m, (const unsigned char *)s, n, &in_len, piece);
  if (r < 0) return -1;
  if (r) {
    *piece_len = strlen(*piece);
    return (int64_t)in_len;
  }
  *piece = s;
  *piece_len = utf8_len_at((const unsigned char *)s, n);
  return (int64_t)*piece_len;
}

static bool norm_put(pmp_tok_spm *m, size_t *o, const char *s, size_t n) {
  if (!grow((void **)&m->norm, &m->norm_cap, *o + n + 1, 1)) return false;
  memcpy(m->norm + *o, s, n);
  *o += n;
  return true;
}

/* Normalizes s into m->norm as the library does; returns the length or -1. */
static int64_t normalize(pmp_tok_spm *m, const char *s, size_t n, int add_dummy_prefix) {
  size_t o = 0, i = 0;
  const char *p;
  size_t pl;
  int64_t c;
  if (m->remove_extra_whitespaces) {
    for (; i < n; i += (size_t)c) {
      if ((c = next_unit(m, s + i, n - i, &p, &pl)) < 0) return -1;
      if (!(pl == 1 && p[0] == ' ')) break;
    }
  }
  if (i == n) return 0;
  const char *space = m->escape_whitespaces ? SPACE_SYMBOL : " ";
  size_t space_len = m->escape_whitespaces ? 3 : 1;
  if (add_dummy_prefix && !norm_put(m, &o, space, space_len)) return pmp_fail_code("tokenizer: out of memory");
  bool prev_space = m->remove_extra_whitespaces;
  for (; i < n; i += (size_t)c) {
    if ((c = next_unit(m, s + i, n - i, &p, &pl)) < 0) return -1;
    if (prev_space)
      while (pl && p[0] == ' ') p++, pl--;
    if (pl) {
      for (size_t k = 0; k < pl; k++) {
        bool ok = p[k] == ' ' ? norm_put(m, &o, space, space_len) : norm_put(m, &o, p + k, 1);
        if (!ok) return pmp_fail_code("tokenizer: out of memory");
      }
      prev_space = p[pl - 1] == ' ';
    }
    if (!m->remove_extra_whitespaces) prev_space = false;
  }
  if (m->remove_extra_whitespaces)
    while (o >= space_len && memcmp(m->norm + o - space_len, space, space_len) == 0) o -= space_len;
  return (int64_t)o;
}

const char *pmp_tok_spm_normalize(pmp_tok_spm *m, const char *s, int64_t n, int add_dummy_prefix, int64_t *out_len) {
  int64_t len = normalize(m, s, (size_t)n, add_dummy_prefix);
  if (len < 0) return NULL;
  *out_len = len;
  return len ? m->norm : "";
}

/* ---- output: runs of unknown pieces become one (as the library merges them), then byte fallback ---- */

typedef struct { size_t start, end; bool open; } spm_unknown_run;

static int flush_unknown(pmp_tok_spm *m, const char *s, spm_unknown_run *run, pmp_tok_ids *out) {
  if (!run->open) return 0;
  run->open = false;
  if (!m->byte_fallback) return pmp_tok_ids_push(out, m->unk_id);
  for (size_t k = run->start; k < run->end; k++)
    if (pmp_tok_ids_push(out, m->byte_id[(unsigned char)s[k]]) != 0) return -1;
  return 0;
}

/* s is the whole normalized text; the piece is s[start, end). */
static int emit(pmp_tok_spm *m, const char *s, size_t start, size_t end, int32_t id, spm_unknown_run *run, pmp_tok_ids *out) {
  if (m->type[id] == PIECE_UNKNOWN) {
    if (!run->open) run->start = start, run->open = true;
    run->end = end;
    return 0;
  }
  if (flush_unknown(m, s, run, out) != 0) return -1;
  return pmp_tok_ids_push(out, id);
}

/* ---- Unigram: Viterbi over every piece that starts at each character ---- */

static int encode_unigram(pmp_tok_spm *m, const char *s, size_t n, pmp_tok_ids *out) {
  if (!grow((void **)&m->best, &m->best_cap, n + 1, sizeof *m->best)) return pmp_fail_code("tokenizer: out of memory");
  struct spm_best *best = m->best;
  for (size_t i = 0; i <= n; i++) best[i].start = -1, best[i].score = 0, best[i].id = -1;
  const float unk_score = m->min_score - 10.0f;
  const unsigned char *u = (const unsigned char *)s;
  for (size_t start = 0; start < n;) {
    const float here = best[start].score;
    size_t mblen = utf8_len_at(u + start, n - start);
    bool single = false;
    /* every piece starting here, shortest first (ties keep the earlier candidate, as the library does) */
    int32_t node = 0;
    for (size_t len = 1; start + len <= n; len++) {
      node = trie_child(m, node, u[start + len - 1]);
      if (node < 0) break;
      int32_t id = m->node_piece[node];
      if (id < 0 || m->type[id] == PIECE_UNUSED) continue;
      struct spm_best *t = &best[start + len];
      float score = m->type[id] == PIECE_USER_DEFINED ? (float)((double)((float)len * m->max_score) - 0.1) : m->score[id];
      float candidate = score + here;
      if (t->start == -1 || candidate > t->score) {
        t->score = candidate;
        t->start = (int32_t)start;
        t->id = id;
      }
      if (len == mblen) single = true;
    }
    if (!single) {
      struct spm_best *t = &best[start + mblen];
      float candidate = unk_score + here;
      if (t->start == -1 || candidate > t->score) {
        t->score = candidate;
        t->start = (int32_t)start;
        t->id = m->unk_id;
      }
    }
    start += mblen;
  }
  /* backtrack into the scratch heap area, then emit in order */
  size_t count = 0;
  for (size_t end = n; end > 0; end = (size_t)best[end].start) count++;
  if (!grow((void **)&m->sym, &m->sym_cap, count, sizeof *m->sym)) return pmp_fail_code("tokenizer: out of memory");
  size_t k = count;
  for (size_t end = n; end > 0; end = (size_t)best[end].start) {
    k--;
    m->sym[k].off = (uint32_t)best[end].start;
    m->sym[k].len = (uint32_t)(end - (size_t)best[end].start);
    m->sym[k].prev = best[end].id;
  }
  spm_unknown_run run = {0};
  for (k = 0; k < count; k++)
    if (emit(m, s, m->sym[k].off, m->sym[k].off + m->sym[k].len, m->sym[k].prev, &run, out) != 0) return -1;
  return flush_unknown(m, s, &run, out);
}

/* ---- BPE: merge the adjacent pair whose joined piece scores highest (leftmost on ties) ---- */

static inline bool pair_before(const struct spm_pair *a, const struct spm_pair *b) {
  return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static bool heap_push(pmp_tok_spm *m, size_t *count, struct spm_pair item) {
  if (!grow((void **)&m->heap, &m->heap_cap, *count + 1, sizeof *m->heap)) return false;
  struct spm_pair *h = m->heap;
  size_t i = (*count)++;
  while (i > 0) {
    size_t parent = (i - 1) / 2;
    if (!pair_before(&item, &h[parent])) break;
    h[i] = h[parent];
    i = parent;
  }
  h[i] = item;
  return true;
}

static struct spm_pair heap_pop(pmp_tok_spm *m, size_t *count) {
  struct spm_pair *h = m->heap;
  struct spm_pair top = h[0], last = h[--*count];
  size_t i = 0, n = *count;
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= n) break;
    if (c + 1 < n && pair_before(&h[c + 1], &h[c])) c++;
    if (!pair_before(&h[c], &last)) break;
    h[i] = h[c];
    i = c;
  }
  if (n) h[i] = last;
  return top;
}

static bool maybe_add_pair(pmp_tok_spm *m, const char *s, size_t *heap_count, int32_t left, int32_t right) {
  if (left < 0 || right < 0 || m->sym[left].freeze || m->sym[right].freeze) return true;
  uint32_t size = m->sym[left].len + m->sym[right].len;
  int32_t id = pmp_tok_bpe_lookup(m->pieces, s + m->sym[left].off, size);
  if (id < 0) return true;
  struct spm_pair p = {m->score[id], left, right, size};
  return heap_push(m, heap_count, p);
}

static int encode_bpe(pmp_tok_spm *m, const char *s, size_t n, pmp_tok_ids *out) {
  if (!grow((void **)&m->sym, &m->sym_cap, n, sizeof *m->sym)) return pmp_fail_code("tokenizer: out of memory");
  struct spm_symbol *sym = m->sym;
  const unsigned char *u = (const unsigned char *)s;
  int32_t count = 0;
  for (size_t i = 0; i < n; count++) {
    size_t ul = user_prefix(m, s + i, n - i);
    size_t len = ul ? ul : utf8_len_at(u + i, n - i);
    sym[count].off = (uint32_t)i;
    sym[count].len = (uint32_t)len;
    sym[count].freeze = ul > 0;
    sym[count].prev = count - 1;
    i += len;
    sym[count].next = i < n ? count + 1 : -1;
  }
  size_t heap_count = 0;
  for (int32_t i = 1; i < count; i++)
    if (!maybe_add_pair(m, s, &heap_count, i - 1, i)) return pmp_fail_code("tokenizer: out of memory");
  while (heap_count) {
    struct spm_pair top = heap_pop(m, &heap_count);
    struct spm_symbol *l = &sym[top.left], *r = &sym[top.right];
    if (!l->len || !r->len || l->len + r->len != top.size) continue;   /* stale */
    l->len += r->len;
    l->next = r->next;
    if (r->next >= 0) sym[r->next].prev = top.left;
    r->len = 0;
    if (!maybe_add_pair(m, s, &heap_count, l->prev, top.left) || !maybe_add_pair(m, s, &heap_count, top.left, l->next))
      return pmp_fail_code("tokenizer: out of memory");
  }
  spm_unknown_run run = {0};
  for (int32_t i = 0; count > 0 && i >= 0; i = sym[i].next) {
    const char *p = s + sym[i].off;
    int32_t id = pmp_tok_bpe_lookup(m->reserved, p, sym[i].len);
    if (id < 0) id = pmp_tok_bpe_lookup(m->pieces, p, sym[i].len);
    if (id < 0) id = m->unk_id;
    if (emit(m, s, sym[i].off, sym[i].off + sym[i].len, id, &run, out) != 0) return -1;
  }
  return flush_unknown(m, s, &run, out);
}

int pmp_tok_spm_encode(pmp_tok_spm *m, const char *s, int64_t n, int add_dummy_prefix, pmp_tok_ids *out) {
  int64_t len = normalize(m, s, (size_t)n, add_dummy_prefix);
  if (len < 0) return -1;
  if (len > 0x7fffffff) return pmp_fail_code("tokenizer: text too long for one SentencePiece encode");
  if (len == 0) return 0;
  return m->model_type == MODEL_BPE ? encode_bpe(m, m->norm, (size_t)len, out) : encode_unigram(m, m->norm, (size_t)len, out);
}
