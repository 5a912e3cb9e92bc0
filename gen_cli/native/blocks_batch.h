/* Block rows against several activation rows at once (a batch of sequences, a verified draft, a short prompt):
 * each group of weight blocks is unpacked once into registers (nibbles, fp32 scales and mins) and dotted with up to
 * BATCH_J activation rows, which were prepared once per matmul in the layout the inner loop loads directly. The
 * one-row kernels (blocks_32.h) unpack every block again for every activation row, so a step of B rows cost about
 * B single-row steps.
 *
 * Q4_0, Q4_1, Q5_0, Q5_1 (groups of 4 blocks), Q8_0 (pairs of blocks), Q4_K and Q6_K (super-blocks).
 * The integer sums per block are the one-row kernels' (exact in int32); only the fp32 scaling and summation order
 * differ, and each activation row's order is fixed (independent of how many rows share the call), so a row gets
 * the same bits alone as in any batch. AVX-512 VNNI + VBMI (GEN_BLOCKS_512), and Q6_K on AVX2 (GEN_BLOCKS_256);
 * elsewhere the traits table has no batch entries and the one-row kernels run per activation row.
 */
#ifndef GEN_BLOCKS_BATCH_H
#define GEN_BLOCKS_BATCH_H

#include <stdint.h>
#include <string.h>

#include "blocks_32.h"
#include "blocks_common.h"
#include "blocks_k.h"
#include "features.h"

enum { BATCH_J = 8 }; /* activation rows per pass over a weight row (the accumulators that fit in registers) */

/* The activation rows of one matmul, each prepared by the type's batch_prep: row b at prep + b prep_stride. */
typedef struct {
    const uint8_t *prep;
    int64_t prep_stride;
} Batch;

/* Columns go in chunks of about this many prepared bytes per activation row: BATCH_J rows of a chunk stay in L1
 * while the row block's weight rows pass over it (a whole 8192-column row of 8 rows would not). */
enum { CHUNK_BYTES = 2560 };

/* The driver a super-block type's tile shares (Q4_K, Q6_K): columns in chunks of CHUNK_BYTES of prepared activation
 * per row, each weight row's tile against nj rows, the chunks' partial sums added. */
#define SUPER_CASE(TILE_FN, N) \
    case N: TILE_FN(N, row, n, xc, x.prep_stride, part); break;
#define SUPER_BATCH(NAME, TILE_FN, BYTES, PREP)                                                                     \
    static void batch_##NAME(const uint8_t *w, int64_t stride, int nrows, Batch x, int64_t b0, int nj, int64_t nb, \
                             float *out) {                                                                          \
        const int64_t step = CHUNK_BYTES / (PREP); /* super-blocks per chunk */                                    \
        const uint8_t *xp = x.prep + b0 * x.prep_stride;                                                            \
        for (int64_t c0 = 0; c0 < nb; c0 += step) {                                                                 \
            const int64_t n = nb - c0 < step ? nb - c0 : step;                                                      \
            for (int r = 0; r < nrows; r++) {                                                                       \
                const uint8_t *row = w + r * stride + c0 * (BYTES), *xc = xp + c0 * (PREP);                         \
                float part[BATCH_J], *o = out + r * BATCH_J;                                                        \
                switch (nj) { /* a constant count in each copy: the accumulators stay in registers */              \
                    SUPER_CASE(TILE_FN, 1) SUPER_CASE(TILE_FN, 2) SUPER_CASE(TILE_FN, 3)                            \
                    SUPER_CASE(TILE_FN, 4) SUPER_CASE(TILE_FN, 5) SUPER_CASE(TILE_FN, 6)                            \
                    SUPER_CASE(TILE_FN, 7) SUPER_CASE(TILE_FN, 8)                                                   \
                }                                                                                                   \
                for (int j = 0; j < nj; j++) o[j] = c0 ? o[j] + part[j] : part[j];                                  \
            }                                                                                                       \
        }                                                                                                           \
    }

#ifdef GEN_BLOCKS_512

/* Bytes [0, n) of a 64-byte window (n may be <= 0 or >= 64): the masked loads of a row's last, partial group. */
static inline __mmask64 bytes_mask(int64_t n) {
    return n <= 0 ? 0 : n >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << n) - 1;
}

/* The sum of v's 16 lanes, pairwise: lanes i + 8, then i + 4, then i + 2, then i + 1 (GCC's _mm512_reduce_add_ps's
 * order, written out so that sums16 below matches it on every compiler). */
static inline float sum16(__m512 v) {
    const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 c = _mm_add_ps(b, _mm_shuffle_ps(b, b, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, _MM_SHUFFLE(3, 2, 1, 1))));
}

/* out[j] = sum16(v[j]) for j < n, n <= 8, in a third of the instructions: the 8 vectors are reduced together, each
 * step adding the same lanes as sum16 (rows past n count as zeros and land in no output). So a row's result is the
 * same bits whether it is reduced alone or with others. */
