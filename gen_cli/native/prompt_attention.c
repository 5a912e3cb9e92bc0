/* Causal attention of a prompt (gen_cli/native/prompt_attention.py, and the C step's prompt rows: attention.h's
 * prompt_tiles): T queries at positions start .. start + T - 1 over keys 0 .. start + T - 1, tiled with an online
 * softmax so the scores never exist beyond one tile.
 *
 * PyTorch's CPU flash kernel splits keys 512 at a time, so up to 512 tokens it computes every masked score of a
 * causal prompt too: at 512 tokens it costs what full attention costs. Here a tile of Q_TILE queries reads only
 * the K_TILE-key tiles up to its last query's position, so a prompt computes about half the scores.
 *
 * Per tile of queries (one head) and tile of keys: S^T = K (q scale)^T (the query tile transposed once, so the
 * product broadcasts elements of K's rows against rows of Q^T, as matmul.h's transposed kernels do), each
 * query's running maximum and sum updated (online softmax: its output so far scaled by e^(old max - new max)),
 * then O += P V. A key past a query's position gets weight exactly 0. Work items (batch, head, query tile) go to
 * threads the longest first (later tiles read more keys).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "features.h"

/* Q_TILE: whole 16-lane steps, and a divisor of the C step's prompt chunks (gen_prompt_rows, file_model.PROMPT_ROWS):
 * at 48, a chunk of 64 took a second tile of 16 queries computed as 48; 32 ran whole 512-token prompts as fast. */
enum { Q_TILE = 32, K_TILE = 48, HD_MAX = 256 };

/* One thread's tiles: the queries scaled and transposed (hd, Q_TILE), the scores transposed (K_TILE, Q_TILE),
 * so that a query is a lane and its softmax runs down the columns, the outputs (Q_TILE, hd), each query's
 * maximum and sum. Lanes past the tile's queries hold zeros and get weight 0. */
typedef struct {
    float qt[HD_MAX * Q_TILE], st[K_TILE * Q_TILE], o[Q_TILE * HD_MAX], top[Q_TILE], sum[Q_TILE];
} Tiles;

#ifdef GEN_AVX2_FMA
/* c rows r < R <= 6 (c_r apart), 16 columns (+)= sum_p a[r a_r + p a_p] b[p b_p .. + 16) over np terms: both
 * products' step, 2 R sums in registers (at R = 6, 8 left FMA's latency uncovered), each term R broadcasts against
 * 2 vectors of b. R is a constant in every inlined copy. */
GEN_ALWAYS_INLINE void fma_rx16(const int R, const float *a, int64_t a_r, int64_t a_p, const float *b, int64_t b_p,
                                int64_t np, float *c, int64_t c_r, const int accumulate) {
    __m256 acc[6][2];
    for (int r = 0; r < R; r++) {
        acc[r][0] = accumulate ? _mm256_loadu_ps(c + r * c_r) : _mm256_setzero_ps();
        acc[r][1] = accumulate ? _mm256_loadu_ps(c + r * c_r + 8) : _mm256_setzero_ps();
    }
    for (int64_t p = 0; p < np; p++) {
        const __m256 b0 = _mm256_loadu_ps(b + p * b_p), b1 = _mm256_loadu_ps(b + p * b_p + 8);
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            const __m256 x = _mm256_broadcast_ss(a + r * a_r + p * a_p);
            acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(c + r * c_r, acc[r][0]);
        _mm256_storeu_ps(c + r * c_r + 8, acc[r][1]);
    }
}

/* fma_rx16 for a run-time count of rows R < 6: one inlined copy per count. */
static void fma_tail(int R, const float *a, int64_t a_r, int64_t a_p, const float *b, int64_t b_p, int64_t np,
                     float *c, int64_t c_r, const int accumulate) {
    switch (R) {
#define ROWS(n) \
    case n: fma_rx16(n, a, a_r, a_p, b, b_p, np, c, c_r, accumulate); break;
        ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5)
#undef ROWS
    }
}
#endif

/* S^T rows [0, n) = K rows (ld apart) . Q^T columns (hd terms each), the lanes of the nq queries (whole 16s; the
 * softmax gives the lanes past them weight 0 whatever they hold). AVX2: 6 keys x 16 queries a step, then the last
 * 1-5 keys in one step. */
