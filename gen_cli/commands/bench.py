"""`gen bench`: benchmarks that compare gen with the libraries it stands on, side by side in one run."""

from __future__ import annotations

import typer

from gen_cli.commands.common import err, out_console, print_json, progress_enabled

bench_app = typer.Typer(help="Benchmarks: gen against the libraries it builds on, measured in one run.")


@bench_app.command("tokenizer")
def bench_tokenizer_command(
    repeats: int = typer.Option(3, "--repeats", min=1, help="Runs per variant; the median is reported."),
    scale_mb: float = typer.Option(50.0, "--scale-mb", min=1.0, help="Size of the repeated-corpus scenario."),
    many_files: int = typer.Option(1000, "--many-files", min=2, help="Files in the many-files scenario."),
    vocab_size: int = typer.Option(4096, "--vocab-size", help="Vocabulary size for every run."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable rows on stdout."),
) -> None:
    """Tokenizer training throughput and peak memory: `gen train-tokenizer` vs `tokenizers` called directly.

    Three scenarios (built-in corpus; the corpus repeated to --scale-mb in one file; the same text in
    --many-files files), each variant in a fresh process, runs interleaved so noise hits all alike.
    """
    from rich.progress import Progress
    from rich.table import Table

    from gen_cli.tokenizer_bench import VARIANTS, bench_tokenizer

    with Progress(console=err, transient=True, disable=not progress_enabled()) as progress:
        task = progress.add_task("benchmarking", total=3 * repeats * len(VARIANTS))
        rows = bench_tokenizer(repeats, scale_mb, many_files, vocab_size, on_step=lambda: progress.advance(task))
    if as_json:
        print_json([r.to_dict() for r in rows])
        return
    table = Table(title=f"tokenizer training, vocab {vocab_size}, median of {repeats}")
    for column in ("scenario", "variant", "files", "MB trained", "MB/s", "spread s", "peak RSS MB", "gen / direct"):
        table.add_column(column, justify="left" if column in ("scenario", "variant") else "right")
    for r in rows:
        table.add_row(
            r.scenario,
            r.variant,
            str(r.files),
            f"{r.train_bytes / 1e6:.1f}",
            f"{r.mb_per_s:.2f}",
            f"{min(r.seconds):.2f}–{max(r.seconds):.2f}",
            f"{r.peak_rss_bytes / 2**20:.0f}",
            f"{r.ratio_vs_direct:.2f}×" if r.ratio_vs_direct else "",
        )
    out_console().print(table)
    err.print("peak RSS is above each process's own baseline; 'gen / direct' compares with tokenizers.train(files)")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
