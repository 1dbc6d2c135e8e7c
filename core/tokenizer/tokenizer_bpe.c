/* tokenizer_bpe.c — the BPE model of a Hugging Face tokenizer.json: vocabulary, merge ranks, the merge
 * loop over one pre-token, and a cache of pre-token results.
 *
 * Two key spaces:
 *  - char mode: vocabulary strings are used as they are; a pre-token starts as its UTF-8 characters
 *    (with continuing_subword_prefix / end_of_word_suffix attached as the JSON asks).
 *  - byte-level mode (the last pre-tokenizer is ByteLevel, no prefix/suffix): every vocabulary string
 *    made of GPT-2 byte-to-unicode characters is stored as the raw bytes it stands for, so the
 *    pre-token is never mapped to those characters at all; it starts as its bytes. Strings holding
 *    other characters cannot come out of byte-level BPE and are left out of the lookup.
 *
 * Merging follows the reference semantics: repeatedly merge the adjacent pair with the lowest rank,
 * the leftmost one among equal ranks, until no adjacent pair has a merge. */
#include "internal.h"
#include <stdio.h>

/* ---- hashing and a string -> (int, int) map over an arena ---- */

static inline uint64_t tok_hash(const unsigned char *s, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xff51afd7ed558ccdull);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, s + i, 8);
    h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 29;
  }
  uint64_t w = 0;
  for (size_t k = 0; i < n; i++, k += 8) w |= (uint64_t)s[i] << k;
  h = (h ^ w) * 0x94d049bb133111ebull;
  h ^= h >> 31;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 32;
  return h;
}

typedef struct {
  uint32_t hash;    /* low bits of the hash, for a quick reject */
  int32_t entry;    /* index into entries, -1 for an empty slot */
} tok_slot;

typedef struct {
  uint64_t off;     /* key bytes in the arena */
  uint32_t len;
  int32_t v1, v2;
} tok_entry;

typedef struct {
  char *arena;
  size_t arena_len, arena_cap;
  tok_entry *entries;
  size_t count, entries_cap;
  tok_slot *slots;
  size_t mask;      /* slots - 1 (power of two) */
} tok_strmap;

static void strmap_free(tok_strmap *m) {
  free(m->arena);
  free(m->entries);
  free(m->slots);
  memset(m, 0, sizeof *m);
}

static bool strmap_rehash(tok_strmap *m, size_t nslots) {
  tok_slot *slots = malloc(nslots * sizeof *slots);
  if (!slots) return false;
  for (size_t i = 0; i < nslots; i++) slots[i].entry = -1;
  for (size_t e = 0; e < m->count; e++) {
    uint64_t h = tok_hash((const unsigned char *)m->arena + m->entries[e].off, m->entries[e].len);
    size_t i = h & (nslots - 1);
    while (slots[i].entry >= 0) i = (i + 1) & (nslots - 1);
    slots[i].hash = (uint32_t)h;
    slots[i].entry = (int32_t)e;
  }
  free(m->slots);
  m->slots = slots;
  m->mask = nslots - 1;
  return true;
}

static tok_entry *strmap_get(const tok_strmap *m, const void *key, size_t n) {
  if (!m->slots) return NULL;
  uint64_t h = tok_hash(key, n);
  for (size_t i = h & m->mask;; i = (i + 1) & m->mask) {
    const tok_slot *s = &m->slots[i];
    if (s->entry < 0) return NULL;
    if (s->hash == (uint32_t)h) {
      tok_entry *e = &m->entries[s->entry];
      if (e->len == n && memcmp(m->arena + e->off, key, n) == 0) return e;
    }
  }
}

