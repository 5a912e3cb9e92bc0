"""`gen bench decode`'s results in llama-bench's vocabulary: one row per test (`pp512`, `tg128`), rates in
`t/s` as median ± standard deviation of the repeats, as markdown, CSV or JSON; llama.cpp's own tests
(when it ran) beside gen's, with the ratio gen / llama.cpp per test."""

from __future__ import annotations

import csv
import io
import json
import statistics
from typing import Any

from gen_cli.lab.decode_bench import Row

FORMATS = ("md", "csv", "json")
COLUMNS = ("model", "mode", "path", "threads", "test", "t/s", "× llama.cpp", "MB/token", "% ceiling", "% peak FLOP",
           "max |Δlogit|", "greedy =")  # fmt: skip


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def tests(rows: list[Row], context: dict[str, Any]) -> list[dict[str, Any]]:
    """Records, one per (configuration, test): gen's modes, transformers, llama.cpp; rates in tokens/s."""
    threads = context.get("threads")
    out: list[dict[str, Any]] = []
    for r in rows:
        common = {"model": r.shape, "mode": r.mode, "path": r.path, "threads": threads,
                  "bytes_per_token": r.bytes_per_token, "max_logit_diff": r.max_logit_diff,
                  "greedy_agree": r.greedy_agree, "new_tokens": r.new_tokens,
                  "bytes_by_class": r.extra.get("bytes_by_class")}  # fmt: skip
        peak = r.peak_gflops
        prefill_flops = r.prefill_tok_s * r.prefill_flops_per_token
        out.append({**common, "test": f"pp{r.prefill_prompt}", "t_s": r.prefill_tok_s, "sd": _sd(r.prefill_runs),
                    "samples": r.prefill_runs, "gflops": prefill_flops / 1e9, "peak_dtype": r.peak_dtype,
                    "pct_peak_flops": 100 * prefill_flops / (peak * 1e9) if peak else None})  # fmt: skip
        out.append({**common, "test": f"tg{r.new_tokens}", "t_s": r.decode_tok_s, "sd": _sd(r.decode_runs),
                    "samples": r.decode_runs, "pct_ceiling": 100 * r.decode_tok_s / r.ceiling_tok_s})  # fmt: skip
    llama = context.get("llama_bench") or []
    label = rows[0].shape if rows else ""
    for t in llama:
        out.append({"model": label, "mode": t["model_type"], "path": "llama.cpp", "threads": t["n_threads"],
                    "test": t["test"], "t_s": t["median_ts"], "sd": t["stddev_ts"], "samples": t["samples_ts"],
                    "model_size": t["model_size"]})  # fmt: skip
    by_test = {t["test"]: t["median_ts"] for t in llama}
    for rec in out:
        if rec["path"] != "llama.cpp" and by_test.get(rec["test"]):
            rec["vs_llama"] = rec["t_s"] / by_test[rec["test"]]
    return out


def _cell(rec: dict[str, Any], column: str) -> str:
    def num(key: str, fmt: str) -> str:
        v = rec.get(key)
        return format(v, fmt) if v is not None else ""

    if column == "t/s":
        return f"{rec['t_s']:.2f} ± {rec['sd']:.2f}"
    if column == "× llama.cpp":
        return num("vs_llama", ".2f") + ("×" if rec.get("vs_llama") else "")
    if column == "MB/token":
        return f"{rec['bytes_per_token'] / 1e6:.1f}" if rec.get("bytes_per_token") else ""
    if column == "% ceiling":
        return num("pct_ceiling", ".0f")
    if column == "% peak FLOP":  # of the peak of what the prefill computes in (int8 products count as ops)
        return num("pct_peak_flops", ".0f") + (f" ({rec['peak_dtype']})" if rec.get("pct_peak_flops") else "")
    if column == "max |Δlogit|":
        return num("max_logit_diff", ".2g")
    if column == "greedy =":
        return f"{rec['greedy_agree']}/{rec['new_tokens']}" if "greedy_agree" in rec else ""
    return str(rec.get(column, ""))


def to_markdown(records: list[dict[str, Any]]) -> str:
    """A markdown table like llama-bench's `-o md`, with gen's extra columns."""

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = "|" + "|".join("---" if c in COLUMNS[:3] else "---:" for c in COLUMNS) + "|"
    lines = [row(list(COLUMNS)), align] + [row([_cell(rec, c) for c in COLUMNS]) for rec in records]
    return "\n".join(lines) + "\n"


CSV_KEYS = ("model", "mode", "path", "threads", "test", "t_s", "sd", "vs_llama", "bytes_per_token", "pct_ceiling",
            "gflops", "pct_peak_flops", "max_logit_diff", "greedy_agree", "new_tokens", "model_size")  # fmt: skip


def to_csv(records: list[dict[str, Any]]) -> str:
    """One line per test, numbers unformatted (samples are in the JSON)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_KEYS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def to_json(rows: list[Row], context: dict[str, Any]) -> str:
    """The run's context, gen's rows as measured (as `--json` always printed them) and the test records."""
    return json.dumps({"context": context, "rows": [r.to_dict() for r in rows], "tests": tests(rows, context)},
                      indent=2)  # fmt: skip


def render(rows: list[Row], context: dict[str, Any], fmt: str) -> str:
    """The results in `fmt` (one of FORMATS)."""
    if fmt == "json":
        return to_json(rows, context) + "\n"
    records = tests(rows, context)
    return to_markdown(records) if fmt == "md" else to_csv(records)