static inline void sums16(const __m512 *v, int n, float *out) {
    if (n == 1) {
        out[0] = sum16(v[0]);
        return;
    }
    __m512 x[8], s[4], u[2];
    for (int j = 0; j < 8; j++) x[j] = j < n ? v[j] : _mm512_setzero_ps();
    for (int k = 0; k < 4; k++) /* [x_2k lanes i + (i + 8), x_2k+1 likewise] */
        s[k] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0x44), _mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0xEE));
    for (int m = 0; m < 2; m++) /* 128-bit lane k: x_4m+k's lanes i + (i + 4) */
        u[m] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * m], s[2 * m + 1], 0x88), _mm512_shuffle_f32x4(s[2 * m], s[2 * m + 1], 0xDD));
    const __m512 t = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1])); /* i + (i + 2) */
    const __m512 r = _mm512_add_ps(t, _mm512_permute_ps(t, _MM_SHUFFLE(1, 0, 3, 2)));                /* i + (i + 1) */
    float all[16];
    _mm512_storeu_ps(all, r); /* 128-bit lane k: x_k's total, then x_k+4's */
    for (int j = 0; j < n; j++) out[j] = all[4 * (j % 4) + j / 4];
}

/* The 16 int32 lanes of v[j] summed, for j < n (n <= 8), into lane ISUM_LANE(j) of one vector (sums16's steps;
 * any order gives the same integers); lanes of no row hold 0. */
#define ISUM_LANE(j) (4 * ((j) % 4) + (j) / 4)
static inline __m512i isums16(const __m512i *v, int n) {
    __m512i x[8], s[4], u[2];
    for (int j = 0; j < 8; j++) x[j] = j < n ? v[j] : _mm512_setzero_si512();
    for (int k = 0; k < 4; k++)
        s[k] = _mm512_add_epi32(_mm512_shuffle_i32x4(x[2 * k], x[2 * k + 1], 0x44), _mm512_shuffle_i32x4(x[2 * k], x[2 * k + 1], 0xEE));
    for (int m = 0; m < 2; m++)
        u[m] = _mm512_add_epi32(_mm512_shuffle_i32x4(s[2 * m], s[2 * m + 1], 0x88), _mm512_shuffle_i32x4(s[2 * m], s[2 * m + 1], 0xDD));
    const __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi32(u[0], u[1]), _mm512_unpackhi_epi32(u[0], u[1]));
    return _mm512_add_epi32(t, _mm512_shuffle_epi32(t, _MM_PERM_BADC));
}

/* ---- Q4_0, Q4_1, Q5_0, Q5_1: groups of 4 blocks (128 elements) ------------------------------------------ */

/* Block k of a group on the 32-bit lanes l with l % 4 == k (elements 4 (l / 4) .. + 3 of it, and + 16), so that a
 * vector of one value per lane broadcasts from its 4 per-block values. A prepared activation row of G groups: G
 * times xa (the 64 int8 elements 0..15 of the 4 blocks, in that lane order) and xb (16..31), 128 bytes; then G
 * times the 4 fp32 scales d; then G times 4 values o: with a min, fp32 d s (the min's factor, dotted with the
 * weights' mins after the integer sums), without, int32 -(8 or 16) s / 4 (the offset's share per lane, which
 * starts the integer sum). A row's last 1..3 blocks make a group padded with zeros (their weights are loaded
 * masked: zeros too). */
enum { Q45_PREP = 128 + 16 + 16 };

static int64_t batch_prep_bytes_q45(int64_t nb) { return (nb + 3) / 4 * Q45_PREP; }

GEN_ALWAYS_INLINE void prep_q45(Act a, int64_t nb, uint8_t *restrict out, const int bits, const int min) {
    uint8_t ix[64], iy[64];
    for (int j = 0; j < 64; j++) {
        int k = (j / 4) % 4, e = 4 * (j / 16) + j % 4;
        ix[j] = (uint8_t)(k * 32 + e), iy[j] = (uint8_t)(k * 32 + 16 + e);
    }
    const __m512i px = _mm512_loadu_si512(ix), py = _mm512_loadu_si512(iy);
    const int64_t groups = (nb + 3) / 4;
    float *xd = (float *)(out + groups * 128), *xo = xd + 4 * groups;
    for (int64_t b = 0; b < nb; b += 4, out += 128, xd += 4, xo += 4) {
        const int64_t k = nb - b < 4 ? nb - b : 4; /* blocks in this group */
        const __m512i x0 = _mm512_maskz_loadu_epi8(bytes_mask(32 * k), a.q + b * 32);
        const __m512i x1 = _mm512_maskz_loadu_epi8(bytes_mask(32 * k - 64), a.q + b * 32 + 64);
        _mm512_storeu_si512(out, _mm512_permutex2var_epi8(x0, px, x1));
        _mm512_storeu_si512(out + 64, _mm512_permutex2var_epi8(x0, py, x1));
        const __mmask8 kk = (__mmask8)((1u << k) - 1);
        const __m128 d = _mm_maskz_loadu_ps(kk, a.d + b);
        const __m128i xs = _mm_cvtepi16_epi32(_mm_maskz_loadu_epi16(kk, a.s + b));
        _mm_storeu_ps(xd, d);
        if (min)
            _mm_storeu_ps(xo, _mm_mul_ps(_mm_cvtepi32_ps(xs), d));
        else
            _mm_storeu_si128((__m128i *)xo, _mm_sub_epi32(_mm_setzero_si128(), _mm_slli_epi32(xs, bits == 5 ? 2 : 1)));
    }
}

