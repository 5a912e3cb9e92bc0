"""`gen bench`: benchmarks that compare gen with the libraries it stands on, side by side in one run."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from gen_cli.commands.common import err, out_console, print_json, progress_enabled
from gen_cli.commands.options import Device
from gen_cli.errors import UsageError
from gen_cli.text.tokenizer import DEFAULT_VOCAB_SIZE

bench_app = typer.Typer(help="Benchmarks: gen against the libraries it builds on, measured in one run.")


@bench_app.command("tokenizer")
def bench_tokenizer_command(
    repeats: int = typer.Option(3, "--repeats", min=1, help="Runs per variant; the median is reported."),
    scale_mb: float = typer.Option(50.0, "--scale-mb", min=1.0, help="Size of the repeated-corpus scenario."),
    many_files: int = typer.Option(1000, "--many-files", min=2, help="Files in the many-files scenario."),
    vocab_size: int = typer.Option(DEFAULT_VOCAB_SIZE, "--vocab-size", help="Vocabulary size for every run."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable rows on stdout."),
) -> None:
    """Tokenizer training throughput and peak memory: `gen train-tokenizer` vs `tokenizers` called directly.

    Three scenarios (built-in corpus; the corpus repeated to --scale-mb in one file; the same text in
    --many-files files), each variant in a fresh process, runs interleaved so noise hits all alike.
    """
    from rich.progress import Progress
    from rich.table import Table

    from gen_cli.lab.tokenizer_bench import VARIANTS, bench_tokenizer

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


@bench_app.command("decode")
def bench_decode_command(
    shapes: str = typer.Option(
        None,
        "--shapes",
        help="Comma-separated presets to measure, random weights (tiny, small, base; base takes ~10 min) [small].",
        show_default=False,
    ),
    model: Path = typer.Option(
        None,
        "--model",
        "-m",
        help="Measure a real model instead of presets: gen model folder, Hugging Face folder (transformers runs "
        "the same folder) or .gguf file (llama-bench runs the same file when it is found).",
        show_default=False,
    ),
    modes: str = typer.Option(
        None,
        "--modes",
        help="gen modes: fp32, bf16, int8 (the native C step where it can run), q8_0, q4_0, q4_k (GGUF's "
        "block formats), file (a quantized GGUF as it stores its weights; first by default), fp32-torch, "
        "bf16-torch, int8-torch (PyTorch ops, as --no-native), fp32+compile, bf16+compile, int8+compile. "
        "Default: fp32,bf16,int8,fp32-torch on the CPU; "
        "fp32,bf16,fp32+compile,bf16+compile on CUDA.",
        show_default=False,
    ),
    repeats: int = typer.Option(3, "--repeats", "-r", min=1, help="Timed runs per mode, interleaved; median ± sd."),
    prompt_len: int = typer.Option(512, "--prompt-len", "-p", min=1, help="Prompt tokens of the prefill test (ppP)."),
    new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=2, help="Tokens generated per run (tgN)."),
    device_name: Device = "auto",
    threads: int = typer.Option(None, "--threads", "-t", help="CPU threads (default: torch's).", show_default=False),
    fmt: str = typer.Option("table", "--format", "-o", help="table, md, csv or json (llama-bench's test rows)."),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
    llama_bench: Path = typer.Option(
        None, "--llama-bench", help="llama.cpp's llama-bench binary [llama-bench on PATH].", show_default=False
    ),
    no_llama: bool = typer.Option(False, "--no-llama-bench", help="Do not run llama-bench even if it is on PATH."),
    profile: bool = typer.Option(False, "--profile", help="Also show where each gen mode's decode step spends time."),
) -> None:
    """Decode and prefill speed of `gen generate` modes vs HF transformers and llama.cpp, on the same weights.

    Per mode, in llama-bench's terms: tgN (decode, N new tokens) and ppP (a P-token prompt in one forward)
    tokens/s, median ± standard deviation of the repeats; bytes read per token and the share of the
    memory-bandwidth ceiling measured in the same run; prefill's share of the peak GEMM FLOP rate measured
    in the same run; deviation from unoptimised fp32 (max logit difference, greedy tokens agreeing before
    the first divergence). With a .gguf --model and llama-bench found, llama.cpp runs the same file,
    threads and lengths between gen's repeats, and the ratio gen / llama.cpp is reported per test.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from gen_cli.commands.bench_view import decode_table, print_profiles
    from gen_cli.formats.loading import require_model_kind
    from gen_cli.lab.bench_format import FORMATS, render
    from gen_cli.lab.decode_bench import DEFAULT_GPU_MODES, DEFAULT_MODES, bench_decode
    from gen_cli.lab.llama_bench import find_llama_bench
    from gen_cli.lab.transformers_peer import HF_INSTALL, hf_available
    from gen_cli.runtime import resolve_device, set_threads

    fmt = "json" if as_json else fmt
    if fmt not in (*FORMATS, "table"):
        raise UsageError(f"--format must be table, {', '.join(FORMATS)}; got {fmt!r}")
    if model is not None and shapes is not None:
        raise UsageError("give --shapes (random weights) or --model (a real model), not both")
    device = resolve_device(device_name)
    set_threads(threads)
    if not hf_available():
        err.print(f"[yellow]{HF_INSTALL}[/] (the gen rows still run)")
    shape_list = tuple(s.strip() for s in (shapes or "small").split(",") if s.strip())
    kind = None
    if model is not None:
        shape_list, kind = (str(model),), require_model_kind(model)  # refused before the plan is announced
    peer = None if no_llama else find_llama_bench(llama_bench)
    if peer is not None and kind != "gguf":
        if llama_bench is not None:
            raise UsageError("--llama-bench runs a GGUF file: give --model FILE.gguf")
        peer = None  # found on PATH, but there is no file both can run
    # transformers runs presets (a copy of the weights) and HF folders; a GGUF or gen model gets no row.
    hf_row = hf_available() and (model is None or kind == "hf")
    mode_list = tuple(m.strip() for m in modes.split(",") if m.strip()) if modes else None
    n_modes = len(mode_list or (DEFAULT_MODES if device.type == "cpu" else DEFAULT_GPU_MODES)) + hf_row
    what = f"model {model}" if model is not None else f"{len(shape_list)} shape(s)"
    err.print(
        f"bench decode: {what} × {n_modes} modes × {repeats} repeats of pp{prompt_len} + tg{new_tokens}"
        + (f", llama-bench ({peer}) between them" if peer else "")
        + ", plus building, warm-up and a deviation check per mode; progress and ETA below"
    )
    with Progress(TextColumn("[bold]bench[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                  TimeRemainingColumn(), TextColumn("{task.description}"), console=err, transient=True,
                  disable=not progress_enabled()) as progress:  # fmt: skip
        task = progress.add_task("building", total=len(shape_list) * n_modes * repeats)
        report = {
            "on_step": lambda msg: progress.update(task, description=msg),
            "on_run": lambda: progress.advance(task),
            "prompt_len": prompt_len,
            "profile": profile,
        }
        if model is not None:
            from gen_cli.lab.model_bench import bench_model_decode

            rows, context = bench_model_decode(model, mode_list, repeats, new_tokens, device, llama_bench=peer,
                                               **report)  # fmt: skip
        else:
            rows, context = bench_decode(shape_list, mode_list, repeats, new_tokens, device, **report)
    if fmt != "table":
        sys.stdout.write(render(rows, context, fmt))
        if profile and fmt != "json":
            print_profiles(rows, err)
        return
    console = out_console()
    console.print(decode_table(rows, context, repeats, new_tokens))
    if context.get("llama_bench"):
        console.print(render(rows, context, "md"), markup=False)
    if profile:
        print_profiles(rows, console)
    err.print(
        "deviation: vs gen's unoptimised fp32 on the fp32 greedy path (transformers holds the same weights); "
        "'greedy =' counts tokens equal before the first divergence; "
        "C ref = fixed llama2.c-style figures for small and base at 2 threads and 256 tokens (see README); "
        "ceiling = measured bandwidth / (weights in stored dtype + KV read) per token; "
        "% peak = prefill FLOP/s over a GEMM's measured now (fp32, or bf16 for bf16 modes)"
    )
    notes = sorted({r.vs_hf_note for r in rows if r.vs_hf_note})
    if notes:
        err.print(f"ns: the ratio to transformers is not a measured speed-up ({'; '.join(notes)})")
    for shape in shape_list:
        load = next(r.machine_load for r in rows if r.shape == shape)
        busy = " (busy: figures may be off)" if load.get("busy") else ""
        if load.get("others_cores") is not None:
            err.print(f"{shape}: other processes used {load['others_cores']:.1f} cores during the timed runs{busy}")


@bench_app.command("contention")
def bench_contention_command(
    shape: str = typer.Option("small", "--shape", help="Preset shape to decode with (random weights)."),
    threads: str = typer.Option("1,2", "--threads", help="Comma-separated thread counts."),
    waits: str = typer.Option(
        "spin,passive,short",
        "--waits",
        help="OpenMP wait modes: spin (libgomp's default), passive (sleep at once), short (gen's: a brief spin).",
    ),
    paths: str = typer.Option("native,torch", "--paths", help="Decode paths: native (gen's C step), torch."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Idle/busy rounds; medians reported."),
    new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=2, help="Tokens generated per run."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable rows on stdout."),
) -> None:
    """Decode tok/s idle and beside one competing CPU-bound process that this command starts itself.

    Each wait mode runs in its own worker process (the OpenMP runtime reads it once, at start-up);
    idle and busy runs alternate, so each pair is measured in the same minute. Fair share with one
    competitor on two cores is about 2x slower at most.
    """
    from gen_cli.lab.contention import WAITS, bench_contention, format_rows

    wait_list = tuple(w.strip() for w in waits.split(",") if w.strip())
    if bad := [w for w in wait_list if w not in WAITS]:
        raise UsageError(f"waits: unknown mode(s) {', '.join(bad)}; choose from {', '.join(WAITS)}", params=("waits",))
    path_list = tuple(p.strip() for p in paths.split(",") if p.strip())
    if bad := [p for p in path_list if p not in ("native", "torch")]:
        raise UsageError(f"paths: unknown path(s) {', '.join(bad)}; choose native or torch", params=("paths",))
    try:
        thread_list = tuple(int(t) for t in threads.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"threads must be comma-separated integers, got {threads!r}", params=("threads",)) from None
    total = rounds * 2 * len(wait_list) * len(thread_list) * len(path_list)
    err.print(
        f"{total} timed runs of {new_tokens} tokens each ({shape}; {rounds} rounds, idle then beside a busy "
        "process); a spinning mode on a busy machine can take minutes a run"
    )
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]contention[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                  TimeRemainingColumn(), TextColumn("{task.description}"), console=err, transient=True,
                  disable=not progress_enabled()) as progress:  # fmt: skip
        task = progress.add_task("starting workers", total=total)
        started = [False]

        def on_step(msg: str) -> None:
            if msg.startswith("round"):  # one message before each timed run: the previous one is done
                progress.update(task, advance=1 if started[0] else 0, description=msg)
                started[0] = True

        rows = bench_contention(shape, thread_list, wait_list, path_list, rounds, new_tokens, on_step)
    if as_json:
        print_json([r.to_dict() for r in rows])
        return
    out_console().print("\n".join(format_rows(rows)), markup=False)
    err.print(
        "slowdown = idle / busy tok/s; one competitor on two cores leaves a fair share of about 2x; "
        "idle load = cores other processes (not the competitor) used during the idle runs: above 0.5 the idle "
        "figures were not idle"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
