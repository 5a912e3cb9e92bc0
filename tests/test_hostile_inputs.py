"""Hostile files, faults and absurd values: each gives one clear line and an exit code, never a
traceback, a crash, a lost file or a huge allocation (size attacks run under an address-space limit)."""

from __future__ import annotations

import os
import shlex
import shutil

import pytest

from gen_cli.infer.native import build

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
