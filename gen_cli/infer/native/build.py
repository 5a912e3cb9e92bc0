"""Building the native kernel: `decode.c` compiled once per source, compiler and CPU into gen's cache.

`-march=native`: the binary is for this machine only. Without a working C compiler gen runs the
PyTorch path, and `native_status()` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from gen_cli.infer.native import abi
from gen_cli.resources import cache_dir

SOURCE = Path(__file__).with_name("decode.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC")


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC", "cc"))


def _build_key(cc: list[str]) -> str:
    """Source, flags, compiler version and CPU: a change in any of them means a new binary."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, check=True).stdout
    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    parts = (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(), cpu.encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


@cache
def library() -> ctypes.CDLL | str:
    """The compiled kernel, or a one-line reason it is unavailable."""
    cc = _compiler()
    try:
        out_dir = cache_dir() / "kernels"
        target = out_dir / f"decode-{_build_key(cc)}.so"
        if not target.is_file():
            out_dir.mkdir(parents=True, exist_ok=True)
            # Compile beside the target, then rename: a concurrent run never loads a half-written file.
            fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
            os.close(fd)
            try:
                done = subprocess.run([*cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
                if done.returncode != 0:
                    return f"{cc[0]} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"no native kernel ({exc.__class__.__name__}: {exc})"
    if reason := abi.bind(lib):
        return reason
    return lib


def native_status() -> str:
    """'ready', or why the native kernel cannot be used on this machine."""
    lib = library()
    return lib if isinstance(lib, str) else "ready"
