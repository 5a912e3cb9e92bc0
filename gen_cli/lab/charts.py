"""Terminal line charts drawn in braille dots (2×4 per character cell), one colour per series."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from rich.text import Text

COLORS = ("cyan", "magenta", "yellow", "green", "red", "blue")
Series = tuple[str, list[float], list[float]]

_DOT = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # _DOT[row][col] within a cell


def rolling_median(values: Sequence[float], window: int = 9) -> list[float]:
    """Centred rolling median: removes scheduler spikes from one run's latencies but keeps the trend."""
    half = window // 2
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


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


def save_position_png(result: dict[str, Any], path: str) -> None:
    """`gen eval --by-position`'s buckets as an image: bits per byte against position, the trained context marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    from gen_cli.atomic import atomic_path

    buckets = result["buckets"]
    mids = [(b["start"] + b["end"] - 1) / 2 for b in buckets]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(mids, [b["bits_per_byte"] for b in buckets], marker="o", label=result["pos_encoding"])
    ax.axvline(result["trained_context"] - 0.5, color="grey", linestyle="--", label="trained context")
    scaling = f", RoPE scaling {result['rope_scaling']}" if result["pos_encoding"] == "rope" else ""
    title = f"{result['pos_encoding']}{scaling}: {result['windows']} windows of {result['context']} tokens"
    ax.set(xlabel="position in the window (bucket centre)", ylabel="bits per byte", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=str(path).rsplit(".", 1)[-1].lower() if "." in str(path) else "png", dpi=120)
    plt.close(fig)