static void tile_scores(Tiles *t, const float *k, int64_t ld, int n, int nq, int64_t hd) {
    int j = 0;
#ifdef GEN_AVX2_FMA
    const int lanes = (nq + 15) / 16 * 16;
    for (; j + 6 <= n; j += 6)
        for (int i = 0; i < lanes; i += 16)
            fma_rx16(6, k + j * ld, ld, 1, t->qt + i, Q_TILE, hd, t->st + j * Q_TILE + i, Q_TILE, 0);
    for (int i = 0; j < n && i < lanes; i += 16)
        fma_tail(n - j, k + j * ld, ld, 1, t->qt + i, Q_TILE, hd, t->st + j * Q_TILE + i, Q_TILE, 0);
    j = n;
#endif
    for (; j < n; j++) {
        float *s = t->st + j * Q_TILE;
        for (int i = 0; i < Q_TILE; i++) s[i] = 0.f;
        for (int64_t d = 0; d < hd; d++) {
            const float kd = k[j * ld + d], *qt = t->qt + d * Q_TILE;
            for (int i = 0; i < Q_TILE; i++) s[i] += kd * qt[i];
        }
    }
}

/* The online softmax over one key tile (n keys from position k0) for queries at positions first + i, i < nq:
 * S^T -> weights e^(s - new top), 0 where a key is past the query (or the lane holds no query); each query's sum
 * and output rescaled by e^(old top - new top). Every query sees key 0 in the first tile, so its top is finite
 * from then on; before it, its output and sum are 0, and the tiny rescale e^-87 of the first tile leaves them 0.
 * Lanes without a query keep top 0: rescale 1, weights 0. AVX2: 8 queries a vector, down the columns. */
static void tile_softmax(Tiles *t, int64_t k0, int n, int64_t first, int nq, int64_t hd) {
    float rescale[Q_TILE];
    int i = 0;
#ifdef GEN_AVX2_FMA
    for (; i < Q_TILE; i += 8) {
        float last[8]; /* the last key each lane sees, relative to k0 (-1: none) */
        for (int l = 0; l < 8; l++) last[l] = i + l < nq ? (float)(first + i + l - k0) : -1.f;
        const __m256 lim = _mm256_loadu_ps(last), old = _mm256_loadu_ps(t->top + i);
        __m256 top = old;
        for (int j = 0; j < n; j++) {
            const __m256 seen = _mm256_cmp_ps(_mm256_set1_ps((float)j), lim, _CMP_LE_OQ);
            top = _mm256_max_ps(top, _mm256_blendv_ps(top, _mm256_loadu_ps(t->st + j * Q_TILE + i), seen));
        }
        __m256 sum = _mm256_setzero_ps();
        for (int j = 0; j < n; j++) {
            const __m256 seen = _mm256_cmp_ps(_mm256_set1_ps((float)j), lim, _CMP_LE_OQ);
            const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(t->st + j * Q_TILE + i), top)), seen);
            _mm256_storeu_ps(t->st + j * Q_TILE + i, e);
            sum = _mm256_add_ps(sum, e);
        }
        for (int j = n; j < K_TILE; j++) _mm256_storeu_ps(t->st + j * Q_TILE + i, _mm256_setzero_ps());
        const __m256 r = exp8(_mm256_sub_ps(old, top));
        _mm256_storeu_ps(rescale + i, r);
        _mm256_storeu_ps(t->top + i, top);
        _mm256_storeu_ps(t->sum + i, _mm256_fmadd_ps(_mm256_loadu_ps(t->sum + i), r, sum));
    }
#endif
    for (; i < Q_TILE; i++) {
        const int64_t seen = i < nq ? first + i - k0 + 1 : 0; /* keys of this tile query i sees */
        const int m = (int)(seen < n ? (seen > 0 ? seen : 0) : n);
        float top = t->top[i], sum = 0.f;
        for (int j = 0; j < m; j++) top = fmaxf(top, t->st[j * Q_TILE + i]);
        for (int j = 0; j < K_TILE; j++) {
            float *s = t->st + j * Q_TILE + i;
            sum += *s = j < m ? expf(*s - top) : 0.f;
        }
        rescale[i] = expf(fmaxf(t->top[i] - top, -87.f));
        t->top[i] = top, t->sum[i] = t->sum[i] * rescale[i] + sum;
    }
    for (i = 0; i < nq; i++)
        if (rescale[i] != 1.f)
            for (int64_t d = 0; d < hd; d++) t->o[i * hd + d] *= rescale[i];
}

/* O rows [0, nq) += P rows . V (n keys, rows ld apart), P = S^T's columns. AVX2: 6 queries x 16 columns a step
 * (the last 1-5 queries in one step); the columns past the last 16 one at a time. */
