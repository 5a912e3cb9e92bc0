/* GGML's block-quantized weight rows (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K; Q5_0 and Q5_1 in blocks_q5.h) dotted with
 * int8-quantized activations.
 *
 * Included by decode.c (one translation unit). A weight row is its blocks as GGUF stores them; gen_cli/quant/blocks.py
 * and the `gguf` package's dequantize are the reference layouts. The activation row is quantized once per matrix
 * the way the format wants it: int8 blocks of 32 with an fp32 scale and the block's integer sum (Q8_0/Q4_0/Q4_1),
 * or int8 super-blocks of 256 with one scale and int16 sums per 16 (the k-quants: their 4/6-bit sub-block scales
 * are integers, so a whole super-block sums in int32 before one float multiply).
 *
 * Integer dot products: AVX-512 VNNI (dpbusd: unsigned 8-bit weights times signed 8-bit activations, so a signed
 * Q8_0 weight lends its sign to the activation), AVX2 (maddubs), and portable loops; the tests check all three
 * against dequantize-then-fp32. Activations are clamped to [-127, 127], so maddubs' int16 pair sums never saturate
 * (at most 2 * 128 * 127) and a negated activation always fits.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX512VBMI__)
#define GEN_BLOCKS_512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define GEN_BLOCKS_256 1
#endif

/* Matrix.type: the first three are the step's own (see decode.c); the rest are GGML block formats. */
enum { T_F32 = 0, T_BF16 = 1, T_I8 = 2, T_Q8_0 = 3, T_Q4_0 = 4, T_Q4_1 = 5, T_Q4_K = 6, T_Q6_K = 7, T_Q5_0 = 8, T_Q5_1 = 9, T_COUNT };

static const int64_t BLOCK_ELEMS[T_COUNT] = {1, 1, 1, 32, 32, 32, 256, 256, 32, 32};
static const int64_t BLOCK_BYTES[T_COUNT] = {4, 2, 1, 34, 18, 20, 144, 210, 22, 24};

static inline int is_block_type(int64_t t) { return t >= T_Q8_0 && t < T_COUNT; }
static inline int64_t block_row_bytes(int64_t t, int64_t cols) { return cols / BLOCK_ELEMS[t] * BLOCK_BYTES[t]; }

/* IEEE half to float (the block scales). */
static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
#ifdef __F16C__
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

/* x (n floats) -> act, in groups of `group` (32 or 256) with sums per `sum_group` (32 or 16): |error| <= d / 2. */
static void quantize_act(const float *restrict x, int64_t n, int64_t group, int64_t sum_group, Act a) {
    for (int64_t g = 0; g < n / group; g++) {
        const float *xg = x + g * group;
        float amax = 0.f;
#pragma omp simd reduction(max : amax)
        for (int64_t i = 0; i < group; i++) amax = fmaxf(amax, fabsf(xg[i]));
        float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        a.d[g] = d;
        int8_t *q = a.q + g * group;
#pragma omp simd
        for (int64_t i = 0; i < group; i++) q[i] = (int8_t)lrintf(xg[i] * id); /* |x * id| <= 127 */
    }
    for (int64_t j = 0; j < n / sum_group; j++) {
        int32_t s = 0;
        for (int64_t i = 0; i < sum_group; i++) s += a.q[j * sum_group + i];
        a.s[j] = (int16_t)s;
    }
}

static void quantize_for(int64_t type, const float *x, int64_t n, Act a) {
    if (type == T_Q4_K || type == T_Q6_K)
        quantize_act(x, n, 256, 16, a);
    else
        quantize_act(x, n, 32, 32, a);
}

/* ---- Q4_K's packed 6-bit scales and mins ---------------------------------------------------------------- */

