"""Render `gen compare` records: Rich table, md / csv / json / jsonl, terminal charts and an optional PNG.

Knows nothing about torch: it reads the plain dicts that gen_cli.lab.compare returns, `{"env": …, "rows": […]}`.
jsonl is one object per line: first `{"env": {...}}`, then one row per line.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

FORMATS = ("table", "md", "csv", "json", "jsonl")
SUFFIX_FORMATS = {".md": "md", ".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".txt": "table"}
COLORS = ("cyan", "magenta", "yellow", "green", "red", "blue")
_MPL_COLORS = ("tab:cyan", "tab:purple", "tab:olive", "tab:green", "tab:red", "tab:blue")


# ---------------------------------------------------------------------------------------------
# Cells


def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def _num(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def _attention(r: dict[str, Any]) -> str:
    return f"{r['attention']} {r['kv_heads']}/{r['n_heads']}"


def _correct(r: dict[str, Any]) -> str:
    if r.get("greedy_match") is None:
        return "oracle"
    mark = "match" if r["greedy_match"] else "DIFFERS"
    return f"{mark}, Δ {r['max_logit_diff']:.1e}"


def _speedup(r: dict[str, Any]) -> str:
    text = "baseline" if r.get("baseline") else _num(r.get("speedup"), ".2f") + "×"
    if r.get("speedup_vs_no_cache"):
        text += f" ({r['speedup_vs_no_cache']:.1f}× vs off)"
    return text


def _kv(r: dict[str, Any]) -> str:
    a, m = r["kv_cache_bytes_analytic"], r["kv_cache_bytes_measured"]
    if not r["kv_cache"]:
        return "0 / 0"
    return human_bytes(a) if a == m else f"{human_bytes(a)} ≠ {human_bytes(m)}"


def _spread(r: dict[str, Any]) -> str:
    return f"{_num(r['decode_tokens_per_s_min'], ',.0f')}–{_num(r['decode_tokens_per_s_max'], ',.0f')}"


def _varying(rows: Sequence[dict[str, Any]], key: str) -> bool:
    return len({r[key] for r in rows}) > 1


def columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(header, row → cell) for the human-readable table; workload columns only when they vary."""
    cols: list[tuple[str, Any]] = [("attention kv/heads", _attention), ("pos", lambda r: r["pos"]),
                                   ("KV cache", lambda r: "on" if r["kv_cache"] else "off")]  # fmt: skip
    for key, head in (("dtype", "dtype"), ("prompt_len", "prompt"), ("gen_len", "gen"), ("batch", "batch")):
        if _varying(rows, key):
            cols.append((head, lambda r, k=key: str(r[k])))
    cols += [
        ("params", lambda r: f"{r['params'] / 1e6:.2f}M"),
        ("TTFT ms", lambda r: _num(r["ttft_s"] and r["ttft_s"] * 1000, ".2f")),
        ("prefill tok/s", lambda r: _num(r["prefill_tokens_per_s"], ",.0f")),
        ("decode tok/s", lambda r: _num(r["decode_tokens_per_s"], ",.1f")),
        ("spread", _spread),
        ("ms/token", lambda r: _num(r["ms_per_token"], ".3f")),
        ("KV cache bytes", _kv),
        ("peak mem", lambda r: human_bytes(r["peak_memory_bytes"])),
        ("speed-up", _speedup),
        ("greedy vs fp32 oracle", _correct),
    ]  # fmt: skip
    if any(r.get("val_loss") is not None for r in rows):
        cols += [("val loss", lambda r: _num(r.get("val_loss"), ".4f")),
                 ("bits/byte", lambda r: _num(r.get("bits_per_byte"), ".4f"))]  # fmt: skip
    return cols


