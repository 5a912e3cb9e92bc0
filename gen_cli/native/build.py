"""Building the native kernel: the .c files here, compiled once per source, compiler and CPU into gen's cache.

`-march=native`: the binary is for this machine only. Without a working C compiler gen runs the PyTorch
path, and `native_status()` says why. A compiler without OpenMP (clang without libomp, say) builds the
same kernel without `-fopenmp`: it runs on one thread, and a note says so. The build key covers the whole
compiler command ($CC with its own flags) and its `--version`; the version probe and the build each run
under a time limit, so a compiler that never returns costs at most those seconds and then gen falls back.
A cached library is loaded only when its size and SHA-256 match the sidecar written with it: a truncated
file would otherwise be mapped and die of SIGBUS.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import shlex
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import cache
from pathlib import Path
from subprocess import PIPE

from gen_cli.atomic import write_text_atomic
from gen_cli.errors import GenError
from gen_cli.native import abi
from gen_cli.resources import cache_dir

HERE = Path(__file__).parent
SOURCES = tuple(sorted(HERE.glob("*.c")))  # compiled side by side, linked into one library
HEADERS = tuple(sorted(HERE.glob("*.h")))  # included by them: part of the build key
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC")
SERIAL_FLAGS = tuple(f for f in FLAGS if f != "-fopenmp")  # the retry for a compiler without OpenMP
VERSION_TIMEOUT_S = 10.0  # `$CC --version` answers in milliseconds; a hung one is given up on
BUILD_TIMEOUT_S = 300.0  # the kernel builds in ~5-20 s; far past that the compiler is taken as hung
_notes: list[str] = []  # what happened to the cache on this run (a damaged kernel rebuilt), said once


def _compiler() -> list[str]:
    """$CC split as a shell would; ValueError for unbalanced quotes."""
    return shlex.split(os.environ.get("CC", "cc")) or ["cc"]


def _build_key(cc: list[str]) -> str:
    """Source, flags, the full compiler command, its version and the CPU: a change in any means a new binary."""
    version = subprocess.run(
        [*cc, "--version"], capture_output=True, text=True, check=True, timeout=VERSION_TIMEOUT_S
    ).stdout
    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    # Each file by name and content: a rename or a moved function is a new build too.
    sources = [part for f in (*SOURCES, *HEADERS) for part in (f.name.encode(), f.read_bytes())]
    # The command as split (CC="cc -mno-avx512f" is another binary than CC=cc, with the same --version).
    command = "\0".join(cc).encode()
    parts = (*sources, " ".join(FLAGS).encode(), command, version.encode(), cpu.encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _digest(path: Path) -> dict[str, int | str]:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def sidecar(target: Path) -> Path:
    """Where the size and hash of a cached library are kept."""
    return target.with_name(target.name + ".json")


def cached_problem(target: Path) -> str | None:
    """None when `target` is the library its sidecar describes, else what is wrong with it."""
    if not sidecar(target).is_file():
        return "no record of its size and hash"
    try:
        recorded = json.loads(sidecar(target).read_text(encoding="utf-8"))
        found = _digest(target)
    except (OSError, ValueError) as e:
        return f"unverifiable ({e.__class__.__name__})"
    if not isinstance(recorded, dict) or recorded.get("size") != found["size"]:
        return f"{found['size']} bytes, not the {recorded.get('size') if isinstance(recorded, dict) else '?'} built"
    if recorded.get("sha256") != found["sha256"]:
        return "its content changed since it was built"
    return None


def compile_sources(
    command: list[str], sources: Sequence[str | Path], out: str | Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """`command sources -o out -lm`, each source compiled to an object in its own process, side by side, then one
    link: decode.c and prefill.c take ~16 s each at -O3, so two cores build in about half the time. Returns the
    first step that failed, else the link; TimeoutExpired (every compiler killed) past `timeout` seconds in all."""
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(dir=Path(out).parent, prefix=".objects-") as tmp:
        objects = [str(Path(tmp) / f"{i}-{Path(src).stem}.o") for i, src in enumerate(sources)]
        running = [
            subprocess.Popen([*command, "-c", str(src), "-o", obj], stdout=PIPE, stderr=PIPE, text=True)
            for src, obj in zip(sources, objects, strict=True)
        ]
        try:
            done = []
            for p in running:
                stdout, stderr = p.communicate(timeout=max(deadline - time.monotonic(), 0))
                done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
        finally:
            for p in running:
                if p.poll() is None:  # a timeout: none of them is left behind
                    p.kill()
                    p.wait()
        failed = next((d for d in done if d.returncode != 0), None)
        if failed is not None:
            return failed
        link = [*command, *objects, "-o", str(out), "-lm"]
        return subprocess.run(link, capture_output=True, text=True, timeout=max(deadline - time.monotonic(), 1e-3))


def _run_compiler(cc: list[str], flags: tuple[str, ...], out: str) -> subprocess.CompletedProcess[str]:
    return compile_sources([*cc, *flags], SOURCES, out, BUILD_TIMEOUT_S)


def _compile(cc: list[str], out_dir: Path, target: Path) -> str | None:
    """Compile into `target` with its sidecar; None on success, else a one-line reason."""
    # Compile beside the target, then rename: a concurrent run never loads a half-written file.
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".decode-", suffix=".so.tmp")
    os.close(fd)
    try:
        try:
            done = _run_compiler(cc, FLAGS, tmp)
            if done.returncode != 0 and "openmp" in done.stderr.lower():
                done = _run_compiler(cc, SERIAL_FLAGS, tmp)
        except subprocess.TimeoutExpired:
            reason = f"{cc[0]} did not finish building the native kernel within {BUILD_TIMEOUT_S:g} s"
            _notes.append(f"{reason}; running the PyTorch path")
            return reason
        if done.returncode != 0:
            return f"{cc[0]} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
        if os.path.getsize(tmp) == 0:  # e.g. CC=/bin/true "succeeds" without writing anything
            return f"{cc[0]} reported success but wrote no library"
        # The sidecar first: a crash between the two leaves a mismatch, which the next run rebuilds.
        write_text_atomic(sidecar(target), json.dumps(_digest(Path(tmp))) + "\n")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return None


@contextmanager
def _building(out_dir: Path) -> Iterator[None]:
    """Hold the kernel folder while checking and building in it: gen commands started at once on a fresh
    machine build the kernel once (the others wait, then load it) instead of each compiling it for ~20 s.
    The lock is on the folder itself, so nothing is left behind in it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        with suppress(OSError):  # a file system without locks: build unlocked, as each run did before
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed, or the process dies
        yield
    finally:
        os.close(fd)


