/* What every GGML block format's dot product shares: fp16 scales, the int8-quantized activation row, and
 * the SIMD helpers that unpack nibbles.
 *
 * A weight row is its blocks as GGUF stores them; gen_cli/quant/blocks.py and the `gguf` package's dequantize
 * are the reference layouts. The activation row is quantized once per matrix the way the format wants it
 * (its BlockType's quantize_act): int8 blocks of 32 with an fp32 scale and the block's integer sum
 * (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), or int8 super-blocks of 256 with one scale and int16 sums per 16 (the k-quants: their
 * 4/6-bit sub-block scales are integers, so a whole super-block sums in int32 before one float multiply).
 *
 * Integer dot products: AVX-512 VNNI (dpbusd: unsigned 8-bit weights times signed 8-bit activations, so a signed
 * Q8_0 weight lends its sign to the activation), AVX2 (maddubs), and portable loops; the tests check all three
 * against dequantize-then-fp32. Activations are clamped to [-127, 127], so maddubs' int16 pair sums never saturate
 * (at most 2 * 128 * 127) and a negated activation always fits.
 */
#ifndef GEN_BLOCKS_COMMON_H
#define GEN_BLOCKS_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "features.h"

/* A decode step reads every weight once, so its one-row products stream from memory; left to the hardware
 * prefetcher, a block's products and the wait for the next blocks take turns. Each block therefore asks for the
 * bytes FETCH_AHEAD past it (one-row products, AVX2, Zen 3, two threads, GB/s of a matrix from memory: Q6_K
 * 1.16-1.21x, Q4_K interleaved 1.02-1.23x, Q4_1 interleaved 0.95-1.19x, Q8_0 1.02-1.07x; 1 and 4 KB ahead were no
 * better). */
enum { FETCH_AHEAD = 2048 };
static inline void fetch_ahead(const uint8_t *block, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(block + FETCH_AHEAD + o);
}

/* IEEE half to float (the block scales). */
static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
#ifdef GEN_F16C
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    float f;
    if (e == 0) { /* zero or subnormal: man * 2^-24 */
        f = (float)man * 5.9604644775390625e-8f;
        memcpy(&u, &f, sizeof u);
        u |= sign;
    } else if (e == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((e + 112u) << 23) | (man << 13);
    }
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

/* ---- activations ------------------------------------------------------------------------------------------- */

/* One activation row quantized for a block format: q (cols int8), d (a scale per 32 or per 256), s (int16 sums: one
 * per 32-block, or one per 16 for the k-quants). */
typedef struct {
    int8_t *q;
    float *d;
    int16_t *s;
} Act;

/* x (n floats) -> act, in groups of `group` (32 or 256) with sums per `sum_group` (32 or 16): |error| <= d / 2.
 * Every path computes the same values: the largest |x| (NaNs skipped), x id rounded to nearest even (lrintf and
 * cvtps2dq alike), exact integer sums. The loops as written compiled to scalar code (lrintf is a call) and took
 * 5.6 ns an element: a tenth of a 135M decode step, and most of a small matrix's time in a batch of 8. */
static void quantize_act(const float *restrict x, int64_t n, int64_t group, int64_t sum_group, Act a) {
    for (int64_t g = 0; g < n / group; g++) {
        const float *xg = x + g * group;
        int8_t *q = a.q + g * group;
        float amax = 0.f;
#ifdef GEN_AVX512
        __m512 m = _mm512_setzero_ps();
        for (int64_t i = 0; i < group; i += 16) m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(xg + i)), m);
        amax = _mm512_reduce_max_ps(m);
#elif defined(GEN_AVX2_FMA)
        __m256 m = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.f);
        for (int64_t i = 0; i < group; i += 8) m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xg + i)), m);
        float lanes[8];
        _mm256_storeu_ps(lanes, m);
        for (int i = 0; i < 8; i++) amax = fmaxf(amax, lanes[i]);
#else
        for (int64_t i = 0; i < group; i++) amax = fmaxf(amax, fabsf(xg[i]));
#endif
        const float id = amax > 0.f ? 127.f / amax : 0.f;
        a.d[g] = amax / 127.f;
#ifdef GEN_AVX512
        const __m512 vid = _mm512_set1_ps(id);
        for (int64_t i = 0; i < group; i += 16) /* |x id| <= 127: the narrowing keeps every value */
            _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + i), vid))));
