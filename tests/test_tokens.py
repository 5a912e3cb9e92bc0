"""Token files (layout, exact bytes, reuse) and scoring a token stream (loss, bits per byte)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import random_text

from gen_cli.text.corpus import Corpus
from gen_cli.text.tokenizer import EOT, decode, special_id, train_tokenizer
from gen_cli.train.evaluate import evaluate
from gen_cli.train.tokens import byte_lengths, token_dtype, tokenize_split, windows


def write_corpus(folder: Path, docs: int = 3, lines: int = 120, seed: int = 0) -> list[Path]:
    """A few deterministic pseudo-random text files (some non-ASCII, so bytes ≠ characters)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for d in range(docs):
        path = folder / f"doc{d}.txt"
        path.write_text(random_text(lines, seed * 1000 + d), encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN_HOME", str(tmp_path / "home"))
    write_corpus(tmp_path / "text")
    corpus = Corpus([str(tmp_path / "text")])
    tok, _ = train_tokenizer(corpus, vocab_size=300)
    return corpus, tok


def test_layout_is_eot_then_each_document(setup):
    corpus, tok = setup
    tf = tokenize_split(tok, corpus, "train")
    data = np.asarray(tf.load())
    assert tf.dtype == token_dtype(300) == "<u2" and data.dtype == np.uint16
    eot = special_id(tok, EOT)
    bounds = [*np.flatnonzero(data == eot), len(data)]
    assert bounds[0] == 0
    docs = [decode(tok, data[a + 1 : b].tolist()) for a, b in itertools.pairwise(bounds)]
    assert docs == list(corpus.texts("train"))
    assert token_dtype(70000) == "<u4"


def test_token_bytes_sum_to_the_text_bytes_exactly(setup):
    corpus, tok = setup
    data = np.asarray(tokenize_split(tok, corpus, "val").load(), dtype=np.int64)
    table = byte_lengths(tok)
    assert table[special_id(tok, EOT)] == 0
    assert int(table[data].sum()) == sum(len(t.encode("utf-8")) for t in corpus.texts("val"))


def test_token_file_is_reused_and_invalidated_by_a_changed_input(setup, tmp_path):
    corpus, tok = setup
    first = tokenize_split(tok, corpus, "train")
    assert not first.cached
    mtime = first.path.stat().st_mtime_ns
    again = tokenize_split(tok, Corpus([str(tmp_path / "text")]), "train")
    assert again.cached and again.path == first.path and again.path.stat().st_mtime_ns == mtime
    assert tokenize_split(tok, corpus, "val").path != first.path
    (tmp_path / "text" / "doc0.txt").write_text("changed text.\n" * 50, encoding="utf-8")
    changed = tokenize_split(tok, Corpus([str(tmp_path / "text")]), "train")
    assert not changed.cached and changed.path != first.path
    assert not list(first.path.parent.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_windows_gather_rows():
    data = np.arange(20, dtype=np.uint16)
    w = windows(data, [0, 5, 10], 4)
    assert w.dtype == np.int64 and w.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8], [10, 11, 12, 13]]


class _Uniform:
    """A stand-in model whose logits are all zero: every token has probability 1/V."""

    def __init__(self, vocab: int) -> None:
        self.vocab, self.training, self.seen = vocab, False, []

    def __call__(self, idx):
        import torch

        self.seen.append(tuple(idx.shape))
        return torch.zeros(*idx.shape, self.vocab)

    def eval(self):
        return self

    def train(self, mode=True):
        return self


@pytest.mark.parametrize("n", [2, 17, 64, 65, 100])
def test_evaluate_scores_every_target_once_with_exact_bytes(n):
    import torch

    vocab = 50
    rng = np.random.default_rng(n)
    data = rng.integers(0, vocab, n).astype(np.uint16)
    table = rng.integers(1, 4, vocab)
    model = _Uniform(vocab)
    res = evaluate(model, data, table, context=16, batch_size=3, device=torch.device("cpu"), autocast_dtype=None)
    assert res.tokens == n - 1
    assert sum(b * t for b, t in model.seen) == n - 1  # each target predicted exactly once
    assert res.loss == pytest.approx(math.log(vocab), rel=1e-6)
    assert res.bytes == int(table[data[1:].astype(np.int64)].sum())
    assert res.bits_per_byte == pytest.approx((n - 1) * math.log(vocab) / math.log(2) / res.bytes, rel=1e-6)
    capped = evaluate(_Uniform(vocab), data, table, 16, 3, torch.device("cpu"), None, max_tokens=5)
    assert capped.tokens == min(5, n - 1)
