"""Python's cyclic garbage collector around a command's start-up: while torch and a model load (hundreds of
thousands of objects that live as long as the process), a collection would walk them all again and again; so the
start-up collects rarely, and once the model is laid out those objects are frozen out of the collector's view and
the usual thresholds return for whatever runs next (a server's loop makes real garbage)."""

from __future__ import annotations

import gc

STARTUP_THRESHOLDS = (100_000, 50, 100)  # youngest-generation allocations, then the older generations' counts
_usual: tuple[int, int, int] | None = None  # the thresholds `pause` replaced, while it is in effect


def pause() -> None:
    """Collect rarely from here (a command's start-up; the CLI's entry point calls it)."""
    global _usual
    if _usual is None:
        _usual = gc.get_threshold()
        gc.set_threshold(*STARTUP_THRESHOLDS)


def resume_frozen() -> None:
    """Once a model is loaded: if `pause` is in effect, collect the start-up's garbage once, move every object still
    alive out of the collector's view (gc.freeze: still freed when unreferenced, never walked again) and restore
    the usual thresholds."""
    global _usual
    if _usual is not None:
        gc.collect()  # the start-up's garbage first: frozen, it would stay for good (8 MB of RSS, for 0.04 s)
        gc.freeze()
        gc.set_threshold(*_usual)
        _usual = None
