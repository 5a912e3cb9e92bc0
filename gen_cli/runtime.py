"""Run-time environment choices (device, dtype, threads, the heap's policy) and honest peak-memory measurement."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from gen_cli.errors import UsageError

if TYPE_CHECKING:  # torch is imported where a function needs it: a CPU PeakMemory or LoadProbe does not
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
           "fp16": "float16"}  # fmt: skip


def _mps_available() -> bool:
    import torch

    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' = cuda if available, else mps, else cpu; an unavailable explicit choice is a UsageError."""
    import torch

    name = name.lower()
    if name not in DEVICES:
        raise UsageError(f"unknown device {name!r}; choose {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "device cuda: no CUDA device is available (or torch is a CPU build); use device cpu", params=("device",)
        )
    elif name == "mps" and not _mps_available():
        raise UsageError("device mps: Apple MPS is not available on this machine; use device cpu", params=("device",))
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """float32/fp32, bfloat16/bf16 or float16/fp16; fp16 is refused on CPU."""
    import torch

    if name.lower() not in _DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose float32, bfloat16 or float16")
    dtype = getattr(torch, _DTYPES[name.lower()])
    if dtype == torch.float16 and device.type == "cpu":
        raise UsageError("float16 is not supported on CPU (slow and partly unimplemented); use bfloat16 or float32")
    return dtype


