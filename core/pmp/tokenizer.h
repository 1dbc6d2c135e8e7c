/* The C ABI, tokenizers: the fast parts of Hugging Face tokenizer.json support (core/tokenizer/).
 * Included through pmp.h, whose conventions hold here; lua/pmp/ffi.lua declares the region between the
 * CDEF markers to LuaJIT, so it holds plain C declarations only. */
#ifndef PMP_TOKENIZER_H
#define PMP_TOKENIZER_H

#include <stdint.h>

/* PMP_CDEF_BEGIN */

/* ==== tokenizer (core/tokenizer/): the fast parts of Hugging Face tokenizer.json support ====
 * Used by lua/pmp/tokenizer. Failures return -1 or NULL with pmp_last_error() set. Text arguments
 * are byte strings with explicit lengths; text returned as const char * lives in a per-thread
 * buffer until the next call of the same family. */
typedef struct pmp_tok_ids { int32_t *data; int64_t len; int64_t cap; } pmp_tok_ids;
pmp_tok_ids *pmp_tok_ids_new(void);
void pmp_tok_ids_free(pmp_tok_ids *b);
int pmp_tok_ids_push(pmp_tok_ids *b, int32_t id);

/* BPE model. byte_level: vocabulary strings of GPT-2 byte-to-unicode characters are keyed by the
 * bytes they stand for, and pre-tokens are raw bytes. unk_id -1: none. */
typedef struct pmp_tok_bpe pmp_tok_bpe;
pmp_tok_bpe *pmp_tok_bpe_new(int byte_level, int ignore_merges, int byte_fallback, int fuse_unk, int32_t unk_id,
                             const char *continuing_subword_prefix, const char *end_of_word_suffix);
void pmp_tok_bpe_free(pmp_tok_bpe *m);
int pmp_tok_bpe_add_token(pmp_tok_bpe *m, const char *s, int64_t n, int32_t id);
int pmp_tok_bpe_add_merge(pmp_tok_bpe *m, const char *a, int64_t an, const char *b, int64_t bn);  /* rank = order */
int pmp_tok_bpe_finish(pmp_tok_bpe *m);
int32_t pmp_tok_bpe_lookup(pmp_tok_bpe *m, const char *s, int64_t n);   /* in the model's key space; -1 */
int64_t pmp_tok_bpe_merge_count(const pmp_tok_bpe *m);
void pmp_tok_bpe_set_cache(pmp_tok_bpe *m, int enabled);
int pmp_tok_bpe_encode(pmp_tok_bpe *m, const char *s, int64_t n, pmp_tok_ids *out);   /* one pre-token */
int pmp_tok_byte_to_unicode(int byte);

/* Regexes: PCRE2 with UTF and Unicode properties, JIT-compiled when available; patterns are rewritten
 * first so their classes match what the reference's Oniguruma matches. */
typedef struct pmp_tok_regex pmp_tok_regex;
pmp_tok_regex *pmp_tok_regex_new(const char *pattern, int64_t n, int literal);
void pmp_tok_regex_free(pmp_tok_regex *r);
int pmp_tok_regex_jit(const pmp_tok_regex *r);
int pmp_tok_regex_find(pmp_tok_regex *r, const char *s, int64_t n, int64_t from, int64_t *start, int64_t *end);
/* the pattern as handed to PCRE2 (Unicode classes widened to the reference's tables) */
const char *pmp_tok_regex_translate(const char *pattern, int64_t n, int64_t *out_len);

/* Pre-tokenizer pipeline. behavior: 0 removed, 1 isolated, 2 merged_with_previous, 3 merged_with_next,
 * 4 contiguous. prepend_scheme: 0 always, 1 first, 2 never. */
typedef struct pmp_tok_pre pmp_tok_pre;
pmp_tok_pre *pmp_tok_pre_new(void);
void pmp_tok_pre_free(pmp_tok_pre *p);
int pmp_tok_pre_add_split(pmp_tok_pre *p, const char *pattern, int64_t n, int literal, int behavior, int invert);
int pmp_tok_pre_add_byte_level(pmp_tok_pre *p, int add_prefix_space, int use_regex, int map_bytes);
int pmp_tok_pre_add_metaspace(pmp_tok_pre *p, const char *replacement, int64_t n, int prepend_scheme, int split);
int pmp_tok_pre_count_steps(const pmp_tok_pre *p);
int64_t pmp_tok_pre_run(pmp_tok_pre *p, const char *s, int64_t n, int at_start);
const char *pmp_tok_pre_piece(pmp_tok_pre *p, int64_t i, int64_t *len);
/* pre-tokenize one normalized piece (p may be NULL) and BPE-encode it, appending to out */
int pmp_tok_encode_piece(pmp_tok_pre *p, pmp_tok_bpe *m, const char *s, int64_t n, int at_start, pmp_tok_ids *out);

