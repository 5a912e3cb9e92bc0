/* A matrix times a few vectors, y[b] = W x[b] (+ y[b] when accumulate), for every Matrix.type: fp32, bf16, int8
 * rows with a scale each, and GGML blocks (block_types.h). Threads take whole row blocks; each block's rows stay
 * in L1 while every batch row uses them.
 */
#ifndef GEN_MATMUL_H
#define GEN_MATMUL_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "abi.h"
#include "bf16.h"
#include "block_types.h"
#include "blocks_float.h"
#include "features.h"

enum { ROW_BLOCK = 4 };

static float dot_f32(const float *restrict w, const float *restrict x, int64_t n) {
#ifdef GEN_AVX512
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    }
    for (; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, w + i), _mm512_maskz_loadu_ps(k, x + i), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(GEN_AVX2_FMA)
    /* Four chains: one FMA waits 4 cycles for its sum, and two issue a cycle. */
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) s += w[i] * x[i];
    return s;
#else
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += w[i] * x[i];
    return s;
#endif
}

#if defined(GEN_AVX2_FMA) && !defined(GEN_AVX512)
/* Two weight rows (n apart) against J inputs (n apart, J <= 6): out[r * ldo + j] = w_r . x_j, every weight loaded
 * once for all J inputs (12 sums at most: AVX2 has 16 registers). The next two rows are fetched into cache
 * meanwhile: without, a batch of inputs computes and waits for memory in turn (Zen 3, a 2048 x 768 matrix of 4
 * inputs from memory at 13.8 GB/s against 20.8 for one input; with, 18.6). */
GEN_ALWAYS_INLINE void dot_f32_2xj_(const float *restrict w, const float *restrict x, int64_t n, const int J,
                                    float *out, int64_t ldo) {
    __m256 a[2][6];
    for (int j = 0; j < J; j++) a[0][j] = a[1][j] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        if (!(i & 15)) /* a 64-byte line holds 16 floats */
            __builtin_prefetch(w + 2 * n + i), __builtin_prefetch(w + 3 * n + i);
        const __m256 u0 = _mm256_loadu_ps(w + i), u1 = _mm256_loadu_ps(w + n + i);
        for (int j = 0; j < J; j++) {
            const __m256 v = _mm256_loadu_ps(x + j * n + i);
            a[0][j] = _mm256_fmadd_ps(u0, v, a[0][j]), a[1][j] = _mm256_fmadd_ps(u1, v, a[1][j]);
        }
    }
    for (int r = 0; r < 2; r++)
        for (int j = 0; j < J; j++) {
            float s = hsum256(a[r][j]);
            for (int64_t t = i; t < n; t++) s += w[r * n + t] * x[j * n + t];
            out[r * ldo + j] = s;
        }
}

/* dot_f32_2xj_ with J a constant in each call, so the sums stay in registers. */
static void dot_f32_2xj(const float *w, const float *x, int64_t n, int J, float *out, int64_t ldo) {
    switch (J) {
    case 1: dot_f32_2xj_(w, x, n, 1, out, ldo); break;
    case 2: dot_f32_2xj_(w, x, n, 2, out, ldo); break;
    case 3: dot_f32_2xj_(w, x, n, 3, out, ldo); break;
    case 4: dot_f32_2xj_(w, x, n, 4, out, ldo); break;
    case 5: dot_f32_2xj_(w, x, n, 5, out, ldo); break;
    default: dot_f32_2xj_(w, x, n, 6, out, ldo); break;
    }
}

#endif

#ifdef GEN_AVX2_FMA
/* fp32 rows against XT_MIN or more inputs: the inputs transposed, so a vector holds one column of 8 or 16 of them,
 * and each weight is broadcast from its row. The dot tiles (dot_f32_2xj on AVX2, dot_f32_4x4) end in horizontal
 * sums, and AVX2's fits no more sums in its 16 registers: 41-57 GFLOP/s a core there, against 78-95 for these
 * (Zen 3, 1536 x 576, 8 and 32 inputs); with AVX-512 a 135M F32 model's 512-token prompt ran 1.6x the 4 x 4
 * tile (Zen 4, 442-446 -> 714-723 tok/s, two alternating rounds). But every weight costs a broadcast load
 * whatever the lanes in use, so below XT_MIN inputs the tile wins (AVX2: a 2-row speculative verify cost 1.48
 * decode steps this way; 6 rows of a 104M model 1.68, against 1.33 in one pass of the tile; AVX-512, the 135M
 * model: level at 4 rows, 1.13-1.4x at 5-8, 1.4-1.8x at 9-32).
 * Lane l sums its row's products one column after another with fused multiply-adds (fmaf's rounding), so an
 * input row gets the same bits in any batch of XT_MIN or more, in either build. XT_ROWS: the rows a thread takes
 * at a time (XT_NR x 2 or 4, 8 x 3). */
#ifdef GEN_AVX512
enum { XT_MIN = 5 };
#else
enum { XT_MIN = 9 };
#endif
enum { XT_ROWS = 24 };

/* Inputs [b0, b0 + lanes) of x (cols apart) -> xt[k * lanes + l], lanes past the batch zero. */
static void xt_pack(const float *x, int64_t batch, int64_t cols, int64_t b0, int lanes, float *xt) {
    for (int64_t k = 0; k < cols; k++)
        for (int l = 0; l < lanes; l++) xt[k * lanes + l] = b0 + l < batch ? x[(b0 + l) * cols + k] : 0.f;
}

/* A 16-input pass's XT_NR weight rows (n apart) packed column by column, wp[k * XT_NR + r] = w[r * n + k], where
 * rows are XT_PACK_COLS or more floats apart: read in place there, 12 rows 16 KB or more apart fall in a handful
 * of L1 sets, more rows than the sets have ways (a 1B F32 model's 512-token prompt: 49-54 -> 62 tok/s). Nearer
 * rows are read in place: packing them cost the 135M model's prompt 0.85-0.9x. */
