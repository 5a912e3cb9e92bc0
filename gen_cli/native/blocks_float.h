/* GGML block rows dotted with float activations (Model.act ACT_FP32 or ACT_BF16), the alternative to the int8
 * activations of blocks_common.h: each block is unpacked to floats in vector registers and multiplied into the
 * activations with FMAs, so the only rounding is fp32's (ACT_FP32), or the activations' rounding to bf16 once per
 * matmul (ACT_BF16: stored as 16-bit halves, widened by a shift as they are read).
 *
 * Per block: the codes as 16-lane float vectors times the activations, summed, then times the block's scale.
 * Offsets that are whole numbers (Q4_0's 8, Q5_0's 16, Q6_K's 32) are subtracted from the codes as bytes; a
 * block's float min (Q4_1, Q5_1, Q4_K) multiplies the activations' sum over that block (precomputed once per
 * matmul, `xs`: one per 32). With AVX-512 VBMI the 4-bit types skip the integer-to-float conversion (a code indexes a
 * table of its values, offset and scale folded in), and with AVX512_BF16 the bf16 mode multiplies exact bf16 codes
 * by the bf16 activations in `vdpbf16ps`. AVX-512 runs 16 lanes in one register, AVX2 in two, and the portable path
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
#elif defined(GEN_AVX2_FMA)
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

/* Blocks go four at a time into four accumulators (and four sums of mins): one chain of FMAs would wait on the
 * FMA latency at every block. STEP(b, k) adds block b into accumulator k. */
#define FOUR_CHAINS(nb, STEP)                                                                                          \
    do {                                                                                                               \
        int64_t b_ = 0;                                                                                                \
        for (; b_ + 4 <= (nb); b_ += 4) {                                                                              \
            STEP(b_, 0);                                                                                               \
            STEP(b_ + 1, 1);                                                                                           \
            STEP(b_ + 2, 2);                                                                                           \
            STEP(b_ + 3, 3);                                                                                           \
        }                                                                                                              \
        for (; b_ < (nb); b_++) STEP(b_, 0);                                                                           \
    } while (0)

/* Q8_0: 32 int8 codes times d. */
GEN_ALWAYS_INLINE V16 q8_0_step(const uint8_t *p, const void *x, int64_t b, const int half, V16 acc) {
    V16 s = v_fma(v_i8(_mm_loadu_si128((const __m128i *)(p + 2))), act16(x, 32 * b, half),
                  v_mul(v_i8(_mm_loadu_si128((const __m128i *)(p + 18))), act16(x, 32 * b + 16, half)));
    return v_fma(s, v_set1(f16(p)), acc);
}

GEN_ALWAYS_INLINE float fdot_q8_0_v(const uint8_t *restrict w, const void *restrict x, int64_t nb, const int half) {
    V16 acc[4] = {v_zero(), v_zero(), v_zero(), v_zero()};
#define STEP(b, k) acc[k] = q8_0_step(w + (b) * 34, x, b, half, acc[k])
    FOUR_CHAINS(nb, STEP);
#undef STEP
    return v_sum(acc[0]) + v_sum(acc[1]) + v_sum(acc[2]) + v_sum(acc[3]);
}

/* Q4_0 / Q4_1 / Q5_0 / Q5_1 (layout in blocks_32.h): (q - 8 or 16) d, or q d + m. */
GEN_ALWAYS_INLINE V16 q45_step(const uint8_t *p, const void *x, int64_t b, const int half, const int bits,
                               const int min, V16 acc) {
    const int64_t ho = Q45_HO(min), qo = Q45_QO(bits, min);
    const __m128i m4 = _mm_set1_epi8(0xF), offset = _mm_set1_epi8(bits == 5 ? 16 : 8);
    const __m128i q = _mm_loadu_si128((const __m128i *)(p + qo));
    __m128i lo = _mm_and_si128(q, m4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4); /* elements 0..15, 16..31 */
    if (bits == 5) {
        uint32_t h;
        memcpy(&h, p + ho, 4);
#ifdef GEN_AVX512_BW
        lo = _mm_mask_add_epi8(lo, (__mmask16)(h & 0xFFFFu), lo, _mm_set1_epi8(16));
        hi = _mm_mask_add_epi8(hi, (__mmask16)(h >> 16), hi, _mm_set1_epi8(16));
#else
        lo = _mm_or_si128(lo, fifth16(h & 0xFFFFu));
        hi = _mm_or_si128(hi, fifth16(h >> 16));
#endif
    }
    V16 s;
    if (min) {
        s = v_fma(v_u8(lo), act16(x, 32 * b, half), v_mul(v_u8(hi), act16(x, 32 * b + 16, half)));
    } else { /* the codes less the offset fit signed bytes */
        s = v_fma(v_i8(_mm_sub_epi8(lo, offset)), act16(x, 32 * b, half),
                  v_mul(v_i8(_mm_sub_epi8(hi, offset)), act16(x, 32 * b + 16, half)));
    }
    return v_fma(s, v_set1(f16(p)), acc);
}

