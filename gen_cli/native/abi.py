"""The C kernel's structs and enums as Python mirrors, and the check that both sides agree on them.

abi.h is their single source on the C side; abi.c exports `gen_abi` (the version, and the size of each struct
with an offset near its end) and `gen_abi_enum` (each shared enum constant by name). `bind(lib)` compares them
with these mirrors before any struct is filled, so a field or a value changed on one side only is refused
(and the PyTorch path runs) instead of reading memory wrongly.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from gen_cli.errors import InternalError

if TYPE_CHECKING:
    from gen_cli.model.config import ModelConfig

ABI_VERSION = 17  # GEN_ABI_VERSION in abi.h

# Matrix.type (abi.h's T_*): the step's own formats, then GGML's block formats by their gen names.
MATRIX_TYPES = {
    "fp32": 0, "bf16": 1, "int8": 2, "q8_0": 3, "q4_0": 4, "q4_1": 5, "q4_k": 6, "q6_k": 7, "q5_0": 8, "q5_1": 9,
    "q4_0x16": 10, "q4_1x16": 11, "q4_kx16": 12, "q8_0x16": 13,  # 16 rows interleaved (blocks_x16.h, blocks_k16.h,
    # blocks_q8x16.h)
    "q5_k": 14, "q5_kx16": 15,
}  # fmt: skip
# Model.act (abi.h's ACT_*): what block-weight products multiply: int8-quantized activations, the same plus the
# int8 rounding of what that missed (two int8 rows through the same integer kernels), bf16-rounded or fp32 ones.
ACT_MODES = {"int8": 0, "int8x2": 3, "bf16": 1, "fp32": 2}
INTEGER_ACTS = ("int8", "int8x2")  # the modes whose products are the integer kernels (interleaved layouts, lanes)
# The precision block weights run in unless asked otherwise: chosen by measurement (docs/quantization.md).
ACT_DEFAULT = "int8"
# Rows one step takes: each weight row block is reused from L1 by every row, so the weights are read once
# per step for all of them (the scratch is sized for the rows; beyond this, prompts are GEMMs, PyTorch's). A
# torch-free prompt's rows, which need no scores scratch, go in larger chunks (file_model.PROMPT_ROWS).
MAX_BATCH = 64
# prompt_attention.c's HD_MAX: the head sizes a prompt's rows take the tiles with (gen_prompt_rows).
PROMPT_HEAD_MAX = 256
# Model.profile's slots (abi.h's P_*): where a step's time goes, in the order the step accumulates them.
PROFILE_KEYS = ("embed", "norm", "qkv", "rope", "attention", "attn_out", "mlp_in", "mlp_act", "mlp_out", "lm_head")


class Matrix(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("type", ctypes.c_int64),
    ]


class Norm(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [
        ("attn_norm", Norm),
        ("mlp_norm", Norm),
        ("wqkv", Matrix),
        ("wo", Matrix),
        ("w13", Matrix),
        ("w2", Matrix),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        # Quantized KV (kv_quant): int8 scales; int4 scales and zero points; NULL for float caches.
        ("k_scale", ctypes.c_void_p),
        ("k_zero", ctypes.c_void_p),
        ("v_scale", ctypes.c_void_p),
        ("v_zero", ctypes.c_void_p),
        ("k_kind", ctypes.c_int64),  # KV_KINDS below
        ("v_kind", ctypes.c_int64),
        # wqkv / w13 rows after the first part's in other block types (rows 0: none).
        ("wqkv_rest", Matrix * 2),
        ("w13_rest", Matrix),
    ]


class KVSlot(ctypes.Structure):
    """One sequence's K and V in one layer, in its own memory (gen_decode_rows with Model.slots)."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("k_cache", "v_cache", "k_scale", "k_zero", "v_scale", "v_zero")),
        ("max_tokens", ctypes.c_int64),
    ]


# How Layer.k_kind/v_kind name a stored form (abi.h's KV_FLOAT / KV_INT8 / KV_INT4).
KV_KINDS = {"float": 0, "int8": 1, "int4": 2, "bf16": 3}


