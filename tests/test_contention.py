"""The contention benchmark and the OpenMP wait setting it measures (figures are not asserted)."""

import os
import subprocess
import sys

from gen_cli.lab.contention import (
    COMPETITOR,
    COMPETITOR_S,
    ContentionRow,
    bench_contention,
    format_rows,
    start_competitor,
    targets,
)


def _waits(env: dict[str, str]) -> str:
    code = "import gen_cli, os; print(os.environ.get('OMP_WAIT_POLICY', '-'), os.environ.get('GOMP_SPINCOUNT', '-'))"
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "GEN_OMP_WAIT")}
    return subprocess.run([sys.executable, "-c", code], env=clean | env, capture_output=True, text=True).stdout.strip()


def test_gen_bounds_openmp_spinning_before_torch_loads():
    assert _waits({}) == "- 3000"  # a brief spin, then sleep
    assert _waits({"GEN_OMP_WAIT": "passive"}) == "passive -"
    assert _waits({"GEN_OMP_WAIT": "spin"}) == "- -"  # libgomp's default: the before/after switch
    assert _waits({"OMP_WAIT_POLICY": "active"}) == "active -"  # the user's own choice wins
    assert _waits({"GOMP_SPINCOUNT": "7"}) == "- 7"


def test_bench_contention_measures_idle_and_busy_and_kills_its_competitor():
    competitors = []
    rows = bench_contention(
        shape="tiny", threads=("default", "1"), rounds=1, tokens=4, on_competitor=competitors.append
    )
    assert [(r.wait, r.threads, r.path) for r in rows] == [("short", "default", "native"), ("short", "1", "native")]
    for r in rows:
        assert r.idle_tok_s > 0 and r.busy_tok_s > 0 and len(r.idle_runs) == len(r.busy_runs) == 1
        assert r.to_dict()["busy_ratio"] == r.busy_ratio == r.busy_tok_s / r.idle_tok_s
        assert sum(r.busy_steps_by_threads.values()) == 3  # every native decode step counted (4 tokens: 3 steps)
    assert rows[1].busy_steps_by_threads == {"1": 3}  # a fixed count is kept
    assert len(competitors) == 1 and competitors[0].poll() is not None  # started once, and gone
    names = [t["target"] for t in targets(rows)]
    assert names == [
        "default threads busy/idle ≥ 0.55 (short, native)",
        "default threads busy ≥ 1 thread busy (short, native)",
    ]
    assert len(format_rows(rows)) == 1 + len(rows) + len(names)


def test_competitor_ends_by_itself():
    assert f"+ {COMPETITOR_S}" in COMPETITOR and "while time.monotonic() < end" in COMPETITOR
    proc = start_competitor()
    try:
        assert proc.poll() is None  # running: a real CPU-bound process
    finally:
        proc.kill()
        proc.wait()


def test_targets_from_rows():
    def row(threads, idle, busy):
        return ContentionRow("short", threads, "native", idle, busy, [idle], [busy], 0.0)

    found = targets([row("default", 200.0, 100.0), row("1", 120.0, 110.0), row("2", 205.0, 50.0)])
    assert [(t["met"], round(t["value"], 3)) for t in found] == [(False, 0.5), (False, 0.909), (True, 0.976)]
    assert targets([row("1", 100.0, 90.0)]) == []  # nothing to check without the default row


def test_cli_bench_contention_json():
    import json

    from typer.testing import CliRunner

    from gen_cli.cli import app

    args = ["bench", "contention", "--shape", "tiny", "--threads", "1", "--rounds", "1"]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "4", "--waits", "passive,short", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["wait"] for r in data["rows"]] == ["passive", "short"] and all("busy_ratio" in r for r in data["rows"])
    assert data["targets"] == []  # no default-threads row asked for
    bad = CliRunner().invoke(app, ["bench", "contention", "--waits", "yield"])
    assert bad.exit_code == 2 and "--waits" in bad.output
    bad = CliRunner().invoke(app, ["bench", "contention", "--threads", "auto"])
    assert bad.exit_code == 2 and "--threads" in bad.output
