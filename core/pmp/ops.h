/* The C ABI, ops: the op table's ids, the op profiler and every op front-end: conversions, views,
 * elementwise math, reductions, GEMM, neural-network and fused transformer ops, optimizer steps
 * (core/ops/, kernels in core/cpu/).
 * Included through pmp.h, whose conventions hold here; lua/pmp/ffi.lua declares the region between the
 * CDEF markers to LuaJIT, so it holds plain C declarations only. */
#ifndef PMP_OPS_H
#define PMP_OPS_H

#include <stdint.h>
#include "pmp/tensor.h"
#include "pmp/random.h"

/* PMP_CDEF_BEGIN */

/* The op table. Every op the engine can run has one entry: name, a kernel per device, a backward rule. */
typedef enum pmp_op_id {
  /* unary elementwise */
  PMP_OP_NEG, PMP_OP_EXP, PMP_OP_LOG, PMP_OP_SQRT, PMP_OP_RSQRT, PMP_OP_ABS, PMP_OP_SIN, PMP_OP_COS,
  PMP_OP_TANH, PMP_OP_SIGMOID, PMP_OP_RELU, PMP_OP_GELU, PMP_OP_GELU_TANH, PMP_OP_SILU, PMP_OP_SIGN,
  PMP_OP_LOGICAL_NOT,
  /* binary elementwise, broadcasting */
  PMP_OP_ADD, PMP_OP_SUB, PMP_OP_MUL, PMP_OP_DIV, PMP_OP_POW, PMP_OP_MAXIMUM, PMP_OP_MINIMUM,
  PMP_OP_EQ, PMP_OP_NE, PMP_OP_LT, PMP_OP_LE, PMP_OP_GT, PMP_OP_GE,
  PMP_OP_LOGICAL_AND, PMP_OP_LOGICAL_OR,
  PMP_OP_GELU_GRAD, PMP_OP_GELU_TANH_GRAD, PMP_OP_SILU_GRAD,   /* (x, dy) -> dx */
  /* other elementwise */
  PMP_OP_WHERE, PMP_OP_CLAMP, PMP_OP_MASKED_FILL, PMP_OP_TRIL, PMP_OP_TRIU, PMP_OP_COPY,
  /* reductions */
  PMP_OP_SUM, PMP_OP_MEAN, PMP_OP_MAX, PMP_OP_MIN, PMP_OP_ARGMAX, PMP_OP_ARGMIN,
  /* linear algebra */
  PMP_OP_MATMUL,
  /* shape and indexing (views record these for autograd) */
  PMP_OP_VIEW, PMP_OP_PERMUTE, PMP_OP_EXPAND, PMP_OP_NARROW, PMP_OP_CAT, PMP_OP_GATHER,
  PMP_OP_SCATTER_ADD, PMP_OP_INDEX_SELECT, PMP_OP_INDEX_ADD, PMP_OP_TO_DTYPE,
  /* neural-network ops */
  PMP_OP_SOFTMAX, PMP_OP_LOG_SOFTMAX, PMP_OP_CROSS_ENTROPY, PMP_OP_CROSS_ENTROPY_BACKWARD,
  /* creation */
  PMP_OP_FILL, PMP_OP_ARANGE, PMP_OP_RAND, PMP_OP_RANDN, PMP_OP_RANDINT,
  /* fused transformer ops, each checked against the composition of the ops above */
  PMP_OP_RMS_NORM, PMP_OP_RMS_NORM_BACKWARD, PMP_OP_ROPE, PMP_OP_SWIGLU, PMP_OP_SWIGLU_BACKWARD,
  PMP_OP_ATTENTION, PMP_OP_ATTENTION_BACKWARD,
  /* optimizer steps (in place) */
  PMP_OP_ADAMW, PMP_OP_SCALE,
  /* a node whose backward the host supplies (Lua autograd functions, activation recompute) */
  PMP_OP_CUSTOM,
  /* mixture of experts: the grouped GEMM over rows sorted by expert, the weighted un-permutation */
  PMP_OP_GROUPED_MATMUL, PMP_OP_GROUPED_MATMUL_WEIGHT_GRAD, PMP_OP_MOE_UNPERMUTE, PMP_OP_MOE_UNPERMUTE_BACKWARD,
  /* the paged KV cache of continuous batching (inference only) */
  PMP_OP_PAGED_KV_WRITE, PMP_OP_PAGED_ATTENTION,
  /* next-token choice from logits rows (pmp_sample) */
  PMP_OP_SAMPLE,
  PMP_OP_COUNT
} pmp_op_id;


