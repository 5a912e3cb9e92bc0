/* GGML's k-quants, super-blocks of 256 elements, dotted with int8 activation super-blocks (blocks_common.h: one
 * scale per 256, int16 sums per 16), and dequantized. Their 4/6-bit sub-block scales are integers, so a whole
 * super-block sums in int32 before one float multiply.
 */
#ifndef GEN_BLOCKS_K_H
#define GEN_BLOCKS_K_H

#include <stdint.h>
#include <string.h>

#include "blocks_common.h"
#include "features.h"

/* Q4_K's packed 6-bit scales and mins. */
static inline void q4k_scales(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (uint8_t)((s[j + 8] & 0xF) | ((s[j] >> 6) << 4));
        mn[j + 4] = (uint8_t)((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
}

/* The same 12 bytes of super-block p unpacked 4 at a time, as vector code loads them: bytes of u[0..1] the 8
 * scales, of u[2..3] the 8 mins. */
static inline void q4k_scale_words(const uint8_t *p, uint32_t u[4]) {
    memcpy(u, p + 4, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    const uint32_t m_lo = u[1] & 0x3f3f3f3fu;
    u[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
    u[2] = m_lo;
    u[0] &= 0x3f3f3f3fu;
}

/* A Q4_K / Q5_K super-block's mins times the activation's sums per 32 (bs: its 16 sums per 16): the mins' term
 * before dmin d_x. */
static inline int32_t k_mins_sum(const uint8_t mn[8], const int16_t *bs) {
    int32_t msum = 0;
    for (int j = 0; j < 8; j++) msum += mn[j] * (bs[2 * j] + bs[2 * j + 1]);
    return msum;
}

/* Σ_j sc_j Σ q x over a Q4_K (qh NULL) or Q5_K super-block's codes (qs: 4 chunks of 32 bytes, sub-block 2c in the
 * low nibbles of chunk c, 2c + 1 in the high ones; bit j of qh[i] is bit 4 of element i of sub-block j), one
 * value at a time. */
GEN_ALWAYS_INLINE int32_t k45_isum(const uint8_t sc[8], const uint8_t *qs, const uint8_t *qh, const int8_t *x) {
    int32_t isum = 0;
    for (int c = 0; c < 4; c++) {
        int32_t lo = 0, hi = 0;
        for (int i = 0; i < 32; i++) {
            const int h = qh ? qh[i] : 0;
            lo += ((qs[32 * c + i] & 0xF) | (((h >> (2 * c)) & 1) << 4)) * x[64 * c + i];
            hi += ((qs[32 * c + i] >> 4) | (((h >> (2 * c + 1)) & 1) << 4)) * x[64 * c + 32 + i];
        }
        isum += sc[2 * c] * lo + sc[2 * c + 1] * hi;
    }
    return isum;
}

#if defined(GEN_BLOCKS_512) || defined(GEN_BLOCKS_256)
/* Super-block b of a Q4_K / Q5_K row (at p): its 8 scales as int16, and its 8 mins times the activation's sums per
 * 32, added in pairs (4 int32: the mins' term before dmin d_x). */
static inline __m128i k_scales16(const uint8_t *p, Act a, int64_t b, __m128i *mins) {
    uint32_t u[4];
    q4k_scale_words(p, u);
    const __m128i mn16 = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(u + 2)));
    const __m128i bs = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)(a.s + b * 16)),
                                      _mm_loadu_si128((const __m128i *)(a.s + b * 16 + 8))); /* sums per 32 */
    *mins = _mm_madd_epi16(mn16, bs);
    return _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)u));
}

/* Bit j of each of 32 Q5_K qh bytes moved to bit 4 (16 when set, else 0): the fifth bit of sub-block j's codes.
 * 16-bit shifts; the bits crossing from the other byte are masked off. */
static inline __m256i k5_bit4_256(__m256i qh, int j) {
    const __m256i t = j <= 4 ? _mm256_slli_epi16(qh, 4 - j) : _mm256_srli_epi16(qh, j - 4);
    return _mm256_and_si256(t, _mm256_set1_epi8(0x10));
}
#endif

/* Q4_K super-block: fp16 d, fp16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles; sub-block j (32 elements)
 * is d sc_j q - dmin m_j; chunk c's 32 bytes hold sub-block 2c in the low nibbles and 2c + 1 in the high ones. */
