"""Attention maps: the softmax a layer computes for a prompt, per head, with summaries and a terminal heatmap.

The weights come from the model's own `Attention.project` and `Attention.weights`, fed the exact inputs the
layer receives in a no-cache forward (normed x, RoPE tables, the mask with any ALiBi bias), so the map is
the model's attention, not a re-implementation of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from gen_cli.model.transformer import Transformer

# Shading from light to full: block characters read without colour (NO_COLOR, pipes, screen readers' copy).
SHADES = " ░▒▓█"
# Lower bounds of each shade above blank; a visible key gets at least ░ (see `shade`).
LEVELS = (0.0, 0.1, 0.25, 0.5)


@dataclass
class LayerAttention:
    """One layer's attention on one prompt: weights (B, n_head, T, T), v (B, n_kv_head, T, hd), the module's output."""

    weights: torch.Tensor
    v: torch.Tensor
    output: torch.Tensor


def layer_attention(model: Transformer, ids: torch.Tensor, layer: int) -> LayerAttention:
    """Run `ids` (B, T) through the model without a cache, capturing layer `layer`'s attention weights."""
    import torch

    attn = model.layers[layer].attn
    seen: dict[str, torch.Tensor] = {}

    def capture(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> None:
        x, plan, cache, _ = args
        assert cache is None  # the map is of the no-cache forward, the oracle of every cached path
        q, k, v = module.project(x, plan.rope_new)
        seen.update(weights=module.weights(q, k, plan.mask, plan.is_causal), v=v, output=output)

    handle = attn.register_forward_hook(capture)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return LayerAttention(seen["weights"], seen["v"], seen["output"])


def head_summary(w: torch.Tensor) -> dict[str, float]:
    """For one head's (T, T) causal weights: mean query−key distance in tokens, the mean weight on the first
    token (rows after the first, where it is a choice), and the mean row entropy in bits."""
    import torch

    T = w.shape[0]
    w = w.double()
    pos = torch.arange(T, dtype=torch.float64)
    gap = (pos[:, None] - pos[None, :]).clamp_min(0)  # (T, T): query − key, 0 where masked (weight 0 there)
    distance = float((w * gap).sum(dim=-1).mean())
    first = float(w[1:, 0].mean()) if T > 1 else 1.0
    p = w.clamp_min(1e-300)
    entropy = float(-(w * p.log2()).sum(dim=-1).mean())
    return {"mean_distance": distance, "first_token_share": first, "entropy_bits": entropy}


def kv_groups(n_head: int, n_kv_head: int) -> list[list[int]]:
    """The query heads that read each KV head: query head h uses KV head h // (n_head / n_kv_head)."""
    group = n_head // n_kv_head
    return [list(range(g * group, (g + 1) * group)) for g in range(n_kv_head)]


def token_label(text: str, width: int = 8) -> str:
    """A token's text made visible in one short cell: spaces ·, newlines ↵, tabs →, other controls as ␀…"""
    shown = "".join(
        "·" if c == " " else "↵" if c == "\n" else "→" if c == "\t" else chr(0x2400 + ord(c)) if ord(c) < 32 else c
        for c in text
    )
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def attention_map(model: Transformer, tokenizer: Any, ids: list[int], layer: int, head: int | None) -> dict[str, Any]:
    """The attention of `ids` at `layer` (negative counts from the end): every head's (or one head's) weights,
    summaries, the token labels and the KV-head groups, as plain data (JSON-ready)."""
    import torch

    config = model.config
    if not -config.n_layer <= layer < config.n_layer:
        raise UsageError(
            f"layer must be in 0..{config.n_layer - 1} (or negative from the end), got {layer}", params=("layer",)
        )
    if head is not None and not 0 <= head < config.n_head:
        raise UsageError(f"head must be in 0..{config.n_head - 1}, got {head}", params=("head",))
    if not ids:
        raise UsageError("the prompt is empty: give at least one token of text")
    layer %= config.n_layer
    device = model.norm.weight.device  # not tok_emb: a block-quantized table would dequantize whole
    got = layer_attention(model, torch.tensor([ids], device=device), layer)
    weights = got.weights[0].float().cpu()  # (n_head, T, T)
    groups = kv_groups(config.n_head, config.n_kv_head)
    heads = [head] if head is not None else list(range(config.n_head))
    return {
        "layer": layer,
        "n_layer": config.n_layer,
        "pos_encoding": config.pos_encoding,
        "attention_kind": config.attention_kind,
        "ids": ids,
        "tokens": [tokenizer.decode([i], skip_special_tokens=False) for i in ids],
        "kv_groups": groups,
        "heads": [
            {"head": h, "kv_head": h // len(groups[0]), **head_summary(weights[h]), "weights": weights[h].tolist()}
            for h in heads
        ],
    }


def heatmap_lines(weights: list[list[float]], labels: list[str], max_tokens: int) -> list[str]:
    """A (T, T) attention matrix as text: query rows labelled left, key columns labelled vertically on top,
    two characters per cell shaded ░▒▓█ by weight. Past `max_tokens`, only the last ones are drawn."""
    T = len(weights)
    start = max(0, T - max_tokens)
    shown = [token_label(t) for t in labels[start:]]
    width = max(len(s) for s in shown)
    lines = []
    for row in range(width):  # column labels, written top to bottom, bottom-aligned
        chars = [s.rjust(width)[row] for s in shown]
        lines.append(" " * (width + 1) + "".join(f"{c} " for c in chars).rstrip())
    for i in range(start, T):
        cells = "".join(shade(weights[i][j], j <= i) * 2 for j in range(start, T))
        lines.append(f"{shown[i - start].rjust(width)} {cells.rstrip()}")
    return lines


def shade(weight: float, visible: bool) -> str:
    """The block character for one weight; a masked (future) key is blank, a visible one at least ░."""
    if not visible or weight <= 0:
        return " "
    level = sum(weight >= lo for lo in LEVELS)
    return SHADES[max(1, level)]


def mean_weights(heads: list[dict[str, Any]]) -> list[list[float]]:
    """The element-wise mean of the heads' (T, T) weights: every row still sums to 1."""
    n = len(heads)
    return [
        [sum(vals) / n for vals in zip(*rows, strict=True)] for rows in zip(*(h["weights"] for h in heads), strict=True)
    ]


def save_png(data: dict[str, Any], path: str | Path, title: str) -> None:
    """The heatmap (one head, or the heads' mean) as an image with token labels, written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    from gen_cli.atomic import atomic_path

    heads = data["heads"]
    weights = heads[0]["weights"] if len(heads) == 1 else mean_weights(heads)
    labels = [token_label(t, 12) for t in data["tokens"]]
    T = len(labels)
    size = min(24.0, 3 + 0.3 * T)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=max(1e-9, max(max(r) for r in weights)))
    ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(T), labels, fontsize=7)
    ax.set(xlabel="key (attended to)", ylabel="query", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=120)
    plt.close(fig)


def entropy_ceiling(T: int) -> float:
    """Mean over rows of log2(row length): the entropy of uniform attention, for scale."""
    return sum(math.log2(r + 1) for r in range(T)) / T