static inline void q4k_scales(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (uint8_t)((s[j + 8] & 0xF) | ((s[j] >> 6) << 4));
        mn[j + 4] = (uint8_t)((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
}

/* ---- dot products: one weight row (nb blocks) . one activation row --------------------------------------- */

/* Σ w[i] x[i] over 32 signed bytes (an odd block's tail). Kept scalar: GCC 12 vectorizes this loop into vpdpbusd,
 * which reads w as unsigned, so every negative weight summed wrong (found by a 96-column Q8_0 matrix). */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-vectorize")))
#endif
static int32_t dot32_i8(const int8_t *w, const int8_t *x) {
    int32_t s = 0;
    for (int i = 0; i < 32; i++) s += (int32_t)w[i] * (int32_t)x[i];
    return s;
}

static float dot_q8_0(const uint8_t *restrict w, Act a, int64_t nb) {
    int64_t b = 0;
    float total = 0.f;
#if defined(GEN_BLOCKS_512)
    __m512 acc = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    for (; b + 2 <= nb; b += 2) { /* two blocks per 64-byte vector */
        const uint8_t *p = w + b * 34;
        __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p + 2))),
                                        _mm256_loadu_si256((const __m256i *)(p + 36)), 1);
        __m512i xv = _mm512_loadu_si512(a.q + b * 32);
        xv = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(wv), zero, xv); /* x * sign(w) */
        __m512i dot = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(wv), xv);
        __m512 sc = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(f16(p) * a.d[b]), _mm512_set1_ps(f16(p + 34) * a.d[b + 1]));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc);
    }
    total = _mm512_reduce_add_ps(acc);
#elif defined(GEN_BLOCKS_256)
    __m256 acc = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (; b < nb; b++) {
        const uint8_t *p = w + b * 34;
        __m256i wv = _mm256_loadu_si256((const __m256i *)(p + 2)), xv = _mm256_loadu_si256((const __m256i *)(a.q + b * 32));
        __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)), ones);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(f16(p) * a.d[b]), acc);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    total = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
    for (; b < nb; b++) {
        const uint8_t *p = w + b * 34;
        total += f16(p) * a.d[b] * (float)dot32_i8((const int8_t *)(p + 2), a.q + b * 32);
    }
    return total;
}

#ifdef GEN_BLOCKS_256
static inline float hsum256(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
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

/* Q4_0 (x = (q - 8) d) and Q4_1 (x = q d + m): the same nibbles; `off` is 8 for Q4_0's offset, 0 for Q4_1. */
static float dot_q4(const uint8_t *restrict w, Act a, int64_t nb, int q41) {
    const int64_t bs = q41 ? 20 : 18, qo = q41 ? 4 : 2;
    int64_t b = 0;
    float total = 0.f, mins = 0.f;
#if defined(GEN_BLOCKS_512)
    __m512 acc = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512(), eight = _mm512_set1_epi8(8);
    for (; b + 2 <= nb; b += 2) {
        const uint8_t *p = w + b * bs;
        __m512i xv = _mm512_loadu_si512(a.q + b * 32);
        __m512i dot = _mm512_dpbusd_epi32(zero, nibbles64(p + qo, bs), xv);
        if (!q41) dot = _mm512_sub_epi32(dot, _mm512_dpbusd_epi32(zero, eight, xv)); /* sum (q - 8) x */
        __m512 sc = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(f16(p) * a.d[b]), _mm512_set1_ps(f16(p + bs) * a.d[b + 1]));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc);
        if (q41) mins += f16(p + 2) * a.d[b] * a.s[b] + f16(p + bs + 2) * a.d[b + 1] * a.s[b + 1];
    }
    total = _mm512_reduce_add_ps(acc);
#elif defined(GEN_BLOCKS_256)
    __m256 acc = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1), eight = _mm256_set1_epi8(8);
    for (; b < nb; b++) {
        const uint8_t *p = w + b * bs;
        __m256i xv = _mm256_loadu_si256((const __m256i *)(a.q + b * 32));
        __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles32(p + qo), xv), ones);
        if (!q41) dot = _mm256_sub_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(eight, xv), ones));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(f16(p) * a.d[b]), acc);
        if (q41) mins += f16(p + 2) * a.d[b] * a.s[b];
    }
    total = hsum256(acc);
