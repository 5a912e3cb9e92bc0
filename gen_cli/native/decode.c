/* gen's fused CPU decode step: one new token per sequence through every layer in a single call.
 *
 * Decode at batch 1 is bound by reading the weights once per token; in PyTorch, the ~20 ops per layer
 * each cost microseconds of dispatch and its fp32 matrix-vector path streams well below the memory's
 * bandwidth. Here every matrix is read once, in row blocks split across OpenMP threads (matmul.h), and
 * everything between the matrices (norms, RoPE, attention over the KV cache, SwiGLU) runs in place on small
 * scratch buffers. The model is the one in gen_cli/model/transformer.py: pre-norm blocks, fused qkv, MHA/GQA/MQA,
 * RoPE (rotate-half) or an additive position table, RMSNorm or LayerNorm, SwiGLU with fused w1|w3.
 * Its streamed tensors (embedding, matrices, KV cache) are fp32 (matrices fp32 or int8), or all bf16 (a
 * `--dtype bfloat16` model), or GGML blocks (block_types.h); either way every sum and the scratch are fp32.
 *
 * gen_cli/native/build.py compiles the kernel's .c files with the machine's C compiler (-O3 -march=native
 * -fopenmp), fills the structs of abi.h with pointers into the model's torch tensors, and checks the logits
 * against the PyTorch path in the tests.
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime under -std=c11 */
#include <math.h>
#include <stdint.h>
#include <time.h>

#include "abi.h"
#include "attention.h"
#include "bf16.h"
#include "block_types.h"
#include "features.h"
#include "matmul.h"

static inline double now(void) { /* the profile's clock, with or without OpenMP */
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* ---- the elementwise pieces ----------------------------------------------------------------------- */

/* From this many rows on (a prompt's chunk, a large batch) the pieces below split their rows between the threads:
 * one thread ran them for 3% of a 1B model's prompt. Fewer rows (a decode step's) stay on the calling thread. Each
 * row's arithmetic is the same either way. */
enum { SPLIT_ROWS = 16 };

static void norm(const Model *m, const Norm *p, const float *x, float *y) {
    const int64_t d = m->d_model;
#pragma omp parallel for schedule(static) if (m->batch >= SPLIT_ROWS) num_threads(m->n_threads)
    for (int64_t b = 0; b < m->batch; b++) {
        const float *xb = x + b * d;
        float *yb = y + b * d;
        float mean = 0.f, sq = 0.f;
        /* simd reductions: in source order each row's sums were one serial chain of d adds (about 0.6 µs a row of
         * 576, 1.1 ms of a 32-row step of a 30-layer model); lane-wise partial sums take a tenth of that */
        if (p->bias) {
#pragma omp simd reduction(+ : mean)
            for (int64_t i = 0; i < d; i++) mean += xb[i];
            mean /= (float)d;
        }
#pragma omp simd reduction(+ : sq)
        for (int64_t i = 0; i < d; i++) sq += (xb[i] - mean) * (xb[i] - mean);
        float inv = 1.f / sqrtf(sq / (float)d + m->norm_eps);
        for (int64_t i = 0; i < d; i++) yb[i] = (xb[i] - mean) * inv * p->weight[i] + (p->bias ? p->bias[i] : 0.f);
    }
}

/* Rotate each q and k head of every row: pair (i, i + half) turns by the table's angle at the row's position. */
static void rope(const Model *m, const Rows *r) {
    const int64_t hd = m->head_dim, half = hd / 2, heads = m->n_head + m->n_kv_head;
    const int64_t row = (m->n_head + 2 * m->n_kv_head) * hd;
#pragma omp parallel for schedule(static) if (m->batch >= SPLIT_ROWS) num_threads(m->n_threads)
    for (int64_t b = 0; b < m->batch; b++) {
        const int64_t pos = row_pos(r, b);
        const float *cos = m->rope_cos + pos * hd, *sin = m->rope_sin + pos * hd;
        for (int64_t h = 0; h < heads; h++) {
            float *v = m->qkv + b * row + h * hd;
            for (int64_t i = 0; i < half; i++) {
                float a = v[i], c = v[i + half];
                v[i] = a * cos[i] + c * sin[i];
                v[i + half] = c * cos[i + half] + a * sin[i + half];
            }
        }
    }
}

/* h = silu(gate) * up, from ff = [gate | up] per row. 16 or 8 lanes at a time (AVX-512, AVX2): the scalar expf
 * loop took 3% of a 135M model's decode step and 5% of a batch of 8. */
static void swiglu(const Model *m) {
    const int64_t f = m->d_ff;
#pragma omp parallel for schedule(static) if (m->batch >= SPLIT_ROWS) num_threads(m->n_threads)
    for (int64_t b = 0; b < m->batch; b++) {
        const float *gate = m->ff + b * 2 * f, *up = gate + f;
        float *h = m->h + b * f;
        int64_t i = 0;
#ifdef GEN_AVX512
        const __m512 one = _mm512_set1_ps(1.f);
        for (; i + 16 <= f; i += 16) { /* sigmoid from e = e^-|g| (exp16 wants x <= 0): 1 / (1 + e), or e / (1 + e) for g < 0 */
            const __m512 g = _mm512_loadu_ps(gate + i), e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
            const __m512 top = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ), one, e);
            const __m512 silu = _mm512_mul_ps(g, _mm512_div_ps(top, _mm512_add_ps(one, e)));
            _mm512_storeu_ps(h + i, _mm512_mul_ps(silu, _mm512_loadu_ps(up + i)));
        }
#elif defined(GEN_AVX2_FMA) /* AVX2 without AVX-512 (attention.h's exp8): the scalar loop was 7% of a batch of 32, 135M shape */
        const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.f);
        for (; i + 8 <= f; i += 8) {
            const __m256 g = _mm256_loadu_ps(gate + i), e = exp8(_mm256_or_ps(g, sign)); /* e^-|g| */
            const __m256 top = _mm256_blendv_ps(one, e, _mm256_cmp_ps(g, zero, _CMP_LT_OQ));
            const __m256 silu = _mm256_mul_ps(g, _mm256_div_ps(top, _mm256_add_ps(one, e)));
            _mm256_storeu_ps(h + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
        }
#endif
        for (; i < f; i++) h[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
    }
}

