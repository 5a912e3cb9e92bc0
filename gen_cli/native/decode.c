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
 * gen_cli/native/build.py compiles this file with the machine's C compiler (-O3 -march=native -fopenmp),
 * fills the structs below with pointers into the model's torch tensors, and checks the logits against
 * the PyTorch path in the tests. Compiled for the machine it runs on, so no vector ISA is assumed:
 * the dot products have AVX-512 (VNNI for int8) paths and portable loops, both tested.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
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

/* How a layer stores K or V (gen_cli/cache/kinds.py): the model's own float dtype, int8 with one fp32
 * scale per token per head (x = q * scale), or int4 in groups of 32 along head_dim, two values a byte, low
 * nibble first, with an fp32 scale and zero point per group (x = q * scale + zero). */
enum { KV_FLOAT = 0, KV_INT8 = 1, KV_INT4 = 2 };
enum { KV_GROUP = 32 };

typedef struct {
    Norm attn_norm, mlp_norm;
    Matrix wqkv, wo, w13, w2;
    void *k_cache, *v_cache; /* (batch, n_kv_head, max_tokens, head_dim) values (int4: head_dim / 2 bytes) */
    /* int8: scale (batch, n_kv_head, max_tokens); int4: scale and zero (.., max_tokens, head_dim / 32) each */
    float *k_scale, *k_zero, *v_scale, *v_zero;
    int64_t k_kind, v_kind; /* KV_FLOAT, KV_INT8, KV_INT4 (KV_INT* in fp32 models only) */
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
            float v[ROW_BLOCK];
            if (r1 - r0 == ROW_BLOCK)
                dot4_block(type, (const uint8_t *)w->data + r0 * rb, rb, a, cols, v, 0);
            else
                for (int64_t r = r0; r < r1; r++) v[r - r0] = dot_block(type, (const uint8_t *)w->data + r * rb, a, cols);
            for (int64_t r = r0; r < r1; r++) y[b * rows + r] = accumulate ? y[b * rows + r] + v[r - r0] : v[r - r0];
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

/* ---- attention over the KV cache ---------------------------------------------------------------------- */

/* Store one head's k or v (hd values) as token `row` of its cache (row = (b n_kv_head + g) max_tokens + pos),
 * quantised exactly as KVSide.write does: the same fp32 divisions, rounded half to even (as torch.round). */
static void kv_store(int64_t kind, int bf16, void *data, float *scale, float *zero, int64_t row, const float *x,
                     int64_t hd) {
    if (kind == KV_INT8) {
        float amax = 0.f;
        for (int64_t i = 0; i < hd; i++) amax = fmaxf(amax, fabsf(x[i]));
        const float s = fmaxf(amax, 1e-12f) / 127.f; /* symmetric: the largest |x| maps to 127 */
        int8_t *q = (int8_t *)data + row * hd;
        for (int64_t i = 0; i < hd; i++) q[i] = (int8_t)fminf(fmaxf(nearbyintf(x[i] / s), -127.f), 127.f);
        scale[row] = s;
    } else if (kind == KV_INT4) {
        const int64_t G = hd / KV_GROUP;
        uint8_t *q = (uint8_t *)data + row * (hd / 2);
        for (int64_t g = 0; g < G; g++) {
            const float *xg = x + g * KV_GROUP;
            float lo = xg[0], hi = xg[0];
            for (int i = 1; i < KV_GROUP; i++) lo = fminf(lo, xg[i]), hi = fmaxf(hi, xg[i]);
            const float s = fmaxf((hi - lo) / 15.f, 1e-12f);
            for (int i = 0; i < KV_GROUP; i += 2) {
                int a = (int)fminf(fmaxf(nearbyintf((xg[i] - lo) / s), 0.f), 15.f);
                int c = (int)fminf(fmaxf(nearbyintf((xg[i + 1] - lo) / s), 0.f), 15.f);
                q[g * KV_GROUP / 2 + i / 2] = (uint8_t)(a | c << 4); /* low nibble first */
            }
            scale[row * G + g] = s;
            zero[row * G + g] = lo;
        }
    } else if (bf16) {
        for (int64_t i = 0; i < hd; i++) ((uint16_t *)data)[row * hd + i] = to_bf16(x[i]);
    } else {
        memcpy((float *)data + row * hd, x, hd * sizeof(float));
    }
}

/* One KV head's side as attention reads it: `data`, `scale`, `zero` point at its token 0. */
typedef struct {
    int kind; /* KV_FLOAT, KV_INT8, KV_INT4, or KV_BF16: a bf16 model's float cache */
    const void *data;
    const float *scale, *zero;
} KVHead;
enum { KV_BF16 = 3 };

static KVHead kv_head(int64_t kind, int bf16, const void *data, const float *scale, const float *zero,
                      int64_t head, int64_t T, int64_t hd) {
    KVHead r = {(int)kind, NULL, NULL, NULL};
    const int64_t first = head * T; /* this head's token 0 */
    if (kind == KV_INT8) {
        r.data = (const int8_t *)data + first * hd, r.scale = scale + first;
    } else if (kind == KV_INT4) {
        r.data = (const uint8_t *)data + first * (hd / 2);
        r.scale = scale + first * (hd / KV_GROUP), r.zero = zero + first * (hd / KV_GROUP);
    } else if (bf16) {
        r.kind = KV_BF16, r.data = (const uint16_t *)data + first * hd;
    } else {
        r.data = (const float *)data + first * hd;
    }
    return r;
}

/* Element i of token t, dequantised (the portable path; int8 unscaled: its scale multiplies whole dots). */
static inline float kv_at(const KVHead *kv, int64_t t, int64_t i, int64_t hd) {
    switch (kv->kind) {
    case KV_INT8: return (float)((const int8_t *)kv->data)[t * hd + i];
    case KV_INT4: {
        const uint8_t byte = ((const uint8_t *)kv->data)[t * (hd / 2) + i / 2];
        const int64_t g = t * (hd / KV_GROUP) + i / KV_GROUP;
        return (float)(i & 1 ? byte >> 4 : byte & 15) * kv->scale[g] + kv->zero[g];
    }
    case KV_BF16: return from_bf16(((const uint16_t *)kv->data)[t * hd + i]);
    default: return ((const float *)kv->data)[t * hd + i];
    }
}

/* The attention of `nq` query heads that share one KV head, over the tokens [t0, t1) of one chunk:
 * s[i][t] gets the scores, then the unnormalised softmax weights exp(score - top[i]); o[i] (hd) gets
 * sum_t weight v_t, sum[i] the sum of the weights. */
typedef struct {
    const float *const *q;
    float *const *s, *const *o;
    float *top, *sum;
    int64_t t0, t1, hd;
    float scale; /* 1 / sqrt(hd) */
} Chunk;

static void chunk_portable(const Chunk *c, int nq, const KVHead *k, const KVHead *v) {
    const int64_t hd = c->hd;
    for (int i = 0; i < nq; i++) {
        float top = -INFINITY, sum = 0.f, *s = c->s[i], *o = c->o[i];
        for (int64_t t = c->t0; t < c->t1; t++) {
            float dot = 0.f;
            for (int64_t d = 0; d < hd; d++) dot += kv_at(k, t, d, hd) * c->q[i][d];
            s[t] = dot * c->scale * (k->kind == KV_INT8 ? k->scale[t] : 1.f);
            top = fmaxf(top, s[t]);
        }
        for (int64_t t = c->t0; t < c->t1; t++) sum += s[t] = expf(s[t] - top);
        memset(o, 0, hd * sizeof(float));
        for (int64_t t = c->t0; t < c->t1; t++) {
            const float p = s[t] * (v->kind == KV_INT8 ? v->scale[t] : 1.f);
            for (int64_t d = 0; d < hd; d++) o[d] += p * kv_at(v, t, d, hd);
        }
        c->top[i] = top, c->sum[i] = sum;
    }
}

#ifdef GEN_AVX512
#define ALWAYS_INLINE static inline __attribute__((always_inline))
enum { NQ_MAX = 4, HD_MAX = 256 };

/* Lanes [16 j, 16 j + 16) of token t, dequantised in registers. int4 lanes run in nibble order: slice 2g
 * holds group g's even elements (low nibbles), slice 2g + 1 its odd ones; int8 stays unscaled. */
ALWAYS_INLINE __m512 kv_load16(const int kind, const KVHead *kv, int64_t t, const int64_t hd, int64_t j) {
    if (kind == KV_INT8)
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)kv->data + t * hd + 16 * j))));
    if (kind == KV_INT4) {
        const int64_t G = hd / KV_GROUP, g = j / 2;
        __m512i bytes = _mm512_cvtepu8_epi32(
            _mm_loadu_si128((const __m128i *)((const uint8_t *)kv->data + t * (hd / 2) + 16 * g)));
        __m512i nib = j & 1 ? _mm512_srli_epi32(bytes, 4) : _mm512_and_si512(bytes, _mm512_set1_epi32(15));
        return _mm512_fmadd_ps(_mm512_cvtepi32_ps(nib), _mm512_set1_ps(kv->scale[t * G + g]),
                               _mm512_set1_ps(kv->zero[t * G + g]));
    }
    if (kind == KV_BF16) {
        __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)kv->data + t * hd + 16 * j)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    }
    return _mm512_loadu_ps((const float *)kv->data + t * hd + 16 * j);
}