/* The byte permutes that pull 4 blocks' nibbles, scales, mins and 5th bits out of their 4 bs bytes into the lane
 * order above. Q5: each 64-bit lane holds the 5th-bit words of its two 32-bit lanes' blocks, and a multishift
 * rotates bit e (e + 16) of the right word to bit 4 of the byte of element e (e + 16). */
typedef struct {
    __m512i pq, pd, pm, ph, ra, rb;
} Q45Perm;

GEN_ALWAYS_INLINE Q45Perm q45_perm(const int bits, const int min) {
    const int64_t ho = Q45_HO(min), qo = Q45_QO(bits, min), bs = Q45_BYTES(bits, min);
    uint8_t iq[64], id[64], im[64], ih[64], sa[64], sb[64];
    for (int j = 0; j < 64; j++) {
        int k = (j / 4) % 4, e = 4 * (j / 16) + j % 4, half = 32 * ((j % 8) / 4), kd = (j / 2) % 4;
        iq[j] = (uint8_t)(k * bs + qo + e);
        id[j] = (uint8_t)(kd * bs + (j & 1)); /* fp16 d of lane j / 2's block (the low 32 bytes used) */
        im[j] = (uint8_t)(kd * bs + 2 + (j & 1));
        ih[j] = (uint8_t)(k * bs + ho + j % 4);
        sa[j] = (uint8_t)((half + e - 4) & 63), sb[j] = (uint8_t)((half + e + 12) & 63);
    }
    Q45Perm p = {_mm512_loadu_si512(iq), _mm512_loadu_si512(id), _mm512_loadu_si512(im),
                 _mm512_loadu_si512(ih), _mm512_loadu_si512(sa), _mm512_loadu_si512(sb)};
    return p;
}

/* One group of 4 blocks, its 4 bs bytes in lo:hi, against nj prepared activation groups (x: their xa, xb; xd,
 * xo: their scales and offsets; xstride bytes from one row to the next). With a min, the group's 4 mins go to mw. */
GEN_ALWAYS_INLINE void q45_group(const int nj, const int bits, const int min, const Q45Perm *pp, __m512i lo,
                                 __m512i hi, const uint8_t *restrict x, const float *xd, const float *xo,
                                 int64_t xstride, __m512 *acc, float *mw) {
    const __m512i m4 = _mm512_set1_epi8(0xF), sixteen = _mm512_set1_epi8(16), zero = _mm512_setzero_si512();
    const __m512i q = _mm512_permutex2var_epi8(lo, pp->pq, hi);
    __m512i qa = _mm512_and_si512(q, m4), qb = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
    if (bits == 5) { /* qa | (rotated bits & 16) */
        const __m512i fifth = _mm512_permutex2var_epi8(lo, pp->ph, hi);
        qa = _mm512_ternarylogic_epi32(qa, _mm512_multishift_epi64_epi8(pp->ra, fifth), sixteen, 0xF8);
        qb = _mm512_ternarylogic_epi32(qb, _mm512_multishift_epi64_epi8(pp->rb, fifth), sixteen, 0xF8);
    }
    const __m512 dw = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi8(lo, pp->pd, hi)));
    if (min) _mm_storeu_ps(mw, _mm_cvtph_ps(_mm512_castsi512_si128(_mm512_permutex2var_epi8(lo, pp->pm, hi))));
#pragma GCC unroll 8
    for (int j = 0; j < nj; j++) {
        const uint8_t *xj = x + j * xstride;
        const float *dj = (const float *)((const uint8_t *)xd + j * xstride);
        const __m512i start =
            min ? zero : _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)((const uint8_t *)xo + j * xstride)));
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, qa, _mm512_loadu_si512(xj)), qb,
                                                _mm512_loadu_si512(xj + 64));
        acc[j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), dw), _mm512_broadcast_f32x4(_mm_loadu_ps(dj)), acc[j]);
    }
}

enum { MIN_CHUNK = 64 }; /* groups whose mins are gathered on the stack before their dot with the d s values */

/* One weight row of nb blocks against nj prepared activation rows (xstride bytes apart; x their xa, xb, xd, xo
 * their scales and offsets, from this row's first block on): out[j] = row . x_j. */
