/* tokenizer_regex.c — regexes for tokenizer.json patterns, run with PCRE2 (UTF + UCP, JIT-compiled
 * when the library has a JIT).
 *
 * The reference runs these patterns with Oniguruma. Before compiling, a pattern is rewritten so that
 * PCRE2 means what Oniguruma means:
 *  - \p{X} / \P{X} for general categories (short or long names, any case) gain the code points that
 *    the reference's newer Unicode tables put in the class (tokenizer_unicode.c, generated);
 *  - \s \d \w (and their negations) match the reference's sets; \h \H are hex digits (Oniguruma), not
 *    horizontal space; \uHHHH becomes \x{HHHH}.
 * Everything else passes through unchanged. */
#include "internal.h"
#include <ctype.h>
#include <stdio.h>
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include "tokenizer/tokenizer_unicode.h"

/* ---- rewriting ---- */

typedef struct {
  char *p;
  size_t len, cap;
  bool oom;
} rbuf;

static void put(rbuf *b, const char *s, size_t n) {
  if (b->oom) return;
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
      b->oom = true;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = 0;
}

static void puts_(rbuf *b, const char *s) { put(b, s, strlen(s)); }

static void put_cp(rbuf *b, uint32_t cp) {
  char t[16];
  snprintf(t, sizeof t, "\\x{%X}", (unsigned)cp);
  puts_(b, t);
}

static void put_ranges(rbuf *b, const uint32_t *r, int n) {
  for (int i = 0; i < n; i++) {
    put_cp(b, r[2 * i]);
    if (r[2 * i + 1] != r[2 * i]) {
      put(b, "-", 1);
      put_cp(b, r[2 * i + 1]);
    }
  }
}

/* The complement of sorted ranges over all code points. */
static void put_complement(rbuf *b, const uint32_t *r, int n) {
  uint32_t next = 0;
  for (int i = 0; i < n; i++) {
    if (r[2 * i] > next) {
      put_cp(b, next);
      if (r[2 * i] - 1 != next) {
        put(b, "-", 1);
        put_cp(b, r[2 * i] - 1);
      }
    }
    next = r[2 * i + 1] + 1;
  }
  if (next <= 0x10FFFF) {
    put_cp(b, next);
    if (next != 0x10FFFF) {
      put(b, "-", 1);
      put_cp(b, 0x10FFFF);
    }
  }
}

static const char *const long_names[][2] = {
  {"letter", "L"}, {"uppercaseletter", "Lu"}, {"lowercaseletter", "Ll"}, {"titlecaseletter", "Lt"},
  {"modifierletter", "Lm"}, {"otherletter", "Lo"}, {"mark", "M"}, {"combiningmark", "M"},
  {"nonspacingmark", "Mn"}, {"spacingmark", "Mc"}, {"enclosingmark", "Me"}, {"number", "N"},
  {"decimalnumber", "Nd"}, {"letternumber", "Nl"}, {"othernumber", "No"}, {"punctuation", "P"},
  {"connectorpunctuation", "Pc"}, {"dashpunctuation", "Pd"}, {"openpunctuation", "Ps"},
  {"closepunctuation", "Pe"}, {"initialpunctuation", "Pi"}, {"finalpunctuation", "Pf"},
  {"otherpunctuation", "Po"}, {"symbol", "S"}, {"mathsymbol", "Sm"}, {"currencysymbol", "Sc"},
  {"modifiersymbol", "Sk"}, {"othersymbol", "So"}, {"separator", "Z"}, {"spaceseparator", "Zs"},
  {"lineseparator", "Zl"}, {"paragraphseparator", "Zp"}, {"other", "C"}, {"control", "Cc"}, {"format", "Cf"},
  {"privateuse", "Co"}, {"unassigned", "Cn"},
};

/* The table entry for a property name as written in \p{...} (loose matching, as Oniguruma does). */
static const tok_uclass *find_property(const char *s, size_t n) {
  char key[48];
  size_t k = 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (c == ' ' || c == '_' || c == '-') continue;
    if (k + 1 >= sizeof key) return NULL;
    key[k++] = (char)tolower((unsigned char)c);
  }
  key[k] = 0;
  if (k > 2 && key[0] == 'i' && key[1] == 's') {   /* \p{IsL} */
    memmove(key, key + 2, k - 1);
    k -= 2;
  }
  const char *shortname = NULL;
  for (size_t i = 0; i < sizeof long_names / sizeof long_names[0]; i++)
    if (strcmp(key, long_names[i][0]) == 0) shortname = long_names[i][1];
  for (const tok_uclass *c = pmp_tok_uclasses; c->name; c++) {
    if (strlen(c->name) > 2 || !isupper((unsigned char)c->name[0])) continue;   /* categories only */
    if (shortname ? strcmp(c->name, shortname) == 0 : strcasecmp(c->name, key) == 0) return c;
  }
  return NULL;
}

