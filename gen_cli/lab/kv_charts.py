"""KV cache kinds in pictures: KV memory against context length per kind (analytic lines, measured
points), and decode latency against position per kind (the rows' per-step times)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gen_cli.lab.charts import Series, rolling_median
from gen_cli.lab.report import attention_label

MEASURED = " measured"  # suffix of the series that are measured points, not analytic lines


def has_kinds(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether the rows compare KV cache kinds (gen compare --kv-dtype)."""
    return any(r.get("kv_dtype") for r in rows)


def kind_label(r: dict[str, Any]) -> str:
    return r.get("kv_dtype") or {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(r["dtype"], r["dtype"])


def kv_memory_series(result: dict[str, Any], points: int = 32) -> list[Series]:
    """Per (attention, KV kind): analytic KV bytes of one sequence against context length (the row's bytes per
    token × tokens), then per kind the measured bytes of each row (cache bytes / batch at its length)."""
    rows = [r for r in result["rows"] if r["kv_cache"]]
    context = int(result["env"].get("shape", {}).get("context_length", 0))
    if not rows or context < 1:
        return []
    several = len({(r["attention"], r["kv_heads"]) for r in rows}) > 1
    lines: dict[str, int] = {}
    measured: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        name = f"{attention_label(r)} {kind_label(r)}" if several else kind_label(r)
        lines.setdefault(name, r["kv_bytes_per_token"])
        point = (float(r["prompt_len"] + r["gen_len"]), r["kv_cache_bytes_measured"] / r["batch"])
        if point not in measured.setdefault(name, []):
            measured[name].append(point)
    xs = [context * i / points for i in range(points + 1)]
    series: list[Series] = [(name, xs, [per * x for x in xs]) for name, per in lines.items()]
    for name, pts in measured.items():
        pts.sort()
        series.append((name + MEASURED, [p[0] for p in pts], [p[1] for p in pts]))
    return series


def kind_latency_series(rows: Sequence[dict[str, Any]]) -> list[Series]:
    """Per-token decode latency (ms, rolling median of 9) against position, one line per KV kind, for the
    rows sharing the first cache-on row's variant and workload."""
    on = [r for r in rows if r["kv_cache"]]
    if not on:
        return []
    same = ("attention", "kv_heads", "pos", "dtype", "prompt_len", "gen_len", "batch")
    series = []
    for r in on:
        if any(r[k] != on[0][k] for k in same):
            continue
        lat = r.get("samples", {}).get("per_token_latencies_s") or []
        # Decode step i processes the token at position prompt_len + i + 1 (1-based sequence length).
        xs = [float(r["prompt_len"] + i + 1) for i in range(len(lat))]
        series.append((f"KV {kind_label(r)}", xs, rolling_median([v * 1000 for v in lat])))
    return [s for s in series if s[1]]