enum { XT_PACK_COLS = 4096 };
static void xt_pack_rows(const float *restrict w, int64_t n, int nr, float *restrict wp) {
    for (int r = 0; r < nr; r++)
        for (int64_t k = 0; k < n; k++) wp[k * nr + r] = w[r * n + k];
}

/* The kernels below read weight (r, k) at w[r * rs + k * ks]: rows in place (rs = n, ks = 1; the next rows are
 * fetched ahead) or packed (rs = 1, ks = XT_NR). */
#ifdef GEN_AVX512
/* Weight rows r .. r + XT_NR - 1 against a 16-input group, each row's 16 sums in one vector: 12 chains, 13 loads
 * to 12 FMAs. Lane l's sum is the same chain of FMAs as in the AVX2 build's kernel below, so an input row gets
 * the same bits in either build. */
enum { XT_NR = 12 };
static void xt_16(const float *restrict w, int64_t rs, int64_t ks, const float *restrict xt, int64_t n,
                  float out[XT_NR][16]) {
    __m512 c[XT_NR];
    for (int r = 0; r < XT_NR; r++) c[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; k++) {
        if (ks == 1 && !(k & 15)) /* in place: the next XT_NR rows */
            for (int r = XT_NR; r < 2 * XT_NR; r++) __builtin_prefetch(w + r * rs + k);
        const __m512 x0 = _mm512_loadu_ps(xt + k * 16);
        for (int r = 0; r < XT_NR; r++) c[r] = _mm512_fmadd_ps(_mm512_set1_ps(w[r * rs + k * ks]), x0, c[r]);
    }
    for (int r = 0; r < XT_NR; r++) _mm512_storeu_ps(out[r], c[r]);
}
#else
/* Weight rows r .. r + 5 against a 16-input group: 12 chains, 8 loads to 12 FMAs. */
enum { XT_NR = 6 };
static void xt_16(const float *restrict w, int64_t rs, int64_t ks, const float *restrict xt, int64_t n,
                  float out[XT_NR][16]) {
    __m256 c[XT_NR][2];
    for (int r = 0; r < XT_NR; r++) c[r][0] = c[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k++) {
        if (ks == 1 && !(k & 15)) /* in place: the next 6 rows, as dot_f32_2xj does */
            for (int r = XT_NR; r < 2 * XT_NR; r++) __builtin_prefetch(w + r * rs + k);
        const __m256 x0 = _mm256_loadu_ps(xt + k * 16), x1 = _mm256_loadu_ps(xt + k * 16 + 8);
        for (int r = 0; r < XT_NR; r++) {
            const __m256 wv = _mm256_broadcast_ss(w + r * rs + k * ks);
            c[r][0] = _mm256_fmadd_ps(wv, x0, c[r][0]), c[r][1] = _mm256_fmadd_ps(wv, x1, c[r][1]);
        }
    }
    for (int r = 0; r < XT_NR; r++) _mm256_storeu_ps(out[r], c[r][0]), _mm256_storeu_ps(out[r] + 8, c[r][1]);
}
#endif

/* Weight rows r .. r + 7 against an 8-input group (a batch's last 8 or fewer). */
static void xt_8x8(const float *restrict w, const float *restrict xt, int64_t n, float out[8][16]) {
    __m256 c[8];
    for (int r = 0; r < 8; r++) c[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k++) {
        if (!(k & 15))
            for (int r = 8; r < 16; r++) __builtin_prefetch(w + r * n + k);
        const __m256 x0 = _mm256_loadu_ps(xt + k * 8);
        for (int r = 0; r < 8; r++) c[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + r * n + k), x0, c[r]);
    }
    for (int r = 0; r < 8; r++) _mm256_storeu_ps(out[r], c[r]);
}

/* A kernel's sums out[k][l] (nr rows, the first `valid` of them real) into y[l * ldy + k] for inputs l < nb. */
static void xt_store(const float (*out)[16], int nr, int64_t valid, int64_t nb, float *y, int64_t ldy,
                     int accumulate) {
    for (int64_t l = 0; l < nb; l++)
        for (int64_t k = 0; k < nr && k < valid; k++) {
            float *o = y + l * ldy + k;
            *o = accumulate ? *o + out[k][l] : out[k][l];
        }
}

