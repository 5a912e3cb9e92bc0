"""`gen compare`'s pictures: decode latency by position and KV-cache size by context, in the terminal or as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Group

from gen_cli.lab.charts import Series, line_chart, rolling_median
from gen_cli.lab.report import attention_label, human_bytes

_MPL_COLORS = ("tab:cyan", "tab:purple", "tab:olive", "tab:green", "tab:red", "tab:blue")


def latency_series(rows: Sequence[dict[str, Any]]) -> list[Series]:
    """Per-token decode latency (ms, rolling median) against sequence length: cache on vs off of the
    baseline's attention, pos, dtype and workload."""
    if not rows:
        return []
    f = rows[0]
    same = ("attention", "kv_heads", "prompt_len", "gen_len", "batch", "pos", "dtype")
    series = []
    for r in rows:
        if any(r[k] != f[k] for k in same):
            continue
        lat = r.get("samples", {}).get("per_token_latencies_s") or []
        # Decode step i processes the token at position prompt_len + i + 1 (1-based sequence length).
        xs = [float(r["prompt_len"] + i + 1) for i in range(len(lat))]
        name = f"{attention_label(r)} cache {'on' if r['kv_cache'] else 'off'}"
        series.append((name, xs, rolling_median([v * 1000 for v in lat])))
    return [s for s in series if s[1]]


def kv_series(result: dict[str, Any], points: int = 32) -> list[Series]:
    """Analytic KV-cache bytes of one sequence against context length, one line per attention kind."""
    rows, context = result["rows"], int(result["env"].get("shape", {}).get("context_length", 0))
    if not rows or context < 1:
        return []
    dtype = rows[0]["dtype"]
    seen: dict[tuple[str, int], int] = {}
    for r in rows:
        if r["dtype"] == dtype:
            seen.setdefault((r["attention"], r["kv_heads"]), r["kv_bytes_per_token"])
    xs = [context * i / points for i in range(points + 1)]
    return [(f"{a} ({kv} KV heads)", xs, [per * x for x in xs]) for (a, kv), per in seen.items()]


def _series(result: dict[str, Any]) -> tuple[list[Series], list[Series], str]:
    """(latency, KV size, what the size lines are): per KV kind when the rows compare kinds."""
    from gen_cli.lab import kv_charts

    if kv_charts.has_kinds(result["rows"]):
        lat = kv_charts.kind_latency_series(result["rows"])
        return lat, kv_charts.kv_memory_series(result), "analytic lines, measured points"
    return latency_series(result["rows"]), kv_series(result), "analytic"


def charts(result: dict[str, Any], width: int = 60) -> Group:
    """The two pictures: decode latency by position, and KV-cache bytes by context length."""
    parts: list[Any] = []
    lat, kv, what = _series(result)
    if lat:
        parts.append(line_chart(lat, "per-token decode latency (ms) by position, one run (rolling median of 9)",
                                "tokens in sequence", lambda v: f"{v:.2f}", width))  # fmt: skip
    if kv:
        parts.append(line_chart(kv, f"KV-cache size of one sequence by context length ({what})",
                                "tokens of context", human_bytes, width))  # fmt: skip
    return Group(*parts)


def save_plot(result: dict[str, Any], path: str | Path) -> None:
    """Both charts as an image (format from the suffix, PNG by default), written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    from gen_cli.atomic import atomic_path
    from gen_cli.lab.kv_charts import MEASURED

    lat, kv, what = _series(result)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, xs, ys) in enumerate(lat):
        ax1.plot(xs, ys, label=name, color=_MPL_COLORS[i % len(_MPL_COLORS)], linewidth=1)
    ax1.set(
        title="per-token decode latency (one run, rolling median of 9)",
        xlabel="tokens in sequence",
        ylabel="ms per token",
    )
    colors: dict[str, str] = {}
    for name, xs, ys in kv:
        line = name.removesuffix(MEASURED)
        color = colors.setdefault(line, _MPL_COLORS[len(colors) % len(_MPL_COLORS)])
        style = {"marker": "o", "linestyle": "none"} if name.endswith(MEASURED) else {}
        ax2.plot(xs, [y / 2**20 for y in ys], label=name, color=color, **style)
    ax2.set(title=f"KV-cache size per sequence ({what})", xlabel="tokens of context", ylabel="MiB")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    env = result["env"]
    threads = ", ".join(map(str, env.get("threads", [])))
    fig.suptitle(f"gen compare: {env.get('device_name')}, threads {threads}, torch {env.get('torch')}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120)
    plt.close(fig)
