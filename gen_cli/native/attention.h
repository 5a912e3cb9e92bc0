/* Attention over the KV cache for one new token per row: every row's k and v stored (kv.h), then every
 * query head of row b attends to positions 0..pos_b of its slot, in chunks of positions that threads take as
 * work items.
 */
#ifndef GEN_ATTENTION_H
#define GEN_ATTENTION_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "abi.h"
#include "features.h"
#include "kv.h"

/* Where each row of a step sits: row b at position pos[b] (or pos0 for all) of slot slot[b] (or slot b).
 * prompt: the rows are a prompt's consecutive tokens in one slot (gen_prompt_rows): their attention takes the
 * prompt kernel's tiles instead of each row's own pass, in another summation order (see prompt_tiles). */
typedef struct {
    const int64_t *pos, *slot;
    int64_t pos0;
    int prompt;
} Rows;

static inline int64_t row_pos(const Rows *r, int64_t b) { return r->pos ? r->pos[b] : r->pos0; }
static inline int64_t row_slot(const Rows *r, int64_t b) { return r->slot ? r->slot[b] : b; }

/* One slot's K and V in layer li: the memory, its tokens per head (T) and its first KV head's index there. */
typedef struct {
    void *k, *v;
    float *ks, *kz, *vs, *vz;
    int64_t T, head0;
} SlotKV;

/* A paged cache's pool block holding position t of slot s (abi.h's Model.block_table). */
static inline int64_t page_of(const Model *m, int64_t s, int64_t t) {
    return m->block_table[s * m->max_blocks + t / m->block_tokens];
}

/* From position t (a block boundary) of slot s, up to t1: the pool slot of t (*first) and how many positions
 * lie there one after another (a run of blocks adjacent in the pool reads as one piece). */
static inline int64_t paged_run(const Model *m, int64_t s, int64_t t, int64_t t1, int64_t *first) {
    const int64_t bt = m->block_tokens, page = page_of(m, s, t);
    int64_t end = t + bt;
    while (end < t1 && page_of(m, s, end) == page + (end - t) / bt) end += bt;
    *first = page * bt;
    return (end < t1 ? end : t1) - t;
}

static inline SlotKV slot_kv(const Model *m, const Layer *l, int64_t li, int64_t s) {
    if (m->slots) {
        const KVSlot *e = &m->slots[li * m->n_slots + s];
        return (SlotKV){e->k_cache, e->v_cache, e->k_scale, e->k_zero, e->v_scale, e->v_zero, e->max_tokens, 0};
    }
    return (SlotKV){l->k_cache, l->v_cache, l->k_scale, l->k_zero, l->v_scale, l->v_zero, m->max_tokens,
                    s * m->n_kv_head};
}

/* Where one KV head's tokens of a slot lie: one piece (a contiguous cache; m NULL, k and v at position 0) or
 * a paged cache's blocks in the pool (m, l, the slot, and where its KV head's row starts in the pool; k and v
 * there then only say the kinds). */
typedef struct {
    KVHead k, v;
    const Model *m;
    const Layer *l;
    int64_t slot, head;
} Source;

/* Positions [t, t + n) up to t1 that lie in one piece of side `side` (0 K, 1 V): n, with *kv reading them
 * from its token t - *base. A contiguous cache is one piece (base 0); a paged one a run of pool-adjacent
 * blocks (base t: its token 0 is position t); t is then on a block boundary. */
static inline int64_t source_run(const Source *src, int side, int64_t t, int64_t t1, KVHead *kv, int64_t *base) {
    if (!src->m) {
        *kv = side ? src->v : src->k, *base = 0;
        return t1 - t;
    }
    const Model *m = src->m;
    const Layer *l = src->l;
    int64_t first;
    const int64_t n = paged_run(m, src->slot, t, t1, &first);
    *kv = side ? kv_head_at(l->v_kind, (int)m->bf16, l->v_cache, l->v_scale, l->v_zero, src->head + first, m->head_dim)
               : kv_head_at(l->k_kind, (int)m->bf16, l->k_cache, l->k_scale, l->k_zero, src->head + first, m->head_dim);
    *base = t;
    return n;
}

/* The attention of `nq` query heads that share one KV head, over the positions [t0, t1) of one chunk:
 * s[i][t] gets the scores, then the unnormalised softmax weights exp(score - top[i]); o[i] (hd) gets
 * sum_t weight v_t, sum[i] the sum of the weights. Scores, softmax and weighted V sum each run once over the
 * whole chunk, piece by piece (source_run), so that scattered blocks cost what one piece costs: no merge. */
typedef struct {
    const float *const *q;
    float *const *s, *const *o;
    float *top, *sum;
    int64_t t0, t1, hd;
    float scale; /* 1 / sqrt(hd) */
} Chunk;

#if defined(GEN_AVX2_FMA) && !defined(GEN_AVX512)
#define GEN_KV_FLOAT8 1 /* fp32 K and V 8 lanes a step (chunk_float8) */
#endif

/* s[t] = e^(s[t] - top) over [t0, t1); returns their sum (8 at a time on AVX2: scalar expf was a third of
 * attention's time in a batch of 32, 135M shape). */
