"""The contention benchmark and the OpenMP wait setting it measures (figures are not asserted)."""

import os
import subprocess
import sys

from gen_cli.lab.contention import bench_contention, format_rows


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


def test_bench_contention_measures_idle_and_busy_per_mode():
    rows = bench_contention("tiny", threads=(1,), paths=("native",), rounds=1, tokens=4)
    assert [(r.wait, r.threads) for r in rows] == [("spin", 1), ("passive", 1), ("short", 1)]
    for r in rows:
        assert r.idle_tok_s > 0 and r.busy_tok_s > 0 and len(r.idle_runs) == len(r.busy_runs) == 1
        assert r.to_dict()["slowdown"] == r.slowdown
    assert len(format_rows(rows)) == 4


def test_cli_bench_contention_json():
    import json

    from typer.testing import CliRunner

    from gen_cli.cli import app

    args = ["bench", "contention", "--shape", "tiny", "--threads", "1", "--paths", "native", "--rounds", "1"]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "4", "--waits", "passive,short", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["wait"] for r in rows] == ["passive", "short"] and all("slowdown" in r for r in rows)
    bad = CliRunner().invoke(app, ["bench", "contention", "--waits", "yield"])
    assert bad.exit_code == 2 and "--waits" in bad.output
