"""The `gen` command line: parse, call one library function, render.

No torch import at module level: `gen --help` must stay fast. Each command group lives in
`gen_cli/commands/` and registers itself here.
"""

from __future__ import annotations

import os
import re
import sys

import click
import typer
from typer.core import TyperGroup

from gen_cli import __version__
from gen_cli.errors import GenError

_debug_flag = [False]  # this invocation's --debug; set by the root callback on every run


def debug_enabled() -> bool:
    return _debug_flag[0] or os.environ.get("GEN_DEBUG", "") not in ("", "0")


def _flags(command: click.Command) -> set[str]:
    """Every long option of a command and its subcommands."""
    found = {o for p in command.params for o in p.opts if o.startswith("--")}
    for sub in getattr(command, "commands", {}).values():
        found |= _flags(sub)
    return found


def user_message(error: GenError, command: click.Command) -> str:
    """The error's message with each value it names (`max_new_tokens`) shown as its flag (`--max-new-tokens`)."""
    message, flags = str(error), _flags(command)
    for name in error.params:
        flag = "--" + name.replace("_", "-")
        if flag in flags:
            message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flag, message)
    return message


class _Group(TyperGroup):
    """Turns GenError into a one-line message and exit code; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GenError as e:
            if debug_enabled():
                raise
            invoked = self.commands.get(ctx.invoked_subcommand or "", self)
            click.echo(f"error: {user_message(e, invoked)}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            click.echo("interrupted", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_Group,
    help="gen: train a byte-level BPE tokenizer and a small transformer, then generate and measure "
    "what KV caching, MHA/MQA/GQA and RoPE/sinusoidal positions cost and save.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (or set GEN_DEBUG=1)."),
) -> None:
    _debug_flag[0] = debug  # not os.environ: one invocation's flag must not outlive it


def _register_commands() -> None:
    from gen_cli.commands import attention, bench, chat, compare, convert, demo, export, generate, info, text, train

    for module in (text, generate, info, chat, train, compare, convert, export, demo, bench, attention):
        module.register(app)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
