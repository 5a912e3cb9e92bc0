/* GGML's block formats, one row each in one traits table (as ggml-cpu's type_traits): a block's size, the
 * activation quantizer its dot product wants, the dot products, and dequantization. Every per-type choice in
 * the kernel is a lookup here; a type without a row is an error, reported by the entry points.
 */
#ifndef GEN_BLOCK_TYPES_H
#define GEN_BLOCK_TYPES_H

#include <stddef.h>
#include <stdint.h>

#include "abi.h"
#include "blocks_32.h"
#include "blocks_batch.h"
#include "blocks_common.h"
#include "blocks_k.h"
#include "blocks_k16.h"
#include "blocks_q6k16.h"
#include "blocks_q8x16.h"
#include "blocks_x16.h"
#include "features.h"

/* Rows (nb blocks each, `stride` bytes apart) dotted with one activation row: out[k] = row k . a. */
typedef void (*BlockDot4)(const uint8_t *restrict w, int64_t stride, Act a, int64_t nb, float out[4]);
/* nrows rows (<= 4, `stride` bytes apart) against activation rows b0 .. b0 + nj - 1 (nj <= BATCH_J) of x:
 * out[r * BATCH_J + j] = row r . x_{b0 + j} (blocks_batch.h). */
typedef void (*BlockBatch)(const uint8_t *w, int64_t stride, int nrows, Batch x, int64_t b0, int nj, int64_t nb,
                           float *out);

typedef struct {
    int64_t elems, bytes;                                          /* one block: elements, bytes */
    void (*quantize_act)(const float *restrict x, int64_t n, Act a); /* the activation row its dots read */
    float (*dot)(const uint8_t *restrict row, Act a, int64_t nb);  /* one row of nb blocks . a */
    BlockDot4 dot4; /* four rows streamed from memory; NULL: dot row by row */
    void (*dequantize)(const uint8_t *restrict row, int64_t cols, float *restrict out); /* a row -> fp32 */
    /* A row -> fp32 (f) or bf16 (h, when f is NULL) in vector registers; NULL: dequantize, then convert. */
    void (*tile)(const uint8_t *restrict row, int64_t cols, float *f, uint16_t *h);
    /* Several activation rows at once: the bytes of one row's prepared copy for nb blocks, the preparation
     * (once per matmul), the product. NULL: the one-row dots per activation row. */
    int64_t (*batch_prep_bytes)(int64_t nb);
    void (*batch_prep)(Act a, int64_t nb, uint8_t *out);
    BlockBatch batch;
    /* Rows interleaved in groups (blocks_x16.h, blocks_k16.h): 16, and the type the file stores them in (whose
     * arithmetic the layout keeps); the row entries above are then NULL (a row's bytes are spread over its group)
     * and the products are those headers'. 0: rows as GGUF stores them. */
    int64_t group, stored;
} BlockType;

#ifdef GEN_BLOCKS_512
#define Q45_DOT4(NAME) dot4_##NAME
#else
#define Q45_DOT4(NAME) NULL
#endif
#ifdef GEN_AVX512_BW
#define TILE(NAME) tile_##NAME
#else
#define TILE(NAME) NULL
#endif
#if defined(GEN_AVX512_BW) || defined(GEN_AVX2_FMA) /* blocks_k.h: Q6_K's tile has an AVX2 path too */
#define TILE_Q6_K tile_q6_k
#else
#define TILE_Q6_K NULL
#endif
#ifdef GEN_BLOCKS_512
#define BATCH(NAME, PREP) batch_prep_bytes_##PREP, batch_prep_##NAME, batch_##NAME
#else
#define BATCH(NAME, PREP) NULL, NULL, NULL
#endif
#if defined(GEN_BLOCKS_512) || defined(GEN_BLOCKS_256) /* Q6_K's batch kernel has an AVX2 path too */
#define BATCH_Q6_K batch_prep_bytes_q6_k, batch_prep_q6_k, batch_q6_k
#else
#define BATCH_Q6_K NULL, NULL, NULL
#endif

/* Streamed from memory, Q8_0 and the k-quants run faster row by row (measured: four interleaved Q8_0 rows read
 * 10 GB/s on one core, one row at a time 27), so they have no four-row pass. */
