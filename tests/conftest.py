"""Shared fixtures: a tiny tokenizer, tiny model configs and a tiny model directory (CPU, fp32)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from gen_cli.model.config import ModelConfig

# Tiny models gain nothing from threads, and on a shared 2-core machine spinning OpenMP workers make
# each small op up to 100× slower; one thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)

TEXT = (
    "The quick brown fox jumps over the lazy dog. A transformer reads tokens and predicts the next one.\n"
    "Keys and values are cached so that each new token costs one step, not a whole pass.\n"
    "Rotary embeddings rotate queries and keys; sinusoidal tables add positions to embeddings.\n"
) * 30


# Pseudo-random sentences over a small vocabulary, some of it non-ASCII so bytes differ from characters.
WORDS = [
    *("the", "a", "cat", "dog", "runs", "sleeps", "under", "over", "tree", "house"),
    *("small", "big", "red", "blue", "quickly", "slowly", "é", "ü", "日本"),
]


def random_text(lines: int, seed: int = 0) -> str:
    """Deterministic lines of 3–12 random WORDS, each ending with a full stop."""
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + ".\n" for _ in range(lines))


def fit(model, data: torch.Tensor, steps: int = 150, seq: int = 32, batch: int = 8):
    """Train `model` briefly on random windows of the 1-D id tensor `data` (sharp next-token distributions,
    unlike random weights); returns it in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        rows = torch.stack([data[s : s + seq + 1] for s in starts])  # (batch, seq + 1)
        logits = model(rows[:, :-1])  # (batch, seq, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def tiny_config(**changes) -> ModelConfig:
    """2 layers, d=32, 4 heads, context 16: every test model is this small."""
    base = dict(vocab_size=300, n_layer=2, n_head=4, n_kv_head=4, d_model=32, d_ff=64, context_length=16)
    base.update(changes)
    return ModelConfig(**base)


@pytest.fixture
def fresh_library():
    """The native kernel looked up afresh (a test changes $CC), and forgotten again after the test."""
    from gen_cli.native import build

    build.library.cache_clear()
    yield
    build.library.cache_clear()


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    """A GEN_DEBUG=1 in the caller's shell would turn the one-line errors the tests expect into tracebacks."""
    monkeypatch.delenv("GEN_DEBUG", raising=False)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    from gen_cli.text.corpus import Corpus
    from gen_cli.text.tokenizer import save_tokenizer, train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    corpus_file = folder / "corpus.txt"
    corpus_file.write_text(TEXT, encoding="utf-8")
    tok, _ = train_tokenizer(Corpus([str(corpus_file)]), vocab_size=300)
    path = folder / "tokenizer.json"
    save_tokenizer(tok, path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from gen_cli.text.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny model (context 64 so CLI runs have room) whose vocab matches the tokenizer."""
    from gen_cli.formats.checkpoint import save_model
    from gen_cli.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.get_vocab_size(), context_length=64))
    folder = tmp_path_factory.mktemp("model") / "tiny"
    save_model(folder, model, tokenizer)
    return folder
