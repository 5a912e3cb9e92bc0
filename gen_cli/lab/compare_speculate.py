"""`gen compare --speculate off,ngram,draft:PATH`: speculative decoding as a compare axis.

Acceptance depends on the weights and the text, so this axis runs on the model's own weights (not the grid's
random ones) with a text prompt: every proposer and plain decoding in one process, interleaved repeat by
repeat, greedy, each row's decode tok/s (median, min–max), the share of guesses kept, tokens per target
forward, the speed-up over `off` (median of per-repeat ratios) and whether the text equals `off`'s.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from pathlib import Path
from typing import Any

from gen_cli.errors import UsageError

OFF = "off"


def speculate_values(values: list[str] | None) -> list[str]:
    """`off,ngram,ngram:6,draft:PATH,draft:self:q4_0` → checked values, `off` first (the baseline, added when
    not listed). Paths keep their case; a comma list or the option repeated."""
    from gen_cli.infer.proposers import parse_speculate

    out: list[str] = []
    for value in values or []:
        for part in str(value).split(","):
            part = part.strip()
            if not part or part in out:
                continue
            if part == OFF or part.startswith("draft:"):
                if part == "draft:":
                    raise UsageError(
                        "speculate draft:PATH needs a draft model (a path or self:q4_0)", params=("speculate",)
                    )
            else:
                parse_speculate(part)  # ngram[:K]: refused here when malformed
            out.append(part)
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

    out: dict[str, dict[str, Any]] = {
        v: {"rates": [], "ratios": [], "identical": True, "figures": {}} for v in speculations
    }
    load = []
    for i in range(warmup + repeats):
        first = None
        for v, speculation in speculations.items():
            done = engine.generate(ids, gen_len, sampling, seed=seed, stop_ids=(), speculation=speculation)
            first = done if first is None else first
            if i < warmup:
                continue
            run = out[v]
            rate = done.stats.decode_tokens_per_s or 0.0
            base = first.stats.decode_tokens_per_s or 0.0
            run["rates"].append(rate)
            run["ratios"].append(rate / base if base else 0.0)
            run["identical"] &= torch.equal(done.tokens, first.tokens)
            run["figures"] = done.stats.speculation or {}
        load.append(os.getloadavg()[0])
    return {"values": out, "load": load}


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
            "decode_tokens_per_s": statistics.median(rates),
            "decode_tokens_per_s_min": min(rates),
            "decode_tokens_per_s_max": max(rates),
            "speedup_vs_off": statistics.median(run["ratios"]),
            "acceptance_rate": spec.get("acceptance_rate"),
            "tokens_per_forward": spec.get("tokens_per_forward", 1.0 if v == OFF else None),
            "mean_k": spec.get("mean_k"),
            "identical_to_off": run["identical"],
            "samples": {"decode_tokens_per_s": rates},
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
        r = row
        return (
            f"{r['decode_tokens_per_s']:,.1f} ({r['decode_tokens_per_s_min']:,.1f}–{r['decode_tokens_per_s_max']:,.1f})"
        )
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
    rows, env = result["rows"], result["env"]
    if fmt == "json":
        return json.dumps(result, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(x) + "\n" for x in [{"env": env}, *rows])
    if fmt == "csv":
        buffer = io.StringIO()
        keys = [k for k in rows[0] if k != "samples"]
        writer = csv.DictWriter(buffer, keys, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    head = [name for name, _ in _COLUMNS]
    cells = [[_cell(r, key) for _, key in _COLUMNS] for r in rows]
    caption = (
        f"{env['model']}: {env['prompt_tokens']} prompt + {env['gen_len']} new tokens, {env['threads']} threads, "
        f"{env['repeats']} interleaved repeats, load ≤ {env['load_average']:.1f}"
    )
    if fmt == "md":
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return caption + "\n\n" + "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells]) + "\n"
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    text = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    text += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return caption + "\n" + "\n".join(line.rstrip() for line in text) + "\n"


def default_source(preset: str | None, model_dir: Path | None) -> Any:
    """What the axis runs on: --model's weights, a preset's random weights, or the shipped model."""
    from gen_cli.infer.options import Preset
    from gen_cli.resources import default_model_dir

    if model_dir is not None and preset is not None:
        raise UsageError("give a model or a preset, not both", params=("model", "preset"))
    if preset is not None:
        return Preset(preset)
    return model_dir if model_dir is not None else default_model_dir()