/* ---- the step --------------------------------------------------------------------------------------- */

/* Whether the step multiplies a matrix of this type: the model's float dtype, int8, or a block type. */
static int known_matrix(const Matrix *w) {
    return w->type == T_FP32 || w->type == T_BF16 || w->type == T_INT8 || block_type(w->type) != NULL;
}

/* 0 when every matrix and the embedding have a type this kernel knows, else -1. */
static int64_t check_types(const Model *m) {
    if (m->emb_type != T_FP32 && m->emb_type != T_BF16 && !block_type(m->emb_type)) return -1;
    if (block_type(m->emb_type) && block_type(m->emb_type)->group) return -1; /* its rows are read one by one */
    if (!known_matrix(&m->lm_head)) return -1;
    for (int64_t li = 0; li < m->n_layer; li++) {
        const Layer *l = &m->layers[li];
        if (!known_matrix(&l->wqkv) || !known_matrix(&l->wo) || !known_matrix(&l->w13) || !known_matrix(&l->w2))
            return -1;
        if (!parts_ok(&l->wqkv, l->wqkv_rest, 2) || !parts_ok(&l->w13, &l->w13_rest, 1)) return -1;
    }
    return 0;
}

/* The step over m->batch rows, row b at position row_pos(r, b) of slot row_slot(r, b). */
static int64_t step(const Model *m, const int64_t *tokens, int64_t token_stride, const Rows *r, float *logits) {
    if (check_types(m)) return -1;
    const int64_t d = m->d_model;
    const BlockType *emb = block_type(m->emb_type);
    double *prof = m->profile, t0 = prof ? now() : 0.0;
    /* Seconds since the last mark go to op class k; one untaken branch per op when profiling is off. */
#define MARK(k)                      \
    if (prof) {                      \
        double t1 = now();           \
        prof[k] += t1 - t0;          \
        t0 = t1;                     \
    }
    for (int64_t b = 0; b < m->batch; b++) {
        const int64_t tok = tokens[b * token_stride];
        float *x = m->x + b * d;
        if (emb)
            emb->dequantize((const uint8_t *)m->tok_emb + tok * block_row_bytes(emb, d), d, x);
        else
            for (int64_t i = 0; i < d; i++)
                x[i] = m->bf16 ? from_bf16(((const uint16_t *)m->tok_emb)[tok * d + i]) : ((const float *)m->tok_emb)[tok * d + i];
        if (m->pos_table) {
            const float *add = m->pos_table + row_pos(r, b) * d;
            for (int64_t i = 0; i < d; i++) x[i] += add[i];
        }
    }
    MARK(P_EMBED)
    for (int64_t li = 0; li < m->n_layer; li++) {
        const Layer *l = &m->layers[li];
        norm(m, &l->attn_norm, m->x, m->h);
        MARK(P_NORM)
        matmul_parts(m, &l->wqkv, l->wqkv_rest, 2, m->h, m->qkv, 0);
        MARK(P_QKV)
        if (m->rope_cos) rope(m, r);
        MARK(P_ROPE)
        if (attention(m, l, li, r)) return -2; /* a prompt's rows the tiles did not take: the cache is half written */
        MARK(P_ATTENTION)
        matmul(m, &l->wo, m->att, m->x, 1); /* the residual add rides on the output write */
        MARK(P_ATTN_OUT)
        norm(m, &l->mlp_norm, m->x, m->h);
        MARK(P_NORM)
        matmul_parts(m, &l->w13, &l->w13_rest, 1, m->h, m->ff, 0);
        MARK(P_MLP_IN)
        swiglu(m);
        MARK(P_MLP_ACT)
        matmul(m, &l->w2, m->h, m->x, 1);
        MARK(P_MLP_OUT)
    }
    norm(m, &m->final_norm, m->x, m->h);
    MARK(P_NORM)
    if (m->logits_from < m->batch) { /* the head on rows [logits_from, batch) only */
        Model head = *m;
        head.batch = m->batch - m->logits_from;
        matmul(&head, &m->lm_head, m->h + m->logits_from * d, logits, 0);
    }
    MARK(P_LM_HEAD)
#undef MARK
    return 0;
}

