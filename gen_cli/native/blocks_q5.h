/* Q5_0 and Q5_1 weight rows dotted with int8 activation blocks of 32 (included by blocks.h, after its helpers).
 *
 * A block of 32: fp16 d (Q5_1: then fp16 m), 4 bytes whose bit i is bit 4 of element i, 16 bytes of low nibbles
 * (elements 0..15 low, 16..31 high, as Q4_0). Q5_0: x = (q - 16) d; Q5_1: x = q d + m. The 5-bit codes q are
 * unsigned, so they go straight into dpbusd / maddubs as the unsigned operand; Q5_0's offset is 16 times the
 * activation block's integer sum (exact, in int32), Q5_1's m times that sum (in float, as Q4_1's).
 */

/* Σ q[i] x[i] over one block, q the unsigned 5-bit codes. Kept out of the vectorizer like dot32_i8 (GCC 12 turns
 * such byte loops into vpdpbusd; here the codes are unsigned, but the tail must not depend on that). */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-vectorize")))
#endif
static int32_t dot32_q5(const uint8_t *qh, const uint8_t *qs, const int8_t *x) {
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


/* One row of nb Q5_0 (q51 = 0) or Q5_1 blocks, two at a time (AVX-512), one (AVX2), then the portable tail. */
static float dot_q5_pairs(const uint8_t *restrict w, Act a, int64_t nb, int q51) {
    const int64_t bs = q51 ? 24 : 22, ho = q51 ? 4 : 2, qo = ho + 4;
    int64_t b = 0;
    float total = 0.f, mins = 0.f;
#if defined(GEN_BLOCKS_512)
    __m512 acc = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512(), sixteen = _mm512_set1_epi8(16);
    for (; b + 2 <= nb; b += 2) {
        const uint8_t *p = w + b * bs;
        uint32_t h0, h1;
        memcpy(&h0, p + ho, 4);
        memcpy(&h1, p + bs + ho, 4);
        __m512i q = nibbles64(p + qo, bs); /* elements 0..31 of block b, then of b + 1: the bit order of h1:h0 */
        q = _mm512_mask_add_epi8(q, (__mmask64)h0 | (__mmask64)h1 << 32, q, sixteen);
        __m512i dot = _mm512_dpbusd_epi32(zero, q, _mm512_loadu_si512(a.q + b * 32));
        if (!q51) /* 16 times a block's sum, spread over its 8 lanes */
            dot = _mm512_sub_epi32(dot, _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(2 * a.s[b]), _mm512_set1_epi32(2 * a.s[b + 1])));
        __m512 sc = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(f16(p) * a.d[b]), _mm512_set1_ps(f16(p + bs) * a.d[b + 1]));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc);
        if (q51) mins += f16(p + 2) * a.d[b] * a.s[b] + f16(p + bs + 2) * a.d[b + 1] * a.s[b + 1];
    }
    total = _mm512_reduce_add_ps(acc);
#elif defined(GEN_BLOCKS_256)
    __m256 acc = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (; b < nb; b++) {
        const uint8_t *p = w + b * bs;
        __m256i q = _mm256_or_si256(nibbles32(p + qo), fifth_bits32(p + ho));
        __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)(a.q + b * 32))), ones);
        if (!q51) dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(2 * a.s[b])); /* 16 sum x over 8 lanes */
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(f16(p) * a.d[b]), acc);
        if (q51) mins += f16(p + 2) * a.d[b] * a.s[b];
    }
    total = hsum256(acc);
#endif
    for (; b < nb; b++) {
        const uint8_t *p = w + b * bs;
        int32_t s = dot32_q5(p + ho, p + qo, a.q + b * 32);
        if (!q51) s -= 16 * a.s[b];
        total += f16(p) * a.d[b] * (float)s;
        if (q51) mins += f16(p + 2) * a.d[b] * a.s[b];
    }
    return total + mins;
}

#ifdef GEN_BLOCKS_512
/* Q5, four rows by four blocks, as rows_q4: one byte permute gathers the 4 x 16 nibble bytes of four blocks, one
 * their fp16 scales (and Q5_1's m), one their 5th-bit words into the two 64-bit lanes of each block; a multishift
 * (VBMI) then rotates bit i of the word to bit 4 of byte i, for elements 0..15 and for 16..31, all in vector
 * registers (moving the bits through general registers into masks ran the four-row pass 2.5x slower). */
