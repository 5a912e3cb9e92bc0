"""A compare axis measured on a model's own weights (`--speculate`, `--act`), not on the grid's random ones.

Every value of the axis decodes the same prompt in one process, in turn, repeat after repeat, so a value's speed
is compared with the baseline's (the first value) in the same minute; the rows render as a table, md, csv, json
or jsonl.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gen_cli.errors import UsageError


def comma_values(values: list[str] | None) -> list[str]:
    """`a,b` `c` → [a, b, c]: the option's comma lists and repeats, blanks and repeated values dropped."""
    out: list[str] = []
    for value in values or []:
        for part in str(value).split(","):
            if (part := part.strip()) and part not in out:
                out.append(part)
    return out


def interleave_runs(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int = 0) -> dict[str, Any]:
    """Each run in turn, `warmup + repeats` times. Per name: the results of the kept repeats, in order, and the
    decode tok/s of each with its ratio to the first name's in the same repeat; the 1-minute load after each."""
    kept: dict[str, list[Any]] = {name: [] for name in runs}
    load = []
    for i in range(warmup + repeats):
        for name, run in runs.items():
            done = run()
            if i >= warmup:
                kept[name].append(done)
        load.append(os.getloadavg()[0])
    rates = {name: [r.stats.decode_tokens_per_s or 0.0 for r in results] for name, results in kept.items()}
    bases = next(iter(rates.values()))  # the first name's, repeat by repeat
    values = {}
    for name, r in rates.items():
        ratios = [a / b if b else 0.0 for a, b in zip(r, bases, strict=True)]
        values[name] = {"results": kept[name], "rates": r, "ratios": ratios}
    return {"values": values, "load": load}


def rate_fields(rates: list[float]) -> dict[str, Any]:
    """A row's decode speed: the median of the repeats, their range and every sample."""
    return {
        "decode_tokens_per_s": statistics.median(rates),
        "decode_tokens_per_s_min": min(rates),
        "decode_tokens_per_s_max": max(rates),
        "samples": {"decode_tokens_per_s": rates},
    }


def rate_cell(row: dict[str, Any]) -> str:
    """`median (min–max)` decode tok/s."""
    low, high = row["decode_tokens_per_s_min"], row["decode_tokens_per_s_max"]
    return f"{row['decode_tokens_per_s']:,.1f} ({low:,.1f}–{high:,.1f})"


def run_caption(env: dict[str, Any]) -> str:
    """What every row of an axis ran: lengths, threads, repeats, the machine's load."""
    return (
        f"{env['prompt_tokens']} prompt + {env['gen_len']} new tokens, {env['threads']} threads, "
        f"{env['repeats']} interleaved repeats, load ≤ {env['load_average']:.1f}"
    )


def render(
    result: dict[str, Any], fmt: str, columns: Sequence[tuple[str, str]], cell: Callable[[dict[str, Any], str], str],
    caption: str,
) -> str:  # fmt: skip
    """`result`'s rows as table text, md, csv, json or jsonl; `columns` are (heading, key) pairs whose text is
    `cell(row, key)`, under `caption` (table and md)."""
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
    head = [name for name, _ in columns]
    cells = [[cell(r, key) for _, key in columns] for r in rows]
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
