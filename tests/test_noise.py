"""Machine-load probe and the significance verdict every timed report prints."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from gen_cli import runtime
from gen_cli.runtime import BUSY_CORES, LoadProbe, MachineLoad, spread_verdict


def test_spread_verdict():
    assert spread_verdict([10, 11, 12], [20, 21, 22], busy=False) is None
    assert spread_verdict([22, 21, 20], [12, 10, 11], busy=False) is None  # either side may be the faster
    assert spread_verdict([10, 15], [14, 20], busy=False) == "not significant: spreads overlap"
    assert spread_verdict([10, 15], [15, 20], busy=False) == "not significant: spreads overlap"  # a shared end
    assert spread_verdict([10, 11], [20, 21], busy=True) == "not significant: machine busy"
    assert spread_verdict([10], [20, 21], busy=False) == "one run each: no spread"
    assert spread_verdict([10], [20], busy=False) == "one run each: no spread"


def _stat(tmp_path: Path, first_line: str) -> Path:
    path = tmp_path / "stat"
    path.write_text(first_line + "\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 123\n")
    return path


def test_busy_seconds_from_a_proc_stat_line(tmp_path):
    tick = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal guest guest_nice: guest time is already counted in
    # user, so only the first 8 fields count, and idle and iowait are not busy time.
    line = "cpu  100 5 50 1000 20 3 7 9 400 400"
    assert runtime._cpu_busy_seconds(_stat(tmp_path, line)) == pytest.approx((100 + 5 + 50 + 3 + 7 + 9) / tick)
    # An old kernel's four fields (no iowait): everything but idle is busy.
    assert runtime._cpu_busy_seconds(_stat(tmp_path, "cpu 30 0 12 500")) == pytest.approx(42 / tick)


@pytest.mark.parametrize("line", ["cpu 1 2 x 4 5", "cpu 1 2", "cpu", ""])
def test_an_unreadable_proc_stat_gives_no_figure(tmp_path, line):
    assert runtime._cpu_busy_seconds(_stat(tmp_path, line)) is None


def test_a_missing_proc_stat_gives_no_figure(tmp_path):
    assert runtime._cpu_busy_seconds(tmp_path / "no-such-stat") is None


def _fake_clocks(monkeypatch, busy, own, wall, cores=2, loadavg=(1.25, 0.5, 0.25)):
    """Replace the probe's readers: each of busy, own, wall is (value at entry, value at exit)."""
    readings = {"busy": list(busy), "own": list(own), "wall": list(wall)}
    monkeypatch.setattr(runtime, "_cpu_busy_seconds", lambda: readings["busy"].pop(0))
    monkeypatch.setattr(runtime, "_own_cpu_seconds", lambda: readings["own"].pop(0))
    monkeypatch.setattr(runtime, "time", SimpleNamespace(perf_counter=lambda: readings["wall"].pop(0)))
    fake_os = SimpleNamespace(cpu_count=lambda: cores)
    if loadavg is not None:
        fake_os.getloadavg = lambda: loadavg
    monkeypatch.setattr(runtime, "os", fake_os)
    return readings


def test_probe_counts_other_processes_cpu_per_wall_second(monkeypatch):
    # 2 s of wall time: the machine was busy 3 CPU seconds, 1 of them ours, so others used 1 core.
    readings = _fake_clocks(monkeypatch, busy=(100.0, 103.0), own=(10.0, 11.0), wall=(50.0, 52.0))
    with LoadProbe() as probe:
        pass
    assert not any(readings.values()), "each reader is read once at entry and once at exit"
    assert probe.load == MachineLoad(cores=2, others_cores=pytest.approx(1.0), load_avg_1m=1.25)
    assert probe.load.busy
    assert probe.load.describe() == ("other processes used 1.0 of 2 cores, load average 1.2 (busy: figures may be off)")
    assert probe.load.to_dict() == {"cores": 2, "others_cores": 1.0, "load_avg_1m": 1.25, "busy": True}


def test_probe_clamps_tick_rounding_to_zero(monkeypatch):
    # A short run: our own CPU time (os.times) reads more than the machine's coarse ticks did.
    _fake_clocks(monkeypatch, busy=(100.0, 100.01), own=(10.0, 10.03), wall=(0.0, 0.05))
    with LoadProbe() as probe:
        pass
    assert probe.load.others_cores == 0.0
    assert not probe.load.busy


def test_probe_at_the_busy_threshold(monkeypatch):
    # Exactly BUSY_CORES of other work is still quiet; a little more is busy.
    _fake_clocks(monkeypatch, busy=(0.0, 4 * BUSY_CORES), own=(0.0, 0.0), wall=(0.0, 4.0))
    with LoadProbe() as edge:
        pass
    assert edge.load.others_cores == BUSY_CORES and not edge.load.busy
    _fake_clocks(monkeypatch, busy=(0.0, 4 * BUSY_CORES + 0.04), own=(0.0, 0.0), wall=(0.0, 4.0))
    with LoadProbe() as over:
        pass
    assert over.load.busy


def test_probe_without_proc_stat_or_load_average(monkeypatch):
    _fake_clocks(monkeypatch, busy=(None, None), own=(0.0, 1.0), wall=(0.0, 1.0), cores=8, loadavg=None)
    with LoadProbe() as probe:
        pass
    assert probe.load == MachineLoad(cores=8, others_cores=None, load_avg_1m=None)
    assert not probe.load.busy
    assert probe.load.describe() == "machine load unknown"


def test_probe_with_a_load_average_only(monkeypatch):
    _fake_clocks(monkeypatch, busy=(None, 7.0), own=(0.0, 1.0), wall=(0.0, 1.0), loadavg=(3.04, 0, 0))
    with LoadProbe() as probe:
        pass
    assert probe.load.others_cores is None  # no figure at entry: no difference to take
    assert probe.load.describe() == "load average 3.0"


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="Linux /proc/stat only")
def test_load_probe_reads_this_machine():
    with LoadProbe() as probe:
        sum(i * i for i in range(200_000))
    assert probe.load.cores == os.cpu_count()
    assert probe.load.others_cores is not None and probe.load.others_cores >= 0
    assert probe.load.load_avg_1m == pytest.approx(
        os.getloadavg()[0], abs=2
    )  # the 1-minute average, read moments apart


def test_machine_load_describe():
    assert MachineLoad(2, 1.5, 3.0).describe() == (
        "other processes used 1.5 of 2 cores, load average 3.0 (busy: figures may be off)"
    )
    assert MachineLoad(2, 0.1, 0.2).describe() == "other processes used 0.1 of 2 cores, load average 0.2"
    assert MachineLoad(2, None, None).describe() == "machine load unknown"
