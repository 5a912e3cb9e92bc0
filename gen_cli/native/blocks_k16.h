/* Q4_K and Q5_K matrices with 16 rows interleaved, as blocks_x16.h does for Q4_0 / Q4_1: one vector lane per weight
 * row, so the k-quants that most downloaded files use stop being bound by the stored layout's shuffles and
 * horizontal sums.
 *
 * Layout (x16_repack with 2 fp16 and 35 words per block): for each group of 16 rows and super-block b, 16 fp16 d,
 * 16 fp16 dmin, then 35 chunks of 64 bytes, chunk i holding bytes 4i .. 4i + 3 of each row l's 140 bytes after its
 * d and dmin at bytes 4l .. 4l + 3: chunks 0-2 the packed 6-bit scales and mins (blocks_k.h's q4k_scale_words
 * works on them lane by lane), chunks 3-34 the nibbles. Stored chunk c (32 bytes: sub-block 2c in the low
 * nibbles, 2c + 1 in the high ones) is chunks 3 + 8c .. 3 + 8c + 7. 16 rows take the bytes they take stored.
 * Q5_K (`five`; 43 words): the same, with its 32 bytes of fifth bits (qh) as chunks 3-10 between the scales and
 * the nibbles (chunks 11-42). Chunk 3 + k holds qh bytes 4k .. 4k + 3 of each row, and bit 2c + h of them is the
 * fifth bit of the codes that nibble chunk k of stored chunk c holds in its low (h = 0) or high (h = 1) nibbles.
 *
 * The product (AVX-512 VNNI), per super-block and activation row: per sub-block, 8 dpbusd give each row's integer
 * sum in its lane, times the row's 6-bit scale (an int32 multiply); the mins' term is 4 dpwssd of the mins (int16
 * pairs) against the activation's sub-block sums (int16 pairs, prepared once per matmul, X16Act.o); then one FMA
 * with d d_x and one with -dmin d_x. The integer sums are exact, so the portable loop, lane by lane with the same
 * fp32 steps (fmaf), gives the same bits, and a row gets the same bits alone and in any batch. AVX2 (GEN_X16_256):
 * each half of a group (rows 0-7, 8-15) in turn (a decode step's one row: both halves per super-block, sharing the
 * activation's broadcasts), maddubs of the codes (high nibbles shifted down, Q5_K's fifth bit or-ed in) against
 * the broadcast activation, the products of a sub-block added in int16 (Q4_K: up to all 8, exact as 8 x 2 x 15 x
 * 127 = 30480; Q5_K: 4 at a time, 4 x 2 x 31 x 127 = 31496), then one madd per int16 sum with the scale in both
 * 16-bit halves of each lane: the same int32 sums, so again the same bits. Q5_K on AVX-512 (k16_code512): the
 * nibbles with the fifth bit or-ed in, the high ones shifted down first, as dpbusd's unsigned operand.
 * Float activations and prompt tiles read each row's super-blocks back in the stored layout (x16_row) and use
 * its code: the stored layout's bits.
 */
#ifndef GEN_BLOCKS_K16_H
#define GEN_BLOCKS_K16_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "blocks_common.h"
#include "blocks_k.h"
#include "blocks_x16.h"
#include "features.h"

enum { K16_WORDS = 35, K16_BYTES = 16 * 144 }; /* Q4_K: words per stored super-block, a group's super-block's bytes */
enum { K16_WORDS5 = 43, K16_BYTES5 = 16 * 176 }; /* Q5_K's */
enum { K16_QH = 64 + 64 * 3 };                   /* where a Q5_K group super-block's fifth-bit chunks start */
#define K16_GROUP_BYTES(five) ((five) ? K16_BYTES5 : K16_BYTES)
#define K16_NIBBLES(five) ((five) ? K16_QH + 64 * 8 : K16_QH) /* where its nibble chunks start */

/* An activation row's per-super-block terms (X16Act.o, 4 words per super-block): its 8 sub-block sums s_j as
 * int16 pairs (s0, s2), (s1, s3), (s4, s6), (s5, s7), the order the kernel pairs the mins in. */
