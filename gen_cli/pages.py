"""Memory for weights: the 2 MB-page arena a decode layout streams its matrices from, giving back the resident
pages of memory-mapped files (a model loaded in place keeps only what it still reads), and the heap glibc
keeps after large frees."""

from __future__ import annotations

import itertools
import math
import mmap
import sys
import weakref
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


HUGE_PAGE = 2 << 20
_ARENAS: dict[int, tuple[int, int]] = {}  # id(region) → (start, end) of every live arena, for in_arena


def huge_page_region(nbytes: int) -> tuple[mmap.mmap, int] | None:
    """Anonymous memory for nbytes on 2 MB pages: a mapping of nbytes + 2 MB and the offset of its first 2 MB
    boundary (None where mmap has no private anonymous mappings, as on Windows: plain memory then). Private, not
    mmap's default shared mapping: shared memory gets no transparent huge pages; advised before first touch, so
    the pages are born huge. Whatever views it (a tensor, an array) keeps it mapped."""
    if not hasattr(mmap, "MAP_PRIVATE"):
        return None
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    import ctypes

    return region, -ctypes.addressof(ctypes.c_char.from_buffer(region)) % HUGE_PAGE


class WeightArena:
    """One anonymous region on 2 MB pages (advised before first touch, so the pages are born huge) that a
    loader writes the matrices a decode step streams into, each once, straight from the file's map.

    `take` hands out tensors one after another (each on a cache line); `next_to` one that starts where
    another ends, so two matrices the kernel reads as one (gate and up) join without a copy (`join_rows`)."""

    def __init__(self, nbytes: int) -> None:
        import torch

        self.used = 0
        if (huge := huge_page_region(nbytes)) is None:
            self.memory = torch.empty(nbytes, dtype=torch.uint8)
        else:
            region, skip = huge
            self.memory = torch.frombuffer(region, dtype=torch.uint8)[skip : skip + nbytes]
            _ARENAS[id(region)] = (self.memory.data_ptr(), self.memory.data_ptr() + nbytes)
            weakref.finalize(region, _ARENAS.pop, id(region), None)  # unmapped: its range holds nothing now

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, align: int = 64) -> torch.Tensor:
        """The next free `shape` of `dtype` (uninitialised), starting on an `align`-byte boundary."""
        start = -(-self.used // align) * align
        nbytes = math.prod(shape) * dtype.itemsize
        if start + nbytes > self.memory.nbytes:
            raise AssertionError(f"weight arena of {self.memory.nbytes:,} B is full: sized from a wrong plan")
        self.used = start + nbytes
        return self.memory[start : start + nbytes].view(dtype).view(shape)

    @staticmethod
    def size(nbytes: list[int], align: int = 64) -> int:
        """Bytes an arena needs to `take` tensors of these sizes, one after another."""
        return sum(-(-n // align) * align for n in nbytes)


def arena_slots(
    shapes: dict[str, list[tuple[tuple[int, ...], torch.dtype]]],
) -> tuple[dict[str, list[torch.Tensor]], int]:
    """A place in one new WeightArena for every tensor named in `shapes` (name → its tensors' shapes and dtypes:
    a matrix held in parts has several), in order, except that an MLP's up rows (`.mlp.w3.`) start right where
    its gate rows (`.mlp.w1.`) end, so fusing the two is a view; and the arena's bytes."""
    arena = WeightArena(WeightArena.size([math.prod(s) * d.itemsize for runs in shapes.values() for s, d in runs]))
    slots: dict[str, list[torch.Tensor]] = {}
    for name, runs in shapes.items():
        if name in slots:
            continue
        slots[name] = [arena.take(s, d) for s, d in runs]
        up = name.replace(".mlp.w1.", ".mlp.w3.")
        if up != name and len(runs) == len(shapes.get(up, ())) == 1 and shapes[up][0][1] == runs[0][1]:
            slots[up] = [arena.take(shapes[up][0][0], runs[0][1], align=1)]
    return slots, arena.memory.nbytes


def copy_rows(
    dst: torch.Tensor,
    src: torch.Tensor,
    pages: PageReleaser,
    unit: int = 1,
    move: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    each: Callable[[torch.Tensor], None] | None = None,
    chunk_bytes: int = 1 << 20,
) -> None:
    """Copy `src` into `dst` (same rows) a few MB at a time, `unit` rows together (`move(dst, src)` when the
    rows are re-ordered on the way), calling `each` on every copied chunk, and give each chunk's file pages
    back once copied: a matrix read from a memory map is then never resident twice, whatever its size."""
    rows = src.shape[0]
    row_bytes = max(1, src.nbytes // max(1, rows))
    step = max(1, chunk_bytes // (unit * row_bytes)) * unit
    for r in range(0, rows, step):
        part, place = src[r : r + step], dst[r : r + step]
        (move or copy_into)(place, part)
        if each is not None:
            each(place)
        pages.release(part, keep_cached=True)  # read once, never written: unmapped, left in the page cache
    pages.release(src, keep_cached=True)  # the pages chunks shared at their edges


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src (any strides, same shape; a dtype change through torch). A same-dtype CPU copy is numpy's
    one-thread memcpy: torch splits even 1 MB between threads, and while other processes keep the cores busy
    each split waits for a descheduled thread (measured: 1 MB chunks copied at 0.06 GB/s, numpy's at 2 GB/s)."""
    import torch

    if dst.dtype != src.dtype or dst.device.type != "cpu" or src.device.type != "cpu":
        dst.copy_(src)
        return
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dst.element_size()]  # numpy has no bf16
    np_dst = dst.view(bits).numpy()
    np_dst[...] = src.view(bits).numpy()


def in_arena(t: torch.Tensor) -> bool:
    """Whether `t`'s memory lies in a live WeightArena (already on 2 MB pages: nothing to move)."""
    start = t.data_ptr()
    return any(lo <= start and start + t.nbytes <= hi for lo, hi in _ARENAS.values())


def join_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts' rows one after another, (sum of rows, …): a view when each part starts where the one before
    ends in the same memory (laid out so by a WeightArena), else one new tensor (torch.cat)."""
    import torch

    first = parts[0]
    adjacent = all(p.is_contiguous() and p.dtype == first.dtype and p.shape[1:] == first.shape[1:] for p in parts)
    adjacent = adjacent and all(
        b.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() and b.data_ptr() == a.data_ptr() + a.nbytes
        for a, b in itertools.pairwise(parts)
    )
    if not adjacent:
        return torch.cat(parts)
    rows = sum(p.shape[0] for p in parts)
    return first.new_empty(
        0
    ).set_(  # (rows, …) over the same storage
        first.untyped_storage(), first.storage_offset(), (rows, *first.shape[1:]), first.stride()
    )


class PageReleaser:
    """Drops the resident pages of tensors that are views of a memory-mapped file (a model loaded in place)
    once they are written: a streamed export then holds about one tensor's pages, not the whole file's.

    Only file-backed ranges are advised (MADV_PAGEOUT: clean pages are re-read from the file if touched
    again); anonymous memory, a trained model's, is never touched. A no-op where Linux's madvise is missing."""

    MADV_PAGEOUT = 21
    MADV_DONTNEED = 4

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

    def release(self, t: torch.Tensor, keep_cached: bool = False) -> None:
        """Advise the kernel that `t`'s whole pages, when inside a file mapping, are not needed now. With
        `keep_cached` they are only unmapped from this process (MADV_DONTNEED: the page cache keeps them for
        the next process to open the file; for pages never written, as a loader's are) instead of paged out."""
        if self.madvise is None or t.device.type != "cpu":
            return
        if t.is_contiguous():  # its own bytes: a chunk of a tensor gives back that chunk only
            self.release_range(t.data_ptr(), t.nbytes, keep_cached)
        else:
            storage = t.untyped_storage()
            self.release_range(storage.data_ptr(), storage.nbytes(), keep_cached)

    def release_range(self, start: int, nbytes: int, keep_cached: bool = False) -> None:
        """`release` for the bytes [start, start + nbytes) of this process (a numpy view of a file's map)."""
        if self.madvise is None:
            return
        end, page = start + nbytes, mmap.PAGESIZE
        first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
        if last > first and any(lo <= first and last <= hi for lo, hi in self.ranges):
            advice = self.MADV_DONTNEED if keep_cached else self.MADV_PAGEOUT
            self.madvise(first, last - first, advice)  # advice: a failure changes nothing


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