static inline float softmax_run(float *s, int64_t t0, int64_t t1, float top) {
    float sum = 0.f;
    int64_t t = t0;
#ifdef GEN_KV_FLOAT8
    __m256 acc = _mm256_setzero_ps();
    for (const __m256 m = _mm256_set1_ps(top); t + 8 <= t1; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
        _mm256_storeu_ps(s + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum256(acc);
#endif
    for (; t < t1; t++) sum += s[t] = expf(s[t] - top);
    return sum;
}

/* The chunk as plain loops: every K/V kind read element by element through kv_at (any build). */
static void chunk_portable(const Chunk *c, int nq, const Source *src) {
    const int64_t hd = c->hd;
    for (int i = 0; i < nq; i++) {
        float top = -INFINITY, *s = c->s[i], *o = c->o[i];
        for (int64_t t = c->t0, n, base; t < c->t1; t += n) {
            KVHead k;
            n = source_run(src, 0, t, c->t1, &k, &base);
            for (int64_t u = t; u < t + n; u++) {
                float dot = 0.f;
                for (int64_t d = 0; d < hd; d++) dot += kv_at(&k, u - base, d, hd) * c->q[i][d];
                s[u] = dot * c->scale * (k.kind == KV_INT8 ? k.scale[u - base] : 1.f);
                top = fmaxf(top, s[u]);
            }
        }
        const float sum = softmax_run(s, c->t0, c->t1, top);
        memset(o, 0, hd * sizeof(float));
        for (int64_t t = c->t0, n, base; t < c->t1; t += n) {
            KVHead v;
            n = source_run(src, 1, t, c->t1, &v, &base);
            for (int64_t u = t; u < t + n; u++) {
                const float p = s[u] * (v.kind == KV_INT8 ? v.scale[u - base] : 1.f);
                for (int64_t d = 0; d < hd; d++) o[d] += p * kv_at(&v, u - base, d, hd);
            }
        }
        c->top[i] = top, c->sum[i] = sum;
    }
}

#ifdef GEN_KV_FLOAT8
/* One 8-lane sum as dots4 reduces each of its four: lanes (0+1)+(2+3), (4+5)+(6+7), then the two halves, so a
 * token's score has the same bits whichever way its run splits into fours. */
static inline float sum8_pairs(__m256 v) {
    const __m256 h = _mm256_hadd_ps(v, v), g = _mm256_hadd_ps(h, h);
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(g), _mm256_extractf128_ps(g, 1)));
}

/* Token t's score for query i, as sum8_pairs reduces it: lane by lane an FMA chain over hd, started by a product;
 * then lanes (0+1)+(2+3), (4+5)+(6+7), the two halves. dots4 computes 4 tokens x NQ queries this way, so a score
 * has the same bits however its run splits. */
static inline float dot1(const float *k, const float *q, int64_t hd) {
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(k), _mm256_loadu_ps(q));
    for (int64_t d = 8; d < hd; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(k + d), _mm256_loadu_ps(q + d), a);
    return sum8_pairs(a);
}

/* s[i][u] = scale * q_i . k_u for 4 tokens (rows hd apart, hd a multiple of 8) and NQ <= 3 queries: each K vector
 * loaded once for all the queries that share it (GQA), 4 NQ chains, then one transposing reduction per query
 * (two levels of hadds, then the halves added) instead of a horizontal sum per token. */
GEN_ALWAYS_INLINE void dots4(const int NQ, const float *k, const float *const *q, int64_t hd, float *const *s,
                             int64_t u, __m256 scale) {
    __m256 a[3][4];
#pragma GCC unroll 3
    for (int i = 0; i < NQ; i++)
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) a[i][j] = _mm256_mul_ps(_mm256_loadu_ps(k + j * hd), _mm256_loadu_ps(q[i]));
    for (int64_t d = 8; d < hd; d += 8) {
        __m256 kv[4];
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) kv[j] = _mm256_loadu_ps(k + j * hd + d);
#pragma GCC unroll 3
        for (int i = 0; i < NQ; i++) {
            const __m256 qv = _mm256_loadu_ps(q[i] + d);
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) a[i][j] = _mm256_fmadd_ps(kv[j], qv, a[i][j]);
        }
    }
#pragma GCC unroll 3
    for (int i = 0; i < NQ; i++) {
        const __m256 g = _mm256_hadd_ps(_mm256_hadd_ps(a[i][0], a[i][1]), _mm256_hadd_ps(a[i][2], a[i][3]));
        const __m128 t = _mm_add_ps(_mm256_castps256_ps128(g), _mm256_extractf128_ps(g, 1)); /* lo + hi halves */
        _mm_storeu_ps(s[i] + u, _mm_mul_ps(t, _mm256_castps256_ps128(scale)));
    }
}

/* o_i (hd) += sum_t p_i[t] v_t over n tokens (rows hd apart) for NQ <= 3 queries: 32 columns at a time (4 NQ
 * accumulators, NQ broadcasts and a V vector fit the 16 registers), each V vector loaded once for every query,
 * each column summing its tokens in order. */
GEN_ALWAYS_INLINE void add_rows8(const int NQ, float *const *o, const float *const *p, const float *v, int64_t n,
                                 int64_t hd) {
    enum { W = 4 }; /* vectors of columns per pass */
    int64_t d0 = 0;
    for (; d0 + 8 * W <= hd; d0 += 8 * W) {
        __m256 a[3][W];
#pragma GCC unroll 3
        for (int i = 0; i < NQ; i++)
#pragma GCC unroll 4
            for (int w = 0; w < W; w++) a[i][w] = _mm256_loadu_ps(o[i] + d0 + 8 * w);
        for (int64_t t = 0; t < n; t++) {
            __m256 pv[3];
#pragma GCC unroll 3
            for (int i = 0; i < NQ; i++) pv[i] = _mm256_broadcast_ss(p[i] + t);
#pragma GCC unroll 4
            for (int w = 0; w < W; w++) {
                const __m256 vv = _mm256_loadu_ps(v + t * hd + d0 + 8 * w);
#pragma GCC unroll 3
                for (int i = 0; i < NQ; i++) a[i][w] = _mm256_fmadd_ps(pv[i], vv, a[i][w]);
            }
        }
#pragma GCC unroll 3
        for (int i = 0; i < NQ; i++)
#pragma GCC unroll 4
            for (int w = 0; w < W; w++) _mm256_storeu_ps(o[i] + d0 + 8 * w, a[i][w]);
    }
    for (; d0 < hd; d0 += 8)
        for (int i = 0; i < NQ; i++) {
            __m256 a = _mm256_loadu_ps(o[i] + d0);
            for (int64_t t = 0; t < n; t++) a = _mm256_fmadd_ps(_mm256_set1_ps(p[i][t]), _mm256_loadu_ps(v + t * hd + d0), a);
            _mm256_storeu_ps(o[i] + d0, a);
        }
}

