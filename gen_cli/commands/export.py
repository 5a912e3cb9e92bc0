"""`gen export`: a gen model (or any model gen loads) as a Hugging Face folder or a GGUF file."""

from __future__ import annotations

import time

import typer
from rich.markup import escape

from gen_cli.commands.common import err, print_json
from gen_cli.commands.options import OUTPUT, Force, Json, Model, ModelArg, Out, check_model_path, model_from
from gen_cli.errors import UsageError

TARGETS = ("hf", "gguf")
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k")
BLOCK_TYPES = ("q8_0", "q4_0", "q4_k")


def export_command(
    model_arg: ModelArg = None,
    model_opt: Model = None,
    to: str = typer.Option(
        ...,
        "--to",
        metavar="FORMAT",
        help="hf (a transformers folder) or gguf (one file for llama.cpp).",
        rich_help_panel=OUTPUT,
    ),
    out: Out = None,
    type_: str = typer.Option(
        None,
        "--type",
        metavar="TYPE",
        help="Weight type: f32, f16 or bf16 (both targets); q8_0, q4_0 or q4_k (GGUF only: the blocks "
        "`gen generate --quantize` runs; norms and biases stay f32, matrices already held as blocks are written "
        "as they are).",
        show_default="the model's own: f32 for gen's models, a quantized GGUF's block type",
        rich_help_panel=OUTPUT,
    ),
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Export MODEL so other tools run it: transformers (`--to hf`) or llama.cpp (`--to gguf`).

    MODEL is a gen model directory or `gen train` run folder (also a Hugging Face folder or .gguf);
    --out is the output folder (hf) or .gguf file (gguf).

    `--to hf` writes config.json (LlamaForCausalLM, Qwen2/Qwen3ForCausalLM when the model has their
    biases or q/k norm, or GPT2LMHeadModel for learned positions with LayerNorm and GELU), model.safetensors,
    tokenizer.json, tokenizer_config.json and generation_config.json: `AutoModelForCausalLM.from_pretrained(OUT)`
    and `AutoTokenizer` load it unchanged. `--to gguf` writes one file with the metadata and byte-level BPE
    tokenizer llama.cpp reads (llama, qwen2, qwen3 or gpt2 architecture).

    A model neither format can express (sinusoidal positions, or a mix such as LayerNorm with RoPE) is
    refused with the reason, and nothing is written. Tensors are converted and written one at a time (a
    model's pages are read in place from its file), so peak memory stays near one tensor's size. Files are
    written to temporary names and renamed into place; an existing output is kept unless --force, which
    replaces only the files the export writes (other files in the folder stay). Exporting onto the model's
    own files is refused.
    """
    from gen_cli.formats.export_files import check_not_source, check_output

    model = model_from(model_arg, model_opt, "export")
    if out is None:
        raise UsageError("gen export needs --out PATH: the output folder (hf) or .gguf file (gguf)")
    if to not in TARGETS:
        raise UsageError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if type_ is not None and type_ not in TYPES:
        raise UsageError(f"--type must be one of {', '.join(TYPES)}, got {type_!r}")
    if to == "hf" and type_ in BLOCK_TYPES:
        raise UsageError(f"--type {type_} is for --to gguf; a Hugging Face folder holds f32, f16 or bf16 weights")
    check_model_path(model, "export")
    check_output(out, force, folder=to == "hf")  # before loading: a refusal costs nothing
    check_not_source(out, model)  # even with --force: writing over the weights being read loses them
    from gen_cli.formats.export import export_hf, family
    from gen_cli.formats.export_gguf import export_gguf
    from gen_cli.formats.loading import config_for, load
    from gen_cli.pages import PageReleaser

    config, _source, _details = config_for(str(model))
    family(config, to)  # an inexpressible model is refused from its config alone, before the weights load
    start = time.perf_counter()
    loaded = load(model_dir=model)
    if loaded.random_weights:
        raise UsageError(f"{model} is not a model with trained weights")
    PageReleaser().release_files(model)  # loading read some pages (fused q/k/v); each is read again when written
    stops = loaded.stop_ids or None
    if to == "hf":
        result = export_hf(loaded.model, loaded.tokenizer, out, type_, force, stops, loaded.chat_template, True)
    else:
        kind = type_ or _stored_type(loaded.model)
        result = export_gguf(loaded.model, loaded.tokenizer, out, kind, force, stops, loaded.chat_template, True)
    seconds = time.perf_counter() - start
    if as_json:
        print_json({"source": str(model), **result.to_dict(), "seconds": round(seconds, 3)})
    else:
        err.print(
            f"exported {escape(str(model))} → {escape(result.path)} ({result.architecture}, {result.type}, "
            f"{result.tensors} tensors, {result.bytes:,} bytes) in {seconds:.2f} s"
        )
    for note in result.notes:
        err.print(f"note: {escape(note)}")


def _stored_type(model) -> str:
    """The type the model holds its matrices in: its most common block type (a quantized GGUF), else its
    float dtype."""
    from collections import Counter

    import torch

    from gen_cli.formats.export import held_blocks

    blocks = Counter(qtype for _, qtype in held_blocks(model).values())
    if blocks:
        return blocks.most_common(1)[0][0]
    return {torch.bfloat16: "bf16", torch.float16: "f16"}.get(model.norm.weight.dtype, "f32")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