def env_lines(env: dict[str, Any]) -> list[str]:
    """The environment block: where and how the figures were measured."""
    s = env.get("shape", {})
    shape = (f"{s.get('n_layer')} layers, d_model {s.get('d_model')}, {s.get('n_head')} heads, d_ff {s.get('d_ff')}, "
             f"vocab {s.get('vocab_size')}, context {s.get('context_length')}")  # fmt: skip
    threads = ", ".join(map(str, env.get("threads", [])))
    return [
        f"shape     {env.get('shape_source')}: {shape}",
        f"weights   {env.get('weights')}",
        f"device    {env.get('device')} ({env.get('device_name')}), threads {threads}, "
        f"dtype {', '.join(env.get('dtypes', []))}, torch {env.get('torch')}",
        f"memory    {env.get('memory_method', '')}",
        f"speed-up  decode tok/s over the {env.get('baseline')}",
    ]


# ---------------------------------------------------------------------------------------------
# Formats


def rich_table(result: dict[str, Any]) -> Table:
    rows = result["rows"]
    # Workload settings shared by every row go in the title; the ones that vary get columns instead.
    shared = [f"{label} {rows[0][key]}" for key, label in (("prompt_len", "prompt"), ("gen_len", "generate"),
              ("batch", "batch")) if rows and not _varying(rows, key)]  # fmt: skip
    title = "gen compare" + (f": {', '.join(shared)}" if shared else "")
    table = Table(title=title, caption="\n".join(env_lines(result["env"])), caption_justify="left")
    cols = columns(rows)
    for head, _ in cols:
        table.add_column(head, justify="left" if head in ("attention kv/heads", "pos", "greedy vs fp32 oracle")
                         else "right")  # fmt: skip
    for r in rows:
        cells = [fn(r) for _, fn in cols]
        style = "red" if r.get("greedy_match") is False else None
        table.add_row(*cells, style=style)
    return table


def to_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    cols = columns(rows)
    lines = ["# gen compare", "", *[f"- {line}" for line in env_lines(result["env"])], ""]
    lines.append("| " + " | ".join(h for h, _ in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(fn(r).replace("|", "\\|") for _, fn in cols) + " |")
    return "\n".join(lines) + "\n"


def flat_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every row key except the raw samples (csv keeps one value per cell)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k != "samples" and k not in keys]
    return keys