/* The largest of s[t0, t1), NaN skipped as fmaxf skips it (-inf if all are NaN), 8 at a time: fmaxf is a libm call
 * per score (3% of a 135M Q4_1 step at position 1,000). max_ps gives its second operand, acc, when s is NaN. */
static inline float top_score(const float *s, int64_t t0, int64_t t1) {
    __m256 acc = _mm256_set1_ps(-INFINITY);
    int64_t t = t0;
    for (; t + 8 <= t1; t += 8) acc = _mm256_max_ps(_mm256_loadu_ps(s + t), acc);
    float lanes[8], top = -INFINITY;
    _mm256_storeu_ps(lanes, acc);
    for (int j = 0; j < 8; j++) top = lanes[j] > top ? lanes[j] : top;
    for (; t < t1; t++) top = s[t] > top ? s[t] : top;
    return top;
}

/* chunk_portable for fp32 K and V on AVX2 (hd a multiple of 8), NQ <= 3 queries at a time: element by element,
 * attention was 75% of a 512-token prompt's time on an AVX2 build (135M shape); one query at a time, each query
 * of a GQA group read K and V again (a 135M Q4_1 step at position 1,000 spent 45% in attention). */
GEN_ALWAYS_INLINE void chunk_float8_n(const int NQ, const Chunk *c, int q0, const Source *src) {
    const int64_t hd = c->hd;
    const __m256 scale = _mm256_set1_ps(c->scale);
    const float *const *q = c->q + q0;
    float *const *s = c->s + q0, *const *o = c->o + q0;
    for (int64_t t = c->t0, n, base; t < c->t1; t += n) {
        KVHead k;
        n = source_run(src, 0, t, c->t1, &k, &base);
        const float *kt = (const float *)k.data + (t - base) * hd;
        int64_t u = 0;
        for (; u + 4 <= n; u += 4) dots4(NQ, kt + u * hd, q, hd, s, t + u, scale);
        for (; u < n; u++)
            for (int i = 0; i < NQ; i++) s[i][t + u] = dot1(kt + u * hd, q[i], hd) * c->scale;
    }
    const float *p[3];
    for (int i = 0; i < NQ; i++) {
        const float top = top_score(s[i], c->t0, c->t1);
        c->top[q0 + i] = top, c->sum[q0 + i] = softmax_run(s[i], c->t0, c->t1, top);
        memset(o[i], 0, hd * sizeof(float));
    }
    for (int64_t t = c->t0, n, base; t < c->t1; t += n) {
        KVHead v;
        n = source_run(src, 1, t, c->t1, &v, &base);
        for (int i = 0; i < NQ; i++) p[i] = s[i] + t;
        add_rows8(NQ, o, p, (const float *)v.data + (t - base) * hd, n, hd);
    }
}

static void chunk_float8(const Chunk *c, int nq, const Source *src) {
    for (int q0 = 0; q0 < nq; q0 += 3) { /* 4 queries take 3 + 1 */
        switch (nq - q0 < 3 ? nq - q0 : 3) {
        case 1: chunk_float8_n(1, c, q0, src); break;
        case 2: chunk_float8_n(2, c, q0, src); break;
        default: chunk_float8_n(3, c, q0, src); break;
        }
    }
}
#endif

#ifdef GEN_AVX512
enum { NQ_MAX = 4, HD_MAX = 256 };

/* Lanes [16 j, 16 j + 16) of token t, dequantised in registers. int4 lanes run in nibble order: slice 2g
 * holds group g's even elements (low nibbles), slice 2g + 1 its odd ones; int8 stays unscaled. */
GEN_ALWAYS_INLINE __m512 kv_load16(const int kind, const KVHead *kv, int64_t t, const int64_t hd, int64_t j) {
    if (kind == KV_INT8)
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)kv->data + t * hd + 16 * j))));
    if (kind == KV_INT4) {
        const int64_t G = hd / KV_GROUP, g = j / 2;
        __m512i bytes = _mm512_cvtepu8_epi32(
            _mm_loadu_si128((const __m128i *)((const uint8_t *)kv->data + t * (hd / 2) + 16 * g)));
        __m512i nib = j & 1 ? _mm512_srli_epi32(bytes, 4) : _mm512_and_si512(bytes, _mm512_set1_epi32(15));
        return _mm512_fmadd_ps(_mm512_cvtepi32_ps(nib), _mm512_set1_ps(kv->scale[t * G + g]),
                               _mm512_set1_ps(kv->zero[t * G + g]));
    }
    if (kind == KV_BF16) {
        __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)kv->data + t * hd + 16 * j)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    }
    return _mm512_loadu_ps((const float *)kv->data + t * hd + 16 * j);
}

/* The 16 horizontal sums of v[0..15], in order: a transposing add tree (45 shuffles and adds for 16
 * dot products, against ~8 each for a separate reduction). */
