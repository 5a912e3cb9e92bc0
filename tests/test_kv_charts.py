"""KV cache kinds in pictures: memory by context per kind (analytic lines through the measured points) and
decode latency by position per kind, in the terminal and as PNG."""

from __future__ import annotations

import pytest

from gen_cli.cache.linear import kv_bytes_per_token
from gen_cli.lab import compare_charts, kv_charts
from gen_cli.model.config import ModelConfig
from tests.test_report import row

SHAPE = ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=4, d_model=128, d_ff=64, context_length=64)


def _kind_row(kind: str, prompt_len: int = 40, lat_ms: float = 1.0):
    kinds = (kind, kind) if kind else (None, None)
    per = kv_bytes_per_token(SHAPE, *kinds, 4)
    tokens = prompt_len + 8
    lat = [lat_ms / 1000 * (1 + i / 10) for i in range(7)]
    return row(kv_dtype=kind, prompt_len=prompt_len, kv_bytes_per_token=per, kv_cache_bytes_analytic=per * tokens,
               kv_cache_bytes_measured=per * tokens, lat=lat)  # fmt: skip


@pytest.fixture
def result():
    rows = [_kind_row("fp32"), _kind_row("int8", lat_ms=1.5), _kind_row("int4", lat_ms=2.0), _kind_row("int8", 20)]
    return {"env": {"shape": SHAPE.to_dict(), "device_name": "Test CPU", "threads": [1], "torch": "2.x"}, "rows": rows}


def test_memory_lines_follow_the_formula_and_pass_through_the_measured_points(result):
    series = {name: (xs, ys) for name, xs, ys in kv_charts.kv_memory_series(result)}
    assert set(series) == {"fp32", "int8", "int4", "fp32 measured", "int8 measured", "int4 measured"}
    head_dim, layers_heads = 32, 2 * 4
    per_token = {"fp32": 2 * 4 * head_dim, "int8": 2 * (head_dim + 4), "int4": 2 * (head_dim // 2 + 8)}
    for kind, per in per_token.items():
        xs, ys = series[kind]
        assert xs[-1] == 64 and ys[-1] == layers_heads * per * 64  # the full context, analytic
        for x, y in zip(*series[f"{kind} measured"], strict=True):
            assert y == layers_heads * per * x  # measured bytes sit on the line
    assert series["int8 measured"][0] == [28.0, 48.0]  # both workloads, by length


def test_latency_has_one_line_per_kind_of_the_first_workload(result):
    series = kv_charts.kind_latency_series(result["rows"])
    assert [name for name, _, _ in series] == ["KV fp32", "KV int8", "KV int4"]
    assert series[0][1][0] == 41.0  # the first decode step's position: prompt 40, then the first new token


def test_terminal_charts_show_each_kind(result):
    from rich.console import Console

    console = Console(width=100, record=True, color_system=None)
    console.print(compare_charts.charts(result))
    text = console.export_text()
    assert "KV int4" in text and "int8 measured" in text and "analytic lines, measured points" in text


def test_png_is_written(result, tmp_path):
    pytest.importorskip("matplotlib")
    compare_charts.save_plot(result, tmp_path / "kv.png")
    assert (tmp_path / "kv.png").read_bytes()[:4] == b"\x89PNG"
