"""The `gen` command line: parse, call one library function, render.

No torch import at module level: `gen --help` must stay fast. Each command group lives in
`gen_cli/commands/` and registers itself here; every command is a `GenCommand`, so old flag spellings,
metavars and the layout of `--help` are settled once, here.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from enum import Enum
from typing import Any

import click
import typer
from rich.text import Text
from typer.core import TyperCommand, TyperGroup
from typer.models import DefaultPlaceholder

from gen_cli import __version__, collector
from gen_cli.errors import GenError

_debug_flag = [False]  # this invocation's --debug; set by the root callback on every run

# Old spellings of renamed flags → the one name each thing has now. An old spelling is rewritten (with a
# note on stderr) in any command that takes the new flag and does not declare the old one itself.
RENAMED: dict[str, str] = {
    "--gen-len": "--max-new-tokens",
    "--new-tokens": "--max-new-tokens",
    "--tokens": "--max-new-tokens",  # gen demo's timed runs
    "--batch": "--batch-size",
    "--output": "--out",
}

# Help panels in this order; options outside a panel come last, under "Options".
PANEL_ORDER = ("Arguments", "Model", "Input", "Sampling", "Cache", "Grid", "Quality", "Training", "Output",
               "Performance")  # fmt: skip
# The metavar of an option that names none, by its click type.
METAVARS = {"int": "N", "float": "X", "str": "TEXT"}
HELP_WIDTH = 100  # wider terminals get this; longer lines read badly


def debug_enabled() -> bool:
    return _debug_flag[0] or os.environ.get("GEN_DEBUG", "") not in ("", "0")


def _flags(command: click.Command) -> set[str]:
    """Every long option of a command and its subcommands."""
    found = {o for p in command.params for o in p.opts if o.startswith("--")}
    for sub in getattr(command, "commands", {}).values():
        found |= _flags(sub)
    return found


def _flag_for(name: str, flags: set[str]) -> str | None:
    """The flag a library value name (`gen_len`) stands for in a command, following renames."""
    flag = "--" + name.replace("_", "-")
    if flag in flags:
        return flag
    return RENAMED[flag] if RENAMED.get(flag) in flags else None


def user_message(error: GenError, command: click.Command) -> str:
    """The error's message with each value it names (`max_new_tokens`) shown as its flag (`--max-new-tokens`)."""
    message, flags = str(error), _flags(command)
    for name in error.params:
        if flag := _flag_for(name, flags):
            message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flag, message)
    return message


def renamed_args(command: click.Command, args: list[str]) -> list[str]:
    """`args` with each old flag spelling (RENAMED) replaced by the command's own, a note on stderr for each."""
    declared = {o for p in command.params for o in (*p.opts, *getattr(p, "secondary_opts", ()))}
    takes_value = {o for p in command.params if _takes_value(p) for o in p.opts}
    out, i = list(args), 0
    while i < len(out):
        token = out[i]
        if token == "--":
            break
        name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        new = RENAMED.get(name)
        if new is not None and name not in declared and new in declared:
            click.echo(f"note: {name} is deprecated; use {new}", err=True)
            out[i] = new + eq + value
            name = new
        i += 2 if name in takes_value and not eq else 1  # skip an option's value: it is not a flag
    return out


def _metavar(param: Any) -> str:
    """PATH, N, X, TEXT or the choices: what an option that names no metavar shows after its flag."""
    desc = param.type_descriptor
    if desc.is_choice:
        return "|".join(str(getattr(c, "value", c)) for c in desc.choices or ())
    if desc.is_path:
        return "PATH"
    return METAVARS.get(param.bare_type().removeprefix("list[").removesuffix("]"), "VALUE")


def _takes_value(param: Any) -> bool:
    return param.param_type_name == "option" and not getattr(param, "is_flag", False) and not param.count


def _set_metavars(command: click.Command) -> None:
    """Arguments named in capitals (PROMPT), options that name no metavar given a short one (N, PATH)."""
    for param in command.params:
        if param.param_type_name == "argument":
            param.metavar = param.metavar or (param.name or "").upper()
        elif param.metavar is None and not getattr(param, "is_flag", False):
            param.metavar = _metavar(param)


class GenCommand(TyperCommand):
    """A command with gen's conventions: renamed flags accepted, short uppercase metavars, arguments named
    in capitals, and a `--help` laid out in panels that reads at 80 columns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _set_metavars(self)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, renamed_args(self, args))

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name == "argument":
                name = p.metavar + ("..." if p.nargs != 1 else "")
                pieces.append(name if p.required else f"[{name}]")
        return pieces

    def format_help(self, ctx: click.Context, formatter: Any) -> None:
        _print_help(self, ctx)


class GenGroup(TyperGroup):
    """A command group whose `--help` is laid out as its commands' is."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _set_metavars(self)

    def format_help(self, ctx: click.Context, formatter: Any) -> None:
        rows = []
        for name in self.list_commands(ctx):
            sub = self.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                first = inspect.cleandoc(sub.help or "").split("\n\n")[0].replace("\n", " ").replace("`", "")
                rows.append((Text(name, style="bold cyan"), Text(first)))
        _print_help(self, ctx, [("Commands", rows)])