/* Inserts key (or finds it); *fresh tells which. NULL when out of memory. */
static tok_entry *strmap_put(tok_strmap *m, const void *key, size_t n, bool *fresh) {
  if (!m->slots || (m->count + 1) * 4 > (m->mask + 1) * 3) {
    if (!strmap_rehash(m, m->slots ? (m->mask + 1) * 2 : 1024)) return NULL;
  }
  uint64_t h = tok_hash(key, n);
  size_t i = h & m->mask;
  for (;; i = (i + 1) & m->mask) {
    tok_slot *s = &m->slots[i];
    if (s->entry < 0) break;
    if (s->hash == (uint32_t)h) {
      tok_entry *e = &m->entries[s->entry];
      if (e->len == n && memcmp(m->arena + e->off, key, n) == 0) {
        *fresh = false;
        return e;
      }
    }
  }
  if (m->count == m->entries_cap) {
    size_t cap = m->entries_cap ? m->entries_cap * 2 : 1024;
    tok_entry *entries = realloc(m->entries, cap * sizeof *entries);
    if (!entries) return NULL;
    m->entries = entries;
    m->entries_cap = cap;
  }
  if (m->arena_len + n + 1 > m->arena_cap) {
    size_t cap = m->arena_cap ? m->arena_cap : 4096;
    while (cap < m->arena_len + n + 1) cap *= 2;
    char *arena = realloc(m->arena, cap);
    if (!arena) return NULL;
    m->arena = arena;
    m->arena_cap = cap;
  }
  tok_entry *e = &m->entries[m->count];
  e->off = m->arena_len;
  e->len = (uint32_t)n;
  e->v1 = e->v2 = -1;
  if (n) memcpy(m->arena + m->arena_len, key, n);
  m->arena_len += n;
  m->arena[m->arena_len++] = 0;
  m->slots[i].hash = (uint32_t)h;
  m->slots[i].entry = (int32_t)m->count;
  m->count++;
  *fresh = true;
  return e;
}

static void strmap_clear(tok_strmap *m) {
  m->arena_len = 0;
  m->count = 0;
  if (m->slots)
    for (size_t i = 0; i <= m->mask; i++) m->slots[i].entry = -1;
}

/* ---- pair (left id, right id) -> (rank, new id) ---- */

typedef struct {
  uint64_t key;
  int32_t rank;     /* -1: empty slot */
  int32_t new_id;
} tok_pair_slot;

static inline uint64_t pair_key(int32_t a, int32_t b) { return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b; }

static inline size_t pair_hash(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdull;
  k ^= k >> 33;
  return (size_t)k;
}

/* ---- the model ---- */

struct pmp_tok_bpe {
  int byte_level, ignore_merges, byte_fallback, fuse_unk;
  int32_t unk_id;
  char *prefix, *suffix;
  size_t prefix_len, suffix_len;
  tok_strmap vocab;                 /* key -> v1 = id */
  tok_pair_slot *pairs;
  size_t pair_mask, pair_count;
  int32_t nmerges;
  int32_t byte_id[256];             /* byte-level: the id of each single byte; char mode: ASCII chars */
  bool split_at_meta;               /* no token has U+2581 right after another character: words can
                                       be cut before every run of U+2581 (see pmp_tok_bpe_finish) */
  int32_t fallback_id[256];         /* ids of <0xNN>, -1 when missing */
  /* cache of finished pre-tokens: key -> (v1 = offset in cache_ids, v2 = count) */
  int cache_enabled;
  tok_strmap cache;
  int32_t *cache_ids;
  size_t cache_ids_len, cache_ids_cap;
  /* scratch for the merge loop */
  int32_t *sym_id, *sym_prev, *sym_next;
  size_t sym_cap;
  uint64_t *heap;
  char *tmp;
  size_t tmp_cap;
};

/* A heap item is rank << 32 | position: smallest first. Each rank belongs to one pair, so an item
 * is still valid when the pair now at `position` has that rank. */
typedef uint64_t tok_heap_item;

/* GPT-2's byte-to-unicode table: printable Latin-1 bytes stand for themselves, the rest map to
 * 256 + n in increasing byte order. Filled on first use (every thread computes the same values). */
static uint16_t byte_to_cp[256];
static int16_t cp_to_byte[512];
static volatile int byte_tables_ready;

