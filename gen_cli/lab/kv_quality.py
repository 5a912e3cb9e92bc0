"""What a KV cache kind costs in bits per byte: held-out text teacher-forced through the kind's cache,
minus the same text through the full-precision cache (Δ bpb).

Written over a cache factory, so any cache kind plugs in (a quantized one, a sliding window): the text
is fed in windows of the model's context, each into a fresh cache, `chunk` tokens per forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gen_cli.cache.spec import CacheSpec
from gen_cli.errors import UsageError
from gen_cli.model.transformer import Transformer

# (model, batch, max_tokens) → an empty cache of that size that the model can write through.
CacheFactory = Callable[[Transformer, int, int], Any]
DEFAULT_CHUNK = 16  # tokens per forward pass: the cache is read as decode reads it, at a fraction of the steps


def spec_factory(spec: CacheSpec | None = None) -> CacheFactory:
    """A factory of the caches `spec` describes (None: every token in the model's dtype, unquantized)."""
    spec = spec or CacheSpec()

    def make(model: Transformer, batch: int, max_tokens: int) -> Any:
        weight = model.norm.weight  # the model's dtype and device (a block-quantized embedding has no plain weight)
        return spec.allocate(model.config, batch, max_tokens, weight.dtype, weight.device)

    return make


@torch.inference_mode()
def teacher_forced_nats(
    model: Transformer,
    data: np.ndarray,
    cache_factory: CacheFactory,
    context: int | None = None,
    chunk: int = DEFAULT_CHUNK,
    batch: int = 8,
) -> tuple[float, int]:
    """(Summed next-token nats, targets) of the stream `data` fed through caches from `cache_factory`.

    Window i feeds data[iT : iT+T] (T = `context`, default the model's) into a fresh cache, `chunk`
    tokens at a time, and scores data[iT+1 : iT+T+1]: every target exactly once, as `evaluate` does."""
    context = context or model.config.context_length
    if chunk < 1 or not 1 <= context <= model.config.context_length:
        raise UsageError(f"chunk must be ≥ 1 and context 1 … {model.config.context_length}", params=("chunk",))
    targets = len(data) - 1
    if targets < 1:
        raise UsageError("nothing to score: the validation text has fewer than 2 tokens")
    device = model.norm.weight.device  # not tok_emb: a block-quantized table would dequantize whole
    starts = list(range(0, targets, context))
    nats = 0.0
    # Windows of one length share a batch; the last, shorter one runs alone.
    groups: dict[int, list[int]] = {}
    for s in starts:
        groups.setdefault(min(context, targets - s), []).append(s)
    for length, group_starts in groups.items():
        for i in range(0, len(group_starts), batch):
            part = group_starts[i : i + batch]
            win = torch.from_numpy(np.stack([np.asarray(data[s : s + length + 1], dtype=np.int64) for s in part]))
            win = win.to(device)  # (b, length+1)
            cache = cache_factory(model, len(part), length)
            for c in range(0, length, chunk):
                x = win[:, c : min(c + chunk, length)]  # (b, ≤chunk)
                logits = model(x, cache=cache)  # (b, ≤chunk, V)
                y = win[:, c + 1 : c + 1 + x.shape[1]]  # the next tokens
                nats += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
    return nats, targets


def bits_per_byte(nats: float, n_bytes: int) -> float:
    return nats / math.log(2) / n_bytes if n_bytes else float("nan")


def delta_bits_per_byte(
    model: Transformer,
    data: np.ndarray,
    n_bytes: int,
    factories: dict[str, CacheFactory],
    reference: CacheFactory | None = None,
    context: int | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> dict[str, dict[str, float]]:
    """Per named factory: bits per byte of `data` (`n_bytes` of text) through its caches, and Δ bpb over the
    `reference` factory's (default: the full-precision cache of the model's dtype)."""
    ref_nats, _ = teacher_forced_nats(model, data, reference or spec_factory(), context, chunk)
    ref = bits_per_byte(ref_nats, n_bytes)
    out = {}
    for name, factory in factories.items():
        bpb = bits_per_byte(teacher_forced_nats(model, data, factory, context, chunk)[0], n_bytes)
        out[name] = {"bits_per_byte": bpb, "delta_bits_per_byte": bpb - ref, "reference_bits_per_byte": ref}
    return out


KV_EVAL_TOKENS = 8192  # validation tokens scored per kind: a few seconds on the shipped model


def measure_trained_kv(
    model_dir: str,
    kv_specs: list[str],
    prompt_len: int,
    gen_len: int,
    device: str = "cpu",
    max_tokens: int = KV_EVAL_TOKENS,
    inputs: list[str] | None = None,
) -> dict[str, Any]:
    """Each KV kind's cost on a trained gen model's own weights: KL / top-1 / greedy agreement over a
    `gen_len` continuation of a validation prompt, and Δ bits per byte on its validation text."""
    from gen_cli.cache.kinds import parse_kv_kinds
    from gen_cli.formats.checkpoint import load_model
    from gen_cli.infer.kv_accuracy import kv_accuracy
    from gen_cli.runtime import resolve_device
    from gen_cli.text.corpus import Corpus
    from gen_cli.train.evaluate import scoring_stream, trained_inputs

    dev = resolve_device(device)
    model, tok = load_model(model_dir, dev)
    model.eval()
    corpus = Corpus(inputs or trained_inputs(model_dir) or [])
    corpus.require_text()
    data, table, _ = scoring_stream(tok, corpus, None)
    data = np.asarray(data[: max_tokens + 1], dtype=np.int64)
    if len(data) < prompt_len + 2:
        raise UsageError(f"the validation text holds {len(data)} tokens; fewer than prompt_len {prompt_len} + 2")
    n_bytes = int(table[data[1:]].sum())
    kinds = {name: CacheSpec(*parse_kv_kinds(name)) for name in kv_specs}
    bpb = delta_bits_per_byte(model, data, n_bytes, {name: spec_factory(k) for name, k in kinds.items()})
    prompt = torch.from_numpy(data[None, :prompt_len]).to(dev)  # (1, prompt_len): held-out text, not random ids
    figures = {}
    for spec, k in kinds.items():
        acc = kv_accuracy(model, prompt, gen_len, k).to_dict()
        figures[spec] = {f"kv_{key}": acc[key] for key in ("kl_mean", "kl_max", "top1_agreement",
                                                           "tokens_before_divergence")}  # fmt: skip
        figures[spec]["kv_delta_bits_per_byte"] = bpb[spec]["delta_bits_per_byte"]
        figures[spec]["kv_reference_bits_per_byte"] = bpb[spec]["reference_bits_per_byte"]
    note = (f"KL, top-1 and Δ bits/byte of the {model.config.n_kv_head}-KV-head {model.config.pos_encoding} rows: "
            f"the trained weights of {model_dir}, a {prompt_len}-token validation prompt and {len(data) - 1:,} "
            f"validation tokens teacher-forced through each kind ({DEFAULT_CHUNK} per pass); other rows: random "
            "weights")  # fmt: skip
    return {"kinds": figures, "n_kv_head": model.config.n_kv_head, "pos": model.config.pos_encoding, "note": note}


def attach_trained_kv(rows: list[dict[str, Any]], measured: dict[str, Any]) -> None:
    """Put the trained model's figures on the rows of its own variant (same KV heads and positions), in place."""
    for row in rows:
        own = row["kv_heads"] == measured["n_kv_head"] and row["pos"] == measured["pos"]
        figures = measured["kinds"].get(row.get("kv_dtype") or "") if row["kv_cache"] else None
        row.setdefault("kv_delta_bits_per_byte", None)
        if own and figures is not None:
            row.update(figures | {"kv_weights": "trained"})