/* The 16 horizontal sums of v[0..15], in order: a transposing add tree (45 shuffles and adds for 16
 * dot products, against ~8 each for a separate reduction). */
ALWAYS_INLINE __m512 sum16_with(const __m512 *v, const int ints) {
#define ADD(a, b) (ints ? _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b))) \
                        : _mm512_add_ps(a, b))
    __m512 r[8], u[4], w[2];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3) */
        r[i] = ADD(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per lane: the lane's sums of 4 consecutive vectors */
        u[i] = ADD(_mm512_shuffle_ps(r[2 * i], r[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                   _mm512_shuffle_ps(r[2 * i], r[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++)
        w[i] = ADD(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                   _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return ADD(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
               _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
#undef ADD
}
#define sum16(v) sum16_with(v, 0)
/* int32 sums of int32 lanes (carried in fp32 registers): exact, converted once per 16 tokens. */
#define sum16_int(v) _mm512_cvtepi32_ps(_mm512_castps_si512(sum16_with(v, 1)))

/* e^x for x <= 0 (scores minus their maximum), within 2 ulp: x = n ln2 + r, |r| <= ln2 / 2, a degree-7
 * polynomial for e^r (Cephes' expf), then scaled by 2^n. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f)); /* below this e^x is 0 in fp32; keeps n finite */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

enum { V_BLOCK = 128 }; /* tokens whose V weights (times their scales) are prepared at once */

/* Group g of tokens [t, t + 16) as one vector, from x at token t, laid out (token, G groups); lanes off in
 * m (a prefix) stay 0. Two groups (head_dim 64) deinterleave with one permute; other counts gather. */
ALWAYS_INLINE __m512 group_lanes(const float *x, const int64_t G, int64_t g, __mmask16 m) {
    if (G == 1) return _mm512_maskz_loadu_ps(m, x);
    if (G == 2) {
        const int n = __builtin_popcount(m); /* m is a prefix: the first n tokens, 2n floats */
        const uint32_t m2 = n >= 16 ? 0xFFFFFFFFu : (1u << 2 * n) - 1;
        const __m512 a = _mm512_maskz_loadu_ps((__mmask16)m2, x), b = _mm512_maskz_loadu_ps((__mmask16)(m2 >> 16), x + 16);
        const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        return _mm512_permutex2var_ps(a, _mm512_add_epi32(even, _mm512_set1_epi32((int)g)), b);
    }
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, _mm512_mullo_epi32(iota, _mm512_set1_epi32((int)G)), x + g, 4);
}

#ifdef GEN_VNNI
/* Integer K (int8, int4): the queries rounded to int16 with one scale per head (relative error <= 2^-16,
 * as the int8 matrices' inputs are), so that vpdpwssd multiplies 32 stored values a step with no
 * conversion to fp32. int4: score = scale_g sum(nibble q) + zero_g sum(q) per group of 32. */
ALWAYS_INLINE void scores_int(const Chunk *c, const int nq, const int kk, const KVHead *k, const int64_t hd) {
    if (nq > NQ_MAX || hd > HD_MAX) __builtin_unreachable(); /* the callers' limits */
    const int64_t G = hd / KV_GROUP, t0 = c->t0, t1 = c->t1;
    int16_t q16[NQ_MAX][HD_MAX] __attribute__((aligned(64)));
    float qscale[NQ_MAX], qsum[NQ_MAX][HD_MAX / KV_GROUP];
    for (int i = 0; i < nq; i++) {
        const float *q = c->q[i];
        float amax = 0.f;
        for (int64_t d = 0; d < hd; d++) amax = fmaxf(amax, fabsf(q[d]));
        qscale[i] = amax > 0.f ? amax / 32767.f : 1.f;
        for (int64_t g = 0; g < G; g++) qsum[i][g] = 0.f;
        for (int64_t d = 0; d < hd; d++) {
            const int64_t at = kk == KV_INT4 ? d - d % KV_GROUP + (d % 2) * 16 + d % KV_GROUP / 2 : d;
            q16[i][at] = (int16_t)lrintf(q[d] / qscale[i]);
            if (kk == KV_INT4) qsum[i][d / KV_GROUP] += q[d];
        }
    }
    int64_t t = t0;
    for (; t + 16 <= t1; t += 16) {
        __m512 acc[NQ_MAX][16];
        for (int u = 0; u < 16; u++) {
            if (kk == KV_INT8) {
                __m512i a[NQ_MAX];
                for (int i = 0; i < nq; i++) a[i] = _mm512_setzero_si512();
                for (int64_t j = 0; j < hd / 32; j++) {
                    const __m512i x = _mm512_cvtepi8_epi16(
                        _mm256_loadu_si256((const __m256i *)((const int8_t *)k->data + (t + u) * hd + 32 * j)));
                    for (int i = 0; i < nq; i++)
                        a[i] = _mm512_dpwssd_epi32(a[i], x, _mm512_load_si512((const void *)(q16[i] + 32 * j)));
                }
                for (int i = 0; i < nq; i++) acc[i][u] = _mm512_castsi512_ps(a[i]);
            } else {
                __m512 f[NQ_MAX];
                for (int i = 0; i < nq; i++) f[i] = _mm512_setzero_ps();
                for (int64_t g = 0; g < G; g++) {
                    const __m256i b = _mm256_cvtepu8_epi16(
                        _mm_loadu_si128((const __m128i *)((const uint8_t *)k->data + (t + u) * (hd / 2) + 16 * g)));
                    const __m512i x = _mm512_inserti64x4(
                        _mm512_castsi256_si512(_mm256_and_si256(b, _mm256_set1_epi16(15))), _mm256_srli_epi16(b, 4), 1);
                    const __m512 s = _mm512_set1_ps(k->scale[(t + u) * G + g]);
                    for (int i = 0; i < nq; i++) {
                        __m512i d = _mm512_madd_epi16(x, _mm512_load_si512((const void *)(q16[i] + 32 * g)));
                        f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, f[i]);
                    }
                }
                for (int i = 0; i < nq; i++) acc[i][u] = f[i];
            }
        }
        const __m512 attn = _mm512_set1_ps(c->scale);
        __m512 zero[HD_MAX / KV_GROUP];
        for (int64_t g = 0; kk == KV_INT4 && g < G; g++) zero[g] = group_lanes(k->zero + t * G, G, g, 0xFFFF);
        for (int i = 0; i < nq; i++) {
            __m512 s = _mm512_mul_ps(kk == KV_INT8 ? sum16_int(acc[i]) : sum16(acc[i]), _mm512_set1_ps(qscale[i]));
            if (kk == KV_INT8) {
                s = _mm512_mul_ps(s, _mm512_loadu_ps(k->scale + t));
            } else {
                for (int64_t g = 0; g < G; g++) s = _mm512_fmadd_ps(zero[g], _mm512_set1_ps(qsum[i][g]), s);
            }
            _mm512_storeu_ps(c->s[i] + t, _mm512_mul_ps(s, attn));
        }
    }
    for (; t < t1; t++) { /* the chunk's last < 16 tokens, one at a time */
        for (int i = 0; i < nq; i++) {
            float s = 0.f;
            if (kk == KV_INT8) {
                __m512i a = _mm512_setzero_si512();
                for (int64_t j = 0; j < hd / 32; j++)
                    a = _mm512_dpwssd_epi32(
                        a, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)((const int8_t *)k->data + t * hd + 32 * j))),
                        _mm512_load_si512((const void *)(q16[i] + 32 * j)));
                s = (float)_mm512_reduce_add_epi32(a) * qscale[i] * k->scale[t];
            } else {
                for (int64_t g = 0; g < G; g++) {
                    const uint8_t *b = (const uint8_t *)k->data + t * (hd / 2) + 16 * g;
                    int32_t dot = 0;
                    for (int e = 0; e < 16; e++) dot += (b[e] & 15) * q16[i][32 * g + e] + (b[e] >> 4) * q16[i][32 * g + 16 + e];
                    s += (float)dot * qscale[i] * k->scale[t * G + g] + k->zero[t * G + g] * qsum[i][g];
                }
            }
            c->s[i][t] = s * c->scale;
        }
    }
}
#endif

/* A chunk's scores for nq query heads with each K token loaded once for all of them, 16 tokens at a time
 * (one sum16 per head). The kind, nq and (where it is 64 or 128) hd are constants in each inlined copy. */
ALWAYS_INLINE void scores_avx(const Chunk *c, const int nq, const int kk, const KVHead *k, const int64_t hd) {
    if (nq > NQ_MAX || hd > HD_MAX) __builtin_unreachable(); /* the callers' limits */
    const int64_t J = hd / 16, t0 = c->t0, t1 = c->t1;
    float qn[NQ_MAX][HD_MAX]; /* int4 K without VNNI: the queries in nibble order */
    const float *q[NQ_MAX];
    for (int i = 0; i < nq; i++) {
        q[i] = c->q[i];
        if (kk == KV_INT4) {
            for (int64_t d = 0; d < hd; d++) qn[i][d - d % KV_GROUP + (d % 2) * 16 + d % KV_GROUP / 2] = c->q[i][d];
            q[i] = qn[i];
        }
    }
    int64_t t = t0;
#ifdef GEN_VNNI
    if (kk == KV_INT8 || kk == KV_INT4) {
        scores_int(c, nq, kk, k, hd);
        t = t1;
    }
#endif
    for (; t + 16 <= t1; t += 16) {
        __m512 acc[NQ_MAX][16];
        for (int u = 0; u < 16; u++) {
            __m512 a[NQ_MAX];
            for (int i = 0; i < nq; i++) a[i] = _mm512_setzero_ps();
            for (int64_t j = 0; j < J; j++) {
                const __m512 kv = kv_load16(kk, k, t + u, hd, j);
                for (int i = 0; i < nq; i++) a[i] = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q[i] + 16 * j), a[i]);
            }
            for (int i = 0; i < nq; i++) acc[i][u] = a[i];
        }
        __m512 scale = _mm512_set1_ps(c->scale);
        if (kk == KV_INT8) scale = _mm512_mul_ps(scale, _mm512_loadu_ps(k->scale + t));
        for (int i = 0; i < nq; i++) _mm512_storeu_ps(c->s[i] + t, _mm512_mul_ps(sum16(acc[i]), scale));
    }
    for (; t < t1; t++) {
        for (int i = 0; i < nq; i++) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t j = 0; j < J; j++) a = _mm512_fmadd_ps(kv_load16(kk, k, t, hd, j), _mm512_loadu_ps(q[i] + 16 * j), a);
            c->s[i][t] = _mm512_reduce_add_ps(a) * c->scale * (kk == KV_INT8 ? k->scale[t] : 1.f);
        }
    }
}

