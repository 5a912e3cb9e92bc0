"""Faults and damaged state: cached kernels, run-folder locks and orphans, damaged caches and train
states, full disks and signals; each ends in one clear line, nothing lost and nothing left behind."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import copy_kernel, kernel_path
from hostile import REPO, cli, one_line, refused

from gen_cli.errors import GenError, UsageError
from gen_cli.native import build
from gen_cli.train.args import TrainArgs
from gen_cli.train.loop import train
from gen_cli.train.run_folder import LOCK_FILE

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


# -O0: the cache's checks and the rebuild do not depend on how the code is optimised, and -O0 compiles in a
# fifth of -O3's time; every damage case below still rebuilds the kernel for real with the compiler.
QUICK_FLAGS = tuple("-O0" if f == "-O3" else f for f in build.FLAGS)


@pytest.fixture(scope="module")
def quick_kernel(kernel_builds):
    """A good kernel built with QUICK_FLAGS once for the module, never loaded by this process: a library a
    process has mapped must not be damaged in place (that is SIGBUS for the mapper; gen only ever renames)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build, "FLAGS", QUICK_FLAGS)
        so = kernel_path(kernel_builds)
        if not (so.is_file() and build.cached_problem(so) is None):
            assert build._compile(build._compiler(), so.parent, so) is None
    return so


@needs_cc
@pytest.mark.parametrize("damage", ["truncate", "empty", "foreign", "no-sidecar"])
def test_a_damaged_cached_kernel_is_rebuilt_and_said_once(kernel_home, quick_kernel, monkeypatch, damage):
    monkeypatch.setattr(build, "FLAGS", QUICK_FLAGS)  # the key quick_kernel was cached under, and the rebuild
    so = copy_kernel(quick_kernel, kernel_home.parent.parent)  # kernel_home is <gen home>/cache/kernels
    assert so == kernel_path(kernel_home.parent.parent) and build.cached_problem(so) is None
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
        new = cli(["train", str(home / "corpus.txt"), "--out", str(home / "run"), "--steps", "2"])
        resume = cli(["train", "--resume", str(home / "run")])
        with pytest.raises(GenError, match=f"pid {holder.pid}"):
            train(tiny_args(home, steps=2))
    finally:
        holder.communicate(b"")
    for result in (new, resume):
        assert result.exit_code == 1
        assert one_line(result).startswith(f"error: {home / 'run'} is in use by another gen train (pid {holder.pid})")
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
    monkeypatch.setattr(corpus, "_stdlib_docstrings", lambda: [("json", "JSON docs.\n")])  # seconds → ms
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
    del meta["checksum"]  # a state damaged consistently (or one older than the checksum): its content checked
    save_file(tensors, str(path), metadata=meta)
    pattern = r"train_state\.safetensors: (not a readable train state|damaged saved arguments)|tokenizer is damaged"
    refused(["train", "--resume", str(home / "run")], pattern)


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, the disk is full\n" * 50)
    out = tmp_path / "out" / "tok.json"

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    refused(["train-tokenizer", str(corpus), "--vocab-size", "300", "--out", str(out)],
             rf"cannot write {re.escape(str(out))}: No space left on device")  # fmt: skip
    assert not out.exists() and not list(out.parent.glob(".*.tmp"))


def test_compare_prints_its_results_when_the_output_cannot_be_written(tmp_path, monkeypatch):
    import errno

    from test_compare import FAST

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "r.json"
    result = cli(["compare", *FAST, "--attention", "mha", "--pos", "rope", "--kv-cache", "on", "--in-process",
                   "-o", str(out)])  # fmt: skip
    assert "Traceback" not in result.output
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]  # after the plan's announcement
    assert result.exit_code == 1 and "No space left on device; the results were printed to stdout instead" in line
    assert json.loads(result.stdout)["rows"] and not out.exists()


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


def test_a_large_compare_grid_is_announced_and_confirmed_in_a_terminal(monkeypatch):
    import types

    from gen_cli.commands import compare as compare_cmd

    monkeypatch.setattr(compare_cmd, "_run", lambda *a: pytest.fail("the grid ran"))
    argv = ["compare", "--preset", "tiny", "--repeats", "1", "--warmup", "0", "--attention", "mha,gqa,mqa",
            "--pos", "rope,sinusoidal,learned", "--prompt-len", "2,3,4,5", "--max-new-tokens", "2,3,4",
            "--in-process"]  # fmt: skip
    terminal = types.SimpleNamespace(isatty=lambda: True)
    monkeypatch.setattr(compare_cmd, "sys", types.SimpleNamespace(stdin=terminal, stderr=terminal))
    asked = []
    monkeypatch.setattr(compare_cmd.typer, "confirm", lambda text, err=False: asked.append(text) or False)
    result = cli(argv)
    assert result.exit_code == 1 and asked == ["run them all?"]
    assert result.stderr.splitlines() == [
        "216 configurations, 216 timed and warm-up generations in all, each in its own process",
        "error: not started; narrow the grid, or pass --yes to skip this question",
    ]
    monkeypatch.setattr(compare_cmd, "_run", lambda *a: (_ for _ in ()).throw(GenError("ran")))
    assert "error: ran" in cli([*argv, "--yes"]).stderr and len(asked) == 1  # --yes: no question


def test_a_full_disk_while_logging_metrics_is_one_line(home, monkeypatch):
    import errno

    from test_train import tiny_args

    from gen_cli.train import loop

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            pass

    monkeypatch.setattr(loop, "open", lambda *a, **k: Full(), raising=False)
    with pytest.raises(GenError, match=r"cannot write .*metrics\.jsonl: No space left on device"):
        train(tiny_args(home, steps=2))