/* ---- op profiler: while on, every kernel run is counted and timed per op (wall clock, calling
 * thread), so a training step can be broken down without an external profiler ---- */
void pmp_profile_enable(int on);
void pmp_profile_reset(void);
/* the calls and nanoseconds recorded for op (a pmp_op_id) since the last reset */
void pmp_profile_read(int op, int64_t *calls, int64_t *nanoseconds);


/* ---- conversion ---- */
pmp_tensor *pmp_to_dtype(pmp_tensor *t, int dtype);
pmp_tensor *pmp_to_device(pmp_tensor *t, pmp_device device);
pmp_tensor *pmp_contiguous(pmp_tensor *t);
pmp_tensor *pmp_clone(pmp_tensor *t);
pmp_tensor *pmp_detach(pmp_tensor *t);

/* ---- views and shape ---- */
pmp_tensor *pmp_view(pmp_tensor *t, const int64_t *shape, int ndim);      /* -1 infers one dim */
pmp_tensor *pmp_reshape(pmp_tensor *t, const int64_t *shape, int ndim);   /* view if possible */
pmp_tensor *pmp_permute(pmp_tensor *t, const int *dims, int ndim);
pmp_tensor *pmp_transpose(pmp_tensor *t, int dim0, int dim1);
pmp_tensor *pmp_unsqueeze(pmp_tensor *t, int dim);
pmp_tensor *pmp_squeeze(pmp_tensor *t, int dim);                          /* dim < 0: all size-1 dims */
pmp_tensor *pmp_expand(pmp_tensor *t, const int64_t *shape, int ndim);    /* -1 keeps a dim */
pmp_tensor *pmp_narrow(pmp_tensor *t, int dim, int64_t start, int64_t length);
pmp_tensor *pmp_cat(pmp_tensor *const *tensors, int count, int dim);
pmp_tensor *pmp_gather(pmp_tensor *t, int dim, pmp_tensor *index);
pmp_tensor *pmp_scatter_add(pmp_tensor *t, int dim, pmp_tensor *index, pmp_tensor *src);
pmp_tensor *pmp_index_select(pmp_tensor *t, int dim, pmp_tensor *index);
pmp_tensor *pmp_index_add(pmp_tensor *t, int dim, pmp_tensor *index, pmp_tensor *src);
pmp_tensor *pmp_masked_fill(pmp_tensor *t, pmp_tensor *mask, double value);
pmp_tensor *pmp_tril(pmp_tensor *t, int64_t diagonal);
pmp_tensor *pmp_triu(pmp_tensor *t, int64_t diagonal);

/* ---- in place (never recorded by autograd: use on leaves outside the graph, e.g. optimizer steps) ---- */
int pmp_copy_(pmp_tensor *dst, pmp_tensor *src);     /* src broadcast to dst's shape, dtype converted */
int pmp_fill_(pmp_tensor *t, double value);

/* ---- elementwise math ---- */
pmp_tensor *pmp_unary(int op, pmp_tensor *t);
pmp_tensor *pmp_binary(int op, pmp_tensor *a, pmp_tensor *b);
pmp_tensor *pmp_where(pmp_tensor *cond, pmp_tensor *a, pmp_tensor *b);
pmp_tensor *pmp_clamp(pmp_tensor *t, double min, double max);             /* +-inf for no bound */

/* ---- reductions: dims lists the reduced dims; ndims == 0 reduces all of them ---- */
pmp_tensor *pmp_sum(pmp_tensor *t, const int *dims, int ndims, int keepdim);
pmp_tensor *pmp_mean(pmp_tensor *t, const int *dims, int ndims, int keepdim);
/* max/min over one dim; *indices (may be NULL) receives the i64 positions */
pmp_tensor *pmp_max(pmp_tensor *t, int dim, int keepdim, pmp_tensor **indices);
pmp_tensor *pmp_min(pmp_tensor *t, int dim, int keepdim, pmp_tensor **indices);
pmp_tensor *pmp_argmax(pmp_tensor *t, int dim, int keepdim);
pmp_tensor *pmp_argmin(pmp_tensor *t, int dim, int keepdim);

