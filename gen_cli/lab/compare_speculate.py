"""`gen compare --speculate off,ngram,draft:PATH`: speculative decoding as a compare axis.

Acceptance depends on the weights and the text, so this axis runs on the model's own weights (not the grid's
random ones) with a text prompt: every proposer and plain decoding in one process, interleaved repeat by
repeat, greedy, each row's decode tok/s (median, min–max), the share of guesses kept, tokens per target
forward, the speed-up over `off` (median of per-repeat ratios) and whether the text equals `off`'s.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from gen_cli.errors import UsageError
from gen_cli.lab import own_weights
from gen_cli.lab.own_weights import comma_values, interleave_runs, rate_cell, rate_fields

OFF = "off"


def speculate_values(values: list[str] | None) -> list[str]:
    """`off,ngram,ngram:6,draft:PATH,draft:self:q4_0` → checked values, `off` first (the baseline, added when
    not listed). Paths keep their case; a comma list or the option repeated."""
    from gen_cli.infer.proposers import parse_speculate

    out = comma_values(values)
    for part in out:
        if part == "draft:":
            raise UsageError("speculate draft:PATH needs a draft model (a path or self:q4_0)", params=("speculate",))
        if part != OFF and not part.startswith("draft:"):
            parse_speculate(part)  # ngram[:K]: refused here when malformed
    if not out:
        raise UsageError("speculate needs at least one of off, ngram[:K], draft:PATH", params=("speculate",))
    return [OFF, *[v for v in out if v != OFF]]


def _speculation(engine: Any, source: Any, value: str) -> Any:
    from gen_cli.infer.proposers import speculation_for

    if value == OFF:
        return None
    if value.startswith("draft:"):
        return speculation_for(engine, source, "draft", value.removeprefix("draft:"))
    return speculation_for(engine, source, value, None)


def interleave(
    engine: Any, ids: list[int], gen_len: int, sampling: Any, speculations: dict[str, Any], repeats: int,
    warmup: int = 0, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Every speculation (None: plain decoding) on the same prompt, in turn, `warmup + repeats` times (each run
    restarts its proposer). Per name: decode tok/s per kept repeat, its ratio to the first name's in the same
    repeat, whether its ids equalled the first name's in every repeat, its last speculation figures; the load."""
    import torch

    def decoding(speculation: Any) -> Callable[[], Any]:
        return lambda: engine.generate(ids, gen_len, sampling, seed=seed, stop_ids=(), speculation=speculation)

    runs = interleave_runs({v: decoding(s) for v, s in speculations.items()}, repeats, warmup)
    first = next(iter(runs["values"].values()))["results"]
    for value in runs["values"].values():
        results = value.pop("results")
        value["identical"] = all(torch.equal(r.tokens, f.tokens) for r, f in zip(results, first, strict=True))
        value["figures"] = results[-1].stats.speculation or {}
    return runs


def measure(
    source: Any, values: list[str], prompt: str, gen_len: int, repeats: int, warmup: int, threads: int | None,
    device: str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """Each value of the axis on `source`'s weights, interleaved; {"env": …, "rows": […]} with `off` first."""
    import torch

    from gen_cli.infer.engine import open_model
    from gen_cli.infer.options import EngineOptions, SamplingConfig

    if repeats < 1 or warmup < 0:
        raise UsageError("repeats must be at least 1 and warmup not negative", params=("repeats", "warmup"))
    engine = open_model(source, EngineOptions(device=device, threads=threads))
    ids = engine.encode(prompt)
    gen_len = min(gen_len, engine.model.config.context_length - len(ids))
    if gen_len < 2:
        raise UsageError("the prompt leaves no room to generate in this model's context; give a longer context")
    speculations = {v: _speculation(engine, source, v) for v in values}  # drafts opened once, restarted per run
    runs = interleave(engine, ids, gen_len, SamplingConfig(temperature=0.0), speculations, repeats, warmup)
    load = runs["load"]
    rows = []
    for v in values:
        run = runs["values"][v]
        spec, rates = run["figures"], run["rates"]
        rows.append({
            "speculate": v,
            **rate_fields(rates),
            "speedup_vs_off": statistics.median(run["ratios"]),
            "acceptance_rate": spec.get("acceptance_rate"),
            "tokens_per_forward": spec.get("tokens_per_forward", 1.0 if v == OFF else None),
            "mean_k": spec.get("mean_k"),
            "identical_to_off": run["identical"],
        })  # fmt: skip
    env = {
        "model": engine.source,
        "prompt_tokens": len(ids),
        "gen_len": gen_len,
        "repeats": repeats,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "device": str(engine.device),
        "load_average": max(load) if load else None,
        "note": "greedy; interleaved repeats; tok/s over the decode phase; speed-up: median of per-repeat ratios",
    }
    return {"env": env, "rows": rows}


_COLUMNS = (
    ("speculate", "speculate"),
    ("decode tok/s", "rate"),
    ("speed-up", "speedup_vs_off"),
    ("kept", "acceptance_rate"),
    ("tok/forward", "tokens_per_forward"),
    ("same text", "identical_to_off"),
)


def _cell(row: dict[str, Any], key: str) -> str:
    if key == "rate":
        return rate_cell(row)
    value = row[key]
    if value is None:
        return "–"
    if key == "speedup_vs_off":
        return f"{value:.2f}×"
    if key == "acceptance_rate":
        return f"{value:.0%}"
    if key == "tokens_per_forward":
        return f"{value:.2f}"
    if key == "identical_to_off":
        return "yes" if value else "NO"
    return str(value)


def render(result: dict[str, Any], fmt: str) -> str:
    """The axis's rows as table text, md, csv, json or jsonl."""
    env = result["env"]
    return own_weights.render(result, fmt, _COLUMNS, _cell, f"{env['model']}: {own_weights.run_caption(env)}")