GEN_ALWAYS_INLINE void q45_tile(const int nj, const int bits, const int min, const Q45Perm *pp,
                                const uint8_t *restrict w, int64_t nb, const uint8_t *restrict x, const float *xd,
                                const float *xo, int64_t xstride, float *out) {
    const int64_t bs = Q45_BYTES(bits, min), ng = nb / 4, groups = (nb + 3) / 4;
    const __mmask64 tail = bytes_mask(4 * bs - 64); /* bytes of the 4 blocks past the first 64 */
    __m512 acc[BATCH_J], mins[BATCH_J];
    float mw[4 * MIN_CHUNK];
#pragma GCC unroll 8
    for (int j = 0; j < nj; j++) acc[j] = mins[j] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < groups; g0 += MIN_CHUNK) {
        const int64_t g1 = g0 + MIN_CHUNK < groups ? g0 + MIN_CHUNK : groups;
        for (int64_t g = g0; g < g1; g++) {
            const uint8_t *p = w + g * 4 * bs;
            __m512i lo, hi;
            if (g < ng) {
                lo = _mm512_loadu_si512(p), hi = _mm512_maskz_loadu_epi8(tail, p + 64);
            } else { /* the last 1..3 blocks: a zero-padded group */
                const int64_t n = (nb - 4 * ng) * bs;
                lo = _mm512_maskz_loadu_epi8(bytes_mask(n), p), hi = _mm512_maskz_loadu_epi8(bytes_mask(n - 64), p + 64);
            }
            q45_group(nj, bits, min, pp, lo, hi, x + g * 128, xd + 4 * g, xo + 4 * g, xstride, acc, mw + 4 * (g - g0));
        }
        if (min) /* Σ m d s over the chunk's blocks: 16 blocks per vector */
            for (int64_t i = 0; i < 4 * (g1 - g0); i += 16) {
                const __mmask16 k = 4 * (g1 - g0) - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (4 * (g1 - g0) - i)) - 1);
                const __m512 m = _mm512_maskz_loadu_ps(k, mw + i);
#pragma GCC unroll 8
                for (int j = 0; j < nj; j++) {
                    const float *oj = (const float *)((const uint8_t *)(xo + 4 * g0 + i) + j * xstride);
                    mins[j] = _mm512_fmadd_ps(m, _mm512_maskz_loadu_ps(k, oj), mins[j]);
                }
            }
    }
    if (min)
#pragma GCC unroll 8
        for (int j = 0; j < nj; j++) acc[j] = _mm512_add_ps(acc[j], mins[j]);
    sums16(acc, nj, out);
}

/* nrows weight rows (stride bytes apart) against activation rows b0 .. b0 + nj - 1: out[r * BATCH_J + j]. */
GEN_ALWAYS_INLINE void batch_q45(const uint8_t *restrict w, int64_t stride, int nrows, Batch x, int64_t b0, int nj,
                                 int64_t nb, float *out, const int bits, const int min) {
    const Q45Perm pp = q45_perm(bits, min);
    const int64_t bs = Q45_BYTES(bits, min), groups = (nb + 3) / 4, step = CHUNK_BYTES / Q45_PREP;
    const uint8_t *xp = x.prep + b0 * x.prep_stride;
    const float *xd = (const float *)(xp + groups * 128), *xo = xd + 4 * groups;
    for (int64_t g0 = 0; g0 < groups; g0 += step) {
        const int64_t g1 = g0 + step < groups ? g0 + step : groups, n = (4 * g1 < nb ? 4 * g1 : nb) - 4 * g0;
        for (int r = 0; r < nrows; r++) {
            const uint8_t *row = w + r * stride + 4 * g0 * bs;
            float part[BATCH_J], *o = out + r * BATCH_J;
            switch (nj) { /* a constant count in each copy: the accumulators stay in registers */
#define NJ(N) \
    case N: q45_tile(N, bits, min, &pp, row, n, xp + g0 * 128, xd + 4 * g0, xo + 4 * g0, x.prep_stride, part); break;
                NJ(1) NJ(2) NJ(3) NJ(4) NJ(5) NJ(6) NJ(7) NJ(8)
#undef NJ
            }
            for (int j = 0; j < nj; j++) o[j] = g0 ? o[j] + part[j] : part[j];
        }
    }
}

#define Q45_BATCH(NAME, BITS, MIN)                                                                                     \
    static void batch_prep_##NAME(Act a, int64_t nb, uint8_t *out) { prep_q45(a, nb, out, BITS, MIN); }              \
    static void batch_##NAME(const uint8_t *w, int64_t stride, int nrows, Batch x, int64_t b0, int nj, int64_t nb,   \
                             float *out) {                                                                             \
        batch_q45(w, stride, nrows, x, b0, nj, nb, out, BITS, MIN);                                                    \
    }
Q45_BATCH(q4_0, 4, 0)
Q45_BATCH(q4_1, 4, 1)
Q45_BATCH(q5_0, 5, 0)
Q45_BATCH(q5_1, 5, 1)
#undef Q45_BATCH

