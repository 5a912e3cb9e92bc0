"""An HF config.json → gen's ModelConfig: every value checked by type and range first (the schemas here),
then the families' conventions (RoPE scaling in its two spellings, sliding windows on some or all layers).
"""

from __future__ import annotations

from typing import Any

from gen_cli.errors import GenError, UsageError
from gen_cli.formats.schema import BOOL, DICT, INT, LIST_STR, NUMBER, STR, TOKEN_IDS, Key, check, shown
from gen_cli.model.config import ModelConfig

# architectures[0] in config.json → the family whose config and name table apply.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GPT2LMHeadModel": "gpt2",
}
MODEL_TYPES = {family: arch for arch, family in ARCHITECTURES.items()}  # when "architectures" is absent
ROPE_TYPES = ("default", "linear", "yarn", "llama3")
GELU_NAMES = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}

# config.json, checked by type and range before any value is used (sizes are bounded again by ModelConfig).
_SIZE, _EPS = Key(INT, lo=1), Key(NUMBER, above=0)
CONFIG_SCHEMA = {"model_type": Key(STR), "torch_dtype": Key(STR), "dtype": Key(STR), "tie_word_embeddings": Key(BOOL),
                 "bos_token_id": Key(TOKEN_IDS), "eos_token_id": Key(TOKEN_IDS)}  # fmt: skip
GPT2_SCHEMA = {
    "activation_function": Key(STR), "scale_attn_by_inverse_layer_idx": Key(BOOL), "scale_attn_weights": Key(BOOL),
    "n_embd": Key(INT, lo=1, required=True), "vocab_size": Key(INT, lo=1, required=True),
    "n_layer": Key(INT, lo=1, required=True), "n_head": Key(INT, lo=1, required=True), "n_inner": _SIZE,
    "n_positions": Key(INT, lo=1, required=True), "layer_norm_epsilon": _EPS,
}  # fmt: skip
LLAMA_SCHEMA = {
    "hidden_act": Key(STR), "vocab_size": Key(INT, lo=1, required=True),
    "num_hidden_layers": Key(INT, lo=1, required=True), "num_attention_heads": Key(INT, lo=1, required=True),
    "num_key_value_heads": _SIZE, "hidden_size": Key(INT, lo=1, required=True),
    "intermediate_size": Key(INT, lo=1, required=True), "max_position_embeddings": _SIZE, "head_dim": _SIZE,
    "rms_norm_eps": _EPS, "rope_theta": _EPS, "attention_bias": Key(BOOL), "mlp_bias": Key(BOOL),
    "rope_scaling": Key(DICT), "rope_parameters": Key(DICT), "sliding_window": Key(INT, lo=0),
    "use_sliding_window": Key(BOOL), "max_window_layers": Key(INT, lo=0), "layer_types": Key(LIST_STR),
}  # fmt: skip
# rope_scaling / rope_parameters: the keys each RoPE type reads (transformers' names).
ROPE_SCHEMA = {
    "rope_type": Key(STR), "type": Key(STR), "rope_theta": _EPS, "factor": _EPS,
    "original_max_position_embeddings": Key(INT, lo=1), "low_freq_factor": _EPS, "high_freq_factor": _EPS,
    "beta_fast": _EPS, "beta_slow": _EPS, "attention_factor": _EPS, "mscale": Key(NUMBER),
    "mscale_all_dim": Key(NUMBER), "truncate": Key(BOOL),
}  # fmt: skip
LAYER_TYPES = ("full_attention", "sliding_attention")