static void k16_offsets(Act a, int64_t nsb, int32_t *o) {
    static const int first[4] = {0, 1, 4, 5};
    for (int64_t b = 0; b < nsb; b++)
        for (int k = 0; k < 4; k++) {
            const int j = first[k];
            const int16_t *s = a.s + 16 * b;
            const uint16_t lo = (uint16_t)(s[2 * j] + s[2 * j + 1]), hi = (uint16_t)(s[2 * j + 4] + s[2 * j + 5]);
            o[4 * b + k] = (int32_t)((uint32_t)lo | (uint32_t)hi << 16);
        }
}

/* A prompt's passes over a group can load its code vectors ready, unpacked once per group into a buffer
 * (k16_unpack_group), where each pass unpacked them again: Q5_K's fifth bits took as many operations as the
 * products of 4 rows on AVX2, and a sixth of the time on AVX-512. In the buffer, per super-block, sub-block and
 * chunk, the 16 rows' 64 bytes; on AVX2, per super-block and half hh (rows 8 hh .. 8 hh + 7), the half's 32 bytes
 * (a pass reads one half over all super-blocks: 1.03x the 64-byte order). */
enum { K16_CODES = 8 * 8 * 64 }; /* a super-block's */
#ifdef GEN_BLOCKS_512
#define K16_CODE_AT(b, hh, sub, k) ((((int64_t)(b) * 8 + (sub)) * 8 + (k)) * 64)
#else
#define K16_CODE_AT(b, hh, sub, k) (((((int64_t)(b) * 2 + (hh)) * 8 + (sub)) * 8 + (k)) * 32)
#endif
enum { K16_JPRE = 8 }; /* activation rows per pass over unpacked codes */

#ifdef GEN_X16_256
enum { K16_J256 = 4 }; /* activation rows per pass on AVX2 unpacking its codes (K16_JPRE: 1.0-1.2x passes of 4) */

/* The scales (sc) and mins (mn) of 8 rows' super-block from their 3 packed words (q4k_scale_words, lane-wise):
 * bytes of sc[0] / sc[1] the scales 0-3 / 4-7, of mn[0] / mn[1] the mins. */
static inline void k16_scales256(const uint8_t *words, __m256i sc[2], __m256i mn[2]) {
    const __m256i six = _mm256_set1_epi8(0x3F), four = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x03);
    const __m256i w0 = _mm256_loadu_si256((const __m256i *)words);
    const __m256i w1 = _mm256_loadu_si256((const __m256i *)(words + 64));
    const __m256i w2 = _mm256_loadu_si256((const __m256i *)(words + 128));
    sc[0] = _mm256_and_si256(w0, six), mn[0] = _mm256_and_si256(w1, six);
    sc[1] = _mm256_or_si256(_mm256_and_si256(w2, four), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(w0, 6), two), 4));
    mn[1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(w2, 4), four),
                            _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(w1, 6), two), 4));
}

/* The int32 lanes of 8 rows' scale for sub-block 2c + h, in both 16-bit halves (for madd). */
static inline __m256i k16_scale256(const __m256i sc[2], int c, int h) {
    const __m256i s = _mm256_and_si256(_mm256_srli_epi32(sc[c >> 1], 16 * (c & 1) + 8 * h), _mm256_set1_epi32(0xFF));
    return _mm256_or_si256(s, _mm256_slli_epi32(s, 16));
}

/* The mins' term of 8 rows against one activation row's paired sub-block sums o[0..3] (k16_offsets). */
static inline __m256i k16_mins256(const __m256i mn[2], const int32_t *o) {
    const __m256i pair = _mm256_set1_epi32(0x00FF00FF);
    const __m256i m[4] = {_mm256_and_si256(mn[0], pair), _mm256_and_si256(_mm256_srli_epi32(mn[0], 8), pair),
                          _mm256_and_si256(mn[1], pair), _mm256_and_si256(_mm256_srli_epi32(mn[1], 8), pair)};
    __m256i ms = _mm256_setzero_si256();
    for (int k = 0; k < 4; k++) ms = _mm256_add_epi32(ms, _mm256_madd_epi16(m[k], _mm256_set1_epi32(o[k])));
    return ms;
}

/* 8 rows' codes of sub-block 2c + h (4 each) from one nibble chunk (low nibbles, h = 0, or high), Q5_K's fifth
 * bit (bit 2c + h of the matching qh chunk's bytes) or-ed in as 16. */