/* ---- Q8_0: groups of 2 blocks (64 elements) ------------------------------------------------------------- */

/* A prepared group, 128 bytes: the activation plus 128 as unsigned bytes (dpbusd's unsigned operand, so the
 * signed weights go in as they are), then 16 fp32 scales (block 0's on lanes 0..7, block 1's on 8..15). The
 * extra 128 Σ w is taken off per weight group, once for all the activation rows. An odd last block makes a group
 * padded with zeros (its weights too: masked loads). */
enum { Q8_PREP = 128 };

static int64_t batch_prep_bytes_q8_0(int64_t nb) { return (nb + 1) / 2 * Q8_PREP; }

static void batch_prep_q8_0(Act a, int64_t nb, uint8_t *restrict out) {
    const __m512i flip = _mm512_set1_epi8((char)0x80); /* x + 128 for x in [-127, 127]: the sign bit flipped */
    for (int64_t b = 0; b < nb; b += 2, out += Q8_PREP) {
        const int two = nb - b >= 2;
        const __mmask64 k = two ? ~(__mmask64)0 : bytes_mask(32);
        _mm512_storeu_si512(out, _mm512_maskz_xor_epi64((__mmask8)(two ? 0xFF : 0x0F), _mm512_maskz_loadu_epi8(k, a.q + b * 32), flip));
        _mm512_storeu_ps((float *)(out + 64),
                         _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a.d[b]), _mm512_set1_ps(two ? a.d[b + 1] : 0.f)));
    }
}

/* One group of 2 blocks (their 64 weights in wv, scales in dw) against nj prepared rows (xstride bytes apart). */
GEN_ALWAYS_INLINE void q8_group(const int nj, __m512i wv, __m512 dw, const uint8_t *restrict x, int64_t xstride,
                                __m512 *acc) {
    const __m512i zero = _mm512_setzero_si512(), c128 = _mm512_set1_epi8((char)0x80);
    const __m512i start = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, c128, wv)); /* -128 Σ w per lane */
#pragma GCC unroll 8
    for (int j = 0; j < nj; j++) {
        const uint8_t *xj = x + j * xstride;
        const __m512i dot = _mm512_dpbusd_epi32(start, _mm512_loadu_si512(xj), wv);
        acc[j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), dw), _mm512_loadu_ps((const float *)(xj + 64)), acc[j]);
    }
}

GEN_ALWAYS_INLINE void q8_tile(const int nj, const uint8_t *restrict w, int64_t nb, const uint8_t *restrict x,
                               int64_t xstride, float *out) {
    const int64_t ng = nb / 2;
    __m512 acc[BATCH_J];
#pragma GCC unroll 8
    for (int j = 0; j < nj; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *p = w + g * 68;
        const __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p + 2))),
                                              _mm256_loadu_si256((const __m256i *)(p + 36)), 1);
        q8_group(nj, wv, _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(f16(p)), _mm512_set1_ps(f16(p + 34))),
                 x + g * Q8_PREP, xstride, acc);
    }
    if (2 * ng < nb) { /* an odd last block: the second half zero */
        const uint8_t *p = w + ng * 68;
        q8_group(nj, _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(p + 2))),
                 _mm512_maskz_mov_ps(0x00FF, _mm512_set1_ps(f16(p))), x + ng * Q8_PREP, xstride, acc);
    }
    sums16(acc, nj, out);
}

static void batch_q8_0(const uint8_t *w, int64_t stride, int nrows, Batch x, int64_t b0, int nj, int64_t nb,
                       float *out) {
    const int64_t step = 2 * (CHUNK_BYTES / Q8_PREP); /* blocks per chunk */
    const uint8_t *xp = x.prep + b0 * x.prep_stride;
    for (int64_t c0 = 0; c0 < nb; c0 += step) {
        const int64_t n = nb - c0 < step ? nb - c0 : step;
        for (int r = 0; r < nrows; r++) {
            const uint8_t *row = w + r * stride + c0 * 34;
            float part[BATCH_J], *o = out + r * BATCH_J;
            switch (nj) {
#define NJ(N) \
    case N: q8_tile(N, row, n, xp + c0 / 2 * Q8_PREP, x.prep_stride, part); break;
                NJ(1) NJ(2) NJ(3) NJ(4) NJ(5) NJ(6) NJ(7) NJ(8)
#undef NJ
            }
            for (int j = 0; j < nj; j++) o[j] = c0 ? o[j] + part[j] : part[j];
        }
    }
}

/* ---- Q4_K: super-blocks of 256 elements ----------------------------------------------------------------- */

/* A prepared super-block, 288 bytes: its 256 int8 elements as quantized (chunk c's 64 bytes match the weights'
 * low then high nibbles of qs[32c .. 32c + 31]), the 8 sums per 32 elements (int16), then the fp32 scale. */
enum { Q4K_PREP = 288 };

