"""`gen train` and `gen eval`: train or resume a model (also under torchrun), and score one held-out."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from gen_cli.commands.common import err, out_console, print_json, progress_enabled
from gen_cli.commands.options import (
    MODEL,
    OUTPUT,
    Attention,
    BatchSize,
    Compile,
    Device,
    Dtype,
    Force,
    InputsArg,
    Json,
    KvHeads,
    Model,
    ModelArg,
    Out,
    Png,
    Pos,
    Preset,
    RopeScaling,
    Seed,
    Tokenizer,
    check_model_path,
    model_from,
)
from gen_cli.errors import UsageError
from gen_cli.text.tokenizer import DEFAULT_VOCAB_SIZE


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60}:{seconds % 60:02d}")
    )


def _eval_figures(res: Any) -> str:
    return (
        f"val loss {res.loss:.4f}, perplexity {res.perplexity:.2f}, {res.bits_per_byte:.4f} bits/byte "
        f"({res.tokens:,} tokens, {res.bytes:,} bytes)"
    )


def _eval_line(step: int, res: Any) -> str:
    return f"eval @ step {step}: {_eval_figures(res)}"


class _Renderer:
    """Live Rich progress when stderr is a terminal; otherwise a plain line every `every` steps."""

    def __init__(self) -> None:
        self.live = progress_enabled()
        self.progress: Any = None
        self.task: Any = None
        self.every = 1
        self.started: float | None = None  # clock at the first step event, for the up-front estimate

    def __enter__(self) -> _Renderer:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.progress = Progress(
                TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                console=err, transient=False,
            )  # fmt: skip
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def __call__(self, event: Any) -> None:
        from gen_cli.train.loop import EvalEvent, StepEvent

        if isinstance(event, StepEvent):
            self._estimate(event)
            text = (
                f"loss {event.loss:.4f}  lr {event.lr:.2e}  {event.tokens_per_s:,.0f} tok/s  "
                f"ETA {_fmt_eta(event.eta_s)}"
            )
            if self.progress is not None:
                if self.task is None:
                    self.task = self.progress.add_task(text, total=event.steps, completed=event.step - 1)
                self.progress.update(self.task, completed=event.step, description=text)
            else:
                self.every = max(1, event.steps // 20)
                if event.step % self.every == 0 or event.step == event.steps:
                    err.print(f"step {event.step}/{event.steps}  {text}", markup=False, soft_wrap=True)
        elif isinstance(event, EvalEvent):
            (self.progress.console if self.progress else err).print(
                _eval_line(event.step, event.result), soft_wrap=True
            )
        else:
            (self.progress.console if self.progress else err).print(escape(str(event)), soft_wrap=True)

    ESTIMATE_AFTER = 5  # steps measured before the whole run is estimated

    def _estimate(self, event: Any) -> None:
        """Once, a few steps in: the run's length as steps × the step time measured so far."""
        import time

        if self.started is None:
            self.started, self.first_step = time.perf_counter(), event.step
            return
        measured = event.step - self.first_step
        if measured == self.ESTIMATE_AFTER and event.steps - event.step > 0:
            per_step = (time.perf_counter() - self.started) / measured
            (self.progress.console if self.progress else err).print(
                f"training {event.steps:,} steps: {per_step:.2f} s per step measured over {measured} steps, "
                f"about {_fmt_eta(per_step * (event.steps - event.step))} to go, plus evaluations "
                "(fewer with --steps; Ctrl-C saves and stops)",
                soft_wrap=True,
            )


TRAINING = "Training"


def _model_opt(flag: str, help: str, metavar: str = "N", shown: str | bool = False) -> Any:
    return typer.Option(None, flag, metavar=metavar, help=help, show_default=shown, rich_help_panel=MODEL)


def _train_opt(flag: str, help: str, shown: str | bool, metavar: str = "N", panel: str = TRAINING) -> Any:
    return typer.Option(None, flag, metavar=metavar, help=help, show_default=shown, rich_help_panel=panel)


