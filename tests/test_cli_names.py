"""One name for each thing on the command line: shared options declared once, old spellings still
accepted with a note, `--help` that reads at 80 columns, the same exit code for the same bad input."""

from __future__ import annotations

import re
import typing

import pytest
import typer
from typer.testing import CliRunner

from gen_cli import cli
from gen_cli.cli import RENAMED, app, renamed_args
from gen_cli.commands import options

runner = CliRunner()
ROOT = typer.main.get_command(app)


def _commands(group=ROOT, prefix=""):
    """(name, click command) for every leaf command, `bench decode` style names."""
    for name, sub in group.commands.items():
        full = f"{prefix}{name}"
        if hasattr(sub, "commands"):
            yield from _commands(sub, full + " ")
        else:
            yield full, sub


COMMANDS = dict(_commands())
GROUPS = ["", "corpus", "bench"]


def _shared() -> dict[str, typer.models.OptionInfo]:
    """Each flag options.py declares → its declaration."""
    found = {}
    for value in vars(options).values():
        if typing.get_origin(value) is typing.Annotated:
            info = value.__metadata__[0]
            if isinstance(info, typer.models.OptionInfo):
                for decl in (info.default, *info.param_decls):
                    for flag in str(decl).split("/"):
                        if flag.startswith("--"):
                            found[flag] = info
    return found