/* y[b] (+)= W x[b] for batch >= XT_MIN (y rows `rows` apart). Returns -1 when the transposed copy cannot be had. */
static int matmul_f32_xt(const float *w, int64_t rows, int64_t cols, const float *x, int64_t batch, float *y,
                         int accumulate, int n_threads) {
    /* Groups of 16 inputs; a last 8 or fewer take an 8-lane group. */
    const int64_t n16 = (batch + 7) / 16, tail = batch > 16 * n16 ? batch - 16 * n16 : 0; /* tail: 0 .. 8 */
    const int64_t whole = rows / XT_ROWS * XT_ROWS;
    float *xt = aligned_alloc(64, (size_t)((n16 * 16 + (tail ? 8 : 0)) * cols) * sizeof(float));
    const int pack = cols >= XT_PACK_COLS;
    float *wp = pack ? aligned_alloc(64, (size_t)(n_threads * XT_NR * cols) * sizeof(float)) : NULL; /* per thread */
    /* The rows past the last whole XT_ROWS run in a zero-padded copy of a block, so they take the vector
     * kernels too (a scalar loop there made the products of a 256-row matrix 5-6x slower). A row's lanes are
     * the same chain of FMAs in either kernel, so its bits do not depend on where it falls. */
    float *pad = whole < rows ? calloc((size_t)(XT_ROWS * cols), sizeof(float)) : NULL;
    if (!xt || (pack && !wp) || (whole < rows && !pad)) {
        free(xt), free(wp), free(pad);
        return -1;
    }
    if (pad) memcpy(pad, w + whole * cols, (size_t)((rows - whole) * cols) * sizeof(float));
    for (int64_t g = 0; g < n16; g++) xt_pack(x, batch, cols, 16 * g, 16, xt + g * 16 * cols);
    if (tail) xt_pack(x, batch, cols, 16 * n16, 8, xt + n16 * 16 * cols);
    const int64_t blocks = (rows + XT_ROWS - 1) / XT_ROWS;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int t = 0; t < n_threads; t++) /* thread t: blocks [blocks t / n, blocks (t + 1) / n), as static splits */
        for (int64_t r0 = blocks * t / n_threads * XT_ROWS, end = blocks * (t + 1) / n_threads * XT_ROWS; r0 < end;
             r0 += XT_ROWS) {
            const float *block = r0 < whole ? w + r0 * cols : pad; /* XT_ROWS rows either way */
            const int64_t n_rows = rows - r0 < XT_ROWS ? rows - r0 : XT_ROWS;
            for (int64_t i = 0; i < n_rows; i += XT_NR) { /* the 16-input groups, XT_NR rows at a time */
                const float *rows_i = block + i * cols;
                if (pack) xt_pack_rows(rows_i, cols, XT_NR, wp + t * XT_NR * cols); /* once for every group */
                for (int64_t g = 0; g < n16; g++) {
                    const int64_t b0 = 16 * g, nb = batch - b0 < 16 ? batch - b0 : 16;
                    float out[XT_NR][16];
                    if (pack)
                        xt_16(wp + t * XT_NR * cols, 1, XT_NR, xt + b0 * cols, cols, out);
                    else
                        xt_16(rows_i, cols, 1, xt + b0 * cols, cols, out);
                    xt_store(out, XT_NR, n_rows - i, nb, y + b0 * rows + r0 + i, rows, accumulate);
                }
            }
            for (int64_t i = 0; tail && i < n_rows; i += 8) { /* the last 8 or fewer inputs */
                const int64_t b0 = 16 * n16;
                float out[8][16];
                xt_8x8(block + i * cols, xt + b0 * cols, cols, out);
                xt_store(out, 8, n_rows - i, tail, y + b0 * rows + r0 + i, rows, accumulate);
            }
        }
    free(xt), free(wp), free(pad);
    return 0;
}
#endif

/* Four weight rows (n apart) against four input rows (n apart): out[r][j] = w_r . x_j. Each weight vector is
 * loaded once for the four inputs and each input vector once for the four rows (16 FMAs per 8 loads, against 1
 * per 2 in dot_f32), so a batch of rows is bound by the FMAs rather than by the loads. Sums in another order
 * than dot_f32's: equal within fp32 rounding. */
static void dot_f32_4x4(const float *restrict w, const float *restrict x, int64_t n, float out[4][4]) {
#ifdef GEN_AVX512
    /* Sixteen named accumulators: an array of them is not reliably kept in registers. */
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00,
           a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
    const float *w0 = w, *w1 = w + n, *w2 = w + 2 * n, *w3 = w + 3 * n;
    const float *x0 = x, *x1 = x + n, *x2 = x + 2 * n, *x3 = x + 3 * n;
#define ROW4(R, WV)                                                                                               \
    {                                                                                                             \
        const __m512 wv = (WV);                                                                                   \
        a##R##0 = _mm512_fmadd_ps(wv, v0, a##R##0), a##R##1 = _mm512_fmadd_ps(wv, v1, a##R##1);                 \
        a##R##2 = _mm512_fmadd_ps(wv, v2, a##R##2), a##R##3 = _mm512_fmadd_ps(wv, v3, a##R##3);                 \
    }
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v0 = _mm512_loadu_ps(x0 + i), v1 = _mm512_loadu_ps(x1 + i), v2 = _mm512_loadu_ps(x2 + i),
                     v3 = _mm512_loadu_ps(x3 + i);
        ROW4(0, _mm512_loadu_ps(w0 + i)) ROW4(1, _mm512_loadu_ps(w1 + i))
        ROW4(2, _mm512_loadu_ps(w2 + i)) ROW4(3, _mm512_loadu_ps(w3 + i))
    }
    if (i < n) {
        const __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        const __m512 v0 = _mm512_maskz_loadu_ps(k, x0 + i), v1 = _mm512_maskz_loadu_ps(k, x1 + i),
                     v2 = _mm512_maskz_loadu_ps(k, x2 + i), v3 = _mm512_maskz_loadu_ps(k, x3 + i);
        ROW4(0, _mm512_maskz_loadu_ps(k, w0 + i)) ROW4(1, _mm512_maskz_loadu_ps(k, w1 + i))
        ROW4(2, _mm512_maskz_loadu_ps(k, w2 + i)) ROW4(3, _mm512_maskz_loadu_ps(k, w3 + i))
    }
#undef ROW4
    const __m512 acc[4][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}, {a30, a31, a32, a33}};
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < 4; j++) out[r][j] = _mm512_reduce_add_ps(acc[r][j]);
#else /* (AVX2 builds take dot_f32_2xj for fp32 batches instead) */
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < 4; j++) out[r][j] = dot_f32(w + r * n, x + j * n, n);
#endif
}

/* bf16 weights (widened to fp32: a 16-bit shift) against an fp32 input. */
static float dot_bf16(const uint16_t *restrict w, const float *restrict x, int64_t n) {
    int64_t i = 0;
    float s = 0.f;
#ifdef GEN_AVX512
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        __m512i w0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + i)));
        __m512i w1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + i + 16)));
        a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w1, 16)), _mm512_loadu_ps(x + i + 16), a1);
    }
#ifdef GEN_AVX512_BW
    for (; i < n; i += 16) { /* short rows (attention heads) end here, not in the scalar loop */
        __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512i wi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, w + i));
        a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(wi, 16)), _mm512_maskz_loadu_ps(k, x + i), a0);
    }
#endif
    s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
#pragma omp simd reduction(+ : s)
    for (int64_t j = i; j < n; j++) s += from_bf16(w[j]) * x[j];
    return s;
}