/* The softmax weights, unnormalised: exp(score - the chunk's top score), and their sum. */
static void softmax_chunk(const Chunk *c, int nq) {
    const int64_t t0 = c->t0, t1 = c->t1;
    for (int i = 0; i < nq; i++) {
        float *s = c->s[i];
        __m512 top = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int64_t u = t0; u < t1; u += 16) {
            __mmask16 m = t1 - u >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (t1 - u)) - 1);
            top = _mm512_mask_max_ps(top, m, top, _mm512_maskz_loadu_ps(m, s + u));
        }
        const float tmax = _mm512_reduce_max_ps(top);
        for (int64_t u = t0; u < t1; u += 16) {
            __mmask16 m = t1 - u >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (t1 - u)) - 1);
            __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + u), _mm512_set1_ps(tmax)));
            _mm512_mask_storeu_ps(s + u, m, e);
            sum = _mm512_mask_add_ps(sum, m, sum, e);
        }
        c->top[i] = tmax, c->sum[i] = _mm512_reduce_add_ps(sum);
    }
}

/* o[i] = sum_t weight[i][t] v_t, each V token converted once for all nq heads. A quantized V's scales
 * ride on the weights (w scale, prepared V_BLOCK tokens at a time), int4's zero points on a separate sum
 * (sum_t w zero, added to the group's every element at the end). */
