"""What a model shape costs: parameters, attention kind, KV-cache and weight bytes."""

from __future__ import annotations

from typing import Any

from gen_cli.model.config import ModelConfig


def model_info(config: ModelConfig) -> dict[str, Any]:
    """Parameter count, attention kind, KV-cache and weight memory figures for a config."""
    import torch

    from gen_cli.model.transformer import Transformer

    with torch.device("meta"):  # shapes only: no memory, no init cost
        params = Transformer(config).num_parameters()
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
