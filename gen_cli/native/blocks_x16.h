/* Q4_0 and Q4_1 matrices with 16 rows interleaved ("repacked" at load, as ggml-cpu repacks Q4_0 into 8-row
 * blocks): one vector lane per weight row, so a 4-bit decode step stops being bound by the byte permutes and
 * horizontal sums of the stored layout (blocks_32.h) and approaches the memory's speed.
 *
 * Layout: the rows go in groups of 16 (a matrix in this layout has a multiple of 16 rows); a group holds its
 * blocks in order, and block b of a group is, for Q4_0 (288 bytes = 16 stored blocks of 18):
 *   16 fp16 d (row l's at bytes 2l, 2l + 1), then 4 chunks of 64 bytes: chunk i holds, for each row l, bytes
 *   4i .. 4i + 3 of that row's 16 nibble bytes at bytes 4l .. 4l + 3 (the 32-bit lane l);
 * Q4_1 (320 bytes = 16 x 20): 16 fp16 d, then 16 fp16 m, then the 4 chunks. So low nibbles of chunk i are
 * elements 4i .. 4i + 3 of each row's block, high nibbles elements 16 + 4i .. 16 + 4i + 3, and 16 rows take the
 * same bytes as in the stored layout: rows [16g, 16g + 16) of a matrix lie where they would lie unpacked.
 *
 * The product (AVX-512 VNNI): per block and activation row, 8 dpbusd of the 8 unpacked code vectors against the
 * activation's 4 int8 values broadcast to every lane give each row's integer block sum in its own lane (Q4_0's
 * offset -8 sum(x) starts the sum, exact in int32); one conversion, the 16 d times the activation scale, one FMA
 * (Q4_1: the 16 m times d_x s_x, one more). 16 lanes are 16 outputs: no horizontal sums. The codes of a block
 * are unpacked once for up to X16_J activation rows, and a row's fp32 order (lane by lane, block by block) does
 * not depend on how many rows share the call: a row gets the same bits alone and in any batch. The portable
 * loop computes each lane with the same operations in the same order (fmaf): the same bits again.
 *
 * AVX2 (FMA, F16C; GEN_X16_256): the 16 lanes are two 256-bit halves, rows 0-7 and 8-15; maddubs and one madd
 * with ones take dpbusd's place (the integer block sums are the same), then the same fp32 steps lane by lane.
 */
#ifndef GEN_BLOCKS_X16_H
#define GEN_BLOCKS_X16_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "blocks_common.h"
#include "features.h"

enum { X16_ROWS = 16, X16_J = 8 }; /* rows per group; activation rows per pass over a group */

/* AVX2 (with FMA and F16C, no AVX-512 VNNI): a group is two 256-bit halves, rows 0-7 and 8-15, one lane a row. */
#if !defined(GEN_BLOCKS_512) && defined(GEN_BLOCKS_256) && defined(GEN_F16C)
#define GEN_X16_256 1
#endif
#if defined(GEN_BLOCKS_512) || defined(GEN_X16_256)
#define GEN_X16_VECTOR 1 /* a vector product for the layout: gen_block_interleaved says yes */
#endif

#define X16_HEAD(min) ((min) ? 64 : 32)       /* the fp16 d (and m) of a group's block */
#define X16_BYTES(min) (X16_HEAD(min) + 256) /* a group's block: 16 stored blocks' bytes */

/* Stored rows [16 g0, 16 g1) of a block matrix (rows of nb blocks, rb bytes apart; a block: `halves` fp16 fields,
 * then `words` 32-bit words) -> groups g0 .. g1 - 1 of the interleaved layout, at dst (the whole matrix's start):
 * per group and block, each fp16 field of the 16 rows in turn (row l's at 2l), then each word (row l's at 4l).
 * Q4_0: 1 and 4, Q4_1: 2 and 4, Q4_K: 2 and 35, Q5_K: 2 and 43 (blocks_k16.h), Q8_0: 1 and 8 (blocks_q8x16.h).
 * src and dst must not overlap. */