ALWAYS_INLINE void values_avx(const Chunk *c, const int nq, const int vk, const KVHead *v, const int64_t hd) {
    if (nq > NQ_MAX || hd > HD_MAX) __builtin_unreachable(); /* the callers' limits */
    const int64_t J = hd / 16, G = hd / KV_GROUP, t0 = c->t0, t1 = c->t1;
    int64_t t;
    __m512 o[NQ_MAX][HD_MAX / 16];
    __m512 zacc[NQ_MAX][HD_MAX / KV_GROUP];
    float ws[NQ_MAX][HD_MAX / KV_GROUP][V_BLOCK];
    for (int i = 0; i < nq; i++) {
        for (int64_t j = 0; j < J; j++) o[i][j] = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; g++) zacc[i][g] = _mm512_setzero_ps();
    }
    for (int64_t tb = t0; tb < t1; tb += V_BLOCK) {
        const int64_t te = tb + V_BLOCK < t1 ? tb + V_BLOCK : t1;
        if (vk == KV_INT8 || vk == KV_INT4) {
            for (int64_t u = tb; u < te; u += 16) {
                const __mmask16 m = te - u >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (te - u)) - 1);
                for (int64_t g = 0; g < (vk == KV_INT8 ? 1 : G); g++) {
                    const __m512 sc = vk == KV_INT8 ? _mm512_maskz_loadu_ps(m, v->scale + u) : group_lanes(v->scale + u * G, G, g, m);
                    const __m512 zp = vk == KV_INT4 ? group_lanes(v->zero + u * G, G, g, m) : _mm512_setzero_ps();
                    for (int i = 0; i < nq; i++) {
                        const __m512 w = _mm512_maskz_loadu_ps(m, c->s[i] + u);
                        _mm512_mask_storeu_ps(ws[i][g] + (u - tb), m, _mm512_mul_ps(w, sc));
                        if (vk == KV_INT4) zacc[i][g] = _mm512_fmadd_ps(w, zp, zacc[i][g]);
                    }
                }
            }
        }
        for (t = tb; t < te; t++) {
            if (vk == KV_INT4) {
                for (int64_t g = 0; g < G; g++) {
                    const __m512i b = _mm512_cvtepu8_epi32(
                        _mm_loadu_si128((const __m128i *)((const uint8_t *)v->data + t * (hd / 2) + 16 * g)));
                    const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
                    const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
                    for (int i = 0; i < nq; i++) {
                        const __m512 w = _mm512_set1_ps(ws[i][g][t - tb]);
                        o[i][2 * g] = _mm512_fmadd_ps(w, lo, o[i][2 * g]);
                        o[i][2 * g + 1] = _mm512_fmadd_ps(w, hi, o[i][2 * g + 1]);
                    }
                }
            } else {
                __m512 w[NQ_MAX];
                for (int i = 0; i < nq; i++) w[i] = _mm512_set1_ps(vk == KV_INT8 ? ws[i][0][t - tb] : c->s[i][t]);
                for (int64_t j = 0; j < J; j++) {
                    const __m512 x = kv_load16(vk, v, t, hd, j);
                    for (int i = 0; i < nq; i++) o[i][j] = _mm512_fmadd_ps(w[i], x, o[i][j]);
                }
            }
        }
    }
    for (int i = 0; i < nq; i++) {
        if (vk != KV_INT4) {
            for (int64_t j = 0; j < J; j++) _mm512_storeu_ps(c->o[i] + 16 * j, o[i][j]);
            continue;
        }
        float tmp[HD_MAX];
        for (int64_t j = 0; j < J; j++) _mm512_storeu_ps(tmp + 16 * j, o[i][j]);
        for (int64_t d = 0; d < hd; d++)
            c->o[i][d] = tmp[d - d % KV_GROUP + (d % 2) * 16 + d % KV_GROUP / 2] +
                         _mm512_reduce_add_ps(zacc[i][d / KV_GROUP]);
    }
}