static float dot_q4_k(const uint8_t *restrict w, Act a, int64_t nb) {
    float total = 0.f;
#if defined(GEN_BLOCKS_512)
    __m512 accf = _mm512_setzero_ps(); /* d d_x (sum of scaled sub-block sums), lane-wise across super-blocks */
    __m128 accm = _mm_setzero_ps();    /* dmin d_x (sum of min x sub-block sums) */
    __m512i pick[4];                   /* vpshufb controls: int16 scale 2c in the low 256 bits, 2c + 1 above */
    for (int c = 0; c < 4; c++)
        pick[c] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16((short)(0x0100 * (4 * c + 1) + 4 * c))),
                                     _mm256_set1_epi16((short)(0x0100 * (4 * c + 3) + 4 * c + 2)), 1);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 144, *qs = p + 16;
        const int8_t *x = a.q + b * 256;
        __m128i mins;
        const __m128i sc16 = k_scales16(p, a, b, &mins);
        accm = _mm_fmadd_ps(_mm_cvtepi32_ps(mins), _mm_set1_ps(a.d[b] * f16(p + 2)), accm);
        const __m512i scales = _mm512_broadcast_i32x4(sc16);
        __m512i acc = _mm512_setzero_si512();
        const __m256i m4 = _mm256_set1_epi8(0xF);
        for (int c = 0; c < 4; c++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(q, m4)),
                                           _mm256_and_si256(_mm256_srli_epi16(q, 4), m4), 1);
            __m512i pairs = _mm512_maddubs_epi16(v, _mm512_loadu_si512(x + 64 * c)); /* 32 int16 */
            acc = _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_shuffle_epi8(scales, pick[c])));
        }
        accf = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(a.d[b] * f16(p)), accf);
    }
    __m128 m2 = _mm_add_ps(accm, _mm_movehl_ps(accm, accm));
    return _mm512_reduce_add_ps(accf) - _mm_cvtss_f32(_mm_add_ss(m2, _mm_movehdup_ps(m2)));
#endif
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 144, *qs = p + 16;
        const int8_t *x = a.q + b * 256;
        uint8_t sc[8], mn[8];
        q4k_scales(p + 4, sc, mn);
        const int32_t msum = k_mins_sum(mn, a.s + b * 16);
#if defined(GEN_BLOCKS_256)
        __m256i acc = _mm256_setzero_si256();
        const __m256i m4 = _mm256_set1_epi8(0xF);
        for (int c = 0; c < 4; c++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(q, m4), _mm256_loadu_si256((const __m256i *)(x + 64 * c)));
            __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4),
                                              _mm256_loadu_si256((const __m256i *)(x + 64 * c + 32)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(lo, _mm256_set1_epi16(sc[2 * c])));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(hi, _mm256_set1_epi16(sc[2 * c + 1])));
        }
        __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
        const int32_t isum = _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1)));
#else
        const int32_t isum = k45_isum(sc, qs, NULL, x);
#endif
        total += a.d[b] * (f16(p) * (float)isum - f16(p + 2) * (float)msum);
    }
    return total;
}

/* Q5_K super-block: Q4_K's fp16 d, fp16 dmin and 12 bytes of scales/mins, then 32 bytes qh, then Q4_K's 128
 * bytes of nibbles; bit j of qh[i] is bit 4 of element i of sub-block j, so codes run 0..31. The products against
 * the int8 activation are Q4_K's with that bit or-ed in: maddubs pairs stay below 2 x 31 x 127 in int16. */
static float dot_q5_k(const uint8_t *restrict w, Act a, int64_t nb) {
    float total = 0.f;
#if defined(GEN_BLOCKS_512) || defined(GEN_BLOCKS_256)
    /* Per super-block: the 8 scales as int16 in both 128-bit lanes, each chunk's pair picked by a byte shuffle,
     * and the mins' term from the activation's sums per 32 in one madd (as dot_q4_k's AVX-512 path does). */
    __m256i pick[4];
    for (int c = 0; c < 4; c++)
        pick[c] = _mm256_set1_epi16((short)(0x0100 * (4 * c + 1) + 4 * c)); /* int16 scale 2c */
    const __m256i m4 = _mm256_set1_epi8(0xF), next = _mm256_set1_epi16(0x0202);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 176, *qs = p + 48;
        const int8_t *x = a.q + b * 256;
        __m128i ms;
        const __m128i sc16 = k_scales16(p, a, b, &ms);
        ms = _mm_add_epi32(ms, _mm_shuffle_epi32(ms, 0x4E));
        const int32_t msum = _mm_cvtsi128_si32(_mm_add_epi32(ms, _mm_shuffle_epi32(ms, 0xB1)));
        const __m256i scales = _mm256_broadcastsi128_si256(sc16);
        const __m256i h = _mm256_loadu_si256((const __m256i *)(p + 16));
        __m256i acc = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i h0 = k5_bit4_256(h, 2 * c), h1 = k5_bit4_256(h, 2 * c + 1);
            const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            const __m256i lo = _mm256_maddubs_epi16(_mm256_or_si256(_mm256_and_si256(q, m4), h0),
                                                    _mm256_loadu_si256((const __m256i *)(x + 64 * c)));
            const __m256i hi = _mm256_maddubs_epi16(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), h1),
                                                    _mm256_loadu_si256((const __m256i *)(x + 64 * c + 32)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(lo, _mm256_shuffle_epi8(scales, pick[c])));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(hi, _mm256_shuffle_epi8(scales, _mm256_add_epi8(pick[c], next))));
        }
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        const int32_t isum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
        total += a.d[b] * (f16(p) * (float)isum - f16(p + 2) * (float)msum);
    }
