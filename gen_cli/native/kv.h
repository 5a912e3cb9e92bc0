/* The KV cache's stored forms (abi.h's KV_*): one head's k or v written into its cache, quantized exactly as
 * gen_cli/cache/kinds.py's KVSide.write does, and read back as attention reads it.
 */
#ifndef GEN_KV_H
#define GEN_KV_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "abi.h"
#include "bf16.h"

/* Store one head's k or v (hd values) as token `row` of its cache (row = (head g of its slot) max_tokens + pos),
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
    } else if (bf16 || kind == KV_BF16) { /* a bf16 model's cache, or bf16 K/V of an fp32 one */
        for (int64_t i = 0; i < hd; i++) ((uint16_t *)data)[row * hd + i] = to_bf16(x[i]);
    } else {
        memcpy((float *)data + row * hd, x, hd * sizeof(float));
    }
}

/* One KV head's side as attention reads it: `data`, `scale`, `zero` point at its token 0. */
typedef struct {
    int kind; /* KV_FLOAT (fp32), KV_INT8, KV_INT4, or KV_BF16 (also a bf16 model's float cache) */
    const void *data;
    const float *scale, *zero;
} KVHead;

/* The side whose token 0 is token row `first` of a cache (row = head max_tokens + position). */
static KVHead kv_head_at(int64_t kind, int bf16, const void *data, const float *scale, const float *zero,
                         int64_t first, int64_t hd) {
    KVHead r = {(int)kind, NULL, NULL, NULL};
    if (kind == KV_INT8) {
        r.data = (const int8_t *)data + first * hd, r.scale = scale + first;
    } else if (kind == KV_INT4) {
        r.data = (const uint8_t *)data + first * (hd / 2);
        r.scale = scale + first * (hd / KV_GROUP), r.zero = zero + first * (hd / KV_GROUP);
    } else if (bf16 || kind == KV_BF16) {
        r.kind = KV_BF16, r.data = (const uint16_t *)data + first * hd;
    } else {
        r.data = (const float *)data + first * hd;
    }
    return r;
}

static KVHead kv_head(int64_t kind, int bf16, const void *data, const float *scale, const float *zero,
                      int64_t head, int64_t T, int64_t hd) {
    return kv_head_at(kind, bf16, data, scale, zero, head * T, hd); /* this head's token 0 */
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

#endif
