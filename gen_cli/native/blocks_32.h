/* GGML's 32-element block formats dotted with int8 activation blocks of 32 (blocks_common.h), and dequantized.
 *
 * Q8_0: fp16 d, 32 int8 q; x = q d.
 * Q4_0 / Q4_1: fp16 d (Q4_1: then fp16 m), 16 bytes of nibbles (elements 0..15 low, 16..31 high); x = (q - 8) d
 * or q d + m.
 * Q5_0 / Q5_1: fp16 d (Q5_1: then fp16 m), 4 bytes whose bit i is bit 4 of element i, 16 bytes of nibbles as Q4;
 * x = (q - 16) d or q d + m.
 * The 4- and 5-bit codes q are unsigned, so they go straight into dpbusd / maddubs as the unsigned operand; the
 * offset of Q4_0 / Q5_0 is 8 / 16 times the activation block's integer sum (exact, in int32), the m of Q4_1 / Q5_1
 * times that sum (in float). The Q4 and Q5 passes are one code parameterised by `bits` (4 or 5) and `min` (has m),
 * constants in every inlined copy.
 */
#ifndef GEN_BLOCKS_32_H
#define GEN_BLOCKS_32_H

#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "blocks_common.h"
#include "features.h"

/* ---- Q8_0 ---------------------------------------------------------------------------------------------------- */

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
    total = hsum256(acc);
#endif
    for (; b < nb; b++) {
        const uint8_t *p = w + b * 34;
        total += f16(p) * a.d[b] * (float)dot32_i8((const int8_t *)(p + 2), a.q + b * 32);
    }
    return total;
}

static void dequantize_q8_0(const uint8_t *restrict p, int64_t cols, float *restrict out) {
    for (int64_t b = 0; b < cols / 32; b++, p += 34)
        for (int i = 0; i < 32; i++) out[32 * b + i] = f16(p) * (float)(int8_t)p[2 + i];
}

/* ---- Q4_0, Q4_1, Q5_0, Q5_1 -------------------------------------------------------------------------------- */

/* Σ q[i] x[i] over one Q4 block, q the unsigned nibbles. */
static inline int32_t dot32_q4(const uint8_t *qs, const int8_t *x) {
    int32_t s = 0;
    for (int i = 0; i < 16; i++) s += (qs[i] & 0xF) * x[i] + (qs[i] >> 4) * x[i + 16];
    return s;
}

/* Σ q[i] x[i] over one Q5 block, q the unsigned 5-bit codes. Kept out of the vectorizer like dot32_i8 (GCC 12 turns
 * such byte loops into vpdpbusd; here the codes are unsigned, but the tail must not depend on that). */
GEN_NO_VECTORIZE static int32_t dot32_q5(const uint8_t *qh, const uint8_t *qs, const int8_t *x) {
    uint32_t h;
    memcpy(&h, qh, 4);
    int32_t s = 0;
    for (int i = 0; i < 16; i++) {
        s += (int32_t)((qs[i] & 0xF) | ((h >> i) & 1) << 4) * x[i];
        s += (int32_t)((qs[i] >> 4) | ((h >> (i + 16)) & 1) << 4) * x[i + 16];
    }
    return s;
}

#ifdef GEN_BLOCKS_256
/* 4 bytes of bits -> 32 bytes, byte i = 16 where bit i is set, else 0. */
static inline __m256i fifth_bits32(const uint8_t *p) {
    uint32_t h;
    memcpy(&h, p, 4);
    const __m256i spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)h), spread); /* byte i holds source byte i / 8 */
    v = _mm256_or_si256(v, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));    /* all ones where bit i % 8 is set */
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(16));
}
#endif

/* A Q4/Q5 block's layout: where its 5th-bit word (Q5) and its nibbles start, and its size in bytes. */
#define Q45_HO(min) ((min) ? 4 : 2)
#define Q45_QO(bits, min) (Q45_HO(min) + ((bits) == 5 ? 4 : 0))
#define Q45_BYTES(bits, min) (Q45_QO(bits, min) + 16)

