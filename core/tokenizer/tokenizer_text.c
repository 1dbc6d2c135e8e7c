/* tokenizer_text.c — text helpers for the tokenizer: UTF-8 validation and lossy decoding, Unicode
 * normalization (NFC/NFD/NFKC/NFKD through utf8proc), lowercasing, accent stripping, whitespace strip.
 *
 * Functions that return text write it to a per-thread buffer and return a pointer to it (valid until
 * the next call on the same thread) with its length in *out_len; NULL with pmp_last_error() on failure. */
#include "internal.h"
#include <utf8proc.h>
#include "tokenizer/tokenizer_unicode.h"

static _Thread_local char *text_buf;
static _Thread_local size_t text_cap;

static char *text_reserve(size_t n) {
  if (n + 1 > text_cap) {
    size_t cap = text_cap ? text_cap : 4096;
    while (cap < n + 1) cap *= 2;
    char *b = realloc(text_buf, cap);
    if (!b) return NULL;
    text_buf = b;
    text_cap = cap;
  }
  return text_buf;
}

/* Length of the well-formed UTF-8 sequence at s[0..n), or 0 when it is not one. When it is not,
 * *bad gets how many bytes form the maximal invalid subpart (at least 1), as Unicode's "substitution
 * of maximal subparts" (and Rust's from_utf8_lossy) count them. */
static size_t utf8_seq(const unsigned char *s, size_t n, size_t *bad) {
  unsigned char b = s[0];
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b < 0x80) return 1;
  if (b >= 0xC2 && b <= 0xDF) need = 1;
  else if (b == 0xE0) { need = 2; lo = 0xA0; }
  else if (b >= 0xE1 && b <= 0xEC) need = 2;
  else if (b == 0xED) { need = 2; hi = 0x9F; }
  else if (b >= 0xEE && b <= 0xEF) need = 2;
  else if (b == 0xF0) { need = 3; lo = 0x90; }
  else if (b >= 0xF1 && b <= 0xF3) need = 3;
  else if (b == 0xF4) { need = 3; hi = 0x8F; }
  else {
    *bad = 1;
    return 0;
  }
  size_t i = 1;
  for (; i <= need; i++) {
    if (i >= n) break;
    unsigned char c = s[i];
    unsigned char l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xBF;
    if (c < l || c > h) break;
  }
  if (i > need) return need + 1;
  *bad = i;
  return 0;
}

