"""How many threads the native decode step uses: the requested count, lowered while other processes keep cores busy.

A step runs ~200 parallel regions, each ending in a barrier. When another CPU-bound process shares the
cores, one of the step's threads is often descheduled, and every barrier then waits for the scheduler to
run it again: two threads beside one busy process decoded at 0.26x their idle speed, while one thread kept
0.58x. So the step uses only the cores that are actually free: every `INTERVAL_S` it reads how much CPU
other processes took on the CPUs this process may run on (/proc/stat per CPU, minus this process's own
time) and picks the thread count from that. `GEN_ADAPT_THREADS=0` keeps the requested count fixed.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

INTERVAL_S = 0.05  # 5 clock ticks a core: enough to see a competitor, soon enough to leave few steps on its core
FIRST_S = 0.05  # the first look, counted from the model's layout: a short run is judged too (5 ticks a core)
# A core counts as taken when other processes use at least TAKE of it, and as free again below FREE: the
# gap keeps the count from flapping at the edge.
TAKE, FREE = 0.5, 0.3


def _allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask; every CPU where that is unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _busy_seconds(cpus: list[int], stat: Path = Path("/proc/stat")) -> float | None:
    """CPU seconds spent busy since boot on `cpus` (the per-CPU lines of /proc/stat), or None without it."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    wanted, total = {f"cpu{c}" for c in cpus}, 0
    for line in lines[1:]:
        fields = line.split()
        if not fields or not fields[0].startswith("cpu"):
            break  # the per-CPU lines come first, right after the total
        if fields[0] in wanted and len(fields) >= 5:
            ticks = [int(f) for f in fields[1:9]]
            total += sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    return total / os.sysconf("SC_CLK_TCK") if total else None


class ThreadGovernor:
    """The native step's thread count: `requested`, lowered to the cores other processes leave free."""

    def __init__(self, requested: int = 1, adaptive: bool | None = None) -> None:
        self.requested = requested
        self.adaptive = os.environ.get("GEN_ADAPT_THREADS", "1") != "0" if adaptive is None else adaptive
        self.cpus = _allowed_cpus()
        self.current = requested
        self.others_cores: float | None = None  # the last measure of what other processes took
        self.steps: Counter[int] = Counter()  # steps run at each thread count since the last report
        self._sample = self._read()
        self._next = time.perf_counter() + FIRST_S

    def _read(self) -> tuple[float, float | None, float]:
        return time.perf_counter(), _busy_seconds(self.cpus), time.process_time()

    def threads(self, requested: int) -> int:
        """The count for the next step, at most `requested` (re-measured at most every INTERVAL_S); counts it."""
        if requested != self.requested:
            self.requested = self.current = requested
        if not self.adaptive:
            self.current = self.requested
        elif (now := time.perf_counter()) >= self._next:
            self._next = now + INTERVAL_S
            before, self._sample = self._sample, self._read()
            wall = self._sample[0] - before[0]
            if before[1] is not None and self._sample[1] is not None and wall > 0:
                # What ran on our CPUs that was not us; clock ticks are coarse, so clamp small negatives.
                own = self._sample[2] - before[2]
                self.others_cores = max(0.0, (self._sample[1] - before[1] - own) / wall)
                self.current = self.choose(self.others_cores)
        self.steps[self.current] += 1
        return self.current

    def choose(self, others: float) -> int:
        """The thread count beside `others` cores' worth of other work, from the current one."""
        n = len(self.cpus)
        most = n - math.floor(others + 1 - TAKE)  # cores left once each TAKE-busy core is given up
        least = n - math.floor(others + 1 - FREE)  # a core comes back only when used below FREE
        pick = min(self.current, most) if self.current > most else max(self.current, least)
        return max(1, min(self.requested, pick))

    def report(self) -> dict[str, Any]:
        """What was chosen since the last report, and why (for --stats / --json); starts a new count."""
        steps, self.steps = self.steps, Counter()
        others = self.others_cores
        if not self.adaptive:
            reason = "fixed (GEN_ADAPT_THREADS=0)"
        elif others is None and self._sample[1] is None:
            reason = "no load measure on this system (/proc/stat): as requested"
        elif others is None:
            reason = f"the run ended before the first look at the load ({FIRST_S * 1000:.0f} ms): as requested"
        else:
            reason = f"other processes used {others:.1f} of the {len(self.cpus)} cores this process may run on"
        return {
            "requested": self.requested,
            "adaptive": self.adaptive,
            "steps_by_threads": {str(k): v for k, v in sorted(steps.items(), reverse=True)},
            "others_cores": None if others is None else round(others, 2),
            "cpus": len(self.cpus),
            "reason": reason,
        }


def describe(choice: dict[str, Any]) -> str:
    """One line for --stats: `2 of 2 requested (128 steps)` or `1 for 96 of 128 steps: <reason>`."""
    steps = {int(k): v for k, v in choice["steps_by_threads"].items()}
    total = sum(steps.values())
    if not total:
        return f"{choice['requested']} requested (no native steps)"
    used = ", ".join(f"{k} for {v} of {total} steps" for k, v in steps.items())
    return f"{used} ({choice['requested']} requested; {choice['reason']})"
