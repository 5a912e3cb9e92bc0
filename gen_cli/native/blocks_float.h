/* GGML block rows dotted with float activations (Model.act ACT_FP32 or ACT_BF16), the alternative to the int8
 * activations of blocks_common.h: each block is unpacked to floats in vector registers and multiplied into the
 * activations with FMAs, so the only rounding is fp32's (ACT_FP32), or the activations' rounding to bf16 once per
 * matmul (ACT_BF16: stored as 16-bit halves, widened by a shift as they are read).
 *
 * Per block: the codes as 16-lane float vectors times the activations, summed, then times the block's scale.
 * Offsets that are whole numbers (Q4_0's 8, Q5_0's 16, Q6_K's 32) are subtracted from the codes as bytes; a
 * block's float min (Q4_1, Q5_1, Q4_K) multiplies the activations' sum over that block (precomputed once per
 * matmul, `xs`: one per 32). AVX-512 runs 16 lanes in one register, AVX2 in two, and the portable path
 * dequantizes a block with the type's own scalar code, then dots; the tests check the three against each other
 * and against dequantize-then-fp32.
 */
#ifndef GEN_BLOCKS_FLOAT_H
#define GEN_BLOCKS_FLOAT_H

#include <stdint.h>
#include <string.h>

#include "abi.h"
#include "bf16.h"
#include "block_types.h"
#include "blocks_common.h"
#include "features.h"

/* One row of nb blocks . x: x is fp32 (cols floats) or bf16 (cols halves, `half`); xs the sums of x per 32. */
typedef float (*FloatDot)(const uint8_t *restrict w, const void *restrict x, const float *restrict xs, int64_t nb);

/* ---- 16 lanes of floats: one AVX-512 register, two AVX2 ones ------------------------------------------------- */

