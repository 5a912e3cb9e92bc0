/* gen's fused CPU decode step: one new token per sequence through every layer in a single call.
 *
 * Decode at batch 1 is bound by reading the weights once per token; in PyTorch, the ~20 ops per layer
 * each cost microseconds of dispatch and its fp32 matrix-vector path streams well below the memory's
 * bandwidth. Here every matrix is read once, in row blocks split across OpenMP threads, and everything
 * between the matrices (norms, RoPE, attention over the KV cache, SwiGLU) runs in place on small
 * scratch buffers. The model is the one in gen_cli/model/transformer.py: pre-norm blocks, fused qkv, MHA/GQA/MQA,
 * RoPE (rotate-half) or an additive position table, RMSNorm or LayerNorm, SwiGLU with fused w1|w3.
 * Its streamed tensors (embedding, matrices, KV cache) are fp32 (matrices fp32 or int8), or all bf16 (a
 * `--dtype bfloat16` model); either way every sum and the scratch are fp32: bf16 is widened on load.
 *
 * gen_cli/infer/native/build.py compiles this file with the machine's C compiler (-O3 -march=native -fopenmp),
 * fills the structs below with pointers into the model's torch tensors, and checks the logits against
 * the PyTorch path in the tests. Compiled for the machine it runs on, so no vector ISA is assumed:
 * the dot products have AVX-512 (VNNI for int8) paths and portable loops, both tested.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#define GEN_AVX512 1
#endif
#if defined(__AVX512BW__) && defined(__AVX512VL__)
#define GEN_AVX512_BW 1 /* masked 16-bit loads */
#endif
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define GEN_VNNI 1
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdlib.h>

#include "blocks.h"

/* A weight matrix, row-major (rows, cols): the model's float dtype, int8 with one fp32 scale per row
 * (W = q * scale), or rows of GGML blocks (blocks.h). */
typedef struct {
    const void *data;
    const float *scale; /* int8 only */
    int64_t rows, cols;
    int64_t type; /* T_F32, T_BF16, T_I8 or a block type (blocks.h) */
} Matrix;

/* RMSNorm when bias is NULL, else LayerNorm. */
typedef struct {
    const float *weight, *bias;
} Norm;

typedef struct {
    Norm attn_norm, mlp_norm;
    Matrix wqkv, wo, w13, w2;
    void *k_cache, *v_cache; /* (batch, n_kv_head, max_tokens, head_dim), written at pos */
} Layer;

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
    int16_t *xq;   /* (batch, max(d_model, d_ff)) int16 copy of a matrix input (int8 weights) */
    float *xscale; /* (batch,) */
    /* Block-quantized weights (fp32 activations): the embedding's type, and the quantized matrix input. */
    int64_t emb_type; /* T_F32 / T_BF16 (as `bf16` says) or a block type: tok_emb is then (vocab, row bytes) */
    int8_t *aq;       /* (batch, width) */
    float *ad;        /* (batch, width / 32) */
    int16_t *asum;    /* (batch, width / 16) */
    double *profile;  /* NULL, or seconds accumulated per op class (PROFILE_KEYS in abi.py) */
} Model;

enum { P_EMBED, P_NORM, P_QKV, P_ROPE, P_ATTENTION, P_ATTN_OUT, P_MLP_IN, P_MLP_ACT, P_MLP_OUT, P_LM_HEAD, P_COUNT };

static inline double now(void) {
#ifdef _OPENMP
    return omp_get_wtime();
#else
    return 0.0;
#endif
}

/* ---- bfloat16: the top half of an fp32 --------------------------------------------------------------- */

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch's .to(torch.bfloat16) does; a NaN stays a NaN. */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* ---- matrix times a few vectors: y[b] = W x[b] (+ y[b] when accumulate) -------------------------- */

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

/* Block rows against the input quantized once per call (blocks.h). */
static void matmul_blocks(const Model *m, const Matrix *w, const float *x, float *y, int accumulate) {
    const int64_t rows = w->rows, cols = w->cols, batch = m->batch, type = w->type;
    const int64_t rb = block_row_bytes(type, cols);
    for (int64_t b = 0; b < batch; b++) {
        Act a = {m->aq + b * cols, m->ad + b * (cols / 32), m->asum + b * (cols / 16)};
        quantize_for(type, x + b * cols, cols, a);
    }
#pragma omp parallel for schedule(static) num_threads(m->n_threads)
    for (int64_t r0 = 0; r0 < rows; r0 += ROW_BLOCK) {
        int64_t r1 = r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows;
        for (int64_t b = 0; b < batch; b++) {
            Act a = {m->aq + b * cols, m->ad + b * (cols / 32), m->asum + b * (cols / 16)};
            for (int64_t r = r0; r < r1; r++) {
                float v = dot_block(type, (const uint8_t *)w->data + r * rb, a, cols);
                y[b * rows + r] = accumulate ? y[b * rows + r] + v : v;
            }
        }
    }
}