GEN_ALWAYS_INLINE __m512 sum16_with(const __m512 *v, const int ints) {
#define ADD(a, b) (ints ? _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b))) \
                        : _mm512_add_ps(a, b))
    __m512 r[8], u[4], w[2];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3) */
        r[i] = ADD(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per lane: the lane's sums of 4 consecutive vectors */
        u[i] = ADD(_mm512_shuffle_ps(r[2 * i], r[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                   _mm512_shuffle_ps(r[2 * i], r[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++)
        w[i] = ADD(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                   _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return ADD(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
               _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
#undef ADD
}
#define sum16(v) sum16_with(v, 0)
/* int32 sums of int32 lanes (carried in fp32 registers): exact, converted once per 16 tokens. */
#define sum16_int(v) _mm512_cvtepi32_ps(_mm512_castps_si512(sum16_with(v, 1)))

/* e^x for x <= 0 (scores minus their maximum), within 2 ulp: x = n ln2 + r, |r| <= ln2 / 2, a degree-7
 * polynomial for e^r (Cephes' expf), then scaled by 2^n. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f)); /* below this e^x is 0 in fp32; keeps n finite */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

enum { V_BLOCK = 128 }; /* tokens whose V weights (times their scales) are prepared at once */

/* Group g of tokens [t, t + 16) as one vector, from x at token t, laid out (token, G groups); lanes off in
 * m (a prefix) stay 0. Two groups (head_dim 64) deinterleave with one permute; other counts gather. */
GEN_ALWAYS_INLINE __m512 group_lanes(const float *x, const int64_t G, int64_t g, __mmask16 m) {
    if (G == 1) return _mm512_maskz_loadu_ps(m, x);
    if (G == 2) {
        const int n = __builtin_popcount(m); /* m is a prefix: the first n tokens, 2n floats */
        const uint32_t m2 = n >= 16 ? 0xFFFFFFFFu : (1u << 2 * n) - 1;
        const __m512 a = _mm512_maskz_loadu_ps((__mmask16)m2, x), b = _mm512_maskz_loadu_ps((__mmask16)(m2 >> 16), x + 16);
        const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        return _mm512_permutex2var_ps(a, _mm512_add_epi32(even, _mm512_set1_epi32((int)g)), b);
    }
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, _mm512_mullo_epi32(iota, _mm512_set1_epi32((int)G)), x + g, 4);
}

/* The queries as scores_avx reads them, prepared once per chunk (not once per piece of it). */
typedef struct {
    const float *q[NQ_MAX];
    float qn[NQ_MAX][HD_MAX]; /* int4 K without VNNI: the queries in nibble order */
#ifdef GEN_VNNI
    int16_t q16[NQ_MAX][HD_MAX] __attribute__((aligned(64)));
    float qscale[NQ_MAX], qsum[NQ_MAX][HD_MAX / KV_GROUP];
#endif
} Queries;

#ifdef GEN_VNNI
/* Integer K (int8, int4): the queries rounded to int16 with one scale per head (relative error <= 2^-16,
 * as the int8 matrices' inputs are), so that vpdpwssd multiplies 32 stored values a step with no
 * conversion to fp32. int4: score = scale_g sum(nibble q) + zero_g sum(q) per group of 32. */
GEN_ALWAYS_INLINE void queries_int(const Chunk *c, const int nq, const int kk, const int64_t hd, Queries *Q) {
    if (nq > NQ_MAX || hd > HD_MAX) __builtin_unreachable(); /* the callers' limits */
    const int64_t G = hd / KV_GROUP;
    for (int i = 0; i < nq; i++) {
        const float *q = c->q[i];
        float amax = 0.f;
        for (int64_t d = 0; d < hd; d++) amax = fmaxf(amax, fabsf(q[d]));
        Q->qscale[i] = amax > 0.f ? amax / 32767.f : 1.f;
        for (int64_t g = 0; g < G; g++) Q->qsum[i][g] = 0.f;
        for (int64_t d = 0; d < hd; d++) {
            const int64_t at = kk == KV_INT4 ? d - d % KV_GROUP + (d % 2) * 16 + d % KV_GROUP / 2 : d;
            Q->q16[i][at] = (int16_t)lrintf(q[d] / Q->qscale[i]);
            if (kk == KV_INT4) Q->qsum[i][d / KV_GROUP] += q[d];
        }
        for (int64_t d = hd; d % 32; d++) Q->q16[i][d] = 0; /* int8 K: a head of 16 (mod 32) ends in half a step */
    }
}

/* Elements 32 j .. 32 j + 31 of an int8 K token (row) as int16, those past hd zero (not loaded). */
GEN_ALWAYS_INLINE __m512i k_int16(const int8_t *row, int64_t j, int64_t hd) {
    const __mmask32 m = hd - 32 * j >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (hd - 32 * j)) - 1);
    return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, row + 32 * j));
}

/* Integer K's scores of tokens [t0, t1) of one piece k into s[i] (at the same indices). */
GEN_ALWAYS_INLINE void scores_int(const Chunk *c, const Queries *Q, float *const *sc, const int nq, const int kk,
                                  const KVHead *k, const int64_t hd, const int64_t t0, const int64_t t1) {
    if (nq > NQ_MAX || hd > HD_MAX) __builtin_unreachable(); /* the callers' limits */
    const int64_t G = hd / KV_GROUP;
    int64_t t = t0;
    for (; t + 16 <= t1; t += 16) {
        __m512 acc[NQ_MAX][16];
        for (int u = 0; u < 16; u++) {
            if (kk == KV_INT8) {
                __m512i a[NQ_MAX];
                for (int i = 0; i < nq; i++) a[i] = _mm512_setzero_si512();
                for (int64_t j = 0; j < (hd + 31) / 32; j++) {
                    const __m512i x = k_int16((const int8_t *)k->data + (t + u) * hd, j, hd);
                    for (int i = 0; i < nq; i++)
                        a[i] = _mm512_dpwssd_epi32(a[i], x, _mm512_load_si512((const void *)(Q->q16[i] + 32 * j)));
                }
                for (int i = 0; i < nq; i++) acc[i][u] = _mm512_castsi512_ps(a[i]);
            } else {
                __m512 f[NQ_MAX];
                for (int i = 0; i < nq; i++) f[i] = _mm512_setzero_ps();
                for (int64_t g = 0; g < G; g++) {
                    const __m256i b = _mm256_cvtepu8_epi16(
                        _mm_loadu_si128((const __m128i *)((const uint8_t *)k->data + (t + u) * (hd / 2) + 16 * g)));
                    const __m512i x = _mm512_inserti64x4(
                        _mm512_castsi256_si512(_mm256_and_si256(b, _mm256_set1_epi16(15))), _mm256_srli_epi16(b, 4), 1);
                    const __m512 s = _mm512_set1_ps(k->scale[(t + u) * G + g]);
                    for (int i = 0; i < nq; i++) {
                        __m512i d = _mm512_madd_epi16(x, _mm512_load_si512((const void *)(Q->q16[i] + 32 * g)));
                        f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, f[i]);
                    }
                }
                for (int i = 0; i < nq; i++) acc[i][u] = f[i];
            }
        }
        const __m512 attn = _mm512_set1_ps(c->scale);
        __m512 zero[HD_MAX / KV_GROUP];
        for (int64_t g = 0; kk == KV_INT4 && g < G; g++) zero[g] = group_lanes(k->zero + t * G, G, g, 0xFFFF);
        for (int i = 0; i < nq; i++) {
            __m512 s = _mm512_mul_ps(kk == KV_INT8 ? sum16_int(acc[i]) : sum16(acc[i]), _mm512_set1_ps(Q->qscale[i]));
            if (kk == KV_INT8) {
                s = _mm512_mul_ps(s, _mm512_loadu_ps(k->scale + t));
            } else {
                for (int64_t g = 0; g < G; g++) s = _mm512_fmadd_ps(zero[g], _mm512_set1_ps(Q->qsum[i][g]), s);
            }
            _mm512_storeu_ps(sc[i] + t, _mm512_mul_ps(s, attn));
        }
    }
    for (; t < t1; t++) { /* the piece's last < 16 tokens, one at a time */
        for (int i = 0; i < nq; i++) {
            float s = 0.f;
            if (kk == KV_INT8) {
                __m512i a = _mm512_setzero_si512();
                for (int64_t j = 0; j < (hd + 31) / 32; j++)
                    a = _mm512_dpwssd_epi32(a, k_int16((const int8_t *)k->data + t * hd, j, hd),
                                            _mm512_load_si512((const void *)(Q->q16[i] + 32 * j)));
                s = (float)_mm512_reduce_add_epi32(a) * Q->qscale[i] * k->scale[t];
            } else {
                for (int64_t g = 0; g < G; g++) {
                    const uint8_t *b = (const uint8_t *)k->data + t * (hd / 2) + 16 * g;
                    int32_t dot = 0;
                    for (int e = 0; e < 16; e++)
                        dot += (b[e] & 15) * Q->q16[i][32 * g + e] + (b[e] >> 4) * Q->q16[i][32 * g + 16 + e];
                    s += (float)dot * Q->qscale[i] * k->scale[t * G + g] + k->zero[t * G + g] * Q->qsum[i][g];
                }
            }
            sc[i][t] = s * c->scale;
        }
    }
}
#endif