/* One row of nb blocks, two at a time (AVX-512), one (AVX2), then the portable tail. */
GEN_ALWAYS_INLINE float dot_q45_pairs(const uint8_t *restrict w, Act a, int64_t nb, const int bits, const int min) {
    const int64_t ho = Q45_HO(min), qo = Q45_QO(bits, min), bs = Q45_BYTES(bits, min);
    int64_t b = 0;
    float total = 0.f, mins = 0.f;
#if defined(GEN_BLOCKS_512)
    __m512 acc = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512(), eight = _mm512_set1_epi8(8), sixteen = _mm512_set1_epi8(16);
    for (; b + 2 <= nb; b += 2) {
        const uint8_t *p = w + b * bs;
        const __m512i xv = _mm512_loadu_si512(a.q + b * 32);
        __m512i q = nibbles64(p + qo, bs); /* elements 0..31 of block b, then of b + 1: the bit order of h1:h0 */
        if (bits == 5) {
            uint32_t h0, h1;
            memcpy(&h0, p + ho, 4);
            memcpy(&h1, p + bs + ho, 4);
            q = _mm512_mask_add_epi8(q, (__mmask64)h0 | (__mmask64)h1 << 32, q, sixteen);
        }
        __m512i dot = _mm512_dpbusd_epi32(zero, q, xv);
        if (!min && bits == 4) dot = _mm512_sub_epi32(dot, _mm512_dpbusd_epi32(zero, eight, xv)); /* sum (q - 8) x */
        if (!min && bits == 5) /* 16 times a block's sum, spread over its 8 lanes */
            dot = _mm512_sub_epi32(dot, _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(2 * a.s[b]), _mm512_set1_epi32(2 * a.s[b + 1])));
        __m512 sc = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(f16(p) * a.d[b]), _mm512_set1_ps(f16(p + bs) * a.d[b + 1]));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc);
        if (min) mins += f16(p + 2) * a.d[b] * a.s[b] + f16(p + bs + 2) * a.d[b + 1] * a.s[b + 1];
    }
    total = _mm512_reduce_add_ps(acc);
#elif defined(GEN_BLOCKS_256)
    __m256 acc = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1), eight = _mm256_set1_epi8(8);
    for (; b < nb; b++) {
        const uint8_t *p = w + b * bs;
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(a.q + b * 32));
        __m256i q = nibbles32(p + qo);
        if (bits == 5) q = _mm256_or_si256(q, fifth_bits32(p + ho));
        __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones);
        if (!min && bits == 4) dot = _mm256_sub_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(eight, xv), ones));
        if (!min && bits == 5) dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(2 * a.s[b])); /* 16 sum x over 8 lanes */
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(f16(p) * a.d[b]), acc);
        if (min) mins += f16(p + 2) * a.d[b] * a.s[b];
    }
    total = hsum256(acc);
#endif
    for (; b < nb; b++) {
        const uint8_t *p = w + b * bs;
        int32_t s = bits == 5 ? dot32_q5(p + ho, p + qo, a.q + b * 32) : dot32_q4(p + qo, a.q + b * 32);
        if (!min) s -= (bits == 5 ? 16 : 8) * a.s[b];
        total += f16(p) * a.d[b] * (float)s;
        if (min) mins += f16(p + 2) * a.d[b] * a.s[b];
    }
    return total + mins;
}

#ifdef GEN_BLOCKS_512
/* Four rows (`stride` bytes apart) by four blocks: one byte permute (VBMI) pulls the 4 x 16 nibble bytes out of the
 * 4 bs bytes of four blocks, another their fp16 scales (and m); low nibbles (elements 0..15 of each block) and high
 * ones (16..31) go to two dpbusd into one accumulator with 4 lanes per block, against the activation permuted the
 * same way once for all the rows. A byte-exact gather beats per-block loads on cores that split 512-bit ops. Q5: one
 * more permute puts each block's 5th-bit word into both 64-bit lanes of its quarter, and a multishift rotates bit i
 * of it to bit 4 of byte i, all in vector registers (moving the bits through general registers into masks ran the
 * four-row pass 2.5x slower). */