def to_csv(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=flat_keys(result["rows"]), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in result["rows"]:
        writer.writerow({k: "" if v is None else v for k, v in r.items()})
    return buf.getvalue()


def to_json(result: dict[str, Any]) -> str:
    return json.dumps({"env": result["env"], "rows": result["rows"]}, indent=2) + "\n"


def to_jsonl(result: dict[str, Any]) -> str:
    lines = [json.dumps({"env": result["env"]})] + [json.dumps(r) for r in result["rows"]]
    return "\n".join(lines) + "\n"


def table_text(result: dict[str, Any], width: int = 200) -> str:
    """The Rich table as plain text (for --output FILE with the table format)."""
    console = Console(file=io.StringIO(), width=width, no_color=True, highlight=False)
    console.print(rich_table(result))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def render(result: dict[str, Any], fmt: str) -> str:
    """The result as text in one of FORMATS."""
    return {"table": table_text, "md": to_markdown, "csv": to_csv, "json": to_json, "jsonl": to_jsonl}[fmt](result)


# ---------------------------------------------------------------------------------------------
# Chart data


Series = tuple[str, list[float], list[float]]


def rolling_median(values: Sequence[float], window: int = 9) -> list[float]:
    """Centred rolling median: removes scheduler spikes from one run's latencies but keeps the trend."""
    half = window // 2
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


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
        name = f"{_attention(r)} cache {'on' if r['kv_cache'] else 'off'}"
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


# ---------------------------------------------------------------------------------------------
# Terminal charts: braille dots, 2×4 per character cell

_DOT = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # _DOT[row][col] within a cell


def _bucket(xs: list[float], ys: list[float], x0: float, x1: float, px: int) -> list[tuple[int, float]]:
    """One (pixel column, median y) per occupied column: medians tame timer noise without hiding a trend."""
    cols: dict[int, list[float]] = {}
    for x, y in zip(xs, ys, strict=True):
        c = 0 if x1 == x0 else round((x - x0) / (x1 - x0) * (px - 1))
        cols.setdefault(c, []).append(y)
    return [(c, statistics.median(v)) for c, v in sorted(cols.items())]


def line_chart(
    series: Sequence[Series], title: str, x_label: str, y_fmt: Any = str, width: int = 60, height: int = 10
) -> Text:
    """A multi-line chart drawn in braille characters, one colour per series, with axes and a legend."""
    out = Text(f"{title}\n", style="bold")
    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys, strict=True)]
    if not pts:
        return out.append("(no data)\n")
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(0.0, min(p[1] for p in pts)), max(p[1] for p in pts)
    y1 = y1 if y1 > y0 else y0 + 1
    pw, ph = width * 2, height * 4
    bits = [[0] * width for _ in range(height)]
    owner: list[list[int | None]] = [[None] * width for _ in range(height)]
    for i, (_, xs, ys) in enumerate(series):
        cols = _bucket(xs, ys, x0, x1, pw)
        pix = [(c, round((y - y0) / (y1 - y0) * (ph - 1))) for c, y in cols]
        for (ca, ya), (cb, yb) in zip(pix, pix[1:] + pix[-1:], strict=True):
            steps = max(abs(cb - ca), abs(yb - ya), 1)
            for s in range(steps + 1):  # join neighbours so a steep rise stays a connected line
                c, y = round(ca + (cb - ca) * s / steps), round(ya + (yb - ya) * s / steps)
                row, sub = divmod(ph - 1 - y, 4)
                bits[row][c // 2] |= _DOT[sub][c % 2]
                owner[row][c // 2] = i
    labels = [y_fmt(y1), y_fmt((y0 + y1) / 2), y_fmt(y0)]
    pad = max(map(len, labels))
    for row in range(height):
        label = labels[0] if row == 0 else labels[1] if row == height // 2 else labels[2] if row == height - 1 else ""
        out.append(f"{label:>{pad}} ┤")
        for col in range(width):
            ch = chr(0x2800 + bits[row][col]) if bits[row][col] else " "
            o = owner[row][col]
            out.append(ch, style=COLORS[o % len(COLORS)] if o is not None else None)
        out.append("\n")
    left, right = f"{x0:g}", f"{x1:g}"
    out.append(" " * pad + " └" + "─" * width + "\n")
    out.append(" " * (pad + 2) + left + " " * max(1, width - len(left) - len(right)) + right + "\n")
    out.append(" " * (pad + 2) + x_label.center(width).rstrip() + "\n")
    for i, (name, _xs, ys) in enumerate(series):
        out.append("  ━━ ", style=COLORS[i % len(COLORS)])
        first, last = statistics.median(ys[: max(1, len(ys) // 10)]), statistics.median(ys[-max(1, len(ys) // 10) :])
        out.append(f"{name}: {y_fmt(first)} → {y_fmt(last)}\n")
    return out


def charts(result: dict[str, Any], width: int = 60) -> Group:
    """The two pictures: decode latency by position, and KV-cache bytes by context length."""
    parts: list[Any] = []
    lat = latency_series(result["rows"])
    if lat:
        parts.append(line_chart(lat, "per-token decode latency (ms) by position, one run (rolling median of 9)",
                                "tokens in sequence", lambda v: f"{v:.2f}", width))  # fmt: skip
    kv = kv_series(result)
    if kv:
        parts.append(line_chart(kv, "KV-cache size of one sequence by context length (analytic)",
                                "tokens of context", human_bytes, width))  # fmt: skip
    return Group(*parts)


def plot_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def save_plot(result: dict[str, Any], path: str | Path) -> None:
    """Both charts as an image (format from the suffix, PNG by default), written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    from gen_cli.atomic import atomic_path

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, xs, ys) in enumerate(latency_series(result["rows"])):
        ax1.plot(xs, ys, label=name, color=_MPL_COLORS[i % len(_MPL_COLORS)], linewidth=1)
    ax1.set(
        title="per-token decode latency (one run, rolling median of 9)",
        xlabel="tokens in sequence",
        ylabel="ms per token",
    )
    for i, (name, xs, ys) in enumerate(kv_series(result)):
        ax2.plot(xs, [y / 2**20 for y in ys], label=name, color=_MPL_COLORS[i % len(_MPL_COLORS)])
    ax2.set(title="KV-cache size per sequence (analytic)", xlabel="tokens of context", ylabel="MiB")
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