def run_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` = bfloat16 on a CUDA device that supports it, else float32; other names as `resolve_dtype`."""
    import torch

    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return resolve_dtype(name, device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


MAX_THREADS = 1024


def set_threads(n: int | None) -> int:
    """Set torch's intra-op thread count (None keeps the default); return the count in use."""
    import torch

    if n is not None:
        torch.set_num_threads(check_threads(n))
    return torch.get_num_threads()


# glibc's mallopt parameters (malloc.h). Allocations from HEAP_MMAP_THRESHOLD up are mapped on their own: 32 MB is
# as far as glibc's own adaptive threshold goes, and 256 MB measured the same on 1B-shaped 512-token prompts.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_MMAP_THRESHOLD = 32 << 20
HEAP_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: freed heap is in effect never handed back


def keep_freed_heap() -> bool:
    """Have glibc's malloc serve allocations under 32 MB from its heap and keep what is freed there; whether it took
    (elsewhere nothing changes).

    By default glibc maps a large allocation on its own and unmaps it when freed, and hands freed heap back to the
    system, so every prompt's activations (a few MB a tensor, each op's output new) faulted their pages in again:
    a 512-token prompt ran 1.13x faster on the 1B Q5_K_M file (page faults over 9 prompts 1.7M -> 0.12M) and
    1.06-1.2x on the 135M F32 file with this (`docs/performance.md`). The process keeps its peak of freed memory
    for the next prompt instead of returning it."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on (musl's is a no-op returning 0)
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)
    )


def check_threads(n: int) -> int:
    """n, refused unless 1 … MAX_THREADS: OpenMP allocates per-thread state up front, and a billion threads
    aborts the process in libgomp."""
    if not 1 <= n <= MAX_THREADS:
        raise UsageError(f"threads must be between 1 and {MAX_THREADS}, got {n}", params=("threads",))
    return n


def default_threads() -> int:
    """The threads a CPU run uses unless told: one per physical core this process may run on (PyTorch's default
    too: a second hyperthread per core adds contention, not bandwidth)."""
    import psutil

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(allowed, psutil.cpu_count(logical=False) or allowed))


def synchronize(device: torch.device | str) -> None:
    """Wait for queued device work, so a clock read after it measures finished work."""
    kind = device_kind(device)
    if kind == "cpu":
        return
    import torch

    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


def device_kind(device: torch.device | str) -> str:
    """cpu, cuda or mps, from a torch.device or its name (no torch import for a name)."""
    return device if isinstance(device, str) and ":" not in device else str(device).split(":")[0]


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets the kernel's VmHWM (peak RSS) to the current RSS (Linux ≥ 4.0).
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _ru_maxrss_bytes() -> int:
    import resource  # POSIX only; imported here so the module still loads elsewhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Context manager: peak memory above the level at entry; `.bytes` and `.method` after exit.

    CUDA: max_memory_allocated after reset_peak_memory_stats, minus the allocation at entry.
    CPU (Linux): VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS at entry.
    Elsewhere a weaker measure is used and named in `.method`.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device, self.kind = device, device_kind(device)
        self.bytes = 0
        self.method = ""
        self._baseline = 0
        self._mode = ""

    def __enter__(self) -> PeakMemory:
        synchronize(self.device)
        if self.kind == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            self._mode, self.method = "cuda", "cuda max_memory_allocated above baseline"
        elif self.kind == "mps":
            import torch

            self._baseline = torch.mps.current_allocated_memory()
            self._mode, self.method = "mps", "mps allocated at end above baseline (no peak counter)"
        else:
            rss = _proc_status_kb("VmRSS")
            if rss is not None and _reset_peak_rss() and _proc_status_kb("VmHWM") is not None:
                self._baseline = rss * 1024
                self._mode, self.method = "vmhwm", "peak RSS above baseline (VmHWM)"
            else:
                # No resettable peak: ru_maxrss is the process's lifetime peak, so this can over-report.
                self._baseline = _ru_maxrss_bytes()
                self._mode, self.method = "ru_maxrss", "growth of lifetime peak RSS (ru_maxrss, not resettable)"
        return self

    def measure(self) -> int:
        """Peak bytes above the entry level so far."""
        synchronize(self.device)
        if self._mode in ("cuda", "mps"):
            import torch
        if self._mode == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._mode == "mps":
            peak = torch.mps.current_allocated_memory()
        elif self._mode == "vmhwm":
            peak = (_proc_status_kb("VmHWM") or 0) * 1024
        else:
            peak = _ru_maxrss_bytes()
        self.bytes = max(0, peak - self._baseline)
        return self.bytes

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.measure()


# Another process using more than this many cores during a timed run makes its figures suspect.
BUSY_CORES = 0.5


def _cpu_busy_seconds(stat: Path = Path("/proc/stat")) -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), or None elsewhere."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(f) for f in fields]
    except (OSError, ValueError):
        return None
    if len(ticks) < 4:  # not the `cpu user nice system idle ...` line: no idle count to subtract
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()  # this process and its finished children
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class MachineLoad:
    """The machine's load during a timed run: what other processes took while this one measured."""

    cores: int
    others_cores: float | None  # CPU time other processes used, in cores (None: no /proc/stat)
    load_avg_1m: float | None  # at the end of the run

    @property
    def busy(self) -> bool:
        return self.others_cores is not None and self.others_cores > BUSY_CORES

    def describe(self) -> str:
        """One short phrase for a report footer."""
        parts = (
            [f"other processes used {self.others_cores:.1f} of {self.cores} cores"]
            if self.others_cores is not None
            else []
        )
        if self.load_avg_1m is not None:
            parts.append(f"load average {self.load_avg_1m:.1f}")
        text = ", ".join(parts) or "machine load unknown"
        return f"{text} (busy: figures may be off)" if self.busy else text

    def to_dict(self) -> dict[str, float | int | bool | None]:
        return asdict(self) | {"busy": self.busy}


class LoadProbe:
    """Context manager: `.load` (a MachineLoad) after exit, from /proc/stat minus this process's own CPU."""

    def __enter__(self) -> LoadProbe:
        self._wall, self._busy, self._own = time.perf_counter(), _cpu_busy_seconds(), _own_cpu_seconds()
        return self

    def measure(self) -> MachineLoad:
        wall = max(time.perf_counter() - self._wall, 1e-9)
        busy = _cpu_busy_seconds()
        others = None
        if busy is not None and self._busy is not None:
            # Clock ticks are coarse (10 ms): clamp the small negatives rounding gives on short runs.
            others = max(0.0, (busy - self._busy - (_own_cpu_seconds() - self._own)) / wall)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self.load = MachineLoad(os.cpu_count() or 1, others, load)
        return self.load

    def __exit__(self, *exc: object) -> None:
        self.measure()


def spread_verdict(a: list[float], b: list[float], busy: bool) -> str | None:
    """None when the two sets of repeats support a ratio between them, else why not (for the report)."""
    if busy:
        return "not significant: machine busy"
    if len(a) < 2 or len(b) < 2:
        return "one run each: no spread"
    if min(a) <= max(b) and min(b) <= max(a):
        return "not significant: spreads overlap"
    return None
