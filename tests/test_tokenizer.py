"""Tokenizer training, losslessness, special-token handling and compatibility."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from gen_cli.errors import GenError, UsageError
from gen_cli.text.corpus import Corpus
from gen_cli.text.tokenizer import (
    EOT,
    decode,
    encode,
    load_tokenizer,
    save_tokenizer,
    token_bytes,
    train_tokenizer,
)

SAMPLE = (
    "The for statement is used to iterate over the elements of a sequence.\n"
    "Unicode: naïve café, 日本語のテキスト, emoji 🌍🚀, combining e\u0301.\n"
) * 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "corpus.txt"
    path.write_text(SAMPLE)
    tok, summary = train_tokenizer(Corpus([str(path)]), vocab_size=300)
    return tok, summary


def test_summary_figures_are_consistent(trained, tmp_path):
    tok, summary = trained
    assert summary.vocab_size == tok.get_vocab_size() == 300
    assert summary.documents == 1
    # Recount the validation split here, line by line, rather than restate the summary's own formula.
    (tmp_path / "corpus.txt").write_text(SAMPLE)  # the split depends only on the text
    val_lines = list(Corpus([str(tmp_path / "corpus.txt")]).lines("val"))
    assert summary.val_bytes == sum(len(line.encode()) for line in val_lines) > 0
    assert summary.input_bytes == len(SAMPLE.encode()) - summary.val_bytes  # trained on the rest, all of it
    assert summary.val_tokens == sum(len(encode(tok, line)) for line in val_lines) > 0
    assert summary.bytes_per_token > 1.5  # merges were learned: better than one byte per token


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_round_trip_is_lossless_for_any_text(trained, text):
    tok, _ = trained
    assert decode(tok, encode(tok, text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "  leading and trailing  ",
        "\t\r\n\x00\x1b[0m",
        "🌍" * 30,
        "x" * 5000,
        "a\u0301\u0302",
        "<|endoftext",
    ],
)
def test_round_trip_edge_cases(trained, text):
    tok, _ = trained
    assert decode(tok, encode(tok, text)) == text


def test_special_token_spelling_in_text_stays_text(trained):
    tok, _ = trained
    eot = tok.token_to_id(EOT)
    ids = encode(tok, f"before {EOT} after")
    assert eot not in ids
    assert b"".join(token_bytes(tok, i) for i in ids) == f"before {EOT} after".encode()


def test_saved_file_loads_with_plain_tokenizers(trained, tmp_path):
    tok, _ = trained
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    plain = Tokenizer.from_file(str(path))
    text = "The for statement 🌍"
    assert plain.decode(plain.encode(text).ids) == text
    assert plain.encode(text).ids == encode(load_tokenizer(path), text)
    assert json.loads(path.read_text())["model"]["type"] == "BPE"


def test_training_never_merges_across_documents(tmp_path):
    # Each file lacks a final newline, and its training split ends mid-file: the tail of one and the
    # head of the next must not be seen as one word.
    for i in range(200):
        (tmp_path / f"{i:03}.txt").write_text("begin xyz words\n" * 3 + "some end")
    tok, _ = train_tokenizer(Corpus([str(tmp_path)]), vocab_size=300)
    assert not [t for t in tok.get_vocab() if "endbegin" in t]


def test_too_small_vocab_is_refused(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(SAMPLE)
    with pytest.raises(UsageError, match="at least 257"):
        train_tokenizer(Corpus([str(path)]), vocab_size=200)


def test_load_errors(tmp_path):
    with pytest.raises(UsageError, match="no tokenizer file"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GenError, match=r"not a valid tokenizer\.json"):
        load_tokenizer(bad)


def test_bench_tokenizer_refuses_zero_repeats_before_any_run():
    from typer.testing import CliRunner

    from gen_cli.cli import app

    result = CliRunner().invoke(app, ["bench", "tokenizer", "--repeats", "0", "--json"])
    assert result.exit_code == 2 and "--repeats must be at least 1, got 0" in result.stderr, result.output