static inline void x16_repack(const uint8_t *restrict src, int64_t rb, int64_t nb, int64_t g0, int64_t g1,
                              uint8_t *restrict dst, const int halves, const int words) {
    const int64_t bs = 2 * halves + 4 * words, head = 32 * halves, gb = X16_ROWS * bs;
    int64_t g = g0;
#ifdef GEN_AVX512_BW
    /* One gather per chunk: lane l reads row l's word (16 rows, rb bytes apart). Six small copies per row and
     * block instead ran at about 1 GB/s, a third of a 135M model's load time. */
    if (rb * (X16_ROWS - 1) <= INT32_MAX) {
        const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                _mm512_set1_epi32((int)rb));
        for (; g < g1; g++)
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *p = src + g * X16_ROWS * rb + b * bs;
                uint8_t *o = dst + (g * nb + b) * gb;
                const __m512i dm = _mm512_i32gather_epi32(rows, p, 1); /* d, then m / dmin or 2 nibble bytes */
                _mm256_storeu_si256((__m256i *)o, _mm512_cvtepi32_epi16(dm));
                if (halves == 2) _mm256_storeu_si256((__m256i *)(o + 32), _mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16)));
                for (int i = 0; i < words; i++)
                    _mm512_storeu_si512(o + head + 64 * i, _mm512_i32gather_epi32(rows, p + 2 * halves + 4 * i, 1));
            }
    }
#endif
    for (; g < g1; g++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *o = dst + (g * nb + b) * gb;
            for (int l = 0; l < X16_ROWS; l++) {
                const uint8_t *p = src + (g * X16_ROWS + l) * rb + b * bs;
                for (int f = 0; f < halves; f++) memcpy(o + 32 * f + 2 * l, p + 2 * f, 2);
                for (int i = 0; i < words; i++) memcpy(o + head + 64 * i + 4 * l, p + 2 * halves + 4 * i, 4);
            }
        }
}

/* Row l's block as stored (`halves` fp16 fields, then `words` 32-bit words), from its group's block p: x16_repack
 * undone for one row. */
static inline void x16_row(const uint8_t *restrict p, int l, const int halves, const int words, uint8_t *restrict out) {
    for (int f = 0; f < halves; f++) memcpy(out + 2 * f, p + 32 * f + 2 * l, 2);
    for (int i = 0; i < words; i++) memcpy(out + 2 * halves + 4 * i, p + 32 * halves + 64 * i + 4 * l, 4);
}

/* Row l's 16 nibble bytes of one interleaved block (its bytes 4i .. 4i + 3 from chunk i). */
static inline void x16_row_nibbles(const uint8_t *chunks, int l, uint8_t qs[16]) {
    for (int i = 0; i < 4; i++) memcpy(qs + 4 * i, chunks + 64 * i + 4 * l, 4);
}

#ifdef GEN_AVX512_BW
/* One row's 16 nibble bytes (its elements in order: low nibbles 0..15, high 16..31) -> 32 values q d + m. */
static inline void x16_store_row(__m128i q, float d, float m, float *f, uint16_t *h) {
    const __m128i m4 = _mm_set1_epi8(0xF);
    const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
    const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, m4))), vd, vm);
    const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), m4))), vd, vm);
    if (f) {
        _mm512_storeu_ps(f, lo), _mm512_storeu_ps(f + 16, hi);
        return;
    }
#ifdef GEN_AVX512_BF16
    _mm512_storeu_si512(h, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
#else
    float t[32];
    _mm512_storeu_ps(t, lo), _mm512_storeu_ps(t + 16, hi);
    for (int e = 0; e < 32; e++) h[e] = to_bf16(t[e]);
#endif
}
#elif defined(GEN_X16_256)
/* fp32 -> bf16 of 8 values as to_bf16 does (round to nearest even; a NaN stays a NaN), in the low 16 bits of each
 * 32-bit lane. */