/* ---- linear algebra: batched, broadcasting over leading dims; 1-D operands as in numpy ---- */
pmp_tensor *pmp_matmul(pmp_tensor *a, pmp_tensor *b);

/* ---- neural-network ops ---- */
pmp_tensor *pmp_softmax(pmp_tensor *t, int dim);
pmp_tensor *pmp_log_softmax(pmp_tensor *t, int dim);
/* logits [N, C], targets [N] integer; returns per-row losses [N], 0 where target == ignore_index */
pmp_tensor *pmp_cross_entropy(pmp_tensor *logits, pmp_tensor *targets, int64_t ignore_index);

/* ---- fused transformer ops ---- */
/* x [..., H], weight [H] or NULL: x / sqrt(mean(x^2) + eps) * weight, normalized in f32 (f64 for f64);
 * for bf16/f16 the normalized value is rounded to x's dtype before the weight multiplies it, as HF does. */
pmp_tensor *pmp_rms_norm(pmp_tensor *x, pmp_tensor *weight, double eps);
/* x [..., T, D]; cos, sin broadcastable to [..., T, rotary_dim] with rotary_dim <= D (the rest passes
 * through). interleaved = 0 rotates halves (Llama/NeoX), 1 rotates adjacent pairs (GPT-J/GLM). */
pmp_tensor *pmp_rope(pmp_tensor *x, pmp_tensor *cos, pmp_tensor *sin, int interleaved);
/* x [..., 2F] laid out as [gate | up]: silu(gate) * up -> [..., F] */
pmp_tensor *pmp_swiglu(pmp_tensor *x);
/* q [B, Hq, T, D], k and v [B, Hkv, S, D] with Hq a multiple of Hkv (GQA/MQA). Tiled with an online
 * softmax: the T x S score matrix is never stored. causal: query t sees keys up to t + (S - T);
 * window > 0 also hides keys more than window - 1 positions back (sliding window); first_key (NULL or
 * an integer tensor [B] or [B, T]) hides the keys before first_key[b] in row b (left padding), or
 * before first_key[b, t] for query t (packed documents: the start of the query's document). Queries
 * that see no key at all output zeros. */
pmp_tensor *pmp_attention(pmp_tensor *q, pmp_tensor *k, pmp_tensor *v, pmp_tensor *first_key, double scale, int causal,
                          int64_t window);
/* pmp_attention with ALiBi (BLOOM, Baichuan-13B, Falcon's alibi variant): slopes (NULL for none, or a
 * float tensor [Hq]) adds slopes[h] * (s - p) to the scaled score of head h's query at position
 * p = t + S - T and key s, penalising a key linearly in its distance. Softmax ignores a shift shared by a
 * row, so this equals biases counted from the first key or the first unpadded one. The slopes are
 * constants: they get no gradient. */
pmp_tensor *pmp_attention_alibi(pmp_tensor *q, pmp_tensor *k, pmp_tensor *v, pmp_tensor *first_key, pmp_tensor *slopes,
                                double scale, int causal, int64_t window);
/* pmp_attention_alibi with the bias transformers' Falcon builds (build_alibi_tensor): head h's bias for
 * key s is bf16(bf16(slopes[h]) * bf16(s - first)) * bias_scale, rounded to q's dtype, with first the
 * row's first real key (first_key[b], or first_key[b, t] per query; 0 without first_key). The key
 * positions are absolute, not relative to the query: with the bf16 rounding the two are no longer
 * equivalent. slopes are the unscaled ones (bias_scale applies after the rounding). */
pmp_tensor *pmp_attention_alibi_hf_falcon(pmp_tensor *q, pmp_tensor *k, pmp_tensor *v, pmp_tensor *first_key,
                                          pmp_tensor *slopes, double bias_scale, double scale, int causal,
                                          int64_t window);
/* The paged KV cache of continuous batching (lua/pmp/serve/): each layer keeps its keys and values in
 * a pool of fixed-size blocks [num_blocks, Hkv, block_size, D], and each sequence a table of the
 * blocks holding its positions (position s lives in block table[s / block_size] at s % block_size),
 * so sequences of any length share one pool. Neither op is recorded by autograd (inference only).
 * pmp_paged_kv_write_: writes src [N, Hkv, T, D] into pool in place, row (n, t) at the flat slot
 * slots[n, t] = block * block_size + offset (an integer tensor [N, T]; a negative slot skips the row). */
