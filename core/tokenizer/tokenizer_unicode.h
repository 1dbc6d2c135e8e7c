/* tokenizer_unicode.h — the tables of tokenizer_unicode.c (generated): how the reference tokenizer's
 * regex classes differ from the linked PCRE2's, as code-point ranges [lo, hi] stored pairwise. Every rewrite is an
 * addition: where PCRE2's class is too large the class is spelled out in full (base NULL). */
#ifndef PMP_TOKENIZER_UNICODE_H
#define PMP_TOKENIZER_UNICODE_H
#include <stdint.h>

typedef struct {
  const char *name;        /* escape: "L", "Lu", ... (as in \p{L}), "s", "d", "w" */
  const char *base;        /* PCRE2 spelling of the class, NULL when add is the whole class */
  const uint32_t *add;     /* ranges the reference matches and PCRE2's base does not */
  int nadd;
} tok_uclass;

extern const tok_uclass pmp_tok_uclasses[];   /* ends with a NULL name */

/* Code points (ranges, pairwise) that the reference's normalizer treats as inert starters while
 * utf8proc normalizes them: text is split there and the pieces are normalized on their own. */
extern const uint32_t *const pmp_tok_norm_inert;
extern const int pmp_tok_norm_inert_count;

/* Lowercase mappings (pairs: code point, lowercase; sorted) where the reference differs from
 * utf8proc_tolower, and ranges whose combining-mark test (StripAccents) is the opposite of utf8proc's. */
extern const uint32_t *const pmp_tok_lower_delta;
extern const int pmp_tok_lower_delta_count;
extern const uint32_t *const pmp_tok_mark_flip;
extern const int pmp_tok_mark_flip_count;
#endif