#endif
    for (; b < nb; b++) {
        const uint8_t *p = w + b * bs;
        const int8_t *x = a.q + b * 32;
        int32_t s = 0;
        for (int i = 0; i < 16; i++) s += (p[qo + i] & 0xF) * x[i] + (p[qo + i] >> 4) * x[i + 16];
        if (!q41) s -= 8 * a.s[b];
        total += f16(p) * a.d[b] * (float)s;
        if (q41) mins += f16(p + 2) * a.d[b] * a.s[b];
    }
    return total + mins;
}

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
        uint32_t u[4]; /* the 12 scale bytes unpacked 4 at a time: u[0..1] the 8 scales, u[2..3] the 8 mins */
        memcpy(u, p + 4, 12);
        u[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
        const uint32_t m_lo = u[1] & 0x3f3f3f3fu;
        u[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
        u[2] = m_lo;
        u[0] &= 0x3f3f3f3fu;
        const __m128i sc16 = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)u));
        const __m128i mn16 = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(u + 2)));
        const __m128i bs = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)(a.s + b * 16)),
                                          _mm_loadu_si128((const __m128i *)(a.s + b * 16 + 8))); /* sums per 32 */
        accm = _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_madd_epi16(mn16, bs)), _mm_set1_ps(a.d[b] * f16(p + 2)), accm);
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
        const int16_t *bs = a.s + b * 16;
        uint8_t sc[8], mn[8];
        q4k_scales(p + 4, sc, mn);
        int32_t isum = 0, msum = 0;
        for (int j = 0; j < 8; j++) msum += mn[j] * (bs[2 * j] + bs[2 * j + 1]);
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
        isum = _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1)));
#else
        for (int c = 0; c < 4; c++) {
            int32_t lo = 0, hi = 0;
            for (int i = 0; i < 32; i++) {
                lo += (qs[32 * c + i] & 0xF) * x[64 * c + i];
                hi += (qs[32 * c + i] >> 4) * x[64 * c + 32 + i];
            }
            isum += sc[2 * c] * lo + sc[2 * c + 1] * hi;
        }
#endif
        total += a.d[b] * (f16(p) * (float)isum - f16(p + 2) * (float)msum);
    }
    return total;
}

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
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * 210, *ql = p, *qh = p + 128;
        const int8_t *sc = (const int8_t *)(p + 192), *x = a.q + b * 256;
        const int16_t *bs = a.s + b * 16;
        int32_t isum = 0, off = 0;
        for (int g = 0; g < 16; g++) off += sc[g] * bs[g];
#if defined(GEN_BLOCKS_256)
        __m256i acc = _mm256_setzero_si256();
        const __m256i m4 = _mm256_set1_epi8(0xF), m2 = _mm256_set1_epi8(3);
        for (int h = 0; h < 2; h++) {
            __m256i l0 = _mm256_loadu_si256((const __m256i *)(ql + 64 * h)), l1 = _mm256_loadu_si256((const __m256i *)(ql + 64 * h + 32));
            __m256i hb = _mm256_loadu_si256((const __m256i *)(qh + 32 * h));
            __m256i v[4] = {
                _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m2), 4)),
                _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m2), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m2), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m2), 4)),
            };
            for (int k = 0; k < 4; k++) {
                int g = 8 * h + 2 * k;
                __m256i pairs = _mm256_maddubs_epi16(v[k], _mm256_loadu_si256((const __m256i *)(x + 128 * h + 32 * k)));
                __m256i scv = _mm256_set_m128i(_mm_set1_epi16(sc[g + 1]), _mm_set1_epi16(sc[g]));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, scv));
            }
        }
        __m128i hs = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        hs = _mm_add_epi32(hs, _mm_shuffle_epi32(hs, 0x4E));
        isum = _mm_cvtsi128_si32(_mm_add_epi32(hs, _mm_shuffle_epi32(hs, 0xB1)));
#else
        for (int h = 0; h < 2; h++) {
            for (int e = 0; e < 128; e++) {
                int l = e & 31, quarter = e >> 5;
                uint8_t lo = ql[64 * h + l + 32 * (quarter & 1)];
                int q = (quarter < 2 ? lo & 0xF : lo >> 4) | (((qh[32 * h + l] >> (2 * quarter)) & 3) << 4);
                isum += sc[(128 * h + e) / 16] * q * x[128 * h + e];
            }
        }
#endif
        total += a.d[b] * f16(p + 208) * (float)(isum - 32 * off);
    }
    return total;
}

#include "blocks_q5.h"

/* Row r of a block matrix dotted with an activation row quantized by quantize_for(type). */
static inline float dot_block(int64_t type, const uint8_t *row, Act a, int64_t cols) {
    switch (type) {
    case T_Q5_0: return dot_q5(row, a, cols / 32, 0);
    case T_Q5_1: return dot_q5(row, a, cols / 32, 1);
    case T_Q8_0: return dot_q8_0(row, a, cols / 32);
    case T_Q4_0: return dot_q4(row, a, cols / 32, 0);
    case T_Q4_1: return dot_q4(row, a, cols / 32, 1);
    case T_Q4_K: return dot_q4_k(row, a, cols / 256);
    default: return dot_q6_k(row, a, cols / 256);
    }
}

