"""`gen compare --act int8,int8x2,bf16,fp32`: what block weights' products multiply, as a compare axis.

What rounding the activations costs depends on the weights and the text, so this axis runs on the model's own
block weights (a model stored without them is quantized to Q8_0 at load), laid out for each precision as `gen
generate --act` lays them out: one load for the integer precisions, a second for the float ones when one is
listed, each switched with `set_act`. Every precision decodes the same prompt, greedy, interleaved repeat by
repeat: decode tok/s (median, min–max) and its ratio to int8's, the default (median of per-repeat ratios), and
the prompt's prefill tok/s (median). Then each is scored against fp32 activations on real text
(`lab.act_quality`): KL of the next-token distributions, top-1 and greedy agreement.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from gen_cli.errors import GenError, UsageError
from gen_cli.lab import own_weights
from gen_cli.lab.own_weights import comma_values, interleave_runs, rate_cell, rate_fields

BASELINE = "int8"  # the default (abi.ACT_DEFAULT), as llama.cpp multiplies: every speed is given against it
QUANTIZE = "q8_0"  # block weights for a model stored without them
GREEDY_TOKENS = 64  # at most; fewer when fewer are generated


def act_values(values: list[str] | None) -> list[str]:
    """`int8x2,fp32` → checked precisions, int8 first (the baseline, added when not listed)."""
    from gen_cli.infer.options import check_act

    out = [check_act(v) for v in comma_values(values)]
    if not out:
        raise UsageError("act needs at least one precision: int8, int8x2, bf16 or fp32", params=("act",))
    return [BASELINE, *[v for v in out if v != BASELINE]]


def check_device(device: str) -> None:
    """Refuse a device other than the CPU: the precisions are the C block kernels' choices."""
    if device not in ("auto", "cpu"):
        raise UsageError(
            f"activation precisions are the CPU's block kernels' choices: measure them on device cpu, not {device}",
            params=("device",),
        )


def _open(source: Any, act: str, threads: int | None, quantize: str = "none") -> tuple[Any, str]:
    """The model laid out as `gen generate --act ACT` lays it out, with block weights the C kernels multiply
    (`quantize` none: the source's own, or QUANTIZE's when it has none), and the quantization that took."""
    import gc

    from gen_cli.infer.engine import open_model
    from gen_cli.infer.optimize import activations
    from gen_cli.infer.options import EngineOptions
    from gen_cli.quant.block_linear import BlockLinear

    engine = open_model(source, EngineOptions(device="cpu", threads=threads, act=act, quantize=quantize))
    if quantize == "none" and activations(engine.model) is None:  # no block weights: quantize, the copy freed first
        del engine
        gc.collect()
        return _open(source, act, threads, QUANTIZE)
    if not any(isinstance(m, BlockLinear) and m.kernel is not None for m in engine.model.modules()):
        raise UsageError(
            "an activation precision is a choice of gen's C block kernels, which did not build here (`gen info` says "
            "why); without them block weights always multiply fp32 activations",
            params=("act",),
        )
    return engine, quantize