static int64_t batch_prep_bytes_q4_k(int64_t nb) { return nb * Q4K_PREP; }

static void batch_prep_q4_k(Act a, int64_t nb, uint8_t *restrict out) {
    for (int64_t b = 0; b < nb; b++, out += Q4K_PREP) {
        memcpy(out, a.q + b * 256, 256);
        _mm_storeu_si128((__m128i *)(out + 256), _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)(a.s + b * 16)),
                                                                _mm_loadu_si128((const __m128i *)(a.s + b * 16 + 8))));
        memcpy(out + 272, a.d + b, sizeof(float));
    }
}

/* One Q4_K row against nj prepared rows: dot_q4_k's integer sums (maddubs, then madd by the 6-bit scales), each
 * super-block's nibbles and scales unpacked once for the nj rows. */
GEN_ALWAYS_INLINE void q4k_tile(const int nj, const uint8_t *restrict w, int64_t nb, const uint8_t *restrict x,
                                int64_t xstride, float *out) {
    __m512i pick[4]; /* vpshufb controls: int16 scale 2c in the low 256 bits, 2c + 1 above */
    for (int c = 0; c < 4; c++)
        pick[c] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16((short)(0x0100 * (4 * c + 1) + 4 * c))),
                                     _mm256_set1_epi16((short)(0x0100 * (4 * c + 3) + 4 * c + 2)), 1);
    const __m256i m4 = _mm256_set1_epi8(0xF);
    __m512 accf[BATCH_J];
    __m128 accm[BATCH_J];
#pragma GCC unroll 8
    for (int j = 0; j < nj; j++) accf[j] = _mm512_setzero_ps(), accm[j] = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 144, *qs = p + 16;
        uint32_t u[4];
        q4k_scale_words(p, u);
        const __m512i scales = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)u)));
        const __m128i mn16 = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(u + 2)));
        __m512i v[4], sc[4];
        for (int c = 0; c < 4; c++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            v[c] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(q, m4)),
                                      _mm256_and_si256(_mm256_srli_epi16(q, 4), m4), 1);
            sc[c] = _mm512_shuffle_epi8(scales, pick[c]);
        }
        const __m512 dw = _mm512_set1_ps(f16(p));
        const __m128 dmin = _mm_set1_ps(f16(p + 2));
#pragma GCC unroll 8
        for (int j = 0; j < nj; j++) {
            const uint8_t *xj = x + j * xstride + b * Q4K_PREP;
            __m512i acc = _mm512_madd_epi16(_mm512_maddubs_epi16(v[0], _mm512_loadu_si512(xj)), sc[0]);
            for (int c = 1; c < 4; c++)
                acc = _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(v[c], _mm512_loadu_si512(xj + 64 * c)), sc[c]));
            const float dx = *(const float *)(xj + 272);
            accf[j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), dw), _mm512_set1_ps(dx), accf[j]);
            const __m128i ms = _mm_madd_epi16(mn16, _mm_loadu_si128((const __m128i *)(xj + 256)));
            accm[j] = _mm_fmadd_ps(_mm_cvtepi32_ps(ms), _mm_mul_ps(dmin, _mm_set1_ps(dx)), accm[j]);
        }
    }
    sums16(accf, nj, out);
#pragma GCC unroll 8
    for (int j = 0; j < nj; j++) {
        const __m128 m2 = _mm_add_ps(accm[j], _mm_movehl_ps(accm[j], accm[j]));
        out[j] -= _mm_cvtss_f32(_mm_add_ss(m2, _mm_movehdup_ps(m2)));
    }
}


/* ---- Q6_K: super-blocks of 256 elements ----------------------------------------------------------------- */

/* A prepared super-block, 292 bytes: its 256 int8 elements in q6k_quarters' order, their 16 sums of 16 (int16, the
 * scales' order), then the fp32 scale. */
enum { Q6K_PREP = 256 + 32 + 4 };

static int64_t batch_prep_bytes_q6_k(int64_t nb) { return nb * Q6K_PREP; }

static void batch_prep_q6_k(Act a, int64_t nb, uint8_t *restrict out) {
    for (int64_t b = 0; b < nb; b++, out += Q6K_PREP) {
        for (int c = 0; c < 4; c++) /* vector c: elements 32 c .. + 31, then 128 + 32 c .. + 31 (q6k_quarters) */
            for (int hh = 0; hh < 2; hh++)
                memcpy(out + 64 * c + 32 * hh, a.q + b * 256 + 128 * hh + 32 * c, 32);
        memcpy(out + 256, a.s + b * 16, 32);
        memcpy(out + 288, a.d + b, sizeof(float));
    }
}

/* A super-block's codes u = q + 32 (0 .. 63) as 4 vectors, vector k holding quarter k of both halves: elements
 * 32 k .. + 31 in bytes 0..31, 128 + 32 k .. + 31 above (both halves unpacked in the same 512-bit ops). */