def architecture(data: dict[str, Any], source: str) -> str:
    """The supported architecture config.json names, or a one-line refusal naming what it found."""
    archs, model_type = data.get("architectures"), data.get("model_type")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise GenError(f"{source}: architectures must be a list of strings, got {shown(archs)}")
    if model_type is not None and not isinstance(model_type, str):
        raise GenError(f"{source}: model_type must be a string, got {shown(model_type)}")
    found = archs[0] if archs else MODEL_TYPES.get(model_type, model_type)
    if found not in ARCHITECTURES:
        raise GenError(f"{source}: architecture {found!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return found


def _rope(data: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """RoPE base and gen's rope_scaling from `rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    params = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or params
    check(params, ROPE_SCHEMA, source, "rope_parameters ")
    check(scaling, ROPE_SCHEMA, source, "rope_scaling ")
    base = float(data.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise GenError(f"{source}: rope_scaling type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return base, None
    if kind == "linear":
        return base, {"type": "linear", "factor": float(_need(scaling, "factor", kind, source))}
    if kind == "yarn":
        if scaling.get("mscale") or scaling.get("mscale_all_dim") or scaling.get("truncate") is False:
            raise GenError(f"{source}: YaRN with mscale, mscale_all_dim or truncate false is not supported")
        orig = int(_need(scaling, "original_max_position_embeddings", kind, source))
        yarn = {
            "type": "yarn",
            "factor": float(_need(scaling, "factor", kind, source)),
            "original_context_length": orig,
        }
        for key in ("beta_fast", "beta_slow", "attention_factor"):
            if scaling.get(key) is not None:  # transformers reads a missing or null value as the default
                yarn[key] = float(scaling[key])
        return base, yarn
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if missing := [k for k in keys if k not in scaling]:
        raise GenError(f"{source}: rope_scaling llama3 lacks {', '.join(missing)}")
    values = [float(scaling[k]) for k in keys[:3]] + [int(scaling[keys[3]])]
    return base, dict(zip(("factor", "low_freq_factor", "high_freq_factor", "original_context_length"), values,
                          strict=True), type="llama3")  # fmt: skip


def _need(scaling: dict[str, Any], key: str, kind: str, source: str) -> Any:
    if scaling.get(key) is None:
        raise GenError(f"{source}: rope_scaling {kind} lacks {key}")
    return scaling[key]


def _sliding_window(data: dict[str, Any], arch: str, context: int, source: str) -> tuple[int | None, int, list[str]]:
    """(sliding_window, context, notes): Mistral's window applies to every layer, Qwen2's (use_sliding_window)
    to the layers from max_window_layers on, or as `layer_types` lists them. One window on every layer is
    the model's `sliding_window`; on some layers only, the context is capped at it instead (exact there)."""
    window = data.get("sliding_window")
    if arch != "MistralForCausalLM" and not data.get("use_sliding_window"):
        window = None
    if not window or window >= context:
        return None, context, []
    n_layer = data["num_hidden_layers"]
    if (types := data.get("layer_types")) is not None and (
        len(types) != n_layer or any(t not in LAYER_TYPES for t in types)
    ):
        raise GenError(f"{source}: layer_types must list {n_layer} of {', '.join(LAYER_TYPES)}, got {shown(types)}")
    kinds = data.get("layer_types") or (
        ["sliding_attention" if i >= data.get("max_window_layers", 0) else "full_attention" for i in range(n_layer)]
        if arch != "MistralForCausalLM"
        else ["sliding_attention"] * n_layer
    )
    sliding = sum(k == "sliding_attention" for k in kinds)
    if sliding == 0:
        return None, context, []
    if sliding == len(kinds):
        return window, context, []
    return None, window, [f"sliding-window attention ({window} tokens) on some layers: context capped there (exact)"]


def config_from_hf(data: dict[str, Any], source: str) -> tuple[ModelConfig, str, list[str]]:
    """gen's ModelConfig for an HF config.json, its architecture, and notes (e.g. a capped context)."""
    arch = architecture(data, source)
    check(data, CONFIG_SCHEMA | (GPT2_SCHEMA if arch == "GPT2LMHeadModel" else LLAMA_SCHEMA), source)
    notes: list[str] = []
    try:
        if arch == "GPT2LMHeadModel":
            act = data.get("activation_function", "gelu_new")
            if act not in GELU_NAMES:
                supported = ", ".join(GELU_NAMES)
                raise GenError(f"{source}: GPT-2 activation {act!r} is not supported; supported: {supported}")
            if data.get("scale_attn_by_inverse_layer_idx") or data.get("scale_attn_weights") is False:
                raise GenError(f"{source}: GPT-2 attention scaling variants are not supported")
            d = data["n_embd"]
            fields: dict[str, Any] = dict(
                vocab_size=data["vocab_size"], n_layer=data["n_layer"], n_head=data["n_head"], n_kv_head=data["n_head"],
                d_model=d, d_ff=data.get("n_inner") or 4 * d, context_length=data["n_positions"],
                pos_encoding="learned", norm="layernorm", norm_eps=data.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=data.get("tie_word_embeddings", True), qkv_bias=True, attn_out_bias=True,
                mlp_bias=True, mlp=GELU_NAMES[act],
            )  # fmt: skip
        else:
            if (act := data.get("hidden_act", "silu")) != "silu":
                raise GenError(f"{source}: hidden_act {act!r} is not supported for {arch}; supported: silu")
            base, scaling = _rope(data, source)
            n_head = data["num_attention_heads"]
            context = data.get("max_position_embeddings", 2048)
            window, context, window_note = _sliding_window(data, arch, context, source)
            notes += window_note
            attention_bias = bool(data.get("attention_bias", False))
            fields = dict(
                vocab_size=data["vocab_size"], n_layer=data["num_hidden_layers"], n_head=n_head,
                n_kv_head=data.get("num_key_value_heads") or n_head, d_model=data["hidden_size"],
                d_ff=data["intermediate_size"], context_length=context, rope_base=base,
                norm_eps=data.get("rms_norm_eps", 1e-6), tie_embeddings=data.get("tie_word_embeddings", False),
                head_dim=data.get("head_dim") or data["hidden_size"] // n_head,
                qkv_bias=attention_bias or arch == "Qwen2ForCausalLM", attn_out_bias=attention_bias,
                mlp_bias=bool(data.get("mlp_bias", False)), qk_norm=arch == "Qwen3ForCausalLM", rope_scaling=scaling,
                sliding_window=window,
            )  # fmt: skip
    except KeyError as e:
        raise GenError(f"{source}: config.json lacks {e.args[0]!r}, needed for {arch}") from None
    try:
        return ModelConfig(**fields), arch, notes
    except UsageError as e:
        raise GenError(f"{source}: {e}") from None
