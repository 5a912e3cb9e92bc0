/* Prompts through block-quantized matrices (gen_cli/native/block_matmul.py): a few tokens multiplied straight
 * from the blocks, or a prompt's row tile dequantized for a GEMM. Every per-type choice is a lookup in
 * block_types.h's table; a type without a row there is refused.
 */
#include <stdint.h>
#include <stdlib.h>

#include "abi.h"
#include "bf16.h"
#include "block_types.h"
#include "blocks_float.h"
#include "features.h"
#include "matmul.h"

/* Y (n, rows) = X (n, cols) W^T for a block matrix W (rows, row bytes): prompts and prefill, the activations as
 * `act` says (abi.h's ACT_*). ACT_INT8: matmul.h's block_rows_int8 (X quantized once; where the type has a batch
 * kernel, each weight group unpacked once for several tokens); ACT_INT8X2: the same on each row and its residual
 * (block_rows_int8x2). ACT_FP32 / ACT_BF16: blocks_float.h's products. Returns 0, or -1 when the type is not a
 * block type, `act` unknown, an interleaved type's rows are not whole groups, or memory runs out. */
int64_t gen_block_matmul(const void *w, int64_t type, int64_t rows, int64_t cols, const float *x, int64_t n, float *y,
                         int64_t n_threads, int64_t act) {
    const BlockType *bt = block_type(type);
    if (!bt || cols % bt->elems != 0 || act < ACT_INT8 || act > ACT_INT8X2) return -1;
    if (n <= 0 || rows <= 0) return 0;
    if (bt->group && rows % bt->group) return -1;
    if (act == ACT_INT8X2) return block_rows_int8x2(w, bt, rows, cols, x, n, y, rows, 0, (int)n_threads);
    if (act != ACT_INT8 && x16_float_paths(bt)) return float_rows_x16(w, bt, rows, cols, x, n, y, rows, 0, act, (int)n_threads);
    if (act != ACT_INT8) {
        uint16_t *xh = malloc((size_t)(n * cols) * sizeof(uint16_t));
        float *xs = malloc((size_t)(n * (cols / 32) + 1) * sizeof(float));
        const int ok = xh && xs;
        if (ok) float_block_matmul(w, type, rows, cols, x, n, y, rows, 0, act, xh, xs, (int)n_threads);
        free(xh), free(xs);
        return ok ? 0 : -1;
    }
    int8_t *q = malloc((size_t)(n * cols));
    float *dq = malloc((size_t)(n * (cols / 32)) * sizeof(float));
    int16_t *sq = malloc((size_t)(n * (cols / 16)) * sizeof(int16_t));
    const int ok = q && dq && sq;
    if (ok) block_rows_int8(w, bt, rows, cols, x, n, y, rows, 0, q, dq, sq, (int)n_threads);
    free(q), free(dq), free(sq);
    return ok ? 0 : -1;
}

/* n floats -> bf16 (round to nearest even). */
static void to_bf16_row(const float *f, int64_t n, uint16_t *o) {
    int64_t i = 0;
#ifdef GEN_AVX512_BF16
    for (; i + 32 <= n; i += 32) _mm512_storeu_si512(o + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(f + i + 16), _mm512_loadu_ps(f + i)));
#endif
    for (; i < n; i++) o[i] = to_bf16(f[i]);
}

/* Rows [0, rows) of a block matrix -> fp32 (bf16 == 0) or bf16 (bf16 == 1, round to nearest even) in `out`
 * (rows, cols): a prompt's row tile, dequantized once per call into a cache-sized scratch that a GEMM then
 * reuses for every token. Rows split across threads; without a vector path for the type, each row goes through
 * a one-row fp32 buffer. Returns 0, or -1 when the type is not a block type (or, interleaved, rows is
 * not whole groups). */