static const BlockType BLOCK_TYPES[T_COUNT] = {
    [T_Q8_0] = {32, 34, quantize_act_32, dot_q8_0, NULL, dequantize_q8_0, TILE(q8_0), BATCH(q8_0, q8_0)},
    [T_Q4_0] = {32, 18, quantize_act_32, dot_q4_0, Q45_DOT4(q4_0), dequantize_q4_0, TILE(q4_0), BATCH(q4_0, q45)},
    [T_Q4_1] = {32, 20, quantize_act_32, dot_q4_1, Q45_DOT4(q4_1), dequantize_q4_1, TILE(q4_1), BATCH(q4_1, q45)},
    [T_Q5_0] = {32, 22, quantize_act_32, dot_q5_0, Q45_DOT4(q5_0), dequantize_q5_0, NULL, BATCH(q5_0, q45)},
    [T_Q5_1] = {32, 24, quantize_act_32, dot_q5_1, Q45_DOT4(q5_1), dequantize_q5_1, NULL, BATCH(q5_1, q45)},
    [T_Q4_K] = {256, 144, quantize_act_256, dot_q4_k, NULL, dequantize_q4_k, NULL, BATCH(q4_k, q4_k)},
    [T_Q6_K] = {256, 210, quantize_act_256, dot_q6_k, NULL, dequantize_q6_k, TILE_Q6_K, BATCH_Q6_K},
    [T_Q5_K] = {256, 176, quantize_act_256, dot_q5_k, NULL, dequantize_q5_k, NULL, NULL, NULL, NULL},
    [T_Q4_0X16] = {32, 18, quantize_act_32, NULL, NULL, NULL, NULL, NULL, NULL, NULL, X16_ROWS, T_Q4_0},
    [T_Q4_1X16] = {32, 20, quantize_act_32, NULL, NULL, NULL, NULL, NULL, NULL, NULL, X16_ROWS, T_Q4_1},
    [T_Q4_KX16] = {256, 144, quantize_act_256, NULL, NULL, NULL, NULL, NULL, NULL, NULL, X16_ROWS, T_Q4_K},
    [T_Q5_KX16] = {256, 176, quantize_act_256, NULL, NULL, NULL, NULL, NULL, NULL, NULL, X16_ROWS, T_Q5_K},
    [T_Q8_0X16] = {32, 34, quantize_act_32, NULL, NULL, NULL, NULL, NULL, NULL, NULL, X16_ROWS, T_Q8_0},
};
#undef Q45_DOT4
#undef TILE
#undef TILE_Q6_K
#undef BATCH

/* The traits of a block type, or NULL when `type` is not one (the step's own formats, or unknown). */
static inline const BlockType *block_type(int64_t type) {
    return type >= 0 && type < T_COUNT && (BLOCK_TYPES[type].dot || BLOCK_TYPES[type].group) ? &BLOCK_TYPES[type] : NULL;
}

static inline int64_t block_row_bytes(const BlockType *t, int64_t cols) { return cols / t->elems * t->bytes; }

/* An interleaved Q4_0 / Q4_1 type: its float-activation product and dequantization are blocks_x16.h's own (an
 * interleaved Q4_K's, Q5_K's or Q8_0's read its rows back in the stored layout and run that layout's code). */
static inline int x16_float_paths(const BlockType *t) { return t->group && (t->stored == T_Q4_0 || t->stored == T_Q4_1); }

/* The fp16 fields a stored block of an interleaved type begins with (x16_repack's `halves`; its words follow). */
static inline int x16_halves(int64_t stored) {
    return stored == T_Q4_1 || stored == T_Q4_K || stored == T_Q5_K ? 2 : 1;
}

/* Blocks [b0, b0 + n) of row l of an interleaved type's group (grp: the group's first block), as the stored type
 * lays them out, into out (n blocks of t->bytes). */
static inline void x16_stored_blocks(const BlockType *t, const uint8_t *restrict grp, int l, int64_t b0, int64_t n,
                                     uint8_t *restrict out) {
    const int halves = x16_halves(t->stored), words = (int)(t->bytes - 2 * halves) / 4;
    for (int64_t b = 0; b < n; b++) x16_row(grp + (b0 + b) * X16_ROWS * t->bytes, l, halves, words, out + b * t->bytes);
}

/* Four rows (`stride` bytes apart) dotted with `a`: out[k] = row k . a. */
static inline void block_dot4(const BlockType *t, const uint8_t *w, int64_t stride, Act a, int64_t cols, float out[4]) {
    const int64_t nb = cols / t->elems;
    BlockDot4 four = t->dot4;
    if (four) {
        four(w, stride, a, nb, out);
        return;
    }
    for (int k = 0; k < 4; k++) out[k] = t->dot(w + k * stride, a, nb);
}

#endif
