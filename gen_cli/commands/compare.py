"""`gen compare`: KV cache on/off, MHA/MQA/GQA, RoPE/sinusoidal side by side: speed, memory, correctness, quality.

No torch import at module level (`gen --help` stays fast): the work happens in gen_cli.lab.compare, the
rendering in gen_cli.report.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from gen_cli.commands.common import err, out_console, progress_enabled
from gen_cli.commands.options import (
    MODEL,
    OUTPUT,
    PERFORMANCE,
    Device,
    Json,
    Model,
    Out,
    Preset,
    Repeats,
    Threads,
    check_model_path,
)
from gen_cli.errors import GenError, UsageError

DEFAULT_PROMPT_LEN = 16
PLOT_HINT = "--plot needs matplotlib: pip install 'gen-lab[plot]'"
DEFAULT_GEN_LEN = 128  # capped by the shape's context; the cache-off rows cost grows with its square


def _resolve_shape(preset: str | None, model_dir: Path | None) -> tuple[Any, str, str | None, str | None]:
    """(ModelConfig, where it came from, preset name, tokenizer path) for --preset, --model or the default.

    --model may be a gen directory, a Hugging Face folder or a GGUF file: only its shape is read.
    """
    from gen_cli.formats.loading import config_for, model_kind
    from gen_cli.model.config import load_preset
    from gen_cli.resources import default_model_dir

    if preset is not None and model_dir is not None:
        raise UsageError("pass either --model DIR or --preset NAME, not both")
    if preset is not None:
        return load_preset(preset), f"preset {preset}", preset, None
    directory = model_dir if model_dir is not None else default_model_dir()
    kind = model_kind(directory)
    if kind is not None:
        config, source, _ = config_for(str(directory))
        tok = directory / "tokenizer.json"
        return config, source, None, str(tok) if kind == "gen" and tok.is_file() else None
    if model_dir is not None:
        raise UsageError(f"--model {model_dir}: not a gen model directory, a Hugging Face folder or a .gguf file")
    return load_preset("tiny"), "preset tiny (no default model at models/default)", "tiny", None


def _output_format(fmt: str | None, output: Path | None) -> str:
    from gen_cli.lab.report import FORMATS, SUFFIX_FORMATS

    if fmt is None:
        fmt = SUFFIX_FORMATS.get(output.suffix.lower(), "table") if output is not None else "table"
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise UsageError(f"--format: unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    return fmt


def _check_writable(path: Path, option: str) -> None:
    """Refuse an output we could not write, before spending minutes on the grid."""
    from gen_cli.commands.common import check_writable_output

    try:
        check_writable_output(path, force=True)
    except GenError as e:
        raise UsageError(f"{option} {e}") from None


GRID = "Grid"
QUALITY = "Quality"


def _axis(flag: str, help: str, default: str, *short: str, metavar: str = "LIST") -> Any:
    """A grid axis: a comma list (or the option repeated), in the Grid panel."""
    return typer.Option(None, flag, *short, metavar=metavar, help=f"{help} (comma list).", show_default=default,
                        rich_help_panel=GRID)  # fmt: skip


def compare_command(
    kv_cache: list[str] = _axis("--kv-cache", "on, off or both", "off,on"),
    attention: list[str] = _axis(
        "--attention", "mha, mqa, gqa; MHA, the baseline, is added when not listed", "mha,gqa,mqa"
    ),
    kv_heads: list[str] = _axis("--kv-heads", "KV heads for gqa; each must divide the heads", "the middle divisor"),
    pos: list[str] = _axis("--pos", "rope, sinusoidal, learned, alibi", "rope,sinusoidal"),
    prompt_len: list[str] = _axis("--prompt-len", "Prompt tokens", str(DEFAULT_PROMPT_LEN)),
    max_new_tokens: list[str] = _axis(
        "--max-new-tokens", "Tokens to generate", f"{DEFAULT_GEN_LEN}, capped by the context", "-n"
    ),
    batch_size: list[str] = _axis("--batch-size", "Sequences per batch", "1"),
    dtype: list[str] = _axis(
        "--dtype",
        "float32, bfloat16 (float16 on GPU), int8 (int8 weights; fp32 activations via the native CPU step, else bf16)",
        "float32",
    ),
    kv_dtype: list[str] = _axis(
        "--kv-dtype",
        "KV cache kinds for cache-on rows: fp32, bf16, fp16, int8, int4 or K/V pairs like k8v4; adds KL divergence "
        "and top-1 agreement against the full-precision cache",
        "the dtype",
    ),
    window: list[str] = _axis(
        "--window",
        "Window KV caches for cache-on rows: the last N positions (a ring) plus --sinks; 0 is the full cache. Past "
        "the window, a rope or alibi shape generates on (positions within the cache); KL and top-1 against the full "
        "cache while it can hold the run",
        "none",
    ),
    sinks: list[str] = _axis("--sinks", "With --window: the first S tokens kept forever", "0"),
    attn_impl: list[str] = _axis(
        "--attn-impl", "fused (SDPA's tiled kernel) or eager (scores materialized); changes prefill", "fused"
    ),
    speculate: list[str] = _axis(
        "--speculate",
        "off, ngram[:K], draft:PATH or draft:self:q4_0: speculative decoding on the model's own weights and a text "
        "prompt, off added as the baseline; not crossed with the other axes",
        "none",
    ),
    act: list[str] = _axis(
        "--act",
        "int8, int8x2, bf16, fp32: what block weights' products multiply, on the model's own block weights (Q8_0 "
        "quantized at load if it has none), int8 added as the baseline; speed, and KL / top-1 / greedy agreement "
        "against fp32 activations on real text (--quality-data); not crossed with the other axes",
        "none",
    ),
    preset: Preset = None,
    model_dir: Model = None,
    context: int = typer.Option(
        None,
        "--context",
        metavar="N",
        help="Raise (or lower) the shape's context length to N tokens.",
        show_default="the shape's",
        rich_help_panel=MODEL,
    ),
    repeats: Repeats = 3,
    warmup: int = typer.Option(
        1, "--warmup", metavar="N", help="Untimed runs before the timed ones.", rich_help_panel=PERFORMANCE
    ),
    device: Device = "auto",
    threads: Threads = None,
    quality_steps: int = typer.Option(
        0,
        "--quality-steps",
        metavar="N",
        help="Also train each attention/pos variant this many steps and report held-out loss and bits per byte.",
        rich_help_panel=QUALITY,
    ),
    quality_data: list[str] = typer.Option(
        None,
        "--quality-data",
        metavar="INPUTS",
        help="Text for --quality-steps, --act's agreement with fp32 and a trained model's Δ bits/byte per "
        "--kv-dtype: files, folders or a built-in corpus.",
        show_default="python-docs, or the model's training text",
        rich_help_panel=QUALITY,
    ),
    eval_context: int = typer.Option(
        None,
        "--eval-context",
        metavar="N",
        help="With --quality-steps: also score each variant in windows of N tokens, past its trained context "
        "(128 or the shape's, if shorter), and report bits per byte on the positions past it.",
        show_default=False,
        rich_help_panel=QUALITY,
    ),
    convert: bool = typer.Option(
        False,
        "--convert",
        help="With --quality-steps: also pool the trained MHA model to each GQA/MQA variant's KV heads and "
        "uptrain it as many steps, shown as 'converted' rows beside those trained from scratch.",
        rich_help_panel=QUALITY,
    ),
    fmt: str = typer.Option(
        None,
        "--format",
        metavar="FORMAT",
        help="table, md, csv, json or jsonl.",
        show_default="table, or from --out's suffix",
        rich_help_panel=OUTPUT,
    ),
    as_json: Json = False,
    output: Out = None,
    plot: Path = typer.Option(
        None,
        "--plot",
        metavar="PATH",
        help="Save both charts as an image (needs gen-lab[plot]).",
        show_default=False,
        rich_help_panel=OUTPUT,
    ),
    chart: bool = typer.Option(
        None,
        "--chart/--no-chart",
        help="Terminal charts.",
        show_default="when stdout is a terminal and the format is table",
        rich_help_panel=OUTPUT,
    ),
    wide: bool = typer.Option(
        False, "--wide", help="Show every column (the default fits 80 columns).", rich_help_panel=OUTPUT
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Run a large grid without asking (asked only in a terminal)."),
    in_process: bool = typer.Option(False, "--in-process", hidden=True, help="Measure in this process (tests)."),
) -> None:
    """Measure KV caching, MHA/MQA/GQA and RoPE/sinusoidal/learned positions side by side on this machine.

    Every axis takes one or more values (comma lists or repeated options) and the grid of all
    combinations runs, each configuration in a fresh process so memory figures are its own. Variants
    get seeded random weights of the model's shape (the default model's, else the tiny preset; or
    --preset / --model, whose shape alone is read): speed and memory do not depend on the weights.
    Prompts are random token ids.

    Speed-up is decode tokens/s over the baseline, the first row of each workload (MHA with the first
    listed pos, dtype and cache setting); cache-on rows also show the gain over the same variant with
    the cache off. Every cache-on and non-fp32 row is checked against the fp32 no-cache path of the
    same weights: do greedy tokens agree over all generated tokens, and the largest logit difference
    while they do.

    With --out the result goes to that file (atomically), else to stdout. jsonl output: the first line
    is {"env": {...}}, each further line one row. --json is --format json.
    """
    from gen_cli.lab import compare, report

    # Everything that can be refused is refused before the grid runs.
    out_fmt = _output_format("json" if as_json else fmt, output)
    if output is not None:
        _check_writable(output, "--out")
    if plot is not None:
        if not report.plot_available():
            raise UsageError(PLOT_HINT)
        _check_writable(plot, "--plot")
    if quality_steps < 0:
        raise UsageError(f"--quality-steps must not be negative, got {quality_steps}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    if eval_context is not None and (not quality_steps or eval_context < 1):
        raise UsageError("--eval-context N (N ≥ 1) goes with --quality-steps")
    if speculate or act:
        # the grid's axes, and --act beside --speculate: each of those two runs on its own
        grid = {"--kv-cache": kv_cache, "--attention": attention, "--kv-heads": kv_heads, "--pos": pos,
                "--prompt-len": prompt_len, "--batch-size": batch_size, "--dtype": dtype, "--kv-dtype": kv_dtype,
                "--window": window, "--sinks": sinks, "--attn-impl": attn_impl, "--context": context,
                "--quality-steps": quality_steps, "--plot": plot, "--act": speculate and act}  # fmt: skip
        crossed = [flag for flag, value in grid.items() if value]
        axis = "--speculate" if speculate else "--act"
        if crossed:
            raise UsageError(f"{axis} runs on its own (the model's weights, a text prompt); drop {', '.join(crossed)}")
        _own_weights(axis, speculate or act, preset, model_dir, max_new_tokens, repeats, warmup, threads, device,
                     out_fmt, output, quality_data)  # fmt: skip
        return
    shape, source, preset_name, tokenizer = _resolve_shape(preset, model_dir)
    if context is not None:
        if context < 2:
            raise UsageError(f"--context must be at least 2 tokens, got {context}")
        shape = shape.replace(context_length=context)
        source += f", context {context}"
    attentions = compare.split_values(attention, ["mha", "gqa", "mqa"])
    if convert and (not quality_steps or not set(attentions) & {"gqa", "mqa"} or shape.n_head < 2):
        raise UsageError("--convert goes with --quality-steps and a gqa or mqa variant (--attention gqa,mqa)")
    if quality_steps and preset_name is None and tokenizer is None:
        raise UsageError("--quality-steps trains gen models on gen's tokenizer: use --preset or a gen model directory")
    prompts = compare.int_values("--prompt-len", prompt_len, [DEFAULT_PROMPT_LEN])
    default_gen = max(2, min(DEFAULT_GEN_LEN, shape.context_length - max(prompts)))
    gens = compare.int_values("--max-new-tokens", max_new_tokens, [default_gen])
    dtypes = compare.split_values(dtype, ["float32"])

    from gen_cli.runtime import resolve_device, resolve_dtype

    dev = resolve_device(device)
    for d in dtypes:
        if d in compare.DTYPES and d != "int8":
            resolve_dtype(d, dev)  # refuses float16 on CPU with a clear message
    specs = compare.expand_grid(
        shape,
        attention=attentions,
        kv_heads=compare.int_values("--kv-heads", kv_heads, []),
        pos=compare.split_values(pos, ["rope", "sinusoidal"]),
        kv_cache=compare.split_values(kv_cache, ["off", "on"]),
        prompt_len=prompts,
        gen_len=gens,
        batch=compare.int_values("--batch-size", batch_size, [1]),
        dtype=dtypes,
        device=str(dev),
        threads=threads,
        repeats=repeats,
        warmup=warmup,
        kv_dtype=compare.split_values(kv_dtype, []),
        window=compare.int_values("--window", window, [], minimum=0),
        sinks=compare.int_values("--sinks", sinks, [], minimum=0),
        attn_impl=compare.split_values(attn_impl, []),
    )
    _check_grid_memory(specs, dev)
    _confirm_large_grid(specs, yes)
    rows, interrupted = _run(specs, in_process)
    if interrupted:
        err.print(f"interrupted: showing the {len(rows)} of {len(specs)} configurations measured")
        if rows:
            _show({"env": compare.environment(rows, shape, source), "rows": rows}, out_fmt, output, None, False, wide)
        raise typer.Exit(130)
    if quality_steps:
        variants = list(dict.fromkeys(s.variant() for s in specs))
        from gen_cli.lab.quality import attach_quality

        rows = attach_quality(rows, _quality(shape, variants, quality_steps, preset_name, tokenizer,
                                             quality_data, str(dev), eval_context, convert))  # fmt: skip
    result = {"env": compare.environment(rows, shape, source), "rows": rows}
    if kv_dtype and tokenizer is not None:  # a trained gen model: each kind's cost on its own weights
        from gen_cli.lab.kv_quality import attach_trained_kv, measure_trained_kv

        kv = measure_trained_kv(str(Path(tokenizer).parent), compare.split_values(kv_dtype, []), prompts[0],
                                gens[0], str(dev), inputs=list(quality_data or []) or None)  # fmt: skip
        attach_trained_kv(rows, kv)
        result["env"]["kv_quality"] = kv["note"]
    _show(result, out_fmt, output, plot, chart, wide)


def _own_weights(
    axis: str,
    values: list[str],
    preset: str | None,
    model_dir: Path | None,
    max_new_tokens: list[str] | None,
    repeats: int,
    warmup: int,
    threads: int | None,
    device: str,
    fmt: str,
    output: Path | None,
    quality_data: list[str] | None,
) -> None:
    """The --speculate or --act axis: measured on the model's weights, shown as its own table."""
    from gen_cli.atomic import write_text_atomic
    from gen_cli.lab import compare, compare_act, compare_speculate, own_weights
    from gen_cli.lab.speculative_bench import DEFAULT_PROMPT

    if axis == "--speculate":
        checked = compare_speculate.speculate_values(values)
    else:
        checked = compare_act.act_values(values)
        compare_act.check_device(device)
    source = own_weights.default_source(preset, model_dir)
    if model_dir is not None:
        check_model_path(model_dir, "compare")
    gen_len = compare.int_values("--max-new-tokens", max_new_tokens, [DEFAULT_GEN_LEN], minimum=2)[0]
    err.print(f"{axis.removeprefix('--')}: {', '.join(checked)} × {warmup + repeats} runs each, interleaved")
    if axis == "--speculate":
        result = compare_speculate.measure(source, checked, DEFAULT_PROMPT, gen_len, repeats, warmup, threads, device)
        text = compare_speculate.render(result, fmt)
    else:
        inputs = list(quality_data or []) or None
        result = compare_act.measure(
            source, checked, DEFAULT_PROMPT, gen_len, repeats, warmup, threads, device, inputs, say=err.print
        )
        text = compare_act.render(result, fmt)
    if output is not None:
        write_text_atomic(output, text)
        err.print(f"wrote {output}")
    else:
        sys.stdout.write(text)
    if axis == "--speculate" and not all(r["identical_to_off"] for r in result["rows"]):
        err.print("[red]warning: a speculative row's text differs from plain decoding[/]")