/* Scores of tokens [t0, t1) of one piece k into s[i] (at the same indices), each K token loaded once for all
 * nq heads, 16 tokens at a time (one sum16 per head). */
GEN_ALWAYS_INLINE void scores_piece(const Chunk *c, const Queries *Q, float *const *sc, const int nq, const int kk,
                                    const KVHead *k, const int64_t hd, const int64_t t0, const int64_t t1) {
    if (nq > NQ_MAX || hd > HD_MAX) __builtin_unreachable(); /* the callers' limits */
#ifdef GEN_VNNI
    if (kk == KV_INT8 || kk == KV_INT4) {
        scores_int(c, Q, sc, nq, kk, k, hd, t0, t1);
        return;
    }
#endif
    const int64_t J = hd / 16;
    int64_t t = t0;
    for (; t + 16 <= t1; t += 16) {
        __m512 acc[NQ_MAX][16];
        for (int u = 0; u < 16; u++) {
            __m512 a[NQ_MAX];
            for (int i = 0; i < nq; i++) a[i] = _mm512_setzero_ps();
            for (int64_t j = 0; j < J; j++) {
                const __m512 kv = kv_load16(kk, k, t + u, hd, j);
                for (int i = 0; i < nq; i++) a[i] = _mm512_fmadd_ps(kv, _mm512_loadu_ps(Q->q[i] + 16 * j), a[i]);
            }
            for (int i = 0; i < nq; i++) acc[i][u] = a[i];
        }
        __m512 scale = _mm512_set1_ps(c->scale);
        if (kk == KV_INT8) scale = _mm512_mul_ps(scale, _mm512_loadu_ps(k->scale + t));
        for (int i = 0; i < nq; i++) _mm512_storeu_ps(sc[i] + t, _mm512_mul_ps(sum16(acc[i]), scale));
    }
    for (; t < t1; t++) {
        for (int i = 0; i < nq; i++) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t j = 0; j < J; j++) a = _mm512_fmadd_ps(kv_load16(kk, k, t, hd, j), _mm512_loadu_ps(Q->q[i] + 16 * j), a);
            sc[i][t] = _mm512_reduce_add_ps(a) * c->scale * (kk == KV_INT8 ? k->scale[t] : 1.f);
        }
    }
}

/* A chunk's scores for nq query heads, piece by piece, the queries prepared once. The kind, nq and (where it
 * is 64 or 128) hd are constants in each inlined copy. */
GEN_ALWAYS_INLINE void scores_avx(const Chunk *c, const int nq, const int kk, const Source *src, const int64_t hd) {
    if (nq > NQ_MAX || hd > HD_MAX) __builtin_unreachable(); /* the callers' limits */
    Queries Q;
    for (int i = 0; i < nq; i++) {
        Q.q[i] = c->q[i];
        if (kk == KV_INT4) {
            for (int64_t d = 0; d < hd; d++) Q.qn[i][d - d % KV_GROUP + (d % 2) * 16 + d % KV_GROUP / 2] = c->q[i][d];
            Q.q[i] = Q.qn[i];
        }
    }
#ifdef GEN_VNNI
    if (kk == KV_INT8 || kk == KV_INT4) queries_int(c, nq, kk, hd, &Q);
#endif
    float *sc[NQ_MAX]; /* one loop for both: a contiguous cache is one piece (an inlined second copy for it
                        * doubled the kernel's compile time) */
    for (int64_t t = c->t0, n, base; t < c->t1; t += n) {
        KVHead k;
        n = source_run(src, 0, t, c->t1, &k, &base);
        for (int i = 0; i < nq; i++) sc[i] = c->s[i] + base; /* the piece's token u is the row's base + u */
        scores_piece(c, &Q, sc, nq, kk, &k, hd, t - base, t + n - base);
    }
}