GEN_ALWAYS_INLINE __m256i k16_codes256(const uint8_t *nibbles, const uint8_t *qh, int c, int h, const int five) {
    const __m256i raw = _mm256_loadu_si256((const __m256i *)nibbles);
    const __m256i v = _mm256_and_si256(h ? _mm256_srli_epi16(raw, 4) : raw, _mm256_set1_epi8(0xF));
    if (!five) return v;
    return _mm256_or_si256(v, k5_bit4_256(_mm256_loadu_si256((const __m256i *)qh), 2 * c + h));
}

/* Code vector k (of 8) of sub-block 2c + h for half hh (rows 8 hh .. 8 hh + 7) of the group super-block at p. */
GEN_ALWAYS_INLINE __m256i k16_code(const uint8_t *p, int hh, int c, int h, int k, const int five) {
    const uint8_t *half = p + 32 * hh;
    return k16_codes256(half + K16_NIBBLES(five) + 512 * c + 64 * k, half + K16_QH + 64 * k, c, h, five);
}

/* isum + a sub-block's 8 maddubs products (int16 pairs) times its scale: all 8 added in int16 for Q4_K, 4 at a
 * time for Q5_K (whose 8 could pass 32767). */
GEN_ALWAYS_INLINE __m256i k16_scaled256(__m256i isum, const __m256i u[8], __m256i scale, const int five) {
    const __m256i lo = _mm256_add_epi16(_mm256_add_epi16(u[0], u[1]), _mm256_add_epi16(u[2], u[3]));
    const __m256i hi = _mm256_add_epi16(_mm256_add_epi16(u[4], u[5]), _mm256_add_epi16(u[6], u[7]));
    if (five)
        return _mm256_add_epi32(isum, _mm256_add_epi32(_mm256_madd_epi16(lo, scale), _mm256_madd_epi16(hi, scale)));
    return _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_add_epi16(lo, hi), scale));
}

/* The fp32 steps closing a super-block of 8 rows (p: the group's super-block, hh: which 8) for one activation row:
 * acc + isum d d_x - mins dmin d_x. */
static inline __m256 k16_close256(__m256 acc, const uint8_t *p, int hh, __m256i isum, const __m256i mn[2], float dx,
                                  const int32_t *o) {
    const __m128i *dh = (const __m128i *)(p + 16 * hh);
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(dh)), dmin = _mm256_cvtph_ps(_mm_loadu_si128(dh + 2));
    const __m256 vx = _mm256_set1_ps(dx);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, vx), acc);
    return _mm256_fnmadd_ps(_mm256_cvtepi32_ps(k16_mins256(mn, o)), _mm256_mul_ps(dmin, vx), acc);
}

/* A Q4_K decode step's one row on AVX2: both halves of the group per super-block, sharing the activation's
 * broadcasts, a sub-block's 8 products added as a tree. The same int32 sums and fp32 steps as k16_half_rows. */
static void k16_one_row256(const uint8_t *restrict grp, int64_t nsb, X16Act x, float *y, int accumulate) {
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *p = grp + b * K16_BYTES;
        fetch_ahead(p, K16_BYTES);
        __m256i sc[2][2], mn[2][2], isum[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int hh = 0; hh < 2; hh++) k16_scales256(p + 64 + 32 * hh, sc[hh], mn[hh]);
        for (int c = 0; c < 4; c++)
            for (int h = 0; h < 2; h++) {
                __m256i a[8];
                x16_broadcast8(x.q + 256 * b + 64 * c + 32 * h, a);
#pragma GCC unroll 2
                for (int hh = 0; hh < 2; hh++) {
                    const uint8_t *chunks = p + K16_NIBBLES(0) + 512 * c + 32 * hh;
                    __m256i u[8];
#pragma GCC unroll 8
                    for (int k = 0; k < 8; k++)
                        u[k] = _mm256_maddubs_epi16(k16_codes256(chunks + 64 * k, NULL, c, h, 0), a[k]);
                    isum[hh] = k16_scaled256(isum[hh], u, k16_scale256(sc[hh], c, h), 0);
                }
            }
        for (int hh = 0; hh < 2; hh++) acc[hh] = k16_close256(acc[hh], p, hh, isum[hh], mn[hh], x.d[b], x.o + 4 * b);
    }
    for (int hh = 0; hh < 2; hh++)
        _mm256_storeu_ps(y + 8 * hh, accumulate ? _mm256_add_ps(_mm256_loadu_ps(y + 8 * hh), acc[hh]) : acc[hh]);
}

