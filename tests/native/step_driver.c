/* Runs gen's decode step outside Python, for CPUs the test machine only emulates (aarch64 under qemu-user):
 * reads a model the test wrote from a live NativeDecoder's structs, runs one greedy-free step per given token
 * at positions 0, 1, ..., and writes every step's logits. Usage: step_driver MODEL_FILE LOGITS_FILE.
 *
 * MODEL_FILE, little-endian: int64 header[H_COUNT], float norm_eps, int64 tokens[n_steps], then blobs
 * (int64 nbytes + bytes) in this order: tok_emb, rope_cos, rope_sin (empty without RoPE), per layer
 * attn_norm, mlp_norm, wqkv, wo, w13, w2, then final_norm and lm_head. A matrix is int64 rows, cols, type
 * and its blob. Norms carry no bias (RMSNorm) and KV is fp32: what the test's models use.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "abi.h"

int64_t gen_decode_step(const Model *m, const int64_t *tokens, int64_t token_stride, int64_t pos, float *logits);

enum { H_LAYER, H_HEAD, H_KV_HEAD, H_HEAD_DIM, H_D_MODEL, H_D_FF, H_VOCAB, H_MAX_TOKENS, H_STEPS, H_EMB_TYPE, H_COUNT };

static FILE *in;

static void fail(const char *what) {
    fprintf(stderr, "step_driver: %s\n", what);
    exit(2);
}

static void read_exact(void *dst, size_t n) {
    if (n && fread(dst, 1, n, in) != n) fail("short model file");
}

static int64_t read_i64(void) {
    int64_t v;
    read_exact(&v, sizeof v);
    return v;
}

static void *zeroed(size_t n) {
    void *p = aligned_alloc(64, (n + 63) / 64 * 64 + 64);
    if (!p) fail("out of memory");
    memset(p, 0, (n + 63) / 64 * 64 + 64);
    return p;
}

/* A blob's bytes (NULL when empty), 64-byte aligned as the kernel's streamed tensors are. */
static void *read_blob(void) {
    int64_t n = read_i64();
    if (n < 0) fail("negative blob size");
    if (n == 0) return NULL;
    void *p = zeroed((size_t)n);
    read_exact(p, (size_t)n);
    return p;
}

static Matrix read_matrix(void) {
    Matrix w = {0};
    w.rows = read_i64(), w.cols = read_i64(), w.type = read_i64();
    w.data = read_blob();
    return w;
}

int main(int argc, char **argv) {
    if (argc != 3) fail("usage: step_driver MODEL_FILE LOGITS_FILE");
    if (!(in = fopen(argv[1], "rb"))) fail("cannot open the model file");
    int64_t h[H_COUNT];
    for (int i = 0; i < H_COUNT; i++) h[i] = read_i64();
    float eps;
    read_exact(&eps, sizeof eps);
    const int64_t steps = h[H_STEPS], hd = h[H_HEAD_DIM], kvh = h[H_KV_HEAD], T = h[H_MAX_TOKENS];
    int64_t *tokens = zeroed((size_t)steps * sizeof(int64_t));
    read_exact(tokens, (size_t)steps * sizeof(int64_t));

    Model m = {0};
    m.n_layer = h[H_LAYER], m.n_head = h[H_HEAD], m.n_kv_head = kvh, m.head_dim = hd;
    m.d_model = h[H_D_MODEL], m.d_ff = h[H_D_FF], m.vocab = h[H_VOCAB], m.max_tokens = T;
    m.batch = 1, m.n_threads = 2, m.norm_eps = eps, m.emb_type = h[H_EMB_TYPE];
    m.tok_emb = read_blob();
    m.rope_cos = read_blob(), m.rope_sin = read_blob();
    Layer *layers = zeroed((size_t)m.n_layer * sizeof(Layer));
    for (int64_t i = 0; i < m.n_layer; i++) {
        Layer *l = &layers[i];
        l->attn_norm.weight = read_blob(), l->mlp_norm.weight = read_blob();
        l->wqkv = read_matrix(), l->wo = read_matrix(), l->w13 = read_matrix(), l->w2 = read_matrix();
        l->k_cache = zeroed((size_t)(kvh * T * hd) * sizeof(float));
        l->v_cache = zeroed((size_t)(kvh * T * hd) * sizeof(float));
        l->k_kind = l->v_kind = KV_FLOAT;
    }
    m.layers = layers;
    m.final_norm.weight = read_blob();
    m.lm_head = read_matrix();
    fclose(in);

    /* Scratch as gen_cli/native/decoder.py sizes it for one row. */
    const int64_t width = m.d_model > m.d_ff ? m.d_model : m.d_ff;
    m.x = zeroed(m.d_model * sizeof(float)), m.h = zeroed(width * sizeof(float));
    m.qkv = zeroed((m.n_head + 2 * kvh) * hd * sizeof(float)), m.att = zeroed(m.d_model * sizeof(float));
    m.ff = zeroed(2 * m.d_ff * sizeof(float)), m.scores = zeroed(m.n_head * T * sizeof(float));
    m.xq = zeroed(width * sizeof(int16_t)), m.xscale = zeroed(sizeof(float));
    m.aq = zeroed(width), m.ad = zeroed((width / 32 + 1) * sizeof(float)), m.asum = zeroed((width / 16 + 1) * sizeof(int16_t));

    float *logits = zeroed((size_t)(steps * m.vocab) * sizeof(float));
    for (int64_t pos = 0; pos < steps; pos++)
        if (gen_decode_step(&m, tokens + pos, 1, pos, logits + pos * m.vocab)) fail("the step refused a matrix type");
    FILE *out = fopen(argv[2], "wb");
    if (!out || fwrite(logits, sizeof(float), (size_t)(steps * m.vocab), out) != (size_t)(steps * m.vocab)) fail("cannot write logits");
    fclose(out);
    return 0;
}
