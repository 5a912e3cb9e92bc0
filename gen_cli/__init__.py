"""gen: a command-line lab for fast language-model inference."""

import os

__version__ = "0.1.0"


# Spins before an idle OpenMP thread sleeps: a few µs, longer than most gaps between a decode step's
# parallel regions, far shorter than libgomp's default (~3 ms).
SHORT_SPINS = "3000"


def _bounded_openmp_waits() -> None:
    """Let idle OpenMP threads spin only briefly before they sleep (libgomp's default spins ~3 ms).

    torch's libgomp serves both PyTorch and the native step and reads this once, when torch loads, so
    it is set here, before any torch import. With another CPU-bound process on the cores, a thread
    spinning for milliseconds holds a core while its partner waits to be scheduled: decode fell
    10-100x. Sleeping at once (passive) avoids that but pays a wake-up at each of the step's ~200
    parallel regions: quantized decode ran 2-3x slower than spinning on an idle machine. A short spin
    keeps both (`gen bench contention` measures the three modes idle and busy). GEN_OMP_WAIT=spin
    restores libgomp's default, GEN_OMP_WAIT=passive sleeps at once; OMP_WAIT_POLICY/GOMP_SPINCOUNT win
    if set.
    """
    mode = os.environ.get("GEN_OMP_WAIT", "short")
    if mode == "spin" or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    if mode == "passive":
        os.environ["OMP_WAIT_POLICY"] = "passive"
    else:
        os.environ["GOMP_SPINCOUNT"] = SHORT_SPINS


_bounded_openmp_waits()
