"""Every `gen …` example in README.md: each names a real command and real options, and the cheap ones
run for real, in order, in a scratch folder (so the README cannot drift from the tool)."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gen_cli.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"
runner = CliRunner()


def examples() -> list[list[str]]:
    """The argv after `gen` of every gen command line in the README's code blocks (pipes and comments cut)."""
    found = []
    for block in re.findall(r"```\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S):
        for line in block.splitlines():
            for part in line.split(" | "):
                if not part.lstrip().startswith("gen "):
                    continue  # prose in a block (the code map) is not shell
                words = shlex.split(part, comments=True)
                if words[:1] == ["gen"]:
                    found.append(words[1 : words.index("<")] if "<" in words else words[1:])
    return found


def _command(argv: list[str]) -> tuple[object, list[str]]:
    """The click command an argv names, and the rest of the argv."""
    command = typer.main.get_command(app)
    while argv and hasattr(command, "commands") and argv[0] in command.commands:
        command, argv = command.commands[argv[0]], argv[1:]
    return command, argv


EXAMPLES = examples()


def test_the_readme_has_examples_of_every_command():
    named = {argv[0] for argv in EXAMPLES}
    assert {"generate", "train", "eval", "compare", "bench", "train-tokenizer", "tokenize"} <= named


@pytest.mark.parametrize("argv", EXAMPLES, ids=[" ".join(a)[:60] for a in EXAMPLES])
def test_every_example_names_real_options(argv):
    command, rest = _command(argv)
    assert not hasattr(command, "commands"), f"gen {' '.join(argv)}: names a group, not a command"
    options = {o for p in command.params for o in (*p.opts, *getattr(p, "secondary_opts", ()))}
    for word in rest:
        if word.startswith("--"):
            assert word.split("=")[0] in options, f"gen {' '.join(argv)}: no option {word}"


CHEAP = ("corpus", "info", "train-tokenizer", "tokenize")


def test_cheap_examples_run_in_order(tmp_path, monkeypatch):
    """corpus, info and the tokenizer examples, in README order, in a scratch folder with the files they name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GEN_HOME", str(tmp_path / ".gen"))
    text = "The for statement loops over items. Keys and values are cached per layer.\n" * 200
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text(text)
    (tmp_path / "papers").mkdir()
    (tmp_path / "papers" / "b.txt").write_text(text)
    (tmp_path / "book.txt").write_text(text)
    (tmp_path / "prompt.txt").write_text("The for statement")
    ran = 0
    for argv in EXAMPLES:
        if argv[0] not in CHEAP or argv[:2] == ["corpus", "show"]:
            continue
        if any(arg.startswith("~") for arg in argv):
            continue  # a model of the reader's own (test_hf_models and test_gguf load such files)
        stdin = (tmp_path / ("book.txt" if argv[0] == "train-tokenizer" else "prompt.txt")).read_text()
        if argv[:2] == ["tokenize", "-"] and "--tokenizer" not in argv:
            argv = [*argv, "--tokenizer", "my-tok.json"]  # the README's tokenizer from two lines above
        result = runner.invoke(app, argv, input=stdin if "-" in argv else None)
        assert result.exit_code == 0, f"gen {' '.join(argv)}:\n{result.output}"
        ran += 1
    assert ran >= 7


def test_compare_examples_pass_validation(monkeypatch):
    """Each compare example's grid is accepted (the grid itself is not run: minutes each)."""
    from gen_cli.lab import compare

    class Validated(Exception):
        pass

    def stop(*args, **kwargs):
        raise Validated

    monkeypatch.setattr(compare, "run_grid", stop)
    for argv in EXAMPLES:
        if argv[0] != "compare":
            continue
        if "--plot" in argv and importlib.util.find_spec("matplotlib") is None:  # the README installs it first
            i = argv.index("--plot")
            argv = argv[:i] + argv[i + 2 :]
        result = runner.invoke(app, argv)
        assert isinstance(result.exception, Validated), f"gen {' '.join(argv)}:\n{result.output}"