#else
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 176;
        uint8_t sc[8], mn[8];
        q4k_scales(p + 4, sc, mn);
        const int32_t isum = k45_isum(sc, p + 48, p + 16, a.q + b * 256), msum = k_mins_sum(mn, a.s + b * 16);
        total += a.d[b] * (f16(p) * (float)isum - f16(p + 2) * (float)msum);
    }
#endif
    return total;
}

#if defined(GEN_BLOCKS_256)
/* The vpshufb control that gives quarter k of a half its two int16 scales (of the half's 8, in each 128-bit lane):
 * scale 2k to the low 128 bits' pairs, 2k + 1 to the high ones' (dot_q6_k, and blocks_batch.h's tile). */
static inline __m256i q6k_pick256(int k) {
    int8_t c[32];
    for (int i = 0; i < 32; i++) c[i] = (int8_t)(4 * k + 2 * (i >= 16) + (i & 1));
    return _mm256_loadu_si256((const __m256i *)c);
}
#endif

/* Q6_K super-block: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales (one per 16 elements), fp16 d;
 * x = d sc (q - 32). In each half of 128: elements 0..63 are ql[0..63] & 15 with qh bits (0,1) then (2,3),
 * elements 64..127 are ql[0..63] >> 4 with qh bits (4,5) then (6,7). */
static float dot_q6_k(const uint8_t *restrict w, Act a, int64_t nb) {
    float total = 0.f;
#if defined(GEN_BLOCKS_512)
    __m512 accf = _mm512_setzero_ps(); /* d d_x (sum of scaled group sums) */
    __m256 acco = _mm256_setzero_ps(); /* d d_x (sum of scale x group sum of x): the -32 offset */
    __m512i pick[2]; /* vpshufb controls: 128-bit lane L takes int16 scale 4k + L */
    for (int k = 0; k < 2; k++) {
        uint8_t ctrl[64];
        for (int j = 0; j < 64; j++) ctrl[j] = (uint8_t)(2 * (4 * k + j / 16) + (j & 1));
        pick[k] = _mm512_loadu_si512(ctrl);
    }
    const __m512i m4 = _mm512_set1_epi8(0xF), m2 = _mm512_set1_epi8(3);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 210, *ql = p, *qh = p + 128;
        const int8_t *x = a.q + b * 256;
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 192)));
        const float dd = a.d[b] * f16(p + 208);
        acco = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)(a.s + b * 16)))),
                               _mm256_set1_ps(dd), acco);
        __m512i acc = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            /* this half's 8 scales in every 128-bit lane; group 4k + L of the half is lane L of vector k */
            const __m512i sch = _mm512_broadcast_i32x4(h ? _mm256_extracti128_si256(sc16, 1) : _mm256_castsi256_si128(sc16));
            __m512i l = _mm512_loadu_si512(ql + 64 * h);
            __m256i hb = _mm256_loadu_si256((const __m256i *)(qh + 32 * h));
            __m512i hh = _mm512_inserti64x4(_mm512_castsi256_si512(hb), _mm256_srli_epi16(hb, 2), 1); /* [qh, qh >> 2] */
            __m512i v0 = _mm512_or_si512(_mm512_and_si512(l, m4), _mm512_slli_epi16(_mm512_and_si512(hh, m2), 4));
            __m512i v1 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m4),
                                         _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hh, 4), m2), 4));
            __m512i p0 = _mm512_maddubs_epi16(v0, _mm512_loadu_si512(x + 128 * h));
            __m512i p1 = _mm512_maddubs_epi16(v1, _mm512_loadu_si512(x + 128 * h + 64));
            acc = _mm512_add_epi32(acc, _mm512_madd_epi16(p0, _mm512_shuffle_epi8(sch, pick[0])));
            acc = _mm512_add_epi32(acc, _mm512_madd_epi16(p1, _mm512_shuffle_epi8(sch, pick[1])));
        }
        accf = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(dd), accf);
    }
    __m128 o = _mm_add_ps(_mm256_castps256_ps128(acco), _mm256_extractf128_ps(acco, 1));
    o = _mm_add_ps(o, _mm_movehl_ps(o, o));
    return _mm512_reduce_add_ps(accf) - 32.f * _mm_cvtss_f32(_mm_add_ss(o, _mm_movehdup_ps(o)));