static void byte_level_tables(void) {
  if (byte_tables_ready) return;
  int n = 0;
  for (int i = 0; i < 512; i++) cp_to_byte[i] = -1;
  for (int b = 0; b < 256; b++) {
    bool keep = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    byte_to_cp[b] = (uint16_t)(keep ? b : 256 + n++);
    cp_to_byte[byte_to_cp[b]] = (int16_t)b;
  }
  byte_tables_ready = 1;
}

int pmp_tok_byte_to_unicode(int byte) {
  byte_level_tables();
  return byte >= 0 && byte < 256 ? byte_to_cp[byte] : -1;
}

static char *dup_str(const char *s, size_t *len) {
  size_t n = s ? strlen(s) : 0;
  char *d = malloc(n + 1);
  if (d) {
    if (n) memcpy(d, s, n);
    d[n] = 0;
  }
  *len = n;
  return d;
}

pmp_tok_bpe *pmp_tok_bpe_new(int byte_level, int ignore_merges, int byte_fallback, int fuse_unk, int32_t unk_id,
                             const char *continuing_subword_prefix, const char *end_of_word_suffix) {
  pmp_tok_bpe *m = calloc(1, sizeof *m);
  if (!m) return pmp_fail("tokenizer: out of memory");
  m->byte_level = byte_level;
  m->ignore_merges = ignore_merges;
  m->byte_fallback = byte_fallback;
  m->fuse_unk = fuse_unk;
  m->unk_id = unk_id;
  m->cache_enabled = 1;
  m->prefix = dup_str(continuing_subword_prefix, &m->prefix_len);
  m->suffix = dup_str(end_of_word_suffix, &m->suffix_len);
  if (!m->prefix || !m->suffix) {
    pmp_tok_bpe_free(m);
    return pmp_fail("tokenizer: out of memory");
  }
  if (byte_level && (m->prefix_len || m->suffix_len)) {
    pmp_tok_bpe_free(m);
    return pmp_fail("tokenizer: byte-level mode does not take a subword prefix or suffix");
  }
  for (int i = 0; i < 256; i++) m->byte_id[i] = m->fallback_id[i] = -1;
  return m;
}

void pmp_tok_bpe_free(pmp_tok_bpe *m) {
  if (!m) return;
  strmap_free(&m->vocab);
  strmap_free(&m->cache);
  free(m->pairs);
  free(m->prefix);
  free(m->suffix);
  free(m->cache_ids);
  free(m->sym_id);
  free(m->sym_prev);
  free(m->sym_next);
  free(m->heap);
  free(m->tmp);
  free(m);
}

static bool ensure_tmp(pmp_tok_bpe *m, size_t n) {
  if (n <= m->tmp_cap) return true;
  size_t cap = m->tmp_cap ? m->tmp_cap : 256;
  while (cap < n) cap *= 2;
  char *t = realloc(m->tmp, cap);
  if (!t) return false;
  m->tmp = t;
  m->tmp_cap = cap;
  return true;
}

/* Byte-level mode: the raw bytes a vocabulary string stands for, in m->tmp. Returns the length, or -1
 * when the string has a character outside the byte-to-unicode image (or is not UTF-8). */
static int64_t to_raw_bytes(pmp_tok_bpe *m, const char *s, size_t n) {
  byte_level_tables();
  if (!ensure_tmp(m, n + 1)) return -2;
  const unsigned char *u = (const unsigned char *)s;
  size_t out = 0;
  for (size_t i = 0; i < n;) {
    uint32_t cp;
    if (u[i] < 0x80) {
      cp = u[i++];
    } else if ((u[i] & 0xE0) == 0xC0 && i + 1 < n) {
      cp = ((uint32_t)(u[i] & 0x1F) << 6) | (u[i + 1] & 0x3F);
      i += 2;
    } else {
      return -1;   /* every mapped code point is below U+0200: two bytes at most */
    }
    if (cp >= 512 || cp_to_byte[cp] < 0) return -1;
    m->tmp[out++] = (char)cp_to_byte[cp];
  }
  return (int64_t)out;
}

