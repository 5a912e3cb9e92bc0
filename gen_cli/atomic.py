"""Atomic file writes: write to a temporary name beside the target, then rename into place."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gen_cli.errors import GenError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success fsync it and rename it over `target`.

    A crash or exception at any point leaves the previous `target` (if any) untouched.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise GenError(f"cannot write {target}: {e.strerror or e}") from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp (and some writers) make the file private; give it the permissions open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
    except Exception as e:
        # A full disk surfaces as OSError or as the writer's own error (safetensors' SafetensorError):
        # one line naming the file; the previous target is untouched either way.
        if isinstance(e, OSError) or type(e).__module__.split(".")[0] == "safetensors":
            raise GenError(f"cannot write {target}: {getattr(e, 'strerror', None) or e}") from e
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
