/* Q6_K rows against a prompt or a batch, 16 rows at a time in vector lanes (AVX-512 VNNI), as blocks_k16.h does for
 * Q4_K and Q5_K. Q6_K holds the v projections, half the down projections and the head of the Q4_K_M and Q5_K_M files
 * people download, and its one-row tile (blocks_batch.h) ran their prompts' products at ~265 GOP/s, under half of
 * Q5_K's lanes. Interleaving Q6_K at load made prompts 1.14-1.19x faster but decode slower (its rows streamed from
 * memory slower than dot_q6_k's), so the rows stay as GGUF stores them, and a matmul of Q6K16_MIN rows or more
 * transposes each super-block of 16 rows into lanes as it goes.
 *
 * Stored (blocks_k.h): element 128n + 32q + m (m < 32) has its low 4 bits in ql byte 64n + 32 (q & 1) + m (the
 * high nibble when q >= 2) and its high 2 bits in qh byte 128 + 32n + m (bits 2q, 2q + 1); then 16 int8 scales (one
 * per sub-block of 16 elements), fp16 d. So word t (elements 4t .. 4t + 3) of sub-block s = 8n + 2q + r is ql word
 * (64n + 32 (q & 1) + 16r + 4t) / 4 and qh word (128 + 32n + 16r + 4t) / 4.
 *
 * Unpacked (per super-block of a group, Q6K16_SB bytes): 64 code vectors, vector 4s + t holding row l's codes
 * u = q + 32 (0 .. 63) of sub-block s, word t in lane l; 16 scale vectors (row l's int8 scale of sub-block s,
 * sign-extended, in lane l); the 16 rows' d as fp32. Each 64 bytes of the 16 rows are transposed into lanes.
 *
 * The product, per super-block and activation row: each code u is dpbusd's unsigned operand; per sub-block, 4
 * dpbusd start from -32 times the activation's 16-value sum (X16Act.o, prepared once per matmul) and leave each
 * row's exact sum of (u - 32) x in its lane, times the row's scale (an int32 multiply); then one FMA with d d_x.
 * A sub-block's partial sums stay within 16 x (32 + 63) x 127, its sum within 16 x 32 x 127, times 128, times 16
 * sub-blocks: within int32. Each lane sums its row super-block by super-block, whatever the batch, and the tile that
 * smaller batches take sums each row's lanes per super-block before the same FMA: a row gets the same bits in any
 * batch of 2 or more (a lone row takes dot_q6_k, which differs only in fp32 summation order).
 */
#ifndef GEN_BLOCKS_Q6K16_H
#define GEN_BLOCKS_Q6K16_H

#include <stdint.h>

#include "blocks_common.h"
#include "blocks_x16.h"
#include "features.h"

/* Batches of this many rows or more take the lanes; smaller ones blocks_batch.h's one-row tile, which gives the
 * same bits. Below it, transposing 16 rows into lanes costs more than it saves (2 threads, Zen 4, against the tile:
 * 0.75x at 2 rows from memory and 0.83x from cache, about even at 4-5 rows, 1.14-1.5x at 6, 1.4-1.65x at 8, 2.1x
 * at 64-512). */
enum { Q6K16_MIN = 6 };

/* One super-block of a group unpacked: code vectors, scale vectors, d. */
enum { Q6K16_CODES = 64 * 64, Q6K16_SCALES = 16 * 64, Q6K16_SB = Q6K16_CODES + Q6K16_SCALES + 64 };

/* An activation row's per-sub-block terms (X16Act.o, 16 per super-block): -32 times the sub-block's sum. */
static void q6k16_offsets(Act a, int64_t nsb, int32_t *o) {
    for (int64_t i = 0; i < 16 * nsb; i++) o[i] = -32 * (int32_t)a.s[i];
}

