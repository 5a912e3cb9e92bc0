"""`gen convert`: turn an MHA (or GQA) model into GQA/MQA by pooling KV heads, optionally uptrain, measure."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from gen_cli.commands.common import err, out_console, print_json
from gen_cli.commands.options import (
    INPUTS_HELP,
    MODEL,
    PERFORMANCE,
    Force,
    Json,
    Model,
    ModelArg,
    Out,
    check_model_path,
    model_from,
)
from gen_cli.errors import UsageError

UPTRAIN_CONTEXT = 128


def convert_command(
    model_arg: ModelArg = None,
    model_opt: Model = None,
    kv_heads: str = typer.Option(
        ...,
        "--kv-heads",
        metavar="LIST",
        help="KV head count(s) to convert to, comma-separated; each must divide the model's.",
        rich_help_panel=MODEL,
    ),
    out: Out = None,
    pooling: str = typer.Option(
        "mean",
        "--pooling",
        metavar="HOW",
        help="mean (the GQA paper) or first (keep each group's first).",
        rich_help_panel=MODEL,
    ),
    uptrain_steps: int = typer.Option(
        0, "--uptrain-steps", metavar="N", help="Train each converted model this many steps on the text (0 = none)."
    ),
    inputs: list[str] = typer.Option(
        None,
        "--input",
        metavar="INPUTS",
        help=f"{INPUTS_HELP} For uptraining and evaluation (repeatable).",
        show_default="python-docs",
    ),
    lr: float = typer.Option(1e-3, "--lr", metavar="X", help="Peak learning rate for uptraining."),
    eval_tokens: int = typer.Option(
        20_000, "--eval-tokens", metavar="N", help="Validation tokens scored per model.", rich_help_panel=PERFORMANCE
    ),
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Convert MODEL to fewer KV heads by mean-pooling each group's key and value projections.

    MODEL is a gen directory (e.g. a `gen train` run), an HF folder or a .gguf file. --out is the output
    model directory (a folder of kv{K}/ for several counts); the result is a normal model directory
    that every command reads. Each row reports the KV-cache
    bytes per token, greedy decode speed and held-out bits per byte, right after pooling and (with
    --uptrain-steps) after a short training run from the pooled weights, against the original.
    """
    from gen_cli.formats.checkpoint import load_config
    from gen_cli.formats.loading import config_for, model_kind
    from gen_cli.lab.compare import int_values
    from gen_cli.lab.convert import convert_and_measure
    from gen_cli.model.convert import POOLING, kv_head_choices

    model_dir = model_from(model_arg, model_opt, "convert")
    if out is None:
        raise UsageError("gen convert needs --out DIR: where the converted model goes")
    counts = int_values("--kv-heads", [kv_heads], [])
    check_model_path(model_dir, "convert")
    kind = model_kind(model_dir)
    if kind != "gen" and uptrain_steps:
        # gen's training splits documents with gen's <|endoftext|>, which an imported tokenizer lacks.
        raise UsageError(f"--uptrain-steps needs a gen model; {model_dir} is imported (convert it without uptraining)")
    config = config_for(str(model_dir))[0]
    if bad := [k for k in counts if k not in kv_head_choices(config.n_kv_head)]:
        choices = ", ".join(map(str, kv_head_choices(config.n_kv_head)))
        raise UsageError(f"--kv-heads {bad[0]} does not divide the model's {config.n_kv_head} KV heads; use {choices}")
    if pooling not in POOLING:
        raise UsageError(f"--pooling must be one of {', '.join(POOLING)}, got {pooling!r}")
    if uptrain_steps < 0 or eval_tokens < 1:
        raise UsageError("--uptrain-steps must be ≥ 0 and --eval-tokens ≥ 1")
    targets = [out] if len(counts) == 1 else [out / f"kv{k}" for k in counts]
    for target in targets:  # refuse before any work: nothing half-written, nothing overwritten by surprise
        if target.exists() and any(target.iterdir()) and not force:
            raise UsageError(f"{target} already holds files; pass --force to overwrite it")

    def uptrain(pooled: Path, target: Path) -> None:
        from gen_cli.train.args import TrainArgs
        from gen_cli.train.loop import train

        # Short windows: uptraining adjusts the pooled heads, the positions were learned already, and a
        # step on 128 tokens costs a quarter of one on 512.
        context = min(UPTRAIN_CONTEXT, load_config(pooled).context_length)
        train(TrainArgs(inputs=list(inputs or []), init=str(pooled), steps=uptrain_steps, lr=lr, context=context,
                        warmup=min(20, uptrain_steps // 10), eval_every=0, save_every=0, out=str(target),
                        force=True))  # fmt: skip

    rows = convert_and_measure(model_dir, counts, out, pooling, list(inputs or []), eval_tokens,
                               uptrain if uptrain_steps else None, lambda m: err.print(escape(m)))  # fmt: skip
    if as_json:
        print_json({"model": str(model_dir), "pooling": pooling, "uptrain_steps": uptrain_steps,
                    "rows": [r.to_dict() for r in rows]})  # fmt: skip
        return
    table = Table(title=f"{escape(str(model_dir))} → pooled KV heads ({pooling})")
    for name in ("KV heads", "kind", "KV bytes/token", "decode tok/s", "bits/byte", "after uptraining", "saved to"):
        table.add_column(name, justify="left" if name in ("kind", "saved to") else "right")
    for r in rows:
        after = "" if r.uptrained_bits_per_byte is None else f"{r.uptrained_bits_per_byte:.4f}"
        table.add_row(str(r.kv_heads), r.attention_kind, f"{r.kv_bytes_per_token:,}", f"{r.decode_tok_s:,.0f}",
                      f"{r.bits_per_byte:.4f}", after, escape(r.path or "(original)"))  # fmt: skip
    console = out_console()
    console.print(table)
    if not console.no_color and len(rows) > 1:  # a picture of the trade: quality against KV-cache memory
        from gen_cli.lab.convert import quality_chart

        console.print(quality_chart(rows))


def register(app: typer.Typer) -> None:
    app.command("convert")(convert_command)