GEN_ALWAYS_INLINE float fdot_q45_v(const uint8_t *restrict w, const void *restrict x, const float *restrict xs,
                                   int64_t nb, const int half, const int bits, const int min) {
    const int64_t bs = Q45_BYTES(bits, min);
    V16 acc[4] = {v_zero(), v_zero(), v_zero(), v_zero()};
    float mins[4] = {0.f, 0.f, 0.f, 0.f};
#define STEP(b, k)                                                                                                     \
    do {                                                                                                               \
        acc[k] = q45_step(w + (b) * bs, x, b, half, bits, min, acc[k]);                                                \
        if (min) mins[k] += f16(w + (b) * bs + 2) * xs[b];                                                             \
    } while (0)
    FOUR_CHAINS(nb, STEP);
#undef STEP
    return (v_sum(acc[0]) + v_sum(acc[1])) + (v_sum(acc[2]) + v_sum(acc[3])) + (mins[0] + mins[1]) + (mins[2] + mins[3]);
}

/* Σ mn_j xs_j over a Q4_K super-block's 8 sub-blocks, summed as a tree (a chain of 8 adds per super-block would
 * take longer than its products). */
static inline float q4k_mins(const uint8_t mn[8], const float *xs) {
    float t[8];
    for (int j = 0; j < 8; j++) t[j] = (float)mn[j] * xs[j];
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

/* Q4_K (layout in blocks_k.h): sub-block j is d sc_j q - dmin m_j. */
GEN_ALWAYS_INLINE float fdot_q4_k_v(const uint8_t *restrict w, const void *restrict x, const float *restrict xs,
                                    int64_t nb, const int half) {
    const __m128i m4 = _mm_set1_epi8(0xF);
    V16 acc[4] = {v_zero(), v_zero(), v_zero(), v_zero()}; /* one per 64-element chunk: four FMA chains */
    float mins = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 144, *qs = p + 16;
        const float d = f16(p), dmin = f16(p + 2);
        uint8_t sc[8], mn[8];
        q4k_scales(p + 4, sc, mn);
        mins += dmin * q4k_mins(mn, xs + 8 * b);
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            const int64_t e = 256 * b + 64 * c;
            const __m128i qa = _mm_loadu_si128((const __m128i *)(qs + 32 * c));
            const __m128i qb = _mm_loadu_si128((const __m128i *)(qs + 32 * c + 16));
            V16 s0 = v_fma(v_u8(_mm_and_si128(qa, m4)), act16(x, e, half),
                           v_mul(v_u8(_mm_and_si128(qb, m4)), act16(x, e + 16, half)));
            V16 s1 = v_fma(v_u8(_mm_and_si128(_mm_srli_epi16(qa, 4), m4)), act16(x, e + 32, half),
                           v_mul(v_u8(_mm_and_si128(_mm_srli_epi16(qb, 4), m4)), act16(x, e + 48, half)));
            acc[c] = v_fma(s1, v_set1(d * (float)sc[2 * c + 1]), v_fma(s0, v_set1(d * (float)sc[2 * c]), acc[c]));
        }
    }
    return (v_sum(acc[0]) + v_sum(acc[1])) + (v_sum(acc[2]) + v_sum(acc[3])) - mins;
}

/* Q5_K (layout in blocks_k.h): Q4_K's steps, each code's fifth bit (bit 2c or 2c + 1 of its qh byte) added as 16 (the
 * portable loop ran the 1B Q5_K_M file's decode at a twentieth of its int8 speed). */