/* A Q5_K decode step's one row on AVX2: each chunk's nibbles and fifth bits loaded once for both of its sub-blocks
 * (1.3x the order above, in cache: the fifth bits cost more ops than Q4_K's codes, which ran 0.9x this way). */
static void k16_one_row5_256(const uint8_t *restrict grp, int64_t nsb, X16Act x, float *y, int accumulate) {
    const __m256i m4 = _mm256_set1_epi8(0xF);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *p = grp + b * K16_BYTES5;
        fetch_ahead(p, K16_BYTES5);
        __m256i sc[2][2], mn[2][2], isum[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int hh = 0; hh < 2; hh++) k16_scales256(p + 64 + 32 * hh, sc[hh], mn[hh]);
        for (int c = 0; c < 4; c++) {
            const int32_t *q = (const int32_t *)(x.q + 256 * b + 64 * c); /* sub-block 2c, then 2c + 1 */
#pragma GCC unroll 2
            for (int hh = 0; hh < 2; hh++) {
                const uint8_t *chunks = p + K16_NIBBLES(1) + 512 * c + 32 * hh, *qh = p + K16_QH + 32 * hh;
                __m256i ulo[8], uhi[8];
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(chunks + 64 * k));
                    const __m256i bits = _mm256_loadu_si256((const __m256i *)(qh + 64 * k));
                    const __m256i lo = _mm256_or_si256(_mm256_and_si256(raw, m4), k5_bit4_256(bits, 2 * c));
                    const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m4),
                                                       k5_bit4_256(bits, 2 * c + 1));
                    int32_t a0, a1;
                    memcpy(&a0, q + k, 4), memcpy(&a1, q + 8 + k, 4);
                    ulo[k] = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(a0));
                    uhi[k] = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(a1));
                }
                isum[hh] = k16_scaled256(isum[hh], ulo, k16_scale256(sc[hh], c, 0), 1);
                isum[hh] = k16_scaled256(isum[hh], uhi, k16_scale256(sc[hh], c, 1), 1);
            }
        }
        for (int hh = 0; hh < 2; hh++) acc[hh] = k16_close256(acc[hh], p, hh, isum[hh], mn[hh], x.d[b], x.o + 4 * b);
    }
    for (int hh = 0; hh < 2; hh++)
        _mm256_storeu_ps(y + 8 * hh, accumulate ? _mm256_add_ps(_mm256_loadu_ps(y + 8 * hh), acc[hh]) : acc[hh]);
}

/* k16_group on AVX2 for nj <= K16_J256 rows (K16_JPRE with `codes`): each half of the group (8 rows, bytes
 * 32 hh .. 32 hh + 31 of every chunk) over all super-blocks in turn. The code vectors are unpacked here, or read
 * ready from `codes` (k16_unpack_group's) when not NULL: the same vectors, so the same sums. */
