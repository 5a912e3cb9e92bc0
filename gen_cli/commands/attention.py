"""`gen attention`: a prompt's attention weights as a terminal heatmap, per-head summaries, PNG and JSON."""

from __future__ import annotations

import shutil
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from gen_cli.commands.common import err, out_console, print_json, read_text_arg
from gen_cli.commands.options import OUTPUT, Json, Model, Png, Pos, Preset, RopeScaling, Tokenizer
from gen_cli.errors import GenError, UsageError

PNG_HINT = "--png needs matplotlib: pip install 'gen-lab[plot]'"


def attention_command(
    prompt: str = typer.Argument(..., help="Text whose attention to show, or '-' to read it from stdin."),
    model_dir: Model = None,
    preset: Preset = None,
    tokenizer: Tokenizer = None,
    pos: Pos = None,
    rope_scaling: RopeScaling = None,
    layer: int = typer.Option(
        -1, "--layer", metavar="N", help="Layer to show; negative counts from the last.", rich_help_panel=OUTPUT
    ),
    head: int = typer.Option(
        None,
        "--head",
        metavar="N",
        help="Show this query head.",
        show_default="the mean of the layer's heads",
        rich_help_panel=OUTPUT,
    ),
    png: Png = None,
    as_json: Json = False,
) -> None:
    """Show which tokens each token of PROMPT attends to, in one layer, as the model computes it.

    The model is --model (the shipped model by default), or random weights of a --preset shape (with
    --tokenizer and --pos). --json writes the weights, tokens and summaries; --png the heatmap as an image.

    Rows are queries, columns the keys they attend to (the future is blank: attention is causal);
    shading ░▒▓█ marks a weight below 0.1, below 0.25, below 0.5, and 0.5 or more. The weights are the
    softmax the model itself computes (its mask, RoPE or ALiBi bias included). Per head: the mean
    distance attended back (in tokens), the share of weight on the first token (attention sinks show
    up there), and the entropy of each row (low: focused; log2 of the row length: uniform). Under GQA
    or MQA the table says which query heads share each KV head.
    """
    from gen_cli.formats.loading import load
    from gen_cli.lab import attention as lab
    from gen_cli.lab.report import plot_available
    from gen_cli.text.tokenizer import encode

    if model_dir is not None and preset is not None:
        raise UsageError("pass either --model or --preset, not both")
    if preset is None and (pos is not None or tokenizer is not None):
        raise UsageError("--pos and --tokenizer only apply with --preset (random weights)")
    if png is not None:
        if not plot_available():
            raise UsageError(PNG_HINT)
        from gen_cli.commands.common import check_writable_output

        try:
            check_writable_output(png, force=True)
        except GenError as e:
            raise UsageError(f"--png {e}") from None
    loaded = load(model_dir, preset, tokenizer, pos=pos, rope_scaling=rope_scaling)
    for note in loaded.notes:
        err.print(escape(note))
    model, tok = loaded.model, loaded.tokenizer
    text = read_text_arg(prompt, 64 * model.config.context_length)
    ids = tok.encode(text, add_special_tokens=True).ids if loaded.add_special_tokens else encode(tok, text)
    if len(ids) > model.config.context_length:
        raise UsageError(
            f"the prompt is {len(ids)} tokens, more than the model's context of {model.config.context_length}"
        )
    data = lab.attention_map(model, tok, ids, layer, head)
    data["model"] = loaded.source
    what = f"head {head}" if head is not None else f"mean of {model.config.n_head} heads"
    title = f"layer {data['layer']} of {data['n_layer']}, {what}: {loaded.source}"
    if png is not None:
        lab.save_png(data, png, title)
        err.print(f"saved {escape(str(png))}")
    if as_json:
        print_json(data)
        return
    _render(data, title)


def _render(data: dict[str, Any], title: str) -> None:
    from gen_cli.lab import attention as lab

    console = out_console()
    heads = data["heads"]
    weights = heads[0]["weights"] if len(heads) == 1 else lab.mean_weights(heads)
    columns = shutil.get_terminal_size((120, 40)).columns
    label = max(len(lab.token_label(t)) for t in data["tokens"])
    fit = max(8, (columns - label - 2) // 2)
    console.print(escape(title))
    T = len(data["tokens"])
    if fit < T:
        console.print(f"(the last {fit} of {T} tokens; --json or --png for the whole matrix)")
    for line in lab.heatmap_lines(weights, data["tokens"], fit):
        console.print(escape(line), soft_wrap=True)
    console.print("shading: ░ < 0.1  ▒ < 0.25  ▓ < 0.5  █ ≥ 0.5;  · is a space, ↵ a newline")
    table = Table(box=None, title=None)
    for name in ("head", "KV head", "mean distance", "first-token share", "entropy (bits)"):
        table.add_column(name, justify="right")
    for h in heads:
        table.add_row(str(h["head"]), str(h["kv_head"]), f"{h['mean_distance']:.2f}",
                      f"{h['first_token_share']:.3f}", f"{h['entropy_bits']:.2f}")  # fmt: skip
    console.print(table)
    console.print(f"uniform attention would have entropy {lab.entropy_ceiling(T):.2f} bits (mean over rows)")
    groups = data["kv_groups"]
    if len(groups) < sum(len(g) for g in groups):
        shared = "; ".join(f"KV head {g} ← query heads {', '.join(map(str, q))}" for g, q in enumerate(groups))
        console.print(f"{data['attention_kind'].upper()}: {shared}")


def register(app: typer.Typer) -> None:
    app.command("attention")(attention_command)