GEN_ALWAYS_INLINE float fdot_q5_k_v(const uint8_t *restrict w, const void *restrict x, const float *restrict xs,
                                    int64_t nb, const int half) {
    const __m128i m4 = _mm_set1_epi8(0xF), one = _mm_set1_epi8(1);
    V16 acc[4] = {v_zero(), v_zero(), v_zero(), v_zero()}; /* one per 64-element chunk: four FMA chains */
    float mins = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 176, *qh = p + 16, *qs = p + 48;
        const float d = f16(p), dmin = f16(p + 2);
        uint8_t sc[8], mn[8];
        q4k_scales(p + 4, sc, mn);
        mins += dmin * q4k_mins(mn, xs + 8 * b);
        const __m128i ha = _mm_loadu_si128((const __m128i *)qh), hb = _mm_loadu_si128((const __m128i *)(qh + 16));
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            const int64_t e = 256 * b + 64 * c;
            const __m128i qa = _mm_loadu_si128((const __m128i *)(qs + 32 * c));
            const __m128i qb = _mm_loadu_si128((const __m128i *)(qs + 32 * c + 16));
            /* bit j of each qh byte as 16 (16-bit shifts; the and keeps each byte's own bit) */
#define FIFTH(h, j) _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(h, j), one), 4)
            const __m128i la = _mm_or_si128(_mm_and_si128(qa, m4), FIFTH(ha, 2 * c));
            const __m128i lb = _mm_or_si128(_mm_and_si128(qb, m4), FIFTH(hb, 2 * c));
            const __m128i ua = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(qa, 4), m4), FIFTH(ha, 2 * c + 1));
            const __m128i ub = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(qb, 4), m4), FIFTH(hb, 2 * c + 1));
#undef FIFTH
            V16 s0 = v_fma(v_u8(la), act16(x, e, half), v_mul(v_u8(lb), act16(x, e + 16, half)));
            V16 s1 = v_fma(v_u8(ua), act16(x, e + 32, half), v_mul(v_u8(ub), act16(x, e + 48, half)));
            acc[c] = v_fma(s1, v_set1(d * (float)sc[2 * c + 1]), v_fma(s0, v_set1(d * (float)sc[2 * c]), acc[c]));
        }
    }
    return (v_sum(acc[0]) + v_sum(acc[1])) + (v_sum(acc[2]) + v_sum(acc[3])) - mins;
}

/* Q6_K (layout in blocks_k.h): d sc_g (q - 32) per 16 elements. */
GEN_ALWAYS_INLINE float fdot_q6_k_v(const uint8_t *restrict w, const void *restrict x, int64_t nb, const int half) {
    const __m128i m4 = _mm_set1_epi8(0xF), m2 = _mm_set1_epi8(3), off = _mm_set1_epi8(32);
    V16 acc[4] = {v_zero(), v_zero(), v_zero(), v_zero()}; /* one per quarter: four FMA chains */
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 210;
        const int8_t *sc = (const int8_t *)(p + 192);
        const float d = f16(p + 208);
        for (int h = 0; h < 2; h++) {
            for (int k = 0; k < 2; k++) { /* elements l = 16k .. 16k + 15 of each quarter */
                const __m128i l0 = _mm_loadu_si128((const __m128i *)(p + 64 * h + 16 * k));
                const __m128i l1 = _mm_loadu_si128((const __m128i *)(p + 64 * h + 32 + 16 * k));
                const __m128i qh = _mm_loadu_si128((const __m128i *)(p + 128 + 32 * h + 16 * k));
#pragma GCC unroll 4
                for (int quarter = 0; quarter < 4; quarter++) {
                    const __m128i l = quarter & 1 ? l1 : l0;
                    const __m128i low = quarter < 2 ? _mm_and_si128(l, m4) : _mm_and_si128(_mm_srli_epi16(l, 4), m4);
                    const __m128i high = _mm_and_si128(_mm_srl_epi16(qh, _mm_cvtsi32_si128(2 * quarter)), m2);
                    const __m128i q = _mm_sub_epi8(_mm_or_si128(low, _mm_slli_epi16(high, 4)), off);
                    const int64_t e = 128 * h + 32 * quarter + 16 * k;
                    acc[quarter] = v_fma(v_mul(v_i8(q), act16(x, 256 * b + e, half)), v_set1(d * (float)sc[e / 16]),
                                         acc[quarter]);
                }
            }
        }
    }
    return (v_sum(acc[0]) + v_sum(acc[1])) + (v_sum(acc[2]) + v_sum(acc[3]));
}
#endif