static inline __m256i x16_bf16_lanes(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))), 16);
    const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(r, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

/* One row's 16 nibble bytes (its elements in order: low nibbles 0..15, high 16..31) -> 32 values q d + m. */
static inline void x16_store_row(__m128i q, float d, float m, float *f, uint16_t *h) {
    const __m128i m4 = _mm_set1_epi8(0xF), lo = _mm_and_si128(q, m4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
    const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
    __m256 v[4];
    const __m128i part[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};
    for (int k = 0; k < 4; k++) v[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part[k])), vd, vm);
    if (f) {
        for (int k = 0; k < 4; k++) _mm256_storeu_ps(f + 8 * k, v[k]);
        return;
    }
    for (int k = 0; k < 4; k += 2) { /* packus interleaves 128-bit lanes: put them back in order */
        const __m256i p = _mm256_packus_epi32(x16_bf16_lanes(v[k]), x16_bf16_lanes(v[k + 1]));
        _mm256_storeu_si256((__m256i *)(h + 8 * k), _mm256_permute4x64_epi64(p, 0xD8));
    }
}
#endif

/* The 16 rows of group `grp` (nb blocks) -> fp32 f or (f NULL) bf16 h, rows `ld` elements apart, with the
 * stored layout's arithmetic (dequantize_q45: q d + m, Q4_0's offset folded into m = -8 d, one fused step).
 * AVX-512: X16_RUN blocks at a time are transposed to rows on the stack, then each row's run is written in one go
 * (written a block at a time, 16 rows 16 KB apart, fp32 tiles came out at half the speed). */
enum { X16_RUN = 8 };

static void x16_dequantize_group(const uint8_t *restrict grp, int64_t nb, float *f, uint16_t *h, int64_t ld,
                                 const int min) {
    const int64_t head = X16_HEAD(min), gb = X16_BYTES(min);
#ifdef GEN_AVX512_BW
    for (int64_t b0 = 0; b0 < nb; b0 += X16_RUN) {
        const int n = nb - b0 < X16_RUN ? (int)(nb - b0) : X16_RUN;
        __m128i rows[X16_RUN][X16_ROWS];
        float d[X16_RUN][X16_ROWS], m[X16_RUN][X16_ROWS];
        for (int k = 0; k < n; k++) {
            const uint8_t *p = grp + (b0 + k) * gb;
            _mm512_storeu_ps(d[k], _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)));
            if (min)
                _mm512_storeu_ps(m[k], _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32))));
            else
                _mm512_storeu_ps(m[k], _mm512_mul_ps(_mm512_loadu_ps(d[k]), _mm512_set1_ps(-8.f)));
            /* A 4 x 4 transpose of 32-bit words in each 128-bit lane: t[r]'s lane j is row 4j + r's 16 bytes. */
            const __m512i c0 = _mm512_loadu_si512(p + head), c1 = _mm512_loadu_si512(p + head + 64);
            const __m512i c2 = _mm512_loadu_si512(p + head + 128), c3 = _mm512_loadu_si512(p + head + 192);
            const __m512i a = _mm512_unpacklo_epi32(c0, c1), bb = _mm512_unpackhi_epi32(c0, c1);
            const __m512i c = _mm512_unpacklo_epi32(c2, c3), dd = _mm512_unpackhi_epi32(c2, c3);
            const __m512i t[4] = {_mm512_unpacklo_epi64(a, c), _mm512_unpackhi_epi64(a, c),
                                  _mm512_unpacklo_epi64(bb, dd), _mm512_unpackhi_epi64(bb, dd)};
            for (int r = 0; r < 4; r++) {
                rows[k][r] = _mm512_castsi512_si128(t[r]), rows[k][4 + r] = _mm512_extracti32x4_epi32(t[r], 1);
                rows[k][8 + r] = _mm512_extracti32x4_epi32(t[r], 2), rows[k][12 + r] = _mm512_extracti32x4_epi32(t[r], 3);
            }
        }
        for (int l = 0; l < X16_ROWS; l++)
            for (int k = 0; k < n; k++) {
                const int64_t at = l * ld + 32 * (b0 + k);
                x16_store_row(rows[k][l], d[k][l], m[k][l], f ? f + at : NULL, f ? NULL : h + at);
            }
    }