/* dot_f32_4x4 for bf16 weights (each widened once for the four inputs: a 16-bit shift). */
static void dot_bf16_4x4(const uint16_t *restrict w, const float *restrict x, int64_t n, float out[4][4]) {
    int64_t i = 0;
#ifdef GEN_AVX512
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00,
           a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
#define WIDEN(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define ROW4(R)                                                                                                   \
    {                                                                                                             \
        const __m512 wv = WIDEN(w + R * n + i);                                                                   \
        a##R##0 = _mm512_fmadd_ps(wv, v0, a##R##0), a##R##1 = _mm512_fmadd_ps(wv, v1, a##R##1);                 \
        a##R##2 = _mm512_fmadd_ps(wv, v2, a##R##2), a##R##3 = _mm512_fmadd_ps(wv, v3, a##R##3);                 \
    }
    for (; i + 16 <= n; i += 16) {
        const __m512 v0 = _mm512_loadu_ps(x + i), v1 = _mm512_loadu_ps(x + n + i), v2 = _mm512_loadu_ps(x + 2 * n + i),
                     v3 = _mm512_loadu_ps(x + 3 * n + i);
        ROW4(0) ROW4(1) ROW4(2) ROW4(3)
    }
#undef ROW4
#undef WIDEN
    const __m512 acc[4][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}, {a30, a31, a32, a33}};
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < 4; j++) out[r][j] = _mm512_reduce_add_ps(acc[r][j]);
#else
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < 4; j++) out[r][j] = 0.f;
#endif
    for (int r = 0; r < 4; r++) /* the last n % 16 columns (all of them without AVX-512) */
        for (int j = 0; j < 4; j++)
            for (int64_t t = i; t < n; t++) out[r][j] += from_bf16(w[r * n + t]) * x[j * n + t];
}

/* int8 weights against an int16-quantised input: exact integer dot products. Products are at most
 * 127 * 32767 and each int32 lane sums cols / 32 pairs of them, so columns go in chunks that cannot
 * overflow (4096 / 32 * 2 * 127 * 32767 < 2^31). */
enum { INT_CHUNK = 4096 };

static float dot_i8(const int8_t *restrict w, const int16_t *restrict x, int64_t n) {
    float total = 0.f;
    for (int64_t c0 = 0; c0 < n; c0 += INT_CHUNK) {
        int64_t end = c0 + INT_CHUNK < n ? c0 + INT_CHUNK : n, c = c0;
        int32_t s = 0;
#ifdef GEN_VNNI
        __m512i acc = _mm512_setzero_si512();
        for (; c + 32 <= end; c += 32) {
            __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + c))); /* 32 x int16 */
            acc = _mm512_dpwssd_epi32(acc, wv, _mm512_loadu_si512((const void *)(x + c)));
        }
        s = _mm512_reduce_add_epi32(acc);
#endif
        for (; c < end; c++) s += (int32_t)w[c] * (int32_t)x[c];
        total += (float)s;
    }
    return total;
}

#ifdef GEN_VNNI
/* dot_i8 for four weight rows against four input rows, each weight chunk widened once for the four inputs:
 * the same exact integer sums per chunk, so the same result as dot_i8 bit for bit. */
static void dot_i8_4x4(const int8_t *restrict w, const int16_t *restrict x, int64_t n, float out[4][4]) {
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < 4; j++) out[r][j] = 0.f;
    for (int64_t c0 = 0; c0 < n; c0 += INT_CHUNK) {
        int64_t end = c0 + INT_CHUNK < n ? c0 + INT_CHUNK : n, c = c0;
        __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
                a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
#define ROW4(R)                                                                                                   \
    {                                                                                                             \
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + R * n + c)));           \
        a##R##0 = _mm512_dpwssd_epi32(a##R##0, wv, v0), a##R##1 = _mm512_dpwssd_epi32(a##R##1, wv, v1);          \
        a##R##2 = _mm512_dpwssd_epi32(a##R##2, wv, v2), a##R##3 = _mm512_dpwssd_epi32(a##R##3, wv, v3);          \
    }
        for (; c + 32 <= end; c += 32) {
            const __m512i v0 = _mm512_loadu_si512((const void *)(x + c)),
                          v1 = _mm512_loadu_si512((const void *)(x + n + c)),
                          v2 = _mm512_loadu_si512((const void *)(x + 2 * n + c)),
                          v3 = _mm512_loadu_si512((const void *)(x + 3 * n + c));
            ROW4(0) ROW4(1) ROW4(2) ROW4(3)
        }
#undef ROW4
        const __m512i acc[4][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}, {a30, a31, a32, a33}};
        for (int r = 0; r < 4; r++)
            for (int j = 0; j < 4; j++) {
                int32_t s = _mm512_reduce_add_epi32(acc[r][j]);
                for (int64_t t = c; t < end; t++) s += (int32_t)w[r * n + t] * (int32_t)x[j * n + t];
                out[r][j] += (float)s;
            }
    }
}
#endif