int64_t pmp_tok_utf8_check(const char *s, int64_t n) {
  const unsigned char *u = (const unsigned char *)s;
  int64_t i = 0;
  while (i < n) {
    /* ASCII runs eight bytes at a time */
    while (i + 8 <= n) {
      uint64_t w;
      memcpy(&w, u + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    if (u[i] < 0x80) {
      i++;
      continue;
    }
    size_t bad;
    size_t len = utf8_seq(u + i, (size_t)(n - i), &bad);
    if (!len) return i;
    i += (int64_t)len;
  }
  return -1;
}

const char *pmp_tok_utf8_lossy(const char *s, int64_t n, int64_t *out_len) {
  const unsigned char *u = (const unsigned char *)s;
  char *out = text_reserve((size_t)n * 3 + 3);
  if (!out) return pmp_fail("tokenizer: out of memory");
  size_t o = 0;
  for (int64_t i = 0; i < n;) {
    size_t bad;
    size_t len = utf8_seq(u + i, (size_t)(n - i), &bad);
    if (len) {
      memcpy(out + o, u + i, len);
      o += len;
      i += (int64_t)len;
    } else {
      memcpy(out + o, "\xEF\xBF\xBD", 3);
      o += 3;
      i += (int64_t)bad;
    }
  }
  *out_len = (int64_t)o;
  return out;
}

static bool all_ascii(const char *s, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if ((unsigned char)s[i] >= 0x80) return false;
  return true;
}

static inline int32_t decode_cp(const unsigned char *s, size_t *len);

/* Is cp in the sorted ranges r[0..n) (pairs lo, hi)? */
static bool in_ranges(const uint32_t *r, int n, int32_t cp) {
  int lo = 0, hi = n - 1;
  while (lo <= hi) {
    int mid = (lo + hi) / 2;
    if ((uint32_t)cp < r[2 * mid]) hi = mid - 1;
    else if ((uint32_t)cp > r[2 * mid + 1]) lo = mid + 1;
    else return true;
  }
  return false;
}

/* Is cp one of the code points the reference's normalizer treats as inert (tokenizer_unicode.c)? */
static bool norm_inert(int32_t cp) { return in_ranges(pmp_tok_norm_inert, pmp_tok_norm_inert_count, cp); }

/* The reference's lowercase of one code point (one code point out, except U+0130). */
static int32_t lower_cp(int32_t cp) {
  int lo = 0, hi = pmp_tok_lower_delta_count - 1;
  while (lo <= hi) {
    int mid = (lo + hi) / 2;
    if ((uint32_t)cp < pmp_tok_lower_delta[2 * mid]) hi = mid - 1;
    else if ((uint32_t)cp > pmp_tok_lower_delta[2 * mid]) lo = mid + 1;
    else return (int32_t)pmp_tok_lower_delta[2 * mid + 1];
  }
  return utf8proc_tolower(cp);
}

static bool is_mark(int32_t cp) {
  utf8proc_category_t c = utf8proc_category(cp);
  bool mark = c == UTF8PROC_CATEGORY_MN || c == UTF8PROC_CATEGORY_MC || c == UTF8PROC_CATEGORY_ME;
  return in_ranges(pmp_tok_mark_flip, pmp_tok_mark_flip_count, cp) ? !mark : mark;
}

/* Appends the normalization of s[0..n) to the text buffer at *o. */
static bool normalize_into(const char *s, int64_t n, int options, size_t *o) {
  if (n == 0) return true;
  utf8proc_uint8_t *dst = NULL;
  utf8proc_ssize_t len = utf8proc_map((const utf8proc_uint8_t *)s, n, &dst, (utf8proc_option_t)options);
  if (len < 0) {
    pmp_fail("tokenizer: normalization failed: %s", utf8proc_errmsg(len));
    return false;
  }
  char *out = text_reserve(*o + (size_t)len);
  if (!out) {
    free(dst);
    pmp_fail("tokenizer: out of memory");
    return false;
  }
  memcpy(out + *o, dst, (size_t)len);
  *o += (size_t)len;
  free(dst);
  return true;
}

/* form: 0 NFC, 1 NFD, 2 NFKC, 3 NFKD. s must be valid UTF-8. Characters newer than the reference's
 * normalization tables stay as they are and split the text: it treats them as inert starters, across
 * which nothing reorders or composes. */
const char *pmp_tok_normalize(const char *s, int64_t n, int form, int64_t *out_len) {
  if (form < 0 || form > 3) return pmp_fail("tokenizer: unknown normalization form %d", form);
  if (!text_reserve((size_t)n)) return pmp_fail("tokenizer: out of memory");
  if (all_ascii(s, n)) {   /* ASCII is already in every normal form */
    memcpy(text_buf, s, (size_t)n);
    *out_len = n;
    return text_buf;
  }
  int options = UTF8PROC_STABLE;
  options |= (form == 0 || form == 2) ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE;
  if (form >= 2) options |= UTF8PROC_COMPAT;
  const unsigned char *u = (const unsigned char *)s;
  size_t o = 0;
  int64_t start = 0;
  for (int64_t i = 0; i < n;) {
    if (u[i] < 0x80) {
      i++;
      continue;
    }
    size_t len;
    int32_t cp = decode_cp(u + i, &len);
    if (norm_inert(cp)) {
      if (!normalize_into(s + start, i - start, options, &o)) return NULL;
      char *out = text_reserve(o + len);
      if (!out) return pmp_fail("tokenizer: out of memory");
      memcpy(out + o, u + i, len);
      o += len;
      start = i + (int64_t)len;
    }
    i += (int64_t)len;
  }
  if (!normalize_into(s + start, n - start, options, &o)) return NULL;
  *out_len = (int64_t)o;
  return text_buf;
}

/* Decodes one code point of valid UTF-8. */
static inline int32_t decode_cp(const unsigned char *s, size_t *len) {
  unsigned char b = s[0];
  if (b < 0x80) { *len = 1; return b; }
  if (b < 0xE0) { *len = 2; return ((b & 0x1F) << 6) | (s[1] & 0x3F); }
  if (b < 0xF0) { *len = 3; return ((b & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F); }
  *len = 4;
  return ((b & 0x07) << 18) | ((s[1] & 0x3F) << 12) | ((s[2] & 0x3F) << 6) | (s[3] & 0x3F);
}

/* Per-character full lowercase mapping (each char on its own, no context rules). */
const char *pmp_tok_lowercase(const char *s, int64_t n, int64_t *out_len) {
  char *out = text_reserve((size_t)n * 2 + 8);
  if (!out) return pmp_fail("tokenizer: out of memory");
  const unsigned char *u = (const unsigned char *)s;
  size_t o = 0;
  for (int64_t i = 0; i < n;) {
    size_t len;
    int32_t cp = decode_cp(u + i, &len);
    i += (int64_t)len;
    if (cp == 0x130) {   /* LATIN CAPITAL LETTER I WITH DOT ABOVE -> i + COMBINING DOT ABOVE */
      o += (size_t)utf8proc_encode_char('i', (utf8proc_uint8_t *)out + o);
      o += (size_t)utf8proc_encode_char(0x307, (utf8proc_uint8_t *)out + o);
    } else {
      o += (size_t)utf8proc_encode_char(lower_cp(cp), (utf8proc_uint8_t *)out + o);
    }
  }
  *out_len = (int64_t)o;
  return out;
}

/* Drops combining marks (Mn, Mc, Me, by the reference's tables). */
const char *pmp_tok_strip_accents(const char *s, int64_t n, int64_t *out_len) {
  char *out = text_reserve((size_t)n);
  if (!out) return pmp_fail("tokenizer: out of memory");
  const unsigned char *u = (const unsigned char *)s;
  size_t o = 0;
  for (int64_t i = 0; i < n;) {
    size_t len;
    int32_t cp = decode_cp(u + i, &len);
    if (!is_mark(cp)) {
      memcpy(out + o, u + i, len);
      o += len;
    }
    i += (int64_t)len;
  }
  *out_len = (int64_t)o;
  return out;
}

/* Unicode White_Space. */
int pmp_tok_is_space(int32_t cp) {
  return (cp >= 9 && cp <= 13) || cp == 32 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

/* A word character as the reference's single_word test (Rust regex \w) counts it: Alphabetic,
 * marks, decimal digits, connector punctuation, joiners. Alphabetic is letters, letter numbers and
 * Other_Alphabetic, whose members outside the marks are the circled and squared Latin letters. */
int pmp_tok_is_word(int32_t cp) {
  if (cp < 0x80)
    return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') || cp == '_';
  if (cp == 0x200C || cp == 0x200D) return 1;
  if ((cp >= 0x24B6 && cp <= 0x24E9) || (cp >= 0x1F130 && cp <= 0x1F149) || (cp >= 0x1F150 && cp <= 0x1F169) ||
      (cp >= 0x1F170 && cp <= 0x1F189))
    return 1;
  switch (utf8proc_category(cp)) {
  case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT: case UTF8PROC_CATEGORY_LM:
  case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC:
  case UTF8PROC_CATEGORY_ME: case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_PC:
    return 1;
  default:
    return 0;
  }
}

/* Byte offsets [*start, *end) of s without leading (left) and/or trailing (right) White_Space. */
void pmp_tok_strip_space(const char *s, int64_t n, int left, int right, int64_t *start, int64_t *end) {
  const unsigned char *u = (const unsigned char *)s;
  int64_t a = 0, b = n;
  if (left) {
    while (a < n) {
      size_t len;
      int32_t cp = decode_cp(u + a, &len);
      if (!pmp_tok_is_space(cp)) break;
      a += (int64_t)len;
    }
  }
  if (right) {
    while (b > a) {
      int64_t k = b - 1;
      while (k > a && (u[k] & 0xC0) == 0x80) k--;
      size_t len;
      int32_t cp = decode_cp(u + k, &len);
      if (!pmp_tok_is_space(cp)) break;
      b = k;
    }
  }
  *start = a;
  *end = b;
}