#elif defined(GEN_X16_256)
    for (int64_t b0 = 0; b0 < nb; b0 += X16_RUN) {
        const int n = nb - b0 < X16_RUN ? (int)(nb - b0) : X16_RUN;
        __m128i rows[X16_RUN][X16_ROWS];
        float d[X16_RUN][X16_ROWS], m[X16_RUN][X16_ROWS];
        for (int k = 0; k < n; k++) {
            const uint8_t *p = grp + (b0 + k) * gb;
            for (int half = 0; half < 2; half++) {
                const __m256 dh = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 * half)));
                _mm256_storeu_ps(d[k] + 8 * half, dh);
                _mm256_storeu_ps(m[k] + 8 * half, min ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 32 + 16 * half)))
                                                   : _mm256_mul_ps(dh, _mm256_set1_ps(-8.f)));
                /* As on AVX-512: t[r]'s 128-bit lane j is row 8 half + 4j + r's 16 bytes. */
                const uint8_t *c = p + head + 32 * half;
                const __m256i c0 = _mm256_loadu_si256((const __m256i *)c), c1 = _mm256_loadu_si256((const __m256i *)(c + 64));
                const __m256i c2 = _mm256_loadu_si256((const __m256i *)(c + 128)), c3 = _mm256_loadu_si256((const __m256i *)(c + 192));
                const __m256i a = _mm256_unpacklo_epi32(c0, c1), bb = _mm256_unpackhi_epi32(c0, c1);
                const __m256i cc = _mm256_unpacklo_epi32(c2, c3), dd = _mm256_unpackhi_epi32(c2, c3);
                const __m256i t[4] = {_mm256_unpacklo_epi64(a, cc), _mm256_unpackhi_epi64(a, cc),
                                      _mm256_unpacklo_epi64(bb, dd), _mm256_unpackhi_epi64(bb, dd)};
                for (int r = 0; r < 4; r++)
                    rows[k][8 * half + r] = _mm256_castsi256_si128(t[r]), rows[k][8 * half + 4 + r] = _mm256_extracti128_si256(t[r], 1);
            }
        }
        for (int l = 0; l < X16_ROWS; l++)
            for (int k = 0; k < n; k++) {
                const int64_t at = l * ld + 32 * (b0 + k);
                x16_store_row(rows[k][l], d[k][l], m[k][l], f ? f + at : NULL, f ? NULL : h + at);
            }
    }
#else
    for (int l = 0; l < X16_ROWS; l++)
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *p = grp + b * gb;
            const float d = f16(p + 2 * l), m = min ? f16(p + 32 + 2 * l) : -8.f * d;
            const int64_t at = l * ld + 32 * b;
            uint8_t qs[16];
            x16_row_nibbles(p + head, l, qs);
            for (int i = 0; i < 16; i++) { /* fmaf: the vector path's rounding, the same bits */
                const float lo = fmaf((float)(qs[i] & 0xF), d, m), hi = fmaf((float)(qs[i] >> 4), d, m);
                if (f)
                    f[at + i] = lo, f[at + i + 16] = hi;
                else
                    h[at + i] = to_bf16(lo), h[at + i + 16] = to_bf16(hi);
            }
        }
#endif
}

/* The activation rows of one product: row j's int8 blocks at q + j qs, scales d + j ds, and per block the
 * term its sum starts from (Q4_0: int32 -8 s) or the min's factor (Q4_1: fp32 d s) at o + j os. */
typedef struct {
    const int8_t *q;
    const float *d;
    const int32_t *o;
    int64_t qs, ds, os;
} X16Act;

#ifdef GEN_BLOCKS_512
/* acc + dpbusd(codes, the 4 activation bytes at x in every lane): the 16 lanes' products of a code vector. The
 * activation is the instruction's own broadcast operand ({1to16}), which GCC 12 never folds from
 * _mm512_set1_epi32 (a separate vpbroadcastd per dpbusd). One instruction fewer per dpbusd: 512-token prompts
 * 1.10x faster on a 1B Q5_K_M file, 1.09x on Q8_0, 1.07x on Q6_K (medians of paired runs, 2 threads, Zen 4), most
 * in the minutes when the machine was busy. The same integer sums, so the same bits. */
static inline __m512i dpbusd_x4(__m512i acc, __m512i codes, const int8_t *x) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(codes), "m"(*(const int32_t *)x));
    return acc;
}
#endif