#if defined(GEN_AVX512)
#define GEN_FLOAT_V 1
typedef __m512 V16;
static inline V16 v_zero(void) { return _mm512_setzero_ps(); }
static inline V16 v_set1(float f) { return _mm512_set1_ps(f); }
static inline V16 v_u8(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)); } /* 16 unsigned bytes */
static inline V16 v_i8(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)); } /* 16 signed bytes */
static inline V16 v_x(const float *x) { return _mm512_loadu_ps(x); }
static inline V16 v_xh(const uint16_t *x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)), 16));
}
static inline V16 v_mul(V16 a, V16 b) { return _mm512_mul_ps(a, b); }
static inline V16 v_fma(V16 a, V16 b, V16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline float v_sum(V16 a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__)
#define GEN_FLOAT_V 1
typedef struct {
    __m256 lo, hi;
} V16;
static inline V16 v_zero(void) { return (V16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline V16 v_set1(float f) { return (V16){_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
static inline V16 v_u8(__m128i q) {
    return (V16){_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)))};
}
static inline V16 v_i8(__m128i q) {
    return (V16){_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)))};
}
static inline V16 v_x(const float *x) { return (V16){_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8)}; }
static inline __m256 widen8(const uint16_t *x) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)x)), 16));
}
static inline V16 v_xh(const uint16_t *x) { return (V16){widen8(x), widen8(x + 8)}; }
static inline V16 v_mul(V16 a, V16 b) { return (V16){_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
static inline V16 v_fma(V16 a, V16 b, V16 c) {
    return (V16){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline float v_sum(V16 a) {
    __m256 s = _mm256_add_ps(a.lo, a.hi);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#endif

#ifdef GEN_FLOAT_V
/* Activations i .. i + 15, fp32 or bf16. */
GEN_ALWAYS_INLINE V16 act16(const void *x, int64_t i, const int half) {
    return half ? v_xh((const uint16_t *)x + i) : v_x((const float *)x + i);
}

/* 16 bits -> 16 bytes, byte i = 16 where bit i is set, else 0 (Q5's fifth bits). */
static inline __m128i fifth16(uint32_t bits) {
    const __m128i bit = _mm_set1_epi64x((long long)0x8040201008040201ull);
    __m128i v = _mm_shuffle_epi8(_mm_set1_epi16((short)bits), _mm_set_epi64x(0x0101010101010101ll, 0)); /* byte i: source byte i / 8 */
    return _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(v, bit), bit), _mm_set1_epi8(16));
}

/* Q8_0: 32 int8 codes times d. */
GEN_ALWAYS_INLINE float fdot_q8_0_v(const uint8_t *restrict w, const void *restrict x, int64_t nb, const int half) {
    V16 acc = v_zero();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 34;
        V16 s = v_fma(v_i8(_mm_loadu_si128((const __m128i *)(p + 2))), act16(x, 32 * b, half),
                      v_mul(v_i8(_mm_loadu_si128((const __m128i *)(p + 18))), act16(x, 32 * b + 16, half)));
        acc = v_fma(s, v_set1(f16(p)), acc);
    }
    return v_sum(acc);
}

/* Q4_0 / Q4_1 / Q5_0 / Q5_1 (layout in blocks_32.h): (q - 8 or 16) d, or q d + m. */
GEN_ALWAYS_INLINE float fdot_q45_v(const uint8_t *restrict w, const void *restrict x, const float *restrict xs,
                                   int64_t nb, const int half, const int bits, const int min) {
    const int64_t ho = Q45_HO(min), qo = Q45_QO(bits, min), bs = Q45_BYTES(bits, min);
    const __m128i m4 = _mm_set1_epi8(0xF), offset = _mm_set1_epi8(bits == 5 ? 16 : 8);
    V16 acc = v_zero();
    float mins = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * bs;
        const __m128i q = _mm_loadu_si128((const __m128i *)(p + qo));
        __m128i lo = _mm_and_si128(q, m4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4); /* elements 0..15, 16..31 */
        if (bits == 5) {
            uint32_t h;
            memcpy(&h, p + ho, 4);
            lo = _mm_or_si128(lo, fifth16(h & 0xFFFFu));
            hi = _mm_or_si128(hi, fifth16(h >> 16));
        }
        V16 s;
        if (min) {
            s = v_fma(v_u8(lo), act16(x, 32 * b, half), v_mul(v_u8(hi), act16(x, 32 * b + 16, half)));
            mins += f16(p + 2) * xs[b];
        } else { /* the codes less the offset fit signed bytes */
            s = v_fma(v_i8(_mm_sub_epi8(lo, offset)), act16(x, 32 * b, half),
                      v_mul(v_i8(_mm_sub_epi8(hi, offset)), act16(x, 32 * b + 16, half)));
        }
        acc = v_fma(s, v_set1(f16(p)), acc);
    }
    return v_sum(acc) + mins;
}

/* Q4_K (layout in blocks_k.h): sub-block j is d sc_j q - dmin m_j. */
GEN_ALWAYS_INLINE float fdot_q4_k_v(const uint8_t *restrict w, const void *restrict x, const float *restrict xs,
                                    int64_t nb, const int half) {
    const __m128i m4 = _mm_set1_epi8(0xF);
    V16 acc = v_zero();
    float mins = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 144, *qs = p + 16;
        const float d = f16(p), dmin = f16(p + 2);
        uint8_t sc[8], mn[8];
        q4k_scales(p + 4, sc, mn);
        for (int j = 0; j < 8; j++) mins += dmin * (float)mn[j] * xs[8 * b + j];
        for (int c = 0; c < 4; c++) {
            const int64_t e = 256 * b + 64 * c;
            const __m128i qa = _mm_loadu_si128((const __m128i *)(qs + 32 * c));
            const __m128i qb = _mm_loadu_si128((const __m128i *)(qs + 32 * c + 16));
            V16 s0 = v_fma(v_u8(_mm_and_si128(qa, m4)), act16(x, e, half),
                           v_mul(v_u8(_mm_and_si128(qb, m4)), act16(x, e + 16, half)));
            V16 s1 = v_fma(v_u8(_mm_and_si128(_mm_srli_epi16(qa, 4), m4)), act16(x, e + 32, half),
                           v_mul(v_u8(_mm_and_si128(_mm_srli_epi16(qb, 4), m4)), act16(x, e + 48, half)));
            acc = v_fma(s0, v_set1(d * (float)sc[2 * c]), acc);
            acc = v_fma(s1, v_set1(d * (float)sc[2 * c + 1]), acc);
        }
    }
    return v_sum(acc) - mins;
}