GEN_ALWAYS_INLINE void q6k_quarters(const uint8_t *p, __m512i q[4]) {
    const __m512i m4 = _mm512_set1_epi8(0xF), m3 = _mm512_set1_epi8(3);
#define HALVES(at) \
    _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p + (at)))), \
                       _mm256_loadu_si256((const __m256i *)(p + 64 + (at))), 1)
    const __m512i l0 = HALVES(0), l1 = HALVES(32), qh = _mm512_loadu_si512(p + 128); /* qh: half 0's 32 bytes, half 1's */
#undef HALVES
    for (int k = 0; k < 4; k++) {
        const __m512i l = k & 1 ? l1 : l0, nib = _mm512_and_si512(k < 2 ? l : _mm512_srli_epi16(l, 4), m4);
        q[k] = _mm512_or_si512(nib, _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(qh, 2 * k), m3), 4));
    }
}

/* One Q6_K row against nj prepared rows, row j's sum going on in lane ISUM_LANE(j) of acc. Per super-block, once
 * for all rows: the codes u = q + 32 (q6k_quarters), each lane's 16-element scale, and the 16 scales times -32. Per
 * row: the scales times the activation's 16 sums (-32 Σ sc s, the codes' offset), then 4 dpbusd of the codes
 * against the activations, each times its scales by a vpdpwssd (a lane's dot, at most 4 * 63 * 127, fits int16;
 * exact in int32). The rows' lanes then summed together (the super-block's exact integer sums), one FMA with d d_x
 * for all of them (dx: the rows' d_x per super-block, in their lanes): blocks_q6k16.h's steps for each row, so a
 * row gets its bits whichever of the two kernels a batch takes. */
GEN_ALWAYS_INLINE void q6k_tile(const int nj, const uint8_t *restrict w, int64_t nb, const uint8_t *restrict x,
                                int64_t xstride, const float *restrict dx, __m512 *acc) {
    const __m512i zero = _mm512_setzero_si512(), low16 = _mm512_set1_epi32(0xFFFF);
    __m512i pick[4]; /* lane l of vector c -> its 16-element scale: 2 c + l / 4 below lane 8, 8 + 2 c + (l - 8) / 4 above */
    for (int c = 0; c < 4; c++) {
        int32_t idx[16];
        for (int l = 0; l < 16; l++) idx[l] = l < 8 ? 2 * c + l / 4 : 8 + 2 * c + (l - 8) / 4;
        pick[c] = _mm512_loadu_si512(idx);
    }
    __m512 sum = *acc;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 210;
        fetch_ahead(p, 210);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 192)));
        const __m256i off = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(sc16, 5)); /* -32 sc: int16 */
        /* the 16 scales in each lane's low int16, 0 above: vpdpwssd multiplies a lane's low halves only */
        const __m512i s32 = _mm512_and_si512(_mm512_cvtepi16_epi32(sc16), low16);
        __m512i wq[4], sc[4];
        q6k_quarters(p, wq);
        for (int c = 0; c < 4; c++) sc[c] = _mm512_permutexvar_epi32(pick[c], s32);
        __m512i s[BATCH_J];
#pragma GCC unroll 8
        for (int j = 0; j < nj; j++) {
            const uint8_t *xj = x + j * xstride + b * Q6K_PREP;
            s[j] = _mm512_zextsi256_si512(_mm256_madd_epi16(off, _mm256_loadu_si256((const __m256i *)(xj + 256))));
            for (int c = 0; c < 4; c++) /* a lane's dot fits int16: its low half times the scale is the product */
                s[j] = _mm512_dpwssd_epi32(s[j], _mm512_dpbusd_epi32(zero, wq[c], _mm512_loadu_si512(xj + 64 * c)), sc[c]);
        }
        const __m512 dd = _mm512_mul_ps(_mm512_set1_ps(f16(p + 208)), _mm512_loadu_ps(dx + 16 * b));
        sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isums16(s, nj)), dd, sum);
    }
    *acc = sum;
}

SUPER_BATCH(q4_k, q4k_tile, 144, Q4K_PREP)

/* SUPER_BATCH for Q6_K: each row's sum goes on from chunk to chunk (one chain of FMAs, as blocks_q6k16.h's). The
 * chunk holds Q6K_CHUNK prepared bytes over all nj rows, not CHUNK_BYTES a row: with 2 rows, chunks of 8
 * super-blocks read a matrix from memory at 0.26-0.42x the one-row kernel's rate (each weight row 1680 bytes at
 * a time, the four rows of a block in turn), whole 8192-column rows at 0.68x. */