/* The softmax weights, unnormalised: exp(score - the chunk's top score), and their sum. */
static void softmax_chunk(const Chunk *c, int nq) {
    const int64_t t0 = c->t0, t1 = c->t1;
    for (int i = 0; i < nq; i++) {
        float *s = c->s[i];
        __m512 top = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int64_t u = t0; u < t1; u += 16) {
            __mmask16 m = t1 - u >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (t1 - u)) - 1);
            top = _mm512_mask_max_ps(top, m, top, _mm512_maskz_loadu_ps(m, s + u));
        }
        const float tmax = _mm512_reduce_max_ps(top);
        for (int64_t u = t0; u < t1; u += 16) {
            __mmask16 m = t1 - u >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (t1 - u)) - 1);
            __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + u), _mm512_set1_ps(tmax)));
            _mm512_mask_storeu_ps(s + u, m, e);
            sum = _mm512_mask_add_ps(sum, m, sum, e);
        }
        c->top[i] = tmax, c->sum[i] = _mm512_reduce_add_ps(sum);
    }
}

/* o[i] += sum_t weight[i][t] v_t over tokens [t0, t1) of one piece v (weights w[i] at the same indices),
 * each V token converted once for all nq heads. A quantized V's scales ride on the weights (w scale,
 * prepared V_BLOCK tokens at a time), int4's zero points on a separate sum (zacc += sum_t w zero, added to
 * the group's every element at the end). o in int4's nibble order. */
GEN_ALWAYS_INLINE void values_piece(float *const *w, const int nq, const int vk, const KVHead *v, const int64_t hd,
                                    const int64_t t0, const int64_t t1, __m512 (*o)[HD_MAX / 16],
                                    __m512 (*zacc)[HD_MAX / KV_GROUP]) {
    if (nq > NQ_MAX || hd > HD_MAX) __builtin_unreachable(); /* the callers' limits */
    const int64_t J = hd / 16, G = hd / KV_GROUP;
    float ws[NQ_MAX][HD_MAX / KV_GROUP][V_BLOCK];
    for (int64_t tb = t0; tb < t1; tb += V_BLOCK) {
        const int64_t te = tb + V_BLOCK < t1 ? tb + V_BLOCK : t1;
        if (vk == KV_INT8 || vk == KV_INT4) {
            for (int64_t u = tb; u < te; u += 16) {
                const __mmask16 m = te - u >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (te - u)) - 1);
                for (int64_t g = 0; g < (vk == KV_INT8 ? 1 : G); g++) {
                    const __m512 sc = vk == KV_INT8 ? _mm512_maskz_loadu_ps(m, v->scale + u) : group_lanes(v->scale + u * G, G, g, m);
                    const __m512 zp = vk == KV_INT4 ? group_lanes(v->zero + u * G, G, g, m) : _mm512_setzero_ps();
                    for (int i = 0; i < nq; i++) {
                        const __m512 x = _mm512_maskz_loadu_ps(m, w[i] + u);
                        _mm512_mask_storeu_ps(ws[i][g] + (u - tb), m, _mm512_mul_ps(x, sc));
                        if (vk == KV_INT4) zacc[i][g] = _mm512_fmadd_ps(x, zp, zacc[i][g]);
                    }
                }
            }
        }
        for (int64_t t = tb; t < te; t++) {
            if (vk == KV_INT4) {
                for (int64_t g = 0; g < G; g++) {
                    const __m512i b = _mm512_cvtepu8_epi32(
                        _mm_loadu_si128((const __m128i *)((const uint8_t *)v->data + t * (hd / 2) + 16 * g)));
                    const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
                    const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
                    for (int i = 0; i < nq; i++) {
                        const __m512 x = _mm512_set1_ps(ws[i][g][t - tb]);
                        o[i][2 * g] = _mm512_fmadd_ps(x, lo, o[i][2 * g]);
                        o[i][2 * g + 1] = _mm512_fmadd_ps(x, hi, o[i][2 * g + 1]);
                    }
                }
            } else {
                __m512 x[NQ_MAX];
                for (int i = 0; i < nq; i++) x[i] = _mm512_set1_ps(vk == KV_INT8 ? ws[i][0][t - tb] : w[i][t]);
                for (int64_t j = 0; j < J; j++) {
                    const __m512 y = kv_load16(vk, v, t, hd, j);
                    for (int i = 0; i < nq; i++) o[i][j] = _mm512_fmadd_ps(x[i], y, o[i][j]);
                }
            }
        }
    }
}

/* A chunk's o[i] = sum_t weight[i][t] v_t, piece by piece into one set of sums (no merge between pieces). */
GEN_ALWAYS_INLINE void values_avx(const Chunk *c, const int nq, const int vk, const Source *src, const int64_t hd) {
    if (nq > NQ_MAX || hd > HD_MAX) __builtin_unreachable(); /* the callers' limits */
    const int64_t J = hd / 16, G = hd / KV_GROUP;
    __m512 o[NQ_MAX][HD_MAX / 16];
    __m512 zacc[NQ_MAX][HD_MAX / KV_GROUP];
    for (int i = 0; i < nq; i++) {
        for (int64_t j = 0; j < J; j++) o[i][j] = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; g++) zacc[i][g] = _mm512_setzero_ps();
    }
    float *w[NQ_MAX];
    for (int64_t t = c->t0, n, base; t < c->t1; t += n) {
        KVHead v;
        n = source_run(src, 1, t, c->t1, &v, &base);
        for (int i = 0; i < nq; i++) w[i] = c->s[i] + base; /* the piece's token u is the row's base + u */
        values_piece(w, nq, vk, &v, hd, t - base, t + n - base, o, zacc);
    }
    for (int i = 0; i < nq; i++) {
        if (vk != KV_INT4) {
            for (int64_t j = 0; j < J; j++) _mm512_storeu_ps(c->o[i] + 16 * j, o[i][j]);
            continue;
        }
        float tmp[HD_MAX];
        for (int64_t j = 0; j < J; j++) _mm512_storeu_ps(tmp + 16 * j, o[i][j]);
        for (int64_t d = 0; d < hd; d++)
            c->o[i][d] = tmp[d - d % KV_GROUP + (d % 2) * 16 + d % KV_GROUP / 2] + _mm512_reduce_add_ps(zacc[i][d / KV_GROUP]);
    }
}

/* One copy per kind and nq where hd is 64 or 128, all three constants there; other head sizes share one
 * copy per kind, with run-time loops. */