/* Activation rows [0, batch) of x (an X16Act) against one group, `step` (<= 8) rows a pass: PASS(N) runs a pass with
 * xj its rows and o its first output row (y + b0 ldy), N a constant in each copy so that its sums stay in registers. */
#define X16_PASSES(x, batch, step, y, ldy, PASS)                                   \
    for (int64_t b0 = 0; b0 < (batch); b0 += (step)) {                            \
        X16Act xj = (x);                                                          \
        xj.q += b0 * (x).qs, xj.d += b0 * (x).ds, xj.o += b0 * (x).os;            \
        float *o = (y) + b0 * (ldy);                                              \
        switch ((batch) - b0 < (step) ? (batch) - b0 : (step)) {                  \
        case 1: PASS(1); break;                                                   \
        case 2: PASS(2); break;                                                   \
        case 3: PASS(3); break;                                                   \
        case 4: PASS(4); break;                                                   \
        case 5: PASS(5); break;                                                   \
        case 6: PASS(6); break;                                                   \
        case 7: PASS(7); break;                                                   \
        case 8: PASS(8); break;                                                   \
        }                                                                         \
    }

/* Row j's per-block terms (X16Act.o) from its quantized activation. */
static void x16_offsets(Act a, int64_t nb, int32_t *o, const int min) {
    for (int64_t b = 0; b < nb; b++) {
        if (min) {
            const float f = a.d[b] * (float)a.s[b];
            memcpy(o + b, &f, sizeof f);
        } else {
            o[b] = -8 * (int32_t)a.s[b];
        }
    }
}

#ifdef GEN_X16_256
/* 32 activation bytes as 8 vectors, vector i every lane's copy of bytes 4i .. 4i + 3 (AVX2 has no dpbusd
 * broadcast operand). */
GEN_ALWAYS_INLINE void x16_broadcast8(const int8_t *q, __m256i a[8]) {
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
        int32_t v;
        memcpy(&v, q + 4 * i, 4);
        a[i] = _mm256_set1_epi32(v);
    }
}
#endif

/* One group (nb blocks at grp) against activation rows 0 .. nj - 1 of x: y[j ldy + l] (+)= row l . x_j. */
GEN_ALWAYS_INLINE void x16_group(const int nj, const int min, const uint8_t *restrict grp, int64_t nb, X16Act x,
                                 float *y, int64_t ldy, int accumulate) {
    const int64_t head = X16_HEAD(min), gb = X16_BYTES(min);
#ifdef GEN_BLOCKS_512
    const __m512i m4 = _mm512_set1_epi8(0xF);
    __m512 acc[X16_J];
#pragma GCC unroll 8
    for (int j = 0; j < nj; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = grp + b * gb;
        /* Low nibbles as they are; high ones kept in place (x 16): their sum, exact in int32, is shifted back
         * once per row, instead of shifting every code vector. Two chains of 4 dpbusd, not one of 8. */
        __m512i lo[4], hi[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            const __m512i c = _mm512_loadu_si512(p + head + 64 * i);
            lo[i] = _mm512_and_si512(c, m4), hi[i] = _mm512_andnot_si512(m4, c);
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        const __m512 m = min ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32))) : d;
#pragma GCC unroll 8
        for (int j = 0; j < nj; j++) {
            const int8_t *q = x.q + j * x.qs + b * 32;
            const int32_t oj = x.o[j * x.os + b];
            __m512i s = min ? _mm512_setzero_si512() : _mm512_set1_epi32(oj), t = _mm512_setzero_si512();
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                s = dpbusd_x4(s, lo[i], q + 4 * i);
                t = dpbusd_x4(t, hi[i], q + 16 + 4 * i);
            }
            s = _mm512_add_epi32(s, _mm512_srai_epi32(t, 4));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(x.d[j * x.ds + b])), acc[j]);
            if (min) {
                float mf;
                memcpy(&mf, &oj, 4);
                acc[j] = _mm512_fmadd_ps(m, _mm512_set1_ps(mf), acc[j]);
            }
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < nj; j++) {
        float *yj = y + j * ldy;
        _mm512_storeu_ps(yj, accumulate ? _mm512_add_ps(_mm512_loadu_ps(yj), acc[j]) : acc[j]);
    }
