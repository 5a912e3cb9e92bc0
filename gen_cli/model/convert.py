"""MHA → GQA/MQA without training from scratch: pool each group's key and value heads (the GQA paper).

A model with `n_kv_head` KV heads becomes one with K (a divisor of it): the K/V projection rows of the
heads in each group of n_kv_head / K are averaged ("mean", the paper's recipe) or the group's first
head is kept ("first", its baseline). Queries, output, MLP and norms are copied unchanged. Pooling the
projection pools the keys and values themselves: RoPE rotates each head after the projection, linearly.
"""

from __future__ import annotations

import torch

from gen_cli.errors import UsageError
from gen_cli.model.transformer import Transformer

POOLING = ("mean", "first")


def kv_head_choices(n_kv_head: int) -> list[int]:
    """The KV head counts a model with n_kv_head KV heads can be converted to (its divisors)."""
    return [k for k in range(1, n_kv_head + 1) if n_kv_head % k == 0]


def pool_kv_heads(model: Transformer, kv_heads: int, pooling: str = "mean") -> Transformer:
    """A new model with `kv_heads` KV heads whose K/V projections pool the old ones group by group."""
    config = model.config
    if pooling not in POOLING:
        raise UsageError(f"unknown pooling {pooling!r}; choose {', '.join(POOLING)}", params=("pooling",))
    if kv_heads not in kv_head_choices(config.n_kv_head):
        choices = ", ".join(map(str, kv_head_choices(config.n_kv_head)))
        raise UsageError(
            f"kv_heads {kv_heads} does not divide the model's {config.n_kv_head} KV heads; choose from {choices}",
            params=("kv_heads",),
        )
    H, hd, group = config.n_head, config.head_dim, config.n_kv_head // kv_heads
    converted = Transformer(config.replace(n_kv_head=kv_heads)).to(model.tok_emb.weight.dtype).eval()
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    for i in range(config.n_layer):
        for part in ("weight", "bias"):  # a bias (Qwen2) is pooled with its rows
            name = f"layers.{i}.attn.wqkv.{part}"
            if name not in state:
                continue
            w = state[name]  # (H*hd + 2*n_kv_head*hd, ...): query rows, then key rows, then value rows
            q, k, v = w.split([H * hd, config.n_kv_head * hd, config.n_kv_head * hd])
            state[name] = torch.cat([q, _pool(k, kv_heads, group, hd, pooling), _pool(v, kv_heads, group, hd, pooling)])
    converted.load_state_dict(state)
    return converted


def _pool(rows: torch.Tensor, kv_heads: int, group: int, hd: int, pooling: str) -> torch.Tensor:
    grouped = rows.view(kv_heads, group, hd, *rows.shape[1:])  # (new heads, old heads per group, head_dim, [d_model])
    pooled = grouped.mean(dim=1) if pooling == "mean" else grouped[:, 0]  # (new heads, head_dim, [d_model])
    return pooled.reshape(kv_heads * hd, *rows.shape[1:])  # (new heads × head_dim, [d_model])
