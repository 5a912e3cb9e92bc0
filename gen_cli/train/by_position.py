"""Loss and bits per byte by position in the window: how a model fares at each distance from the window's
start, including past the context it was trained with (the extrapolation sweep)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gen_cli.errors import UsageError
from gen_cli.train.tokens import windows

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Bucket:
    """Targets at window positions [start, end): their mean loss (nats) and bits per byte."""

    start: int
    end: int
    loss: float
    bits_per_byte: float
    tokens: int


@dataclass(frozen=True)
class PositionResult:
    """The sweep of one model: buckets in position order, and the context it was trained with."""

    context: int
    trained_context: int
    pos_encoding: str
    rope_scaling: str
    windows: int
    buckets: list[Bucket] = field(default_factory=list)
    corpus: str = ""


def position_losses(
    model: torch.nn.Module,
    data: np.ndarray,
    byte_table: np.ndarray | None,
    context: int,
    batch_size: int,
    device: torch.device,
    max_windows: int | None = None,
    target_bytes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Summed nats and target bytes per window position, (context,) each, over full non-overlapping windows;
    bytes from `byte_table` per id, or `target_bytes` per stream position when given."""
    import torch
    import torch.nn.functional as F

    starts = list(range(0, len(data) - context, context))[:max_windows]
    if not starts:
        raise UsageError(
            f"the validation text has {len(data)} tokens, fewer than one window of {context + 1}; "
            "give more text or a smaller context",
            params=("context",),
        )
    nats, n_bytes = np.zeros(context), np.zeros(context)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(starts), batch_size):
            win = windows(data, starts[i : i + batch_size], context + 1)  # (b, context+1)
            x = torch.from_numpy(win).to(device)
            logits = model(x[:, :-1])  # (b, context, V)
            loss = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")  # (b, context)
            nats += loss.sum(0).double().cpu().numpy()
            if target_bytes is not None:
                n_bytes += windows(target_bytes, starts[i : i + batch_size], context + 1)[:, 1:].sum(0)
            else:
                n_bytes += byte_table[win[:, 1:]].sum(0)
    model.train(was_training)
    return nats, n_bytes, len(starts)


def bucketed(nats: np.ndarray, n_bytes: np.ndarray, n_windows: int, buckets: int | list[int]) -> list[Bucket]:
    """Equal-width position buckets over the window, or buckets between the given edges (0 … window)."""
    if isinstance(buckets, int):
        edges = np.linspace(0, len(nats), buckets + 1).round().astype(int)
    else:
        edges = np.clip(np.asarray(buckets), 0, len(nats))
    out = []
    for a, b in itertools.pairwise(edges):
        if b <= a:
            continue
        total, byte_count, count = float(nats[a:b].sum()), float(n_bytes[a:b].sum()), int((b - a) * n_windows)
        bpb = total / math.log(2) / byte_count if byte_count else float("nan")
        out.append(Bucket(int(a), int(b), total / count, bpb, count))
    return out


def evaluate_by_position(
    model_dir: str | Path,
    inputs: list[str],
    context: int,
    buckets: int | list[int] = 8,
    device: str = "auto",
    batch_size: int = 8,
    max_tokens: int | None = None,
    rope_scaling: str | None = None,
) -> PositionResult:
    """Loss per position bucket of a model directory on the inputs' val split, in windows of `context`
    tokens, which may exceed the trained context (the position tables grow; learned positions cannot)."""
    from gen_cli.model.config import parse_rope_scaling
    from gen_cli.model.transformer import apply_rope_scaling, grow_context
    from gen_cli.runtime import resolve_device
    from gen_cli.text.corpus import Corpus
    from gen_cli.train.evaluate import load_for_scoring, scoring_stream, trained_inputs, windows_per_pass

    if (isinstance(buckets, int) and buckets < 1) or context < 1 or batch_size < 1:
        raise UsageError(
            "buckets, context and batch_size must be at least 1", params=("buckets", "context", "batch_size")
        )
    dev = resolve_device(device)
    model, tok, separator = load_for_scoring(model_dir, dev)
    trained = model.config.context_length
    if rope_scaling is not None:
        apply_rope_scaling(model, parse_rope_scaling(rope_scaling))
    grow_context(model, context)
    corpus = Corpus(inputs or trained_inputs(model_dir) or [])
    corpus.require_text()
    data, table, target_bytes = scoring_stream(tok, corpus, separator)
    max_windows = None if max_tokens is None else max(1, max_tokens // context)
    batch_size = windows_per_pass(batch_size, context, model.config.vocab_size)
    nats, n_bytes, n_windows = position_losses(model, data, table, context, batch_size, dev, max_windows, target_bytes)
    return PositionResult(
        context=context,
        trained_context=trained,
        pos_encoding=model.config.pos_encoding,
        rope_scaling=rope_scaling or _own_scaling(model.config),
        windows=n_windows,
        buckets=bucketed(nats, n_bytes, n_windows, min(buckets, context) if isinstance(buckets, int) else buckets),
        corpus=", ".join(corpus.inputs),
    )


def _own_scaling(config: object) -> str:
    scaling = getattr(config, "rope_scaling", None)
    if getattr(config, "pos_encoding", None) != "rope":
        return "n/a"
    return "none" if scaling is None else str(scaling["type"])