#ifdef GEN_BLOCKS_512
/* AVX-512 with VBMI: a 4-bit code indexes a 16-entry table of floats (vpermps reads only an index's low 4 bits), so
 * a block's codes become its weights in one permute each, with no integer-to-float conversion: one byte permute puts
 * byte j of the block's nibbles in 32-bit lane j (its low nibble is element j, its high nibble element j + 16), and
 * the table is the 16 codes' values times the block's scale. */
static inline __m512i spread16(__m128i q16, int from) { /* bytes from .. from + 15 of q -> low byte of lanes 0..15 */
    const __m512i at = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                        _mm512_set1_epi32(from));
    return _mm512_maskz_permutexvar_epi8(0x1111111111111111ull, at, _mm512_castsi128_si512(q16));
}
static inline __m512i spread16_of32(__m256i q32, int from) {
    const __m512i at = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                        _mm512_set1_epi32(from));
    return _mm512_maskz_permutexvar_epi8(0x1111111111111111ull, at, _mm512_castsi256_si512(q32));
}

/* Bytes of the fp16 d (then m) of four consecutive blocks: Q4_0 (18 bytes each), Q4_1 (20), Q8_0 (34). */
static const uint8_t SCALES_Q4_0[64] = {0, 1, 18, 19, 36, 37, 54, 55};
static const uint8_t SCALES_Q4_1[64] = {0, 1, 20, 21, 40, 41, 60, 61, 2, 3, 22, 23, 42, 43, 62, 63};
static const uint8_t SCALES_Q8_0[64] = {0, 1, 34, 35, 68, 69, 102, 103};

/* The scales of four consecutive blocks (`bs` bytes each) at p as floats, d[0..3] then m[0..3], as `at` picks
 * them: one byte permute and one conversion for four blocks, where a scalar conversion per scale costs more than
 * a block's products. */
static inline __m256 scales4(const uint8_t *p, const uint8_t *at, int64_t bs) {
    const __mmask64 tail = 4 * bs >= 128 ? ~(__mmask64)0 : ((__mmask64)1 << (4 * bs - 64)) - 1; /* bytes past 64 */
    const __m512i v = _mm512_permutex2var_epi8(_mm512_loadu_si512(p), _mm512_loadu_si512(at),
                                               _mm512_maskz_loadu_epi8(tail, p + 64));
    return _mm256_cvtph_ps(_mm512_castsi512_si128(v));
}

/* Four blocks at a time: their scales converted together (scales4, with `at`), each block's products into its
 * own accumulator, the mins of the four (`min`) in one 4-lane FMA; BLOCK(b, k, d) adds block b with scale d into
 * acc[k]. Reads w, bs, nb, xs, min and at from the caller's scope, and sets mins_total. */
#define FOUR_BLOCKS(BLOCK)                                                                                          \
    do {                                                                                                               \
        __m128 mins4 = _mm_setzero_ps();                                                                               \
        float tail_mins = 0.f;                                                                                         \
        int64_t b_ = 0;                                                                                                \
        for (; b_ + 4 <= nb; b_ += 4) {                                                                                \
            float sc[8];                                                                                               \
            const __m256 f = scales4(w + b_ * bs, at, bs);                                                             \
            _mm256_storeu_ps(sc, f);                                                                                   \
            BLOCK(b_, 0, sc[0]);                                                                                       \
            BLOCK(b_ + 1, 1, sc[1]);                                                                                   \
            BLOCK(b_ + 2, 2, sc[2]);                                                                                   \
            BLOCK(b_ + 3, 3, sc[3]);                                                                                   \
            if (min) mins4 = _mm_fmadd_ps(_mm256_extractf128_ps(f, 1), _mm_loadu_ps(xs + b_), mins4);                 \
        }                                                                                                              \
        for (; b_ < nb; b_++) {                                                                                        \
            BLOCK(b_, 0, f16(w + b_ * bs));                                                                            \
            if (min) tail_mins += f16(w + b_ * bs + 2) * xs[b_];                                                       \
        }                                                                                                              \
        __m128 h = _mm_add_ps(mins4, _mm_movehl_ps(mins4, mins4));                                                     \
        mins_total = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h))) + tail_mins;                                     \
    } while (0)

