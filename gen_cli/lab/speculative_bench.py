"""Speculative against plain decoding in one run: decode tok/s side by side, the ids compared, and the costs
that bound the speed-up (a verify forward over K+1 tokens against one decode step)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

import torch

from gen_cli.cache.spec import CacheSpec
from gen_cli.infer.engine import Engine
from gen_cli.infer.generate import decode_step, prefill
from gen_cli.infer.options import Preset, SamplingConfig
from gen_cli.infer.speculative import Speculation, verify_forward

# An input-grounded task for the shipped model (trained on Python's documentation): a passage, then its start
# again, so the continuation copies it, as a rewrite or a summary of a given text copies spans of it.
PASSAGE = (
    "The json module provides functions to encode Python objects as JSON strings and to decode JSON strings "
    "into Python objects. The dumps() function returns a string; the dump() function writes to a file object. "
    "The optional argument indent makes the output readable, and sort_keys sorts the keys of every dictionary. "
    "The loads() function parses a string and returns the object it describes; a ValueError is raised when the "
    "text is not valid JSON."
)
DEFAULT_PROMPT = PASSAGE + "\n\n" + PASSAGE[:60]


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@torch.inference_mode()
def forward_costs(engine: Engine, ids: list[int], k: int, repeats: int = 15) -> dict[str, Any]:
    """Median seconds of one decode step (the C step where it runs) and of forwards over 2, 3, 4, 6, 8 and
    k+1 tokens, interleaved on a cache at the prompt's end; a forward's cost in steps bounds a round's gain."""
    model = engine.model
    widths = sorted({2, 3, 4, 6, 8, k + 1})
    cache = engine.new_cache(CacheSpec(), len(ids), max(widths))
    prefill(model, torch.tensor([ids], device=engine.device), cache)
    base = cache.pos
    one = torch.tensor([[ids[-1]]], device=engine.device)  # (1, 1)
    blocks = {n: (ids * n)[-n:] for n in widths}  # the n tokens a verify forward takes
    steps: list[float] = []
    verifies: dict[int, list[float]] = {n: [] for n in widths}
    for i in range(repeats + 3):
        for n in (1, *widths):
            cache.truncate(base)
            start = perf_counter()
            if n == 1:
                decode_step(model, one, cache)
            else:
                verify_forward(model, blocks[n], cache)
            if i >= 3:  # warm-up rounds are not kept
                (steps if n == 1 else verifies[n]).append(perf_counter() - start)
    step = statistics.median(steps)
    verify = statistics.median(verifies[k + 1])
    return {
        "k": k, "step_s": step, "verify_s": verify, "verify_over_step": verify / step,
        "rows_over_step": {n: statistics.median(v) / step for n, v in verifies.items()},
    }  # fmt: skip