int pmp_tok_bpe_add_token(pmp_tok_bpe *m, const char *s, int64_t n, int32_t id) {
  const char *key = s;
  int64_t len = n;
  if (n < 0 || n > 0x7fffffff) return pmp_fail_code("tokenizer: vocabulary entry of bad length");
  if (m->byte_level) {
    len = to_raw_bytes(m, s, (size_t)n);
    if (len == -2) return pmp_fail_code("tokenizer: out of memory");
    if (len < 0) return 0;   /* cannot come out of byte-level BPE */
    key = m->tmp;
  }
  bool fresh;
  tok_entry *e = strmap_put(&m->vocab, key, (size_t)len, &fresh);
  if (!e) return pmp_fail_code("tokenizer: out of memory");
  e->v1 = id;
  if (len == 1) m->byte_id[(unsigned char)key[0]] = id;
  return 0;
}

static bool pairs_grow(pmp_tok_bpe *m) {
  size_t n = m->pairs ? (m->pair_mask + 1) * 2 : 4096;
  tok_pair_slot *p = malloc(n * sizeof *p);
  if (!p) return false;
  for (size_t i = 0; i < n; i++) p[i].rank = -1;
  if (m->pairs) {
    for (size_t i = 0; i <= m->pair_mask; i++) {
      if (m->pairs[i].rank < 0) continue;
      size_t j = pair_hash(m->pairs[i].key) & (n - 1);
      while (p[j].rank >= 0) j = (j + 1) & (n - 1);
      p[j] = m->pairs[i];
    }
  }
  free(m->pairs);
  m->pairs = p;
  m->pair_mask = n - 1;
  return true;
}

static inline const tok_pair_slot *pair_get(const pmp_tok_bpe *m, int32_t a, int32_t b) {
  if (!m->pairs) return NULL;
  uint64_t k = pair_key(a, b);
  for (size_t i = pair_hash(k) & m->pair_mask;; i = (i + 1) & m->pair_mask) {
    const tok_pair_slot *s = &m->pairs[i];
    if (s->rank < 0) return NULL;
    if (s->key == k) return s;
  }
}

static int32_t lookup_id(pmp_tok_bpe *m, const char *s, size_t n, bool *mappable) {
  const char *key = s;
  int64_t len = (int64_t)n;
  *mappable = true;
  if (m->byte_level) {
    len = to_raw_bytes(m, s, n);
    if (len < 0) {
      *mappable = false;
      return -1;
    }
    key = m->tmp;
  }
  tok_entry *e = strmap_get(&m->vocab, key, (size_t)len);
  return e ? e->v1 : -1;
}

static void quote_token(char *buf, size_t size, const char *s, size_t n) {
  size_t k = n < 60 ? n : 60;
  snprintf(buf, size, "%.*s%s", (int)k, s, n > k ? "..." : "");
}

/* Merge number `rank` (0-based order in the file): a + b (b without the subword prefix) -> vocab entry.
 * A later duplicate of the same pair replaces the earlier rank, as the reference's map does. */
int pmp_tok_bpe_add_merge(pmp_tok_bpe *m, const char *a, int64_t an, const char *b, int64_t bn) {
  int32_t rank = m->nmerges;
  if (an < 0 || bn < 0) return pmp_fail_code("merge of bad length");
  char q[80];
  bool ok_a, ok_b, ok_c;
  int32_t ia = lookup_id(m, a, (size_t)an, &ok_a);
  if (ia < 0) {
    quote_token(q, sizeof q, a, (size_t)an);
    return pmp_fail_code("token \"%s\" is not in the vocabulary", q);
  }
  int32_t ib = lookup_id(m, b, (size_t)bn, &ok_b);
  if (ib < 0) {
    quote_token(q, sizeof q, b, (size_t)bn);
    return pmp_fail_code("token \"%s\" is not in the vocabulary", q);
  }
  size_t cut = m->prefix_len;
  if ((size_t)bn < cut) cut = (size_t)bn;
  size_t rn = (size_t)bn - cut;
  char *joined = malloc((size_t)an + rn + 1);
  if (!joined) return pmp_fail_code("tokenizer: out of memory");
  memcpy(joined, a, (size_t)an);
  memcpy(joined + an, b + cut, rn);
  int32_t ic = lookup_id(m, joined, (size_t)an + rn, &ok_c);
  if (ic < 0) {
    quote_token(q, sizeof q, joined, (size_t)an + rn);
    free(joined);
    return pmp_fail_code("merged token \"%s\" is not in the vocabulary", q);
  }
  free(joined);
  m->nmerges++;
  if (!m->pairs || (m->pair_count + 1) * 2 > m->pair_mask + 1)
    if (!pairs_grow(m)) return pmp_fail_code("tokenizer: out of memory");
  uint64_t k = pair_key(ia, ib);
  size_t i = pair_hash(k) & m->pair_mask;
  while (m->pairs[i].rank >= 0 && m->pairs[i].key != k) i = (i + 1) & m->pair_mask;
  if (m->pairs[i].rank < 0) m->pair_count++;
  m->pairs[i].key = k;
  m->pairs[i].rank = rank;
  m->pairs[i].new_id = ic;
  return 0;
}