int64_t gen_block_dequantize(const void *w, int64_t type, int64_t rows, int64_t cols, void *out, int64_t bf16,
                             int64_t n_threads) {
    enum { CHUNK = 256 }; /* a multiple of every block size: a row converts to bf16 a stack chunk at a time */
    const BlockType *bt = block_type(type);
    if (!bt || cols % bt->elems != 0) return -1;
    const int64_t rb = block_row_bytes(bt, cols), chunk_bytes = CHUNK / bt->elems * bt->bytes;
    if (bt->group && rows % bt->group) return -1;
    if (x16_float_paths(bt)) { /* whole groups of interleaved rows, from the first */
#pragma omp parallel for schedule(static) num_threads(n_threads)
        for (int64_t g = 0; g < rows / bt->group; g++) {
            const int64_t at = g * bt->group * cols;
            x16_dequantize_group((const uint8_t *)w + g * bt->group * rb, cols / 32, bf16 ? NULL : (float *)out + at,
                                 bf16 ? (uint16_t *)out + at : NULL, cols, bt->stored == T_Q4_1);
        }
        return 0;
    }
    if (bt->group) { /* interleaved Q4_K / Q5_K / Q8_0: each row read back stored, CHUNK elements at a time */
        const BlockType *st = &BLOCK_TYPES[bt->stored];
#pragma omp parallel for schedule(static) num_threads(n_threads)
        for (int64_t r = 0; r < rows; r++) {
            const uint8_t *grp = (const uint8_t *)w + r / X16_ROWS * X16_ROWS * rb;
            float *f = bf16 ? NULL : (float *)out + r * cols, tmp[CHUNK];
            uint8_t blocks[CHUNK / 32 * 34]; /* the most bytes CHUNK elements take stored (Q8_0's) */
            for (int64_t c = 0; c < cols; c += CHUNK) {
                const int64_t len = cols - c < CHUNK ? cols - c : CHUNK;
                x16_stored_blocks(bt, grp, (int)(r % X16_ROWS), c / bt->elems, len / bt->elems, blocks);
                st->dequantize(blocks, len, f ? f + c : tmp);
                if (!f) to_bf16_row(tmp, len, (uint16_t *)out + r * cols + c);
            }
        }
        return 0;
    }
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *row = (const uint8_t *)w + r * rb;
        float *f = bf16 ? NULL : (float *)out + r * cols;
        uint16_t *o = bf16 ? (uint16_t *)out + r * cols : NULL;
        if (bt->tile) {
            bt->tile(row, cols, f, o);
            continue;
        }
        if (!bf16) {
            bt->dequantize(row, cols, f);
            continue;
        }
        float tmp[CHUNK];
        for (int64_t c = 0; c < cols; c += CHUNK, row += chunk_bytes, o += CHUNK) {
            const int64_t len = cols - c < CHUNK ? cols - c : CHUNK;
            bt->dequantize(row, len, tmp);
            to_bf16_row(tmp, len, o);
        }
    }
    return 0;
}

/* The type a Q4_0 / Q4_1 / Q4_K / Q5_K / Q8_0 matrix is repacked to for decoding (blocks_x16.h, blocks_k16.h,
 * blocks_q8x16.h), when this build has a vector product for it (AVX-512 VNNI, or AVX2); else
 * -1 (the stored layout is as fast). */
int64_t gen_block_interleaved(int64_t type) {
#ifdef GEN_X16_VECTOR
    if (type == T_Q8_0) return T_Q8_0X16;
    if (type == T_Q4_0) return T_Q4_0X16;
    if (type == T_Q4_1) return T_Q4_1X16;
    if (type == T_Q4_K) return T_Q4_KX16;
    if (type == T_Q5_K) return T_Q5_KX16;
#endif
    (void)type;
    return -1;
}

/* 1 when this build multiplies a stored `type` matrix by a prompt in vector lanes (Q6_K on AVX-512 VNNI:
 * blocks_q6k16.h), which outruns the dequantized tiles' GEMM as the interleaved types' products do; else 0. */
int64_t gen_block_lanes(int64_t type) {
#ifdef GEN_BLOCKS_512
    return type == T_Q6_K;
#else
    (void)type;
    return 0;
#endif
}

/* Rows [0, rows) of a stored Q4_0 / Q4_1 / Q4_K / Q5_K / Q8_0 matrix (`type`; rows a multiple of 16) -> the interleaved
 * layout in dst (as many bytes, not overlapping src), groups split across threads. Returns 0, or -1 for another
 * type or shape. */
int64_t gen_block_repack(const void *src, int64_t type, int64_t rows, int64_t cols, void *dst, int64_t n_threads) {
    if ((type != T_Q4_0 && type != T_Q4_1 && type != T_Q4_K && type != T_Q5_K && type != T_Q8_0) || rows % X16_ROWS ||
        cols <= 0)
        return -1;
    const BlockType *bt = &BLOCK_TYPES[type];
    const int halves = x16_halves(type), words = (int)(bt->bytes - 2 * halves) / 4;
    if (cols % bt->elems) return -1;
    const int64_t nb = cols / bt->elems, rb = nb * bt->bytes, groups = rows / X16_ROWS;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t g = 0; g < groups; g++) x16_repack(src, rb, nb, g, g + 1, dst, halves, words);
    return 0;
}
