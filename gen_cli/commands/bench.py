"""`gen bench`: benchmarks that compare gen with the libraries it stands on, side by side in one run."""

from __future__ import annotations

import copy
import sys
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from gen_cli.commands.common import err, out_console, print_json, progress_enabled
from gen_cli.commands.options import (
    MODEL,
    OUTPUT,
    PERFORMANCE,
    Device,
    Draft,
    Json,
    MaxNewTokens,
    Model,
    Preset,
    Profile,
    Repeats,
    Speculate,
    Temperature,
    Threads,
)
from gen_cli.errors import UsageError
from gen_cli.text.tokenizer import DEFAULT_VOCAB_SIZE

Acts = Annotated[
    str | None,
    typer.Option(
        "--act",
        metavar="LIST",
        help="Run each block-weight mode once per activation precision (int8, int8x2, bf16, fp32; comma list), with "
        "its speed and, on a real model, KL / top-1 / greedy agreement against fp32 activations on real text.",
        show_default=False,
        rich_help_panel=PERFORMANCE,
    ),
]

bench_app = typer.Typer(help="Benchmarks: gen against the libraries it builds on, measured in one run.")


def _with_short(shared: Any, short: str) -> Any:
    """A shared option that also takes a short name (llama-bench's -r, -t), its help and panel unchanged."""
    kind, info = typing.get_args(shared)
    info = copy.copy(info)
    info.param_decls = (*info.param_decls, short)
    return Annotated[kind, info]


GRID = "Grid"  # what is measured: compare's panel name for its axes
RepeatsR = _with_short(Repeats, "-r")
ThreadsT = _with_short(Threads, "-t")


def _at_least(least: int, **flags: int) -> None:
    """Refuse a count below `least`, named as its flag (max_new_tokens → --max-new-tokens)."""
    for name, value in flags.items():
        if value < least:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")


