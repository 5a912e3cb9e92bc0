"""Every `gen …` example in README.md and docs/*.md names a real command and real options, and the
examples run as written, in order, from an empty folder (so the docs cannot drift from the tool).

How a document marks its examples (the rules the docs follow):
- Shell examples sit in fenced blocks opened by ``` or ```sh (a line ending in a backslash goes on on
  the next); other fences (```text for sample output) are not shell and are skipped.
- Every line of every shell block is option-checked: each `gen …` (or `./gen …`, or `NAME=value gen …`)
  segment must name a command and only options it has.
- The blocks of one document run in order in a fresh folder (cwd and GEN_HOME=.gen there; models/ is
  the checkout's, as in a fresh clone; .gen/cache, derived files only, is shared between documents):
  lines without gen run in bash; gen lines run in this process, with bash expanding their words,
  `< FILE` or `cmd |` as stdin and `> FILE` writing stdout; a consumer after `|` (head, jq) is for the
  eye and is not run. Each must succeed.
- `<!-- not run: REASON -->` on the line before a block keeps it from running (a model of the
  reader's own, minutes of work, a GPU, another tool): it is still option-checked.
- `<!-- stand-in -->` before a block runs it with every ~/models/NAME in STAND_INS replaced by a tiny
  model this test builds (an instruct model with a chat template, which gen's own models lack).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from conftest import copy_kernel_into
from typer.testing import CliRunner

from gen_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
runner = CliRunner()
FENCE = re.compile(r"(?:<!--\s*(?P<mark>not run|stand-in)\b[^>]*-->\s*\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)
ENV = r"(?:[A-Z_]+=\S*\s+)*"  # NAME=value words before a command
GEN = re.compile(rf"^{ENV}(?:\./)?gen\s")


@dataclass
class Block:
    doc: str
    mark: str | None  # None (runs), "not run" or "stand-in"
    lines: list[str]


def blocks(doc: Path) -> list[Block]:
    """The shell blocks of one document, in order."""
    found = []
    for m in FENCE.finditer(doc.read_text(encoding="utf-8")):
        if m["lang"] in ("", "sh"):
            body = re.sub(r"\s*\\\n\s*", " ", m["body"])  # a line ending in \ goes on on the next
            lines = [line for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]
            found.append(Block(doc.relative_to(ROOT).as_posix(), m["mark"], lines))
    return found


def gen_argv(segment: str) -> list[str] | None:
    """The argv after `gen` of one pipe segment, redirections and comments cut (None: not a gen command)."""
    segment = segment.strip()
    if not GEN.match(segment):
        return None
    words = shlex.split(re.sub(rf"^{ENV}", "", segment), comments=True)
    for op in ("<", ">"):
        if op in words:
            words = words[: words.index(op)]
    return words[1:]


ALL = [(b, line) for doc in DOCS for b in blocks(doc) for line in b.lines]
EXAMPLES = [argv for _, line in ALL for part in line.split(" | ") if (argv := gen_argv(part)) is not None]


def _command(argv: list[str]) -> tuple[object, list[str]]:
    """The click command an argv names, and the rest of the argv."""
    command = typer.main.get_command(app)
    while argv and hasattr(command, "commands") and argv[0] in command.commands:
        command, argv = command.commands[argv[0]], argv[1:]
    return command, argv


def test_the_docs_have_examples_of_every_command():
    named = {argv[0] for argv in EXAMPLES}
    assert set(typer.main.get_command(app).commands) <= named


def test_the_readme_starts_with_a_runnable_first_example():
    """The README's first shell block after set-up runs (no marker): what a newcomer pastes first works."""
    readme = blocks(ROOT / "README.md")
    first_gen = next(b for b in readme if any(GEN.match(line) for line in b.lines))
    assert first_gen.mark is None, first_gen.lines


@pytest.mark.parametrize("argv", EXAMPLES, ids=[" ".join(a)[:60] for a in EXAMPLES])
def test_every_example_names_real_options(argv):
    command, rest = _command(argv)
    assert not hasattr(command, "commands"), f"gen {' '.join(argv)}: names a group, not a command"
    options = {o for p in command.params for o in (*p.opts, *getattr(p, "secondary_opts", ()))}
    for word in rest:
        if word.startswith("--") or re.fullmatch(r"-[A-Za-z]", word):
            assert word.split("=")[0] in options, f"gen {' '.join(argv)}: no option {word}"