static const tok_uclass *find_escape(char name) {
  char s[2] = {name, 0};
  for (const tok_uclass *c = pmp_tok_uclasses; c->name; c++)
    if (strcmp(c->name, s) == 0) return c;
  return NULL;
}

/* Writes class c (negated or not) where it stands: inside a [...] set or on its own. original is
 * the escape as written, used where no exact spelling exists. */
static void put_class(rbuf *b, const tok_uclass *c, bool negated, bool inside, const char *original, size_t olen) {
  if (!negated) {
    if (!inside) put(b, "[", 1);
    if (c->base) puts_(b, c->base);
    put_ranges(b, c->add, c->nadd);
    if (!inside) put(b, "]", 1);
    return;
  }
  if (!inside) {
    put(b, "[^", 2);
    if (c->base) puts_(b, c->base);
    put_ranges(b, c->add, c->nadd);
    put(b, "]", 1);
  } else if (!c->base) {
    put_complement(b, c->add, c->nadd);
  } else {
    put(b, original, olen);   /* a negated class inside a set: only PCRE2's own spelling exists */
  }
}

static bool is_hex(char c) { return isxdigit((unsigned char)c) != 0; }

/* The rewritten pattern (malloc'd, NUL-terminated) or NULL when out of memory. */
static char *translate(const char *s, size_t n, size_t *out_len) {
  rbuf b = {0};
  int depth = 0;   /* inside [...] sets */
  for (size_t i = 0; i < n;) {
    char c = s[i];
    if (c == '\\' && i + 1 < n) {
      char d = s[i + 1];
      if (d == 'Q') {   /* \Q...\E: literal text */
        size_t j = i + 2;
        while (j < n && !(s[j] == '\\' && j + 1 < n && s[j + 1] == 'E')) j++;
        j = j < n ? j + 2 : n;
        put(&b, s + i, j - i);
        i = j;
        continue;
      }
      if (d == 'p' || d == 'P') {
        size_t j = i + 2, name_start, name_len;
        if (j < n && s[j] == '{') {
          size_t close = j + 1;
          while (close < n && s[close] != '}') close++;
          if (close >= n) {
            put(&b, s + i, n - i);
            break;
          }
          name_start = j + 1;
          name_len = close - name_start;
          j = close + 1;
        } else {
          name_start = j;
          name_len = j < n ? 1 : 0;
          j += name_len;
        }
        bool negated = d == 'P';
        if (name_len && s[name_start] == '^') {
          negated = !negated;
          name_start++;
          name_len--;
        }
        const tok_uclass *cls = find_property(s + name_start, name_len);
        if (cls) put_class(&b, cls, negated, depth > 0, s + i, j - i);
        else put(&b, s + i, j - i);
        i = j;
        continue;
      }
      if (strchr("sSdDwWhH", d)) {
        const tok_uclass *cls = find_escape((char)tolower((unsigned char)d));
        if (cls) put_class(&b, cls, isupper((unsigned char)d) != 0, depth > 0, s + i, 2);
        else put(&b, s + i, 2);
        i += 2;
        continue;
      }
      if (d == 'u' && i + 5 < n + 0 && is_hex(s[i + 2]) && is_hex(s[i + 3]) && is_hex(s[i + 4]) && is_hex(s[i + 5])) {
        put(&b, "\\x{", 3);
        put(&b, s + i + 2, 4);
        put(&b, "}", 1);
        i += 6;
        continue;
      }
      put(&b, s + i, 2);
      i += 2;
      continue;
    }
    if (depth > 0) {
      if (c == '[' && i + 1 < n && s[i + 1] == ':') {   /* [:alpha:] */
        size_t j = i + 2;
        while (j + 1 < n && !(s[j] == ':' && s[j + 1] == ']')) j++;
        j = j + 1 < n ? j + 2 : n;
        put(&b, s + i, j - i);
        i = j;
        continue;
      }
      if (c == '[') depth++;
      else if (c == ']') depth--;
      put(&b, &c, 1);
      i++;
      continue;
    }
    if (c == '[') {
      depth = 1;
      put(&b, "[", 1);
      i++;
      if (i < n && s[i] == '^') put(&b, s + i++, 1);
      if (i < n && s[i] == ']') put(&b, s + i++, 1);   /* a leading ] is literal */
      continue;
    }
    put(&b, &c, 1);
    i++;
  }
  if (!b.p) put(&b, "", 0);
  if (b.oom) {
    free(b.p);
    return NULL;
  }
  *out_len = b.len;
  return b.p;
}

