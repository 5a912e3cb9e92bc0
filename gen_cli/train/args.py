"""`gen train`'s arguments: defaults, what a resumed run keeps, validation, and the model shape they ask for."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gen_cli.errors import UsageError
from gen_cli.limits import check_size_limit
from gen_cli.model.config import ModelConfig, kv_heads_for, load_preset
from gen_cli.text.tokenizer import DEFAULT_VOCAB_SIZE

MODEL_OPTIONS = ("preset", "attention", "kv_heads", "pos", "norm", "layers", "heads", "d_model", "d_ff")


# Defaults for options left as None; on --resume, None means "what the run used".
DEFAULTS: dict[str, Any] = {
    "vocab_size": DEFAULT_VOCAB_SIZE, "preset": "tiny", "steps": 200, "batch_size": 16, "grad_accum": 1, "lr": 3e-3,
    "weight_decay": 0.1, "grad_clip": 1.0, "eval_every": 100, "eval_batches": 20, "save_every": 500,
    "save_minutes": 5.0, "seed": 0,
}  # fmt: skip


@dataclass
class TrainArgs:
    """Everything `gen train` accepts; None means default (or, on resume, the run's own value)."""

    inputs: list[str] = dataclasses.field(default_factory=list)
    init: str | None = None  # a model directory to start from: its shape, tokenizer and weights
    tokenizer: str | None = None
    vocab_size: int | None = None
    preset: str | None = None
    attention: str | None = None
    kv_heads: int | None = None
    pos: str | None = None
    norm: str | None = None
    layers: int | None = None
    heads: int | None = None
    d_model: int | None = None
    d_ff: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    context: int | None = None
    lr: float | None = None
    warmup: int | None = None
    min_lr: float | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    eval_every: int | None = None
    eval_batches: int | None = None
    save_every: int | None = None
    save_minutes: float | None = None
    seed: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    attn_impl: str = "fused"  # how attention is computed (a run-time choice, never in the model's config)
    out: str | None = None
    force: bool = False
    resume: str | None = None
    stop_after: int | None = None  # library-only: stop (and save) after this many steps of this run


def build_config(args: TrainArgs, vocab_size: int, base: ModelConfig | None = None) -> ModelConfig:
    """The model shape: preset (or `base`), then size and architecture overrides; vocab from the tokenizer."""
    base = base or load_preset(args.preset)
    heads = args.heads or base.n_head
    changes: dict[str, Any] = {"vocab_size": vocab_size, "n_head": heads}
    if args.attention is not None or args.kv_heads is not None:
        changes["n_kv_head"] = kv_heads_for(heads, args.attention, args.kv_heads)
    elif args.heads is not None:
        # Only the head count changed: keep MHA as MHA and MQA as MQA; GQA keeps its KV count.
        kind = base.attention_kind
        changes["n_kv_head"] = kv_heads_for(heads, kind, None) if kind != "gqa" else base.n_kv_head
    for opt, field in (("layers", "n_layer"), ("d_model", "d_model"), ("d_ff", "d_ff"),
                       ("pos", "pos_encoding"), ("norm", "norm"), ("context", "context_length")):  # fmt: skip
        if getattr(args, opt) is not None:
            changes[field] = getattr(args, opt)
    if base.head_dim == base.d_model // base.n_head:
        # A derived head size follows a new width or head count (replace would copy the old, resolved one).
        changes["head_dim"] = None
    return base.replace(**changes)


def check_same_architecture(args: TrainArgs, saved: ModelConfig) -> None:
    """On resume, every architecture option given must agree with the saved model."""
    if all(getattr(args, k) is None for k in MODEL_OPTIONS):
        return
    base = load_preset(args.preset) if args.preset else saved
    wanted = build_config(dataclasses.replace(args, context=None), saved.vocab_size, base)
    diffs = [f"{f} {getattr(wanted, f)} (the run has {getattr(saved, f)})"
             for f in ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "pos_encoding", "norm")
             if getattr(wanted, f) != getattr(saved, f)]  # fmt: skip
    if diffs:
        raise UsageError(f"cannot resume with a different architecture: {', '.join(diffs)}; drop those options")


def _limit(option: str, field: str, value: int) -> None:
    """check_size_limit for the model field an option sets, speaking of the option."""
    try:
        check_size_limit(field, value)
    except UsageError as e:
        raise UsageError(str(e).replace(field, option, 1), params=(option,)) from None


def resolve_args(args: TrainArgs, saved: dict | None = None) -> TrainArgs:
    """Fill options left as None: from the resumed run's arguments, then from DEFAULTS; validate."""
    r = dataclasses.replace(args, inputs=list(args.inputs))
    if saved:
        for f in dataclasses.fields(TrainArgs):
            if getattr(r, f.name) is None and f.name not in ("out", "resume", "stop_after", "tokenizer"):
                setattr(r, f.name, saved.get(f.name))
        r.inputs = r.inputs or list(saved.get("inputs") or [])
    # Absolute paths, so that a resume from another folder reads the same files.
    r.inputs = [str(Path(i).resolve()) if i != "-" and Path(i).exists() else i for i in r.inputs]
    for name, value in DEFAULTS.items():
        if getattr(r, name) is None:
            setattr(r, name, value)
    if r.init is not None and not saved:
        given = [k for k in (*MODEL_OPTIONS, "tokenizer", "vocab_size") if getattr(args, k) is not None]
        if given:
            raise UsageError(
                f"{', '.join(given)} cannot be combined with init: the model to start from fixes them", params=("init",)
            )
    if r.warmup is None:
        r.warmup = min(100, r.steps // 10)
    if not 0 < r.lr < math.inf:
        raise UsageError(f"lr must be a positive number, got {r.lr}", params=("lr",))
    if r.min_lr is None:
        r.min_lr = r.lr / 10
    for name in ("steps", "batch_size", "grad_accum", "eval_batches"):
        if getattr(r, name) < 1:
            raise UsageError(f"{name} must be at least 1, got {getattr(r, name)}", params=(name,))
    for name in ("warmup", "eval_every", "save_every", "save_minutes", "weight_decay", "grad_clip", "min_lr"):
        if not 0 <= getattr(r, name) < math.inf:
            raise UsageError(f"{name} must be a finite number ≥ 0, got {getattr(r, name)}", params=(name,))
    from gen_cli.model.attention import ATTENTION_IMPLS  # torch: not at CLI import time

    if r.attn_impl not in ATTENTION_IMPLS:
        raise UsageError(
            f"attn_impl must be one of {', '.join(ATTENTION_IMPLS)}, got {r.attn_impl!r}", params=("attn_impl",)
        )
    if r.context is not None and r.context < 1:
        raise UsageError(f"context must be at least 1, got {r.context}", params=("context",))
    # Sizes checked here, before a tokenizer is trained or a corpus tokenized for them.
    check_size_limit("vocab_size", r.vocab_size)
    for opt, name in (("context", "context_length"), ("layers", "n_layer"), ("heads", "n_head"),
                      ("kv_heads", "n_kv_head"), ("d_model", "d_model"), ("d_ff", "d_ff")):  # fmt: skip
        if getattr(r, opt) is not None and getattr(r, opt) > 0:
            _limit(opt, name, getattr(r, opt))
    if not -(2**63) <= r.seed < 2**64:  # what torch.manual_seed accepts
        raise UsageError(f"seed must fit in 64 bits (-2**63 to 2**64 - 1), got {r.seed}", params=("seed",))
    if r.min_lr > r.lr:
        raise UsageError(f"min_lr {r.min_lr} is above lr {r.lr}; the decay ends at min_lr", params=("min_lr", "lr"))
    return r
