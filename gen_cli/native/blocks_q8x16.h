/* Q8_0 matrices with 16 rows interleaved, as blocks_x16.h does for Q4_0 / Q4_1: one vector lane per weight row.
 * The stored layout's product (blocks_batch.h) spends a conversion, a multiply and an FMA on every 64 weights of
 * every activation row, and each row's sums end in horizontal adds; here 8 dpbusd give 16 rows' integer block sums
 * and one conversion and one FMA scale all 16, so several activation rows (a batch, a verify, a prompt) cost little
 * more than the weights' bytes.
 *
 * Layout (x16_repack with 1 fp16 and 8 words per block): for each group of 16 rows and block b, 16 fp16 d (row l's
 * at bytes 2l, 2l + 1), then 8 chunks of 64 bytes, chunk i holding codes 4i .. 4i + 3 of each row l at bytes
 * 4l .. 4l + 3. 16 rows take the bytes they take stored (544 a block).
 *
 * The product (AVX-512 VNNI), per block and activation row: dpbusd multiplies unsigned bytes by signed ones, so
 * the codes go in as w + 128 (their sign bit flipped, once per block for all the activation rows) against the
 * activation's 4 int8 values broadcast to every lane, the sum starting from -128 sum(x) (X16Act.o): each row's
 * exact integer block sum in its lane. Then one conversion, d times the activation's scale, one FMA. The portable
 * loop takes the same fp32 steps lane by lane (fmaf) on the same integer sums: the same bits, and a row gets the
 * same bits alone and in any batch.
 *
 * AVX2 (FMA, F16C; GEN_X16_256): the 16 lanes are two 256-bit halves, rows 0-7 and 8-15. maddubs would overflow
 * int16 on w + 128, so it takes dot_q8_0's sign trick instead: |w| (unsigned) against the activation carrying w's
 * sign, pairs of at most 2 x 127 x 127 = 32258 (activations are within +-127), widened to int32 by one madd with
 * ones: each row's exact integer block sum again, so the same bits. Float activations and prompt tiles read rows
 * back stored (x16_row) and run the stored layout's code.
 */
#ifndef GEN_BLOCKS_Q8X16_H
#define GEN_BLOCKS_Q8X16_H

#include <stdint.h>
#include <string.h>

#include "blocks_common.h"
#include "blocks_x16.h"
#include "features.h"

enum { Q8X16_WORDS = 8, Q8X16_BYTES = X16_ROWS * 34 }; /* a group's block: 16 stored blocks' bytes */

/* An activation row's per-block terms (X16Act.o): -128 times the block's sum. */
static void q8x16_offsets(Act a, int64_t nb, int32_t *o) {
    for (int64_t b = 0; b < nb; b++) o[b] = -128 * (int32_t)a.s[b];
}

#ifdef GEN_X16_256
enum { Q8X16_J256 = 4 }; /* activation rows per pass on AVX2 */

/* The exact int32 sum of 8 rows' codes (one chunk half: 4 codes a lane) times 4 activation codes broadcast (a). */
static inline __m256i q8x16_chunk256(__m256i codes, __m256i a) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(codes, codes), _mm256_sign_epi8(a, codes)),
                             _mm256_set1_epi16(1));
}

/* A decode step's one row on AVX2: both halves of the group per block, sharing the activation's broadcasts. */
static void q8x16_one_row256(const uint8_t *restrict grp, int64_t nb, X16Act x, float *y, int accumulate) {
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = grp + b * Q8X16_BYTES;
        fetch_ahead(p, Q8X16_BYTES);
        __m256i a[Q8X16_WORDS];
        x16_broadcast8(x.q + b * 32, a);
        const __m256 dx = _mm256_set1_ps(x.d[b]);
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            __m256i s = _mm256_setzero_si256(), t = _mm256_setzero_si256(); /* two chains of 4 */
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                s = _mm256_add_epi32(s, q8x16_chunk256(_mm256_loadu_si256((const __m256i *)(p + 32 + 64 * i + 32 * h)), a[i]));
                t = _mm256_add_epi32(t, q8x16_chunk256(_mm256_loadu_si256((const __m256i *)(p + 288 + 64 * i + 32 * h)), a[4 + i]));
            }
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 * h)));
            acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s, t)), _mm256_mul_ps(d, dx), acc[h]);
        }
    }
    for (int h = 0; h < 2; h++)
        _mm256_storeu_ps(y + 8 * h, accumulate ? _mm256_add_ps(_mm256_loadu_ps(y + 8 * h), acc[h]) : acc[h]);
}

/* q8x16_group on AVX2 for nj <= Q8X16_J256 rows: each half of the group (8 rows) over all blocks in turn, each
 * chunk loaded once for the rows. */