static const char META[3] = {(char)0xE2, (char)0x96, (char)0x81};   /* U+2581, SentencePiece's space */

/* Does a vocabulary string hold U+2581 right after a character other than U+2581? */
static bool meta_inside(const char *s, size_t n) {
  for (size_t i = 3; i + 3 <= n; i++)
    if (memcmp(s + i, META, 3) == 0 && memcmp(s + i - 3, META, 3) != 0) return true;
  return false;
}

/* Call once after all tokens are in: finds the byte-fallback tokens and the ASCII shortcut table, and
 * whether words may be cut before runs of U+2581. SentencePiece-style models have no pre-tokenizer,
 * so the whole text is one word; when no token holds U+2581 after another character, no merge can
 * join the symbols on both sides of such a cut, and the cut changes nothing but the speed (the
 * pieces also become cacheable). */
int pmp_tok_bpe_finish(pmp_tok_bpe *m) {
  m->split_at_meta = !m->byte_level && m->prefix_len == 0 && m->suffix_len == 0;
  for (size_t e = 0; e < m->vocab.count && m->split_at_meta; e++)
    if (meta_inside(m->vocab.arena + m->vocab.entries[e].off, m->vocab.entries[e].len)) m->split_at_meta = false;
  for (int b = 0; b < 256; b++) {
    char name[8];
    snprintf(name, sizeof name, "<0x%02X>", b);
    bool ok;
    m->fallback_id[b] = lookup_id(m, name, 6, &ok);
  }
  if (!m->byte_level) {
    /* char mode: byte_id holds ASCII characters only, usable when no prefix/suffix is attached */
    for (int b = 0; b < 256; b++) m->byte_id[b] = -1;
    for (int b = 0; b < 128; b++) {
      char c = (char)b;
      tok_entry *e = strmap_get(&m->vocab, &c, 1);
      m->byte_id[b] = e ? e->v1 : -1;
    }
  }
  return 0;
}

int32_t pmp_tok_bpe_lookup(pmp_tok_bpe *m, const char *s, int64_t n) {
  tok_entry *e = strmap_get(&m->vocab, s, (size_t)n);
  return e ? e->v1 : -1;
}

int64_t pmp_tok_bpe_merge_count(const pmp_tok_bpe *m) { return m->nmerges; }

void pmp_tok_bpe_set_cache(pmp_tok_bpe *m, int enabled) {
  m->cache_enabled = enabled;
  strmap_clear(&m->cache);
  m->cache_ids_len = 0;
}

/* ---- id buffers ---- */

pmp_tok_ids *pmp_tok_ids_new(void) {
  pmp_tok_ids *b = calloc(1, sizeof *b);
  if (!b) return pmp_fail("tokenizer: out of memory");
  return b;
}

void pmp_tok_ids_free(pmp_tok_ids *b) {
  if (!b) return;
  free(b->data);
  free(b);
}