/* Row b's token id is tokens[b * token_stride], at position pos of cache row b (the cache holds 0..pos-1);
 * logits: (batch, vocab). Returns 0, or -1 (nothing computed) when a matrix's type is not one this kernel knows
 * (gen_prompt_rows: -2 when the prompt kernel's tiles did not take the rows). */
int64_t gen_decode_step(const Model *m, const int64_t *tokens, int64_t token_stride, int64_t pos, float *logits) {
    const Rows r = {NULL, NULL, pos, 0};
    return step(m, tokens, token_stride, &r, logits);
}

/* As gen_decode_step, with row b at its own position pos[b] of its own slot slot[b] (attention.h's Rows):
 * every row's k and v are stored before any row attends, so rows of one slot at consecutive positions are
 * a causal multi-token forward and rows of different slots a ragged batch. */
int64_t gen_decode_rows(const Model *m, const int64_t *tokens, int64_t token_stride, const int64_t *pos,
                        const int64_t *slot, float *logits) {
    const Rows r = {pos, slot, 0, 0};
    return step(m, tokens, token_stride, &r, logits);
}

/* As gen_decode_rows for a prompt's tokens: rows at consecutive positions of one slot of a contiguous fp32 cache,
 * whose attention takes the prompt kernel's tiles (attention.h's prompt_tiles), in another summation order than a
 * row alone. The tiles need no scores scratch: `batch` may exceed the rows Model.scores holds. -2 when the tiles do
 * not take the rows (another cache layout, head_dim past 256, no memory), the cache then partly written. */
int64_t gen_prompt_rows(const Model *m, const int64_t *tokens, int64_t token_stride, const int64_t *pos,
                        const int64_t *slot, float *logits) {
    const Rows r = {pos, slot, 0, 1};
    return step(m, tokens, token_stride, &r, logits);
}

/* out[b * out_stride] = the first index of row b's largest logit, as torch.argmax picks it (a NaN
 * counts as the largest). Rows are row_stride floats apart (0: one row shared by every sequence).
 * Greedy decoding's pick, done here because torch's argmax is a scalar loop (~20 µs over 32k logits). */
void gen_argmax(const float *logits, int64_t batch, int64_t row_stride, int64_t vocab, int64_t *out,
                int64_t out_stride) {
    enum { CHUNK = 64 };
    for (int64_t b = 0; b < batch; b++) {
        const float *row = logits + b * row_stride;
        float top = -INFINITY;
        int nan = 0;
#pragma omp simd reduction(max : top) reduction(| : nan)
        for (int64_t i = 0; i < vocab; i++) {
            top = row[i] > top ? row[i] : top;
            nan |= row[i] != row[i];
        }
        int64_t c = 0;
        if (nan) { /* rare: the first NaN wins */
            while (row[c] == row[c]) c++;
        } else { /* the first match: a vector test per chunk, then a scalar scan inside the hit chunk */
            for (; c + CHUNK < vocab; c += CHUNK) {
                int hit = 0;
#pragma omp simd reduction(| : hit)
                for (int64_t j = 0; j < CHUNK; j++) hit |= row[c + j] == top;
                if (hit) break;
            }
            while (row[c] != top) c++;
        }
        out[b * out_stride] = c;
    }
}