GEN_ALWAYS_INLINE void q8x16_half_rows(const int nj, const uint8_t *restrict grp, int64_t nb, X16Act x, float *y,
                                       int64_t ldy, int accumulate) {
    for (int h = 0; h < 2; h++) {
        __m256 acc[Q8X16_J256];
#pragma GCC unroll 4
        for (int j = 0; j < nj; j++) acc[j] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *p = grp + b * Q8X16_BYTES;
            __m256i s[Q8X16_J256];
#pragma GCC unroll 4
            for (int j = 0; j < nj; j++) s[j] = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int i = 0; i < Q8X16_WORDS; i++) {
                const __m256i c = _mm256_loadu_si256((const __m256i *)(p + 32 + 64 * i + 32 * h));
#pragma GCC unroll 4
                for (int j = 0; j < nj; j++) {
                    int32_t q;
                    memcpy(&q, x.q + j * x.qs + b * 32 + 4 * i, 4);
                    s[j] = _mm256_add_epi32(s[j], q8x16_chunk256(c, _mm256_set1_epi32(q)));
                }
            }
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 * h)));
#pragma GCC unroll 4
            for (int j = 0; j < nj; j++)
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[j]), _mm256_mul_ps(d, _mm256_set1_ps(x.d[j * x.ds + b])), acc[j]);
        }
#pragma GCC unroll 4
        for (int j = 0; j < nj; j++) {
            float *yj = y + j * ldy + 8 * h;
            _mm256_storeu_ps(yj, accumulate ? _mm256_add_ps(_mm256_loadu_ps(yj), acc[j]) : acc[j]);
        }
    }
}
#endif

/* One group (nb blocks at grp) against activation rows 0 .. nj - 1 of x: y[j ldy + l] (+)= row l . x_j. */
GEN_ALWAYS_INLINE void q8x16_group(const int nj, const uint8_t *restrict grp, int64_t nb, X16Act x, float *y,
                                   int64_t ldy, int accumulate) {
#ifdef GEN_BLOCKS_512
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[X16_J];
#pragma GCC unroll 8
    for (int j = 0; j < nj; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = grp + b * Q8X16_BYTES;
        __m512i c[Q8X16_WORDS];
#pragma GCC unroll 8
        for (int i = 0; i < Q8X16_WORDS; i++) c[i] = _mm512_xor_si512(_mm512_loadu_si512(p + 32 + 64 * i), flip);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#pragma GCC unroll 8
        for (int j = 0; j < nj; j++) {
            const int8_t *q = x.q + j * x.qs + b * 32; /* the activation's 32 codes, 4 to each dpbusd */
            /* Two chains of 4 dpbusd: a decode step's one row waits on their latency (one chain of 8 ran batches
             * slower too). */
            __m512i s = _mm512_set1_epi32(x.o[j * x.os + b]), t = _mm512_setzero_si512();
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                s = dpbusd_x4(s, c[i], q + 4 * i);
                t = dpbusd_x4(t, c[4 + i], q + 16 + 4 * i);
            }
            s = _mm512_add_epi32(s, t);
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(x.d[j * x.ds + b])), acc[j]);
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < nj; j++) {
        float *yj = y + j * ldy;
        _mm512_storeu_ps(yj, accumulate ? _mm512_add_ps(_mm512_loadu_ps(yj), acc[j]) : acc[j]);
    }
#elif defined(GEN_X16_256)
    if (nj > Q8X16_J256) { /* more rows' sums and accumulators would not fit AVX2's 16 registers */
        q8x16_half_rows(Q8X16_J256, grp, nb, x, y, ldy, accumulate);
        X16Act rest = x;
        rest.q += Q8X16_J256 * x.qs, rest.d += Q8X16_J256 * x.ds;
        q8x16_half_rows(nj - Q8X16_J256, grp, nb, rest, y + Q8X16_J256 * ldy, ldy, accumulate);
    } else if (nj == 1) {
        q8x16_one_row256(grp, nb, x, y, accumulate);
    } else {
        q8x16_half_rows(nj, grp, nb, x, y, ldy, accumulate);
    }
#else
    float acc[X16_J][X16_ROWS] = {{0.f}};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = grp + b * Q8X16_BYTES;
        for (int l = 0; l < X16_ROWS; l++) {
            uint8_t stored[34]; /* row l's block as stored: d, then its 32 codes */
            x16_row(p, l, 1, Q8X16_WORDS, stored);
            const float d = f16(stored);
            for (int j = 0; j < nj; j++) {
                const int8_t *q = x.q + j * x.qs + b * 32;
                /* the vector path's sum, sum (w + 128) x - 128 sum x, exactly */
                acc[j][l] = fmaf((float)dot32_i8((const int8_t *)(stored + 2), q), d * x.d[j * x.ds + b], acc[j][l]);
            }
        }
    }
    for (int j = 0; j < nj; j++)
        for (int l = 0; l < X16_ROWS; l++) y[j * ldy + l] = accumulate ? y[j * ldy + l] + acc[j][l] : acc[j][l];
#endif
}

#endif