def _long(param) -> list[str]:
    return [o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")]


def test_every_command_of_ours_takes_a_shared_option_as_options_py_declares_it():
    shared = _shared()
    assert {"--model", "--max-new-tokens", "--out", "--batch-size", "--device", "--json", "--kv-dtype"} <= set(shared)
    checked = 0
    for name, command in COMMANDS.items():
        for p in command.params:
            for flag in _long(p):
                if flag in shared and p.metavar != "LIST":  # a comma list of the values (compare's axes) says so
                    assert p.help == shared[flag].help, (name, flag, p.help)
                    checked += 1
    assert checked > 100


@pytest.mark.parametrize(
    "name", ["tokenize", "info", "eval", "export", "convert", "compare", "attention", "generate", "chat", "demo",
             "bench decode"],
)  # fmt: skip
def test_a_command_that_takes_a_model_takes_dash_m_and_model(name):
    (model,) = [p for p in COMMANDS[name].params if "--model" in p.opts]
    assert "-m" in model.opts


def test_each_name_means_one_thing_and_device_defaults_to_auto():
    for name, command in COMMANDS.items():
        for p in command.params:
            if "--device" in p.opts:
                assert p.default == "auto", name
            assert not set(RENAMED) & set(p.opts), (name, p.opts)
            for short, flag in (("-o", "--out"), ("-n", "--max-new-tokens"), ("-m", "--model")):
                assert (short in p.opts) == (flag in p.opts), (name, p.opts)  # both, or neither


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_an_old_spelling_is_rewritten_with_a_note(old, capsys):
    new = RENAMED[old]
    one = typer.Typer()

    @one.command()
    def run(value: str = typer.Option(None, new), k: str = typer.Option(None, "--k")) -> None:
        """A command that takes the new spelling only."""

    command = typer.main.get_command(one)
    assert renamed_args(command, [old, "5", "--k", old, f"{old}=7", "--", old]) == [
        new, "5", "--k", old, f"{new}=7", "--", old,
    ]  # fmt: skip
    assert capsys.readouterr().err.splitlines() == [f"note: {old} is deprecated; use {new}"] * 2


def test_an_old_spelling_a_command_still_declares_is_left_alone(capsys):
    one = typer.Typer()

    @one.command()
    def run(tokens: str = typer.Option(None, "--tokens"), new: str = typer.Option(None, "--max-new-tokens")) -> None:
        """A command that takes an old spelling as a flag of its own."""

    command = typer.main.get_command(one)
    assert renamed_args(command, ["--tokens", "4", "--new-tokens", "5"]) == ["--tokens", "4", "--max-new-tokens", "5"]
    assert capsys.readouterr().err == "note: --new-tokens is deprecated; use --max-new-tokens\n"


@pytest.mark.parametrize(
    ("argv", "old"),
    [(["bench", "decode", "--new-tokens", "1"], "--new-tokens"), (["bench", "contention", "--new-tokens", "1"],
     "--new-tokens"), (["demo", "--tokens", "1"], "--tokens"), (["generate", "hi", "--gen-len", "0"], "--gen-len")],
)  # fmt: skip
def test_the_renamed_token_counts_are_rewritten_in_each_command_that_counts_tokens(argv, old):
    result = runner.invoke(app, argv)  # every count is refused before a model is read
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[0] == f"note: {old} is deprecated; use --max-new-tokens"
    assert "--max-new-tokens must be at least" in result.stderr.splitlines()[-1], result.output


def test_compare_takes_its_old_spellings_end_to_end(tmp_path, monkeypatch):
    from gen_cli.commands import compare

    monkeypatch.setattr(compare, "_run", lambda *a: pytest.fail("the grid ran"))
    out = str(tmp_path / "o.json")
    argv = ["compare", "--preset", "tiny", "--gen-len", "2", "--batch", "1,10000000", "--output", out,
            "--attention", "mha", "--pos", "rope", "--repeats", "1", "--in-process"]  # fmt: skip
    result = runner.invoke(app, argv)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert lines[:3] == [
        "note: --gen-len is deprecated; use --max-new-tokens",
        "note: --batch is deprecated; use --batch-size",
        "note: --output is deprecated; use --out",
    ]
    assert "use a smaller --batch-size or shorter --prompt-len / --max-new-tokens" in lines[3]
    result = runner.invoke(app, ["compare", "--preset", "tiny", "--gen-len", "1", "--in-process"])
    assert result.exit_code == 2 and "--max-new-tokens" in result.stderr.splitlines()[-1], result.output


def test_a_library_value_name_is_shown_as_the_renamed_flag():
    from gen_cli.errors import UsageError

    error = UsageError("gen_len must be at least 2", params=("gen_len",))
    assert cli.user_message(error, COMMANDS["compare"]) == "--max-new-tokens must be at least 2"


def _help(argv: list[str]) -> str:
    result = runner.invoke(app, [*argv, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("name", [*GROUPS, *COMMANDS])
def test_help_reads_at_80_columns(name):
    text = _help(name.split())
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, name
    cut = [line for line in lines if re.search(r"…\s*│?\s*$", line)]
    assert not cut, cut  # a description cut short
    assert not re.search(r"<(bool|str|int|float|path|list\[\w+\])>", text), name  # typer's type metavars
    usage = lines[0]
    assert usage.startswith("Usage: ") and "{" not in usage, usage
    assert not re.search(r"\[[a-z_]+\]", usage), usage  # arguments in capitals: [PROMPT], not [prompt]


def test_help_groups_options_in_panels_and_shows_defaults_one_way():
    text = _help(["compare"])
    for panel in ("Model", "Grid", "Output", "Performance"):
        assert f"╭─ {panel} " in text
    assert "[default: auto]" in text and "-o, --out PATH" in text and "-n, --max-new-tokens LIST" in text
    for name, command in COMMANDS.items():
        for p in command.params:  # a default is declared, never written into the help text
            assert not re.search(r"[\[(]default|\[[^\]]*\]\.?$", p.help or ""), (name, p.help)


def test_invalid_utf8_exits_2_from_a_file_and_from_stdin(tmp_path):
    bad = b"ok\n\xff\n"
    (tmp_path / "bad.txt").write_bytes(bad)
    out = ["--out", str(tmp_path / "t.json")]
    from_file = runner.invoke(app, ["train-tokenizer", str(tmp_path / "bad.txt"), *out])
    from_stdin = runner.invoke(app, ["train-tokenizer", "-", *out], input=bad)
    assert (from_file.exit_code, from_stdin.exit_code) == (2, 2), (from_file.output, from_stdin.output)
    assert "bad.txt: line 2 is not valid UTF-8" in from_file.stderr
    assert "<stdin>: line 2 is not valid UTF-8" in from_stdin.stderr


def test_a_text_only_stdin_with_bad_bytes_is_refused_not_a_traceback(monkeypatch):
    import io

    from gen_cli.commands.common import read_text_arg
    from gen_cli.errors import UsageError

    monkeypatch.setattr("sys.stdin", io.StringIO("ab\udcffcd"))  # no .buffer: bad bytes as lone surrogates
    with pytest.raises(UsageError, match=r"text on stdin is not valid UTF-8 \(byte 0xff at offset 2\)"):
        read_text_arg("-")


def test_eval_says_a_file_given_as_the_model_is_a_file(tmp_path):
    text = tmp_path / "prompt.txt"
    text.write_text("hello\n")
    result = runner.invoke(app, ["eval", str(text)])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert f"{text} is a file, not a model" in line and f"gen eval MODEL {text}" in line, line
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "missing: no such file or folder" in result.stderr, result.output


def test_eval_takes_the_model_as_an_option_or_first(tmp_path, monkeypatch):
    from gen_cli.train import evaluate

    model = tmp_path / "m"
    model.mkdir()
    seen = []

    def fake(model_dir, inputs, *rest):
        seen.append((model_dir, inputs))
        raise typer.Exit(0)

    monkeypatch.setattr(evaluate, "evaluate_model", fake)
    for argv in (["eval", "--model", str(model), "a.txt", "b.txt"], ["eval", str(model), "a.txt", "b.txt"],
                 ["eval", "-m", str(model), "a.txt", "b.txt"]):  # fmt: skip
        assert runner.invoke(app, argv).exit_code == 0
    assert seen == [(model, ["a.txt", "b.txt"])] * 3
    both = runner.invoke(app, ["eval", str(model), "--model", str(model)])
    assert both.exit_code == 0 and seen[-1] == (model, [str(model)])  # with --model, positionals are text