static bool ids_reserve(pmp_tok_ids *b, int64_t extra) {
  if (b->len + extra <= b->cap) return true;
  int64_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + extra) cap *= 2;
  int32_t *d = realloc(b->data, (size_t)cap * sizeof *d);
  if (!d) return false;
  b->data = d;
  b->cap = cap;
  return true;
}

int pmp_tok_ids_push(pmp_tok_ids *b, int32_t id) {
  if (!ids_reserve(b, 1)) return pmp_fail_code("tokenizer: out of memory");
  b->data[b->len++] = id;
  return 0;
}

/* ---- the merge loop ---- */

static bool ensure_symbols(pmp_tok_bpe *m, size_t n) {
  if (n <= m->sym_cap) return true;
  size_t cap = m->sym_cap ? m->sym_cap : 256;
  while (cap < n) cap *= 2;
  int32_t *a = realloc(m->sym_id, cap * sizeof *a);
  if (!a) return false;
  m->sym_id = a;
  a = realloc(m->sym_prev, cap * sizeof *a);
  if (!a) return false;
  m->sym_prev = a;
  a = realloc(m->sym_next, cap * sizeof *a);
  if (!a) return false;
  m->sym_next = a;
  tok_heap_item *h = realloc(m->heap, cap * 3 * sizeof *h);   /* n-1 pushes + 2 per merge */
  if (!h) return false;
  m->heap = h;
  m->sym_cap = cap;
  return true;
}

static inline void heap_push(tok_heap_item *heap, size_t *n, tok_heap_item item) {
  size_t i = (*n)++;
  while (i > 0) {
    size_t p = (i - 1) / 2;
    if (heap[p] <= item) break;
    heap[i] = heap[p];
    i = p;
  }
  heap[i] = item;
}

static inline void heap_sift_down(tok_heap_item *heap, size_t count, size_t i) {
  tok_heap_item item = heap[i];
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= count) break;
    if (c + 1 < count && heap[c + 1] < heap[c]) c++;
    if (heap[c] >= item) break;
    heap[i] = heap[c];
    i = c;
  }
  heap[i] = item;
}

static inline tok_heap_item heap_pop(tok_heap_item *heap, size_t *n) {
  tok_heap_item top = heap[0];
  heap[0] = heap[--(*n)];
  if (*n) heap_sift_down(heap, *n, 0);
  return top;
}

static inline tok_heap_item heap_item(int32_t rank, int32_t pos) {
  return ((uint64_t)(uint32_t)rank << 32) | (uint32_t)pos;
}

/* Merges symbols 0..n-1 (ids in sym_id) in place; the result is the list linked by sym_next from 0. */
static void merge_symbols(pmp_tok_bpe *m, size_t n) {
  int32_t *id = m->sym_id, *prev = m->sym_prev, *next = m->sym_next;
  for (size_t i = 0; i < n; i++) {
    prev[i] = (int32_t)i - 1;
    next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
  }
  if (n < 2 || !m->pairs) return;
  if (n <= 12) {
    /* short words: scan for the lowest-ranked pair each time (same result as the heap) */
    size_t live = n;
    while (live > 1) {
      int32_t best_rank = INT32_MAX, best_pos = -1, best_new = -1;
      for (int32_t i = 0; next[i] >= 0; i = next[i]) {
        const tok_pair_slot *p = pair_get(m, id[i], id[next[i]]);
        if (p && p->rank < best_rank) {
          best_rank = p->rank;
          best_pos = i;
          best_new = p->new_id;
        }
      }
      if (best_pos < 0) break;
      int32_t r = next[best_pos];
      id[best_pos] = best_new;
      next[best_pos] = next[r];
      if (next[r] >= 0) prev[next[r]] = best_pos;
      id[r] = -1;
      live--;
    }
    return;
  }
  tok_heap_item *heap = m->heap;
  size_t hn = 0;
  for (size_t i = 0; i + 1 < n; i++) {
    const tok_pair_slot *p = pair_get(m, id[i], id[i + 1]);
    if (p) heap[hn++] = heap_item(p->rank, (int32_t)i);
  }
  for (size_t i = hn / 2; i-- > 0;) heap_sift_down(heap, hn, i);   /* heapify */
  while (hn) {
    tok_heap_item top = heap_pop(heap, &hn);
    int32_t pos = (int32_t)(uint32_t)top, rank = (int32_t)(top >> 32);
    if (id[pos] < 0) continue;                  /* merged into its left neighbour */
    int32_t r = next[pos];
    if (r < 0) continue;
    const tok_pair_slot *p = pair_get(m, id[pos], id[r]);
    if (!p || p->rank != rank) continue;        /* the pair here changed */
    id[pos] = p->new_id;
    next[pos] = next[r];
    if (next[r] >= 0) prev[next[r]] = pos;
    id[r] = -1;
    if (prev[pos] >= 0) {
      int32_t l = prev[pos];
      const tok_pair_slot *q = pair_get(m, id[l], id[pos]);
      if (q) heap_push(heap, &hn, heap_item(q->rank, l));
    }
    if (next[pos] >= 0) {
      const tok_pair_slot *q = pair_get(m, id[pos], id[next[pos]]);
      if (q) heap_push(heap, &hn, heap_item(q->rank, pos));
    }
  }
}