/* One copy per kind and nq where hd is 64 or 128, all three constants there; other head sizes share one
 * copy per kind, with run-time loops. */
#define BY_SHAPE(F, KIND, SIDE)                                                                                   \
    (c->hd == 64 ? (nq == 1   ? F(c, 1, KIND, SIDE, 64)                                                           \
                    : nq == 2 ? F(c, 2, KIND, SIDE, 64)                                                           \
                    : nq == 3 ? F(c, 3, KIND, SIDE, 64)                                                           \
                              : F(c, 4, KIND, SIDE, 64))                                                          \
     : c->hd == 128 ? (nq == 1   ? F(c, 1, KIND, SIDE, 128)                                                       \
                       : nq == 2 ? F(c, 2, KIND, SIDE, 128)                                                       \
                       : nq == 3 ? F(c, 3, KIND, SIDE, 128)                                                       \
                                 : F(c, 4, KIND, SIDE, 128))                                                      \
                    : F(c, nq, KIND, SIDE, c->hd))
#define BY_KIND(F, SIDE)                                                                                          \
    (SIDE->kind == KV_INT8   ? BY_SHAPE(F, KV_INT8, SIDE)                                                         \
     : SIDE->kind == KV_INT4 ? BY_SHAPE(F, KV_INT4, SIDE)                                                         \
     : SIDE->kind == KV_BF16 ? BY_SHAPE(F, KV_BF16, SIDE)                                                         \
                             : BY_SHAPE(F, KV_FLOAT, SIDE))