int pmp_paged_kv_write_(pmp_tensor *pool, pmp_tensor *src, pmp_tensor *slots);
/* pmp_paged_attention: q [N, Hq, T, D] holds the last T positions of each of N sequences (Hq a
 * multiple of Hkv, GQA); sequence n has lengths[n] >= T keys in the pools through its row of
 * block_tables [N, M] (integers); its query t attends causally to keys 0 .. lengths[n] - T + t.
 * scale <= 0 means 1/sqrt(D). Returns [N, Hq, T, D] in q's dtype (f64 computes in f64, others in f32). */
pmp_tensor *pmp_paged_attention(pmp_tensor *q, pmp_tensor *k_pool, pmp_tensor *v_pool, pmp_tensor *block_tables,
                                pmp_tensor *lengths, double scale);

/* ---- mixture of experts ---- */
/* x [rows, in] whose rows are grouped by expert (counts[e] rows for expert e, in order; counts a CPU
 * integer tensor [E] summing to rows), w [E, out, in]: each group times its expert's w[e]^T -> [rows, out]. */
pmp_tensor *pmp_grouped_matmul(pmp_tensor *x, pmp_tensor *w, pmp_tensor *counts);
/* y [n, hidden] expert outputs, probs [n], rows [n] integer token ids: out [num_tokens, hidden] with
 * out[t] = sum of probs[i] * y[i] over the i with rows[i] = t (zero for tokens no row names). */
pmp_tensor *pmp_moe_unpermute(pmp_tensor *y, pmp_tensor *probs, pmp_tensor *rows, int64_t num_tokens);

/* ---- token sampling ---- */
/* Picks one token per row of logits [B, V] (any floating dtype) as transformers' generate does, the
 * logits processors chained in its order: repetition_penalty (1 = off, > 0) divides the positive
 * logits and multiplies the negative ones of the ids in row b of seen (NULL, or an integer tensor
 * [B, S]; negative entries are padding, repeats count once); then temperature > 0 divides them,
 * top_k (0 = off) keeps the tokens at least as large as the k-th largest (ties all kept), and top_p
 * (1 = off, in (0, 1]) keeps the smallest run of the largest that holds top_p of the remaining mass;
 * the token is drawn from the renormalised rest with one uniform per row. temperature == 0 is greedy:
 * the first largest penalised logit (NaN counting as largest, as torch.argmax), top_k and top_p
 * unused, nothing drawn.
 * generators: NULL draws every row from the default generator, in row order; else B pointers, row b
 * drawing from generators[b] (rows sharing one draw from it in row order), the default one untouched.
 * *ids gets i64 [B]; *logprobs (logprobs may be NULL) gets each chosen token's log-probability under
 * the penalised, temperature-scaled distribution before top-k/top-p (f64 for f64 logits, else f32).
 * The result does not depend on the thread count. Returns 0, or -1 with pmp_last_error set (the
 * generators may then have drawn). */
int pmp_sample(pmp_tensor *logits, pmp_tensor *seen, double repetition_penalty, double temperature, int64_t top_k,
               double top_p, pmp_generator *const *generators, pmp_tensor **ids, pmp_tensor **logprobs);

/* ---- optimizer steps: in place, outside autograd ---- */
/* One AdamW step (decoupled weight decay, PyTorch's formula). master (f32, may be NULL) holds the
 * full-precision copy of a low-precision param; then the update happens there and param gets the
 * rounded result. step counts from 1. */
int pmp_adamw_step_(pmp_tensor *param, pmp_tensor *grad, pmp_tensor *exp_avg, pmp_tensor *exp_avg_sq,
                    pmp_tensor *master, double lr, double beta1, double beta2, double eps, double weight_decay,
                    int64_t step);
int pmp_scale_(pmp_tensor *t, double factor);
/* sum of squares of all elements, accumulated in double (for global gradient norms) */
int pmp_sum_squares(pmp_tensor *t, double *result);

/* PMP_CDEF_END */

#endif
