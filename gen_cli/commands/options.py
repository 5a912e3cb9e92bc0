"""Options several commands share, declared once: one flag, one help text, one metavar and one help panel
everywhere. A command gives the default (`device: Device = "auto"`); the help shows it as `[default: X]`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gen_cli.errors import UsageError
from gen_cli.model.config import ROPE_SCALING_SPECS
from gen_cli.native.abi import ACT_DEFAULT

# Help panels, in the order `--help` shows them (options outside a panel come last, under "Options").
MODEL = "Model"
INPUT = "Input"
SAMPLING = "Sampling"
CACHE = "Cache"
OUTPUT = "Output"
PERFORMANCE = "Performance"

INPUTS_HELP = "Text: files, folders (recursive), globs, '-' for stdin or a built-in corpus name."
MODEL_HELP = "A gen model directory, a Hugging Face folder or a .gguf file."

# ---- the model --------------------------------------------------------------------------------------------
Model = Annotated[  # the default, where a command has one (the shipped model), is in its description
    Path | None,
    typer.Option("--model", "-m", metavar="PATH", help=MODEL_HELP, show_default=False, rich_help_panel=MODEL),
]
ModelArg = Annotated[  # the positional form, where a command takes the model first (`gen eval MODEL`)
    Path | None,
    typer.Argument(metavar="MODEL", help=f"{MODEL_HELP} Or give --model.", show_default=False),
]
Preset = Annotated[
    str | None,
    typer.Option(
        "--preset",
        metavar="NAME",
        help="A preset shape with random weights: tiny, small or base.",
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
Tokenizer = Annotated[
    Path | None,
    typer.Option(
        "--tokenizer",
        metavar="PATH",
        help="A tokenizer.json, or a model folder holding one.",
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
Attention = Annotated[
    str | None,
    typer.Option(
        "--attention", metavar="KIND", help="Attention: mha, gqa or mqa.", show_default=False, rich_help_panel=MODEL
    ),
]
KvHeads = Annotated[
    int | None,
    typer.Option("--kv-heads", metavar="N", help="KV heads (GQA groups).", show_default=False, rich_help_panel=MODEL),
]
Pos = Annotated[
    str | None,
    typer.Option(
        "--pos",
        metavar="KIND",
        help="Positional encoding: rope, sinusoidal, learned or alibi.",
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
RopeScaling = Annotated[
    str | None,
    typer.Option(
        "--rope-scaling",
        metavar="SPEC",
        help=f"Run a RoPE model with this scaling instead of its own ({ROPE_SCALING_SPECS}); the context grows "
        "to factor × the trained one.",
        show_default=False,
        rich_help_panel=MODEL,
    ),
]

# ---- input ------------------------------------------------------------------------------------------------
InputsArg = Annotated[list[str] | None, typer.Argument(metavar="INPUTS", help=INPUTS_HELP, show_default="python-docs")]

# ---- sampling ---------------------------------------------------------------------------------------------
_MAX_NEW_TOKENS = typer.Option(
    "--max-new-tokens", "-n", metavar="N", help="Tokens to generate at most.", rich_help_panel=SAMPLING
)
MaxNewTokens = Annotated[int, _MAX_NEW_TOKENS]
MaxNewTokensOrNone = Annotated[int | None, _MAX_NEW_TOKENS]  # a command whose default depends on what it runs
Temperature = Annotated[
    float,
    typer.Option("--temperature", metavar="T", help="Sampling temperature; 0 = greedy.", rich_help_panel=SAMPLING),
]
TopK = Annotated[
    int | None,
    typer.Option(
        "--top-k",
        metavar="K",
        help="Sample among the k most likely tokens.",
        show_default=False,
        rich_help_panel=SAMPLING,
    ),
]
TopP = Annotated[
    float | None,
    typer.Option(
        "--top-p",
        metavar="P",
        help="Nucleus: the smallest set reaching this probability.",
        show_default=False,
        rich_help_panel=SAMPLING,
    ),
]
MinP = Annotated[
    float | None,
    typer.Option(
        "--min-p",
        metavar="P",
        help="Drop tokens below min-p × the top probability.",
        show_default=False,
        rich_help_panel=SAMPLING,
    ),
]
RepetitionPenalty = Annotated[
    float,
    typer.Option("--repetition-penalty", metavar="X", help="CTRL penalty; 1 = off.", rich_help_panel=SAMPLING),
]
Seed = Annotated[
    int | None,
    typer.Option("--seed", metavar="N", help="Random seed: the same seed, the same result.", rich_help_panel=SAMPLING),
]
Stop = Annotated[
    list[str] | None,
    typer.Option(
        "--stop",
        metavar="TEXT",
        help="Stop when the text contains this (repeatable).",
        show_default=False,
        rich_help_panel=SAMPLING,
    ),
]
System = Annotated[
    str | None,
    typer.Option("--system", metavar="TEXT", help="A system message.", show_default=False, rich_help_panel=SAMPLING),
]

# ---- the KV cache -----------------------------------------------------------------------------------------
KvCache = Annotated[
    bool,
    typer.Option("--kv-cache/--no-kv-cache", help="Reuse keys and values (off: recompute).", rich_help_panel=CACHE),
]
KvDtype = Annotated[
    str | None,
    typer.Option(
        "--kv-dtype",
        metavar="KIND",
        help="KV cache kind for K and V: fp32, bf16, fp16, int8, int4, or a K/V pair such as k8v4.",
        show_default="the compute dtype",
        rich_help_panel=CACHE,
    ),
]
KvDtypeK = Annotated[
    str | None,
    typer.Option(
        "--kv-dtype-k", metavar="KIND", help="KV cache kind for K only.", show_default=False, rich_help_panel=CACHE
    ),
]
KvDtypeV = Annotated[
    str | None,
    typer.Option(
        "--kv-dtype-v", metavar="KIND", help="KV cache kind for V only.", show_default=False, rich_help_panel=CACHE
    ),
]
Window = Annotated[
    int | None,
    typer.Option(
        "--window",
        metavar="N",
        help="Keep only the last N positions in the KV cache (a ring), plus --sinks: memory stays flat and a "
        "RoPE or ALiBi model goes on past its context (positions within the cache, as StreamingLLM).",
        show_default=False,
        rich_help_panel=CACHE,
    ),
]
Sinks = Annotated[
    int,
    typer.Option(
        "--sinks", metavar="N", help="With --window: the first N tokens, kept forever.", rich_help_panel=CACHE
    ),
]

# ---- output -----------------------------------------------------------------------------------------------
Out = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        metavar="PATH",
        help="Where to write the result (the command's description says what).",
        show_default=False,
        rich_help_panel=OUTPUT,
    ),
]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.", rich_help_panel=OUTPUT)]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output: JSON on stdout.", rich_help_panel=OUTPUT)]
Stats = Annotated[
    bool, typer.Option("--stats", help="Token counts, times and memory on stderr.", rich_help_panel=OUTPUT)
]
Png = Annotated[
    Path | None,
    typer.Option(
        "--png",
        metavar="PATH",
        help="Also save the chart as an image (needs gen-lab[plot]).",
        show_default=False,
        rich_help_panel=OUTPUT,
    ),
]

# ---- performance ------------------------------------------------------------------------------------------
Device = Annotated[
    str,
    typer.Option(
        "--device",
        metavar="DEVICE",
        help="auto (cuda, else mps, else cpu), cpu, cuda or mps.",
        rich_help_panel=PERFORMANCE,
    ),
]
Dtype = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        metavar="DTYPE",
        help="float32, bfloat16, float16, or auto (bfloat16 on CUDA, else float32).",
        rich_help_panel=PERFORMANCE,
    ),
]
Threads = Annotated[
    int | None,
    typer.Option("--threads", metavar="N", help="CPU threads.", show_default="torch's", rich_help_panel=PERFORMANCE),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        "--batch-size", metavar="N", help="Sequences (or windows) per forward pass.", rich_help_panel=PERFORMANCE
    ),
]
Repeats = Annotated[
    int,
    typer.Option(
        "--repeats", metavar="N", help="Timed runs of each; the median is shown.", rich_help_panel=PERFORMANCE
    ),
]
Native = Annotated[
    bool,
    typer.Option(
        "--native/--no-native",
        help="Decode on the CPU in gen's C step where the model's shape allows (compiled on first use); "
        "--no-native: PyTorch.",
        rich_help_panel=PERFORMANCE,
    ),
]
Act = Annotated[
    str | None,
    typer.Option(
        "--act",
        metavar="int8|int8x2|bf16|fp32",
        help="Activations of block-quantized weights (GGUF Q4_0…Q6_K, --quantize q8_0/q4_0/q4_k) in their products: "
        "int8 (quantized per block, as llama.cpp), int8x2 (int8 plus the int8 rounding of what it missed: ~250 "
        "times closer to fp32, twice the integer products), bf16 (rounded) or fp32 (as they are; the blocks "
        "unpacked to floats).",
        show_default=ACT_DEFAULT,
        rich_help_panel=PERFORMANCE,
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile", help="torch.compile the model (a slow start, faster steps).", rich_help_panel=PERFORMANCE
    ),
]
AttnImpl = Annotated[
    str,
    typer.Option(
        "--attn-impl",
        metavar="IMPL",
        help="Attention: fused (SDPA's tiled kernel: no n×n scores) or eager (scores materialized).",
        rich_help_panel=PERFORMANCE,
    ),
]
Profile = Annotated[
    bool,
    typer.Option(
        "--profile", help="Also show where a decode step's time goes, per op class.", rich_help_panel=PERFORMANCE
    ),
]

Speculate = Annotated[
    str | None,
    typer.Option(
        "--speculate",
        metavar="ngram[:K]|draft[:K]",
        help="Speculative decoding: ngram guesses from earlier text (prompt lookup), draft from --draft; K guesses "
        "per round, else 4 to start, then following the acceptance. Greedy output is unchanged; sampled output "
        "keeps the model's distribution.",
        show_default=False,
        rich_help_panel=PERFORMANCE,
    ),
]
PromptLookup = Annotated[
    int,
    typer.Option(
        "--prompt-lookup",
        metavar="K",
        min=0,
        max=16,
        help="Speculate in the batch: each request also guesses up to K tokens from its own text (prompt lookup), "
        "verified in the same step while a step's decode rows stay few; greedy answers are unchanged, sampled ones "
        "keep the model's distribution. gen bench serve adds MODE+lookup rows, requests rewriting a passage. 0: off.",
        rich_help_panel=PERFORMANCE,
    ),
]
Draft = Annotated[
    str | None,
    typer.Option(
        "--draft",
        metavar="MODEL",
        help="The draft model for --speculate (same tokenizer): a model path, or self:q4_0 (this model at lower "
        "precision).",
        show_default=False,
        rich_help_panel=PERFORMANCE,
    ),
]


def model_from(positional: Path | None, option: Path | None, command: str, required: bool = True) -> Path | None:
    """The model a command was given, as MODEL or as --model (not both); a refusal when it needs one."""
    if positional is not None and option is not None:
        raise UsageError(f"give the model once: gen {command} MODEL, or gen {command} --model MODEL")
    model = option if option is not None else positional
    if model is None and required:
        raise UsageError(f"gen {command} needs a model: gen {command} MODEL, or gen {command} --model MODEL")
    return model


def check_model_path(path: Path, command: str) -> None:
    """Refuse, saying what the path is, a model path that is neither a folder nor a .gguf file."""
    expects = f"gen {command} takes a model: a gen model directory, a Hugging Face folder or a .gguf file"
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder; {expects}")
    if not path.is_dir() and path.suffix.lower() != ".gguf":
        raise UsageError(f"{path} is a file, not a model; {expects}")


def kv_kinds_of(both: str | None, k: str | None, v: str | None) -> tuple[str | None, str | None] | None:
    """(K, V) cache kinds from --kv-dtype and --kv-dtype-k/-v (None: the compute dtype, unquantized)."""
    if both is None and k is None and v is None:
        return None
    from gen_cli.cache.kinds import KV_KINDS, parse_kv_kinds  # torch: only when a kind is asked for

    if both is not None and (k is not None or v is not None):
        raise UsageError("give --kv-dtype for both, or --kv-dtype-k/--kv-dtype-v, not both forms")
    for flag, kind in (("--kv-dtype-k", k), ("--kv-dtype-v", v)):
        if kind is not None and kind not in KV_KINDS:
            raise UsageError(f"unknown {flag} {kind!r}; choose {', '.join(KV_KINDS)}")
    try:
        return parse_kv_kinds(both) if both is not None else (k, v)
    except UsageError as e:
        raise UsageError(f"--kv-dtype: {e}") from None