def measure(
    source: Any, values: list[str], prompt: str, gen_len: int, repeats: int, warmup: int, threads: int | None,
    device: str = "cpu", inputs: list[str] | None = None, say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:  # fmt: skip
    """Each precision on `source`'s block weights: speed interleaved, then quality against fp32 activations on the
    validation text of `inputs` (default: the built-in corpus); {"env": …, "rows": […]} with int8 first. `say`
    hears what starts (the quality pass steps every precision through the text once).

    Each precision runs on the weights as `gen generate --act` lays them out: interleaved rows for the integer
    ones, stored rows for the float ones (loaded a second time when one is listed), whose products on the
    interleaved layouts ran 2-5x slower (1B Q4_K_M, trained Q8_0). fp32's reference comes from the stored rows
    when they are loaded, else from the interleaved ones (the same products, slower)."""
    import torch

    from gen_cli.infer.optimize import set_act
    from gen_cli.infer.options import SamplingConfig
    from gen_cli.lab.act_quality import TEXT_TOKENS, act_quality, fp32_reference, text_ids
    from gen_cli.native.abi import INTEGER_ACTS

    if repeats < 1 or warmup < 0:
        raise UsageError("repeats must be at least 1 and warmup not negative", params=("repeats", "warmup"))
    check_device(device)
    integer, quantize = _open(source, BASELINE, threads)
    floating = integer
    if floats := [v for v in values if v not in INTEGER_ACTS]:
        say(f"loading the weights a second time, laid out for {' and '.join(floats)} activations")
        try:
            floating, _ = _open(source, "fp32", threads, quantize)
        except GenError as e:
            raise GenError(f"act {','.join(floats)} holds the weights a second time (stored rows): {e}") from e
    engines = {v: integer if v in INTEGER_ACTS else floating for v in values}
    context = integer.model.config.context_length
    ids = integer.encode(prompt)
    gen_len = min(gen_len, context - len(ids))
    if gen_len < 2:
        raise UsageError("the prompt leaves no room to generate in this model's context; give a longer context")
    greedy = SamplingConfig(temperature=0.0)

    def decoding(act: str) -> Any:
        engine = engines[act]

        def run() -> Any:
            set_act(engine.model, act)
            return engine.generate(ids, gen_len, greedy, stop_ids=())

        return run

    runs = interleave_runs({v: decoding(v) for v in values}, repeats, warmup)
    text = text_ids(integer.encode, min(TEXT_TOKENS, context - 1), inputs)
    if text.shape[1] < 2:
        raise UsageError("the quality text is under 2 tokens; give more text", params=("quality_data",))
    say(f"scoring {', '.join(values)} against fp32 activations over {text.shape[1] - 1} positions of real text")
    greedy_tokens = min(gen_len, GREEDY_TOKENS)
    reference = fp32_reference(floating.model, text, greedy_tokens)
    quality = {}
    for engine in (integer,) if floating is integer else (integer, floating):
        acts = [v for v in values if engines[v] is engine]
        quality |= {q.act: q for q in act_quality(engine.model, text, acts, greedy_tokens, reference)}
    rows = []
    for v in values:
        run, q = runs["values"][v], quality[v]
        rows.append({
            "act": v,
            **rate_fields(run["rates"]),
            "speed_vs_int8": statistics.median(run["ratios"]),
            "prefill_tokens_per_s": statistics.median(r.stats.prefill_tokens_per_s for r in run["results"]),
            "kl_mean": q.kl_mean,
            "kl_max": q.kl_max,
            "top1_agreement": q.top1_agreement,
            "greedy_agree": q.greedy_agree,
            "greedy_tokens": q.greedy_tokens,
        })  # fmt: skip
    load = runs["load"]
    env = {
        "model": integer.source,
        "weights": "block weights as stored" if quantize == "none" else f"quantized to {quantize.upper()} at load",
        "prompt_tokens": len(ids),
        "gen_len": gen_len,
        "repeats": repeats,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "load_average": max(load) if load else None,
        "text_positions": text.shape[1] - 1,
        "note": "greedy; interleaved repeats; tok/s over the decode phase; × int8: median of per-repeat ratios; "
        "KL(fp32 ‖ act) in nats over the text's positions, each token fed as one decode step; each precision on "
        "the weights laid out as gen generate --act lays them out",
    }
    return {"env": env, "rows": rows}


_COLUMNS = (
    ("act", "act"),
    ("decode tok/s", "rate"),
    ("× int8", "speed_vs_int8"),
    ("prefill tok/s", "prefill_tokens_per_s"),
    ("KL mean", "kl_mean"),
    ("KL max", "kl_max"),
    ("top-1", "top1_agreement"),
    ("greedy =", "greedy_agree"),
)


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if key == "rate":
        return rate_cell(row)
    if key == "speed_vs_int8":
        return f"{value:.2f}×"
    if key == "prefill_tokens_per_s":
        return f"{value:,.0f}"
    if key in ("kl_mean", "kl_max"):
        return f"{value:.1e}" if value else "0 (ref)" if row["act"] == "fp32" else "0"
    if key == "top1_agreement":
        return f"{value:.1%}"
    if key == "greedy_agree":
        return f"{value}/{row['greedy_tokens']}"
    return str(value)


def render(result: dict[str, Any], fmt: str) -> str:
    """The axis's rows as table text, md, csv, json or jsonl."""
    env = result["env"]
    caption = (
        f"{env['model']} ({env['weights']}): {own_weights.run_caption(env)}; "
        f"against fp32 activations over {env['text_positions']} positions of real text"
    )
    return own_weights.render(result, fmt, _COLUMNS, _cell, caption)