GEN_ALWAYS_INLINE void k16_half_rows(const int nj, const int five, const uint8_t *restrict grp, int64_t nsb, X16Act x,
                                     float *y, int64_t ldy, int accumulate, const uint8_t *restrict codes) {
    for (int hh = 0; hh < 2; hh++) {
        __m256 acc[K16_JPRE];
#pragma GCC unroll 8
        for (int j = 0; j < nj; j++) acc[j] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nsb; b++) {
            const uint8_t *p = grp + b * K16_GROUP_BYTES(five), *half = p + 64 + 32 * hh; /* its bytes of chunk 0 */
            __m256i sc[2], mn[2];
            k16_scales256(half, sc, mn);
            __m256i isum[K16_JPRE];
#pragma GCC unroll 8
            for (int j = 0; j < nj; j++) isum[j] = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
#pragma GCC unroll 2
                for (int h = 0; h < 2; h++) {
                    const __m256i scale = k16_scale256(sc, c, h);
                    /* 4 code vectors live, not 8: no spills, 1.1-1.3x the products at 64-512 rows */
                    for (int kk = 0; kk < 8; kk += 4) {
                        __m256i v[4];
#pragma GCC unroll 4
                        for (int k = 0; k < 4; k++)
                            v[k] = codes ? _mm256_load_si256((const __m256i *)(codes + K16_CODE_AT(b, hh, 2 * c + h, kk + k)))
                                         : k16_code(p, hh, c, h, kk + k, five);
#pragma GCC unroll 8
                        for (int j = 0; j < nj; j++) {
                            const int32_t *q = (const int32_t *)(x.q + j * x.qs + 256 * b + 64 * c + 32 * h) + kk;
                            int32_t a[4];
                            memcpy(a, q, 16);
                            const __m256i u = _mm256_add_epi16(
                                _mm256_add_epi16(_mm256_maddubs_epi16(v[0], _mm256_set1_epi32(a[0])),
                                                 _mm256_maddubs_epi16(v[1], _mm256_set1_epi32(a[1]))),
                                _mm256_add_epi16(_mm256_maddubs_epi16(v[2], _mm256_set1_epi32(a[2])),
                                                 _mm256_maddubs_epi16(v[3], _mm256_set1_epi32(a[3]))));
                            isum[j] = _mm256_add_epi32(isum[j], _mm256_madd_epi16(u, scale));
                        }
                    }
                }
            }
#pragma GCC unroll 4
            for (int j = 0; j < nj; j++)
                acc[j] = k16_close256(acc[j], p, hh, isum[j], mn, x.d[j * x.ds + b], x.o + j * x.os + 4 * b);
        }
#pragma GCC unroll 4
        for (int j = 0; j < nj; j++) {
            float *yj = y + j * ldy + 8 * hh;
            _mm256_storeu_ps(yj, accumulate ? _mm256_add_ps(_mm256_loadu_ps(yj), acc[j]) : acc[j]);
        }
    }
}

/* A group's code vectors as k16_half_rows unpacks them, stored once for a prompt's passes (at K16_CODE_AT). */
static void k16_unpack_group(const int five, const uint8_t *restrict grp, int64_t nsb, uint8_t *restrict codes) {
    for (int64_t b = 0; b < nsb; b++)
        for (int hh = 0; hh < 2; hh++)
            for (int c = 0; c < 4; c++)
                for (int h = 0; h < 2; h++)
                    for (int k = 0; k < 8; k++)
                        _mm256_store_si256((__m256i *)(codes + K16_CODE_AT(b, hh, 2 * c + h, k)),
                                           k16_code(grp + b * K16_GROUP_BYTES(five), hh, c, h, k, five));
}
#endif

/* k16_group lane by lane: the vector paths' integer sums and fp32 steps (fmaf), in the same order. */
static inline void k16_group_portable(const int nj, const int five, const uint8_t *restrict grp, int64_t nsb,
                                      X16Act x, float *y, int64_t ldy, int accumulate) {
    float acc[X16_J][X16_ROWS] = {{0.f}};
    const int words = five ? K16_WORDS5 : K16_WORDS, nibbles = five ? 48 : 16; /* where a stored block's codes start */
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *p = grp + b * K16_GROUP_BYTES(five);
        for (int l = 0; l < X16_ROWS; l++) {
            uint8_t sb[176], sc[8], mn[8];
            x16_row(p, l, 2, words, sb);
            q4k_scales(sb + 4, sc, mn);
            const float d = f16(sb), dmin = f16(sb + 2);
            const uint8_t *qh = five ? sb + 16 : NULL; /* Q5_K's fifth bits */
            for (int j = 0; j < nj; j++) {
                const int32_t *o = x.o + j * x.os + 4 * b;
                const int32_t isum = k45_isum(sc, sb + nibbles, qh, x.q + j * x.qs + 256 * b);
                int32_t ms = 0;
                static const int first[4] = {0, 1, 4, 5};
                for (int k = 0; k < 4; k++) {
                    const uint32_t w = (uint32_t)o[k];
                    ms += (int32_t)mn[first[k]] * (int16_t)(w & 0xFFFF) + (int32_t)mn[first[k] + 2] * (int16_t)(w >> 16);
                }
                const float dx = x.d[j * x.ds + b];
                acc[j][l] = fmaf((float)isum, d * dx, acc[j][l]);
                acc[j][l] = fmaf(-(float)ms, dmin * dx, acc[j][l]);
            }
        }
    }
    for (int j = 0; j < nj; j++)
        for (int l = 0; l < X16_ROWS; l++) y[j * ldy + l] = accumulate ? y[j * ldy + l] + acc[j][l] : acc[j][l];
}