/* Quantise each input row to int16 with its own scale: |x| <= 32767 * scale, error <= scale / 2. */
static void quantize_rows(const Model *m, const float *x, int64_t n) {
    for (int64_t b = 0; b < m->batch; b++) {
        const float *xb = x + b * n;
        float amax = 0.f;
        for (int64_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float scale = amax > 0.f ? amax / 32767.f : 1.f;
        m->xscale[b] = scale;
        for (int64_t i = 0; i < n; i++) m->xq[b * n + i] = (int16_t)lrintf(xb[i] / scale);
    }
}

/* matmul for a bf16 model. Its own loop: a third case in matmul's cost the fp32 path up to 10% on the
 * small shape (short rows, so a step does little per call), measured in alternating runs. */
static void matmul_bf16(const Model *m, const Matrix *w, const float *x, float *y, int accumulate) {
    const int64_t rows = w->rows, cols = w->cols, batch = m->batch;
#pragma omp parallel for schedule(static) num_threads(m->n_threads)
    for (int64_t r0 = 0; r0 < rows; r0 += ROW_BLOCK) {
        int64_t r1 = r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows, b = 0;
        if (r1 - r0 == 4) /* batches: four inputs at a time against the block's four rows */
            for (; b + 4 <= batch; b += 4) {
                float v[4][4];
                dot_bf16_4x4((const uint16_t *)w->data + r0 * cols, x + b * cols, cols, v);
                for (int j = 0; j < 4; j++)
                    for (int r = 0; r < 4; r++) {
                        float *out = y + (b + j) * rows + r0 + r;
                        *out = accumulate ? *out + v[r][j] : v[r][j];
                    }
            }
        for (; b < batch; b++) {
            for (int64_t r = r0; r < r1; r++) {
                float v = dot_bf16((const uint16_t *)w->data + r * cols, x + b * cols, cols);
                y[b * rows + r] = accumulate ? y[b * rows + r] + v : v;
            }
        }
    }
}

/* From this many input rows on, block types with a batch kernel (blocks_batch.h) unpack each weight group once for
 * up to BATCH_J rows instead of once per row. A lone row keeps the one-row kernels: the batch kernel with one row
 * decoded a 135M Q4_1 file at 0.8-0.9x their speed (2 threads, alternating runs); the Q4_K 1.1B file ran the same
 * either way. So a row gets the same bits in any batch of 2 or more, and alone differs only in fp32 summation
 * order (the integer block sums are the same). */
enum { BATCH_MIN = 2 };

/* y[b] (+)= W x[b] for an interleaved W (rows a multiple of 16; stored as `stored`: T_Q4_0, T_Q4_1, T_Q4_K, T_Q5_K,
 * T_Q8_0), or for stored Q6_K rows (`stored` T_Q6_K: blocks_q6k16.h), against `batch` activation rows x (X16Act; row
 * b of y ldy floats after row b - 1). Threads take whole groups; each group meets the rows X16_J at a time. */
static void x16_matmul(const uint8_t *w, int64_t rows, int64_t cols, X16Act x, int64_t batch, float *y, int64_t ldy,
                       int accumulate, int n_threads, const int64_t stored) {
#ifdef GEN_BLOCKS_512
    if (stored == T_Q6_K) { /* rows as stored, 16 at a time transposed into lanes (the last group may be short) */
        const int64_t nsb = cols / 256, groups = (rows + X16_ROWS - 1) / X16_ROWS;
        /* more than one pass: each group unpacked once into its thread's buffer (without the memory, per pass) */
        uint8_t *codes = batch > X16_J ? aligned_alloc(64, (size_t)(n_threads * nsb * Q6K16_SB)) : NULL;
        /* A prompt's groups (each tens of microseconds) go to the threads one at a time from a shared counter, so a
         * thread slowed by another process on its core takes fewer instead of holding the other at the end. A
         * decode step's short regions keep the fixed split (a shared counter ran decode 9-10% slower). */
        if (codes) {
#pragma omp parallel num_threads(n_threads)
            {
                uint8_t *own = codes + thread_index() * nsb * Q6K16_SB;
#pragma omp for schedule(dynamic, 1)
                for (int64_t g = 0; g < groups; g++) q6k16_group_at(w, rows, nsb, g, x, batch, y, ldy, accumulate, own);
            }
            free(codes);
            return;
        }
#pragma omp parallel for schedule(static) num_threads(n_threads)
        for (int64_t g = 0; g < groups; g++) q6k16_group_at(w, rows, nsb, g, x, batch, y, ldy, accumulate, NULL);
        return;
    }
#endif
    const int64_t gs = stored == T_Q4_K   ? cols / 256 * K16_BYTES
                       : stored == T_Q5_K ? cols / 256 * K16_BYTES5
                       : stored == T_Q8_0 ? cols / 32 * Q8X16_BYTES
                                          : cols / 32 * X16_BYTES(stored == T_Q4_1);
#if defined(GEN_BLOCKS_512) || defined(GEN_X16_256)
    /* A prompt's codes unpacked once per group into its thread's buffer (blocks_k16.h), the groups taken one at a
     * time from a shared counter. Without the memory, each pass unpacks them (below).
     * AVX-512: Q5_K from 32 rows on, 1.1-1.2x the products at 64-512 rows and slower at 9-16; Q4_K's codes take one
     * operation, and unpacking them once gained nothing.
     * AVX2: Q5_K, 1.1-1.4x at 6-512 rows; Q4_K from 32 rows on, its codes taking two operations: level at 64 rows,
     * 1.1-1.2x at 512 and slower at 6. */
#ifdef GEN_BLOCKS_512
    const int unpack = stored == T_Q5_K && batch >= 32;
#else
    const int unpack = (stored == T_Q5_K && batch > K16_J256) || (stored == T_Q4_K && batch >= 32);
#endif
    uint8_t *codes = unpack ? aligned_alloc(64, (size_t)(n_threads * (cols / 256) * K16_CODES)) : NULL;
    if (codes) { /* a prompt's groups from a shared counter, as Q6_K's above */
        const int64_t groups = rows / X16_ROWS, nsb = cols / 256;
#pragma omp parallel num_threads(n_threads)
        {
            uint8_t *own = codes + thread_index() * nsb * K16_CODES;
#pragma omp for schedule(dynamic, 1)
            for (int64_t g = 0; g < groups; g++) {
                if (stored == T_Q5_K)
                    k16_group_unpacked(1, w + g * gs, nsb, x, batch, y + g * X16_ROWS, ldy, accumulate, own);
                else
                    k16_group_unpacked(0, w + g * gs, nsb, x, batch, y + g * X16_ROWS, ldy, accumulate, own);
            }
        }
        free(codes);
        return;
    }
#endif
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t g = 0; g < rows / X16_ROWS; g++) {
        const uint8_t *grp = w + g * gs;
#define PASS(N)                                                                \
    if (stored == T_Q4_K)                                                      \
        k16_group(N, 0, grp, cols / 256, xj, o, ldy, accumulate, NULL);        \
    else if (stored == T_Q5_K)                                                 \
        k16_group(N, 1, grp, cols / 256, xj, o, ldy, accumulate, NULL);        \
    else if (stored == T_Q8_0)                                                 \
        q8x16_group(N, grp, cols / 32, xj, o, ldy, accumulate);                \
    else if (stored == T_Q4_1)                                                 \
        x16_group(N, 1, grp, cols / 32, xj, o, ldy, accumulate);               \
    else                                                                       \
        x16_group(N, 0, grp, cols / 32, xj, o, ldy, accumulate)
        X16_PASSES(x, batch, X16_J, y + g * X16_ROWS, ldy, PASS)
#undef PASS
    }
}