static void matmul(const Model *m, const Matrix *w, const float *x, float *y, int accumulate) {
    if (w->type > T_I8) {
        matmul_blocks(m, w, x, y, accumulate);
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

/* ---- the elementwise pieces ----------------------------------------------------------------------- */

static void norm(const Model *m, const Norm *p, const float *x, float *y) {
    const int64_t d = m->d_model;
    for (int64_t b = 0; b < m->batch; b++) {
        const float *xb = x + b * d;
        float *yb = y + b * d;
        float mean = 0.f, sq = 0.f;
        if (p->bias) {
            for (int64_t i = 0; i < d; i++) mean += xb[i];
            mean /= (float)d;
        }
        for (int64_t i = 0; i < d; i++) sq += (xb[i] - mean) * (xb[i] - mean);
        float inv = 1.f / sqrtf(sq / (float)d + m->norm_eps);
        for (int64_t i = 0; i < d; i++) yb[i] = (xb[i] - mean) * inv * p->weight[i] + (p->bias ? p->bias[i] : 0.f);
    }
}

/* Rotate each q and k head of every row: pair (i, i + half) turns by the table's angle at pos. */
static void rope(const Model *m, int64_t pos) {
    const int64_t hd = m->head_dim, half = hd / 2, heads = m->n_head + m->n_kv_head;
    const int64_t row = (m->n_head + 2 * m->n_kv_head) * hd;
    const float *cos = m->rope_cos + pos * hd, *sin = m->rope_sin + pos * hd;
    for (int64_t b = 0; b < m->batch; b++) {
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

/* Write this token's k and v into the cache at pos, then attend every query head to positions 0..pos. */
static void attention(const Model *m, const Layer *l, int64_t pos) {
    const int64_t hd = m->head_dim, H = m->n_head, Hkv = m->n_kv_head, T = m->max_tokens;
    const int64_t row = (H + 2 * Hkv) * hd, group = H / Hkv;
    const float scale = 1.f / sqrtf((float)hd);
    for (int64_t b = 0; b < m->batch; b++) {
        for (int64_t g = 0; g < Hkv; g++) {
            int64_t slot = ((b * Hkv + g) * T + pos) * hd;
            const float *k = m->qkv + b * row + (H + g) * hd, *v = k + Hkv * hd;
            if (m->bf16) {
                for (int64_t i = 0; i < hd; i++) {
                    ((uint16_t *)l->k_cache)[slot + i] = to_bf16(k[i]);
                    ((uint16_t *)l->v_cache)[slot + i] = to_bf16(v[i]);
                }
            } else {
                memcpy((float *)l->k_cache + slot, k, hd * sizeof(float));
                memcpy((float *)l->v_cache + slot, v, hd * sizeof(float));
            }
        }
    }
#pragma omp parallel for schedule(static) num_threads(m->n_threads)
    for (int64_t bh = 0; bh < m->batch * H; bh++) {
        int64_t b = bh / H, h = bh % H, g = h / group, head = (b * Hkv + g) * T * hd; /* this head's k, v */
        const float *q = m->qkv + b * row + h * hd;
        float *s = m->scores + bh * T, *out = m->att + b * H * hd + h * hd;
        float top = -INFINITY, sum = 0.f;
        for (int64_t t = 0; t <= pos; t++) {
            int64_t kt = head + t * hd;
            s[t] = (m->bf16 ? dot_bf16((const uint16_t *)l->k_cache + kt, q, hd)
                            : dot_f32((const float *)l->k_cache + kt, q, hd)) * scale;
            top = fmaxf(top, s[t]);
        }
        for (int64_t t = 0; t <= pos; t++) sum += s[t] = expf(s[t] - top);
        memset(out, 0, hd * sizeof(float));
        for (int64_t t = 0; t <= pos; t++) {
            float p = s[t] / sum;
            if (m->bf16) {
                const uint16_t *vt = (const uint16_t *)l->v_cache + head + t * hd;
                for (int64_t i = 0; i < hd; i++) out[i] += p * from_bf16(vt[i]);
            } else {
                const float *vt = (const float *)l->v_cache + head + t * hd;
                for (int64_t i = 0; i < hd; i++) out[i] += p * vt[i];
            }
        }
    }
}

/* h = silu(gate) * up, from ff = [gate | up] per row. */
static void swiglu(const Model *m) {
    const int64_t f = m->d_ff;
    for (int64_t b = 0; b < m->batch; b++) {
        const float *gate = m->ff + b * 2 * f, *up = gate + f;
        for (int64_t i = 0; i < f; i++) m->h[b * f + i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
    }
}

/* ---- the step --------------------------------------------------------------------------------------- */

/* Row b's token id is tokens[b * token_stride], at position pos (the cache holds 0..pos-1);
 * logits: (batch, vocab). */
void gen_decode_step(const Model *m, const int64_t *tokens, int64_t token_stride, int64_t pos, float *logits) {
    const int64_t d = m->d_model;
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
        if (is_block_type(m->emb_type))
            dequantize_row(m->emb_type, (const uint8_t *)m->tok_emb + tok * block_row_bytes(m->emb_type, d), d, x);
        else
            for (int64_t i = 0; i < d; i++)
                x[i] = m->bf16 ? from_bf16(((const uint16_t *)m->tok_emb)[tok * d + i]) : ((const float *)m->tok_emb)[tok * d + i];
        if (m->pos_table)
            for (int64_t i = 0; i < d; i++) x[i] += m->pos_table[pos * d + i];
    }
    MARK(P_EMBED)
    for (int64_t li = 0; li < m->n_layer; li++) {
        const Layer *l = &m->layers[li];
        norm(m, &l->attn_norm, m->x, m->h);
        MARK(P_NORM)
        matmul(m, &l->wqkv, m->h, m->qkv, 0);
        MARK(P_QKV)
        if (m->rope_cos) rope(m, pos);
        MARK(P_ROPE)
        attention(m, l, pos);
        MARK(P_ATTENTION)
        matmul(m, &l->wo, m->att, m->x, 1); /* the residual add rides on the output write */
        MARK(P_ATTN_OUT)
        norm(m, &l->mlp_norm, m->x, m->h);
        MARK(P_NORM)
        matmul(m, &l->w13, m->h, m->ff, 0);
        MARK(P_MLP_IN)
        swiglu(m);
        MARK(P_MLP_ACT)
        matmul(m, &l->w2, m->h, m->x, 1);
        MARK(P_MLP_OUT)
    }
    norm(m, &m->final_norm, m->x, m->h);
    MARK(P_NORM)
    matmul(m, &m->lm_head, m->h, logits, 0);
    MARK(P_LM_HEAD)
#undef MARK
}

/* Y (n, rows) = X (n, cols) W^T for a block matrix W (rows, row bytes): prompts and prefill. X is quantized once;
 * threads take tiles of rows, and each tile (a few KB) stays in cache while every token of a token tile passes
 * over it. Returns 0, or -1 when the type is not a block type or memory runs out. */
int64_t gen_block_matmul(const void *w, int64_t type, int64_t rows, int64_t cols, const float *x, int64_t n, float *y,
                         int64_t n_threads) {
    enum { ROW_TILE = 16, TOKEN_TILE = 64 };
    if (!is_block_type(type) || cols % BLOCK_ELEMS[type] != 0) return -1;
    const int64_t rb = block_row_bytes(type, cols);
    int8_t *q = malloc((size_t)(n * cols));
    float *dq = malloc((size_t)(n * (cols / 32)) * sizeof(float));
    int16_t *sq = malloc((size_t)(n * (cols / 16)) * sizeof(int16_t));
    if (!q || !dq || !sq) {
        free(q), free(dq), free(sq);
        return -1;
    }
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n; t++) {
            Act a = {q + t * cols, dq + t * (cols / 32), sq + t * (cols / 16)};
            quantize_for(type, x + t * cols, cols, a);
        }
#pragma omp for schedule(static) collapse(2)
        for (int64_t r0 = 0; r0 < rows; r0 += ROW_TILE) {
            for (int64_t t0 = 0; t0 < n; t0 += TOKEN_TILE) {
                int64_t r1 = r0 + ROW_TILE < rows ? r0 + ROW_TILE : rows, t1 = t0 + TOKEN_TILE < n ? t0 + TOKEN_TILE : n;
                for (int64_t t = t0; t < t1; t++) {
                    Act a = {q + t * cols, dq + t * (cols / 32), sq + t * (cols / 16)};
                    for (int64_t r = r0; r < r1; r++) y[t * rows + r] = dot_block(type, (const uint8_t *)w + r * rb, a, cols);
                }
            }
        }
    }
    free(q), free(dq), free(sq);
    return 0;
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

/* ---- ABI: what the Python side checks before it fills the structs ------------------------------------ */

/* Bump on any change to a struct or an exported signature above. */
#define GEN_ABI_VERSION 2

/* out[0] = version, then sizeof and one offset near the end of each struct: a field added, removed,
 * reordered or resized on one side only shows up as a mismatch here, before any pointer is read. */
void gen_abi(int64_t *out) {
    out[0] = GEN_ABI_VERSION;
    out[1] = (int64_t)sizeof(Matrix);
    out[2] = (int64_t)sizeof(Norm);
    out[3] = (int64_t)sizeof(Layer);
    out[4] = (int64_t)offsetof(Layer, v_cache);
    out[5] = (int64_t)sizeof(Model);
    out[6] = (int64_t)offsetof(Model, norm_eps);
    out[7] = (int64_t)offsetof(Model, lm_head);
    out[8] = (int64_t)offsetof(Model, xscale);
    out[9] = (int64_t)offsetof(Matrix, type);
    out[10] = (int64_t)offsetof(Model, profile);
}
