"""The native step's thread count: lowered while other processes keep cores busy, and reported."""

import os

import pytest

from gen_cli.native import threads as governor_module
from gen_cli.native.threads import ThreadGovernor, _busy_seconds, describe


def governor(requested: int, cpus: int) -> ThreadGovernor:
    g = ThreadGovernor(requested, adaptive=True)
    g.cpus = list(range(cpus))
    return g


def test_a_busy_core_is_given_up_and_taken_back_with_a_gap():
    g = governor(2, 2)
    assert g.choose(0.2) == 2 and g.choose(0.45) == 2  # a little other work: both cores
    g.current = g.choose(0.7)  # a competitor beside a 2-thread step gets about 2/3 of a core
    assert g.current == 1
    assert g.choose(1.0) == 1 and g.choose(0.4) == 1  # not back while the other work is near the edge
    assert g.choose(0.25) == 2  # back once it is gone
    assert governor(2, 2).choose(5.0) == 1  # never fewer than one


def test_more_cores_and_a_requested_ceiling():
    g = governor(8, 16)
    assert g.choose(3.0) == 8  # plenty free: as requested, never more
    assert g.choose(9.6) == 6  # 16 cores, 10 taken
    g = governor(16, 16)
    g.current = 13
    assert g.choose(3.4) == 13  # 3 taken and 0.4 of a fourth: no change either way


def test_threads_follows_the_measured_load(monkeypatch):
    g = governor(2, 2)
    g._sample, g._next = (9.5, 99.5, 0.0), 0.0  # the last sample: at 9.5 s, 99.5 busy seconds, none of ours
    soon = 10.0 + governor_module.INTERVAL_S / 2
    clock = iter([10.0, 10.0, soon, 10.6, 10.6])  # each re-measure reads the clock twice
    busy = iter([100.0, 100.06])
    monkeypatch.setattr(governor_module.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(governor_module.time, "process_time", lambda: 0.0)
    monkeypatch.setattr(governor_module, "_busy_seconds", lambda cpus: next(busy))
    # 0.5 busy seconds in 0.5 s: one core taken; then too soon to look again; then 0.06 s in 0.6 s
    assert [g.threads(2) for _ in range(3)] == [1, 1, 2]
    report = g.report()
    assert report["steps_by_threads"] == {"2": 1, "1": 2} and report["others_cores"] == 0.1 and report["cpus"] == 2
    assert "0.1 of the 2 cores" in report["reason"]
    assert g.report()["steps_by_threads"] == {}  # each report starts a new count


def test_fixed_threads_and_requested_changes():
    g = ThreadGovernor(2, adaptive=False)
    g.current = 1
    assert g.threads(2) == 2 and g.threads(3) == 3
    report = g.report()
    assert report["steps_by_threads"] == {"3": 1, "2": 1} and "fixed" in report["reason"]
    assert describe(report).startswith("3 for 1 of 2 steps, 2 for 1 of 2 steps (3 requested; fixed")


def test_env_switches_adaptation_off(monkeypatch):
    monkeypatch.setenv("GEN_ADAPT_THREADS", "0")
    assert not ThreadGovernor(2).adaptive
    monkeypatch.delenv("GEN_ADAPT_THREADS")
    assert ThreadGovernor(2).adaptive


def test_busy_seconds_reads_only_the_allowed_cpus(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal
    stat.write_text(
        "cpu  300 0 100 1000 50 0 0 0 0 0\ncpu0 100 0 50 500 25 0 0 0 0 0\ncpu1 200 0 50 500 25 0 0 0 0 0\nintr 12345\n"
    )
    tick = os.sysconf("SC_CLK_TCK")
    assert _busy_seconds([1], stat) == pytest.approx(250 / tick)
    assert _busy_seconds([0, 1], stat) == pytest.approx(400 / tick)
    assert _busy_seconds([0], tmp_path / "missing") is None