/* Q6_K (layout in blocks_k.h): d sc_g (q - 32) per 16 elements. */
GEN_ALWAYS_INLINE float fdot_q6_k_v(const uint8_t *restrict w, const void *restrict x, int64_t nb, const int half) {
    const __m128i m4 = _mm_set1_epi8(0xF), m2 = _mm_set1_epi8(3), off = _mm_set1_epi8(32);
    V16 acc = v_zero();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 210;
        const int8_t *sc = (const int8_t *)(p + 192);
        const float d = f16(p + 208);
        for (int h = 0; h < 2; h++) {
            for (int k = 0; k < 2; k++) { /* elements l = 16k .. 16k + 15 of each quarter */
                const __m128i l0 = _mm_loadu_si128((const __m128i *)(p + 64 * h + 16 * k));
                const __m128i l1 = _mm_loadu_si128((const __m128i *)(p + 64 * h + 32 + 16 * k));
                const __m128i qh = _mm_loadu_si128((const __m128i *)(p + 128 + 32 * h + 16 * k));
                for (int quarter = 0; quarter < 4; quarter++) {
                    const __m128i l = quarter & 1 ? l1 : l0;
                    const __m128i low = quarter < 2 ? _mm_and_si128(l, m4) : _mm_and_si128(_mm_srli_epi16(l, 4), m4);
                    const __m128i high = _mm_and_si128(_mm_srl_epi16(qh, _mm_cvtsi32_si128(2 * quarter)), m2);
                    const __m128i q = _mm_sub_epi8(_mm_or_si128(low, _mm_slli_epi16(high, 4)), off);
                    const int64_t e = 128 * h + 32 * quarter + 16 * k;
                    acc = v_fma(v_mul(v_i8(q), act16(x, 256 * b + e, half)), v_set1(d * (float)sc[e / 16]), acc);
                }
            }
        }
    }
    return v_sum(acc);
}
#endif

/* Portable: each block through the type's scalar dequantize, then an fp32 dot (also the oracle the vector paths
 * are tested against, built with -march=x86-64-v2). */
GEN_ALWAYS_INLINE float fdot_portable(int64_t type, const uint8_t *restrict w, const void *restrict x, int64_t nb,
                                      const int half) {
    const BlockType *t = &BLOCK_TYPES[type];
    float tmp[256], total = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        t->dequantize(w + b * t->bytes, t->elems, tmp);
        const int64_t o = b * t->elems;
        for (int64_t i = 0; i < t->elems; i++)
            total += tmp[i] * (half ? from_bf16(((const uint16_t *)x)[o + i]) : ((const float *)x)[o + i]);
    }
    return total;
}

#ifdef GEN_FLOAT_V
#define FDOT_Q8_0(x, xs, nb, half) fdot_q8_0_v(w, x, nb, half)
#define FDOT_Q4_0(x, xs, nb, half) fdot_q45_v(w, x, xs, nb, half, 4, 0)
#define FDOT_Q4_1(x, xs, nb, half) fdot_q45_v(w, x, xs, nb, half, 4, 1)
#define FDOT_Q5_0(x, xs, nb, half) fdot_q45_v(w, x, xs, nb, half, 5, 0)
#define FDOT_Q5_1(x, xs, nb, half) fdot_q45_v(w, x, xs, nb, half, 5, 1)
#define FDOT_Q4_K(x, xs, nb, half) fdot_q4_k_v(w, x, xs, nb, half)
#define FDOT_Q6_K(x, xs, nb, half) fdot_q6_k_v(w, x, nb, half)
#else
#define FDOT_Q8_0(x, xs, nb, half) fdot_portable(T_Q8_0, w, x, nb, half)
#define FDOT_Q4_0(x, xs, nb, half) fdot_portable(T_Q4_0, w, x, nb, half)
#define FDOT_Q4_1(x, xs, nb, half) fdot_portable(T_Q4_1, w, x, nb, half)
#define FDOT_Q5_0(x, xs, nb, half) fdot_portable(T_Q5_0, w, x, nb, half)
#define FDOT_Q5_1(x, xs, nb, half) fdot_portable(T_Q5_1, w, x, nb, half)
#define FDOT_Q4_K(x, xs, nb, half) fdot_portable(T_Q4_K, w, x, nb, half)
#define FDOT_Q6_K(x, xs, nb, half) fdot_portable(T_Q6_K, w, x, nb, half)
#endif