#elif defined(GEN_X16_256)
    /* Each half (8 rows, bytes 32h .. 32h + 31 of every chunk) runs over all blocks in turn: its 8 unpacked code
     * vectors and up to 8 accumulators fit the 16 registers. maddubs (u8 codes x s8 activations, pairs added in
     * int16) and the 8 of a block summed in int16 stay exact: 16 products of at most 15 x 128 is 30720 < 32767;
     * one madd with ones widens the pairs to the row's int32 block sum in its lane. Then, lane by lane, the
     * AVX-512 path's fp32 steps in the same order: the same bits. */
    const __m256i m4 = _mm256_set1_epi8(0xF), ones = _mm256_set1_epi16(1);
    if (nj == 1) { /* a decode step: both halves per block, sharing the activation's 8 broadcasts */
        __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *p = grp + b * gb;
            fetch_ahead(p, gb);
            const int32_t oj = x.o[b];
            __m256i a[8];
            x16_broadcast8(x.q + b * 32, a);
            const __m256 dx = _mm256_set1_ps(x.d[b]);
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                __m256i u[8];
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    const __m256i c = _mm256_loadu_si256((const __m256i *)(p + head + 64 * i + 32 * h));
                    u[i] = _mm256_maddubs_epi16(_mm256_and_si256(c, m4), a[i]);
                    u[4 + i] = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(c, 4), m4), a[4 + i]);
                }
                const __m256i v = _mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(u[0], u[1]), _mm256_add_epi16(u[2], u[3])),
                                                   _mm256_add_epi16(_mm256_add_epi16(u[4], u[5]), _mm256_add_epi16(u[6], u[7])));
                __m256i s = _mm256_madd_epi16(v, ones);
                if (!min) s = _mm256_add_epi32(s, _mm256_set1_epi32(oj));
                const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 * h)));
                acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, dx), acc[h]);
                if (min) {
                    float mf;
                    memcpy(&mf, &oj, 4);
                    acc[h] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 32 + 16 * h))), _mm256_set1_ps(mf), acc[h]);
                }
            }
        }
        for (int h = 0; h < 2; h++)
            _mm256_storeu_ps(y + 8 * h, accumulate ? _mm256_add_ps(_mm256_loadu_ps(y + 8 * h), acc[h]) : acc[h]);
        return;
    }
    for (int h = 0; h < 2; h++) {
        __m256 acc[X16_J];
#pragma GCC unroll 8
        for (int j = 0; j < nj; j++) acc[j] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *p = grp + b * gb;
            __m256i lo[4], hi[4];
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                const __m256i c = _mm256_loadu_si256((const __m256i *)(p + head + 64 * i + 32 * h));
                lo[i] = _mm256_and_si256(c, m4), hi[i] = _mm256_and_si256(_mm256_srli_epi16(c, 4), m4);
            }
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 * h)));
            const __m256 m = min ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 32 + 16 * h))) : d;
#pragma GCC unroll 8
            for (int j = 0; j < nj; j++) {
                const int32_t *q = (const int32_t *)(x.q + j * x.qs + b * 32);
                const int32_t oj = x.o[j * x.os + b];
                __m256i u[8];
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    int32_t ql, qh;
                    memcpy(&ql, q + i, 4), memcpy(&qh, q + 4 + i, 4);
                    u[i] = _mm256_maddubs_epi16(lo[i], _mm256_set1_epi32(ql));
                    u[4 + i] = _mm256_maddubs_epi16(hi[i], _mm256_set1_epi32(qh));
                }
                const __m256i v = _mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(u[0], u[1]), _mm256_add_epi16(u[2], u[3])),
                                                   _mm256_add_epi16(_mm256_add_epi16(u[4], u[5]), _mm256_add_epi16(u[6], u[7])));
                __m256i s = _mm256_madd_epi16(v, ones);
                if (!min) s = _mm256_add_epi32(s, _mm256_set1_epi32(oj));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, _mm256_set1_ps(x.d[j * x.ds + b])), acc[j]);
                if (min) {
                    float mf;
                    memcpy(&mf, &oj, 4);
                    acc[j] = _mm256_fmadd_ps(m, _mm256_set1_ps(mf), acc[j]);
                }
            }
        }
