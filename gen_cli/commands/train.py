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
from gen_cli.commands.options import Device
from gen_cli.errors import UsageError
from gen_cli.text.tokenizer import DEFAULT_VOCAB_SIZE

INPUTS_HELP = (
    "Text inputs: files, folders (recursive), globs, '-' for stdin, or a built-in corpus name. Default: python-docs."
)


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


def train_command(
    inputs: list[str] = typer.Argument(None, help=INPUTS_HELP, show_default=False),
    tokenizer: Path = typer.Option(
        None, "--tokenizer", help="tokenizer.json (or model folder) to use; default: train one.", show_default=False
    ),
    vocab_size: int = typer.Option(
        None, "--vocab-size", help=f"Vocabulary of the tokenizer trained on the fly [{DEFAULT_VOCAB_SIZE}]."
    ),
    preset: str = typer.Option(None, "--preset", help="Model shape from models/presets (tiny, small, base) [tiny]."),
    attention: str = typer.Option(None, "--attention", help="mha, mqa or gqa [the preset's]."),
    kv_heads: int = typer.Option(None, "--kv-heads", help="KV head count (GQA groups)."),
    pos: str = typer.Option(
        None,
        "--pos",
        help="Positional encoding: rope, sinusoidal, learned or alibi (a linear bias on the attention logits).",
    ),
    norm: str = typer.Option(None, "--norm", help="rmsnorm or layernorm."),
    layers: int = typer.Option(None, "--layers", help="Number of blocks."),
    heads: int = typer.Option(None, "--heads", help="Query heads."),
    d_model: int = typer.Option(None, "--d-model", help="Model width."),
    d_ff: int = typer.Option(None, "--d-ff", help="MLP hidden width."),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps in total [200: minutes on a laptop CPU]."),
    batch_size: int = typer.Option(None, "--batch-size", help="Sequences per micro-batch per process [16]."),
    grad_accum: int = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step [1]."),
    context: int = typer.Option(
        None, "--context", help="Tokens per training window; for a new run also the model's context length."
    ),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate [3e-3]."),
    warmup: int = typer.Option(None, "--warmup", help="Linear warm-up steps [min(100, steps/10)]."),
    min_lr: float = typer.Option(None, "--min-lr", help="LR at the end of the cosine decay [lr/10]."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW decay on weight matrices [0.1]."),
    grad_clip: float = typer.Option(None, "--grad-clip", help="Clip the gradient norm to this; 0 = off [1.0]."),
    eval_every: int = typer.Option(None, "--eval-every", help="Evaluate every N steps (and at the end); 0 = end only."),
    eval_batches: int = typer.Option(None, "--eval-batches", help="Validation batches per evaluation [20]."),
    save_every: int = typer.Option(None, "--save-every", help="Checkpoint every N steps (and at the end) [500]."),
    save_minutes: float = typer.Option(
        None, "--save-minutes", help="Also checkpoint when this many minutes passed since the last save; 0 = off [5]."
    ),
    seed: int = typer.Option(None, "--seed", help="Seed for weights and batch sampling [0]."),
    device: Device = "auto",
    dtype: str = typer.Option(
        "auto", "--dtype", help="float32 or bfloat16 (autocast; weights stay fp32). auto = bf16 on CUDA."
    ),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the model (slow start, faster steps)."),
    out: Path = typer.Option(None, "--out", help="Run folder [.gen/runs/PRESET-TIME].", show_default=False),
    force: bool = typer.Option(False, "--force", help="Overwrite a run folder that already holds files."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this folder.", show_default=False),
    init: Path = typer.Option(
        None, "--init", help="Start from this model directory (its shape, tokenizer and weights).", show_default=False
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the final summary as JSON on stdout."),
) -> None:
    """Train a small transformer (or resume a run); the run folder is a model directory.

    Text is tokenized once into a cached token file; checkpoints (config.json, model.safetensors,
    tokenizer.json, train_state.safetensors) are written atomically, and every step's metrics go to
    metrics.jsonl. Ctrl-C saves and exits. Under `torchrun --nproc_per_node=N -m gen_cli train …` the
    run uses DistributedDataParallel; --batch-size is per process.
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
    model_dir: Path = typer.Argument(
        None, help="Gen model folder, Hugging Face folder or .gguf file [the shipped default].", show_default=False
    ),
    inputs: list[str] = typer.Argument(None, help=INPUTS_HELP, show_default=False),
    device: Device = "auto",
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16 (autocast)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    context: int = typer.Option(None, "--context", help="Window length [the model's context length]."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Score at most this many tokens (for speed)."),
    rope_scaling: str = typer.Option(
        None,
        "--rope-scaling",
        help="Score a RoPE model with this scaling instead of its own: linear:F, ntk:F, yarn:F,orig=N, "
        "llama3:F,orig=N or none; --context may then reach factor × the trained context.",
        show_default=False,
    ),
    by_position: bool = typer.Option(
        False,
        "--by-position",
        help="Loss and bits per byte per position bucket of --context-token windows; --context may exceed the "
        "trained context (RoPE, sinusoidal, ALiBi): the extrapolation sweep.",
    ),
    buckets: int = typer.Option(8, "--buckets", help="With --by-position: position buckets."),
    png: Path = typer.Option(
        None,
        "--png",
        help="With --by-position: also save the chart as an image (needs gen-lab\\[plot]).",
        show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print loss, perplexity, bits_per_byte, tokens, bytes."),
) -> None:
    """Held-out loss, perplexity and bits per byte on the validation split of the inputs.

    Without inputs, a `gen train` run folder is scored on the text it was trained on (recorded in its
    train state), any other model on the default corpus; the output names the corpus and split.

    The validation token stream is scored in contiguous, non-overlapping windows, so each token is
    predicted once. Bits per byte (total nats / ln 2 / UTF-8 bytes of the scored text) does not
    depend on the tokenizer, so models with different vocabularies compare fairly.
    """
    from gen_cli.resources import default_model_dir
    from gen_cli.train.evaluate import evaluate_model

    if model_dir is None:
        model_dir = default_model_dir()
        if not (model_dir / "config.json").is_file():
            raise UsageError(f"no default model at {model_dir}; pass a model folder (e.g. one `gen train` wrote)")
    if png is not None and not by_position:
        raise UsageError("--png goes with --by-position")
    if by_position:
        _by_position(model_dir, list(inputs or []), context, buckets, device, batch_size, max_tokens, rope_scaling,
                     as_json, png)  # fmt: skip
        return
    res = evaluate_model(model_dir, list(inputs or []), device, dtype, batch_size, context, max_tokens, rope_scaling)
    if as_json:
        print_json(dataclasses.asdict(res))
        return
    out_console().print(_eval_figures(res))
    split = {"val": "validation"}.get(res.split, res.split)
    err.print(
        f"scored the {split} split of {escape(res.corpus)}"
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


def _trained(model_dir: Path) -> bool:
    from gen_cli.train.evaluate import trained_inputs

    return trained_inputs(model_dir) is not None


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("eval")(eval_command)