static inline int utf8_len(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c & 0xE0) == 0xC0) return 2;
  if ((c & 0xF0) == 0xE0) return 3;
  if ((c & 0xF8) == 0xF0) return 4;
  return 1;
}

static inline bool all_fallback(const pmp_tok_bpe *m, const unsigned char *s, size_t n) {
  for (size_t j = 0; j < n; j++)
    if (m->fallback_id[s[j]] < 0) return false;
  return true;
}

/* Initial symbols of a word. Unknown pieces become byte-fallback tokens, else (fused) unk, else are
 * dropped, in the reference's order (a pending unk is written when the next known piece arrives). */
static int64_t initial_symbols(pmp_tok_bpe *m, const unsigned char *s, size_t n) {
  size_t count = 0;
  int32_t unk_pending = -1;
  bool plain = m->prefix_len == 0 && m->suffix_len == 0;
  for (size_t i = 0; i < n;) {
    size_t clen = m->byte_level ? 1 : (size_t)utf8_len(s[i]);
    if (i + clen > n) clen = n - i;
    int32_t tid;
    if (m->byte_level || (plain && clen == 1)) {
      tid = m->byte_id[s[i]];
    } else if (plain) {
      tok_entry *e = strmap_get(&m->vocab, s + i, clen);
      tid = e ? e->v1 : -1;
    } else {
      size_t k = 0;
      if (!ensure_tmp(m, m->prefix_len + clen + m->suffix_len)) return -1;
      if (i > 0) {
        memcpy(m->tmp, m->prefix, m->prefix_len);
        k = m->prefix_len;
      }
      memcpy(m->tmp + k, s + i, clen);
      k += clen;
      if (i + clen >= n) {
        memcpy(m->tmp + k, m->suffix, m->suffix_len);
        k += m->suffix_len;
      }
      tok_entry *e = strmap_get(&m->vocab, m->tmp, k);
      tid = e ? e->v1 : -1;
      if (tid < 0 && m->byte_fallback && all_fallback(m, (const unsigned char *)m->tmp, k)) {
        /* the fallback spells the whole lookup string (prefix and suffix included) as bytes */
        if (!ensure_symbols(m, count + k)) return -1;
        for (size_t j = 0; j < k; j++) m->sym_id[count++] = m->fallback_id[(unsigned char)m->tmp[j]];
        i += clen;
        continue;
      }
    }
    if (tid >= 0) {
      if (!ensure_symbols(m, count + 2)) return -1;
      if (unk_pending >= 0) {
        m->sym_id[count++] = unk_pending;
        unk_pending = -1;
      }
      m->sym_id[count++] = tid;
    } else if (m->byte_fallback && all_fallback(m, s + i, clen)) {
      if (!ensure_symbols(m, count + clen)) return -1;
      for (size_t j = 0; j < clen; j++) m->sym_id[count++] = m->fallback_id[s[i + j]];
    } else if (m->unk_id >= 0) {
      if (unk_pending >= 0 && !m->fuse_unk) {
        if (!ensure_symbols(m, count + 1)) return -1;
        m->sym_id[count++] = unk_pending;
      }
      unk_pending = m->unk_id;
    }
    i += clen;
  }
  if (unk_pending >= 0) {
    if (!ensure_symbols(m, count + 1)) return -1;
    m->sym_id[count++] = unk_pending;
  }
  return (int64_t)count;
}

