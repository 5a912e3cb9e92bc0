/* The kernel's ABI: the structs Python fills (gen_cli/native/abi.py mirrors them with ctypes) and the enums
 * whose values both sides share. The single source of both; abi.c exports their sizes and values so that
 * abi.py can check its mirrors before any struct is filled. Bump GEN_ABI_VERSION on any change to a struct,
 * an enum or an exported signature.
 */
#ifndef GEN_ABI_H
#define GEN_ABI_H

#include <stdint.h>

#define GEN_ABI_VERSION 17

/* Matrix.type: the step's own formats (the model's float dtype, int8 rows with a scale each), then GGML's
 * block formats (block_types.h) by their gen names (abi.py's MATRIX_TYPES). */
enum {
    T_FP32 = 0,
    T_BF16 = 1,
    T_INT8 = 2,
    T_Q8_0 = 3,
    T_Q4_0 = 4,
    T_Q4_1 = 5,
    T_Q4_K = 6,
    T_Q6_K = 7,
    T_Q5_0 = 8,
    T_Q5_1 = 9,
    T_Q4_0X16 = 10, /* Q4_0 / Q4_1 with 16 rows interleaved (blocks_x16.h), repacked at load */
    T_Q4_1X16 = 11,
    T_Q4_KX16 = 12, /* Q4_K with 16 rows interleaved (blocks_k16.h) */
    T_Q8_0X16 = 13, /* Q8_0 with 16 rows interleaved (blocks_q8x16.h) */
    T_Q5_K = 14,
    T_Q5_KX16 = 15, /* Q5_K with 16 rows interleaved (blocks_k16.h) */
    T_COUNT
};

/* How a layer stores K or V (gen_cli/cache/kinds.py): the model's own float dtype, int8 with one fp32
 * scale per token per head (x = q * scale), or int4 in groups of KV_GROUP along head_dim, two values a byte,
 * low nibble first, with an fp32 scale and zero point per group (x = q * scale + zero). */
enum { KV_FLOAT = 0, KV_INT8 = 1, KV_INT4 = 2, KV_BF16 = 3 }; /* KV_FLOAT: the model's dtype */
enum { KV_GROUP = 32 };

/* Model.act: what block-weight products multiply: the activations quantized to int8 per block (llama.cpp's way),
 * rounded to bf16 or fp32 as they are (blocks_float.h), or as two int8 rows, the second the int8 rounding of what
 * the first missed (matmul.h's block_rows_int8x2). */
enum { ACT_INT8 = 0, ACT_BF16 = 1, ACT_FP32 = 2, ACT_INT8X2 = 3 };

/* Model.profile's slots: where a step's time goes (abi.py's PROFILE_KEYS, in this order). */
enum { P_EMBED, P_NORM, P_QKV, P_ROPE, P_ATTENTION, P_ATTN_OUT, P_MLP_IN, P_MLP_ACT, P_MLP_OUT, P_LM_HEAD, P_COUNT };

/* A weight matrix, row-major (rows, cols): the model's float dtype, int8 with one fp32 scale per row
 * (W = q * scale), or rows of GGML blocks. */
typedef struct {
    const void *data;
    const float *scale; /* int8 only */
    int64_t rows, cols;
    int64_t type; /* T_FP32, T_BF16, T_INT8 or a block type */
} Matrix;

/* RMSNorm when bias is NULL, else LayerNorm. */
typedef struct {
    const float *weight, *bias;
} Norm;

typedef struct {
    Norm attn_norm, mlp_norm;
    Matrix wqkv, wo, w13, w2;
    void *k_cache, *v_cache; /* (batch, n_kv_head, max_tokens, head_dim) values (int4: head_dim / 2 bytes) */
    /* int8: scale (batch, n_kv_head, max_tokens); int4: scale and zero (.., max_tokens, head_dim / 32) each */
    float *k_scale, *k_zero, *v_scale, *v_zero;
    int64_t k_kind, v_kind; /* KV_FLOAT, KV_INT8, KV_INT4, KV_BF16 (all but KV_FLOAT in fp32 models only) */
    /* The rows of wqkv / w13 that follow the first part's, held in other block types (a Q4_K_M file's Q6_K
     * v after Q4_K q and k): each part in its own type, so a step reads no more than the file holds.
     * rows 0: no such part. */
    Matrix wqkv_rest[2], w13_rest;
} Layer;

