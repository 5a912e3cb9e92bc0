"""Hostile files, faults and absurd values: each gives one clear line and an exit code, never a
traceback, a crash, a lost file or a huge allocation (size attacks run under an address-space limit)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
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
