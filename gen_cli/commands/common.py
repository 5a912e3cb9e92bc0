"""Helpers shared by the CLI commands: consoles, JSON output, common option checks."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

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


def read_text_arg(text: str) -> str:
    """A text argument, or all of stdin when it is '-'."""
    return sys.stdin.read() if text == "-" else text


def progress_enabled() -> bool:
    """Live progress only when a person is watching stderr."""
    return sys.stderr.isatty()
