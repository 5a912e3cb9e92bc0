/* The ABI description abi.py checks before it fills a struct: sizes and offsets (a field added, removed,
 * reordered or resized on one side only), and every shared enum constant by name (a value renumbered on
 * one side only).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "abi.h"

/* out[0] = version, then sizeof and one offset near the end of each struct. */
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
    out[11] = (int64_t)sizeof(KVSlot);
    out[12] = (int64_t)offsetof(Model, n_slots);
    out[13] = (int64_t)offsetof(Model, pool_blocks);
}

#define ENUM(name) {#name, name}
static const struct {
    const char *name;
    int64_t value;
} ENUMS[] = {
    ENUM(T_FP32),   ENUM(T_BF16),     ENUM(T_INT8),   ENUM(T_Q8_0),      ENUM(T_Q4_0),      ENUM(T_Q4_1),
    ENUM(T_Q4_K),   ENUM(T_Q6_K),     ENUM(T_Q5_0),   ENUM(T_Q5_1),      ENUM(T_COUNT),     ENUM(KV_FLOAT),
    ENUM(KV_INT8),  ENUM(KV_INT4),    ENUM(KV_BF16),  ENUM(KV_GROUP), ENUM(P_EMBED),     ENUM(P_NORM),      ENUM(P_QKV),
    ENUM(P_ROPE),   ENUM(P_ATTENTION), ENUM(P_ATTN_OUT), ENUM(P_MLP_IN), ENUM(P_MLP_ACT),   ENUM(P_MLP_OUT),
    ENUM(P_LM_HEAD), ENUM(P_COUNT),  ENUM(ACT_INT8), ENUM(ACT_BF16),   ENUM(ACT_FP32), ENUM(ACT_INT8X2),
    ENUM(T_Q4_0X16), ENUM(T_Q4_1X16), ENUM(T_Q4_KX16), ENUM(T_Q8_0X16), ENUM(T_Q5_K), ENUM(T_Q5_KX16),
};
#undef ENUM

/* The value of the enum constant `name` (as abi.h spells it), or -1 when abi.h has none by that name. */
int64_t gen_abi_enum(const char *name) {
    for (size_t i = 0; i < sizeof ENUMS / sizeof ENUMS[0]; i++)
        if (strcmp(ENUMS[i].name, name) == 0) return ENUMS[i].value;
    return -1;
}

/* 1 when the kernel was built with OpenMP, else 0: its steps then run on one thread whatever n_threads says. */
int64_t gen_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