#ifdef GEN_BLOCKS_512
/* Code vector k (16 rows' 4 codes each) of sub-block 2c + h of the group super-block at p, as dpbusd's unsigned
 * operand: Q4_K's high nibbles kept in place (x 16: the exact sum is shifted back once); Q5_K's nibbles (the high
 * ones shifted down) with bit 2c + h of the matching qh chunk's bytes or-ed in as 16 (one ternary-logic op: nib &
 * 15, or the shifted qh & 16; 16-bit shifts, the bits crossing from the other byte masked off). */
GEN_ALWAYS_INLINE __m512i k16_code512(const uint8_t *p, int c, int h, int k, const int five) {
    const __m512i m4 = _mm512_set1_epi8(0xF), raw = _mm512_loadu_si512(p + K16_NIBBLES(five) + 512 * c + 64 * k);
    if (!five) return h ? _mm512_andnot_si512(m4, raw) : _mm512_and_si512(raw, m4);
    const int j = 2 * c + h;
    const __m512i qh = _mm512_loadu_si512(p + K16_QH + 64 * k);
    const __m512i t = j <= 4 ? _mm512_slli_epi16(qh, 4 - j) : _mm512_srli_epi16(qh, j - 4);
    const __m512i nib = _mm512_and_si512(h ? _mm512_srli_epi16(raw, 4) : raw, m4);
    return _mm512_ternarylogic_epi32(nib, t, _mm512_set1_epi8(0x10), 0xF8);
}

/* A group's code vectors as k16_group makes them, stored once for a prompt's passes (at K16_CODE_AT). */
static void k16_unpack_group(const int five, const uint8_t *restrict grp, int64_t nsb, uint8_t *restrict codes) {
    for (int64_t b = 0; b < nsb; b++)
        for (int c = 0; c < 4; c++)
            for (int h = 0; h < 2; h++)
                for (int k = 0; k < 8; k++)
                    _mm512_store_si512(codes + K16_CODE_AT(b, 0, 2 * c + h, k),
                                       k16_code512(grp + b * K16_GROUP_BYTES(five), c, h, k, five));
}
#endif

/* One group (nsb super-blocks at grp; Q5_K when five, else Q4_K) against activation rows 0 .. nj - 1 of x:
 * y[j ldy + l] (+)= row l . x_j. `codes`: the group's code vectors unpacked (k16_unpack_group; nj <= K16_JPRE), or
 * NULL to unpack them here. */
GEN_ALWAYS_INLINE void k16_group(const int nj, const int five, const uint8_t *restrict grp, int64_t nsb, X16Act x,
                                 float *y, int64_t ldy, int accumulate, const uint8_t *restrict codes) {
#ifdef GEN_BLOCKS_512
    const __m512i six = _mm512_set1_epi8(0x3F), four = _mm512_set1_epi8(0x0F);
    const __m512i two = _mm512_set1_epi8(0x03), byte = _mm512_set1_epi32(0xFF), pair = _mm512_set1_epi32(0x00FF00FF);
    __m512 acc[X16_J];
#pragma GCC unroll 8
    for (int j = 0; j < nj; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *p = grp + b * K16_GROUP_BYTES(five);
        /* q4k_scale_words, 16 rows at once: bytes of sc03 / sc47 the scales, of mn03 / mn47 the mins */
        const __m512i w0 = _mm512_loadu_si512(p + 64), w1 = _mm512_loadu_si512(p + 128), w2 = _mm512_loadu_si512(p + 192);
        const __m512i sc03 = _mm512_and_si512(w0, six), mn03 = _mm512_and_si512(w1, six);
        const __m512i sc47 = _mm512_or_si512(_mm512_and_si512(w2, four),
                                             _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(w0, 6), two), 4));
        const __m512i mn47 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(w2, 4), four),
                                             _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(w1, 6), two), 4));
        const __m512i mins[4] = {_mm512_and_si512(mn03, pair), _mm512_and_si512(_mm512_srli_epi32(mn03, 8), pair),
                                 _mm512_and_si512(mn47, pair), _mm512_and_si512(_mm512_srli_epi32(mn47, 8), pair)};
        __m512i isum[X16_J];