#define BY_SHAPE(F, KIND, SIDE)                                                                                   \
    (c->hd == 64 ? (nq == 1   ? F(c, 1, KIND, SIDE, 64)                                                           \
                    : nq == 2 ? F(c, 2, KIND, SIDE, 64)                                                           \
                    : nq == 3 ? F(c, 3, KIND, SIDE, 64)                                                           \
                              : F(c, 4, KIND, SIDE, 64))                                                          \
     : c->hd == 128 ? (nq == 1   ? F(c, 1, KIND, SIDE, 128)                                                       \
                       : nq == 2 ? F(c, 2, KIND, SIDE, 128)                                                       \
                       : nq == 3 ? F(c, 3, KIND, SIDE, 128)                                                       \
                                 : F(c, 4, KIND, SIDE, 128))                                                      \
                    : F(c, nq, KIND, SIDE, c->hd))
#define BY_KIND(F, KIND, SIDE)                                                                                    \
    (KIND == KV_INT8   ? BY_SHAPE(F, KV_INT8, SIDE)                                                               \
     : KIND == KV_INT4 ? BY_SHAPE(F, KV_INT4, SIDE)                                                               \
     : KIND == KV_BF16 ? BY_SHAPE(F, KV_BF16, SIDE)                                                               \
                       : BY_SHAPE(F, KV_FLOAT, SIDE))

static void chunk_vector(const Chunk *c, int nq, const Source *src) {
    BY_KIND(scores_avx, src->k.kind, src);
    softmax_chunk(c, nq);
    BY_KIND(values_avx, src->v.kind, src);
}
#undef BY_KIND
#undef BY_SHAPE
#undef sum16
#undef sum16_int
#endif

static void chunk_any(const Chunk *c, int nq, const Source *src, int vector) {
#ifdef GEN_AVX512
    if (vector) {
        chunk_vector(c, nq, src);
        return;
    }
#elif defined(GEN_KV_FLOAT8)
    if (vector) {
        chunk_float8(c, nq, src);
        return;
    }
#endif
    (void)vector;
    chunk_portable(c, nq, src);
}

/* The length of the chunks row b's n positions split into (work items), from its own n alone: never the batch or
 * the thread count, so that a row's sums run in the same order alone and in any batch (a verify of speculated
 * tokens and a batched step give each row the single-token step's bits; a length that grew with the context over
 * the items a step wanted changed them with the batch). One chunk up to 256 positions, then 2 to ATT_CHUNKS, one
 * per ~1K positions: long streams, and items for every thread at batch 1. Whole paged blocks. */
enum { ATT_CHUNKS = 8 };
static inline int64_t att_chunk_len(int64_t n, int64_t block_tokens) {
    const int64_t k = n <= 256 ? 1 : n <= 2048 ? 2 : n > 1024 * ATT_CHUNKS ? ATT_CHUNKS : (n + 1023) / 1024;
    int64_t len = ((n + k - 1) / k + 15) / 16 * 16;
    if (block_tokens) len = (len + block_tokens - 1) / block_tokens * block_tokens;
    return len;
}

/* How many chunks of att_chunk_len cover a row's n positions. */
static inline int64_t att_chunks(int64_t n, int64_t block_tokens) {
    const int64_t len = att_chunk_len(n, block_tokens);
    return (n + len - 1) / len;
}

int64_t gen_causal_attention(const float *q, int64_t q_bs, int64_t q_hs, int64_t q_ts, const float *k, int64_t k_bs,
                             int64_t k_hs, int64_t k_ts, const float *v, int64_t v_bs, int64_t v_hs, int64_t v_ts,
                             float *o, int64_t o_bs, int64_t o_hs, int64_t o_ts, int64_t B, int64_t H, int64_t Hkv,
                             int64_t T, int64_t start, int64_t hd, float scale, int64_t n_threads);

/* A prompt's rows (consecutive positions of one slot in a contiguous fp32 cache) through prompt_attention.c's
 * tiles: each K and V tile read once for a tile of 32 queries, where each row's own pass reads all of its
 * positions again (a 512-token prompt of the 135M shape spent 16% of its time in attention that way). They need
 * no scores scratch, so a prompt's rows may outnumber the rows `scores` holds: anything the tiles do not take
 * (another layout, head_dim past 256, no memory for a thread's tiles) is -1, never the per-row pass. Only prompts
 * come here: a verify's or a batch's rows keep the single-token step's bits, which the tiles' order does not give. */
static int prompt_tiles(const Model *m, const Layer *l, int64_t li, const Rows *r) {
    const int64_t s0 = row_slot(r, 0), p0 = row_pos(r, 0);
    if (m->block_table || m->bf16 || l->k_kind != KV_FLOAT || l->v_kind != KV_FLOAT) return -1;
    for (int64_t b = 1; b < m->batch; b++)
        if (row_slot(r, b) != s0 || row_pos(r, b) != p0 + b) return -1;
    const int64_t hd = m->head_dim, H = m->n_head, Hkv = m->n_kv_head, row = (H + 2 * Hkv) * hd;
    const SlotKV s = slot_kv(m, l, li, s0); /* KV head g's token t at (head0 + g) * T + t, hd floats each */
    const float *k = (const float *)s.k + s.head0 * s.T * hd, *v = (const float *)s.v + s.head0 * s.T * hd;
    return (int)gen_causal_attention(m->qkv, 0, hd, row, k, 0, s.T * hd, hd, v, 0, s.T * hd, hd, m->att, 0, hd, H * hd,
                                     1, H, Hkv, m->batch, p0, hd, 1.f / sqrtf((float)hd), m->n_threads);
}

/* Write every row's k and v into its slot at its position, then attend each row's query heads to positions
 * 0..pos_b of its slot (stores first: rows of one slot at consecutive positions see each other causally).
 *
 * Work items are (row, KV head, chunk of positions): each reads its K and V tokens once for all the
 * query heads that share them (GQA), computes its own softmax over the chunk (max, weights, weighted V
 * sum), and the chunks of a head are merged after. Long contexts split into chunks so that every thread
 * has work even with fewer KV heads than threads. A prompt's rows go to prompt_tiles instead. Returns 0, or -1 when
 * a prompt's rows could not take the tiles. */
