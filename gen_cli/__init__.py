"""gen: a command-line lab for fast language-model inference."""

import os

__version__ = "0.1.0"


def _passive_openmp_waits() -> None:
    """Make idle OpenMP threads sleep at once instead of spinning (libgomp's default spins ~3 ms).

    torch's libgomp serves both PyTorch and the native step and reads this once, when torch loads, so
    it is set here, before any torch import. With another CPU-bound process on the cores, a spinning
    thread holds a core while its partner waits to be scheduled: decode fell 10-100x. A sleeping
    thread costs a wake-up instead (`gen bench contention` measures both modes idle and busy;
    GEN_OMP_WAIT=spin restores libgomp's default, and OMP_WAIT_POLICY/GOMP_SPINCOUNT win if set).
    """
    if os.environ.get("GEN_OMP_WAIT", "passive") == "spin":
        return
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "passive"


_passive_openmp_waits()
