"""`gen info`: a model's shape and what its KV cache and weights cost, read without loading weights."""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from gen_cli.commands.common import out_console, print_json
from gen_cli.commands.options import Json, Model
from gen_cli.errors import UsageError
from gen_cli.resources import default_model_dir


def info_command(
    target: str = typer.Argument(
        None,
        metavar="MODEL",
        help="A gen model directory, a Hugging Face folder, a .gguf file or a preset name. Or give --model.",
        show_default="the shipped model",
    ),
    model: Model = None,
    as_json: Json = False,
) -> None:
    """Show a model's configuration, parameter count and what its KV cache and weights cost.

    Reads only headers and metadata, never the weights, so it is quick on large models.
    """
    from gen_cli.cache.linear import kv_kind_bytes
    from gen_cli.formats.loading import config_for
    from gen_cli.lab.report import human_bytes
    from gen_cli.model.info import model_info

    if target is not None and model is not None:
        raise UsageError("give the model once: gen info MODEL, or gen info --model MODEL")
    from gen_cli.native.abi import unsupported_properties

    config, source, details = config_for(str(model) if model is not None else target or str(default_model_dir()))
    lacking = unsupported_properties(config)
    native = "yes (CPU, fp32/bf16/int8)" if not lacking else f"no: it does not implement {', '.join(lacking)}"
    info = {
        "source": source,
        **details,
        **model_info(config),
        "kv_kinds": kv_kind_bytes(config),
        "native_decode": native,
    }
    if as_json:
        print_json(info)
        return
    table = Table(title=escape(source), show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key in ("format", "architecture", "dtype", "tensor_types", "tokenizer", "chat_template"):
        if key in details:
            value = details[key]
            shown = ", ".join(f"{k} ×{n}" for k, n in value.items()) if isinstance(value, dict) else str(value)
            table.add_row(key, escape(shown))
    if "matrices" in details:  # a GGUF file: the form gen holds each class of matrix in, and its bytes
        from gen_cli.formats.gguf_blocks import summary_lines

        for line in summary_lines(details["matrices"]):
            table.add_row("matrices", escape(line))
    for key, value in config.to_dict().items():
        if key != "rope_scaling":
            table.add_row(key, str(value))
    kinds = {"mha": "multi-head", "gqa": "grouped-query", "mqa": "multi-query"}
    table.add_row("attention", f"{kinds[config.attention_kind]} ({config.n_head} query / {config.n_kv_head} KV heads)")
    table.add_row("head size", str(config.head_dim))
    if config.pos_encoding == "rope":
        table.add_row("RoPE", f"base {config.rope_base:g}, scaling {_rope_scaling_text(config.rope_scaling)}")
    if config.pos_encoding == "alibi":
        from gen_cli.model.positions import alibi_slopes

        table.add_row("ALiBi slopes", ", ".join(f"{s:.4g}" for s in alibi_slopes(config.n_head)))
    table.add_row("native step", escape(native))
    for note in details.get("notes", []):
        table.add_row("note", escape(note))
    table.add_row("parameters", f"{info['parameters']:,}")
    for label, key in (("KV bytes / token", "kv_bytes_per_token"), ("KV at full context", "kv_bytes_full_context"),
                       ("weights", "weight_bytes")):  # fmt: skip
        v = info[key]
        table.add_row(label, f"{human_bytes(v['float32'])} fp32, {human_bytes(v['bfloat16'])} bf16")
    kinds = info["kv_kinds"]
    table.add_row("KV / token by kind", ", ".join(f"{human_bytes(b['per_token'])} {k}" for k, b in kinds.items()))
    out_console().print(table)


def _rope_scaling_text(scaling: dict[str, Any] | None) -> str:
    if scaling is None:
        return "none"
    if scaling["type"] == "freq_factors":
        return f"per-frequency factors ({len(scaling['factors'])}, from the file)"
    return f"{scaling['type']} (" + ", ".join(f"{k} {v:g}" for k, v in scaling.items() if k != "type") + ")"


def register(app: typer.Typer) -> None:
    app.command("info")(info_command)