static void chunk_vector(const Chunk *c, int nq, const KVHead *k, const KVHead *v) {
    BY_KIND(scores_avx, k);
    softmax_chunk(c, nq);
    BY_KIND(values_avx, v);
}
#endif

/* Write this token's k and v into the cache at pos, then attend every query head to positions 0..pos.
 *
 * Work items are (row, KV head, chunk of positions): each reads its K and V tokens once for all the
 * query heads that share them (GQA), computes its own softmax over the chunk (max, weights, weighted V
 * sum), and the chunks of a head are merged after. Long contexts split into chunks so that every thread
 * has work even with fewer KV heads than threads. */
static void attention(const Model *m, const Layer *l, int64_t pos) {
    const int64_t hd = m->head_dim, H = m->n_head, Hkv = m->n_kv_head, T = m->max_tokens;
    const int64_t row = (H + 2 * Hkv) * hd, group = H / Hkv, n = pos + 1;
    for (int64_t b = 0; b < m->batch; b++) {
        for (int64_t g = 0; g < Hkv; g++) {
            const int64_t slot = (b * Hkv + g) * T + pos;
            const float *k = m->qkv + b * row + (H + g) * hd, *v = k + Hkv * hd;
            kv_store(l->k_kind, (int)m->bf16, l->k_cache, l->k_scale, l->k_zero, slot, k, hd);
            kv_store(l->v_kind, (int)m->bf16, l->v_cache, l->v_scale, l->v_zero, slot, v, hd);
        }
    }
    /* About 8 items per thread (dynamic scheduling evens out a loaded machine), chunks of >= 256 tokens. */
    const int64_t heads = m->batch * Hkv, want = (8 * m->n_threads + heads - 1) / heads;
    int64_t len = (n + want - 1) / want;
    len = len < 256 ? 256 : (len + 15) / 16 * 16;
    int64_t chunks = (n + len - 1) / len;
    /* Per (row, query head, chunk): the weighted V sum, the chunk's top score and its weights' sum. */
    const int64_t stride = hd + 2;
    float *part = chunks > 1 ? malloc((size_t)(m->batch * H * chunks * stride) * sizeof(float)) : NULL;
    if (!part) chunks = 1, len = n; /* one chunk a head writes its output directly */
#ifdef GEN_AVX512
    const int vector = hd % 16 == 0 && hd <= HD_MAX;
#endif
#pragma omp parallel for schedule(dynamic, 1) num_threads(m->n_threads)
    for (int64_t item = 0; item < heads * chunks; item++) {
        const int64_t b = item / (Hkv * chunks), g = item / chunks % Hkv, ci = item % chunks, head = b * Hkv + g;
        const KVHead k = kv_head(l->k_kind, (int)m->bf16, l->k_cache, l->k_scale, l->k_zero, head, T, hd);
        const KVHead v = kv_head(l->v_kind, (int)m->bf16, l->v_cache, l->v_scale, l->v_zero, head, T, hd);
        for (int64_t h0 = g * group; h0 < (g + 1) * group; h0 += 4) {
            const int nq = (int)((g + 1) * group - h0 < 4 ? (g + 1) * group - h0 : 4);
            const float *q[4];
            float *s[4], *o[4], top[4], sum[4];
            for (int i = 0; i < nq; i++) {
                const int64_t h = h0 + i;
                q[i] = m->qkv + b * row + h * hd;
                s[i] = m->scores + (b * H + h) * T;
                o[i] = part ? part + ((b * H + h) * chunks + ci) * stride : m->att + (b * H + h) * hd;
            }
            const int64_t t0 = ci * len, t1 = t0 + len < n ? t0 + len : n;
            const Chunk c = {q, s, o, top, sum, t0, t1, hd, 1.f / sqrtf((float)hd)};
#ifdef GEN_AVX512
            if (vector) chunk_vector(&c, nq, &k, &v);
            else
#endif
                chunk_portable(&c, nq, &k, &v);
            for (int i = 0; i < nq; i++) {
                if (part) {
                    o[i][hd] = top[i], o[i][hd + 1] = sum[i];
                } else {
                    const float inv = 1.f / sum[i];
                    for (int64_t d = 0; d < hd; d++) o[i][d] *= inv;
                }
            }
        }
    }
    if (!part) return;
    /* Merge each head's chunks: rescale each to the overall top score, then normalise. */
    for (int64_t bh = 0; bh < m->batch * H; bh++) {
        const float *p = part + bh * chunks * stride;
        float top = -INFINITY, sum = 0.f, *out = m->att + bh * hd;
        for (int64_t ci = 0; ci < chunks; ci++) top = fmaxf(top, p[ci * stride + hd]);
        memset(out, 0, hd * sizeof(float));
        for (int64_t ci = 0; ci < chunks; ci++) {
            const float w = expf(p[ci * stride + hd] - top);
            sum += w * p[ci * stride + hd + 1];
            for (int64_t d = 0; d < hd; d++) out[d] += w * p[ci * stride + d];
        }
        for (int64_t d = 0; d < hd; d++) out[d] /= sum;
    }
    free(part);
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
    if (n <= 0 || rows <= 0) return 0;
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
                    int64_t r = r0;
                    for (; r + 4 <= r1; r += 4) dot4_block(type, (const uint8_t *)w + r * rb, rb, a, cols, y + t * rows + r, 1);
                    for (; r < r1; r++) y[t * rows + r] = dot_block(type, (const uint8_t *)w + r * rb, a, cols);
                }
            }
        }
    }
    free(q), free(dq), free(sq);
    return 0;
}