#ifdef GEN_BLOCKS_512
/* r[i] (16 int32 lanes each) -> r[i] lane l = r[l] lane i before: unpack 32- then 64-bit halves within 128-bit lanes,
 * then 128-bit lanes between vectors (after the first two steps, t[4m + k]'s 128-bit lane c holds element 4c + k of
 * rows 4m .. 4m + 3). */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    for (int m = 0; m < 4; m++) {
        const __m512i *q = t + 4 * m;
        u[4 * m] = _mm512_unpacklo_epi64(q[0], q[2]), u[4 * m + 1] = _mm512_unpackhi_epi64(q[0], q[2]);
        u[4 * m + 2] = _mm512_unpacklo_epi64(q[1], q[3]), u[4 * m + 3] = _mm512_unpackhi_epi64(q[1], q[3]);
    }
    for (int k = 0; k < 4; k++) {
        const __m512i a = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x88), b = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xDD);
        const __m512i c = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x88), d = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xDD);
        r[k] = _mm512_shuffle_i32x4(a, c, 0x88), r[8 + k] = _mm512_shuffle_i32x4(a, c, 0xDD);
        r[4 + k] = _mm512_shuffle_i32x4(b, d, 0x88), r[12 + k] = _mm512_shuffle_i32x4(b, d, 0xDD);
    }
}

/* 64 bytes at `at` of stored rows 0 .. n - 1 (rb bytes apart; `bytes` of each, the rest zeros), as 16 vectors:
 * vector i holds each row's word i in its lane (rows n .. 15: zeros). */
static inline void q6k16_words(const uint8_t *p, int64_t rb, int n, int at, int bytes, __m512i v[16]) {
    const __mmask64 keep = bytes >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << bytes) - 1;
    for (int l = 0; l < 16; l++) v[l] = l < n ? _mm512_maskz_loadu_epi8(keep, p + l * rb + at) : _mm512_setzero_si512();
    transpose16(v);
}

/* Super-blocks [b0, b0 + nsb) of stored rows 0 .. n - 1 (n <= 16, rb bytes apart) -> out (nsb * Q6K16_SB bytes,
 * 64-byte aligned); lanes n .. 15 hold zeros. Each 64 bytes of the 16 rows are loaded and transposed into lanes. */
static void q6k16_unpack(const uint8_t *restrict w, int64_t rb, int n, int64_t b0, int64_t nsb, uint8_t *restrict out) {
    const __m512i m4 = _mm512_set1_epi8(0xF), m30 = _mm512_set1_epi8(0x30);
    for (int64_t b = b0; b < b0 + nsb; b++) {
        const uint8_t *p = w + b * 210;
        uint8_t *o = out + (b - b0) * Q6K16_SB;
        __m512i qh[16], ql[16], tail[16];
        /* The next group's bytes in address order, a group super-block's worth each time, into L2: these loads hop
         * between 16 rows, and a head-sized matrix streamed from memory at 0.4x the stored kernel's speed with no
         * prefetch, 0.45x with prefetches into L1 (which wait for its few miss buffers), 0.75x into L2. */
        for (int k = 0; k < X16_ROWS * 210; k += 64) __builtin_prefetch(w + X16_ROWS * rb + b * X16_ROWS * 210 + k, 0, 1);
        q6k16_words(p, rb, n, 128, 64, qh);
        for (int n2 = 0; n2 < 2; n2++) { /* ql words 16 n2 + 8 odd + 4 r + t, qh words 8 n2 + 4 r + t */
            q6k16_words(p, rb, n, 64 * n2, 64, ql);
            for (int odd = 0; odd < 2; odd++)
                for (int r = 0; r < 2; r++)
                    for (int t = 0; t < 4; t++)
                        for (int q = odd; q < 4; q += 2) {
                            const __m512i l = ql[8 * odd + 4 * r + t], h = qh[8 * n2 + 4 * r + t];
                            /* the nibble, and the 2 high bits moved to bits 4-5 (16-bit shifts: the bits that cross
                             * from the other byte are masked off) */
                            const __m512i nib = q >= 2 ? _mm512_srli_epi16(l, 4) : l;
                            const __m512i hi = q == 0   ? _mm512_slli_epi16(h, 4)
                                               : q == 1 ? _mm512_slli_epi16(h, 2)
                                               : q == 2 ? h
                                                        : _mm512_srli_epi16(h, 2);
                            const int s = 8 * n2 + 2 * q + r; /* nib & 15 | hi & 48 */
                            _mm512_store_si512(o + 64 * (4 * s + t),
                                               _mm512_ternarylogic_epi32(nib, _mm512_and_si512(hi, m30), m4, 0xE4));
                        }
        }
        q6k16_words(p, rb, n, 192, 18, tail); /* words 0-3: the scales; word 4: d (and 2 zero bytes) */
        for (int s = 0; s < 16; s++)
            _mm512_store_si512(o + Q6K16_CODES + 64 * s, _mm512_srai_epi32(_mm512_slli_epi32(tail[s / 4], 24 - 8 * (s % 4)), 24));
        _mm512_store_ps(o + Q6K16_CODES + Q6K16_SCALES, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(tail[4])));
    }
}

