"""Text commands: the built-in corpora, training a tokenizer, and looking at how text splits."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape
from rich.text import Text

from gen_cli.commands.common import check_writable_output, err, out_console, print_json, progress_enabled, read_text_arg
from gen_cli.commands.options import OUTPUT, Force, InputsArg, Json, Model, Out, Tokenizer
from gen_cli.errors import UsageError
from gen_cli.formats.loading import default_tokenizer_path, model_kind, resolve_tokenizer_path
from gen_cli.text.tokenizer import DEFAULT_VOCAB_SIZE, EOT

TOKENIZE_BYTES = 1 << 20  # `gen tokenize` shows each token: an inspection tool, not a bulk counter

corpus_app = typer.Typer(help="List and print the built-in corpora.", no_args_is_help=True)


@corpus_app.command("list")
def corpus_list(as_json: Json = False) -> None:
    """List the built-in corpora (they ship with Python; nothing is downloaded)."""
    from gen_cli.text.corpus import BUILTIN_CORPORA, Corpus

    rows = []
    for name, about in BUILTIN_CORPORA.items():
        corpus = Corpus([name])
        rows.append({"name": name, "documents": len(corpus.documents), "bytes": corpus.size, "about": about})
    if as_json:
        print_json(rows)
        return
    for row in rows:
        out_console().print(
            f"[bold]{row['name']}[/]  {row['documents']} documents, {row['bytes']:,} bytes: {row['about']}"
        )


@corpus_app.command("show")
def corpus_show(
    name: str = typer.Argument("python-docs", help="Corpus name (see `gen corpus list`), or any input spec."),
    split: str = typer.Option("all", "--split", metavar="SPLIT", help="train, val or all."),
) -> None:
    """Print a corpus's text to stdout, to inspect it or reuse it elsewhere."""
    from gen_cli.text.corpus import Corpus

    for line in Corpus([name]).lines(split):
        sys.stdout.write(line)


def train_tokenizer_command(
    inputs: InputsArg = None,
    vocab_size: int = typer.Option(
        DEFAULT_VOCAB_SIZE, "--vocab-size", help="Vocabulary size, including the 256 byte tokens."
    ),
    min_frequency: int = typer.Option(2, "--min-frequency", help="Ignore merges seen fewer times than this."),
    special_tokens: list[str] = typer.Option([EOT], "--special-token", help="Special token (repeatable)."),
    out: Out = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Train a byte-level BPE tokenizer on text (the built-in python-docs corpus by default).

    Writes tokenizer.json to --out (a file, or a folder to hold it), .gen/tokenizer.json by default.

    The result is a standard tokenizer.json: `tokenizers.Tokenizer.from_file` and
    `transformers.PreTrainedTokenizerFast(tokenizer_file=...)` load it unchanged. Text that happens
    to spell a special token is encoded as ordinary text by gen.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeElapsedColumn, TransferSpeedColumn

    from gen_cli.text.corpus import VAL_FRACTION, Corpus
    from gen_cli.text.tokenizer import save_tokenizer, train_tokenizer

    out = out or default_tokenizer_path()
    if out.is_dir():
        out = out / "tokenizer.json"
    check_writable_output(out, force)
    corpus = Corpus(inputs or [])
    columns = (
        "{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True, disable=not progress_enabled()) as progress:
        task = progress.add_task("reading text", total=int(corpus.size * (1 - VAL_FRACTION)))
        tok, summary = train_tokenizer(
            corpus,
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=tuple(special_tokens),
            on_bytes=lambda n: progress.advance(task, n),
        )
    save_tokenizer(tok, out)
    result = {
        **summary.to_dict(),
        "path": str(out),
        "vocab_size_requested": vocab_size,
        "skipped_files": corpus.skipped,
    }
    notes = []
    if corpus.skipped:
        names = ", ".join(corpus.skipped[:5]) + (
            f" and {len(corpus.skipped) - 5} more" if len(corpus.skipped) > 5 else ""
        )
        notes.append(
            f"skipped {len(corpus.skipped)} binary file(s), compressed ones included (decompress to use them): {names}"
        )
    if summary.vocab_size < vocab_size:
        notes.append(
            f"the vocabulary has {summary.vocab_size:,} tokens, not the {vocab_size:,} asked: this text has no "
            f"more pairs seen at least {min_frequency} times; give more text or a smaller --vocab-size"
        )
    for note in notes:
        err.print(f"[yellow]{escape(note)}[/]")
    if as_json:
        print_json(result)
        return
    bpt = f"{summary.bytes_per_token:.3f}" if summary.bytes_per_token else "n/a (no validation text)"
    err.print(
        f"trained [bold]{summary.vocab_size}[/]-token BPE on {summary.documents} documents, "
        f"{summary.input_bytes:,} bytes in {summary.train_seconds:.2f} s ({summary.throughput_mb_per_s:.2f} MB/s)\n"
        f"validation: {summary.val_bytes:,} bytes → {summary.val_tokens:,} tokens, {bpt} bytes/token\n"
        f"saved {escape(str(out))}"
    )


def tokenize_command(
    text: str = typer.Argument(..., help="Text to split, or '-' to read stdin."),
    tokenizer: Tokenizer = None,
    model: Model = None,
    ids: bool = typer.Option(False, "--ids", help="Print token ids instead of pieces.", rich_help_panel=OUTPUT),
    as_json: Json = False,
) -> None:
    """Show how text splits into tokens: alternating colours in a terminal, '|' separators otherwise.

    --model uses that model's own tokenizer; --tokenizer a tokenizer.json (by default the shipped model's,
    else the one `gen train-tokenizer` wrote).
    """
    from gen_cli.formats.loading import model_tokenizer
    from gen_cli.text.tokenizer import encode, load_tokenizer, token_bytes

    if tokenizer is not None and model is not None:
        raise UsageError("pass either --tokenizer or --model, not both")
    tok = model_tokenizer(model) if model is not None else load_tokenizer(resolve_tokenizer_path(tokenizer))
    if model is not None and model_kind(model) == "gen":
        from gen_cli.formats.checkpoint import check_weights_header, load_config

        check_weights_header(model, load_config(model), tok)  # a swapped tokenizer.json is refused, as generate does
    # Read no more than TOKENIZE_BYTES (the text, its pieces and their display grow ~100x in memory).
    text = read_text_arg(text, TOKENIZE_BYTES, "gen tokenize's limit")
    token_ids = encode(tok, text)
    # A token may hold part of a multi-byte character; show such bytes escaped rather than as U+FFFD.
    pieces = [token_bytes(tok, i).decode("utf-8", errors="backslashreplace") for i in token_ids]
    n_bytes = len(text.encode("utf-8"))
    bpt = n_bytes / len(token_ids) if token_ids else None
    if as_json:
        print_json(
            {
                "ids": token_ids,
                "tokens": pieces,
                "count": len(token_ids),
                "bytes": n_bytes,
                "bytes_per_token": bpt,
            }
        )
        return
    console = out_console()
    if ids:
        console.print(" ".join(map(str, token_ids)))
    elif console.no_color:
        console.print("|".join(pieces), markup=False)
    else:
        shown = Text()
        for n, piece in enumerate(pieces):
            shown.append(piece, style="black on cyan" if n % 2 else "black on yellow")
        console.print(shown)
    err.print(f"{len(token_ids)} tokens, {n_bytes} bytes" + (f", {bpt:.2f} bytes/token" if bpt else ""))


def register(app: typer.Typer) -> None:
    app.add_typer(corpus_app, name="corpus")
    app.command("train-tokenizer")(train_tokenizer_command)
    app.command("tokenize")(tokenize_command)
