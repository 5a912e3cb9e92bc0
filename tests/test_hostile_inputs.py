"""Hostile files, faults and absurd values: each gives one clear line and an exit code, never a
traceback, a crash, a lost file or a huge allocation (size attacks run under an address-space limit)."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gen_cli.cli import app
from gen_cli.errors import GenError, UsageError
from gen_cli.infer.native import build
from gen_cli.train.args import TrainArgs
from gen_cli.train.loop import train
from gen_cli.train.run_folder import LOCK_FILE

REPO = Path(__file__).resolve().parent.parent


def _cli(argv, stdin=None):
    return CliRunner().invoke(app, argv, input=stdin)


def _one_line(result) -> str:
    """The command's stderr, asserted to be one line and no traceback."""
    text = result.stderr.strip()
    assert "Traceback" not in text, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert len(text.splitlines()) == 1, text
    return text


needs_cc = pytest.mark.skipif(
    shutil.which(shlex.split(os.environ.get("CC", "cc"))[0]) is None, reason="no C compiler on this machine"
)


@pytest.fixture
def kernel_home(monkeypatch, tmp_path):
    """A fresh gen home for the native kernel; the cached `library()` is forgotten before and after."""
    monkeypatch.setenv("GEN_HOME", str(tmp_path))
    build.library.cache_clear()
    build.take_notes()
    yield tmp_path / "cache" / "kernels"
    build.library.cache_clear()


def _built_kernel(folder):
    """Compile the kernel into the cache without loading it: a library this process has mapped must not
    be damaged in place (that is SIGBUS for the mapper, which gen avoids by only ever renaming)."""
    cc = build._compiler()
    so = folder / f"decode-{build._build_key(cc)}.so"
    assert build._compile(cc, folder, so) is None
    return so


