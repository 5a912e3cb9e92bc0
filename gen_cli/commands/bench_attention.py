"""`gen bench attention`: eager attention (scores materialized) against fused (SDPA's tiled kernel), prefill
and training step time and peak memory against sequence length, each point in its own process."""

from __future__ import annotations

import os

import typer

from gen_cli.commands.common import err, out_console, print_json, progress_enabled
from gen_cli.commands.options import Json, Preset, Repeats, Threads
from gen_cli.errors import UsageError


def _lengths(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{name} must be comma-separated token counts, got {text!r}", params=(name,)) from None
    if any(v < 2 for v in values):
        raise UsageError(f"{name}: every length must be at least 2 tokens", params=(name,))
    return values


def bench_attention_command(
    preset: Preset = None,
    lengths: str = typer.Option(
        "256,512,1024,2048,4096,8192",
        "--lengths",
        metavar="LIST",
        help="Prompt lengths to prefill (the context grows to fit).",
    ),
    train_lengths: str = typer.Option(
        "256,512,1024,2048",
        "--train-lengths",
        metavar="LIST",
        help="Context lengths of one training step ('' for none).",
    ),
    impls: str = typer.Option(
        "eager,fused,sdpa",
        "--attn-impl",
        metavar="LIST",
        help="Attention implementations to measure (comma list): eager, fused (what generate runs: gen's C kernel "
        "for CPU prompts), sdpa (PyTorch's SDPA alone, prefill only).",
    ),
    repeats: Repeats = 3,
    threads: Threads = None,
    as_json: Json = False,
) -> None:
    """Prefill and training step time and peak RSS, eager against fused attention, against length.

    Eager holds each layer's B·n_head·n² scores (training keeps them for backward); fused never builds them:
    gen's C kernel for a CPU prompt where it builds, else PyTorch's SDPA (its flash kernel on CPU), which
    `sdpa` runs alone beside it. The analytic score bytes stand beside eager's measured peak.
    """
    from rich.table import Table

    from gen_cli.lab.attn_bench import IMPLS, bench_attention, summary
    from gen_cli.lab.charts import line_chart

    impl_list = tuple(i.strip() for i in impls.split(",") if i.strip())
    if bad := [i for i in impl_list if i not in IMPLS]:
        raise UsageError(f"--attn-impl: unknown {', '.join(bad)}; choose from {', '.join(IMPLS)}", params=("impls",))
    prefill, train = _lengths(lengths, "lengths"), _lengths(train_lengths, "train_lengths")
    load_before = os.getloadavg()[0]
    from rich.progress import Progress

    with Progress(console=err, transient=True, disable=not progress_enabled()) as progress:
        task = progress.add_task(
            "attention", total=len(prefill) * len(impl_list) + len(train) * len(set(impl_list) - {"sdpa"})
        )

        def on_step(msg: str) -> None:
            progress.update(task, advance=0 if progress.tasks[0].description == "attention" else 1, description=msg)

        points = bench_attention(preset or "small", prefill, train, impl_list, repeats, threads, on_step=on_step)
    rows = summary(points)
    if as_json:
        print_json({"points": [p.to_dict() for p in points], "summary": rows, "load_avg_1m_before": load_before})
        return
    mb = 2**20
    table = Table(title=f"{preset or 'small'}: eager vs fused attention, batch 1, median of {repeats}")
    for col in ("phase", "tokens", "eager s", "fused s", "eager/fused", "sdpa s", "sdpa/fused", "eager peak MB",
                "fused peak MB", "peak ratio", "analytic MB", "(eager−fused)/analytic"):  # fmt: skip
        table.add_column(col, justify="left" if col == "phase" else "right")

    def cell(row: dict, key: str, fmt: str, scale: float = 1) -> str:
        return format(row[key] / scale, fmt) if row.get(key) is not None else ""

    for r in rows:
        table.add_row(r["phase"], str(r["tokens"]), cell(r, "eager_s", ".2f"), cell(r, "fused_s", ".2f"),
                      cell(r, "speedup", ".2f"), cell(r, "sdpa_s", ".2f"), cell(r, "sdpa_over_fused", ".2f"),
                      cell(r, "eager_peak_bytes", ".1f", mb),
                      cell(r, "fused_peak_bytes", ".1f", mb), cell(r, "peak_ratio", ".1f"),
                      cell(r, "analytic_bytes", ".1f", mb), cell(r, "growth_over_analytic", ".2f"))  # fmt: skip
    out_console().print(table)
    series = [
        (impl, [p.tokens for p in points if p.impl == impl and p.phase == "prefill"],
         [p.peak_bytes / mb for p in points if p.impl == impl and p.phase == "prefill"])
        for impl in impl_list
    ]  # fmt: skip
    out_console().print(line_chart(series, "prefill peak RSS (MB) against tokens", "tokens", lambda y: f"{y:.0f}"))
    kernels = sorted({f"{p.impl}: {p.kernel}" for p in points})
    loads = [p.load_avg_1m for p in points if p.load_avg_1m is not None]
    err.print("kernels: " + "; ".join(kernels))
    err.print(
        f"threads {points[0].threads if points else '?'}; load average {load_before:.1f} before, "
        f"{min(loads, default=0):.1f}–{max(loads, default=0):.1f} during; peak = RSS above the built model"
    )


def register(bench_app: typer.Typer) -> None:
    bench_app.command("attention")(bench_attention_command)