/* For tests and inspection: the pattern PCRE2 is given, in a per-thread buffer. */
const char *pmp_tok_regex_translate(const char *pattern, int64_t n, int64_t *out_len) {
  static _Thread_local char *last;
  size_t len;
  char *t = translate(pattern, (size_t)n, &len);
  if (!t) return pmp_fail("tokenizer: out of memory");
  free(last);
  last = t;
  *out_len = (int64_t)len;
  return t;
}

/* ---- compiled regexes ---- */

struct pmp_tok_regex {
  pcre2_code *code;
  pcre2_match_data *md;
  pcre2_match_context *mctx;
  pcre2_jit_stack *jit_stack;
  int jit;
};

void pmp_tok_regex_free(pmp_tok_regex *r) {
  if (!r) return;
  if (r->md) pcre2_match_data_free(r->md);
  if (r->mctx) pcre2_match_context_free(r->mctx);
  if (r->jit_stack) pcre2_jit_stack_free(r->jit_stack);
  if (r->code) pcre2_code_free(r->code);
  free(r);
}

/* literal: match the pattern text as a plain string. */
pmp_tok_regex *pmp_tok_regex_new(const char *pattern, int64_t n, int literal) {
  pmp_tok_regex *r = calloc(1, sizeof *r);
  if (!r) return pmp_fail("tokenizer: out of memory");
  int err;
  PCRE2_SIZE erroff;
  uint32_t options = PCRE2_UTF | PCRE2_UCP;
  if (literal) {
    r->code = pcre2_compile((PCRE2_SPTR)pattern, (PCRE2_SIZE)n, PCRE2_UTF | PCRE2_LITERAL, &err, &erroff, NULL);
  } else {
    size_t len;
    char *t = translate(pattern, (size_t)n, &len);
    if (!t) {
      pmp_tok_regex_free(r);
      return pmp_fail("tokenizer: out of memory");
    }
    r->code = pcre2_compile((PCRE2_SPTR)t, (PCRE2_SIZE)len, options, &err, &erroff, NULL);
    free(t);
  }
  if (!r->code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    pmp_tok_regex_free(r);
    return pmp_fail("invalid regex: %s", (const char *)msg);
  }
  r->md = pcre2_match_data_create_from_pattern(r->code, NULL);
  r->mctx = pcre2_match_context_create(NULL);
  if (!r->md || !r->mctx) {
    pmp_tok_regex_free(r);
    return pmp_fail("tokenizer: out of memory");
  }
  if (pcre2_jit_compile(r->code, PCRE2_JIT_COMPLETE) == 0) {
    r->jit = 1;
    r->jit_stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, NULL);
    if (r->jit_stack) pcre2_jit_stack_assign(r->mctx, NULL, r->jit_stack);
  }
  return r;
}

int pmp_tok_regex_jit(const pmp_tok_regex *r) { return r->jit; }

/* First match at or after `from`: 1 with [*start, *end), 0 for none, -1 on a matching error. The
 * subject must be valid UTF-8 (it is not checked again). */
int pmp_tok_regex_find(pmp_tok_regex *r, const char *s, int64_t n, int64_t from, int64_t *start, int64_t *end) {
  int rc = r->jit ? pcre2_jit_match(r->code, (PCRE2_SPTR)s, (PCRE2_SIZE)n, (PCRE2_SIZE)from, 0, r->md, r->mctx)
                  : pcre2_match(r->code, (PCRE2_SPTR)s, (PCRE2_SIZE)n, (PCRE2_SIZE)from, PCRE2_NO_UTF_CHECK, r->md,
                                r->mctx);
  if (rc == PCRE2_ERROR_NOMATCH) return 0;
  if (rc < 0) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(rc, msg, sizeof msg);
    return pmp_fail_code("regex match failed: %s", (const char *)msg);
  }
  PCRE2_SIZE *ov = pcre2_get_ovector_pointer(r->md);
  *start = (int64_t)ov[0];
  *end = (int64_t)ov[1];
  return 1;
}
