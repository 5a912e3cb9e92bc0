"""`gen widen`: a trained model zero-padded to a larger shape, its text unchanged, its cost the larger one's."""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from gen_cli.commands.common import out_console, print_json
from gen_cli.commands.options import (
    MODEL,
    Force,
    Json,
    KvHeads,
    Model,
    ModelArg,
    Out,
    check_model_path,
    model_from,
)
from gen_cli.errors import UsageError

# Tokens of the check that the widened model gives the original's logits.
PROBE_TOKENS = 64


def _size(flag: str, what: str) -> Any:  # typer's OptionInfo, read as int | None
    return typer.Option(None, flag, metavar="N", help=f"The new {what}.", show_default="the model's own",
                        rich_help_panel=MODEL)  # fmt: skip


def widen_command(
    model_arg: ModelArg = None,
    model_opt: Model = None,
    d_model: int | None = _size("--d-model", "residual width"),
    layers: int | None = _size("--layers", "layer count (new layers pass the residual through)"),
    heads: int | None = _size("--heads", "query head count (heads keep their size)"),
    kv_heads: KvHeads = None,
    d_ff: int | None = _size("--d-ff", "MLP width"),
    out: Out = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Zero-pad a trained gen model to a larger shape that computes the same logits.

    A small trained model runs from the CPU's caches and a random large one writes noise; the widened model
    writes the trained model's text at the cost per token of its new shape (the same bytes and multiply-adds
    as any model of that shape), so speculation, batching and quantization can be measured on real text at a
    real size. New rows and columns are zero; norm gains are scaled so the wider mean gives the same values.
    --out is the new model directory; export it (`gen export --to gguf --type q8_0`) to run it as a file.
    The table reports the largest logit difference from the original over a 64-token probe, measured here.
    """
    import torch

    from gen_cli.formats.checkpoint import load_model, save_model
    from gen_cli.formats.loading import model_kind
    from gen_cli.memory import check_fits, parameter_count
    from gen_cli.model.widen import widen, widened_config

    model_dir = model_from(model_arg, model_opt, "widen")
    if out is None:
        raise UsageError("gen widen needs --out DIR: where the widened model goes")
    check_model_path(model_dir, "widen")
    if model_kind(model_dir) != "gen":
        raise UsageError(f"{model_dir}: gen widen takes a gen model directory (a `gen train` run or `gen convert` "
                         "output), not an imported file")  # fmt: skip
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    model, tok = load_model(model_dir)
    c = model.config
    target = widened_config(c, d_model or c.d_model, layers or c.n_layer, heads or c.n_head,
                            kv_heads or c.n_kv_head, d_ff or c.d_ff)  # fmt: skip
    # The zero model, its state written in place, and the copy safetensors makes while saving.
    check_fits(3 * 4 * parameter_count(target), f"widening {model_dir}", "choose a smaller shape")
    wide = widen(model, target)
    probe = torch.randint(0, c.vocab_size, (1, min(PROBE_TOKENS, c.context_length)),
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        max_diff = float((model(probe) - wide(probe)).abs().max())
    save_model(out, wide, tok)

    def shape(m: torch.nn.Module) -> dict[str, int]:
        k = m.config
        return {"d_model": k.d_model, "layers": k.n_layer, "heads": k.n_head, "kv_heads": k.n_kv_head,
                "d_ff": k.d_ff, "parameters": m.num_parameters()}  # fmt: skip

    rows = {"original": shape(model), "widened": shape(wide)}
    if as_json:
        print_json({"model": str(model_dir), "out": str(out), **rows, "max_logit_difference": max_diff})
        return
    table = Table(title=f"{escape(str(model_dir))} → {escape(str(out))}")
    table.add_column("")
    for name in rows["original"]:
        table.add_column(name.replace("_", " "), justify="right")
    for label, values in rows.items():
        table.add_row(label, *(f"{v:,}" for v in values.values()))
    console = out_console()
    console.print(table)
    console.print(f"largest logit difference over {probe.shape[1]} tokens: {max_diff:.2e}")


def register(app: typer.Typer) -> None:
    app.command("widen")(widen_command)