_INTS = (
    "n_layer",
    "n_head",
    "n_kv_head",
    "head_dim",
    "d_model",
    "d_ff",
    "vocab",
    "max_tokens",
    "batch",
    "n_threads",
    "bf16",
)
_SCRATCH = ("x", "h", "qkv", "att", "ff", "scores", "xq", "xscale")
_BLOCK_SCRATCH = ("aq", "ad", "asum")  # a matrix input quantized for block weights


class Model(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int64) for name in _INTS),
        ("norm_eps", ctypes.c_float),
        ("tok_emb", ctypes.c_void_p),
        ("pos_table", ctypes.c_void_p),
        ("rope_cos", ctypes.c_void_p),
        ("rope_sin", ctypes.c_void_p),
        ("layers", ctypes.POINTER(Layer)),
        ("final_norm", Norm),
        ("lm_head", Matrix),
        *((name, ctypes.c_void_p) for name in _SCRATCH),
        ("emb_type", ctypes.c_int64),
        *((name, ctypes.c_void_p) for name in _BLOCK_SCRATCH),
        ("profile", ctypes.c_void_p),
        ("slots", ctypes.c_void_p),  # KVSlot (n_layer, n_slots), or NULL: slot s is row s of each Layer's cache
        ("n_slots", ctypes.c_int64),
        ("act", ctypes.c_int64),  # ACT_MODES
        # A paged cache: int32 (n_slots, max_blocks) pool block of each slot's block, or NULL (see abi.h).
        ("block_table", ctypes.c_void_p),
        ("block_tokens", ctypes.c_int64),
        ("max_blocks", ctypes.c_int64),
        ("pool_blocks", ctypes.c_int64),
        ("logits_from", ctypes.c_int64),  # logits for rows [logits_from, batch) only (0: every row)
    ]


def unsupported_properties(config: ModelConfig) -> list[str]:
    """The model properties `decode.c` does not implement (imported architectures), as phrases."""
    found = []
    if config.head_dim * config.n_head != config.d_model:
        found.append(f"head size {config.head_dim} × {config.n_head} heads ≠ d_model {config.d_model}")
    found += [name for name in ("qkv_bias", "attn_out_bias", "mlp_bias", "qk_norm") if getattr(config, name)]
    if config.mlp != "swiglu":
        found.append(f"a {config.mlp} MLP")
    if config.pos_encoding == "alibi":
        found.append("ALiBi positions (PyTorch decodes them)")
    # Any RoPE scaling is fine: the kernel rotates by the model's own tables, which carry the scaling (and
    # YaRN's temperature), so a scaled model decodes natively like a plain one.
    return found


