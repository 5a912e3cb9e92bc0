"""Scoring a token stream: held-out loss, perplexity and bits per byte, and the precision it runs in."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gen_cli.errors import UsageError
from gen_cli.train.tokens import byte_lengths, tokenize_split, windows

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from gen_cli.formats.loaded import Loaded
    from gen_cli.text.corpus import Corpus


@dataclass(frozen=True)
class EvalResult:
    """Held-out figures; bits_per_byte = nats / ln 2 / UTF-8 bytes of the predicted tokens' text."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    corpus: str = ""  # what was scored: the inputs, comma-joined
    split: str = "val"  # val: gen's own corpora's held-out part; all: every token of files a user names
    context: int = 0  # window length
    stride: int = 0  # tokens between window starts (= context: non-overlapping)


def evaluate(
    model: torch.nn.Module,
    data: np.ndarray,
    byte_table: np.ndarray | None,
    context: int,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    max_tokens: int | None = None,
    target_bytes: np.ndarray | None = None,
    stride: int | None = None,
) -> EvalResult:
    """Score the token stream in windows of `context` tokens starting every `stride` (default `context`:
    contiguous, non-overlapping), each scoring only the targets no earlier window scored: every target once.

    Window i feeds data[b : b+L] (b = i·stride, L = min(context, targets left)) and predicts data[b+1 : b+L+1],
    scoring the last b+L − (previous window's end) of them; with stride < context each target after the first
    window sees at least context − stride tokens (llama.cpp's perplexity and transformers' strided rule).
    Bytes are the exact UTF-8 length of the predicted tokens (EOT separators count 0): from `byte_table` per
    id, or `target_bytes` per stream position (imported tokenizers) when given."""
    import torch
    import torch.nn.functional as F

    n = len(data) if max_tokens is None else min(len(data), max_tokens + 1)
    targets_total = max(0, n - 1)
    if targets_total == 0:
        raise UsageError("nothing to evaluate: the text has fewer than 2 tokens")
    spans = strided_windows(targets_total, context, context if stride is None else stride)
    nats = 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device, autocast_dtype):
        full = [s for s in spans if s[1] == context]
        groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
        groups += [[s] for s in spans if s[1] != context]  # the last window may be shorter
        for group in groups:
            length = group[0][1]
            win = torch.from_numpy(windows(data, [s[0] for s in group], length + 1)).to(device)  # (b, length+1)
            logits = model(win[:, :-1])  # (b, length, V)
            per_token = F.cross_entropy(logits.float().transpose(1, 2), win[:, 1:], reduction="none")  # (b, length)
            nats += sum(
                float(row[length - scored :].sum()) for row, (_, _, scored) in zip(per_token, group, strict=True)
            )
    model.train(was_training)
    if target_bytes is not None:
        n_bytes = int(np.asarray(target_bytes[1:n], dtype=np.int64).sum())
    else:
        n_bytes = int(byte_table[np.asarray(data[1:n], dtype=np.int64)].sum())
    loss = nats / targets_total
    return EvalResult(
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        bits_per_byte=nats / math.log(2) / n_bytes if n_bytes else float("nan"),
        tokens=targets_total,
        bytes=n_bytes,
        context=context,
        stride=context if stride is None else stride,
    )