GEN_ALWAYS_INLINE float fdot_q4_f32_512(const uint8_t *restrict w, const float *restrict x, const float *restrict xs,
                                        int64_t nb, const int min) {
    const int64_t qo = Q45_QO(4, min), bs = Q45_BYTES(4, min);
    const uint8_t *at = min ? SCALES_Q4_1 : SCALES_Q4_0;
    const __m512 codes = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 table = min ? codes : _mm512_sub_ps(codes, _mm512_set1_ps(8.f));
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    float mins_total;
#define BLOCK(b, k, d)                                                                                                 \
    do {                                                                                                               \
        const __m512i v = spread16(_mm_loadu_si128((const __m128i *)(w + (b) * bs + qo)), 0);                          \
        const __m512 t = _mm512_mul_ps(table, _mm512_set1_ps(d));                                                      \
        const __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(v, t), _mm512_loadu_ps(x + 32 * (b)));                   \
        acc[k] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t), _mm512_loadu_ps(x + 32 * (b) + 16), \
                                 _mm512_add_ps(acc[k], lo));                                                           \
    } while (0)
    FOUR_BLOCKS(BLOCK);
#undef BLOCK
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))) +
           mins_total;
}

static float fdot_q8_0_f32_512(const uint8_t *restrict w, const float *restrict x, int64_t nb) {
    const int64_t bs = 34;
    const int min = 0;
    const uint8_t *at = SCALES_Q8_0;
    const float *xs = NULL;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    float mins_total;
#define BLOCK(b, k, d)                                                                                                 \
    do {                                                                                                               \
        const uint8_t *p = w + (b) * bs;                                                                               \
        const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 2))));         \
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 18))));        \
        const __m512 s = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + 32 * (b)), _mm512_mul_ps(w1, _mm512_loadu_ps(x + 32 * (b) + 16))); \
        acc[k] = _mm512_fmadd_ps(s, _mm512_set1_ps(d), acc[k]);                                                        \
    } while (0)
    FOUR_BLOCKS(BLOCK);
#undef BLOCK
    (void)mins_total;
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

GEN_ALWAYS_INLINE float fdot_q4_k_f32_512(const uint8_t *restrict w, const float *restrict x, const float *restrict xs,
                                          int64_t nb) {
    const __m512 codes = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    float mins = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 144, *qs = p + 16;
        const float d = f16(p), dmin = f16(p + 2);
        uint8_t sc[8], mn[8];
        q4k_scales(p + 4, sc, mn);
        mins += dmin * q4k_mins(mn, xs + 8 * b);
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            const float *xc = x + 256 * b + 64 * c;
            const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            const __m512i v0 = spread16_of32(q, 0), v1 = spread16_of32(q, 16);
            const __m512 tl = _mm512_mul_ps(codes, _mm512_set1_ps(d * (float)sc[2 * c]));
            const __m512 th = _mm512_mul_ps(codes, _mm512_set1_ps(d * (float)sc[2 * c + 1]));
            __m512 s = _mm512_mul_ps(_mm512_permutexvar_ps(v0, tl), _mm512_loadu_ps(xc));
            s = _mm512_fmadd_ps(_mm512_permutexvar_ps(v1, tl), _mm512_loadu_ps(xc + 16), s);
            s = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), th), _mm512_loadu_ps(xc + 32), s);
            acc[c] = _mm512_add_ps(acc[c], _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), th),
                                                           _mm512_loadu_ps(xc + 48), s));
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))) - mins;
}
#endif

#if defined(GEN_BLOCKS_512) && defined(GEN_AVX512_BF16)
/* bf16 activations on CPUs with AVX512_BF16: vdpbf16ps multiplies 32 bf16 pairs into 16 fp32 sums. A block's codes
 * are small integers, exact in bf16: a byte permute puts code byte j in 16-bit lane j, a word permute (which reads
 * an index's low 5 bits: the table repeats its 16 entries) turns each into its bf16 value. */