enum { QUANTIZE_SPLIT = 64 }; /* activation rows from which block_rows_x16 quantizes them on every thread */

/* block_rows_int8 for rows interleaved in groups (blocks_x16.h, blocks_k16.h), or in lanes as they go (Q6_K,
 * blocks_q6k16.h; `stored` names the arithmetic): the inputs quantized as for the stored layout, each row's
 * per-block terms beside them (Q4_0 / Q8_0 offsets or Q4_1 min factors, one per block; Q4_K's paired sub-block sums,
 * 4 per super-block; Q6_K's offsets, one per sub-block): on the stack for a decode step, else allocated, and where
 * that fails, as many rows at a time as the stack holds. */
static void block_rows_x16(const uint8_t *w, const BlockType *t, const int64_t stored, int64_t rows, int64_t cols,
                           const float *x, int64_t batch, float *y, int64_t ldy, int accumulate, int8_t *aq, float *ad,
                           int16_t *asum, int n_threads) {
    enum { STACK_TERMS = 4096 };
    const int k = stored == T_Q4_K || stored == T_Q5_K, min = stored == T_Q4_1;
    const int64_t nb = cols / 32, terms = k ? cols / 64 : stored == T_Q6_K ? cols / 16 : nb; /* X16Act.o per row */
    int32_t stack[STACK_TERMS], *o = stack;
    int64_t step = STACK_TERMS / terms > 0 ? STACK_TERMS / terms : 1;
    if (batch > step && (o = malloc((size_t)(batch * terms) * sizeof(int32_t))) != NULL) step = batch;
    if (!o) o = stack;
    if (o == stack && terms > STACK_TERMS) return; /* rows of over 131072 columns, and no memory */
    for (int64_t b0 = 0; b0 < batch; b0 += step) {
        const int64_t n = batch - b0 < step ? batch - b0 : step;
        /* On the calling thread, as block_rows_int8 does, up to a prompt's chunk: there the rows' quantization
         * (0.2-0.6 ms a product at 256 rows) is worth a barrier. */
#pragma omp parallel for schedule(static) if (n >= QUANTIZE_SPLIT) num_threads(n_threads)
        for (int64_t b = 0; b < n; b++) {
            const int64_t r = b0 + b;
            Act a = {aq + r * cols, ad + r * nb, asum + r * (cols / 16)};
            t->quantize_act(x + r * cols, cols, a);
            if (k)
                k16_offsets(a, cols / 256, o + b * terms);
            else if (stored == T_Q6_K)
                q6k16_offsets(a, cols / 256, o + b * terms);
            else if (stored == T_Q8_0)
                q8x16_offsets(a, nb, o + b * terms);
            else
                x16_offsets(a, nb, o + b * terms, min);
        }
        const X16Act xa = {aq + b0 * cols, ad + b0 * nb, o, cols, nb, terms};
        x16_matmul(w, rows, cols, xa, n, y + b0 * ldy, ldy, accumulate, n_threads, stored);
    }
    if (o != stack) free(o);
}

/* The float-activation product (ACT_FP32, ACT_BF16) for interleaved rows; ACT_BF16 rounds a copy of x first.
 * Returns 0, or -1 when memory runs out. */
static int float_rows_x16(const uint8_t *w, const BlockType *t, int64_t rows, int64_t cols, const float *x,
                          int64_t batch, float *y, int64_t ldy, int accumulate, int64_t act, int n_threads) {
    float *xr = NULL;
    if (act == ACT_BF16) {
        if (!(xr = malloc((size_t)(batch * cols) * sizeof(float)))) return -1;
        for (int64_t i = 0; i < batch * cols; i++) xr[i] = from_bf16(to_bf16(x[i]));
    }
    x16_float_matmul(w, rows, cols, x, batch, y, ldy, accumulate, xr, n_threads, t->stored == T_Q4_1);
    free(xr);
    return 0;
}

/* y[b] = W x[b] (+ y[b] when accumulate) for block rows W (rows, cols) against `batch` inputs quantized to int8
 * blocks as the type's traits say, into aq (batch, cols), ad (batch, cols / 32), asum (batch, cols / 16). Row b
 * of y starts ldy floats after row b - 1. Threads take whole 4-row blocks of W; each block stays in L1 while
 * every input row passes over it. */