static void tile_values(Tiles *t, const float *v, int64_t ld, int n, int nq, int64_t hd) {
    int64_t cols16 = 0;
#ifdef GEN_AVX2_FMA
    cols16 = hd / 16 * 16;
    int i = 0;
    for (; i + 6 <= nq; i += 6)
        for (int64_t c = 0; c < cols16; c += 16)
            fma_rx16(6, t->st + i, 1, Q_TILE, v + c, ld, n, t->o + i * hd + c, hd, 1);
    for (int64_t c = 0; i < nq && c < cols16; c += 16)
        fma_tail(nq - i, t->st + i, 1, Q_TILE, v + c, ld, n, t->o + i * hd + c, hd, 1);
#endif
    for (int i = 0; i < nq; i++)
        for (int j = 0; j < n; j++) {
            const float p = t->st[j * Q_TILE + i];
            for (int64_t c = cols16; c < hd; c++) t->o[i * hd + c] += p * v[j * ld + c];
        }
}

/* One work item: queries [q0, q0 + nq) of one head (positions start + q0 ...) against one KV head. */
static void query_tile(Tiles *t, const float *q, int64_t q_ts, const float *k, int64_t k_ts, const float *v,
                       int64_t v_ts, float *o, int64_t o_ts, int64_t q0, int nq, int64_t start, int64_t hd,
                       float scale) {
    for (int64_t d = 0; d < hd; d++)
        for (int i = 0; i < Q_TILE; i++) t->qt[d * Q_TILE + i] = i < nq ? q[(q0 + i) * q_ts + d] * scale : 0.f;
    memset(t->o, 0, (size_t)(Q_TILE * hd) * sizeof(float));
    for (int i = 0; i < Q_TILE; i++) t->top[i] = i < nq ? -INFINITY : 0.f, t->sum[i] = 0.f;
    const int64_t first = start + q0, end = first + nq; /* the tile's first query position; keys [0, end) */
    for (int64_t k0 = 0; k0 < end; k0 += K_TILE) {
        const int n = (int)(end - k0 < K_TILE ? end - k0 : K_TILE);
        tile_scores(t, k + k0 * k_ts, k_ts, n, nq, hd);
        tile_softmax(t, k0, n, first, nq, hd);
        tile_values(t, v + k0 * v_ts, v_ts, n, nq, hd);
    }
    for (int i = 0; i < nq; i++) {
        const float inv = 1.f / t->sum[i];
        for (int64_t d = 0; d < hd; d++) o[(q0 + i) * o_ts + d] = t->o[i * hd + d] * inv;
    }
}

/* This thread's tiles, allocated on its first call and kept (NULL when memory runs out): a prompt calls the
 * kernel once per layer, and malloc may map a block of this size afresh, page faults and all, on every call. */
static Tiles *thread_tiles(void) {
    static _Thread_local Tiles *tiles;
    if (!tiles) tiles = aligned_alloc(64, (sizeof(Tiles) + 63) / 64 * 64);
    return tiles;
}

/* o = softmax(q k^T scale, causal) v for B sequences of T queries at positions start .. start + T - 1 and H
 * query heads, over start + T keys of Hkv heads (query head h reads KV head h / (H / Hkv)). Strides in floats:
 * *_bs per sequence, *_hs per head, *_ts per token; each head's hd elements contiguous. Returns 0, or -1 when
 * hd is past HD_MAX, H not a multiple of Hkv, or memory runs out. */
int64_t gen_causal_attention(const float *q, int64_t q_bs, int64_t q_hs, int64_t q_ts, const float *k, int64_t k_bs,
                             int64_t k_hs, int64_t k_ts, const float *v, int64_t v_bs, int64_t v_hs, int64_t v_ts,
                             float *o, int64_t o_bs, int64_t o_hs, int64_t o_ts, int64_t B, int64_t H, int64_t Hkv,
                             int64_t T, int64_t start, int64_t hd, float scale, int64_t n_threads) {
    if (hd <= 0 || hd > HD_MAX || Hkv <= 0 || H % Hkv || start < 0) return -1;
    const int64_t tiles = (T + Q_TILE - 1) / Q_TILE, items = B * H * tiles, group = H / Hkv;
    int failed = 0;
#pragma omp parallel num_threads(n_threads) reduction(| : failed)
    {
        Tiles *t = thread_tiles();
        failed = !t;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!t) continue;
            const int64_t tile = tiles - 1 - it % tiles, bh = it / tiles, b = bh / H, h = bh % H;
            const int64_t q0 = tile * Q_TILE, nq = T - q0 < Q_TILE ? T - q0 : Q_TILE;
            const int64_t g = h / group; /* the KV head */
            query_tile(t, q + b * q_bs + h * q_hs, q_ts, k + b * k_bs + g * k_hs, k_ts, v + b * v_bs + g * v_hs, v_ts,
                       o + b * o_bs + h * o_hs, o_ts, q0, (int)nq, start, hd, scale);
        }
    }
    return failed ? -1 : 0;
}
