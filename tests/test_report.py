"""gen_cli.lab.report: every output format and the terminal charts, on hand-made records (no torch needed)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from gen_cli.lab import charts, compare_charts, report


def row(attention="mha", kv_heads=4, kv_cache=True, rate=100.0, lat=None, **extra):
    lat = lat if lat is not None else [0.001] * 7
    r = {
        "attention": attention, "kv_heads": kv_heads, "n_heads": 4, "pos": "rope", "kv_cache": kv_cache,
        "prompt_len": 4, "gen_len": 8, "batch": 1, "dtype": "float32", "device": "cpu", "threads": 1,
        "params": 150_000, "decode_tokens_per_s": rate, "decode_tokens_per_s_min": rate * 0.9,
        "decode_tokens_per_s_max": rate * 1.1, "ttft_s": 0.002, "prefill_tokens_per_s": 2000.0,
        "ms_per_token": 1000 / rate, "kv_bytes_per_token": 128 * kv_heads,
        "kv_cache_bytes_analytic": 128 * kv_heads * 12 if kv_cache else 0,
        "kv_cache_bytes_measured": 128 * kv_heads * 12 if kv_cache else 0, "peak_memory_bytes": 3 << 20,
        "memory_method": "peak RSS above baseline (VmHWM)", "speedup": None, "speedup_vs_no_cache": None,
        "baseline": False, "greedy_match": True if kv_cache else None, "max_logit_diff": 1e-7 if kv_cache else None,
        "oracle": "float32 no-cache, same weights", "val_loss": None, "bits_per_byte": None,
        "samples": {"decode_tokens_per_s": [rate], "ttft_s": [0.002], "per_token_latencies_s": lat},
    }  # fmt: skip
    r.update(extra)
    return r


@pytest.fixture
def result():
    rows = [
        row(kv_cache=False, rate=50.0, baseline=True, speedup=1.0, lat=[0.001 * (i + 1) for i in range(7)]),
        row(rate=150.0, speedup=3.0, speedup_vs_no_cache=3.0),
        row("mqa", 1, rate=160.0, speedup=3.2),
    ]
    env = {"torch": "2.x", "device": "cpu", "device_name": "Test CPU", "dtypes": ["float32"], "threads": [1],
           "shape_source": "preset tiny", "weights": "random", "baseline": "first row",
           "shape": {"n_layer": 2, "d_model": 32, "n_head": 4, "d_ff": 96, "vocab_size": 300,
                     "context_length": 64}}  # fmt: skip
    return {"env": env, "rows": rows}


def test_json_has_env_and_rows(result):
    data = json.loads(report.render(result, "json"))
    assert set(data) == {"env", "rows"}
    assert data["rows"][1]["samples"]["per_token_latencies_s"] == [0.001] * 7


def test_jsonl_env_line_then_rows(result):
    lines = report.render(result, "jsonl").splitlines()
    assert json.loads(lines[0]) == {"env": result["env"]}
    assert [json.loads(line)["attention"] for line in lines[1:]] == ["mha", "mha", "mqa"]


def test_csv_header_and_rows(result):
    parsed = list(csv.DictReader(io.StringIO(report.render(result, "csv"))))
    assert len(parsed) == 3
    for key in ("attention", "kv_cache", "decode_tokens_per_s", "kv_cache_bytes_analytic", "greedy_match"):
        assert key in parsed[0]
    assert "samples" not in parsed[0]
    assert parsed[0]["greedy_match"] == "" and parsed[1]["greedy_match"] == "True"


def test_markdown_table(result):
    text = report.render(result, "md")
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3
    assert table[1].startswith("|---")
    assert "| mqa 1/4 |" in table[4]
    assert "Test CPU" in text


def test_table_text_shows_baseline_speedups_and_correctness(result):
    text = report.render(result, "table")
    assert "baseline" in text and "3.00× (3.0× vs off)" in text
    assert "match, Δ 1.0e-07" in text
    assert report._correct(result["rows"][0]) == "oracle"  # the cell, not the column header
    assert "val loss" not in text
    result["rows"][0]["val_loss"] = 5.0
    assert "val loss" in report.render(result, "table")


def test_differing_greedy_is_flagged(result):
    result["rows"][1]["greedy_match"] = False
    assert "DIFFERS" in report.render(result, "md")


def test_kv_series_scales_with_kv_heads(result):
    series = {name: ys for name, _, ys in compare_charts.kv_series(result)}
    mha, mqa = series["mha (4 KV heads)"], series["mqa (1 KV heads)"]
    assert mha[-1] == 4 * mqa[-1] == 128 * 4 * 64


def test_latency_series_positions(result):
    series = compare_charts.latency_series(result["rows"])
    assert [s[0] for s in series] == ["mha 4/4 cache off", "mha 4/4 cache on"]  # the baseline's on/off pair
    assert series[0][1][0] == 5.0  # first decode step: prompt 4 + 1 tokens in the sequence
    assert series[0][2][-1] == pytest.approx(5.0)  # ms; median of the last window (3 … 7 ms)


def test_rolling_median_removes_spikes():
    assert compare_charts.rolling_median([1, 1, 50, 1, 1], window=3) == [1, 1, 1, 1, 1]
    assert compare_charts.rolling_median([1, 2, 3, 4], window=3) == [1.5, 2, 3, 3.5]


def test_line_chart_draws_braille_and_legend():
    text = charts.line_chart([("up", [0, 1, 2, 3], [0, 1, 2, 3]), ("flat", [0, 1, 2, 3], [1, 1, 1, 1])],
                             "t", "x", lambda v: f"{v:.1f}", width=20, height=5).plain  # fmt: skip
    assert any(0x2800 < ord(c) <= 0x28FF for c in text)
    assert "up: 0.0 → 3.0" in text and "flat: 1.0 → 1.0" in text
    lines = text.splitlines()
    assert lines[1].startswith("3.0 ┤") and lines[5].startswith("0.0 ┤")
    # The rising series reaches the top row at the right edge only.
    assert lines[1].rstrip()[-1] != "┤" and lines[1][5] == " "


def test_line_chart_without_data():
    assert "(no data)" in charts.line_chart([], "t", "x").plain


def test_human_bytes():
    assert report.human_bytes(512) == "512 B"
    assert report.human_bytes(3 << 20) == "3.0 MiB"
    assert report.human_bytes(None) == "—"


def test_default_table_fits_80_columns_and_moves_constants_to_the_title(result):
    from rich.console import Console

    result["rows"][2]["speedup_note"] = "not significant: spreads overlap"
    result["rows"][2]["machine_load"] = {"others_cores": 1.2, "busy": True}
    result["rows"].append(row("gqa", 2, rate=15500.0, pos="sinusoidal", dtype="bfloat16", speedup=3.1,
                              speedup_vs_no_cache=2.8, speedup_vs_no_cache_note="one run each: no spread",
                              prompt_len=16))  # fmt: skip
    console = Console(file=io.StringIO(), width=80, no_color=True)
    console.print(report.rich_table(result))
    for note in report.footnotes(result):
        console.print(note)
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "generate 8" in text.splitlines()[0]  # a constant setting: in the title line, not a column
    assert "…" not in text  # no cell cut short
    assert "3.20× ns" in text and "not significant: spreads overlap" in text and "busy machine" in text
    assert "params" not in text
    for line in text.splitlines():  # prose wraps at word boundaries: no line ends inside a word
        assert not line.endswith("-")
    wide = Console(file=io.StringIO(), width=200, no_color=True)
    wide.print(report.rich_table(result, wide=True))
    assert "params" in wide.file.getvalue() and "prefill tok/s" in wide.file.getvalue()
