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
    convert: bool = False,
) -> dict[tuple, dict[str, float | None]]:
    """Train every (attention, kv_heads, pos) variant `steps` steps, same data and seed; held-out figures, and
    with `eval_context`, bits per byte at the positions from the trained context up to it (extrapolation).
    With `convert`, also (kind, kv_heads, pos, "converted"): the trained MHA pooled to kv_heads, uptrained as long."""
    from gen_cli.train.loop import TrainArgs, train

    results: dict[tuple, dict[str, float | None]] = {}
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
        if convert:
            trained = {v: os.path.join(tmp, f"v{i}") for i, v in enumerate(variants)}
            for kind, n_kv, pos in variants:
                mha = next((d for (k, _, p), d in trained.items() if k == "mha" and p == pos), None)
                if kind == "mha" or mha is None:
                    continue
                if report is not None:
                    report(f"{kind} {n_kv} KV heads, {pos}: the trained MHA pooled, then uptrained {steps} steps")
                pooled = _pool(mha, n_kv, os.path.join(tmp, f"pooled-{kind}{n_kv}-{pos}"))
                args = TrainArgs(
                    inputs=list(inputs or []), init=pooled, steps=steps, batch_size=batch_size,
                    context=min(context, shape.context_length), eval_every=0, save_every=0, seed=0, device=device,
                    dtype="float32", out=pooled + "-run", force=True,
                )  # fmt: skip
                summary = train(args, report)
                results[(kind, n_kv, pos, "converted")] = {
                    "val_loss": summary.val_loss, "bits_per_byte": summary.val_bits_per_byte,
                }  # fmt: skip
    return results


def _pool(model_dir: str, kv_heads: int, out: str) -> str:
    """Save `model_dir`'s model with its KV heads mean-pooled to `kv_heads` in `out`; returns out."""
    from gen_cli.formats.checkpoint import load_model, save_model
    from gen_cli.model.convert import pool_kv_heads

    model, tok = load_model(model_dir)
    save_model(out, pool_kv_heads(model, kv_heads), tok)
    return out


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


def attach_quality(rows: list[dict[str, Any]], quality: dict[tuple, dict[str, float | None]]) -> list[dict[str, Any]]:
    """Add each variant's figures to its rows, in place; returns the rows with, right after each trained
    variant's row, a copy marked `converted: "mha"` carrying the converted model's figures (the speed
    figures are the same shape's: they do not depend on the weights)."""
    out = []
    for row in rows:
        variant = (row["attention"], row["kv_heads"], row["pos"])
        own = quality.get(variant, {})
        row.update(own)
        out.append(row)
        if (converted := quality.get((*variant, "converted"))) is not None:
            # None of the from-scratch model's figures carry over (scores past the context are not measured).
            out.append({k: v for k, v in row.items() if k not in own} | {"converted": "mha"} | converted)
    return out