LARGE_GRID = 100  # configurations from which the size is announced (and, in a terminal, confirmed)


def _confirm_large_grid(specs: list[Any], yes: bool) -> None:
    """Say how big a large grid is before minutes of measuring; in a terminal, ask unless --yes."""
    if len(specs) < LARGE_GRID:
        return
    runs = sum(s.warmup + s.repeats for s in specs)
    err.print(
        f"{len(specs):,} configurations, {runs:,} timed and warm-up generations in all, each in its own process",
        soft_wrap=True,
    )
    if not yes and sys.stdin.isatty() and sys.stderr.isatty() and not typer.confirm("run them all?", err=True):
        raise GenError("not started; narrow the grid, or pass --yes to skip this question")


def _check_grid_memory(specs: list[Any], device: Any) -> None:
    """Refuse, before the grid starts, a configuration whose KV cache and weights cannot fit in memory."""
    from gen_cli.memory import check_fits, generation_bytes, parameter_count

    def need(s: Any) -> int:
        # fp32 bytes bound every dtype; the model and its fp32 oracle are both resident.
        return generation_bytes(s.config, s.batch, s.prompt_len + s.gen_len, 4) + 8 * parameter_count(s.config)

    worst = max(specs, key=need)
    check_fits(
        need(worst),
        f"the largest configuration ({worst.batch:,} sequences of {worst.prompt_len + worst.gen_len} tokens)",
        "use a smaller batch_size or shorter prompt_len / max_new_tokens",
        device,
        params=("batch_size", "prompt_len", "max_new_tokens"),
    )