static int cache_store(pmp_tok_bpe *m, const char *s, size_t n, const int32_t *ids, size_t count) {
  if (m->cache.count >= 200000 || m->cache_ids_len + count > ((size_t)1 << 22)) {
    strmap_clear(&m->cache);
    m->cache_ids_len = 0;
  }
  if (m->cache_ids_len + count > m->cache_ids_cap) {
    size_t cap = m->cache_ids_cap ? m->cache_ids_cap : 65536;
    while (cap < m->cache_ids_len + count) cap *= 2;
    int32_t *d = realloc(m->cache_ids, cap * sizeof *d);
    if (!d) return 0;   /* the cache is an optimization: skip it */
    m->cache_ids = d;
    m->cache_ids_cap = cap;
  }
  bool fresh;
  tok_entry *e = strmap_put(&m->cache, s, n, &fresh);
  if (!e) return 0;
  e->v1 = (int32_t)m->cache_ids_len;
  e->v2 = (int32_t)count;
  memcpy(m->cache_ids + m->cache_ids_len, ids, count * sizeof *ids);
  m->cache_ids_len += count;
  return 0;
}

enum { TOK_CACHE_MAX_LEN = 256 };

static int encode_word(pmp_tok_bpe *m, const char *s, int64_t n, pmp_tok_ids *out);

int pmp_tok_bpe_encode(pmp_tok_bpe *m, const char *s, int64_t n, pmp_tok_ids *out) {
  if (n <= 0) return 0;
  if (m->ignore_merges) {   /* the whole pre-token, before any cut */
    tok_entry *e = strmap_get(&m->vocab, s, (size_t)n);
    if (e) return pmp_tok_ids_push(out, e->v1);
  }
  if (!m->split_at_meta || n < 16) return encode_word(m, s, n, out);
  int64_t start = 0;
  for (int64_t i = 3; i + 3 <= n; i++) {
    if (memcmp(s + i, META, 3) == 0 && memcmp(s + i - 3, META, 3) != 0) {
      if (encode_word(m, s + start, i - start, out) < 0) return -1;
      start = i;
    }
  }
  return encode_word(m, s + start, n - start, out);
}

static int encode_word(pmp_tok_bpe *m, const char *s, int64_t n, pmp_tok_ids *out) {
  bool cacheable = m->cache_enabled && n < TOK_CACHE_MAX_LEN;
  if (cacheable) {
    tok_entry *e = strmap_get(&m->cache, s, (size_t)n);
    if (e) {
      if (!ids_reserve(out, e->v2)) return pmp_fail_code("tokenizer: out of memory");
      memcpy(out->data + out->len, m->cache_ids + e->v1, (size_t)e->v2 * sizeof(int32_t));
      out->len += e->v2;
      return 0;
    }
  }
  int64_t count = initial_symbols(m, (const unsigned char *)s, (size_t)n);
  if (count < 0) return pmp_fail_code("tokenizer: out of memory");
  if (!ensure_symbols(m, (size_t)count + 1)) return pmp_fail_code("tokenizer: out of memory");
  merge_symbols(m, (size_t)count);
  int64_t start = out->len;
  if (!ids_reserve(out, count)) return pmp_fail_code("tokenizer: out of memory");
  if (count > 0)
    for (int32_t i = 0; i >= 0; i = m->sym_next[i]) out->data[out->len++] = m->sym_id[i];
  if (cacheable && count > 0) cache_store(m, s, (size_t)n, out->data + start, (size_t)(out->len - start));
  return 0;
}
