"""Helpers shared by the CLI commands: consoles, JSON output, common option checks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from gen_cli.errors import GenError, UsageError

# Messages, progress and stats go to stderr; generated text and machine-readable data to stdout.
err = Console(stderr=True, highlight=False)


def out_console() -> Console:
    """A console on stdout; plain (no colour) when stdout is not a terminal or NO_COLOR is set."""
    tty = sys.stdout.isatty()
    # Piped tables keep their full width instead of Rich's 80-column default for non-terminals.
    return Console(
        no_color=not tty or "NO_COLOR" in os.environ, highlight=False, soft_wrap=True, width=None if tty else 200
    )


def print_json(data: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def read_text_arg(
    text: str, max_bytes: int | None = None, why: str = "more than the model's context could hold"
) -> str:
    """A text argument, or stdin when it is '-': valid UTF-8 and, when `max_bytes` is given, at most that
    long (stdin is read no further, so a huge input is refused without being held in memory); `why` says
    where the limit comes from."""
    if text == "-":
        stream = getattr(sys.stdin, "buffer", None)
        if stream is not None:
            data = stream.read(-1 if max_bytes is None else max_bytes + 1)
        else:  # a text-only stdin: its undecodable bytes arrive as lone surrogates, refused below as bytes
            data = sys.stdin.read().encode("utf-8", "surrogateescape")
        where = "the text on stdin"
    else:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # undecodable argv bytes arrive as lone surrogates
            data = text.encode("utf-8", "surrogateescape")
        where = "the text argument"
    if max_bytes is not None and len(data) > max_bytes:
        raise UsageError(f"{where} is over {max_bytes:,} bytes, {why}; shorten it")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{where} is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start})") from None


def read_line(max_bytes: int, why: str) -> str | None:
    """The next line of stdin without its line ending, None at its end: bytes decoded as UTF-8 here, the
    same under every locale and PYTHONIOENCODING, and never more than `max_bytes` read for one line."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is not None:
        raw = stream.readline(max_bytes + 1)
    else:  # a text-only stdin (tests): its undecodable bytes arrive as lone surrogates, refused below as bytes
        raw = sys.stdin.readline(max_bytes + 1).encode("utf-8", "surrogateescape")
    if raw == b"":
        return None
    if len(raw.rstrip(b"\r\n")) > max_bytes:
        raise UsageError(f"a line on stdin is over {max_bytes:,} bytes, {why}; shorten it")
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise UsageError(f"a line on stdin is not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None


def progress_enabled() -> bool:
    """Live progress only when a person is watching stderr."""
    return sys.stderr.isatty()


def check_writable_output(path: Path, force: bool) -> None:
    """Refuse, before any work, an output file that could not be written: a folder, something not a regular
    file, an existing file (unless `force`) or one we may not write, a path under a file, a folder we cannot
    create or write into."""
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a file name")
    if path.exists() and not path.is_file():  # reading a FIFO or a device would block or never end
        raise UsageError(f"{path} is not a regular file (a FIFO, device or socket); give a file name")
    if path.exists() and not force:
        raise UsageError(f"{path} already exists; pass --force to overwrite it")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{path} is not writable")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise GenError(f"cannot write {path}: {parent} is not writable")