#pragma GCC unroll 8
        for (int j = 0; j < nj; j++) isum[j] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) { /* sub-blocks 2c (low nibbles) and 2c + 1 (high), each 8 chunks */
            const __m512i sw = c < 2 ? sc03 : sc47;
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                const __m512i sc = _mm512_and_si512(_mm512_srli_epi32(sw, 16 * (c & 1) + 8 * h), byte);
                __m512i v[8];
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++)
                    v[k] = codes ? _mm512_load_si512(codes + K16_CODE_AT(b, 0, 2 * c + h, k))
                                 : k16_code512(p, c, h, k, five);
#pragma GCC unroll 8
                for (int j = 0; j < nj; j++) {
                    const int8_t *q = x.q + j * x.qs + 256 * b + 64 * c + 32 * h;
                    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512(); /* two chains of 4 */
#pragma GCC unroll 4
                    for (int k = 0; k < 4; k++) {
                        s0 = dpbusd_x4(s0, v[k], q + 4 * k);
                        s1 = dpbusd_x4(s1, v[4 + k], q + 16 + 4 * k);
                    }
                    __m512i s = _mm512_add_epi32(s0, s1);
                    if (h && !five) s = _mm512_srai_epi32(s, 4);
                    isum[j] = _mm512_add_epi32(isum[j], _mm512_mullo_epi32(s, sc));
                }
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32)));
#pragma GCC unroll 8
        for (int j = 0; j < nj; j++) {
            const int32_t *o = x.o + j * x.os + 4 * b;
            __m512i ms = _mm512_setzero_si512();
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) ms = _mm512_dpwssd_epi32(ms, mins[k], _mm512_set1_epi32(o[k]));
            const __m512 dx = _mm512_set1_ps(x.d[j * x.ds + b]);
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[j]), _mm512_mul_ps(d, dx), acc[j]);
            acc[j] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(ms), _mm512_mul_ps(dmin, dx), acc[j]);
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < nj; j++) {
        float *yj = y + j * ldy;
        _mm512_storeu_ps(yj, accumulate ? _mm512_add_ps(_mm512_loadu_ps(yj), acc[j]) : acc[j]);
    }
#elif defined(GEN_X16_256)
    if (codes) {
        k16_half_rows(nj, five, grp, nsb, x, y, ldy, accumulate, codes);
        return;
    }
    if (nj > K16_J256) { /* the codes, sums and accumulators of more rows would not fit AVX2's 16 registers */
        k16_half_rows(K16_J256, five, grp, nsb, x, y, ldy, accumulate, NULL);
        X16Act rest = x;
        rest.q += K16_J256 * x.qs, rest.d += K16_J256 * x.ds, rest.o += K16_J256 * x.os;
        k16_half_rows(nj - K16_J256, five, grp, nsb, rest, y + K16_J256 * ldy, ldy, accumulate, NULL);
        return;
    }
    if (nj == 1 && five)
        k16_one_row5_256(grp, nsb, x, y, accumulate);
    else if (nj == 1)
        k16_one_row256(grp, nsb, x, y, accumulate);
    else
        k16_half_rows(nj, five, grp, nsb, x, y, ldy, accumulate, NULL);
#else
    (void)codes;
    k16_group_portable(nj, five, grp, nsb, x, y, ldy, accumulate);
#endif
}

#if defined(GEN_BLOCKS_512) || defined(GEN_X16_256)
/* Activation rows [0, batch) against one group with its codes unpacked once (k16_unpack_group into `codes`),
 * K16_JPRE rows a pass. */
GEN_ALWAYS_INLINE void k16_group_unpacked(const int five, const uint8_t *restrict grp, int64_t nsb, X16Act x,
                                          int64_t batch, float *y, int64_t ldy, int accumulate, uint8_t *restrict codes) {
    if (!codes) __builtin_unreachable(); /* so k16_group drops its unpacking */
    k16_unpack_group(five, grp, nsb, codes);
#define PASS(N) k16_group(N, five, grp, nsb, xj, o, ldy, accumulate, codes)
    X16_PASSES(x, batch, K16_JPRE, y, ldy, PASS)
#undef PASS
}
#endif

#endif