def train_command(
    inputs: InputsArg = None,
    tokenizer: Tokenizer = None,
    vocab_size: int = _model_opt(
        "--vocab-size",
        "Vocabulary of the tokenizer trained on the fly (no --tokenizer).",
        shown=str(DEFAULT_VOCAB_SIZE),
    ),
    preset: Preset = None,
    attention: Attention = None,
    kv_heads: KvHeads = None,
    pos: Pos = None,
    norm: str = _model_opt("--norm", "rmsnorm or layernorm.", "KIND"),
    layers: int = _model_opt("--layers", "Number of blocks."),
    heads: int = _model_opt("--heads", "Query heads."),
    d_model: int = _model_opt("--d-model", "Model width."),
    d_ff: int = _model_opt("--d-ff", "MLP hidden width."),
    init: Path = _model_opt("--init", "Start from this model directory (its shape, tokenizer and weights).", "PATH"),
    resume: Path = _model_opt("--resume", "Continue the run in this folder.", "PATH"),
    steps: int = _train_opt("--steps", "Optimizer steps in total (the default takes minutes on a laptop CPU).", "200"),
    batch_size: BatchSize = None,
    grad_accum: int = _train_opt("--grad-accum", "Micro-batches per optimizer step.", "1"),
    context: int = _train_opt(
        "--context", "Tokens per training window; for a new run also the model's context length.", "the preset's"
    ),
    lr: float = _train_opt("--lr", "Peak learning rate.", "3e-3", "X"),
    warmup: int = _train_opt("--warmup", "Linear warm-up steps.", "min(100, steps/10)"),
    min_lr: float = _train_opt("--min-lr", "Learning rate at the end of the cosine decay.", "lr/10", "X"),
    weight_decay: float = _train_opt("--weight-decay", "AdamW decay on weight matrices.", "0.1", "X"),
    grad_clip: float = _train_opt("--grad-clip", "Clip the gradient norm to this; 0 = off.", "1.0", "X"),
    seed: Seed = None,
    eval_every: int = _train_opt(
        "--eval-every", "Evaluate every N steps (and at the end); 0 = at the end only.", "100"
    ),
    eval_batches: int = _train_opt("--eval-batches", "Validation batches per evaluation.", "20"),
    save_every: int = _train_opt("--save-every", "Checkpoint every N steps (and at the end).", "500", panel=OUTPUT),
    save_minutes: float = _train_opt(
        "--save-minutes",
        "Also checkpoint when this many minutes passed since the last save; 0 = off.",
        "5",
        "X",
        panel=OUTPUT,
    ),
    out: Out = None,
    force: Force = False,
    as_json: Json = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    compile_: Compile = False,
) -> None:
    """Train a small transformer (or resume a run); the run folder is a model directory.

    Text is tokenized once into a cached token file; checkpoints (config.json, model.safetensors,
    tokenizer.json, train_state.safetensors) are written atomically, and every step's metrics go to
    metrics.jsonl. Ctrl-C saves and exits. Under `torchrun --nproc_per_node=N -m gen_cli train …` the
    run uses DistributedDataParallel; --batch-size is per process.

    --out names the run folder (default .gen/runs/PRESET-TIME). Unset options take the resumed run's
    values, else the defaults shown; --batch-size is 16 and --seed (weights and batch sampling) 0.
    --dtype autocasts; the weights stay fp32.
    """
    from gen_cli.train.args import TrainArgs
    from gen_cli.train.loop import train

    args = TrainArgs(
        inputs=list(inputs or []), tokenizer=str(tokenizer) if tokenizer else None, vocab_size=vocab_size,
        preset=preset, attention=attention, kv_heads=kv_heads, pos=pos, norm=norm, layers=layers,
        heads=heads, d_model=d_model, d_ff=d_ff, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
        context=context, lr=lr, warmup=warmup, min_lr=min_lr, weight_decay=weight_decay, grad_clip=grad_clip,
        eval_every=eval_every, eval_batches=eval_batches, save_every=save_every, save_minutes=save_minutes,
        seed=seed, device=device, dtype=dtype, compile=compile_, out=str(out) if out else None, force=force,
        resume=str(resume) if resume else None, init=str(init) if init else None,
    )  # fmt: skip
    started = time.perf_counter()
    with _Renderer() as render:
        summary = train(args, render)
    if os.environ.get("RANK", "0") != "0":
        return  # only rank 0 speaks
    if as_json:
        print_json(summary.to_dict())
    else:
        val = (
            f", val loss {summary.val_loss:.4f}, {summary.val_bits_per_byte:.4f} bits/byte"
            if summary.val_loss is not None
            else ""
        )
        err.print(
            f"{'stopped' if summary.interrupted else 'done'} at step {summary.step}/{summary.steps}: "
            f"loss {summary.loss:.4f}{val}; {summary.tokens_per_s:,.0f} tok/s on {summary.device} "
            f"({summary.dtype}, {summary.parameters:,} parameters, {time.perf_counter() - started:.1f} s)\n"
            f"saved {escape(summary.out)}",
            soft_wrap=True,
        )
    if summary.interrupted:
        err.print(f"interrupted; resume with: gen train --resume {escape(summary.out)}")
        raise typer.Exit(130)