@cache
def library() -> ctypes.CDLL | str:
    """The compiled kernel, or a one-line reason it is unavailable."""
    try:
        cc = _compiler()
    except ValueError as e:
        return f"CC={os.environ.get('CC', '')!r} cannot be split into a command ({e})"
    try:
        out_dir = cache_dir() / "kernels"
        target = out_dir / f"decode-{_build_key(cc)}.so"
        with _building(out_dir):
            if target.is_file() and (problem := cached_problem(target)):
                _notes.append(f"the cached native kernel {target} failed its check ({problem}); rebuilt it")
                target.unlink(missing_ok=True)
            if not target.is_file() and (reason := _compile(cc, out_dir, target)):
                return reason
        lib = ctypes.CDLL(str(target))
    except subprocess.TimeoutExpired:
        reason = f"no native kernel ({cc[0]} --version did not answer within {VERSION_TIMEOUT_S:g} s)"
        _notes.append(f"{reason}; running the PyTorch path")
        return reason
    except (OSError, subprocess.CalledProcessError, GenError) as exc:
        return f"no native kernel ({exc.__class__.__name__}: {exc})"
    if reason := abi.bind(lib):
        return reason
    if not lib.gen_openmp():
        _notes.append(f"{cc[0]} has no OpenMP: the native kernel was built without it and runs on one thread")
    return lib


def native_status() -> str:
    """'ready', or why the native kernel cannot be used on this machine."""
    lib = library()
    return lib if isinstance(lib, str) else "ready"


def has_openmp() -> bool:
    """Whether the kernel was built with OpenMP (else every step runs on one thread)."""
    lib = library()
    return not isinstance(lib, str) and bool(lib.gen_openmp())


def take_notes() -> list[str]:
    """Notes about the kernel cache (a damaged library rebuilt) not shown yet; each is returned once."""
    notes = list(_notes)
    _notes.clear()
    return notes