GEN_ALWAYS_INLINE void rows_q45(const int nrows, const int bits, const int min, const uint8_t *restrict w,
                                int64_t stride, Act a, int64_t nb, float out[4]) {
    const int64_t ho = Q45_HO(min), qo = Q45_QO(bits, min), bs = Q45_BYTES(bits, min);
    const __mmask64 tail = ((__mmask64)1 << (4 * bs - 64)) - 1; /* bytes of the 4 blocks past the first 64 */
    uint8_t iq[64], id[64], im[64], ix[64], iy[64], ih[64], sa[64], sb[64];
    for (int j = 0; j < 64; j++) {
        int k = j / 16, i = j % 16, h = j / 2, kh = h / 4;
        iq[j] = (uint8_t)(k * bs + qo + i);                                /* nibble bytes of block k */
        id[j] = (uint8_t)(kh * bs + (j & 1));                              /* d of block h / 4 in half h (low 32 bytes used) */
        im[j] = (uint8_t)(kh * bs + 2 + (j & 1));                          /* m likewise */
        ix[j] = (uint8_t)(k * 32 + i), iy[j] = (uint8_t)(k * 32 + 16 + i); /* activation elements 0..15 / 16..31 */
        if (bits == 5) {
            ih[j] = (uint8_t)(k * bs + ho + (j % 8) % 4);                  /* block k's 5th-bit word in both its lanes */
            sa[j] = (uint8_t)((i - 4) & 63), sb[j] = (uint8_t)(i + 12);     /* rotate bit i (i + 16) to bit 4 */
        }
    }
    const __m512i pq = _mm512_loadu_si512(iq), pd = _mm512_loadu_si512(id), pm = _mm512_loadu_si512(im);
    const __m512i px = _mm512_loadu_si512(ix), py = _mm512_loadu_si512(iy), m4 = _mm512_set1_epi8(0xF);
    __m512i ph = _mm512_setzero_si512(), ra = ph, rb = ph;
    if (bits == 5) ph = _mm512_loadu_si512(ih), ra = _mm512_loadu_si512(sa), rb = _mm512_loadu_si512(sb);
    const __m512i sixteen = _mm512_set1_epi8(16);
    const __m512i rep4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0), zero = _mm512_setzero_si512();
    __m512 acc[4], mins[4];
    for (int k = 0; k < 4; k++) acc[k] = mins[k] = _mm512_setzero_ps(); /* nrows of them used */
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        const __m512i x0 = _mm512_loadu_si512(a.q + b * 32), x1 = _mm512_loadu_si512(a.q + b * 32 + 64);
        const __m512i xa = _mm512_permutex2var_epi8(x0, px, x1), xb = _mm512_permutex2var_epi8(x0, py, x1);
        const __m512 xd = _mm512_permutexvar_ps(rep4, _mm512_castps128_ps512(_mm_loadu_ps(a.d + b)));
        /* the sum of x over a block on each of its 4 lanes: the offset (8 or 16 sum x) is a quarter of that per lane */
        const __m512i xs = _mm512_permutexvar_epi32(rep4, _mm512_castsi128_si512(_mm_cvtepi16_epi32(_mm_loadl_epi64((const __m128i *)(a.s + b)))));
        const __m512 xm = _mm512_mul_ps(_mm512_cvtepi32_ps(xs), _mm512_mul_ps(xd, _mm512_set1_ps(0.25f)));
        const __m512i offset = bits == 5 ? _mm512_slli_epi32(xs, 2) : _mm512_slli_epi32(xs, 1);
        for (int k = 0; k < nrows; k++) {
            const uint8_t *p = w + k * stride + b * bs;
            const __m512i lo = _mm512_loadu_si512(p), hi = _mm512_maskz_loadu_epi8(tail, p + 64);
            const __m512i q = _mm512_permutex2var_epi8(lo, pq, hi);
            __m512i qa = _mm512_and_si512(q, m4), qb = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
            if (bits == 5) { /* qa | (rotated bits & 16) */
                const __m512i fifth = _mm512_permutex2var_epi8(lo, ph, hi);
                qa = _mm512_ternarylogic_epi32(qa, _mm512_multishift_epi64_epi8(ra, fifth), sixteen, 0xF8);
                qb = _mm512_ternarylogic_epi32(qb, _mm512_multishift_epi64_epi8(rb, fifth), sixteen, 0xF8);
            }
            __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, qa, xa), qb, xb);
            if (!min) dot = _mm512_sub_epi32(dot, offset);
            const __m512 dw = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi8(lo, pd, hi)));
            acc[k] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), dw), xd, acc[k]);
            if (min) mins[k] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi8(lo, pm, hi))), xm, mins[k]);
        }
    }
    for (int k = 0; k < nrows; k++) {
        out[k] = _mm512_reduce_add_ps(_mm512_add_ps(acc[k], mins[k]));
        if (b < nb) { /* the last 1..3 blocks */
            Act rest = {a.q + b * 32, a.d + b, a.s + b};
            out[k] += dot_q45_pairs(w + k * stride + b * bs, rest, nb - b, bits, min);
        }
    }
}
#endif

/* One row. Q5 takes the four-row pass for one row (its pairs pass spends more on the 5th bits); Q4 its pairs. */
GEN_ALWAYS_INLINE float dot_q45(const uint8_t *restrict w, Act a, int64_t nb, const int bits, const int min) {
#ifdef GEN_BLOCKS_512
    if (bits == 5) {
        float out[4];
        rows_q45(1, bits, min, w, 0, a, nb, out);
        return out[0];
    }
#endif
    return dot_q45_pairs(w, a, nb, bits, min);
}

