"""Corpus sources and the train/validation split."""

from __future__ import annotations

import ast
import inspect
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gen_cli.errors import GenError, UsageError
from gen_cli.text.corpus import _DOCUMENTED, VAL_FRACTION, Corpus, _text_document, _walk_blocks


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN_HOME", str(tmp_path / "home"))


def test_builtin_corpus_is_deterministic_and_about_ten_percent_validation():
    a, b = Corpus(), Corpus()
    assert [d.name for d in a.documents] == [d.name for d in b.documents]
    assert a.documents[0].name.startswith("topics/")
    assert any(d.name.startswith("docstrings/") for d in a.documents)
    train = sum(len(t.encode()) for t in a.texts("train"))
    val = sum(len(t.encode()) for t in a.texts("val"))
    assert train + val == a.size > 1_000_000
    assert 0.07 < val / a.size < 0.12


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=40), max_size=30))
def test_split_partitions_every_document_in_order(lines):
    text = "\n".join(lines)
    doc = _text_document("d", text)
    train, val = "".join(doc.lines("train")), "".join(doc.lines("val"))
    assert train + val == text == "".join(doc.lines("all"))
    # Validation is at most the last ~10% plus one line of slack (the cut lands on a line boundary).
    assert len(val.encode()) <= int(len(text.encode()) * VAL_FRACTION) + max(
        (len(x.encode()) + 1 for x in text.splitlines()), default=0
    )


def test_files_folders_globs_and_stdin(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("alpha\n" * 20)
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "two.md").write_text("beta\n" * 20)
    (tmp_path / "a" / "image.bin").write_bytes(b"\x89PNG\0\0\0binary")
    assert [d.name for d in Corpus([str(tmp_path / "a")]).documents] == [
        str(tmp_path / "a" / "one.txt"),
        str(tmp_path / "a" / "sub" / "two.md"),
    ]
    assert len(Corpus([str(tmp_path / "a" / "**" / "*.md")]).documents) == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))
    assert list(Corpus(["-"]).lines("all")) == ["from stdin\n"]


def test_large_file_streams_in_blocks_with_exact_split(tmp_path):
    path = tmp_path / "big.txt"
    lines = [f"line {i} " + "é" * (i % 7) + "\n" for i in range(200_000)]
    path.write_text("".join(lines))
    corpus = Corpus([str(path)])
    chunks = list(corpus.documents[0].chunks("all"))
    assert len(chunks) > 1  # streamed, not read whole
    assert "".join(chunks) == "".join(lines)
    assert list(corpus.lines("train")) + list(corpus.lines("val")) == lines


def test_documents_without_a_final_newline_stay_apart_in_the_stream(tmp_path):
    for name, text in (("a.txt", "alpha beta"), ("b.txt", "gamma delta")):
        (tmp_path / name).write_text(text)
    counted = []
    corpus = Corpus([str(tmp_path)])
    assert "".join(corpus.chunks("all", on_bytes=counted.append)) == "alpha beta\ngamma delta\n"
    assert sum(counted) == corpus.size  # the added newlines are not corpus bytes


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: str(p / "missing.txt"), "no such file"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "no text files"),
        (lambda p: str(p / "*.nothing"), "matches no text files"),
        (lambda p: (p / "x.bin").write_bytes(b"ab\0cd") and str(p / "x.bin"), "binary"),
    ],
)
def test_bad_inputs_raise_clear_usage_errors(tmp_path, make, message):
    with pytest.raises(UsageError, match=message):
        Corpus([make(tmp_path)])


def test_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ok\nstill ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(GenError, match=r"latin1.txt: line 3 is not valid UTF-8"):
        list(Corpus([str(path)]).lines("all"))


def test_empty_corpus_is_refused(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(UsageError, match="empty"):
        Corpus([str(path)]).require_text()


NESTED = '''"""module"""
import sys
if sys.platform:
    def a():
        """a"""
        class B:
            """B"""
            def c(self): "c"
else:
    try:
        def d(): "d"
    except ImportError:
        def e(): "e"
    finally:
        async def f(): "f"
match sys.argv:
    case [x] if x:
        class G: "G"
def h(x=lambda: 0):
    "h"
    while x:
        def i(): "i"
    with open(x) as y:
        def j(): "j"
'''


@pytest.mark.parametrize(
    "source", [NESTED, inspect.getsource(json), inspect.getsource(ast)], ids=["nested", "json", "ast"]
)
def test_the_pruned_walk_finds_every_docstring_in_ast_walks_order(source):
    tree = ast.parse(source)

    def names(nodes):
        return [getattr(n, "name", "module") for n in nodes if isinstance(n, _DOCUMENTED) and ast.get_docstring(n)]

    want = names(ast.walk(tree))
    assert names(_walk_blocks(tree)) == want and len(want) >= 5
