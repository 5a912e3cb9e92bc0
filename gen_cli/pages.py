"""Giving memory back: the resident pages of memory-mapped files (a model loaded in place keeps only what it
still reads), and the heap glibc keeps after large frees."""

from __future__ import annotations

import mmap
import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class PageReleaser:
    """Drops the resident pages of tensors that are views of a memory-mapped file (a model loaded in place)
    once they are written: a streamed export then holds about one tensor's pages, not the whole file's.

    Only file-backed ranges are advised (MADV_PAGEOUT: clean pages are re-read from the file if touched
    again); anonymous memory, a trained model's, is never touched. A no-op where Linux's madvise is missing."""

    MADV_PAGEOUT = 21

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.paths: list[str] = []
        self.madvise: Any = None
        if not sys.platform.startswith("linux"):
            return
        try:
            import ctypes

            with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
                for line in f:  # "start-end perms offset dev inode path": inode ≠ 0 is a file
                    fields = line.split()
                    if len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/"):
                        start, end = (int(x, 16) for x in fields[0].split("-"))
                        self.ranges.append((start, end))
                        self.paths.append(" ".join(fields[5:]))
            libc = ctypes.CDLL(None, use_errno=True)
            self.madvise = libc.madvise
            self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError, ValueError):
            self.madvise = None

    def release_files(self, source: str | Path) -> None:
        """Drop every mapped page of the files at or under `source` (what loading it touched: fused q/k/v
        read through the map, say); the export reads each tensor again when it writes it."""
        root = str(Path(source).resolve())
        for (start, end), path in zip(self.ranges, self.paths, strict=True):
            if self.madvise is not None and (path == root or path.startswith(root.rstrip("/") + "/")):
                self.madvise(start, end - start, self.MADV_PAGEOUT)

    def release(self, t: torch.Tensor) -> None:
        """Advise the kernel that `t`'s whole pages, when inside a file mapping, are not needed now."""
        if self.madvise is None or t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
        if last > first and any(lo <= first and last <= hi for lo, hi in self.ranges):
            self.madvise(first, last - first, self.MADV_PAGEOUT)  # advice: a failure changes nothing


def return_free_heap() -> None:
    """Return glibc's free heap to the OS (Linux). After a large free glibc raises its mmap threshold (up to
    32 MiB), so later blocks below it come from the heap and stay resident once freed: RSS would count
    memory no longer in use. Elsewhere (not glibc) a no-op."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, looked up once (a layout calls it after every matrix it moves), or None."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