#pragma GCC unroll 8
        for (int j = 0; j < nj; j++) {
            float *yj = y + j * ldy + 8 * h;
            _mm256_storeu_ps(yj, accumulate ? _mm256_add_ps(_mm256_loadu_ps(yj), acc[j]) : acc[j]);
        }
    }
#else
    float acc[X16_J][X16_ROWS] = {{0.f}};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = grp + b * gb;
        for (int l = 0; l < X16_ROWS; l++) {
            uint8_t qs[16];
            x16_row_nibbles(p + head, l, qs);
            const float d = f16(p + 2 * l), m = min ? f16(p + 32 + 2 * l) : 0.f;
            for (int j = 0; j < nj; j++) {
                const int8_t *q = x.q + j * x.qs + b * 32;
                const int32_t oj = x.o[j * x.os + b];
                int32_t s = min ? 0 : oj;
                for (int i = 0; i < 16; i++) s += (int32_t)(qs[i] & 0xF) * q[i] + (int32_t)(qs[i] >> 4) * q[i + 16];
                acc[j][l] = fmaf((float)s, d * x.d[j * x.ds + b], acc[j][l]);
                if (min) {
                    float mf;
                    memcpy(&mf, &oj, 4);
                    acc[j][l] = fmaf(m, mf, acc[j][l]);
                }
            }
        }
    }
    for (int j = 0; j < nj; j++)
        for (int l = 0; l < X16_ROWS; l++) y[j * ldy + l] = accumulate ? y[j * ldy + l] + acc[j][l] : acc[j][l];
#endif
}

/* One group (nb blocks) against float activation rows 0 .. nj - 1 of x (rows ldx apart): each weight the stored
 * layout's value (fma(q, d, m)) times x, added lane by lane in a fixed order: low-nibble elements into one sum and
 * high ones into another (two chains), the two added at the end. The portable loop takes the same steps. */
GEN_ALWAYS_INLINE void x16_float_group(const int nj, const int min, const uint8_t *restrict grp, int64_t nb,
                                       const float *x, int64_t ldx, float *y, int64_t ldy, int accumulate) {
    const int64_t head = X16_HEAD(min), gb = X16_BYTES(min);
#ifdef GEN_BLOCKS_512
    const __m512i m4 = _mm512_set1_epi32(0xF);
    __m512 lo[X16_J], hi[X16_J];
#pragma GCC unroll 8
    for (int j = 0; j < nj; j++) lo[j] = hi[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = grp + b * gb;
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        const __m512 m = min ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32))) : _mm512_mul_ps(d, _mm512_set1_ps(-8.f));
        for (int i = 0; i < 4; i++) {
            const __m512i c = _mm512_loadu_si512(p + head + 64 * i);
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) { /* element 4i + k: byte k's low nibble; 16 + 4i + k: its high one */
                const __m512 wl = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(c, 8 * k), m4)), d, m);
                const __m512 wh = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(c, 8 * k + 4), m4)), d, m);
#pragma GCC unroll 8
                for (int j = 0; j < nj; j++) {
                    const float *xj = x + j * ldx + 32 * b;
                    lo[j] = _mm512_fmadd_ps(wl, _mm512_set1_ps(xj[4 * i + k]), lo[j]);
                    hi[j] = _mm512_fmadd_ps(wh, _mm512_set1_ps(xj[16 + 4 * i + k]), hi[j]);
                }
            }
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < nj; j++) {
        float *yj = y + j * ldy;
        const __m512 v = _mm512_add_ps(lo[j], hi[j]);
        _mm512_storeu_ps(yj, accumulate ? _mm512_add_ps(_mm512_loadu_ps(yj), v) : v);
    }