/* Four rows at once (rows `stride` bytes apart): out[k] = row k . a. */
#ifdef GEN_BLOCKS_512
/* Q4_0/Q4_1, four rows by four blocks: one byte permute (VBMI) pulls the 4 x 16 nibble bytes out of the 72 (80)
 * bytes of four blocks, another their fp16 scales; low nibbles (elements 0..15 of each block) and high ones
 * (16..31) go to two dpbusd into one accumulator with 4 lanes per block, against the activation permuted the
 * same way once for all four rows. A byte-exact gather beats per-block loads on cores that split 512-bit ops. */
static inline __attribute__((always_inline)) void rows_q4(int nrows, int64_t type, const uint8_t *restrict w, int64_t stride, Act a, int64_t nb, float out[4]) {
    const int q41 = type == T_Q4_1;
    const int64_t bs = q41 ? 20 : 18, qo = q41 ? 4 : 2;
    const __mmask64 tail = ((__mmask64)1 << (4 * bs - 64)) - 1; /* bytes of the 4 blocks past the first 64 */
    uint8_t iq[64], id[64], im[64], ix[64], iy[64];
    for (int j = 0; j < 64; j++) {
        int k = j / 16, i = j % 16, h = j / 2, kh = h / 4;
        iq[j] = (uint8_t)(k * bs + qo + i);                   /* nibble bytes of block k */
        id[j] = (uint8_t)(kh * bs + (j & 1));                 /* d of block h / 4 in half h (low 32 bytes used) */
        im[j] = (uint8_t)(kh * bs + 2 + (j & 1));             /* Q4_1's m likewise */
        ix[j] = (uint8_t)(k * 32 + i), iy[j] = (uint8_t)(k * 32 + 16 + i); /* activation elements 0..15 / 16..31 */
    }
    const __m512i pq = _mm512_loadu_si512(iq), pd = _mm512_loadu_si512(id), pm = _mm512_loadu_si512(im);
    const __m512i px = _mm512_loadu_si512(ix), py = _mm512_loadu_si512(iy), m4 = _mm512_set1_epi8(0xF);
    const __m512i rep4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0), zero = _mm512_setzero_si512();
    __m512 acc[4], mins[4];
    for (int k = 0; k < 4; k++) acc[k] = mins[k] = _mm512_setzero_ps(); /* nrows of them used */
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        const __m512i x0 = _mm512_loadu_si512(a.q + b * 32), x1 = _mm512_loadu_si512(a.q + b * 32 + 64);
        const __m512i xa = _mm512_permutex2var_epi8(x0, px, x1), xb = _mm512_permutex2var_epi8(x0, py, x1);
        const __m512 xd = _mm512_permutexvar_ps(rep4, _mm512_castps128_ps512(_mm_loadu_ps(a.d + b)));
        /* the sum of x over a block, a quarter on each of its 4 lanes (Q4_0: 8 sum x, so 2 sum x per lane) */
        const __m512i xs = _mm512_permutexvar_epi32(rep4, _mm512_castsi128_si512(_mm_cvtepi16_epi32(_mm_loadl_epi64((const __m128i *)(a.s + b)))));
        const __m512 xm = _mm512_mul_ps(_mm512_cvtepi32_ps(xs), _mm512_mul_ps(xd, _mm512_set1_ps(0.25f)));
        const __m512i x8 = _mm512_slli_epi32(xs, 1);
        for (int k = 0; k < nrows; k++) {
            const uint8_t *p = w + k * stride + b * bs;
            const __m512i lo = _mm512_loadu_si512(p), hi = _mm512_maskz_loadu_epi8(tail, p + 64);
            const __m512i q = _mm512_permutex2var_epi8(lo, pq, hi);
            __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, _mm512_and_si512(q, m4), xa),
                                              _mm512_and_si512(_mm512_srli_epi16(q, 4), m4), xb);
            if (!q41) dot = _mm512_sub_epi32(dot, x8);
            const __m512 dw = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi8(lo, pd, hi)));
            acc[k] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), dw), xd, acc[k]);
            if (q41) mins[k] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi8(lo, pm, hi))), xm, mins[k]);
        }
    }
    for (int k = 0; k < nrows; k++) {
        out[k] = _mm512_reduce_add_ps(_mm512_add_ps(acc[k], mins[k]));
        if (b < nb) {
            Act rest = {a.q + b * 32, a.d + b, a.s + b};
            out[k] += dot_q4(w + k * stride + b * bs, rest, nb - b, q41);
        }
    }
}