def _run(specs: list[Any], in_process: bool) -> tuple[list[dict[str, Any]], bool]:
    import time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from gen_cli.lab import compare

    def label(s: Any) -> str:
        cache = "on" if s.kv_cache else "off"
        cache += f" {s.kv_dtype}" if s.kv_dtype else ""
        cache += f" window {s.window}+{s.sinks}" if s.window else ""
        cache += f" {s.attn_impl}" if s.attn_impl != "fused" else ""
        return (f"{s.attention} {s.shape['n_kv_head']}kv {s.shape['pos_encoding']} cache {cache} {s.dtype} "
                f"p{s.prompt_len} g{s.gen_len} b{s.batch}")  # fmt: skip

    first = specs[0]
    err.print(
        f"compare: {len(specs)} configurations, each in a fresh process ({first.warmup} warm-up + {first.repeats} "
        f"timed runs of {first.gen_len} tokens); Ctrl-C stops and shows those measured so far"
    )
    started = time.perf_counter()
    with Progress(TextColumn("[bold]compare[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.description}"), console=err,
                  transient=True, disable=not progress_enabled()) as progress:  # fmt: skip
        task = progress.add_task(label(specs[0]), total=len(specs))
        done = [0]

        def on_done(row: dict[str, Any]) -> None:
            done[0] += 1
            if done[0] == 1 and len(specs) > 1:  # measured, not guessed: the first configuration's time
                took = time.perf_counter() - started
                progress.console.print(
                    f"first configuration took {took:.0f} s: about {took * (len(specs) - 1) / 60:.1f} min "
                    "more for the rest (cache-off rows take longer)"
                )
            nxt = label(specs[done[0]]) if done[0] < len(specs) else "done"
            progress.update(task, advance=1, description=nxt)

        return compare.run_grid(specs, in_process=in_process, on_done=on_done)