def compare(
    engine: Engine,
    ids: list[int],
    max_new_tokens: int,
    sampling: SamplingConfig,
    make: Callable[[], Speculation],
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Plain and speculative generation of the same prompt, interleaved `repeats` times (the proposer restarts
    each run); decode tok/s spreads, the per-pair speed-up, and whether the ids agreed (greedy)."""
    from gen_cli.lab.compare_speculate import interleave

    runs = interleave(engine, ids, max_new_tokens, sampling, {"off": None, "on": make()}, repeats, seed=seed)
    plain, spec = runs["values"]["off"], runs["values"]["on"]
    last = spec["figures"]
    return {
        "plain_tok_s": _spread(plain["rates"]),
        "speculative_tok_s": _spread(spec["rates"]),
        "speedup": _spread(spec["ratios"]),
        "identical": spec["identical"] if sampling.greedy else None,
        "acceptance_rate": last["acceptance_rate"],
        "tokens_per_forward": last["tokens_per_forward"],
        "mean_k": last["mean_k"],
        "target_s": last["target_s"],
        "draft_s": last["draft_s"],
        "planner": {key: last.get(key) for key in ("held", "probes", "k_counts", "verify_steps")},
        "overhead_s": (last["rounds_s"] - last["forward_s"]) / last["rounds"] if last["rounds"] else 0.0,
        "forward_s": last["forward_s"] / last["rounds"] if last["rounds"] else 0.0,
        "costs": forward_costs(engine, ids, round(last["mean_k"] or 1)),
        "threads": torch.get_num_threads(),
        "load_average": max(runs["load"]),
        "repeats": repeats,
    }


def bench(
    model: Path | Preset | None,
    speculate: str | None,
    draft: str | None,
    prompt: str,
    max_new_tokens: int,
    repeats: int,
    threads: int | None,
    temperature: float = 0.0,
) -> dict[str, Any]:
    """`compare` on a model (a path, a preset's random weights, None: the shipped one) with the speculation
    the flags name; the figures and what ran."""
    from gen_cli.infer.engine import open_model
    from gen_cli.infer.options import EngineOptions
    from gen_cli.infer.proposers import speculation_for

    engine = open_model(model, EngineOptions(threads=threads))
    speculation = speculation_for(
        engine, model, speculate if speculate or draft else "ngram", draft
    )  # its proposer restarts each run
    assert speculation is not None
    ids = engine.encode(prompt)
    out = compare(engine, ids, max_new_tokens, SamplingConfig(temperature=temperature), lambda: speculation, repeats)
    proposer = draft or speculate or "ngram"
    return out | {
        "model": engine.source,
        "proposer": proposer,
        "prompt_tokens": len(ids),
        "max_new_tokens": max_new_tokens,
    }


def _planned(p: dict[str, Any]) -> str:
    """What the adaptive planner chose: K per verify round, plain steps held back, forward costs in steps."""
    if not p.get("k_counts") and not p.get("held"):
        return "K fixed"
    ks = ", ".join(f"K{k}×{n}" for k, n in p["k_counts"].items()) or "no guesses"
    costs = " ".join(f"{n}:{c:.2f}" for n, c in p["verify_steps"].items())
    return f"chose {ks}, {p['held']} plain steps ({p['probes']} probes after them); rows:steps {costs}"


def format_bench(r: dict[str, Any]) -> list[str]:
    """The comparison as a few lines of text."""

    def spread(v: dict[str, float], unit: str = "") -> str:
        return f"{v['median']:,.2f}{unit} ({v['min']:,.2f}–{v['max']:,.2f})"

    c = r["costs"]
    same = {True: "identical ids", False: "ids DIFFER", None: "sampled"}[r["identical"]]
    kept = "n/a" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}"
    per = "n/a" if r["tokens_per_forward"] is None else f"{r['tokens_per_forward']:.2f}"
    return [
        f"model {r['model']}, {r['proposer']}, {r['prompt_tokens']} prompt + {r['max_new_tokens']} new tokens, "
        f"{r['threads']} threads, {r['repeats']} interleaved repeats, load {r['load_average']:.1f}",
        f"plain        {spread(r['plain_tok_s'], ' tok/s')}",
        f"speculative  {spread(r['speculative_tok_s'], ' tok/s')}   {same}",
        f"speed-up     {spread(r['speedup'], '×')}",
        f"guesses kept {kept}, {per} tokens per target forward, mean K {r['mean_k'] or 0:.1f}; "
        f"target {r['target_s'] * 1000:.0f} ms, proposer {r['draft_s'] * 1000:.0f} ms (last run)",
        f"per round    forward {r['forward_s'] * 1000:.3f} ms, the rest (proposer, checks, Python) "
        f"{r['overhead_s'] * 1000:.3f} ms; {_planned(r['planner'])}",
        f"costs        one decode step {c['step_s'] * 1000:.3f} ms, verify over {c['k'] + 1} tokens "
        f"{c['verify_s'] * 1000:.3f} ms = {c['verify_over_step']:.1f} steps; rows:steps "
        + " ".join(f"{n}:{x:.2f}" for n, x in c["rows_over_step"].items()),
    ]