def eval_command(
    model_arg: ModelArg = None,
    inputs: InputsArg = None,
    model_opt: Model = None,
    rope_scaling: RopeScaling = None,
    context: int = typer.Option(
        None, "--context", metavar="N", help="Window length.", show_default="the model's context length"
    ),
    max_tokens: int = typer.Option(
        None, "--max-tokens", metavar="N", help="Score at most this many tokens (for speed).", show_default=False
    ),
    stride: int = typer.Option(
        None,
        "--stride",
        metavar="N",
        help="Tokens between window starts; each window scores only the tokens no earlier one did.",
        show_default="half the window for files you name, the whole window for gen's corpora",
    ),
    by_position: bool = typer.Option(
        False,
        "--by-position",
        help="Loss and bits per byte per position bucket of --context-token windows; --context may exceed the "
        "trained context (RoPE, sinusoidal, ALiBi): the extrapolation sweep.",
    ),
    buckets: int = typer.Option(8, "--buckets", metavar="N", help="With --by-position: position buckets."),
    png: Png = None,
    as_json: Json = False,
    device: Device = "auto",
    dtype: Dtype = "float32",
    batch_size: BatchSize = 8,
) -> None:
    """Loss, perplexity and bits per byte of a model on text: all of the files you name, or the
    validation split of gen's own corpora.

    MODEL (or --model) is a gen model folder, a Hugging Face folder or a .gguf file, the shipped model
    by default; INPUTS follow it. With --rope-scaling, --context may reach factor × the trained
    context. --png (with --by-position) saves the chart as an image.

    Without inputs, a `gen train` run folder is scored on the text it was trained on (recorded in its
    train state), any other model on the default corpus; the output names the corpus and split.

    Files you name are scored whole, in --context-token windows starting every --stride tokens (default:
    half a window), each window scoring only the tokens no earlier window scored (llama.cpp's perplexity
    rule): every token is predicted once, and after the first window with at least context − stride tokens
    before it. gen's corpora (none named, or the built-in one) keep their validation split, scored in
    contiguous, non-overlapping windows unless --stride is given. Bits per byte (total nats / ln 2 /
    UTF-8 bytes of the scored text) does not depend on the tokenizer, so models with different
    vocabularies compare fairly.
    """
    from gen_cli.resources import default_model_dir
    from gen_cli.train.evaluate import evaluate_model

    if model_opt is not None and model_arg is not None:  # with --model, every positional argument is text
        inputs = [str(model_arg), *(inputs or [])]
        model_arg = None
    model_dir = model_from(model_arg, model_opt, "eval", required=False)
    if model_dir is None:
        model_dir = default_model_dir()
        if not (model_dir / "config.json").is_file():
            raise UsageError(f"no default model at {model_dir}; pass a model folder (e.g. one `gen train` wrote)")
    else:
        _check_eval_model(model_dir, model_opt is None)
    if png is not None and not by_position:
        raise UsageError("--png goes with --by-position")
    if by_position:
        _by_position(model_dir, list(inputs or []), context, buckets, device, batch_size, max_tokens, rope_scaling,
                     as_json, png)  # fmt: skip
        return
    res = evaluate_model(model_dir, list(inputs or []), device, dtype, batch_size, context, max_tokens, rope_scaling,
                         stride)  # fmt: skip
    if as_json:
        print_json(dataclasses.asdict(res))
        return
    out_console().print(_eval_figures(res))
    windows = f" in {res.context:,}-token windows every {res.stride:,} tokens"
    err.print(
        (
            f"scored all of {escape(res.corpus)}"
            if res.split == "all"
            else f"scored the validation split of {escape(res.corpus)}"
        )
        + windows
        + ("" if inputs else " (the run's own training text)" if _trained(model_dir) else " (the default corpus)"),
        soft_wrap=True,
    )