static inline __attribute__((always_inline)) void rows_q5(int nrows, int q51, const uint8_t *restrict w, int64_t stride, Act a, int64_t nb, float out[4]) {
    const int64_t bs = q51 ? 24 : 22, ho = q51 ? 4 : 2, qo = ho + 4;
    const __mmask64 tail = ((__mmask64)1 << (4 * bs - 64)) - 1; /* bytes of the 4 blocks past the first 64 */
    uint8_t iq[64], id[64], im[64], ih[64], ix[64], iy[64], sa[64], sb[64];
    for (int j = 0; j < 64; j++) {
        int k = j / 16, i = j % 16, h = j / 2, kh = h / 4;
        iq[j] = (uint8_t)(k * bs + qo + i);       /* nibble bytes of block k */
        id[j] = (uint8_t)(kh * bs + (j & 1));     /* d of block h / 4 in half h (low 32 bytes used) */
        im[j] = (uint8_t)(kh * bs + 2 + (j & 1)); /* Q5_1's m likewise */
        ih[j] = (uint8_t)(k * bs + ho + (j % 8) % 4);      /* block k's 5th-bit word in both its 64-bit lanes */
        sa[j] = (uint8_t)((i - 4) & 63), sb[j] = (uint8_t)(i + 12); /* rotate bit i (i + 16) to bit 4 */
        ix[j] = (uint8_t)(k * 32 + i), iy[j] = (uint8_t)(k * 32 + 16 + i); /* activation elements 0..15 / 16..31 */
    }
    const __m512i pq = _mm512_loadu_si512(iq), pd = _mm512_loadu_si512(id), pm = _mm512_loadu_si512(im);
    const __m512i ph = _mm512_loadu_si512(ih), px = _mm512_loadu_si512(ix), py = _mm512_loadu_si512(iy);
    const __m512i m4 = _mm512_set1_epi8(0xF), sixteen = _mm512_set1_epi8(16);
    const __m512i ra = _mm512_loadu_si512(sa), rb = _mm512_loadu_si512(sb);
    const __m512i rep4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0), zero = _mm512_setzero_si512();
    __m512 acc[4], mins[4];
    for (int k = 0; k < 4; k++) acc[k] = mins[k] = _mm512_setzero_ps(); /* nrows of them used */
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        const __m512i x0 = _mm512_loadu_si512(a.q + b * 32), x1 = _mm512_loadu_si512(a.q + b * 32 + 64);
        const __m512i xa = _mm512_permutex2var_epi8(x0, px, x1), xb = _mm512_permutex2var_epi8(x0, py, x1);
        const __m512 xd = _mm512_permutexvar_ps(rep4, _mm512_castps128_ps512(_mm_loadu_ps(a.d + b)));
        /* the sum of x over a block, a quarter on each of its 4 lanes (Q5_0: 16 sum x, so 4 sum x per lane) */
        const __m512i xs = _mm512_permutexvar_epi32(rep4, _mm512_castsi128_si512(_mm_cvtepi16_epi32(_mm_loadl_epi64((const __m128i *)(a.s + b)))));
        const __m512 xm = _mm512_mul_ps(_mm512_cvtepi32_ps(xs), _mm512_mul_ps(xd, _mm512_set1_ps(0.25f)));
        const __m512i x16 = _mm512_slli_epi32(xs, 2);
        for (int k = 0; k < nrows; k++) {
            const uint8_t *p = w + k * stride + b * bs;
            const __m512i lo = _mm512_loadu_si512(p), hi = _mm512_maskz_loadu_epi8(tail, p + 64);
            const __m512i q = _mm512_permutex2var_epi8(lo, pq, hi);
            const __m512i bits = _mm512_permutex2var_epi8(lo, ph, hi);
            const __m512i qa = _mm512_ternarylogic_epi32(_mm512_and_si512(q, m4), _mm512_multishift_epi64_epi8(ra, bits), sixteen, 0xF8);
            const __m512i qb = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(q, 4), m4), _mm512_multishift_epi64_epi8(rb, bits), sixteen, 0xF8);
            __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, qa, xa), qb, xb);
            if (!q51) dot = _mm512_sub_epi32(dot, x16);
            const __m512 dw = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi8(lo, pd, hi)));
            acc[k] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), dw), xd, acc[k]);
            if (q51) mins[k] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi8(lo, pm, hi))), xm, mins[k]);
        }
    }
    for (int k = 0; k < nrows; k++) {
        out[k] = _mm512_reduce_add_ps(_mm512_add_ps(acc[k], mins[k]));
        if (b < nb) { /* the last 1..3 blocks */
            Act rest = {a.q + b * 32, a.d + b, a.s + b};
            out[k] += dot_q5_pairs(w + k * stride + b * bs, rest, nb - b, q51);
        }
    }
}
#endif

/* One row of nb Q5_0 (q51 = 0) or Q5_1 blocks. */
static float dot_q5(const uint8_t *restrict w, Act a, int64_t nb, int q51) {
#ifdef GEN_BLOCKS_512
    float out[4];
    rows_q5(1, q51, w, 0, a, nb, out);
    return out[0];
#else
    return dot_q5_pairs(w, a, nb, q51);
#endif
}