def _instruct_model(directory: Path) -> None:
    """A tiny random instruct model (ChatML tokens and template) where the docs name the reader's own."""
    pytest.importorskip("transformers")
    from hf_builders import write_chatml_model

    write_chatml_model(directory)


STAND_INS = {"~/models/SmolLM2-135M-Instruct": _instruct_model}


def _bash(command: str, cwd: Path, stdin: str | None = None) -> str:
    done = subprocess.run(["bash", "-c", command], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{command}:\n{done.stderr}"
    return done.stdout


def _run_line(line: str, cwd: Path) -> None:
    """One example line: bash for shell, this process for gen (bash expands its words)."""
    parts = line.split(" | ")
    at = next((i for i, part in enumerate(parts) if GEN.match(part.strip())), None)
    if at is None:
        _bash(line, cwd)
        return
    stdin = _bash(" | ".join(parts[:at]), cwd) if at else None
    segment = re.sub(r"\s#.*$", "", parts[at].strip())
    out_file = None
    if m := re.search(r"\s>\s*(\S+)$", segment):
        segment, out_file = segment[: m.start()], m[1]
    if m := re.search(r"\s<\s*(\S+)$", segment):
        segment, stdin = segment[: m.start()], (cwd / m[1]).read_text(encoding="utf-8")
    env = dict(re.findall(r"([A-Z_]+)=(\S*)\s+", re.match(ENV, segment)[0]))
    words = _bash("printf '%s\\0' " + re.sub(rf"^{ENV}(\./)?gen\s", "", segment), cwd).split("\0")[:-1]
    result = runner.invoke(app, words, input=stdin, env=env)
    assert result.exit_code == 0, f"{line}\n{result.output}\n{result.exception!r}"
    if out_file:
        (cwd / out_file).write_text(result.stdout, encoding="utf-8")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory, default_kernel) -> Path:
    """.gen/cache for every document's folder: derived files only (kernel, corpus, token files)."""
    cache = tmp_path_factory.mktemp("gen-cache")
    if default_kernel is not None:  # as after a reader's first run: the examples run, not a 20 s kernel build
        copy_kernel_into(default_kernel, cache / "kernels")
    return cache


RUNNABLE = [doc for doc in DOCS if any(b.mark != "not run" for b in blocks(doc))]


@pytest.mark.parametrize("doc", RUNNABLE, ids=[d.relative_to(ROOT).as_posix() for d in RUNNABLE])
def test_examples_run_in_order_from_an_empty_folder(doc, tmp_path, monkeypatch, shared_cache):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GEN_HOME", str(tmp_path / ".gen"))
    (tmp_path / "models").symlink_to(ROOT / "models")  # a fresh clone has models/
    (tmp_path / ".gen").mkdir()
    (tmp_path / ".gen" / "cache").symlink_to(shared_cache, target_is_directory=True)
    ran = 0
    for block in blocks(doc):
        if block.mark == "not run":
            continue
        for line in block.lines:
            if block.mark == "stand-in":
                for name, build in STAND_INS.items():
                    if name in line:
                        local = tmp_path / "stand-ins" / Path(name).name
                        if not local.exists():
                            local.mkdir(parents=True)
                            build(local)
                        line = line.replace(name, str(local))
            assert "~/" not in line, f"{block.doc}: mark a block that needs the reader's own files: {line}"
            _run_line(line, tmp_path)
            ran += 1
    assert ran, f"{doc.name}: no example ran"


def test_compare_examples_pass_validation(monkeypatch):
    """Each compare example's grid is accepted (the grid itself is not run: minutes each)."""
    from gen_cli.lab import compare

    class Validated(Exception):
        pass

    def stop(*args, **kwargs):
        raise Validated

    monkeypatch.setattr(compare, "run_grid", stop)
    for argv in EXAMPLES:
        if argv[0] != "compare" or any(a.startswith("~") for a in argv) or {"--speculate", "--act"} & set(argv):
            continue  # these axes measure on the model instead of a grid (they run in the docs' examples)
        if "--plot" in argv and importlib.util.find_spec("matplotlib") is None:  # the docs install it first
            i = argv.index("--plot")
            argv = argv[:i] + argv[i + 2 :]
        result = runner.invoke(app, argv)
        assert isinstance(result.exception, Validated), f"gen {' '.join(argv)}:\n{result.output}"