def scratch_shapes(
    config: ModelConfig, batch: int, tokens: int, scored: int | None = None
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Model's scratch fields for `batch` rows attending over up to `tokens` positions: name → (shape, dtype name).
    `scored`: the most rows that attend one by one (the rest only as a prompt's, gen_prompt_rows); all by default."""
    c, width = config, max(config.d_model, config.d_ff)
    shapes = {
        "x": (batch, c.d_model), "h": (batch, width), "qkv": (batch, (c.n_head + 2 * c.n_kv_head) * c.head_dim),
        "att": (batch, c.d_model), "ff": (batch, 2 * c.d_ff), "scores": (scored or batch, c.n_head, tokens),
        "xq": (batch, width), "xscale": (batch,),
        "aq": (batch, width), "ad": (batch, -(-width // 32)), "asum": (batch, -(-width // 16)),
    }  # fmt: skip
    dtypes = {"xq": "int16", "aq": "int8", "asum": "int16"}
    return {name: (shape, dtypes.get(name, "float32")) for name, shape in shapes.items()}


def _expected() -> list[int]:
    return [
        ABI_VERSION,
        ctypes.sizeof(Matrix),
        ctypes.sizeof(Norm),
        ctypes.sizeof(Layer),
        Layer.v_kind.offset,
        ctypes.sizeof(Model),
        Model.norm_eps.offset,
        Model.lm_head.offset,
        Model.xscale.offset,
        Matrix.type.offset,
        Model.profile.offset,
        ctypes.sizeof(KVSlot),
        Model.n_slots.offset,
        Model.pool_blocks.offset,
    ]


def _expected_enums() -> dict[str, int]:
    """abi.h's enum constants as these mirrors define them, by their C names."""
    return {
        **{f"T_{name.upper()}": code for name, code in MATRIX_TYPES.items()},
        **{f"KV_{name.upper()}": code for name, code in KV_KINDS.items()},
        **{f"P_{key.upper()}": slot for slot, key in enumerate(PROFILE_KEYS)},
        **{f"ACT_{name.upper()}": code for name, code in ACT_MODES.items()},
        "P_COUNT": len(PROFILE_KEYS),
    }


def _enum_problem(lib: ctypes.CDLL) -> str | None:
    """None when every mirrored enum constant has the library's value, else the first that differs."""
    try:
        fn = lib.gen_abi_enum
    except AttributeError:
        return "the native library exports no enum description (gen_abi_enum)"
    fn.argtypes, fn.restype = [ctypes.c_char_p], ctypes.c_int64
    for name, value in _expected_enums().items():
        if (found := fn(name.encode())) != value:
            return f"the native library's {name} is {found if found >= 0 else 'missing'}, Python's mirror says {value}"
    return None


def _step_status(result: int, func: object, args: tuple) -> int:
    """ctypes' errcheck for the step's entries: a type the kernel refused, or a prompt's rows its tiles did not take
    (gen_prompt_rows), is a broken invariant of the caller (FileModel refuses such files at open)."""
    if result == -2:
        raise InternalError("the native step's prompt tiles did not take the rows (cache layout, head size or memory)")
    if result != 0:
        raise InternalError("the native step was given a matrix or embedding type it does not know")
    return result


def bind(lib: ctypes.CDLL) -> str | None:
    """Check the library's struct layout against these mirrors and declare its functions' signatures;
    None when it can be called, else a one-line reason."""
    try:
        fn = lib.gen_abi
    except AttributeError:
        return "the native library exports no ABI description (gen_abi); it is not gen's kernel or is too old"
    expected = _expected()
    found = (ctypes.c_int64 * len(expected))()
    fn.argtypes, fn.restype = [ctypes.c_void_p], None
    fn(found)
    if list(found) != expected:
        return f"the native library's struct layout {list(found)} differs from Python's {expected}"
    if problem := _enum_problem(lib):
        return problem
    lib.gen_decode_step.argtypes = [
        ctypes.POINTER(Model),
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.gen_decode_step.restype = ctypes.c_int64
    lib.gen_decode_step.errcheck = _step_status
    for rows in (lib.gen_decode_rows, lib.gen_prompt_rows):
        rows.argtypes = [ctypes.POINTER(Model), ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_void_p] * 3]
        rows.restype = ctypes.c_int64
        rows.errcheck = _step_status
    lib.gen_argmax.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_int64]
    lib.gen_argmax.restype = None
    lib.gen_block_matmul.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_int64]
    lib.gen_block_matmul.argtypes += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.gen_block_matmul.restype = ctypes.c_int64
    lib.gen_block_dequantize.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, *[ctypes.c_int64] * 2]
    lib.gen_block_dequantize.restype = ctypes.c_int64
    lib.gen_block_interleaved.argtypes, lib.gen_block_interleaved.restype = [ctypes.c_int64], ctypes.c_int64
    lib.gen_block_lanes.argtypes, lib.gen_block_lanes.restype = [ctypes.c_int64], ctypes.c_int64
    lib.gen_block_repack.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_int64]
    lib.gen_block_repack.restype = ctypes.c_int64
    lib.gen_openmp.argtypes, lib.gen_openmp.restype = [], ctypes.c_int64
    strides = [ctypes.c_int64] * 3  # per sequence, per head, per token
    tensor = [ctypes.c_void_p, *strides]
    lib.gen_causal_attention.argtypes = [*tensor * 4, *[ctypes.c_int64] * 6, ctypes.c_float, ctypes.c_int64]
    lib.gen_causal_attention.restype = ctypes.c_int64
    return None