/* Each type's two entries: fp32 and bf16 activations. */
#define FLOAT_FORMAT(NAME, CALL)                                                                                       \
    static float fdot_##NAME##_f32(const uint8_t *restrict w, const void *restrict x, const float *restrict xs,        \
                                   int64_t nb) {                                                                       \
        (void)xs;                                                                                                      \
        return CALL(x, xs, nb, 0);                                                                                     \
    }                                                                                                                  \
    static float fdot_##NAME##_bf16(const uint8_t *restrict w, const void *restrict x, const float *restrict xs,       \
                                    int64_t nb) {                                                                      \
        (void)xs;                                                                                                      \
        return CALL(x, xs, nb, 1);                                                                                     \
    }
FLOAT_FORMAT(q8_0, FDOT_Q8_0)
FLOAT_FORMAT(q4_0, FDOT_Q4_0)
FLOAT_FORMAT(q4_1, FDOT_Q4_1)
FLOAT_FORMAT(q5_0, FDOT_Q5_0)
FLOAT_FORMAT(q5_1, FDOT_Q5_1)
FLOAT_FORMAT(q4_k, FDOT_Q4_K)
FLOAT_FORMAT(q6_k, FDOT_Q6_K)
#undef FLOAT_FORMAT

/* [type][0]: fp32 activations, [type][1]: bf16. */
static const FloatDot FLOAT_DOTS[T_COUNT][2] = {
    [T_Q8_0] = {fdot_q8_0_f32, fdot_q8_0_bf16}, [T_Q4_0] = {fdot_q4_0_f32, fdot_q4_0_bf16},
    [T_Q4_1] = {fdot_q4_1_f32, fdot_q4_1_bf16}, [T_Q5_0] = {fdot_q5_0_f32, fdot_q5_0_bf16},
    [T_Q5_1] = {fdot_q5_1_f32, fdot_q5_1_bf16}, [T_Q4_K] = {fdot_q4_k_f32, fdot_q4_k_bf16},
    [T_Q6_K] = {fdot_q6_k_f32, fdot_q6_k_bf16},
};

/* Y (batch, rows) = X (batch, cols) W^T (+ Y when accumulate) for block rows W, activations as `act` says
 * (ACT_FP32 or ACT_BF16). Scratch: xh (batch, cols) halves for ACT_BF16, xs (batch, cols / 32) block sums.
 * Threads take whole row blocks; each block's rows stay in L1 while every batch row uses them. */
static void float_block_matmul(const uint8_t *w, int64_t type, int64_t rows, int64_t cols, const float *x,
                               int64_t batch, float *y, int accumulate, int64_t act, uint16_t *xh, float *xs,
                               int n_threads) {
    enum { ROWS = 4 };
    const BlockType *t = &BLOCK_TYPES[type];
    const int half = act == ACT_BF16;
    const FloatDot dot = FLOAT_DOTS[type][half];
    const int64_t rb = block_row_bytes(t, cols), nb = cols / t->elems, groups = cols / 32;
    for (int64_t b = 0; b < batch; b++) { /* once per matmul: the rounding (bf16) and the sums per 32 */
        const float *xb = x + b * cols;
        uint16_t *hb = xh + b * cols;
        if (half)
            for (int64_t i = 0; i < cols; i++) hb[i] = to_bf16(xb[i]);
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.f;
            for (int i = 0; i < 32; i++) s += half ? from_bf16(hb[32 * g + i]) : xb[32 * g + i];
            xs[b * groups + g] = s;
        }
    }
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
        const int64_t r1 = r0 + ROWS < rows ? r0 + ROWS : rows;
        for (int64_t b = 0; b < batch; b++) {
            const void *xb = half ? (const void *)(xh + b * cols) : (const void *)(x + b * cols);
            for (int64_t r = r0; r < r1; r++) {
                const float v = dot(w + r * rb, xb, xs + b * groups, nb);
                y[b * rows + r] = accumulate ? y[b * rows + r] + v : v;
            }
        }
    }
}

#endif
