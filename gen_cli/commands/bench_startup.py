"""`gen bench startup`: a fresh process per repeat, from spawn to the first token, beside llama.cpp."""

from __future__ import annotations

from pathlib import Path

import typer

from gen_cli.commands.common import err, out_console, print_json
from gen_cli.commands.options import Json, MaxNewTokens, Model, Repeats
from gen_cli.errors import UsageError


def bench_startup_command(
    model: Model = None,
    repeats: Repeats = 5,
    new_tokens: MaxNewTokens = 16,
    llama_simple: Path = typer.Option(
        None,
        "--llama-simple",
        metavar="PATH",
        help="llama.cpp's llama-simple to run the same file with; else one on PATH is used.",
    ),
    llama_cli: Path = typer.Option(
        None, "--llama-cli", metavar="PATH", help="llama.cpp's llama-cli, used when no llama-simple is given or found."
    ),
    as_json: Json = False,
) -> None:
    """Start-up cost: each repeat runs a fresh `gen generate -m FILE -n N` process (and llama.cpp's on the
    same file, interleaved, when --llama-simple/--llama-cli is given or one is on PATH).

    Reported per tool, median (min–max): wall time of the whole command; load time and time to first token
    (from the start of loading) as each tool reports them (gen's --json stats; llama.cpp's
    llama_perf_context_print load and prompt eval times); the child's peak RSS (its own ru_maxrss). One
    untimed run of each warms the page cache first.
    """  # fmt: skip
    from rich.markup import escape

    from gen_cli.lab.startup import bench_startup, find_llama, format_sides

    if repeats < 1 or new_tokens < 1:
        raise UsageError("repeats and max_new_tokens must be ≥ 1", params=("repeats", "max_new_tokens"))
    if model is None:
        raise UsageError("gen bench startup needs --model FILE: the model every process loads")
    llama = find_llama(llama_simple, llama_cli)
    who = f"gen and {llama[0]} ({escape(str(llama[1]))})" if llama else "gen (no llama-simple or llama-cli found)"
    err.print(f"{repeats} rounds of fresh processes generating {new_tokens} tokens: {who}")
    sides = bench_startup(model, repeats, new_tokens, llama)
    if as_json:
        print_json({"model": str(model), "max_new_tokens": new_tokens, "sides": [s.summary() for s in sides]})
        return
    out_console().print("\n".join(format_sides(sides)), markup=False)
    err.print("median (min–max) over the rounds; first token counts from the start of loading, not of the process")