def _print_help(command: click.Command, ctx: click.Context, extra: list | None = None) -> None:
    """Usage, the description (markdown), then the parameters in panels: two columns, wrapped, never cut."""
    from rich.console import Console  # here, not at import: only --help pays for markdown and tables
    from rich.markdown import Markdown
    from rich.panel import Panel
    from rich.table import Table

    console = Console(width=min(Console().width, HELP_WIDTH), highlight=False)
    console.print(Text("Usage: ", style="yellow") + Text(command.get_usage(ctx).removeprefix("Usage: "), "bold"))
    if command.help:
        console.print()
        console.print(Markdown(inspect.cleandoc(command.help)))
    console.print()
    for title, rows in [*_panels(command, ctx), *(extra or [])]:
        table = Table.grid(padding=(0, 2), expand=True)
        table.add_column(no_wrap=True, max_width=34, overflow="fold")
        table.add_column(ratio=1, overflow="fold")
        for names, text in rows:
            table.add_row(names, text)
        console.print(Panel(table, title=title, title_align="left", border_style="dim"))


def _panels(command: click.Command, ctx: click.Context) -> list[tuple[str, list[tuple[Text, Text]]]]:
    """The help rows (names, help) of every visible parameter, grouped by panel in PANEL_ORDER."""
    panels: dict[str, list[tuple[Text, Text]]] = {}
    for p in command.get_params(ctx):
        if getattr(p, "hidden", False):
            continue
        is_arg = p.param_type_name == "argument"
        panel = getattr(p, "rich_help_panel", None) or ("Arguments" if is_arg else "Options")
        panels.setdefault(panel, []).append((_names(p), _help_text(p, ctx)))

    def rank(name: str) -> int:
        return PANEL_ORDER.index(name) if name in PANEL_ORDER else len(PANEL_ORDER) + (name == "Options")

    return sorted(panels.items(), key=lambda item: rank(item[0]))


def _names(p: Any) -> Text:
    """`-m, --model PATH`, `    --kv-cache/--no-kv-cache`, or an argument's name."""
    if p.param_type_name == "argument":
        return Text(p.metavar + ("..." if p.nargs != 1 else ""), style="bold cyan")
    shorts = [o for o in p.opts if not o.startswith("--")]
    longs = "/".join([o for o in p.opts if o.startswith("--")] + list(p.secondary_opts))
    text = Text(f"{shorts[0]}, " if shorts else "    ", style="bold cyan")
    text.append(longs, style="bold cyan")
    if _takes_value(p):
        text.append(f" {p.metavar}", style="yellow")
    return text


def _help_text(p: Any, ctx: click.Context) -> Text:
    """The parameter's help, then `[default: X]` (or `[required]`): one way for every command."""
    text = Text((p.help or "").replace("\\[", "[").replace("`", ""))  # plain text: no markdown escapes
    default = _default_text(p, ctx)
    if default:
        text.append(f" [default: {default}]", style="dim")
    elif p.required:
        text.append(" [required]", style="dim red")
    return text


def _default_text(p: Any, ctx: click.Context) -> str | None:
    shown = getattr(p, "show_default", None)
    if isinstance(shown, str):
        return shown
    if shown is False or p.required:
        return None
    default = p.get_default(ctx, call=False)
    if callable(default) or default is None:
        return None
    if getattr(p, "is_flag", False):
        if not p.secondary_opts:
            return None  # an off-by-default switch: its absence needs no saying
        return p.opts[0] if default else p.secondary_opts[0]
    if isinstance(default, list | tuple):
        return ",".join(map(str, default)) or None
    return str(default.value if isinstance(default, Enum) else default)


def _use_gen_command(app: typer.Typer) -> None:
    """Make every command of `app` (and of its groups) a GenCommand unless it names its own class."""
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = GenCommand
    for group in app.registered_groups:
        if isinstance(group.cls, DefaultPlaceholder):
            group.cls = GenGroup
        if group.typer_instance is not None:
            _use_gen_command(group.typer_instance)


class _Group(GenGroup):
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
    from gen_cli.commands import (
        attention,
        bench,
        chat,
        compare,
        convert,
        demo,
        export,
        generate,
        info,
        text,
        train,
        widen,
    )

    for module in (text, generate, info, chat, train, compare, convert, widen, export, demo, bench, attention):
        module.register(app)
    from gen_cli.commands import serve  # the HTTP server: `gen serve`

    serve.register(app)
    _use_gen_command(app)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    collector.pause()  # until a model is loaded (gen_cli/collector.py)
    # numpy's OpenBLAS starts a thread per core at import, spinning while it waits for work; gen gives numpy no BLAS
    # work (file I/O only), and on a 2-core machine those threads took 4% of a short command's CPU time.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from gen_cli.runtime import keep_freed_heap

    keep_freed_heap()  # a prompt's activations reuse the heap instead of faulting fresh pages in
    try:
        app(prog_name="gen")
    except KeyboardInterrupt:
        sys.exit(130)
