"""The garbage collector around a command's start-up (gen_cli/collector.py): rare collections while the CLI loads,
the loaded objects frozen out of its view once a model is open, the usual thresholds back; a library caller that
never paused keeps its collector as it was."""

from __future__ import annotations

import gc
import weakref

import pytest

from gen_cli import collector
from gen_cli.infer.engine import open_model
from gen_cli.infer.options import EngineOptions


@pytest.fixture
def restore_gc():
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    collector._usual = None


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_pause_collects_rarely_until_a_model_is_open_then_freezes_it(restore_gc):
    usual = gc.get_threshold()
    collector.pause()
    collector.pause()  # a second pause keeps the first's saved thresholds
    assert gc.get_threshold() == collector.STARTUP_THRESHOLDS
    open_model(None, EngineOptions(native=False))
    assert gc.get_threshold() == usual and gc.get_freeze_count() > 0
    frozen = gc.get_freeze_count()
    open_model(None, EngineOptions(native=False))  # no pause in effect: nothing more frozen
    # A freeze would add every live object (hundreds of thousands here); frozen objects may still die by their
    # refcount meanwhile (a full run once saw 2 fewer, a thread of an earlier test ending), so the count may fall.
    assert gc.get_freeze_count() <= frozen and gc.get_threshold() == usual


def test_the_start_ups_garbage_is_collected_not_frozen(restore_gc):
    collector.pause()
    garbage = weakref.ref(_Cycle())  # unreachable, kept only by its own cycle
    collector.resume_frozen()
    assert garbage() is None and gc.get_freeze_count() > 0  # collected first; what was alive is frozen


def test_a_library_caller_that_never_paused_keeps_its_collector(restore_gc):
    gc.set_threshold(1234, 5, 6)
    open_model(None, EngineOptions(native=False))
    assert gc.get_threshold() == (1234, 5, 6) and gc.get_freeze_count() == 0
