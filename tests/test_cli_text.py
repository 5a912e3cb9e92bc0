"""The CLI frame and the text commands, through Typer's runner and a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gen_cli.cli import app
from gen_cli.errors import GenError

runner = CliRunner()
CORPUS = "Some ordinary English text about the for statement and the while loop.\n" * 60


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN_HOME", str(tmp_path / "home"))


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


def test_help_does_not_import_torch():
    code = "import sys, gen_cli.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("gen ")


def test_train_tokenizer_json_summary_and_file(tmp_path, corpus_file):
    out = tmp_path / "tok.json"
    result = runner.invoke(
        app, ["train-tokenizer", str(corpus_file), "--vocab-size", "300", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["vocab_size"] == 300 and summary["path"] == str(out)
    assert {
        "documents",
        "input_bytes",
        "train_seconds",
        "throughput_mb_per_s",
        "bytes_per_token",
    } <= summary.keys()
    assert out.is_file() and not list(tmp_path.glob(".tok.json.*"))


def test_train_tokenizer_names_skipped_files_and_a_short_vocabulary(tmp_path):
    import gzip

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(CORPUS)
    (folder / "b.txt.gz").write_bytes(gzip.compress(CORPUS.encode()))
    args = ["train-tokenizer", str(folder), "--vocab-size", "8000", "--out", str(tmp_path / "t.json")]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["skipped_files"] == [str(folder / "b.txt.gz")]
    assert summary["vocab_size"] < summary["vocab_size_requested"] == 8000
    stderr = " ".join(result.stderr.split())
    assert "skipped 1 binary file" in stderr and "b.txt.gz" in "".join(stderr.split())  # a long path may wrap
    assert "not the 8,000 asked" in stderr


def test_train_tokenizer_refuses_existing_output_without_force(tmp_path, corpus_file):
    out = tmp_path / "tok.json"
    out.write_text("precious")
    args = ["train-tokenizer", str(corpus_file), "--vocab-size", "300", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--force" in result.stderr
    assert out.read_text() == "precious"
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    assert out.read_text() != "precious"


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (lambda p: None, ["/definitely/missing"], "no such file"),
        (lambda p: (p / "emptydir").mkdir(), ["{p}/emptydir"], "no text files"),
        (lambda p: (p / "e.txt").write_text(""), ["{p}/e.txt"], "empty"),
        (lambda p: (p / "b.bin").write_bytes(b"\0\1\2"), ["{p}/b.bin"], "binary"),
        (lambda p: (p / "l.txt").write_bytes(b"caf\xe9\n"), ["{p}/l.txt"], "not valid UTF-8"),
        (lambda p: (p / "c.txt").write_text(CORPUS), ["{p}/c.txt", "--vocab-size", "100"], "too small"),
        (
            lambda p: (p / "c.txt").write_text(CORPUS),
            ["{p}/c.txt", "--out", "/proc/nope/tok.json"],
            "cannot write",
        ),
        (
            lambda p: (p / "c.txt").write_text(CORPUS),
            ["{p}/c.txt", "--out", "{p}/c.txt/tok.json"],
            "is a file, not a folder",
        ),
    ],
)
def test_bad_input_gives_one_clear_line_and_writes_nothing(tmp_path, setup, args, message):
    setup(tmp_path)
    out = tmp_path / "out" / "tok.json"
    args = [a.format(p=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(out)]
    result = runner.invoke(app, ["train-tokenizer", *args])
    assert result.exit_code != 0
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) <= 2
    assert not out.exists()


def test_tokenize_plain_ids_and_json(tmp_path, corpus_file):
    tok = tmp_path / "tok.json"
    runner.invoke(app, ["train-tokenizer", str(corpus_file), "--vocab-size", "300", "--out", str(tok)])
    text = "the for loop 🌍"
    plain = runner.invoke(app, ["tokenize", text, "--tokenizer", str(tok)])
    assert plain.exit_code == 0
    assert "|" in plain.stdout and "\x1b[" not in plain.stdout  # not a terminal: plain separators
    assert "tokens" in plain.stderr
    data = json.loads(runner.invoke(app, ["tokenize", text, "--tokenizer", str(tok), "--json"]).stdout)
    assert data["count"] == len(data["ids"]) == len(data["tokens"])
    assert data["bytes"] == len(text.encode())
    ids = runner.invoke(app, ["tokenize", text, "--tokenizer", str(tok), "--ids"]).stdout.split()
    assert list(map(int, ids)) == data["ids"]


def test_tokenize_without_any_tokenizer_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr("gen_cli.formats.loading.default_model_dir", lambda: tmp_path / "none")
    result = runner.invoke(app, ["tokenize", "hi"])
    assert result.exit_code == 2 and "gen train-tokenizer" in result.stderr


def test_corpus_list_and_show_split():
    listing = json.loads(runner.invoke(app, ["corpus", "list", "--json"]).stdout)
    assert listing[0]["name"] == "python-docs" and listing[0]["bytes"] > 1_000_000
    val = runner.invoke(app, ["corpus", "show", "python-docs", "--split", "val"]).stdout
    assert 0.07 < len(val.encode()) / listing[0]["bytes"] < 0.12


def test_debug_shows_traceback_for_that_invocation_only():
    result = runner.invoke(app, ["--debug", "train-tokenizer", "/definitely/missing"])
    assert result.exception is not None and "no such file" in str(result.exception)
    after = runner.invoke(app, ["train-tokenizer", "/definitely/missing"])  # the same process, no --debug
    assert after.exit_code != 0 and "error:" in after.stderr and not isinstance(after.exception, GenError)


@settings(max_examples=25, deadline=None)
@given(vocab=st.integers(min_value=-5, max_value=256))
def test_any_impossible_vocab_size_is_a_usage_error(tmp_path_factory, vocab):
    path = tmp_path_factory.mktemp("v") / "c.txt"
    path.write_text(CORPUS)
    result = runner.invoke(
        app, ["train-tokenizer", str(path), "--vocab-size", str(vocab), "--out", str(path.parent / "t.json")]
    )
    assert result.exit_code == 2 and "--vocab-size" in result.stderr