/* Row by row: each row streams sequentially from memory, which the hardware prefetches best (measured: a
 * Q4_K/Q4_0 model decoded faster through sequential rows than through four interleaved ones). */
static void dot4_q4(int64_t type, const uint8_t *restrict w, int64_t stride, Act a, int64_t nb, float out[4]) {
    for (int k = 0; k < 4; k++) rows_q4(1, type, w + k * stride, stride, a, nb, out + k);
}
#endif

/* `cached`: the rows sit in cache (a prompt's row tile, reused across tokens), so Q4_0/Q4_1 interleave all four
 * rows, sharing the activation's loads; streamed from memory they go one after another. */
static void dot4_block(int64_t type, const uint8_t *w, int64_t stride, Act a, int64_t cols, float out[4], int cached) {
#ifdef GEN_BLOCKS_512
    /* Only the 4-bit formats: streamed from memory, Q8_0 and the k-quants run faster row by row (measured:
     * four interleaved Q8_0 rows read 10 GB/s on one core, one row at a time 27). */
    if (type == T_Q4_0 || type == T_Q4_1) {
        if (cached)
            rows_q4(4, type, w, stride, a, cols / 32, out);
        else
            dot4_q4(type, w, stride, a, cols / 32, out);
        return;
    }
    if (cached && (type == T_Q5_0 || type == T_Q5_1)) { /* streamed, row by row (dot_block) as Q4 */
        rows_q5(4, type == T_Q5_1, w, stride, a, cols / 32, out);
        return;
    }
#else
    (void)cached;
#endif
    for (int k = 0; k < 4; k++) out[k] = dot_block(type, w + k * stride, a, cols);
}

/* One row of blocks -> fp32 (the embedding lookup of a block-quantized table). */
static void dequantize_row(int64_t type, const uint8_t *p, int64_t cols, float *out) {
    const int64_t nb = cols / BLOCK_ELEMS[type], bs = BLOCK_BYTES[type];
    for (int64_t b = 0; b < nb; b++, p += bs) {
        float *y = out + b * BLOCK_ELEMS[type];
        if (type == T_Q8_0) {
            for (int i = 0; i < 32; i++) y[i] = f16(p) * (float)(int8_t)p[2 + i];
        } else if (type == T_Q4_0 || type == T_Q4_1) {
            const int q41 = type == T_Q4_1;
            float d = f16(p), m = q41 ? f16(p + 2) : -8.f * d;
            for (int i = 0; i < 16; i++) {
                y[i] = (float)(p[2 + 2 * q41 + i] & 0xF) * d + m;
                y[i + 16] = (float)(p[2 + 2 * q41 + i] >> 4) * d + m;
            }
        } else if (type == T_Q5_0 || type == T_Q5_1) {
            const int q51 = type == T_Q5_1, ho = 2 + 2 * q51;
            float d = f16(p), m = q51 ? f16(p + 2) : 0.f;
            const int off = q51 ? 0 : 16;
            uint32_t h;
            memcpy(&h, p + ho, 4);
            for (int i = 0; i < 16; i++) { /* (q - 16) d or q d + m: the gguf package's order */
                y[i] = (float)((int)((p[ho + 4 + i] & 0xF) | ((h >> i) & 1) << 4) - off) * d + m;
                y[i + 16] = (float)((int)((p[ho + 4 + i] >> 4) | ((h >> (i + 16)) & 1) << 4) - off) * d + m;
            }
        } else if (type == T_Q4_K) {
            uint8_t sc[8], mn[8];
            q4k_scales(p + 4, sc, mn);
            float d = f16(p), dmin = f16(p + 2);
            for (int c = 0; c < 4; c++)
                for (int i = 0; i < 32; i++) {
                    y[64 * c + i] = d * sc[2 * c] * (float)(p[16 + 32 * c + i] & 0xF) - dmin * mn[2 * c];
                    y[64 * c + 32 + i] = d * sc[2 * c + 1] * (float)(p[16 + 32 * c + i] >> 4) - dmin * mn[2 * c + 1];
                }
        } else {
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
}