#endif
#if defined(GEN_BLOCKS_256)
    /* 8 int32 lanes per super-block (each a partial of isum - 32 off, exact), scaled by d d_x into fp32 lanes and
     * summed once at the end; the scales broadcast by byte shuffles, the offset one madd of the 16 scales against
     * the activation's 16 sums. */
    const __m256i m4 = _mm256_set1_epi8(0xF), m2 = _mm256_set1_epi8(3);
    __m256i pick[4];
    for (int k = 0; k < 4; k++) pick[k] = q6k_pick256(k);
    __m256 accf = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 210, *ql = p, *qh = p + 128;
        fetch_ahead(p, 210);
        const int8_t *x = a.q + b * 256;
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 192)));
        __m256i acc = _mm256_mullo_epi32(_mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)(a.s + b * 16))),
                                         _mm256_set1_epi32(-32)); /* -32 sum_g sc_g s_g, in 8 partial lanes */
        for (int h = 0; h < 2; h++) {
            const __m256i sch = (h ? _mm256_permute2x128_si256(sc16, sc16, 0x11) : _mm256_permute2x128_si256(sc16, sc16, 0x00)); /* this half's 8 scales, twice */
            __m256i l0 = _mm256_loadu_si256((const __m256i *)(ql + 64 * h)), l1 = _mm256_loadu_si256((const __m256i *)(ql + 64 * h + 32));
            __m256i hb = _mm256_loadu_si256((const __m256i *)(qh + 32 * h));
            __m256i v[4] = {
                _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m2), 4)),
                _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m2), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m2), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m2), 4)),
            };
            for (int k = 0; k < 4; k++) {
                __m256i pairs = _mm256_maddubs_epi16(v[k], _mm256_loadu_si256((const __m256i *)(x + 128 * h + 32 * k)));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_shuffle_epi8(sch, pick[k])));
            }
        }
        accf = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(a.d[b] * f16(p + 208)), accf);
    }
    return hsum256(accf);
#endif
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 210, *ql = p, *qh = p + 128;
        const int8_t *sc = (const int8_t *)(p + 192), *x = a.q + b * 256;
        const int16_t *bs = a.s + b * 16;
        int32_t isum = 0, off = 0;
        for (int g = 0; g < 16; g++) off += sc[g] * bs[g];
        for (int h = 0; h < 2; h++) {
            for (int e = 0; e < 128; e++) {
                int l = e & 31, quarter = e >> 5;
                uint8_t lo = ql[64 * h + l + 32 * (quarter & 1)];
                int q = (quarter < 2 ? lo & 0xF : lo >> 4) | (((qh[32 * h + l] >> (2 * quarter)) & 3) << 4);
                isum += sc[(128 * h + e) / 16] * q * x[128 * h + e];
            }
        }
        total += a.d[b] * f16(p + 208) * (float)(isum - 32 * off);
    }
    return total;
}

/* Q4_K (fifth 0) or Q5_K (fifth 1) rows -> fp32: d sc q - dmin m per sub-block of 32, Q5_K's codes with qh's bit. */
GEN_ALWAYS_INLINE void dequantize_k45(const uint8_t *restrict p, int64_t cols, float *restrict out, const int fifth) {
    const int64_t bytes = fifth ? 176 : 144, qs = fifth ? 48 : 16;
    for (int64_t b = 0; b < cols / 256; b++, p += bytes) {
        float *y = out + 256 * b;
        uint8_t sc[8], mn[8];
        q4k_scales(p + 4, sc, mn);
        float d = f16(p), dmin = f16(p + 2);
        for (int c = 0; c < 4; c++)
            for (int i = 0; i < 32; i++) {
                const int q = p[qs + 32 * c + i], h = fifth ? p[16 + i] : 0;
                const int lo = (q & 0xF) | (((h >> (2 * c)) & 1) << 4), hi = (q >> 4) | (((h >> (2 * c + 1)) & 1) << 4);
                y[64 * c + i] = d * sc[2 * c] * (float)lo - dmin * mn[2 * c];
                y[64 * c + 32 + i] = d * sc[2 * c + 1] * (float)hi - dmin * mn[2 * c + 1];
            }
    }
}

