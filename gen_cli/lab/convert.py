"""`gen convert`'s measurements: pool a model's KV heads, optionally uptrain, and measure what it cost.

For each KV head count: the converted model's KV bytes per token, its greedy decode speed, and its
held-out bits per byte right after pooling and after uptraining, against the original model on the
same validation tokens, and against the original uptrained as long (the control for the extra steps).
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gen_cli.formats.checkpoint import load_model, save_model
from gen_cli.infer.generate import run_generation
from gen_cli.infer.optimize import optimize_for_decode
from gen_cli.infer.options import SamplingConfig
from gen_cli.model.convert import pool_kv_heads
from gen_cli.model.transformer import Transformer
from gen_cli.text.corpus import Corpus
from gen_cli.train.evaluate import evaluate, load_for_scoring, scoring_stream, windows_per_pass

if TYPE_CHECKING:
    from rich.text import Text

DECODE_TOKENS = 64


@dataclass
class ConvertRow:
    """One model of the comparison: the original (kv_heads = its own) or a conversion."""

    kv_heads: int
    attention_kind: str
    kv_bytes_per_token: int
    decode_tok_s: float
    bits_per_byte: float
    uptrained_bits_per_byte: float | None
    path: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _decode_rate(model: Transformer, repeats: int = 3) -> float:
    """Median greedy decode tok/s after a 4-token prompt (up to DECODE_TOKENS tokens), as `gen generate` runs."""
    fast = optimize_for_decode(_copy(model))
    prompt = torch.zeros(1, 4, dtype=torch.long)
    greedy, tokens = SamplingConfig(temperature=0.0), min(DECODE_TOKENS, model.config.context_length - 4)
    run_generation(fast, prompt, 8, greedy)  # warm-up
    rates = [run_generation(fast, prompt, tokens, greedy).stats.decode_tokens_per_s for _ in range(repeats)]
    return statistics.median(r for r in rates if r is not None)


def _copy(model: Transformer) -> Transformer:
    twin = Transformer(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def _matching_tokenizer(tok: Any, vocab_size: int) -> Any:
    """`tok`, or a copy padded with unused special tokens up to the model's vocab_size: imported models often
    round their embedding up (to a multiple of 64 …), and a gen model directory needs the two to agree."""
    missing = vocab_size - tok.get_vocab_size()
    if missing <= 0:
        return tok
    from tokenizers import AddedToken, Tokenizer

    padded = Tokenizer.from_str(tok.to_str())
    padded.add_special_tokens([AddedToken(f"<|gen_pad_{i}|>", special=True) for i in range(missing)])
    return padded


def convert_and_measure(
    model_dir: Path,
    kv_heads: list[int],
    out: Path,
    pooling: str = "mean",
    inputs: list[str] | None = None,
    eval_tokens: int = 20_000,
    uptrain: Callable[[Path, Path], None] | None = None,
    report: Callable[[str], None] = lambda _msg: None,
) -> list[ConvertRow]:
    """The original's row, then one per KV head count: converted, measured, and written to out (out/kv{K}
    for several), by `uptrain(pooled_dir, out_dir)` when given (a training run starting from the pooled model).
    The model may be a gen directory, an HF folder or a GGUF file; each is scored as `gen eval` scores it."""
    model, tok, separator = load_for_scoring(model_dir, torch.device("cpu"))
    corpus = Corpus(inputs or [])
    corpus.require_text()
    val, table, target_bytes = scoring_stream(tok, corpus, separator)
    tok = _matching_tokenizer(tok, model.config.vocab_size)
    # An imported model's context can be 32k tokens: no window longer than the tokens scored.
    context = min(model.config.context_length, eval_tokens)
    batch = windows_per_pass(8, context, model.config.vocab_size)

    def bits(m: Transformer) -> float:
        return evaluate(
            m, val, table, context, batch, torch.device("cpu"), None, eval_tokens, target_bytes
        ).bits_per_byte

    def row(m: Transformer, path: Path | None, uptrained: float | None) -> ConvertRow:
        c = m.config
        return ConvertRow(c.n_kv_head, c.attention_kind, c.kv_bytes_per_token(4), _decode_rate(m), bits(m), uptrained,
                          str(path) if path else None)  # fmt: skip

    report(f"measuring the original ({model.config.n_kv_head} KV heads)")
    rows = [row(model, None, None)]
    if uptrain is not None:
        # The control: the original trained the same extra steps on the same text, so the table tells
        # what pooling cost apart from what the extra training bought.
        report("uptraining the original the same steps (the control)")
        with tempfile.TemporaryDirectory(prefix="gen-convert-") as control:
            uptrain(Path(model_dir), Path(control) / "run")
            rows[0].uptrained_bits_per_byte = bits(load_model(Path(control) / "run")[0])
    for k in kv_heads:
        target = out if len(kv_heads) == 1 else out / f"kv{k}"
        report(f"pooling to {k} KV heads ({pooling})")
        converted = pool_kv_heads(model, k, pooling)
        if uptrain is None:
            save_model(target, converted, tok)
            rows.append(row(converted, target, None))
            continue
        with tempfile.TemporaryDirectory(prefix="gen-convert-") as pooled:
            save_model(pooled, converted, tok)
            measured = row(converted, target, None)
            report(f"uptraining the {k}-KV-head model")
            uptrain(Path(pooled), target)  # a run folder: the uptrained model plus its train state
        measured.uptrained_bits_per_byte = bits(load_model(target)[0])
        rows.append(measured)
    return rows


def quality_chart(rows: list[ConvertRow]) -> Text:
    """Bits per byte against KV-cache KiB per token: pooled, and uptrained where every row was."""
    from gen_cli.lab.charts import line_chart

    kv = [r.kv_bytes_per_token / 1024 for r in rows]
    series = [("pooled", kv, [r.bits_per_byte for r in rows])]
    if all(r.uptrained_bits_per_byte is not None for r in rows):
        series.append(("uptrained", kv, [r.uptrained_bits_per_byte for r in rows]))
    return line_chart(series, "bits per byte against KV cache per token", "KiB per token", "{:.3f}".format)