enum { Q6K_CHUNK = 16384 };
static void batch_q6_k(const uint8_t *w, int64_t stride, int nrows, Batch x, int64_t b0, int nj, int64_t nb, float *out) {
    enum { MAX_STEP = Q6K_CHUNK / Q6K_PREP };
    const int64_t step = Q6K_CHUNK / (nj * Q6K_PREP); /* super-blocks per chunk */
    const uint8_t *xp = x.prep + b0 * x.prep_stride;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}; /* nrows <= 4 */
    float dx[MAX_STEP * 16] = {0.f}; /* the chunk's d_x, row j's in lane ISUM_LANE(j) */
    for (int64_t c0 = 0; c0 < nb; c0 += step) {
        const int64_t n = nb - c0 < step ? nb - c0 : step;
        for (int64_t b = 0; b < n; b++)
            for (int j = 0; j < nj; j++) memcpy(dx + 16 * b + ISUM_LANE(j), xp + j * x.prep_stride + (c0 + b) * Q6K_PREP + 288, 4);
        for (int r = 0; r < nrows; r++) {
            const uint8_t *row = w + r * stride + c0 * 210, *xc = xp + c0 * Q6K_PREP;
            switch (nj) { /* a constant count in each copy: the sums stay in registers */
#define Q6K_CASE(N) \
    case N: q6k_tile(N, row, n, xc, x.prep_stride, dx, acc + r); break;
                Q6K_CASE(1) Q6K_CASE(2) Q6K_CASE(3) Q6K_CASE(4) Q6K_CASE(5) Q6K_CASE(6) Q6K_CASE(7) Q6K_CASE(8)
#undef Q6K_CASE
            }
        }
    }
    for (int r = 0; r < nrows; r++) {
        float all[16];
        _mm512_storeu_ps(all, acc[r]);
        for (int j = 0; j < nj; j++) out[r * BATCH_J + j] = all[ISUM_LANE(j)];
    }
}

#elif defined(GEN_BLOCKS_256)

/* ---- AVX2: Q6_K (its prompts and batches otherwise ran the one-row dot once per activation row) ------------- */

/* A prepared row per super-block: the 256 int8 activations as quantized, their 16 sums of 16 (int16), d_x. */
enum { Q6K_PREP = 256 + 32 + 4 };

static int64_t batch_prep_bytes_q6_k(int64_t nb) { return nb * Q6K_PREP; }

static void batch_prep_q6_k(Act a, int64_t nb, uint8_t *restrict out) {
    for (int64_t b = 0; b < nb; b++, out += Q6K_PREP) {
        memcpy(out, a.q + b * 256, 256);
        memcpy(out + 256, a.s + b * 16, 32);
        memcpy(out + 288, a.d + b, sizeof(float));
    }
}

/* One Q6_K row against nj prepared rows: dot_q6_k's AVX2 arithmetic (the same 8 int32 lanes per super-block, then
 * one FMA with d d_x), the codes and their scale vectors unpacked once per super-block for every row. */
GEN_ALWAYS_INLINE void q6k_tile(const int nj, const uint8_t *restrict w, int64_t nb, const uint8_t *restrict x,
                                int64_t xstride, float *out) {
    const __m256i off = _mm256_set1_epi8(32);
    __m256i pick[4];
    for (int k = 0; k < 4; k++) pick[k] = q6k_pick256(k);
    __m256 acc[BATCH_J];
#pragma GCC unroll 8
    for (int j = 0; j < nj; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 210;
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 192)));
        __m256i v[8], sc[8]; /* quarter k of half h: its 32 codes (unsigned, 0..63: maddubs' operand), two scales */
        for (int h = 0; h < 2; h++) {
            const __m256i sch = (h ? _mm256_permute2x128_si256(sc16, sc16, 0x11) : _mm256_permute2x128_si256(sc16, sc16, 0x00));
            q6k_codes(p, h, v + 4 * h);
            for (int k = 0; k < 4; k++) {
                v[4 * h + k] = _mm256_add_epi8(v[4 * h + k], off);
                sc[4 * h + k] = _mm256_shuffle_epi8(sch, pick[k]);
            }
        }
        const float dw = f16(p + 208);
#pragma GCC unroll 8
        for (int j = 0; j < nj; j++) {
            const uint8_t *xj = x + j * xstride + b * Q6K_PREP;
            /* -32 sum_g sc_g s_g, in 8 partial lanes */
            __m256i s = _mm256_sub_epi32(_mm256_setzero_si256(),
                                         _mm256_slli_epi32(_mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)(xj + 256))), 5));
            for (int q = 0; q < 8; q++) {
                const __m256i pairs = _mm256_maddubs_epi16(v[q], _mm256_loadu_si256((const __m256i *)(xj + 32 * q)));
                s = _mm256_add_epi32(s, _mm256_madd_epi16(pairs, sc[q]));
            }
            float dx;
            memcpy(&dx, xj + 288, sizeof dx);
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dx * dw), acc[j]);
        }
    }
    for (int j = 0; j < nj; j++) out[j] = hsum256(acc[j]);
}

SUPER_BATCH(q6_k, q6k_tile, 210, Q6K_PREP)

#endif /* GEN_BLOCKS_512, GEN_BLOCKS_256 */
#undef SUPER_BATCH
#undef SUPER_CASE

#endif