/* One pass: activation rows 0 .. nj - 1 (nj <= X16_J) of x against rows 0 .. n - 1 of the group at w, y[j ldy + l]
 * (+)= row l . x_j. `codes`: the group's nsb super-blocks unpacked, or NULL to unpack each one here. */
GEN_ALWAYS_INLINE void q6k16_pass(const int nj, const uint8_t *restrict w, int64_t rb, int n, int64_t nsb, X16Act x,
                                  float *y, int64_t ldy, int accumulate, const uint8_t *restrict codes) {
    _Alignas(64) uint8_t one[Q6K16_SB];
    __m512 acc[X16_J];
#pragma GCC unroll 8
    for (int j = 0; j < nj; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *u = codes ? codes + b * Q6K16_SB : one;
        if (!codes) q6k16_unpack(w, rb, n, b, 1, one);
        __m512i isum[X16_J];
#pragma GCC unroll 8
        for (int j = 0; j < nj; j++) isum[j] = _mm512_setzero_si512();
        for (int s = 0; s < 16; s++) {
            const __m512i sc = _mm512_load_si512(u + Q6K16_CODES + 64 * s);
            __m512i v[4];
#pragma GCC unroll 4
            for (int t = 0; t < 4; t++) v[t] = _mm512_load_si512(u + 64 * (4 * s + t));
#pragma GCC unroll 8
            for (int j = 0; j < nj; j++) {
                const int8_t *q = x.q + j * x.qs + 256 * b + 16 * s;
                __m512i sum = _mm512_set1_epi32(x.o[j * x.os + 16 * b + s]);
#pragma GCC unroll 4
                for (int t = 0; t < 4; t++) sum = dpbusd_x4(sum, v[t], q + 4 * t);
                isum[j] = _mm512_add_epi32(isum[j], _mm512_mullo_epi32(sum, sc));
            }
        }
        const __m512 d = _mm512_load_ps(u + Q6K16_CODES + Q6K16_SCALES);
#pragma GCC unroll 8
        for (int j = 0; j < nj; j++)
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[j]), _mm512_mul_ps(d, _mm512_set1_ps(x.d[j * x.ds + b])),
                                     acc[j]);
    }
    const __mmask16 live = (__mmask16)((1u << n) - 1);
#pragma GCC unroll 8
    for (int j = 0; j < nj; j++) {
        float *yj = y + j * ldy;
        _mm512_mask_storeu_ps(yj, live, accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(live, yj), acc[j]) : acc[j]);
    }
}

/* Activation rows [0, batch) of x against stored Q6_K rows 0 .. n - 1 (n <= 16, rb bytes apart, nsb super-blocks
 * each): y[j ldy + l] (+)= row l . x_j. `codes`: room for the group unpacked once for every pass (nsb * Q6K16_SB
 * bytes, 64-byte aligned), or NULL: each pass unpacks as it goes (one pass for X16_J rows or fewer). */
static void q6k16_group(const uint8_t *restrict w, int64_t rb, int n, int64_t nsb, X16Act x, int64_t batch, float *y,
                        int64_t ldy, int accumulate, uint8_t *restrict codes) {
    if (codes) q6k16_unpack(w, rb, n, 0, nsb, codes);
#define PASS(N) q6k16_pass(N, w, rb, n, nsb, xj, o, ldy, accumulate, codes)
    X16_PASSES(x, batch, X16_J, y, ldy, PASS)
#undef PASS
}

/* Group g (stored rows 16 g .. 16 g + 15, fewer in the last) of a stored Q6_K matrix of `rows` rows against the
 * activation rows: q6k16_group on its rows and its slice of y. */
static inline void q6k16_group_at(const uint8_t *w, int64_t rows, int64_t nsb, int64_t g, X16Act x, int64_t batch,
                                  float *y, int64_t ldy, int accumulate, uint8_t *codes) {
    const int64_t rb = nsb * 210;
    const int n = rows - g * X16_ROWS < X16_ROWS ? (int)(rows - g * X16_ROWS) : X16_ROWS;
    q6k16_group(w + g * X16_ROWS * rb, rb, n, nsb, x, batch, y + g * X16_ROWS, ldy, accumulate, codes);
}
#endif /* GEN_BLOCKS_512 */

#endif