/* Rows [0, rows) of a block matrix -> fp32 (bf16 == 0) or bf16 (bf16 == 1, round to nearest even) in `out`
 * (rows, cols): a prompt's row tile, dequantized once per call into a cache-sized scratch that a GEMM then
 * reuses for every token. Rows split across threads; each row goes through a one-row fp32 buffer. */
static inline uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays a NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* One row of 32-element blocks (Q8_0, Q4_0, Q4_1) -> fp32 or bf16, 16 lanes at a time: the scalar
 * dequantize_row spends ~0.9 ns an element here, more than the GEMM's own share at 512 tokens. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
static inline void store16(__m512 v, float *f, uint16_t *h) { /* to f (fp32), or to h (bf16) when f is NULL */
    if (f) {
        _mm512_storeu_ps(f, v);
        return;
    }
#if defined(__AVX512BF16__)
    _mm256_storeu_si256((__m256i *)h, (__m256i)_mm512_cvtneps_pbh(v));
#else
    float t[16];
    _mm512_storeu_ps(t, v);
    for (int i = 0; i < 16; i++) h[i] = bf16_round(t[i]);
#endif
}

static int row32_fast(int64_t type, const uint8_t *p, int64_t cols, float *f, uint16_t *h) {
    if (type != T_Q8_0 && type != T_Q4_0 && type != T_Q4_1) return 0;
    const int64_t bs = BLOCK_BYTES[type];
    for (int64_t b = 0; b < cols / 32; b++, p += bs) {
        const int64_t o = b * 32;
        float *f0 = f ? f + o : NULL, *f1 = f ? f + o + 16 : NULL;
        uint16_t *h0 = h ? h + o : NULL, *h1 = h ? h + o + 16 : NULL;
        const __m512 d = _mm512_set1_ps(f16(p));
        if (type == T_Q8_0) {
            __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 2))));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 18))));
            store16(_mm512_mul_ps(lo, d), f0, h0), store16(_mm512_mul_ps(hi, d), f1, h1);
        } else {
            const int q41 = type == T_Q4_1;
            const __m512 m = q41 ? _mm512_set1_ps(f16(p + 2)) : _mm512_mul_ps(d, _mm512_set1_ps(-8.f));
            __m128i q = _mm_loadu_si128((const __m128i *)(p + 2 + 2 * q41)), m4 = _mm_set1_epi8(0xF);
            __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, m4)));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), m4)));
            store16(_mm512_fmadd_ps(lo, d, m), f0, h0), store16(_mm512_fmadd_ps(hi, d, m), f1, h1);
        }
    }
    return 1;
}
#else
static int row32_fast(int64_t type, const uint8_t *p, int64_t cols, float *f, uint16_t *h) {
    (void)type, (void)p, (void)cols, (void)f, (void)h;
    return 0;
}
#endif

