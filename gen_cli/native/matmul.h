/* A matrix times a few vectors, y[b] = W x[b] (+ y[b] when accumulate), for every Matrix.type: fp32, bf16, int8
 * rows with a scale each, and GGML blocks (block_types.h). Threads take whole row blocks; each block's rows stay
 * in L1 while every batch row uses them.
 */
#ifndef GEN_MATMUL_H
#define GEN_MATMUL_H

#include <math.h>
#include <stdint.h>

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
#else
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += w[i] * x[i];
    return s;
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
        int64_t r1 = r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows;
        for (int64_t b = 0; b < batch; b++) {
            for (int64_t r = r0; r < r1; r++) {
                float v = dot_bf16((const uint16_t *)w->data + r * cols, x + b * cols, cols);
                y[b * rows + r] = accumulate ? y[b * rows + r] + v : v;
            }
        }
    }
}

/* Block rows against the input quantized once per call, as the type's traits say. */
static void matmul_blocks(const Model *m, const Matrix *w, const BlockType *t, const float *x, float *y,
                          int accumulate) {
    const int64_t rows = w->rows, cols = w->cols, batch = m->batch, rb = block_row_bytes(t, cols), nb = cols / t->elems;
    if (m->act != ACT_INT8) { /* float activations: blocks_float.h (their bf16 copy in xq, sums in ad) */
        float_block_matmul(w->data, w->type, rows, cols, x, batch, y, accumulate, m->act, (uint16_t *)m->xq, m->ad,
                           (int)m->n_threads);
        return;
    }
    for (int64_t b = 0; b < batch; b++) {
        Act a = {m->aq + b * cols, m->ad + b * (cols / 32), m->asum + b * (cols / 16)};
        t->quantize_act(x + b * cols, cols, a);
    }
#pragma omp parallel for schedule(static) num_threads(m->n_threads)
    for (int64_t r0 = 0; r0 < rows; r0 += ROW_BLOCK) {
        int64_t r1 = r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows;
        for (int64_t b = 0; b < batch; b++) {
            Act a = {m->aq + b * cols, m->ad + b * (cols / 32), m->asum + b * (cols / 16)};
            float v[ROW_BLOCK];
            if (r1 - r0 == ROW_BLOCK)
                block_dot4(t, (const uint8_t *)w->data + r0 * rb, rb, a, cols, v, 0);
            else
                for (int64_t r = r0; r < r1; r++) v[r - r0] = t->dot((const uint8_t *)w->data + r * rb, a, nb);
            for (int64_t r = r0; r < r1; r++) y[b * rows + r] = accumulate ? y[b * rows + r] + v[r - r0] : v[r - r0];
        }
    }
}

/* w's type is T_FP32/T_BF16 (as m->bf16 says), T_INT8 or a block type: the step checks that before it starts. */
static void matmul(const Model *m, const Matrix *w, const float *x, float *y, int accumulate) {
    const BlockType *blocks = block_type(w->type);
    if (blocks) {
        matmul_blocks(m, w, blocks, x, y, accumulate);
        return;
    }
    if (m->bf16) {
        matmul_bf16(m, w, x, y, accumulate);
        return;
    }
    const int64_t rows = w->rows, cols = w->cols, batch = m->batch;
    const int int8 = w->scale != NULL;
    if (int8) quantize_rows(m, x, cols);
    /* Threads take whole row blocks; each block's rows stay in L1 while every batch row uses them. */
#pragma omp parallel for schedule(static) num_threads(m->n_threads)
    for (int64_t r0 = 0; r0 < rows; r0 += ROW_BLOCK) {
        int64_t r1 = r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows;
        for (int64_t b = 0; b < batch; b++) {
            for (int64_t r = r0; r < r1; r++) {
                float v = int8 ? dot_i8((const int8_t *)w->data + r * cols, m->xq + b * cols, cols) *
                                     w->scale[r] * m->xscale[b]
                               : dot_f32((const float *)w->data + r * cols, x + b * cols, cols);
                y[b * rows + r] = accumulate ? y[b * rows + r] + v : v;
            }
        }
    }
}

#endif