@bench_app.command("tokenizer")
def bench_tokenizer_command(
    repeats: Repeats = 3,
    scale_mb: float = typer.Option(
        50.0, "--scale-mb", metavar="MB", min=1.0, help="Size of the repeated-corpus scenario."
    ),
    many_files: int = typer.Option(1000, "--many-files", metavar="N", min=2, help="Files in the many-files scenario."),
    vocab_size: int = typer.Option(
        DEFAULT_VOCAB_SIZE, "--vocab-size", metavar="N", help="Vocabulary size for every run."
    ),
    as_json: Json = False,
) -> None:
    """Tokenizer training throughput and peak memory: `gen train-tokenizer` vs `tokenizers` called directly.

    Three scenarios (built-in corpus; the corpus repeated to --scale-mb in one file; the same text in
    --many-files files), each variant in a fresh process, runs interleaved so noise hits all alike.
    """
    from rich.progress import Progress
    from rich.table import Table

    from gen_cli.lab.tokenizer_bench import VARIANTS, bench_tokenizer

    _at_least(1, repeats=repeats)
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
        metavar="LIST",
        help="Presets to measure, random weights: tiny, small, base (base takes ~10 min); comma list.",
        show_default="small",
        rich_help_panel=GRID,
    ),
    model: Model = None,
    modes: str = typer.Option(
        None,
        "--modes",
        metavar="LIST",
        help="gen modes: fp32, bf16, int8 (the native C step where it can run), q8_0, q4_0, q4_k (GGUF's "
        "block formats), file (a model as it stores its weights; on a GGUF file timed on the engine `gen generate` "
        "takes there, without torch where it can; first by default for a GGUF or quantized model), fp32-torch, "
        "bf16-torch, int8-torch (PyTorch ops, as --no-native), fp32+compile, bf16+compile, int8+compile; "
        "comma list.",
        show_default="fp32,bf16,int8,fp32-torch on the CPU; fp32,bf16,fp32+compile,bf16+compile on CUDA",
        rich_help_panel=GRID,
    ),
    prompt_len: int = typer.Option(
        512,
        "--prompt-len",
        "-p",
        metavar="N",
        help="Prompt tokens of the prefill test (ppP).",
        rich_help_panel=GRID,
    ),
    new_tokens: MaxNewTokens = 128,
    fmt: str = typer.Option(
        "table",
        "--format",
        metavar="FORMAT",
        help="table, md, csv or json (llama-bench's test rows).",
        rich_help_panel=OUTPUT,
    ),
    as_json: Json = False,
    repeats: RepeatsR = 3,
    device_name: Device = "auto",
    threads: ThreadsT = None,
    profile: Profile = False,
    act: Acts = None,
    llama_bench: Path = typer.Option(
        None,
        "--llama-bench",
        metavar="PATH",
        help="llama.cpp's llama-bench binary.",
        show_default="llama-bench on PATH",
        rich_help_panel=PERFORMANCE,
    ),
    no_llama: bool = typer.Option(
        False,
        "--no-llama-bench",
        help="Do not run llama-bench even if it is on PATH.",
        rich_help_panel=PERFORMANCE,
    ),
) -> None:
    """Decode and prefill speed of `gen generate` modes vs HF transformers and llama.cpp, on the same weights.

    Per mode, in llama-bench's terms: tgN (decode, N = --max-new-tokens new tokens) and ppP (a P-token
    prompt, P = --prompt-len) tokens/s, median ± standard deviation of the repeats; bytes
    read per token and the share of the memory-bandwidth ceiling measured in the same run; prefill's
    share of the peak rate of what its products compute in (a GEMM's FLOP/s in fp32 or bf16, int8
    products' op/s for block weights), measured in the same run; deviation from unoptimised fp32 (max
    logit difference, greedy tokens agreeing before the first divergence). A --model is a gen model
    folder, a Hugging Face folder (transformers runs the same folder) or a .gguf file; with a .gguf and
    llama-bench found, llama.cpp runs the same file, threads and lengths between gen's repeats, and the
    ratio gen / llama.cpp is reported per test. --json is --format json.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from gen_cli.commands.bench_view import act_table, decode_table, print_profiles
    from gen_cli.formats.loading import require_model_kind
    from gen_cli.lab.bench_format import FORMATS, render
    from gen_cli.lab.decode_bench import DEFAULT_GPU_MODES, DEFAULT_MODES, bench_decode, with_acts
    from gen_cli.lab.llama_bench import find_llama_bench
    from gen_cli.lab.transformers_peer import HF_INSTALL, hf_available
    from gen_cli.runtime import resolve_device, set_threads

    _at_least(1, repeats=repeats, prompt_len=prompt_len)
    _at_least(2, max_new_tokens=new_tokens)
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
    acts = tuple(a.strip() for a in act.split(",") if a.strip()) if act else None
    defaults = ("file",) * (kind == "gguf") + (DEFAULT_MODES if device.type == "cpu" else DEFAULT_GPU_MODES)
    n_modes = len(with_acts(mode_list or defaults, acts)) + hf_row  # a GGUF file's own row first by default
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
            "acts": acts,
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
    if acts:
        console.print(act_table(rows))
    if context.get("llama_bench"):
        console.print(render(rows, context, "md"), markup=False)
    if profile:
        print_profiles(rows, console)
    err.print(
        "deviation: vs gen's unoptimised fp32 on the fp32 greedy path (transformers holds the same weights); "
        "'greedy =' counts tokens equal before the first divergence; "
        "C ref = fixed llama2.c-style figures for small and base at 2 threads and 256 tokens (see README); "
        "ceiling = measured bandwidth / (weights in stored dtype + KV read) per token; "
        "% peak = prefill op/s over the peak measured now of what its products compute in (the fp32 or bf16 "
        "GEMM's, int8 products' for block weights; a mix blended by its share); path torch-free = the engine "
        "`gen generate` takes on a GGUF file"
    )
    for r in rows:  # where the ceiling's bytes go
        if by_class := r.extra.get("bytes_by_class"):
            parts = ", ".join(f"{cls} {nbytes / 1e6:,.2f}" for cls, nbytes in by_class.items())
            err.print(f"MB read per token, {r.mode}: {parts}")
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
    model_dir: Model = None,
    shape: str | None = typer.Option(
        None,
        "--shape",
        metavar="NAME",
        help="A preset shape with random weights instead of a model.",
        rich_help_panel=MODEL,
    ),
    new_tokens: MaxNewTokens = 128,
    threads: str = typer.Option(
        "default,1",
        "--threads",
        metavar="LIST",
        help="CPU threads (comma list): default (torch's count, lowered while other processes keep cores busy) "
        "or a fixed count.",
        rich_help_panel=PERFORMANCE,
    ),
    waits: str = typer.Option(
        "short",
        "--waits",
        metavar="LIST",
        help="OpenMP wait modes: spin (libgomp's default), passive (sleep at once), short (gen's: a brief spin).",
        rich_help_panel=PERFORMANCE,
    ),
    paths: str = typer.Option(
        "native",
        "--paths",
        metavar="LIST",
        help="Decode paths: native (gen's C step), torch.",
        rich_help_panel=PERFORMANCE,
    ),
    rounds: int = typer.Option(
        3, "--rounds", metavar="N", min=1, help="Idle/busy rounds; medians reported.", rich_help_panel=PERFORMANCE
    ),
    as_json: Json = False,
) -> None:
    """Decode tok/s idle and beside one competing CPU-bound process that this command starts itself.

    The model is the shipped one unless --model or --shape names another. Each wait mode runs in its own
    worker process (the OpenMP runtime reads it once, at start-up); idle and busy runs alternate, so each
    pair is measured in the same minute, and the competitor is killed after each busy round. Targets: default
    threads keep at least 0.55 of their idle speed beside the competitor and are never below one thread there.
    """
    from gen_cli.lab.contention import DEFAULT, WAITS, bench_contention, format_rows, targets

    _at_least(2, max_new_tokens=new_tokens)
    if model_dir is not None and shape is not None:
        raise UsageError("give --model or --shape, not both", params=("model", "shape"))
    wait_list = tuple(w.strip() for w in waits.split(",") if w.strip())
    if bad := [w for w in wait_list if w not in WAITS]:
        raise UsageError(f"waits: unknown mode(s) {', '.join(bad)}; choose from {', '.join(WAITS)}", params=("waits",))
    path_list = tuple(p.strip() for p in paths.split(",") if p.strip())
    if bad := [p for p in path_list if p not in ("native", "torch")]:
        raise UsageError(f"paths: unknown path(s) {', '.join(bad)}; choose native or torch", params=("paths",))
    thread_list = tuple(t.strip() for t in threads.split(",") if t.strip())
    if not thread_list or any(t != DEFAULT and not (t.isdigit() and int(t) >= 1) for t in thread_list):
        raise UsageError(
            f"threads must be a comma list of {DEFAULT} or counts ≥ 1, got {threads!r}", params=("threads",)
        )
    total = rounds * 2 * len(wait_list) * len(thread_list) * len(path_list)
    what = f"preset {shape}, random weights" if shape else str(model_dir or "the shipped model")
    err.print(
        f"{total} timed runs of {new_tokens} tokens each ({what}; {rounds} rounds, idle then beside a busy "
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

        rows = bench_contention(model_dir, shape, thread_list, wait_list, path_list, rounds, new_tokens, on_step)
    if as_json:
        print_json({"rows": [r.to_dict() for r in rows], "targets": targets(rows)})
        return
    out_console().print("\n".join(format_rows(rows)), markup=False)
    err.print(
        "busy/idle = busy tok/s ÷ idle tok/s (one competitor on two cores leaves a fair share of about 0.5); "
        "busy steps by threads = native steps run at each thread count beside the competitor; idle load = "
        "cores other processes (not the competitor) used during the idle runs: above 0.5 the idle figures "
        "were not idle"
    )


@bench_app.command("speculative")
def bench_speculative_command(
    model_dir: Model = None,
    preset: Preset = None,
    speculate: Speculate = None,
    draft: Draft = None,
    prompt: str = typer.Option(
        None,
        "--prompt",
        metavar="TEXT",
        help="The prompt; without one, a passage and its start again, so the output copies it.",
        show_default=False,
    ),
    new_tokens: MaxNewTokens = 100,
    temperature: Temperature = 0.0,
    repeats: Repeats = 3,
    threads: Threads = None,
    as_json: Json = False,
) -> None:
    """Plain against speculative decoding of the same prompt, interleaved in one run: decode tok/s, the
    speed-up, the guesses kept, and what a verify forward costs in decode steps (which bounds the speed-up)."""
    from gen_cli.lab.speculative_bench import DEFAULT_PROMPT, bench, format_bench

    _at_least(2, max_new_tokens=new_tokens)
    _at_least(1, repeats=repeats)
    if speculate is None and draft is None:
        speculate = "ngram"
    if preset is not None and model_dir is not None:
        raise UsageError("give --model or --preset, not both")
    from gen_cli.infer.options import Preset as PresetShape

    source = PresetShape(preset) if preset is not None else model_dir
    r = bench(source, speculate, draft, prompt or DEFAULT_PROMPT, new_tokens, repeats, threads, temperature)
    if as_json:
        print_json(r)
        return
    out_console().print("\n".join(format_bench(r)), markup=False)


def register(app: typer.Typer) -> None:
    from gen_cli.commands.bench_attention import register as register_attention
    from gen_cli.commands.bench_startup import bench_startup_command

    bench_app.command("startup")(bench_startup_command)
    register_attention(bench_app)
    app.add_typer(bench_app, name="bench")
