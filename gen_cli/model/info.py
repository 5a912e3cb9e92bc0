"""What a model shape costs: parameters, attention kind, KV-cache and weight bytes.

Shapes come from a ONE-layer model on the meta device, its layer repeated: every block has the same
shape, and building a thousand blocks (even on meta, where weight init still runs) takes seconds.
"""

from __future__ import annotations

import re
from typing import Any

from gen_cli.model.config import ModelConfig

_LAYER0 = "layers.0."
# gen's matrices by class: what `gen info` and `--stats` report per line.
CLASSES = {"tok_emb": "embedding", "wqkv": "attn qkv", "wo": "attn out", "w1": "mlp in", "w3": "mlp in",
           "w13": "mlp in", "w2": "mlp out", "lm_head": "lm head", "pos_emb": "positions"}  # fmt: skip


def matrix_class(gen_name: str) -> str | None:
    """The class of a gen weight name (`layers.3.attn.wqkv.weight` → `attn qkv`), None for vectors."""
    m = re.fullmatch(r"(?:layers\.\d+\.\w+\.)?(\w+)\.weight", gen_name)
    return CLASSES.get(m.group(1)) if m else None


def _one_layer(config: ModelConfig) -> Any:
    import torch

    from gen_cli.model.transformer import Transformer

    with torch.device("meta"):  # shapes only: no memory
        return Transformer(config.replace(n_layer=1))


def _repeat_layer(entries: dict[str, Any], n_layer: int) -> dict[str, tuple[int, ...]]:
    """Shapes by name, each `layers.0.` entry repeated for layers 0 … n_layer-1."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, t in entries.items():
        if name.startswith(_LAYER0):
            for i in range(n_layer):
                shapes[f"layers.{i}.{name[len(_LAYER0) :]}"] = tuple(t.shape)
        else:
            shapes[name] = tuple(t.shape)
    return shapes


def state_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every state_dict entry's shape for this config, in state_dict order, from the config alone: no torch, so a
    file's header is checked without it (tests compare it with a model built on the meta device)."""
    c, d, hd = config, config.d_model, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (c.vocab_size, d)}

    def add(name: str, shape: tuple[int, ...], bias: bool) -> None:
        shapes[name + ".weight"] = shape
        if bias:
            shapes[name + ".bias"] = shape[:1]

    if c.pos_encoding == "learned":
        shapes["pos_emb.weight"] = (c.context_length, d)
    layernorm, w3 = c.norm == "layernorm", c.mlp == "swiglu"
    for i in range(c.n_layer):
        at = f"layers.{i}."
        add(at + "attn_norm", (d,), layernorm)
        add(at + "attn.wqkv", ((c.n_head + 2 * c.n_kv_head) * hd, d), c.qkv_bias)
        add(at + "attn.wo", (d, c.n_head * hd), c.attn_out_bias)
        if c.qk_norm:
            add(at + "attn.q_norm", (hd,), False)
            add(at + "attn.k_norm", (hd,), False)
        add(at + "mlp_norm", (d,), layernorm)
        add(at + "mlp.w1", (c.d_ff, d), c.mlp_bias)
        if w3:
            add(at + "mlp.w3", (c.d_ff, d), c.mlp_bias)
        add(at + "mlp.w2", (d, c.d_ff), c.mlp_bias)
    add("norm", (d,), layernorm)
    shapes["lm_head.weight"] = (c.vocab_size, d)
    return shapes


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every distinct parameter's shape (a tied head counts once), named as `named_parameters` does."""
    return _repeat_layer(dict(_one_layer(config).named_parameters()), config.n_layer)


def parameter_count(config: ModelConfig) -> int:
    """Parameters of a model of this shape (a tied embedding counts once)."""
    one = _one_layer(config)
    per_layer = sum(p.numel() for p in one.layers[0].parameters())
    return one.num_parameters() + (config.n_layer - 1) * per_layer


def model_info(config: ModelConfig) -> dict[str, Any]:
    """Parameter count, attention kind, KV-cache and weight memory figures for a config."""
    params = parameter_count(config)
    sizes = {"float32": 4, "bfloat16": 2}
    return {
        "config": config.to_dict(),
        "attention_kind": config.attention_kind,
        "head_dim": config.head_dim,
        "parameters": params,
        "kv_bytes_per_token": {k: config.kv_bytes_per_token(b) for k, b in sizes.items()},
        "kv_bytes_full_context": {k: config.kv_bytes_per_token(b) * config.context_length for k, b in sizes.items()},
        "weight_bytes": {k: params * b for k, b in sizes.items()},
    }


def weight_summary(model: Any) -> dict[str, dict[str, Any]]:
    """Per class of matrix of a live model (embedding, attn qkv, attn out, mlp in, mlp out, lm head): the
    types it holds (q4_k, int8, float32 …) with counts, and the bytes its tensors occupy in memory (a tensor
    two layers share, a tied head's and its embedding's, counted once, under the first; `tied` marks it)."""
    seen: set[int] = set()
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        # the nearest enclosing name with a class: a part of a matrix held in parts (`wqkv.parts.1`) is its matrix's
        cls = next((CLASSES[part] for part in reversed(name.split(".")) if part in CLASSES), None)
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        matrix = next((t for t in tensors if t.dim() == 2), None)
        if cls is None or matrix is None:
            continue
        kind = getattr(module, "qtype", None) or ("int8" if hasattr(module, "qweight") else None)
        kind = kind or str(matrix.dtype).removeprefix("torch.")
        kind += " (16-row interleaved)" if getattr(module, "interleaved", False) else ""
        if matrix.data_ptr() in seen:
            kind += " (tied)"
        entry = out.setdefault(cls, {"types": {}, "bytes": 0})
        entry["types"][kind] = entry["types"].get(kind, 0) + 1
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                entry["bytes"] += t.nbytes
    return out