static void block_rows_int8(const uint8_t *w, const BlockType *t, int64_t rows, int64_t cols, const float *x,
                            int64_t batch, float *y, int64_t ldy, int accumulate, int8_t *aq, float *ad, int16_t *asum,
                            int n_threads) {
    if (t->group) {
        block_rows_x16(w, t, t->stored, rows, cols, x, batch, y, ldy, accumulate, aq, ad, asum, n_threads);
        return;
    }
#ifdef GEN_BLOCKS_512
    if (t == &BLOCK_TYPES[T_Q6_K] && batch >= Q6K16_MIN) { /* stored rows, 16 at a time in lanes (blocks_q6k16.h) */
        block_rows_x16(w, t, T_Q6_K, rows, cols, x, batch, y, ldy, accumulate, aq, ad, asum, n_threads);
        return;
    }
#endif
    const int64_t rb = block_row_bytes(t, cols), nb = cols / t->elems;
    int use_batch = t->batch != NULL && batch >= BATCH_MIN;
    /* each input row's prepared copy on its own cache lines */
    const int64_t ps = use_batch ? (t->batch_prep_bytes(nb) + 63) / 64 * 64 : 0;
    uint8_t *prep = use_batch ? aligned_alloc(64, (size_t)(batch * ps)) : NULL;
    if (!prep) use_batch = 0; /* out of memory: the one-row kernels need no copy */
    const Batch bx = {prep, ps};
    /* Quantized on the calling thread: a few µs even at 32 rows, where an OpenMP loop would add a barrier to every
     * matmul (costly when another process holds a core). */
    for (int64_t b = 0; b < batch; b++) {
        Act a = {aq + b * cols, ad + b * (cols / 32), asum + b * (cols / 16)};
        t->quantize_act(x + b * cols, cols, a);
        if (use_batch) t->batch_prep(a, nb, prep + b * ps);
    }
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t r0 = 0; r0 < rows; r0 += ROW_BLOCK) {
        const int64_t r1 = r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows;
        if (use_batch) {
            for (int64_t b0 = 0; b0 < batch; b0 += BATCH_J) {
                const int nj = (int)(batch - b0 < BATCH_J ? batch - b0 : BATCH_J);
                float v[ROW_BLOCK * BATCH_J];
                t->batch(w + r0 * rb, rb, (int)(r1 - r0), bx, b0, nj, nb, v);
                for (int j = 0; j < nj; j++)
                    for (int64_t r = r0; r < r1; r++) {
                        float *out = y + (b0 + j) * ldy + r;
                        *out = accumulate ? *out + v[(r - r0) * BATCH_J + j] : v[(r - r0) * BATCH_J + j];
                    }
            }
            continue;
        }
        for (int64_t b = 0; b < batch; b++) {
            Act a = {aq + b * cols, ad + b * (cols / 32), asum + b * (cols / 16)};
            float v[ROW_BLOCK];
            if (r1 - r0 == ROW_BLOCK)
                block_dot4(t, w + r0 * rb, rb, a, cols, v);
            else
                for (int64_t r = r0; r < r1; r++) v[r - r0] = t->dot(w + r * rb, a, nb);
            for (int64_t r = r0; r < r1; r++) y[b * ldy + r] = accumulate ? y[b * ldy + r] + v[r - r0] : v[r - r0];
        }
    }
    free(prep);
}

/* ACT_INT8X2: each activation row b as two int8 rows through block_rows_int8, its own int8 rounding (row 2b) and
 * the int8 rounding of what that missed (row 2b + 1: x - d q, at most d / 2 a value, so its scale is ~254 times
 * finer), their products added. One batch of twice the rows reads the weights once for both (decode is bound by
 * that read) and multiplies twice; the error is int8's divided by ~254. The residual takes the scale d and codes q
 * that block_rows_int8 computes again for row 2b from the same floats. The two rows' products go to a scratch of at
 * most X2_SCRATCH bytes, a band of weight rows at a time: a 64-row batch's head over 128,256 tokens would otherwise
 * hold 66 MB more than int8's (the same speed either way, measured). All memory is taken before any output is
 * written, so a failure leaves y as it was (the step then takes int8's product). Returns 0, or -1 when memory runs
 * out. */
enum { X2_SCRATCH = 8 << 20 };
static int block_rows_int8x2(const uint8_t *w, const BlockType *t, int64_t rows, int64_t cols, const float *x,
                             int64_t batch, float *y, int64_t ldy, int accumulate, int n_threads) {
    const int64_t n = 2 * batch, rb = block_row_bytes(t, cols);
    int64_t band = X2_SCRATCH / (n * (int64_t)sizeof(float)) / 16 * 16; /* whole groups of 16 rows */
    band = band < 16 ? 16 : band > rows ? rows : band;
    float *xx = malloc((size_t)(n * cols) * sizeof(float)), *yy = malloc((size_t)(n * band) * sizeof(float));
    int8_t *q = malloc((size_t)(n * cols));
    float *d = malloc((size_t)(n * (cols / 32)) * sizeof(float));
    int16_t *s = malloc((size_t)(n * (cols / 16)) * sizeof(int16_t));
    const int ok = xx && yy && q && d && s;
    if (ok) {
        for (int64_t b = 0; b < batch; b++) {
            const float *xb = x + b * cols;
            float *hi = xx + 2 * b * cols, *lo = hi + cols;
            t->quantize_act(xb, cols, (Act){q, d, s});
            memcpy(hi, xb, (size_t)cols * sizeof(float));
            for (int64_t g = 0; g < cols / t->elems; g++) { /* a block's scale, then its values (vectorized) */
                const float dg = d[g];
                for (int64_t i = g * t->elems; i < (g + 1) * t->elems; i++) lo[i] = fmaf(-dg, (float)q[i], xb[i]);
            }
        }
        for (int64_t r0 = 0; r0 < rows; r0 += band) {
            const int64_t m = rows - r0 < band ? rows - r0 : band; /* yy: (n, m) */
            block_rows_int8(w + r0 * rb, t, m, cols, xx, n, yy, m, 0, q, d, s, n_threads);
            for (int64_t b = 0; b < batch; b++) {
                const float *hi = yy + 2 * b * m, *lo = hi + m;
                float *out = y + b * ldy + r0;
                for (int64_t r = 0; r < m; r++) out[r] = (accumulate ? out[r] : 0.f) + (hi[r] + lo[r]);
            }
        }
    }
    free(xx), free(yy), free(q), free(d), free(s);
    return ok ? 0 : -1;
}

/* Block rows against the input prepared as m->act says. Row b of the output starts ldy floats after row b - 1 (a
 * part of a matrix held in parts writes its own columns of a wider y). */