int64_t gen_block_dequantize(const void *w, int64_t type, int64_t rows, int64_t cols, void *out, int64_t bf16,
                             int64_t n_threads) {
    enum { CHUNK = 256 }; /* a multiple of every block size: a row converts to bf16 a stack chunk at a time */
    if (!is_block_type(type) || cols % BLOCK_ELEMS[type] != 0) return -1;
    const int64_t rb = block_row_bytes(type, cols), chunk_bytes = CHUNK / BLOCK_ELEMS[type] * BLOCK_BYTES[type];
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *row = (const uint8_t *)w + r * rb;
        float *f = bf16 ? NULL : (float *)out + r * cols;
        uint16_t *o = bf16 ? (uint16_t *)out + r * cols : NULL;
        if (row32_fast(type, row, cols, f, o)) continue;
        if (!bf16) {
            dequantize_row(type, row, cols, f);
            continue;
        }
        float tmp[CHUNK];
        for (int64_t c = 0; c < cols; c += CHUNK, row += chunk_bytes, o += CHUNK) {
            const int64_t len = cols - c < CHUNK ? cols - c : CHUNK;
            dequantize_row(type, row, len, tmp);
            int64_t i = 0;
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
            for (; i + 32 <= len; i += 32) {
                __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(tmp + i + 16), _mm512_loadu_ps(tmp + i));
                _mm512_storeu_si512(o + i, (__m512i)v);
            }
#endif
            for (; i < len; i++) o[i] = bf16_round(tmp[i]);
        }
    }
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
#define GEN_ABI_VERSION 4

/* out[0] = version, then sizeof and one offset near the end of each struct: a field added, removed,
 * reordered or resized on one side only shows up as a mismatch here, before any pointer is read. */
void gen_abi(int64_t *out) {
    out[0] = GEN_ABI_VERSION;
    out[1] = (int64_t)sizeof(Matrix);
    out[2] = (int64_t)sizeof(Norm);
    out[3] = (int64_t)sizeof(Layer);
    out[4] = (int64_t)offsetof(Layer, v_kind);
    out[5] = (int64_t)sizeof(Model);
    out[6] = (int64_t)offsetof(Model, norm_eps);
    out[7] = (int64_t)offsetof(Model, lm_head);
    out[8] = (int64_t)offsetof(Model, xscale);
    out[9] = (int64_t)offsetof(Matrix, type);
    out[10] = (int64_t)offsetof(Model, profile);
}