/* Byte permutes: word j <- byte j % 16 (a 32-element block's 16 nibble bytes), or byte j (32 bytes of Q4_K). */
static const uint8_t WORD_OF_BYTE16[64] = {0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7, 0, 8, 0, 9, 0, 10, 0, 11, 0,
                                           12, 0, 13, 0, 14, 0, 15, 0, 0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7, 0,
                                           8, 0, 9, 0, 10, 0, 11, 0, 12, 0, 13, 0, 14, 0, 15, 0};
static const uint8_t WORD_OF_BYTE32[64] = {0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7, 0, 8, 0, 9, 0, 10, 0, 11, 0,
                                           12, 0, 13, 0, 14, 0, 15, 0, 16, 0, 17, 0, 18, 0, 19, 0, 20, 0, 21, 0, 22, 0,
                                           23, 0, 24, 0, 25, 0, 26, 0, 27, 0, 28, 0, 29, 0, 30, 0, 31, 0};
/* bf16 of the codes 0..15, and of 0..15 less 8 (Q4_0), each twice (vpermw reads 5 index bits). */
static const uint16_t BF16_CODES[32] = {0, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120,
                                        0x4130, 0x4140, 0x4150, 0x4160, 0x4170, 0, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0,
                                        0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
static const uint16_t BF16_CODES_LESS8[32] = {
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80, 0, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80, 0, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};

GEN_ALWAYS_INLINE float fdot_q4_bf16_512(const uint8_t *restrict w, const uint16_t *restrict x, const float *restrict xs,
                                         int64_t nb, const int min) {
    const int64_t qo = Q45_QO(4, min), bs = Q45_BYTES(4, min);
    const uint8_t *at = min ? SCALES_Q4_1 : SCALES_Q4_0;
    const __m512i table = _mm512_loadu_si512(min ? BF16_CODES : BF16_CODES_LESS8), zero = _mm512_setzero_si512();
    const __m512i shift = _mm512_inserti64x4(zero, _mm256_set1_epi16(4), 1); /* words 16..31 take the high nibble */
    const __m512i spread = _mm512_loadu_si512(WORD_OF_BYTE16);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    float mins_total;
#define BLOCK(b, k, d)                                                                                                 \
    do {                                                                                                               \
        __m512i v = _mm512_maskz_permutexvar_epi8(                                                                     \
            0x5555555555555555ull, spread, _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(w + (b) * bs + qo)))); \
        v = _mm512_permutexvar_epi16(_mm512_srlv_epi16(v, shift), table);                                              \
        const __m512 s = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)v, (__m512bh)_mm512_loadu_si512(x + 32 * (b))); \
        acc[k] = _mm512_fmadd_ps(s, _mm512_set1_ps(d), acc[k]);                                                        \
    } while (0)
    FOUR_BLOCKS(BLOCK);
#undef BLOCK
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))) +
           mins_total;
}

static float fdot_q8_0_bf16_512(const uint8_t *restrict w, const uint16_t *restrict x, int64_t nb) {
    const int64_t bs = 34;
    const int min = 0;
    const uint8_t *at = SCALES_Q8_0;
    const float *xs = NULL;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    float mins_total;
#define BLOCK(b, k, d)                                                                                                 \
    do {                                                                                                               \
        const uint8_t *p = w + (b) * bs;                                                                               \
        const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 2))));         \
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 18))));        \
        const __m512 s = _mm512_dpbf16_ps(_mm512_setzero_ps(), _mm512_cvtne2ps_pbh(w1, w0),                            \
                                          (__m512bh)_mm512_loadu_si512(x + 32 * (b))); /* codes exact in bf16 */       \
        acc[k] = _mm512_fmadd_ps(s, _mm512_set1_ps(d), acc[k]);                                                        \
    } while (0)
    FOUR_BLOCKS(BLOCK);
#undef BLOCK
    (void)mins_total;
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