/* One sequence's K and V in one layer, where the caller keeps each sequence's cache in its own memory
 * (gen_decode_rows with Model.slots set): Layer's stored forms for this sequence alone,
 * (n_kv_head, max_tokens, head_dim) values, scales and zero points as Layer describes them. */
typedef struct {
    void *k_cache, *v_cache;
    float *k_scale, *k_zero, *v_scale, *v_zero;
    int64_t max_tokens;
} KVSlot;

typedef struct {
    int64_t n_layer, n_head, n_kv_head, head_dim, d_model, d_ff, vocab, max_tokens, batch, n_threads;
    int64_t bf16; /* 1: embedding, matrices and KV cache are bfloat16; else fp32 (matrices fp32 or int8) */
    float norm_eps;
    const void *tok_emb;    /* (vocab, d_model) */
    const float *pos_table; /* (context, d_model) added to the embedding (sinusoidal, learned), or NULL */
    const float *rope_cos, *rope_sin; /* (context, head_dim) with rotate-half's sign folded in, or NULL */
    const Layer *layers;
    Norm final_norm;
    Matrix lm_head;
    /* Scratch, sized by the caller for `batch` rows. */
    float *x;      /* (batch, d_model) the residual stream */
    float *h;      /* (batch, max(d_model, d_ff)) a normed input / the SwiGLU product */
    float *qkv;    /* (batch, (n_head + 2 n_kv_head) head_dim) */
    float *att;    /* (batch, n_head head_dim) */
    float *ff;     /* (batch, 2 d_ff) */
    float *scores; /* (batch, n_head, max_tokens) */
    int16_t *xq;   /* (batch, max(d_model, d_ff)) int16 copy of a matrix input (int8 weights; ACT_BF16: its bf16) */
    float *xscale; /* (batch,) */
    /* Block-quantized weights: the embedding's type, and the matrix input as `act` prepares it (ACT_INT8: quantized). */
    int64_t emb_type; /* T_FP32 / T_BF16 (as `bf16` says) or a block type: tok_emb is then (vocab, row bytes) */
    int8_t *aq;       /* (batch, width) */
    float *ad;        /* (batch, width / 32); ACT_FP32/ACT_BF16: the input's sums per 32 */
    int16_t *asum;    /* (batch, width / 16) */
    double *profile;  /* NULL, or seconds accumulated per op class (P_* above) */
    /* Where gen_decode_rows' slot s lives: NULL, row s of each Layer's cache; else slots[layer * n_slots + s]
     * (max_tokens above is then the scores' stride: at least every slot's max_tokens). */
    const KVSlot *slots;
    int64_t n_slots;
    int64_t act; /* ACT_*: block weights' activations */
    /* A paged KV cache (gen_decode_rows, slots NULL): NULL, none; else each Layer's k_cache/v_cache (and their
     * scales and zero points) hold a pool of pool_blocks blocks of block_tokens tokens, laid out as Layer's cache
     * of one sequence whose pool_blocks * block_tokens slots are the blocks in order, (n_kv_head, pool_blocks *
     * block_tokens, head_dim) values: position t of slot s lives in block block_table[s * max_blocks +
     * t / block_tokens] at offset t % block_tokens. Consecutive blocks of a KV head are adjacent in memory. */
    const int32_t *block_table;
    int64_t block_tokens, max_blocks, pool_blocks;
    /* Logits for rows [logits_from, batch) only, row b written at logits + (b - logits_from) vocab: a prompt's
     * chunk needs its last row's (or none), and the head is the largest matrix. 0: every row. */
    int64_t logits_from;
} Model;

#endif