def strided_windows(targets: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, length, scored) per window: starts every `stride` tokens, at most `context` long, scoring its
    last `scored` targets (those past the previous window's end), until every target is scored once."""
    if not 1 <= stride <= context:
        raise UsageError(f"stride {stride} must be between 1 and the context, {context} tokens", params=("stride",))
    spans, start, end = [], 0, 0
    while end < targets:
        length = min(context, targets - start)
        spans.append((start, length, start + length - end))
        end, start = start + length, start + stride
    return spans


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def training_precision(dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype for a requested dtype: weights and optimizer always stay fp32."""
    import torch

    if dtype == torch.float32:
        return None
    if dtype == torch.bfloat16:
        return dtype
    raise UsageError(
        "dtype must be float32 or bfloat16 here (weights stay fp32; float16 would need loss scaling)", params=("dtype",)
    )


def evaluate_model(
    model_dir: str | Path,
    inputs: list[str] | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 8,
    context: int | None = None,
    max_tokens: int | None = None,
    rope_scaling: str | None = None,
    stride: int | None = None,
    split: str | None = None,
) -> EvalResult:
    """Loss, perplexity and bits per byte of a model on text: files a user names are scored whole (split
    "all") in windows every `stride` tokens (default context/2); gen's own corpora (the built-in one, a run's
    training text) on their val split, non-overlapping by default. `rope_scaling` (a spec such as `linear:4`)
    runs a RoPE model with that scaling, its context grown to match."""
    from gen_cli.runtime import resolve_device, run_dtype
    from gen_cli.text.corpus import BUILTIN, Corpus

    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise UsageError("batch_size and max_tokens must be at least 1", params=("batch_size", "max_tokens"))
    dev = resolve_device(device)
    amp = training_precision(run_dtype(dtype, dev))
    model, tok, separator = load_for_scoring(model_dir, dev)  # fp32 weights; bfloat16 runs under autocast
    if rope_scaling is not None:
        from gen_cli.model.config import parse_rope_scaling
        from gen_cli.model.transformer import apply_rope_scaling

        apply_rope_scaling(model, parse_rope_scaling(rope_scaling))
    limit = model.config.context_length
    context = limit if context is None else context  # 0 is refused below, not read as "the full context"
    if not 1 <= context <= limit:
        raise UsageError(
            f"context {context} is outside what the model allows (1 to {limit} tokens)", params=("context",)
        )
    corpus = Corpus(inputs or trained_inputs(model_dir) or [])
    corpus.require_text()
    users = bool(inputs) and inputs != [BUILTIN]  # text a user brings has no split of gen's to respect
    split = split or ("all" if users else "val")
    stride = stride if stride is not None else max(1, context // 2) if split == "all" else context
    data, table, target_bytes = scoring_stream(tok, corpus, separator, split)
    if len(data) < 2:
        what = "" if split == "all" else "the validation split of "
        raise UsageError(f"{what}{', '.join(corpus.inputs)} holds fewer than 2 tokens; give more text")
    batch_size = windows_per_pass(batch_size, context, model.config.vocab_size)
    result = evaluate(model, data, table, context, batch_size, dev, amp, max_tokens, target_bytes, stride)
    return replace(result, corpus=", ".join(corpus.inputs), split=split)


LOGITS_BUDGET = 2**30  # bytes of fp32 logits one forward pass may hold


def windows_per_pass(batch_size: int, context: int, vocab: int) -> int:
    """`batch_size`, or fewer windows where their (b, context, vocab) fp32 logits would pass LOGITS_BUDGET:
    an imported model's 8 windows of 8k tokens × 50k vocabulary would need 13 GB (totals do not depend on it)."""
    return max(1, min(batch_size, LOGITS_BUDGET // (4 * context * vocab)))


def load_for_scoring(model_dir: str | Path, device: torch.device) -> tuple[torch.nn.Module, Tokenizer, int | None]:
    """A gen model directory, HF folder or GGUF file in float32, its tokenizer, and the document separator
    id for imported models (None: gen's `<|endoftext|>`)."""
    import torch

    from gen_cli.formats.checkpoint import load_model
    from gen_cli.formats.loading import load, require_model_kind

    path = Path(model_dir)
    kind = require_model_kind(path)
    if kind == "gen":
        model, tok = load_model(path, device)
        return model, tok, None
    loaded = load(path, device=device, dtype=torch.float32)
    return loaded.model, loaded.tokenizer, document_separator(loaded)


def document_separator(loaded: Loaded) -> int:
    """The id that precedes every document of an imported model's stream: its BOS, else its EOS.

    BOS first: models that have one (Llama, Mistral) saw it at the start of every training document, so
    each document is scored as the model reads a fresh text; models without one (Qwen2) saw EOS between
    documents, which then marks the start of the next just as well.
    """
    vocab = loaded.tokenizer.get_vocab_size()
    for i in (loaded.bos_id, *loaded.stop_ids):
        if i is not None and 0 <= i < vocab:
            return i
    raise UsageError(f"{loaded.source}: the model declares neither a BOS nor an EOS id to separate documents with")


def scoring_stream(
    tok: Tokenizer, corpus: Corpus, separator: int | None, split: str = "val"
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One split's token ids, with either a byte table per id (gen's byte-level BPE) or the text bytes per
    stream position (imported tokenizers, separated by `separator`)."""
    if separator is None:
        data = tokenize_split(tok, corpus, split).load()
        return data, byte_lengths(tok), None
    token_file = tokenize_split(tok, corpus, split, separator=separator)
    return token_file.load(), None, token_file.load_bytes()


def trained_inputs(model_dir: str | Path) -> list[str] | None:
    """The inputs a `gen train` run folder was trained on (from its train state's metadata), else None."""
    import json

    from safetensors import safe_open

    path = Path(model_dir) / "train_state.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:  # metadata only: the tensors stay on disk
            args = json.loads((f.metadata() or {}).get("args", "{}"))
    except Exception:  # a damaged state: evaluate on the default corpus, and the output names it
        return None
    inputs = args.get("inputs") if isinstance(args, dict) else None
    return [str(i) for i in inputs] if inputs else None