static float fdot_q4_k_bf16_512(const uint8_t *restrict w, const uint16_t *restrict x, const float *restrict xs,
                                int64_t nb) {
    const __m512i table = _mm512_loadu_si512(BF16_CODES), spread = _mm512_loadu_si512(WORD_OF_BYTE32);
    float mins = 0.f;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 144, *qs = p + 16;
        const float d = f16(p), dmin = f16(p + 2);
        uint8_t sc[8], mn[8];
        q4k_scales(p + 4, sc, mn);
        mins += dmin * q4k_mins(mn, xs + 8 * b);
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            const uint16_t *xc = x + 256 * b + 64 * c;
            const __m512i v = _mm512_maskz_permutexvar_epi8(
                0x5555555555555555ull, spread, _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(qs + 32 * c))));
            const __m512i lo = _mm512_permutexvar_epi16(v, table), hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
            const __m512 s0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)lo, (__m512bh)_mm512_loadu_si512(xc));
            const __m512 s1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)hi, (__m512bh)_mm512_loadu_si512(xc + 32));
            acc[c] = _mm512_fmadd_ps(s1, _mm512_set1_ps(d * (float)sc[2 * c + 1]),
                                     _mm512_fmadd_ps(s0, _mm512_set1_ps(d * (float)sc[2 * c]), acc[c]));
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))) - mins;
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

/* Each type's pair of entries: fp32 activations, then bf16 ones; `w` is the row. */
#ifdef GEN_FLOAT_V
#define F32(x, xs, nb, CALL) CALL(x, xs, nb, 0)
#define BF16(x, xs, nb, CALL) CALL(x, xs, nb, 1)
#define V_Q8_0(x, xs, nb, half) fdot_q8_0_v(w, x, nb, half)
#define V_Q4_0(x, xs, nb, half) fdot_q45_v(w, x, xs, nb, half, 4, 0)
#define V_Q4_1(x, xs, nb, half) fdot_q45_v(w, x, xs, nb, half, 4, 1)
#define V_Q5_0(x, xs, nb, half) fdot_q45_v(w, x, xs, nb, half, 5, 0)
#define V_Q5_1(x, xs, nb, half) fdot_q45_v(w, x, xs, nb, half, 5, 1)
#define V_Q4_K(x, xs, nb, half) fdot_q4_k_v(w, x, xs, nb, half)
#define V_Q5_K(x, xs, nb, half) fdot_q5_k_v(w, x, xs, nb, half)
#define V_Q6_K(x, xs, nb, half) fdot_q6_k_v(w, x, nb, half)
#else /* portable */
#define F32(x, xs, nb, CALL) fdot_portable(T_##CALL, w, x, nb, 0)
#define BF16(x, xs, nb, CALL) fdot_portable(T_##CALL, w, x, nb, 1)
#endif
#define FLOAT_FORMAT(NAME, F32_BODY, BF16_BODY)                                                                        \
    static float fdot_##NAME##_f32(const uint8_t *restrict w, const void *restrict x, const float *restrict xs,        \
                                   int64_t nb) {                                                                       \
        (void)xs;                                                                                                      \
        return F32_BODY;                                                                                               \
    }                                                                                                                  \
    static float fdot_##NAME##_bf16(const uint8_t *restrict w, const void *restrict x, const float *restrict xs,       \
                                    int64_t nb) {                                                                      \
        (void)xs;                                                                                                      \
        return BF16_BODY;                                                                                              \
    }