static int attention(const Model *m, const Layer *l, int64_t li, const Rows *r) {
    const int64_t hd = m->head_dim, H = m->n_head, Hkv = m->n_kv_head, T = m->max_tokens;
    const int64_t row = (H + 2 * Hkv) * hd, group = H / Hkv;
    const int64_t bt = m->block_table ? m->block_tokens : 0;
    int64_t chunks = 1; /* the most chunks any row's positions take */
    for (int64_t b = 0; b < m->batch; b++) {
        const int64_t pos = row_pos(r, b), own = att_chunks(pos + 1, bt);
        const SlotKV s = slot_kv(m, l, li, row_slot(r, b));
        chunks = own > chunks ? own : chunks;
        for (int64_t g = 0; g < Hkv; g++) {
            /* paged: the pool is one cache row of pool_blocks * block_tokens slots, block after block */
            const int64_t at = m->block_table ? (g * m->pool_blocks + page_of(m, row_slot(r, b), pos)) * m->block_tokens +
                                                    pos % m->block_tokens
                                              : (s.head0 + g) * s.T + pos;
            const float *k = m->qkv + b * row + (H + g) * hd, *v = k + Hkv * hd;
            kv_store(l->k_kind, (int)m->bf16, s.k, s.ks, s.kz, at, k, hd);
            kv_store(l->v_kind, (int)m->bf16, s.v, s.vs, s.vz, at, v, hd);
        }
    }
    if (r->prompt) return prompt_tiles(m, l, li, r);
    /* Per (row, query head, chunk): the weighted V sum, the chunk's top score and its weights' sum. */
    const int64_t heads = m->batch * Hkv, stride = hd + 2;
    float *part = chunks > 1 ? malloc((size_t)(m->batch * H * chunks * stride) * sizeof(float)) : NULL;
    if (!part) chunks = 1; /* out of memory: one chunk a head, written directly (other bits than a split) */
#ifdef GEN_AVX512
    const int vector = hd % 16 == 0 && hd <= HD_MAX;
#endif
    /* dynamic: items of different lengths, and a loaded machine, evened out */
#pragma omp parallel for schedule(dynamic, 1) num_threads(m->n_threads)
    for (int64_t item = 0; item < heads * chunks; item++) {
        const int64_t b = item / (Hkv * chunks), g = item / chunks % Hkv, ci = item % chunks;
        const int64_t n = row_pos(r, b) + 1, len = part ? att_chunk_len(n, bt) : n;
        const int64_t t0 = ci * len, t1 = t0 + len < n ? t0 + len : n;
        if (t0 >= n) continue; /* past this row's positions: the merge stops before this chunk */
        Source src = {{0, NULL, NULL, NULL}, {0, NULL, NULL, NULL}, NULL, l, row_slot(r, b), 0};
        if (m->block_table) { /* read block by block (source_run); k and v here give the kinds */
            src.m = m, src.head = g * m->pool_blocks * m->block_tokens;
            src.k = kv_head_at(l->k_kind, (int)m->bf16, l->k_cache, l->k_scale, l->k_zero, src.head, hd);
            src.v = kv_head_at(l->v_kind, (int)m->bf16, l->v_cache, l->v_scale, l->v_zero, src.head, hd);
        } else {
            const SlotKV s = slot_kv(m, l, li, src.slot);
            src.k = kv_head(l->k_kind, (int)m->bf16, s.k, s.ks, s.kz, s.head0 + g, s.T, hd);
            src.v = kv_head(l->v_kind, (int)m->bf16, s.v, s.vs, s.vz, s.head0 + g, s.T, hd);
        }
#ifdef GEN_AVX512
        const int vec = vector;
#elif defined(GEN_KV_FLOAT8)
        const int vec = hd % 8 == 0 && src.k.kind == KV_FLOAT && src.v.kind == KV_FLOAT;
#else
        const int vec = 0;
#endif
        for (int64_t h0 = g * group; h0 < (g + 1) * group; h0 += 4) {
            const int nq = (int)((g + 1) * group - h0 < 4 ? (g + 1) * group - h0 : 4);
            const float *q[4];
            float *sc[4], *o[4], top[4], sum[4];
            for (int i = 0; i < nq; i++) {
                const int64_t h = h0 + i;
                q[i] = m->qkv + b * row + h * hd;
                sc[i] = m->scores + (b * H + h) * T;
                o[i] = part ? part + ((b * H + h) * chunks + ci) * stride : m->att + (b * H + h) * hd;
            }
            const Chunk c = {q, sc, o, top, sum, t0, t1, hd, 1.f / sqrtf((float)hd)};
            chunk_any(&c, nq, &src, vec);
            for (int i = 0; i < nq; i++) {
                if (part) {
                    o[i][hd] = top[i], o[i][hd + 1] = sum[i];
                } else { /* as the merge below divides a lone chunk's sums: the same bits either way */
                    for (int64_t d = 0; d < hd; d++) o[i][d] /= sum[i];
                }
            }
        }
    }
    if (!part) return 0;
    /* Merge each head's chunks (those its row reached): rescale each to the overall top score, normalise. */
    for (int64_t bh = 0; bh < m->batch * H; bh++) {
        const int64_t used = att_chunks(row_pos(r, bh / H) + 1, bt); /* chunks covering positions 0..pos */
        const float *p = part + bh * chunks * stride;
        float top = -INFINITY, sum = 0.f, *out = m->att + bh * hd;
        for (int64_t ci = 0; ci < used; ci++) top = fmaxf(top, p[ci * stride + hd]);
        memset(out, 0, hd * sizeof(float));
        for (int64_t ci = 0; ci < used; ci++) {
            const float w = expf(p[ci * stride + hd] - top);
            sum += w * p[ci * stride + hd + 1];
            for (int64_t d = 0; d < hd; d++) out[d] += w * p[ci * stride + d];
        }
        for (int64_t d = 0; d < hd; d++) out[d] /= sum;
    }
    free(part);
    return 0;
}

#endif
