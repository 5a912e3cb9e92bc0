"""Shared fixtures: a tiny tokenizer, tiny model configs and a tiny model directory (CPU, fp32)."""

from __future__ import annotations

import os
import random
import subprocess
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


@pytest.fixture(scope="session")
def kernel_builds(tmp_path_factory) -> Path:
    """A gen home kept for the whole session, for kernels built with other flags (-march=x86-64-v2, say):
    the build key covers sources, flags, compiler and CPU, so a cached build is reused only where it is the
    same binary, and each distinct build compiles once per session instead of once per test. pytest-xdist's
    workers each have a base temp folder inside this run's, so they share one (the build holds a lock)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / "kernel-builds"
    path.mkdir(exist_ok=True)
    return path


def kernel_path(home: Path) -> Path:
    """Where `home` caches the kernel for the current $CC and `build.FLAGS` (monkeypatched or not)."""
    from gen_cli.native import build

    return home / "cache" / "kernels" / f"decode-{build._build_key(build._compiler())}.so"


def loaded_kernel() -> Path:
    """The file the cached `library()` was loaded from (it loads it first if needed)."""
    from gen_cli.native import build

    lib = build.library()
    assert not isinstance(lib, str), lib
    return Path(lib._name)


def copy_kernel(so: Path, home: Path) -> Path:
    """The cached kernel `so` and its size-and-hash sidecar copied into gen home `home`'s cache."""
    return copy_kernel_into(so, home / "cache" / "kernels")


def copy_kernel_into(so: Path, kernels: Path) -> Path:
    """The cached kernel `so` and its size-and-hash sidecar copied into the folder `kernels`."""
    import shutil

    from gen_cli.native import build

    target = kernels / so.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(build.sidecar(so), build.sidecar(target))
    shutil.copyfile(so, target)
    return target


@pytest.fixture(scope="session")
def default_kernel(kernel_builds) -> Path | None:
    """This machine's default kernel build, verified, compiled at most once per session (copied from the
    suite's own gen home when an earlier test built it there); None where it cannot be built. A test that
    needs a fresh gen home copies it in, as a user's home holds it after the first run."""
    from gen_cli.native import build
    from gen_cli.resources import cache_dir

    try:
        target = kernel_path(kernel_builds)
    except (ValueError, OSError, subprocess.SubprocessError):  # no usable $CC: nothing to copy
        return None
    if target.is_file() and build.cached_problem(target) is None:
        return target
    ours = cache_dir() / "kernels" / target.name
    if ours.is_file() and build.cached_problem(ours) is None:
        return copy_kernel(ours, kernel_builds)
    return None if build._compile(build._compiler(), target.parent, target) else target


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    """A GEN_DEBUG=1 in the caller's shell would turn the one-line errors the tests expect into tracebacks."""
    monkeypatch.delenv("GEN_DEBUG", raising=False)


@pytest.fixture(autouse=True)
def _small_peak_gemm(monkeypatch):
    """Benchmarks run in tests time their peak GEMM rate on a 128² product: the rows they check only need a
    measured rate, and a 1024² bf16 product takes a second where bf16 is emulated."""
    from gen_cli.lab import ceilings

    monkeypatch.setattr(ceilings, "PEAK_GEMM_N", 128)


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