@needs_cc
@pytest.mark.parametrize("damage", ["truncate", "empty", "foreign", "no-sidecar"])
def test_a_damaged_cached_kernel_is_rebuilt_and_said_once(kernel_home, damage):
    so = _built_kernel(kernel_home)
    good = so.read_bytes()
    if damage == "truncate":
        so.write_bytes(good[: len(good) // 2])  # the SIGBUS case: mapped, then read past the end
    elif damage == "empty":
        so.write_bytes(b"")
    elif damage == "foreign":
        so.write_bytes(b"\x7fELF" + bytes(len(good) - 4))  # same size, other bytes
    else:
        build.sidecar(so).unlink()
    assert build.native_status() == "ready"
    assert so.read_bytes() == good or build.cached_problem(so) is None
    (note,) = build.take_notes()
    assert "failed its check" in note and "rebuilt" in note
    assert build.take_notes() == []  # said once
    build.library.cache_clear()
    assert build.native_status() == "ready" and build.take_notes() == []  # a good cache stays quiet


def test_a_compiler_that_writes_nothing_caches_nothing(kernel_home, monkeypatch):
    true = shutil.which("true")
    if true is None:
        pytest.skip("no `true` command")
    monkeypatch.setenv("CC", true)
    assert build.native_status() == f"{true} reported success but wrote no library"
    assert not kernel_home.exists() or not any(kernel_home.iterdir())


def test_cc_with_unbalanced_quotes_falls_back_with_a_reason(kernel_home, monkeypatch):
    monkeypatch.setenv("CC", 'cc "-O2')
    assert "cannot be split into a command" in build.native_status()


# ---------------------------------------------------------------------------------------------
# Run folders: one trainer at a time, no orphans after a kill -9, saves on a clock too


@pytest.fixture
def home(tmp_path, monkeypatch):
    from test_train import write_corpus

    monkeypatch.setenv("GEN_HOME", str(tmp_path / "home"))
    write_corpus(tmp_path / "corpus.txt")
    return tmp_path


def _holding_lock(folder):
    """Another process holding `folder`'s run lock until its stdin closes; returns the Popen."""
    code = (
        "import sys; from pathlib import Path; from gen_cli.train.run_folder import run_folder_lock\n"
        f"with run_folder_lock(Path({str(folder)!r})):\n    print('locked', flush=True); sys.stdin.read()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline() == b"locked\n"
    return proc


def test_a_second_training_on_a_busy_folder_is_refused(home):
    from test_train import tiny_args

    holder = _holding_lock(home / "run")
    try:
        new = _cli(["train", str(home / "corpus.txt"), "--out", str(home / "run"), "--steps", "2"])
        resume = _cli(["train", "--resume", str(home / "run")])
        with pytest.raises(GenError, match=f"pid {holder.pid}"):
            train(tiny_args(home, steps=2))
    finally:
        holder.communicate(b"")
    for result in (new, resume):
        assert result.exit_code == 1
        assert _one_line(result).startswith(f"error: {home / 'run'} is in use by another gen train (pid {holder.pid})")
    assert not (home / "run").exists()  # the holder made it and removed it; the refused runs left nothing
    assert train(tiny_args(home, steps=2)).step == 2  # free again once the holder is gone
    assert not (home / "run" / LOCK_FILE).exists()


def test_kill_9_during_a_checkpoint_write_leaves_no_orphan_after_the_next_open(home):
    from test_train import tiny_args

    train(tiny_args(home, stop_after=5))
    code = (
        "import os, signal, sys; from pathlib import Path; import safetensors.torch\n"
        "def dying(tensors, filename, metadata=None):\n"
        "    Path(filename).write_bytes(b'half' * 4096); os.kill(os.getpid(), signal.SIGKILL)\n"
        "safetensors.torch.save_file = dying\n"
        "from gen_cli.train.args import TrainArgs; from gen_cli.train.loop import train\n"
        f"train(TrainArgs(resume={str(home / 'run')!r}, stop_after=2))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "GEN_HOME": str(home / "home")}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == -signal.SIGKILL
    assert list((home / "run").glob(".train_state.safetensors.*.tmp")), "the hook should leave an orphan"
    assert train(TrainArgs(resume=str(home / "run"), stop_after=1)).step == 6  # the last good state, resumed
    assert not list((home / "run").glob(".*.tmp")) and not (home / "run" / LOCK_FILE).exists()


def test_checkpoints_are_also_saved_on_a_clock(home, monkeypatch):
    from test_train import tiny_args

    from gen_cli.train import loop

    clock = iter(range(0, 10**6, 50))  # each reading is 50 s later: a 1-minute interval saves every 2nd step
    monkeypatch.setattr(loop.time, "monotonic", lambda: next(clock))
    saved = []
    real = loop.save_train_state
    monkeypatch.setattr(
        loop, "save_train_state", lambda path, m, o, g, step, *a: saved.append(step) or real(path, m, o, g, step, *a)
    )
    train(tiny_args(home, steps=6, save_every=0, save_minutes=1.0))
    assert saved == [2, 4, 6]
    with pytest.raises(UsageError, match="save_minutes"):
        train(tiny_args(home, save_minutes=-1.0))


# ---------------------------------------------------------------------------------------------
# Model directories from outside: checked against the weights header before anything is built


def _copy_model(model_dir, tmp_path, name="m"):
    folder = tmp_path / name
    shutil.copytree(model_dir, folder)
    return folder


def _edit_config(folder, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))  # json.dumps writes float("inf") as Infinity, as a hostile file would


def _rewrite_weights(folder, change, metadata=None):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata=metadata or {"format": "pt"})


def _refused(argv, pattern, code=1, stdin=None):
    result = _cli(argv, stdin)
    line = _one_line(result)
    assert result.exit_code == code, (result.exit_code, line)
    assert re.search(pattern, line), line
    return line


CONFIG_ATTACKS = {
    "n_layer": ({"n_layer": 1_000_000}, r"n_layer 1000000 is above gen's limit of 1,024; set GEN_NO_SIZE_LIMITS=1"),
    "d_model": ({"d_model": 10**9}, r"d_model 1000000000 is above gen's limit"),
    "context": ({"context_length": 10**12}, r"context_length 1000000000000 is above gen's limit"),
    "layers-in-bounds": ({"n_layer": 1000}, r"weights do not match config.json: missing layers\.\d+\."),
    "tie-yes": ({"tie_embeddings": "yes"}, r"tie_embeddings must be true or false, got 'yes'"),
    "rope-inf": ({"rope_base": float("inf")}, r"rope_base must be a positive finite number, got inf"),
    "norm-list": ({"norm": ["rmsnorm"]}, r"norm must be a string"),
}


@pytest.mark.parametrize("attack", CONFIG_ATTACKS)
def test_hostile_config_json_is_refused_in_one_line(model_dir, tmp_path, attack):
    changes, pattern = CONFIG_ATTACKS[attack]
    folder = _copy_model(model_dir, tmp_path)
    _edit_config(folder, **changes)
    generate = ["generate", "hi", "--model", str(folder), "--device", "cpu", "--max-new-tokens", "2"]
    _refused(generate, pattern)
    if attack != "layers-in-bounds":  # info reads only config.json, which is fine there
        started = time.perf_counter()
        _refused(["info", str(folder)], pattern)
        assert time.perf_counter() - started < 5


WEIGHT_ATTACKS = {
    "int32": (lambda t: t.update({"norm.weight": t["norm.weight"].to(torch.int32)}), r"floating point.*norm\.weight"),
    "bool": (lambda t: t.update({"norm.weight": t["norm.weight"] > 0}), r"floating point.*norm\.weight \(BOOL\)"),
    "nan": (lambda t: t["layers.0.attn.wo.weight"].view(-1)[3].fill_(math.nan),
            r"tensor layers\.0\.attn\.wo\.weight holds NaN"),
    "inf": (lambda t: t["tok_emb.weight"].view(-1)[0].fill_(math.inf), r"tensor tok_emb\.weight holds NaN or infinite"),
    "shape": (lambda t: t.update({"norm.weight": t["norm.weight"][:-1]}),
              r"norm\.weight has shape \(31,\), config needs \(32,\)"),
}  # fmt: skip


@pytest.mark.parametrize("attack", WEIGHT_ATTACKS)
def test_bad_weights_are_refused_naming_the_tensor(model_dir, tmp_path, attack):
    change, pattern = WEIGHT_ATTACKS[attack]
    folder = _copy_model(model_dir, tmp_path)
    _rewrite_weights(folder, change)
    _refused(["generate", "hi", "--model", str(folder), "--device", "cpu", "--max-new-tokens", "2"], pattern)


def test_a_swapped_tokenizer_is_refused_and_old_dirs_without_a_digest_still_load(model_dir, tmp_path):
    from gen_cli.model.checkpoint import TOKENIZER_DIGEST_KEY, load_model

    folder = _copy_model(model_dir, tmp_path)
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[280:282]  # two ordinary tokens: same size, other meaning
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    _refused(["generate", "hi", "--model", str(folder), "--device", "cpu"], r"tokenizer\.json is not the tokenizer")
    _refused(["eval", str(folder), str(folder / "tokenizer.json")], r"tokenizer\.json is not the tokenizer")
    old = _copy_model(model_dir, tmp_path, "old")
    _rewrite_weights(old, lambda t: None, metadata={"format": "pt"})  # as gen wrote them before the digest
    load_model(old)
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert TOKENIZER_DIGEST_KEY in f.metadata()


# ---------------------------------------------------------------------------------------------
# Ordinary input that used to give tracebacks


def test_invalid_utf8_prompts_are_refused(model_dir, tokenizer_path):
    base = ["--model", str(model_dir), "--device", "cpu", "--max-new-tokens", "2"]
    _refused(["generate", "-", *base], r"text on stdin is not valid UTF-8 \(byte 0xff at offset 3\)", 2, b"abc\xff")
    _refused(["tokenize", "-", "--tokenizer", str(tokenizer_path)], r"not valid UTF-8", 2, b"\xc3(")
    argv = os.fsdecode(b"caf\xe9")  # an undecodable argv byte arrives as a lone surrogate
    _refused(["generate", argv, *base], r"text argument is not valid UTF-8 \(byte 0xe9 at offset 3\)", 2)
    _refused(["tokenize", argv, "--tokenizer", str(tokenizer_path)], r"text argument is not valid UTF-8", 2)


def test_a_huge_stdin_prompt_is_refused_before_tokenizing(model_dir, monkeypatch):
    from tokenizers import Tokenizer

    encoded = []
    real = Tokenizer.encode
    monkeypatch.setattr(
        Tokenizer, "encode", lambda self, text, **kw: encoded.append(len(text)) or real(self, text, **kw)
    )
    big = b"word " * 2_000_000  # 10 MB for a 64-token context
    _refused(
        ["generate", "-", "--model", str(model_dir), "--device", "cpu"], r"text on stdin is over [\d,]+ bytes", 2, big
    )
    assert encoded == []


@pytest.mark.parametrize(
    ("option", "value", "pattern"),
    [
        ("--seed", str(2**64), r"--seed must fit in 64 bits"),
        ("--seed", str(-(2**63) - 1), r"--seed must fit in 64 bits"),
        ("--temperature", "inf", r"--temperature must be a finite number"),
        ("--repetition-penalty", "inf", r"--repetition-penalty must be a finite number"),
        ("--max-new-tokens", str(-(2**70)), r"--max-new-tokens must be at least 1"),
    ],
)
def test_out_of_range_generation_options(model_dir, option, value, pattern):
    _refused(["generate", "hi", "--model", str(model_dir), "--device", "cpu", option, value], pattern, 2)


@pytest.mark.parametrize("option", ["--temperature", "--repetition-penalty"])
def test_subnormal_temperature_and_penalty_give_text_not_nan(model_dir, option):
    args = ["generate", "The quick", "--model", str(model_dir), "--device", "cpu", "--json", "--seed", "1"]
    args += ["--max-new-tokens", "8", "--ignore-eot", option, "1e-45"]
    result = _cli(args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stats"]["new_tokens"] == 8


def test_num_samples_beyond_memory_is_refused_with_the_estimate(model_dir, monkeypatch):
    from gen_cli.model import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 50 * 2**20)
    argv = ["generate", "hi", "--model", str(model_dir), "--device", "cpu", "--num-samples", "100000"]
    argv += ["--max-new-tokens", "8"]
    _refused(argv, r"KV cache for 100,000 sequence\(s\) of \d+ tokens needs about [\d.]+ [GM]iB but only 50 MiB "
             r"of memory is available; use fewer --num-samples")  # fmt: skip


def test_vocab_size_and_special_tokens_are_checked_up_front(tmp_path, monkeypatch):
    from gen_cli.model import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 8 * 2**30)  # as on a laptop
    monkeypatch.setenv("GEN_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50)
    out = tmp_path / "tok.json"
    _refused(["train-tokenizer", str(corpus), "--vocab-size", "1000000000", "--out", str(out)],
             r"(vocab_size|--vocab-size) 1000000000 is above gen's limit", 2)  # fmt: skip
    _refused(["train", str(corpus), "--vocab-size", "1000000000", "--out", str(tmp_path / "run")],
             r"--vocab-size 1000000000 is above gen's limit", 2)  # fmt: skip
    _refused(["train-tokenizer", str(corpus), "--special-token", "", "--out", str(out)],
             r"special token cannot be the empty string", 2)  # fmt: skip
    _refused(["train", str(corpus), "--context", "100000", "--out", str(tmp_path / "run2")],
             r"training [\d,]+ parameters on batches of 16 × 100000 tokens needs about [\d.]+ GiB")  # fmt: skip
    assert not out.exists() and not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_eval_context_0_is_refused(model_dir, tokenizer_path):
    _refused(["eval", str(model_dir), str(tokenizer_path), "--context", "0"], r"context 0 is outside", 2)


# ---------------------------------------------------------------------------------------------
# Damaged cache entries and train states


def test_damaged_cache_entries_are_rebuilt(home):
    from test_train import tiny_args

    train(tiny_args(home, steps=2))
    cache = home / "home" / "cache"
    token_files = sorted((cache / "tokens").glob("*.bin"))
    (tok_file,) = (cache / "tokenizers").glob("*.json")
    good = [p.read_bytes() for p in token_files]
    token_files[0].write_bytes(good[0] + b"\x01")  # odd length
    token_files[1].write_bytes(b"\xff\xff" * (len(good[1]) // 2))  # ids 65535 ≥ vocab 300
    tok_file.write_text("{ not a tokenizer")
    events = []
    summary = train(tiny_args(home, steps=2, out=str(home / "run2")), events.append)
    assert not summary.token_files_cached and summary.step == 2
    assert [p.read_bytes() for p in token_files] == good  # rebuilt with the same contents
    assert any("cached tokenizer" in str(e) and "damaged" in str(e) for e in events)


def test_damaged_builtin_corpus_cache_is_rebuilt(tmp_path, monkeypatch):
    from gen_cli.text import corpus

    monkeypatch.setenv("GEN_HOME", str(tmp_path))
    real = corpus._python_docs_documents()
    (cached,) = (tmp_path / "cache").glob("python-docs-*.json")
    for damage in ("{}", "[]", '[["a"]]', "not json"):
        cached.write_text(damage)
        assert len(corpus._python_docs_documents()) == len(real)


@pytest.mark.parametrize("damage", ["no-rng", "wrong-shape", "bad-tokenizer", "bad-args"])
def test_damaged_train_state_gives_one_line_on_resume(home, damage):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from test_train import tiny_args

    train(tiny_args(home, stop_after=2))
    path = home / "run" / "train_state.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if damage == "no-rng":
        del tensors["rng.torch"]
    elif damage == "wrong-shape":
        tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    elif damage == "bad-tokenizer":
        meta["tokenizer"] = "{broken"
    else:
        meta["args"] = json.dumps({**json.loads(meta["args"]), "steps": "many"})
    save_file(tensors, str(path), metadata=meta)
    pattern = r"train_state\.safetensors: (not a readable train state|damaged saved arguments)|tokenizer is damaged"
    _refused(["train", "--resume", str(home / "run")], pattern)


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, the disk is full\n" * 50)
    out = tmp_path / "out" / "tok.json"

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    _refused(["train-tokenizer", str(corpus), "--vocab-size", "300", "--out", str(out)],
             rf"cannot write {re.escape(str(out))}: No space left on device")  # fmt: skip
    assert not out.exists() and not list(out.parent.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# Size attacks: each in its own process under a 4 GB address-space limit, so a regression that
# allocates first fails this test instead of eating the machine; peak RSS must stay small.

AS_LIMIT = 4 << 30
_UNDER_LIMIT = (
    "import atexit, resource, sys\n"
    "resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))\n"
    "out = sys.argv[2]\n"
    "atexit.register(lambda: open(out, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))\n"
    "sys.argv = ['gen', *sys.argv[3:]]\n"
    "from gen_cli.cli import main\n"
    "main()\n"
)


def _under_limit(tmp_path, argv, stdin=b""):
    """(exit code, stderr, peak RSS in MiB) of `gen argv` in a process limited to AS_LIMIT bytes."""
    rss_file = tmp_path / "rss.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "GEN_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    env.pop("GEN_DEBUG", None)
    cmd = [sys.executable, "-c", _UNDER_LIMIT, str(AS_LIMIT), str(rss_file), *argv]
    done = subprocess.run(cmd, input=stdin, capture_output=True, env=env, timeout=120)
    rss = int(rss_file.read_text()) / 1024 if rss_file.exists() else math.inf
    return done.returncode, done.stderr.decode(errors="replace").strip(), rss


def _size_attacks(model_dir, tmp_path):
    absurd = _copy_model(model_dir, tmp_path, "absurd")
    _edit_config(absurd, n_layer=1_000_000)
    in_bounds = _copy_model(model_dir, tmp_path, "in-bounds")
    _edit_config(in_bounds, n_layer=1000, d_model=4096, n_head=32, n_kv_head=32, d_ff=16384)
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50)
    run = ["--device", "cpu", "--max-new-tokens", "8"]
    return {
        "info n_layer 1e6": (["info", str(absurd)], b"", r"n_layer 1000000 is above gen's limit"),
        "generate n_layer 1e6": (["generate", "hi", "--model", str(absurd), *run], b"", r"above gen's limit"),
        "generate 1000 wide layers, small weights": (
            ["generate", "hi", "--model", str(in_bounds), *run],
            b"",
            r"weights do not match config\.json",
        ),
        "50 MB stdin prompt": (
            ["generate", "-", "--model", str(model_dir), *run],
            b"word " * 10_000_000,
            r"text on stdin is over",
        ),
        "num-samples 1e7": (
            ["generate", "hi", "--model", str(model_dir), "--num-samples", "10000000", *run],
            b"",
            r"KV cache for 10,000,000 sequence\(s\).*needs about",
        ),
        "train-tokenizer vocab 1e9": (
            ["train-tokenizer", str(corpus), "--vocab-size", "1000000000", "--out", str(tmp_path / "t.json")],
            b"",
            r"vocab-size 1000000000 is above gen's limit",
        ),
        "train context 1e5": (
            ["train", str(corpus), "--context", "100000", "--batch-size", "1024", "--out", str(tmp_path / "r")],
            b"",
            r"training [\d,]+ parameters on batches of 1024 × 100000 tokens needs about",
        ),
    }


PEAK_RSS: dict[str, float] = {}


@pytest.mark.parametrize(
    "attack",
    ["info n_layer 1e6", "generate n_layer 1e6", "generate 1000 wide layers, small weights", "50 MB stdin prompt",
     "num-samples 1e7", "train-tokenizer vocab 1e9", "train context 1e5"],
)  # fmt: skip
def test_size_attacks_are_refused_before_allocating(model_dir, tmp_path, attack):
    argv, stdin, pattern = _size_attacks(model_dir, tmp_path)[attack]
    started = time.perf_counter()
    code, stderr, rss = _under_limit(tmp_path, argv, stdin)
    lines = stderr.splitlines()
    assert code in (1, 2) and "Traceback" not in stderr and re.search(pattern, lines[-1]), (code, stderr)
    assert len(lines) == 1, stderr
    assert time.perf_counter() - started < 60
    PEAK_RSS[attack] = rss
    print(f"peak RSS {attack}: {rss:.0f} MiB")
    assert rss < 1024, f"{attack}: peak RSS {rss:.0f} MiB"


# ---------------------------------------------------------------------------------------------
# Any generation options: a valid result or one clear error, never a traceback

FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=1e-300),  # subnormals and other tiny values
    st.sampled_from([0.0, -0.0, 5e-324, 1e-45, 1.0, 1e308]),
)
BIG_INTS = st.one_of(st.integers(-5, 6), st.integers(-(2**80), 2**80))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    temperature=FLOATS,
    repetition_penalty=FLOATS,
    top_p=st.none() | FLOATS,
    min_p=st.none() | FLOATS,
    top_k=st.none() | BIG_INTS,
    seed=BIG_INTS,
    max_new_tokens=BIG_INTS,
    num_samples=st.one_of(st.integers(-3, 3), st.integers(10**9, 2**80)),
)
def test_any_generation_options_give_a_result_or_one_clear_error(
    model_dir, temperature, repetition_penalty, top_p, min_p, top_k, seed, max_new_tokens, num_samples
):
    argv = ["generate", "The quick", "--model", str(model_dir), "--device", "cpu", "--json"]
    options = {"--temperature": temperature, "--repetition-penalty": repetition_penalty, "--top-p": top_p,
               "--min-p": min_p, "--top-k": top_k, "--seed": seed, "--max-new-tokens": max_new_tokens,
               "--num-samples": num_samples}  # fmt: skip
    for flag, value in options.items():
        if value is not None:
            argv += [f"{flag}={value!r}"]
    result = _cli(argv)
    if result.exit_code == 0:
        data = json.loads(result.stdout)
        assert 0 <= data["stats"]["new_tokens"] <= max_new_tokens
        return
    line = _one_line(result)
    assert result.exit_code in (1, 2) and line.startswith("error: "), (result.exit_code, line)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e-38])