/* One row of blocks -> fp32, with the gguf package's arithmetic. */
GEN_ALWAYS_INLINE void dequantize_q45(const uint8_t *restrict p, int64_t cols, float *restrict out, const int bits,
                                      const int min) {
    const int64_t ho = Q45_HO(min), qo = Q45_QO(bits, min), bs = Q45_BYTES(bits, min);
    for (int64_t b = 0; b < cols / 32; b++, p += bs) {
        float *y = out + 32 * b, d = f16(p);
        if (bits == 4) { /* q d + m, Q4_0's offset folded into m */
            const float m = min ? f16(p + 2) : -8.f * d;
            for (int i = 0; i < 16; i++) {
                y[i] = (float)(p[qo + i] & 0xF) * d + m;
                y[i + 16] = (float)(p[qo + i] >> 4) * d + m;
            }
            continue;
        }
        const float m = min ? f16(p + 2) : 0.f;
        const int off = min ? 0 : 16;
        uint32_t h;
        memcpy(&h, p + ho, 4);
        for (int i = 0; i < 16; i++) { /* (q - 16) d or q d + m */
            y[i] = (float)((int)((p[qo + i] & 0xF) | ((h >> i) & 1) << 4) - off) * d + m;
            y[i + 16] = (float)((int)((p[qo + i] >> 4) | ((h >> (i + 16)) & 1) << 4) - off) * d + m;
        }
    }
}

/* Each format's entries for the traits table (block_types.h): the shared passes with its constants. Where the
 * four-row pass exists (AVX-512 VBMI), rows streamed from memory go one after another (the hardware prefetches a
 * sequential row best: a Q4_K/Q4_0 model decoded faster that way than through four interleaved rows). Several
 * activation rows at once take blocks_batch.h's kernels instead. */
#ifdef GEN_BLOCKS_512
#define Q45_ROWS(NAME, BITS, MIN)                                                                                      \
    static void dot4_##NAME(const uint8_t *restrict w, int64_t stride, Act a, int64_t nb, float out[4]) {             \
        for (int k = 0; k < 4; k++) rows_q45(1, BITS, MIN, w + k * stride, stride, a, nb, out + k);                   \
    }
#else
#define Q45_ROWS(NAME, BITS, MIN)
#endif
#define Q45_FORMAT(NAME, BITS, MIN)                                                                                    \
    static float dot_##NAME(const uint8_t *restrict w, Act a, int64_t nb) { return dot_q45(w, a, nb, BITS, MIN); }    \
    static void dequantize_##NAME(const uint8_t *restrict p, int64_t cols, float *restrict out) {                     \
        dequantize_q45(p, cols, out, BITS, MIN);                                                                       \
    }                                                                                                                  \
    Q45_ROWS(NAME, BITS, MIN)

Q45_FORMAT(q4_0, 4, 0)
Q45_FORMAT(q4_1, 4, 1)
Q45_FORMAT(q5_0, 5, 0)
Q45_FORMAT(q5_1, 5, 1)

/* ---- a prompt's tile: rows -> fp32 or bf16, 16 lanes at a time -------------------------------------------- */

/* Q8_0, Q4_0 and Q4_1 rows dequantized in vector registers: the scalar dequantize spends ~0.9 ns an element, more
 * than the GEMM's own share at 512 tokens. To f (fp32), or to h (bf16) when f is NULL. */
#ifdef GEN_AVX512_BW
static void tile_q8_0(const uint8_t *restrict p, int64_t cols, float *f, uint16_t *h) {
    for (int64_t o = 0; o < cols; o += 32, p += 34) {
        const __m512 d = _mm512_set1_ps(f16(p));
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 2))));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 18))));
        store16(_mm512_mul_ps(lo, d), f ? f + o : NULL, h ? h + o : NULL);
        store16(_mm512_mul_ps(hi, d), f ? f + o + 16 : NULL, h ? h + o + 16 : NULL);
    }
}

GEN_ALWAYS_INLINE void tile_q4(const uint8_t *restrict p, int64_t cols, float *f, uint16_t *h, const int min) {
    const int64_t bs = Q45_BYTES(4, min), qo = Q45_QO(4, min);
    for (int64_t o = 0; o < cols; o += 32, p += bs) {
        const __m512 d = _mm512_set1_ps(f16(p));
        const __m512 m = min ? _mm512_set1_ps(f16(p + 2)) : _mm512_mul_ps(d, _mm512_set1_ps(-8.f));
        __m128i q = _mm_loadu_si128((const __m128i *)(p + qo)), m4 = _mm_set1_epi8(0xF);
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, m4)));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), m4)));
        store16(_mm512_fmadd_ps(lo, d, m), f ? f + o : NULL, h ? h + o : NULL);
        store16(_mm512_fmadd_ps(hi, d, m), f ? f + o + 16 : NULL, h ? h + o + 16 : NULL);
    }
}

static void tile_q4_0(const uint8_t *restrict p, int64_t cols, float *f, uint16_t *h) { tile_q4(p, cols, f, h, 0); }
static void tile_q4_1(const uint8_t *restrict p, int64_t cols, float *f, uint16_t *h) { tile_q4(p, cols, f, h, 1); }
#endif

#endif
