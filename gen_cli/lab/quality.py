"""`gen compare --quality-steps`: train each attention/positional variant briefly on the same data and seed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

from gen_cli.model.config import ModelConfig


def measure_quality(
    shape: ModelConfig,
    variants: list[tuple[str, int, str]],
    steps: int,
    preset: str | None = None,
    tokenizer: str | None = None,
    inputs: list[str] | None = None,
    device: str = "auto",
    context: int = 128,
    batch_size: int = 16,
    report: Callable[[Any], None] | None = None,
    eval_context: int | None = None,
) -> dict[tuple[str, int, str], dict[str, float | None]]:
    """Train every (attention, kv_heads, pos) variant `steps` steps, same data and seed; held-out figures, and
    with `eval_context`, bits per byte at the positions from the trained context up to it (extrapolation)."""
    from gen_cli.train.loop import TrainArgs, train

    results: dict[tuple[str, int, str], dict[str, float | None]] = {}
    # A preset is named directly; another shape is described to `train` as overrides of one.
    sizes = {} if preset else {"layers": shape.n_layer, "heads": shape.n_head, "d_model": shape.d_model,
                               "d_ff": shape.d_ff, "norm": shape.norm}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gen-compare-") as tmp:
        for i, (kind, n_kv, pos) in enumerate(variants):
            args = TrainArgs(
                inputs=list(inputs or []), tokenizer=tokenizer, vocab_size=shape.vocab_size,
                preset=preset or "tiny", attention=kind, kv_heads=n_kv if kind == "gqa" else None, pos=pos,
                steps=steps, batch_size=batch_size, context=min(context, shape.context_length), eval_every=0,
                save_every=0, seed=0, device=device, dtype="float32", out=os.path.join(tmp, f"v{i}"), force=True,
                **sizes,
            )  # fmt: skip
            summary = train(args, report)
            figures = {"val_loss": summary.val_loss, "bits_per_byte": summary.val_bits_per_byte}
            if eval_context is not None:
                past = _past_context(args.out, inputs, args.context, eval_context, device, pos, report)
                figures |= {"eval_context": eval_context, "bits_per_byte_past_context": past}
            results[(kind, n_kv, pos)] = figures
    return results


def _past_context(out: str, inputs: list[str] | None, trained: int, eval_context: int, device: str, pos: str,
                  report: Callable[[Any], None] | None) -> float | None:  # fmt: skip
    """Bits per byte of the trained model at window positions trained … eval_context, or None."""
    from gen_cli.errors import UsageError
    from gen_cli.train.by_position import evaluate_by_position

    if pos == "learned" or trained >= eval_context:  # learned positions end at the trained context
        return None
    try:
        res = evaluate_by_position(out, list(inputs or []), eval_context, [trained, eval_context], device,
                                   max_tokens=100 * eval_context)  # fmt: skip
    except UsageError as e:  # e.g. too little validation text: the trained figures still stand
        if report is not None:
            report(f"{pos}: no score past the context: {e}")
        return None
    return res.buckets[-1].bits_per_byte


def attach_quality(rows: list[dict[str, Any]], quality: dict[tuple[str, int, str], dict[str, float | None]]) -> None:
    for row in rows:
        row.update(quality.get((row["attention"], row["kv_heads"], row["pos"]), {}))