def test_a_vanishing_temperature_samples_the_argmax(temperature):
    from gen_cli.infer.sampling import SamplingConfig, sample_next

    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9999]])
    cfg = SamplingConfig(temperature=temperature, repetition_penalty=1e-45)
    for seed in range(5):
        assert sample_next(logits, torch.tensor([[2]]), cfg, torch.Generator().manual_seed(seed)).item() == 1


def test_compare_prints_its_results_when_the_output_cannot_be_written(tmp_path, monkeypatch):
    import errno

    from test_compare import FAST

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "r.json"
    result = _cli(["compare", *FAST, "--attention", "mha", "--pos", "rope", "--kv-cache", "on", "--in-process",
                   "-o", str(out)])  # fmt: skip
    line = _one_line(result)
    assert result.exit_code == 1 and "No space left on device; the results were printed to stdout instead" in line
    assert json.loads(result.stdout)["rows"] and not out.exists()


def test_train_seed_beyond_64_bits_is_refused(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50)
    _refused(
        ["train", str(corpus), "--seed", str(2**64), "--out", str(tmp_path / "r")], r"--seed must fit in 64 bits", 2
    )
    assert not (tmp_path / "r").exists()


def test_sigterm_ends_a_step_stuck_in_one_c_call_within_seconds(home):
    """A step inside one long C call runs no Python signal handler; the watcher ends the process."""
    code = (
        "import ctypes, signal, sys\n"
        "from gen_cli.train import loop\n"
        "from test_train import tiny_args\n"
        "from pathlib import Path\n"
        "loop.STOP_GRACE_S = 0.5\n"
        "def stuck(run, step, stop):\n"
        # Like a huge torch op: the GIL released, this thread not returning to Python for a minute.
        "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
        "    print('stepping', flush=True)\n"
        "    ctypes.CDLL(None).sleep(60)\n"
        "loop._step = stuck\n"
        f"loop.train(tiny_args(Path({str(home)!r}), steps=5))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "GEN_HOME": str(home / "home")}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline() == b"stepping\n"
        time.sleep(0.2)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert time.monotonic() - sent < 10
    assert proc.returncode == 128 + signal.SIGTERM
    assert stderr.decode().strip() == (
        "error: the training step did not end within 0.5 s of the signal; stopped without saving "
        "(the last checkpoint is kept)"
    )