/* Added tokens, matched leftmost-longest on the text. split returns (start, end, id) triples, id -1
 * for the text between tokens. */
typedef struct pmp_tok_added pmp_tok_added;
pmp_tok_added *pmp_tok_added_new(void);
void pmp_tok_added_free(pmp_tok_added *a);
int pmp_tok_added_add(pmp_tok_added *a, const char *s, int64_t n, int32_t id, int single_word, int lstrip, int rstrip);
int64_t pmp_tok_added_count(const pmp_tok_added *a);
const int64_t *pmp_tok_added_split(pmp_tok_added *a, const char *s, int64_t n, int64_t *count);

/* Text: UTF-8 check (-1 when valid, else the offset of the first bad byte), lossy decoding (bad
 * sequences become U+FFFD), normalization (form 0 NFC, 1 NFD, 2 NFKC, 3 NFKD), lowercase, accent
 * stripping, and White_Space trimming. */
int64_t pmp_tok_utf8_check(const char *s, int64_t n);
const char *pmp_tok_utf8_lossy(const char *s, int64_t n, int64_t *out_len);
const char *pmp_tok_normalize(const char *s, int64_t n, int form, int64_t *out_len);
const char *pmp_tok_lowercase(const char *s, int64_t n, int64_t *out_len);
const char *pmp_tok_strip_accents(const char *s, int64_t n, int64_t *out_len);
void pmp_tok_strip_space(const char *s, int64_t n, int left, int right, int64_t *start, int64_t *end);
int pmp_tok_is_space(int32_t cp);
int pmp_tok_is_word(int32_t cp);

/* SentencePiece models (tokenizer.model), run as the sentencepiece library runs them. model_type: 1
 * Unigram, 2 BPE. Pieces are added in id order with the file's type (1 normal, 2 unknown, 3 control,
 * 4 user-defined, 5 unused, 6 byte); the charsmap is NormalizerSpec.precompiled_charsmap. encode
 * normalizes, runs the model and applies byte fallback, appending ids to out. */
typedef struct pmp_tok_spm pmp_tok_spm;
pmp_tok_spm *pmp_tok_spm_new(int model_type, int byte_fallback);
void pmp_tok_spm_free(pmp_tok_spm *m);
int pmp_tok_spm_add_piece(pmp_tok_spm *m, const char *s, int64_t n, float score, int type);
void pmp_tok_spm_set_normalizer(pmp_tok_spm *m, int add_dummy_prefix, int remove_extra_whitespaces, int escape_whitespaces);
int pmp_tok_spm_set_charsmap(pmp_tok_spm *m, const char *blob, int64_t n);
int pmp_tok_spm_finish(pmp_tok_spm *m);
const char *pmp_tok_spm_normalize(pmp_tok_spm *m, const char *s, int64_t n, int add_dummy_prefix, int64_t *out_len);
int pmp_tok_spm_encode(pmp_tok_spm *m, const char *s, int64_t n, int add_dummy_prefix, pmp_tok_ids *out);

/* tiktoken-format BPE: load parses a whole ranks file ("base64-token rank" lines); a token's id is its
 * rank. encode_ordinary splits with the regex and merges each match (no special tokens). */
typedef struct pmp_tok_tiktoken pmp_tok_tiktoken;
pmp_tok_tiktoken *pmp_tok_tiktoken_new(const char *pattern, int64_t n);
void pmp_tok_tiktoken_free(pmp_tok_tiktoken *t);
int pmp_tok_tiktoken_load(pmp_tok_tiktoken *t, const char *data, int64_t n);
int32_t pmp_tok_tiktoken_size(const pmp_tok_tiktoken *t);
const char *pmp_tok_tiktoken_token(const pmp_tok_tiktoken *t, int32_t rank, int64_t *len);
int32_t pmp_tok_tiktoken_rank(pmp_tok_tiktoken *t, const char *s, int64_t n);   /* -1 when not a token */
int pmp_tok_tiktoken_encode_ordinary(pmp_tok_tiktoken *t, const char *s, int64_t n, pmp_tok_ids *out);

/* PMP_CDEF_END */

#endif