def _by_position(model_dir: Path, inputs: list[str], context: int | None, buckets: int, device: str,
                 batch_size: int, max_tokens: int | None, rope_scaling: str | None, as_json: bool,
                 png: Path | None = None) -> None:  # fmt: skip
    from gen_cli.formats.loading import config_for
    from gen_cli.lab.report import plot_available
    from gen_cli.train.by_position import evaluate_by_position

    if png is not None:
        from gen_cli.commands.common import check_writable_output

        if not plot_available():
            raise UsageError("--png needs matplotlib: pip install 'gen-lab[plot]'")
        check_writable_output(png, force=True)

    context = context if context is not None else config_for(str(model_dir))[0].context_length
    res = evaluate_by_position(model_dir, inputs, context, buckets, device, batch_size, max_tokens, rope_scaling)
    if png is not None:
        from gen_cli.lab.charts import save_position_png

        save_position_png(dataclasses.asdict(res), str(png))
        err.print(f"saved {escape(str(png))}")
    if as_json:
        print_json(dataclasses.asdict(res))
        return
    console = out_console()
    scaling = f", RoPE scaling {res.rope_scaling}" if res.pos_encoding == "rope" else ""
    console.print(
        f"{res.pos_encoding}{scaling}: {res.windows} windows of {res.context} tokens "
        f"(trained context {res.trained_context}); bars span the lowest to the highest bits/byte"
    )
    table = Table(box=None)
    for name in ("positions", "loss", "bits/byte", ""):
        table.add_column(name, justify="right" if name else "left")
    values = [b.bits_per_byte for b in res.buckets]
    lo, span = min(values), (max(values) - min(values)) or 1.0
    for b in res.buckets:
        bar = "█" * (1 + round(29 * (b.bits_per_byte - lo) / span))
        past = "  past training" if b.start >= res.trained_context else ""
        table.add_row(f"{b.start}–{b.end - 1}", f"{b.loss:.4f}", f"{b.bits_per_byte:.4f}", bar + past)
    console.print(table)
    err.print(f"scored the validation split of {escape(res.corpus)}", soft_wrap=True)


def _check_eval_model(model_dir: Path, positional: bool) -> None:
    """Refuse a model path that is text, saying so: `gen eval notes.txt` gave a file where the model goes."""
    try:
        check_model_path(model_dir, "eval")
    except UsageError as e:
        if positional and model_dir.is_file():
            raise UsageError(f"{e}, then text inputs: gen eval MODEL {model_dir}, or gen eval --model MODEL "
                             f"{model_dir}") from None  # fmt: skip
        raise


def _trained(model_dir: Path) -> bool:
    from gen_cli.train.evaluate import trained_inputs

    return trained_inputs(model_dir) is not None


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("eval")(eval_command)