#ifdef GEN_FLOAT_V
#define VF(T) F32(x, xs, nb, V_##T)
#define VB(T) BF16(x, xs, nb, V_##T)
#else
#define VF(T) F32(x, xs, nb, T)
#define VB(T) BF16(x, xs, nb, T)
#endif
#ifdef GEN_BLOCKS_512
#define F32_Q8_0 fdot_q8_0_f32_512(w, x, nb)
#define F32_Q4_0 fdot_q4_f32_512(w, x, xs, nb, 0)
#define F32_Q4_1 fdot_q4_f32_512(w, x, xs, nb, 1)
#define F32_Q4_K fdot_q4_k_f32_512(w, x, xs, nb)
#else
#define F32_Q8_0 VF(Q8_0)
#define F32_Q4_0 VF(Q4_0)
#define F32_Q4_1 VF(Q4_1)
#define F32_Q4_K VF(Q4_K)
#endif
#if defined(GEN_BLOCKS_512) && defined(GEN_AVX512_BF16)
#define BF16_Q8_0 fdot_q8_0_bf16_512(w, x, nb)
#define BF16_Q4_0 fdot_q4_bf16_512(w, x, xs, nb, 0)
#define BF16_Q4_1 fdot_q4_bf16_512(w, x, xs, nb, 1)
#define BF16_Q4_K fdot_q4_k_bf16_512(w, x, xs, nb)
#else
#define BF16_Q8_0 VB(Q8_0)
#define BF16_Q4_0 VB(Q4_0)
#define BF16_Q4_1 VB(Q4_1)
#define BF16_Q4_K VB(Q4_K)
#endif
FLOAT_FORMAT(q8_0, F32_Q8_0, BF16_Q8_0)
FLOAT_FORMAT(q4_0, F32_Q4_0, BF16_Q4_0)
FLOAT_FORMAT(q4_1, F32_Q4_1, BF16_Q4_1)
FLOAT_FORMAT(q5_0, VF(Q5_0), VB(Q5_0))
FLOAT_FORMAT(q5_1, VF(Q5_1), VB(Q5_1))
FLOAT_FORMAT(q4_k, F32_Q4_K, BF16_Q4_K)
FLOAT_FORMAT(q6_k, VF(Q6_K), VB(Q6_K))
FLOAT_FORMAT(q5_k, VF(Q5_K), VB(Q5_K))
#undef FLOAT_FORMAT

/* [type][0]: fp32 activations, [type][1]: bf16. */
static const FloatDot FLOAT_DOTS[T_COUNT][2] = {
    [T_Q8_0] = {fdot_q8_0_f32, fdot_q8_0_bf16}, [T_Q4_0] = {fdot_q4_0_f32, fdot_q4_0_bf16},
    [T_Q4_1] = {fdot_q4_1_f32, fdot_q4_1_bf16}, [T_Q5_0] = {fdot_q5_0_f32, fdot_q5_0_bf16},
    [T_Q5_1] = {fdot_q5_1_f32, fdot_q5_1_bf16}, [T_Q4_K] = {fdot_q4_k_f32, fdot_q4_k_bf16},
    [T_Q6_K] = {fdot_q6_k_f32, fdot_q6_k_bf16}, [T_Q5_K] = {fdot_q5_k_f32, fdot_q5_k_bf16},
};

/* Y (batch, rows) = X (batch, cols) W^T (+ Y when accumulate) for block rows W, activations as `act` says
 * (ACT_FP32 or ACT_BF16); row b of Y starts ldy floats after row b - 1 (a part of a matrix held in parts writes
 * its own columns of a wider Y). Scratch: xh (batch, cols) halves for ACT_BF16, xs (batch, cols / 32) block sums.
 * Threads take whole row blocks; each row stays in L1 while every batch row uses it. Interleaved Q4_K, Q5_K and
 * Q8_0 rows (blocks_k16.h, blocks_q8x16.h; the interleaved types that come here) are read back a row at a time
 * into the stored layout: the stored layout's products, bit for bit (slow: the loaders keep these types stored
 * where activations are not int8, native/repack.py). */
static void float_block_matmul(const uint8_t *w, int64_t type, int64_t rows, int64_t cols, const float *x,
                               int64_t batch, float *y, int64_t ldy, int accumulate, int64_t act, uint16_t *xh,
                               float *xs, int n_threads) {
    const BlockType *t = &BLOCK_TYPES[type];
    const int64_t ROWS = t->group ? t->group : 4;
    const int half = act == ACT_BF16;
    const FloatDot dot = FLOAT_DOTS[t->group ? t->stored : type][half];
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
        for (int64_t r = r0; r < r1; r++) {
            uint8_t stored[t->group ? rb : 1]; /* an interleaved row read back (under 80 KB at 131072 columns) */
            if (t->group)
                x16_stored_blocks(t, w + r0 * rb, (int)(r - r0), 0, nb, stored);
            const uint8_t *row = t->group ? stored : w + r * rb;
            for (int64_t b = 0; b < batch; b++) {
                const void *xb = half ? (const void *)(xh + b * cols) : (const void *)(x + b * cols);
                const float v = dot(row, xb, xs + b * groups, nb);
                y[b * ldy + r] = accumulate ? y[b * ldy + r] + v : v;
            }
        }
    }
}

#endif