def _quality(shape: Any, variants: list[Any], steps: int, preset: str | None, tokenizer: str | None,
             inputs: list[str] | None, device: str, eval_context: int | None = None,
             convert: bool = False) -> dict:  # fmt: skip
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from gen_cli.lab.quality import measure_quality
    from gen_cli.train.loop import StepEvent

    with Progress(TextColumn("[bold]quality[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                  TimeRemainingColumn(), TextColumn("{task.description}"), console=err, transient=True,
                  disable=not progress_enabled()) as progress:  # fmt: skip
        runs = len(variants) + (sum(v[0] != "mha" for v in variants) if convert else 0)
        task = progress.add_task("training", total=steps * runs)

        def on_event(event: Any) -> None:
            if isinstance(event, StepEvent):
                progress.update(task, advance=1, description=f"loss {event.loss:.3f}")
            elif isinstance(event, str):
                progress.console.print(event, markup=False, style="dim")

        err.print(f"quality: training {runs} model(s) × {steps} steps, same data and seed")
        return measure_quality(shape, variants, steps, preset=preset, tokenizer=tokenizer, inputs=inputs,
                               device=device, report=on_event, eval_context=eval_context, convert=convert)  # fmt: skip


def _show(
    result: dict[str, Any], fmt: str, output: Path | None, plot: Path | None, chart: bool | None, wide: bool = False
) -> None:
    from gen_cli.atomic import write_text_atomic
    from gen_cli.lab import compare_charts, report

    console = out_console()
    if output is not None:
        text = report.render(result, fmt)
        try:
            write_text_atomic(output, text)
        except GenError as e:
            # Minutes of measurements must not be lost to a full disk: they go to stdout instead.
            sys.stdout.write(text)
            sys.stdout.flush()
            raise GenError(f"{e}; the results were printed to stdout instead") from None
        err.print(f"wrote {output}")
    elif fmt == "table":
        console.print(report.rich_table(result, wide=wide))
        for note in report.footnotes(result):
            err.print(note)
    else:
        sys.stdout.write(report.render(result, fmt))
    show_chart = chart if chart is not None else (sys.stdout.isatty() and fmt == "table" and output is None)
    if show_chart:
        # Charts never mix into machine-readable stdout.
        (console if output is None and fmt == "table" else err).print(compare_charts.charts(result))
    if plot is not None:
        compare_charts.save_plot(result, plot)
        err.print(f"wrote {plot}")
    bad = [r for r in result["rows"] if r.get("greedy_match") is False]
    if any(r["kv_cache"] and r["dtype"] == "float32" for r in bad):
        err.print("[red]warning: a float32 cache-on row disagrees with the no-cache oracle[/]")


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_command)