#elif defined(GEN_X16_256)
    const __m256i m4 = _mm256_set1_epi32(0xF);
    for (int h = 0; h < 2; h++) { /* each half (8 rows) over all blocks in turn, as in x16_group */
        __m256 lo[X16_J], hi[X16_J];
#pragma GCC unroll 8
        for (int j = 0; j < nj; j++) lo[j] = hi[j] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *p = grp + b * gb;
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 * h)));
            const __m256 m = min ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 32 + 16 * h))) : _mm256_mul_ps(d, _mm256_set1_ps(-8.f));
            for (int i = 0; i < 4; i++) {
                const __m256i c = _mm256_loadu_si256((const __m256i *)(p + head + 64 * i + 32 * h));
#pragma GCC unroll 4
                for (int k = 0; k < 4; k++) {
                    const __m256 wl = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(c, 8 * k), m4)), d, m);
                    const __m256 wh = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(c, 8 * k + 4), m4)), d, m);
#pragma GCC unroll 8
                    for (int j = 0; j < nj; j++) {
                        const float *xj = x + j * ldx + 32 * b;
                        lo[j] = _mm256_fmadd_ps(wl, _mm256_set1_ps(xj[4 * i + k]), lo[j]);
                        hi[j] = _mm256_fmadd_ps(wh, _mm256_set1_ps(xj[16 + 4 * i + k]), hi[j]);
                    }
                }
            }
        }
#pragma GCC unroll 8
        for (int j = 0; j < nj; j++) {
            float *yj = y + j * ldy + 8 * h;
            const __m256 v = _mm256_add_ps(lo[j], hi[j]);
            _mm256_storeu_ps(yj, accumulate ? _mm256_add_ps(_mm256_loadu_ps(yj), v) : v);
        }
    }
#else
    float lo[X16_J][X16_ROWS] = {{0.f}}, hi[X16_J][X16_ROWS] = {{0.f}};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = grp + b * gb;
        for (int l = 0; l < X16_ROWS; l++) {
            uint8_t qs[16];
            x16_row_nibbles(p + head, l, qs);
            const float d = f16(p + 2 * l), m = min ? f16(p + 32 + 2 * l) : d * -8.f;
            for (int e = 0; e < 16; e++) {
                const float wl = fmaf((float)(qs[e] & 0xF), d, m), wh = fmaf((float)(qs[e] >> 4), d, m);
                for (int j = 0; j < nj; j++) {
                    const float *xj = x + j * ldx + 32 * b;
                    lo[j][l] = fmaf(wl, xj[e], lo[j][l]);
                    hi[j][l] = fmaf(wh, xj[16 + e], hi[j][l]);
                }
            }
        }
    }
    for (int j = 0; j < nj; j++)
        for (int l = 0; l < X16_ROWS; l++) {
            const float v = lo[j][l] + hi[j][l];
            y[j * ldy + l] = accumulate ? y[j * ldy + l] + v : v;
        }
#endif
}

/* y[b] (+)= W x[b] with float activations (ACT_FP32, or ACT_BF16: x rounded to bf16 first, in xr, (batch, cols)). */
static void x16_float_matmul(const uint8_t *w, int64_t rows, int64_t cols, const float *x, int64_t batch, float *y,
                             int64_t ldy, int accumulate, const float *xr, int n_threads, const int min) {
    const int64_t nb = cols / 32, gs = nb * X16_BYTES(min);
    const float *xs = xr ? xr : x;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t g = 0; g < rows / X16_ROWS; g++) {
        for (int64_t b0 = 0; b0 < batch; b0 += X16_J) {
            const int nj = (int)(batch - b0 < X16_J ? batch - b0 : X16_J);
            const float *xj = xs + b0 * cols;
            float *o = y + b0 * ldy + g * X16_ROWS;
            const uint8_t *grp = w + g * gs;
            switch (nj) {
#define NJ(N)                                                                 \
    case N:                                                                   \
        if (min)                                                              \
            x16_float_group(N, 1, grp, nb, xj, cols, o, ldy, accumulate);     \
        else                                                                  \
            x16_float_group(N, 0, grp, nb, xj, cols, o, ldy, accumulate);     \
        break;
                NJ(1) NJ(2) NJ(3) NJ(4) NJ(5) NJ(6) NJ(7) NJ(8)
#undef NJ
            }
        }
    }
}

#endif