static void matmul_blocks(const Model *m, const Matrix *w, const BlockType *t, const float *x, float *y, int64_t ldy,
                          int accumulate) {
    if (m->act == ACT_INT8X2 &&
        block_rows_int8x2(w->data, t, w->rows, w->cols, x, m->batch, y, ldy, accumulate, (int)m->n_threads) == 0)
        return; /* out of memory: int8 below */
    if (m->act == ACT_BF16 || m->act == ACT_FP32) {
        if (x16_float_paths(t)) {
            float_rows_x16(w->data, t, w->rows, w->cols, x, m->batch, y, ldy, accumulate, m->act, (int)m->n_threads);
            return;
        } /* else blocks_float.h (their bf16 copy in xq, sums in ad) */
        float_block_matmul(w->data, w->type, w->rows, w->cols, x, m->batch, y, ldy, accumulate, m->act, (uint16_t *)m->xq,
                           m->ad, (int)m->n_threads);
        return;
    }
    block_rows_int8(w->data, t, w->rows, w->cols, x, m->batch, y, ldy, accumulate, m->aq, m->ad, m->asum,
                    (int)m->n_threads);
}

/* w's type is T_FP32/T_BF16 (as m->bf16 says), T_INT8 or a block type: the step checks that before it starts. */
static void matmul(const Model *m, const Matrix *w, const float *x, float *y, int accumulate) {
    const BlockType *blocks = block_type(w->type);
    if (blocks) {
        matmul_blocks(m, w, blocks, x, y, w->rows, accumulate);
        return;
    }
    if (m->bf16) {
        matmul_bf16(m, w, x, y, accumulate);
        return;
    }
    const int64_t rows = w->rows, cols = w->cols, batch = m->batch;
    const int int8 = w->scale != NULL;
#ifdef GEN_AVX2_FMA
    if (!int8 && batch >= XT_MIN && matmul_f32_xt(w->data, rows, cols, x, batch, y, accumulate, (int)m->n_threads) == 0)
        return;
#endif
    if (int8) quantize_rows(m, x, cols);
    /* Threads take whole row blocks; each block's rows stay in L1 while every batch row uses them. */
#pragma omp parallel for schedule(static) num_threads(m->n_threads)
    for (int64_t r0 = 0; r0 < rows; r0 += ROW_BLOCK) {
        int64_t r1 = r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows, b = 0;
#if defined(GEN_AVX2_FMA) && !defined(GEN_AVX512)
        /* Below XT_MIN inputs: up to 6 in one pass over the block (AVX2 fits 2 rows x 6 inputs' sums), 7-8 in
         * two even passes, the second from L1 (4 + 4 keeps 8 sums in flight where 6 + 2 would keep 4). */
        if (r1 - r0 == 4 && !int8)
            for (int j = 0, passes = (int)((batch + 5) / 6); b + 2 <= batch; b += j, passes--) {
                j = (int)((batch - b + passes - 1) / passes);
                float v[4][6];
                dot_f32_2xj((const float *)w->data + r0 * cols, x + b * cols, cols, j, v[0], 6);
                dot_f32_2xj((const float *)w->data + (r0 + 2) * cols, x + b * cols, cols, j, v[2], 6);
                for (int jj = 0; jj < j; jj++)
                    for (int r = 0; r < 4; r++) {
                        float *out = y + (b + jj) * rows + r0 + r;
                        *out = accumulate ? *out + v[r][jj] : v[r][jj];
                    }
            }
#endif
        if (r1 - r0 == 4) /* batches: four inputs at a time against the block's four rows */
            for (; b + 4 <= batch; b += 4) {
                float v[4][4];
                if (int8) {
#ifdef GEN_VNNI
                    dot_i8_4x4((const int8_t *)w->data + r0 * cols, m->xq + b * cols, cols, v);
                    for (int j = 0; j < 4; j++)
                        for (int r = 0; r < 4; r++) v[r][j] = v[r][j] * w->scale[r0 + r] * m->xscale[b + j];
#else
                    break; /* row by row below */
#endif
                } else {
                    dot_f32_4x4((const float *)w->data + r0 * cols, x + b * cols, cols, v);
                }
                for (int j = 0; j < 4; j++)
                    for (int r = 0; r < 4; r++) {
                        float *out = y + (b + j) * rows + r0 + r;
                        *out = accumulate ? *out + v[r][j] : v[r][j];
                    }
            }
        for (; b < batch; b++) {
            for (int64_t r = r0; r < r1; r++) {
                float v = int8 ? dot_i8((const int8_t *)w->data + r * cols, m->xq + b * cols, cols) *
                                     w->scale[r] * m->xscale[b]
                               : dot_f32((const float *)w->data + r * cols, x + b * cols, cols);
                y[b * rows + r] = accumulate ? y[b * rows + r] + v : v;
            }
        }
    }
}

/* Whether a matrix held as `w` and `rest` (n_rest parts, rows 0: absent) can go to matmul_parts: one part
 * alone, or every part in a block type. */
static int parts_ok(const Matrix *w, const Matrix *rest, int n_rest) {
    int ok = 1, parted = 0;
    for (int i = 0; i < n_rest; i++)
        if (rest[i].rows) {
            parted = 1;
            ok &= block_type(rest[i].type) != NULL && rest[i].cols == w->cols;
        }
    return !parted || (ok && block_type(w->type) != NULL);
}

/* y = W x for a matrix held as `w` followed by `rest` (n_rest parts, rows 0: absent), each part in its own block
 * type: a part's rows fill their own columns of y. Without other parts this is matmul. */
static void matmul_parts(const Model *m, const Matrix *w, const Matrix *rest, int n_rest, const float *x, float *y,
                         int accumulate) {
    int64_t ldy = w->rows;
    for (int i = 0; i < n_rest; i++) ldy += rest[i].rows;
    if (ldy == w->rows) {
        matmul(m, w, x, y, accumulate);
        return;
    }
    /* Parts exist only for block types (the loader and the Python side keep them so; check_types too). */
    matmul_blocks(m, w, block_type(w->type), x, y, ldy, accumulate);
    for (int64_t i = 0, at = w->rows; i < n_rest; at += rest[i].rows, i++)
        if (rest[i].rows) matmul_blocks(m, &rest[i], block_type(rest[i].type), x, y + at, ldy, accumulate);
}

#endif