static void dequantize_q4_k(const uint8_t *restrict p, int64_t cols, float *restrict out) { dequantize_k45(p, cols, out, 0); }

static void dequantize_q5_k(const uint8_t *restrict p, int64_t cols, float *restrict out) { dequantize_k45(p, cols, out, 1); }

#if defined(GEN_AVX512_BW) || defined(GEN_AVX2_FMA)
/* Half hh (128 elements) of a Q6_K super-block p as 4 vectors of 32 codes minus 32 (int8), quarter k from ql's low
 * (k < 2) or high nibbles and qh's bit pair k. */
static inline void q6k_codes(const uint8_t *p, int hh, __m256i q[4]) {
    const __m256i m4 = _mm256_set1_epi8(0xF), m3 = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32);
    const __m256i l0 = _mm256_loadu_si256((const __m256i *)(p + 64 * hh));
    const __m256i l1 = _mm256_loadu_si256((const __m256i *)(p + 64 * hh + 32));
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(p + 128 + 32 * hh));
    for (int k = 0; k < 4; k++) {
        const __m256i l = k & 1 ? l1 : l0, nib = _mm256_and_si256(k < 2 ? l : _mm256_srli_epi16(l, 4), m4);
        const __m256i pair = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), m3), 4);
        q[k] = _mm256_sub_epi8(_mm256_or_si256(nib, pair), off);
    }
}

/* A Q6_K row -> fp32 (f) or bf16 (h, when f is NULL): dequantize_q6_k's values, (d sc) (q - 32) with the same two
 * roundings, 16 weights (one scale) per AVX-512 vector, 8 per AVX2 one. Dequantized one value at a time, a
 * prompt's Q6_K row tiles ran at 0.7x the speed of the Q4_0 ones. */
static void tile_q6_k(const uint8_t *restrict p, int64_t cols, float *f, uint16_t *h) {
    for (int64_t o = 0; o < cols; o += 256, p += 210) {
        const int8_t *sc = (const int8_t *)(p + 192);
        const float d = f16(p + 208);
        for (int hh = 0; hh < 2; hh++) {
            __m256i q[4];
            q6k_codes(p, hh, q);
            for (int k = 0; k < 4; k++)
                for (int s = 0; s < 2; s++) { /* 16 elements, one scale */
                    const int64_t e = 128 * hh + 32 * k + 16 * s;
                    const __m128i b = s ? _mm256_extracti128_si256(q[k], 1) : _mm256_castsi256_si128(q[k]);
#ifdef GEN_AVX512_BW
                    const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
                    store16(_mm512_mul_ps(_mm512_set1_ps(d * sc[e / 16]), x), f ? f + o + e : NULL, h ? h + o + e : NULL);
#else
                    const __m256 ds = _mm256_set1_ps(d * sc[e / 16]);
                    for (int half = 0; half < 2; half++) {
                        const __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(half ? _mm_srli_si128(b, 8) : b));
                        float v[8];
                        _mm256_storeu_ps(f ? f + o + e + 8 * half : v, _mm256_mul_ps(ds, x));
                        if (!f)
                            for (int i = 0; i < 8; i++) h[o + e + 8 * half + i] = to_bf16(v[i]);
                    }
#endif
                }
        }
    }
}
#endif

static void dequantize_q6_k(const uint8_t *restrict p, int64_t cols, float *restrict out) {
    for (int64_t b = 0; b < cols / 256; b++, p += 210) {
        float *y = out + 256 * b;
        const int8_t *sc = (const int8_t *)(p + 192);
        float d = f16(p + 208);
        for (int h = 0; h < 2; h++)
            for (int e = 0; e < 128; e++) {
                int l = e & 31, quarter = e >> 5;
                uint8_t lo = p[64 * h + l + 32 * (quarter & 1)];
                int q = (quarter < 2 ? lo & 0xF : lo >> 4) | (((p[128 + 32 * h + l] >> (2 * quarter)) & 3) << 4);
                y[128 * h + e] = d * sc[(128 * h + e) / 16] * (float)(q - 32);
            }
    }
}

#endif