#elif defined(GEN_AVX2_FMA)
        const __m256 vid = _mm256_set1_ps(id);
        for (int64_t i = 0; i < group; i += 16) { /* packs: [0-3, 8-11, 4-7, 12-15] in int16, put back in order */
            __m256 v[2];
            for (int h = 0; h < 2; h++) { /* a NaN gives 0, as lrintf's value cast to int8 does (packs would saturate) */
                v[h] = _mm256_mul_ps(_mm256_loadu_ps(xg + i + 8 * h), vid);
                v[h] = _mm256_and_ps(v[h], _mm256_cmp_ps(v[h], v[h], _CMP_ORD_Q));
            }
            const __m256i lo = _mm256_cvtps_epi32(v[0]), hi = _mm256_cvtps_epi32(v[1]);
            const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8); /* 16 int16 in order */
            _mm_storeu_si128((__m128i *)(q + i), _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
        }
#else
        for (int64_t i = 0; i < group; i++) q[i] = (int8_t)lrintf(xg[i] * id);
#endif
    }
    for (int64_t j = 0; j < n / sum_group; j++) {
        const int8_t *q = a.q + j * sum_group;
        int32_t s = 0;
#if defined(GEN_AVX512) || defined(GEN_AVX2_FMA)
        /* sums of |bytes + 128| against zero, 8 bytes at a time, less 128 per byte */
        for (int64_t i = 0; i < sum_group; i += 16) {
            const __m128i u = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(q + i)), _mm_set1_epi8((char)0x80));
            const __m128i t = _mm_sad_epu8(u, _mm_setzero_si128());
            s += _mm_cvtsi128_si32(t) + _mm_extract_epi16(t, 4) - 128 * 16;
        }
#else
        for (int64_t i = 0; i < sum_group; i++) s += q[i];
#endif
        a.s[j] = (int16_t)s;
    }
}

/* The 32-element formats' activations: a scale and a sum per 32. */
static void quantize_act_32(const float *restrict x, int64_t n, Act a) { quantize_act(x, n, 32, 32, a); }

/* The k-quants' activations: a scale per 256, a sum per 16. */
static void quantize_act_256(const float *restrict x, int64_t n, Act a) { quantize_act(x, n, 256, 16, a); }

#ifdef GEN_AVX512_BW
/* 16 dequantized weights of a prompt's row tile to fp32 f, or to bf16 h when f is NULL (round to nearest even). */
static inline void store16(__m512 v, float *f, uint16_t *h) {
    if (f) {
        _mm512_storeu_ps(f, v);
        return;
    }
#ifdef GEN_AVX512_BF16
    _mm256_storeu_si256((__m256i *)h, (__m256i)_mm512_cvtneps_pbh(v));
#else
    float t[16];
    _mm512_storeu_ps(t, v);
    for (int i = 0; i < 16; i++) h[i] = to_bf16(t[i]);
#endif
}
#endif

/* ---- shared pieces of the dot products --------------------------------------------------------------------- */

/* Σ w[i] x[i] over 32 signed bytes (an odd block's tail). Kept scalar: GCC 12 vectorizes this loop into vpdpbusd,
 * which reads w as unsigned, so every negative weight summed wrong (found by a 96-column Q8_0 matrix). */
GEN_NO_VECTORIZE static int32_t dot32_i8(const int8_t *w, const int8_t *x) {
    int32_t s = 0;
    for (int i = 0; i < 32; i++) s += (int32_t)w[i] * (int32_t)x[i];
    return s;
}

#ifdef GEN_BLOCKS_256
/* 16 bytes of nibbles -> 32 unsigned bytes in element order: low nibbles are elements 0..15, high ones 16..31. */
static inline __m256i nibbles32(const uint8_t *p) {
    __m128i t = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(0xF);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(t, 4), m), _mm_and_si128(t, m));
}
#endif

#ifdef GEN_BLOCKS_512
/* Two 32-element nibble blocks (16 bytes each, at p and p + stride) -> 64 unsigned bytes in element order. */
static inline __m512i nibbles64(const uint8_t *p, int64_t stride) {
    __m256i t = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p)),
                                        _mm_loadu_si128((const __m128i *)(p + stride)), 1); /* [b0, b1] */
    __m512i v = _mm512_permutexvar_epi64(_mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0), _mm512_castsi256_si512(t));
    v = _mm512_srlv_epi64(v, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0)); /* [b0 lo, b0 hi, b1 lo, b1 hi] */
    return _mm512_and_si512(v, _mm512_set1_epi8(0xF));
}
#endif

#endif
