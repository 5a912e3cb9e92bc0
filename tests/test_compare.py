"""`gen compare`: grid expansion, the measurement on a tiny model, the record format, CLI errors."""

from __future__ import annotations

import csv
import io
import json
import statistics

import pytest
from typer.testing import CliRunner

from gen_cli.cli import app
from gen_cli.errors import UsageError
from gen_cli.lab import compare as bench
from tests.conftest import TEXT, tiny_config

ROW_KEYS = {
    "attention", "kv_heads", "n_heads", "pos", "kv_cache", "prompt_len", "gen_len", "batch", "dtype",
    "decode_tokens_per_s", "ttft_s", "prefill_tokens_per_s", "ms_per_token", "kv_cache_bytes_analytic",
    "kv_cache_bytes_measured", "peak_memory_bytes", "memory_method", "speedup", "greedy_match", "max_logit_diff",
    "params", "samples", "val_loss", "bits_per_byte", "machine_load", "measure_s",
}  # fmt: skip
# Tiny everything: the CLI runs below take a fraction of a second per configuration.
FAST = [
    "--preset",
    "tiny",
    "--prompt-len",
    "4",
    "--max-new-tokens",
    "5",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--threads",
    "1",
]


def grid(**axes):
    args = dict(attention=["mha"], kv_heads=[], pos=["rope"], kv_cache=["off", "on"], prompt_len=[4],
                gen_len=[6], batch=[1], dtype=["float32"], repeats=1, warmup=0, threads=1)  # fmt: skip
    args.update(axes)
    return bench.expand_grid(tiny_config(), **args)


# ---------------------------------------------------------------------------------------------
# Grid


def test_split_values_accepts_commas_and_repeats():
    assert bench.split_values(["on,off", "on", " OFF "], ["x"]) == ["on", "off"]
    assert bench.split_values(None, ["x"]) == ["x"]
    assert bench.int_values("--batch", ["1,2", "4"], [9]) == [1, 2, 4]
    with pytest.raises(UsageError, match="not an integer"):
        bench.int_values("--batch", ["two"], [1])
    with pytest.raises(UsageError, match="at least 1"):
        bench.int_values("--batch", ["0"], [1])


def test_grid_adds_mha_baseline_first_and_crosses_axes():
    specs = grid(attention=["gqa"], pos=["rope", "sinusoidal"])
    assert [(s.attention, s.shape["n_kv_head"], s.shape["pos_encoding"], s.kv_cache) for s in specs] == [
        ("mha", 4, "rope", False), ("mha", 4, "rope", True),
        ("mha", 4, "sinusoidal", False), ("mha", 4, "sinusoidal", True),
        ("gqa", 2, "rope", False), ("gqa", 2, "rope", True),
        ("gqa", 2, "sinusoidal", False), ("gqa", 2, "sinusoidal", True),
    ]  # fmt: skip
    assert len(grid(attention=["mha", "mqa", "gqa"], kv_heads=[1, 2], batch=[1, 2], dtype=["fp32", "bf16"])) == (
        4 * 2 * 2 * 2  # mha, mqa, gqa 1 (== mqa's count but a separate listing), gqa 2; batches; dtypes; cache
    )
    assert grid(dtype=["bf16"])[0].dtype == "bfloat16"


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        ({"attention": ["mla"]}, "unknown value 'mla'"),
        ({"pos": ["xpos"]}, "unknown value 'xpos'"),
        ({"kv_cache": ["maybe"]}, "unknown value 'maybe'"),
        ({"dtype": ["int4"]}, "unknown value 'int4'"),
        ({"attention": ["gqa"], "kv_heads": [3]}, "not divisible by 3 KV heads"),
        ({"kv_heads": [2]}, "add attention gqa"),
        ({"prompt_len": [10], "gen_len": [7]}, "context length of 16"),
        ({"gen_len": [1]}, "at least 2"),
        ({"repeats": 0}, "^repeats must be at least 1"),
    ],
)
def test_grid_refuses_bad_axes(axes, message):
    with pytest.raises(UsageError, match=message):
        grid(**axes)


# ---------------------------------------------------------------------------------------------
# Measurement (in process, tiny model)


@pytest.fixture(scope="module")
def rows():
    specs = grid(attention=["mha", "gqa", "mqa"], pos=["rope", "sinusoidal"], batch=[2])
    rows, interrupted = bench.run_grid(specs, in_process=True)
    assert not interrupted
    return rows


def test_record_has_the_stable_keys(rows):
    for r in rows:
        assert r.keys() >= ROW_KEYS
        assert isinstance(r["kv_cache"], bool)
        assert len(r["samples"]["decode_tokens_per_s"]) == 1
        assert len(r["samples"]["ttft_s"]) == 1
        assert len(r["samples"]["per_token_latencies_s"]) == r["gen_len"] - 1
        assert r["decode_tokens_per_s"] == statistics.median(r["samples"]["decode_tokens_per_s"])
        assert r["ttft_s"] == statistics.median(r["samples"]["ttft_s"])
        assert (
            r["params"]
            == (300 * 32 if r["pos"] != "learned" else 300 * 32 + 16 * 32)
            + 2 * (2 * 32 + 32 * (4 + 2 * r["kv_heads"]) * 8 + 32 * 32 + 3 * 32 * 64)
            + 32
        )  # embedding (tied head) + 2 layers (norms, qkv, wo, SwiGLU) + final norm
    json.dumps(rows)  # plain data only


def test_kv_bytes_analytic_equals_formula_and_measured(rows):
    for r in rows:
        if not r["kv_cache"]:
            assert r["kv_cache_bytes_analytic"] == r["kv_cache_bytes_measured"] == 0
            continue
        head_dim = 32 // r["n_heads"]
        formula = 2 * 2 * r["kv_heads"] * head_dim * (r["prompt_len"] + r["gen_len"]) * r["batch"] * 4
        assert r["kv_cache_bytes_analytic"] == formula == r["kv_cache_bytes_measured"]


def test_mqa_and_gqa_bytes_are_a_fraction_of_mha(rows):
    on = {(r["attention"], r["pos"]): r["kv_cache_bytes_measured"] for r in rows if r["kv_cache"]}
    for pos in ("rope", "sinusoidal"):
        assert on[("mqa", pos)] * 4 == on[("mha", pos)]  # 1/heads
        assert on[("gqa", pos)] * 2 == on[("mha", pos)]  # kv_heads/heads = 2/4


def test_cache_on_agrees_with_fp32_oracle(rows):
    for r in rows:
        if r["kv_cache"]:
            assert r["greedy_match"] is True
            assert 0 <= r["max_logit_diff"] < 1e-4
        else:
            assert r["greedy_match"] is None and r["oracle"] == "is the oracle"


def _row(attention, kv_cache, rate, prompt_len=16):
    variant = {"attention": attention, "kv_heads": 4 if attention == "mha" else 1, "pos": "rope", "dtype": "float32"}
    return variant | {
        "prompt_len": prompt_len,
        "gen_len": 8,
        "batch": 1,
        "kv_cache": kv_cache,
        "decode_tokens_per_s": rate,
    }


def test_speedups_are_against_each_workloads_first_row_and_the_cache_off_twin():
    rows = [_row("mha", False, 100.0), _row("mha", True, 400.0), _row("mqa", False, 50.0), _row("mqa", True, 500.0),
            _row("mha", True, 10.0, prompt_len=64), _row("mqa", True, 30.0, prompt_len=64)]  # fmt: skip
    bench.add_speedups(rows)
    assert [r["baseline"] for r in rows] == [True, False, False, False, True, False]
    assert [r["speedup"] for r in rows] == [1.0, 4.0, 0.5, 5.0, 1.0, 3.0]
    # Against the same variant with the cache off, where that was measured; None otherwise.
    assert [r["speedup_vs_no_cache"] for r in rows] == [None, 4.0, None, 10.0, None, None]


def test_measured_speedups_follow_the_same_rules(rows):
    assert rows[0]["baseline"] and rows[0]["speedup"] == 1.0
    assert not any(r["baseline"] for r in rows[1:])
    assert all(r["speedup_vs_no_cache"] is not None for r in rows if r["kv_cache"])


def test_speedups_from_one_run_each_are_not_claimed(rows):
    for r in rows[1:]:
        assert r["speedup_note"] in ("one run each: no spread", "not significant: machine busy")


def test_ctrl_c_keeps_the_configurations_measured(monkeypatch):
    specs = grid(attention=["mha", "mqa"])
    real, calls = bench.measure, []

    def measure(spec):
        calls.append(spec)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(spec)

    monkeypatch.setattr(bench, "measure", measure)
    rows, interrupted = bench.run_grid(specs, in_process=True)
    assert interrupted and len(rows) == 2 and rows[0]["baseline"]


def test_bfloat16_row_is_compared_with_fp32():
    (row,), _ = bench.run_grid(grid(kv_cache=["off"], dtype=["bfloat16"]), in_process=True)
    assert row["dtype"] == "bfloat16" and isinstance(row["greedy_match"], bool)
    assert row["max_logit_diff"] > 0  # bf16 rounding shows up against the fp32 oracle


# ---------------------------------------------------------------------------------------------
# CLI


def invoke(*args):
    return CliRunner().invoke(app, ["compare", *args])


def test_cli_json_through_the_real_subprocess_path():
    result = invoke(*FAST, "--attention", "mha", "--pos", "rope", "--kv-cache", "on", "--json")  # = --format json
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["env"]["shape_source"] == "preset tiny" and data["env"]["torch"]
    (row,) = data["rows"]
    assert row["kv_cache"] is True and row["greedy_match"] is True
    assert row["kv_cache_bytes_measured"] == row["kv_cache_bytes_analytic"] > 0
    assert row["memory_method"]


def test_cli_gqa_gets_mha_baseline_and_writes_every_format(tmp_path):
    out = tmp_path / "r.json"
    result = invoke(*FAST, "--attention", "gqa", "--pos", "rope", "--in-process", "-o", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [(r["attention"], r["kv_cache"]) for r in data["rows"]] == [
        ("mha", False), ("mha", True), ("gqa", False), ("gqa", True)
    ]  # fmt: skip
    assert data["rows"][0]["baseline"] and data["rows"][3]["speedup_vs_no_cache"] > 0
    outputs = {}
    for fmt in ("table", "md", "csv", "jsonl"):
        result = invoke(*FAST, "--attention", "mha", "--pos", "rope", "--in-process", "--format", fmt, "--chart")
        assert result.exit_code == 0, result.output
        outputs[fmt] = result.stdout
    assert "tok/s" in outputs["table"] and "attention mha" in outputs["table"]
    md_rows = [ln for ln in outputs["md"].splitlines() if ln.startswith("|")]
    assert len(md_rows) == 2 + 2 and "tok/s" in md_rows[0]  # header, rule, cache off and on
    records = list(csv.DictReader(io.StringIO(outputs["csv"])))
    assert [r["kv_cache"] for r in records] == ["False", "True"] and float(records[1]["decode_tokens_per_s"]) > 0
    lines = [json.loads(ln) for ln in outputs["jsonl"].splitlines() if ln.strip().startswith("{")]
    assert [r["kv_cache"] for r in lines if "attention" in r] == [False, True]


def test_cli_quality_adds_loss_columns(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 2, encoding="utf-8")
    result = invoke(*FAST, "--attention", "mqa", "--pos", "rope", "--kv-cache", "on", "--in-process",
                    "--quality-steps", "2", "--quality-data", str(corpus), "--format", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert len(rows) == 2
    assert all(r["val_loss"] > 0 and r["bits_per_byte"] > 0 for r in rows)
    assert rows[0]["val_loss"] != rows[1]["val_loss"]  # MHA and MQA are different models


def test_cli_quality_eval_context_scores_positions_past_training(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 30, encoding="utf-8")
    args = ("--quality-steps", "2", "--quality-data", str(corpus), "--eval-context", "160", "--format", "json")
    result = invoke(*FAST, "--attention", "mha", "--pos", "alibi,learned", "--kv-cache", "on", "--in-process", *args)
    assert result.exit_code == 0, result.output
    rows = {r["pos"]: r for r in json.loads(result.stdout)["rows"]}
    assert (
        rows["alibi"]["eval_context"] == 160
    )  # trained at 128 tokens, scored on positions 128 to 159 and rows["alibi"]["bits_per_byte_past_context"] > 0
    assert rows["learned"]["bits_per_byte_past_context"] is None  # learned positions end at the trained context
    refused = invoke(*FAST, "--eval-context", "48")
    assert refused.exit_code == 2 and "goes with --quality-steps" in refused.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attention", "mla"], "unknown value 'mla'"),
        (["--pos", "xpos"], "unknown value 'xpos'"),
        (["--kv-cache", "yes"], "unknown value 'yes'"),
        (["--attention", "gqa", "--kv-heads", "3"], "not divisible by 3 KV heads"),
        (["--prompt-len", "1000", "--max-new-tokens", "100"], "exceeds the model's context length"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--repeats", "-2"], "--repeats must be at least 1"),
        (["--format", "xml"], "unknown format 'xml'"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--dtype", "float16", "--device", "cpu"], "float16 is not supported on CPU"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, message):
    result = invoke("--in-process", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_unwritable_output_refused_before_running(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_grid", lambda *a, **k: pytest.fail("the grid ran before the refusal"))
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for target, message in ((tmp_path, "is a directory"), (blocker / "out.json", "is a file, not a folder")):
        result = invoke(*FAST, "--in-process", "-o", str(target))
        assert result.exit_code == 2 and message in result.output, result.output
    assert blocker.read_text() == "x"


def test_cli_plot_without_matplotlib_names_the_extra(tmp_path):
    from gen_cli.lab import report

    if report.plot_available():
        pytest.skip("matplotlib is installed")
    result = invoke(*FAST, "--in-process", "--plot", str(tmp_path / "c.png"))
    assert result.exit_code == 2
    assert "pip install 'gen-lab[plot]'" in result.output
    assert not (tmp_path / "c.png").exists()


def test_cli_ctrl_c_prints_the_rows_measured(monkeypatch):
    real, calls = bench.measure, []

    def measure(spec):
        calls.append(spec)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(spec)

    monkeypatch.setattr(bench, "measure", measure)
    result = invoke(*FAST, "--attention", "mha", "--pos", "rope", "--in-process", "--format", "json")
    assert result.exit_code == 130
    assert "interrupted: showing the 1 of 2" in result.stderr
    assert len(json.loads(result.stdout)["rows"]) == 1


# ---------------------------------------------------------------------------------------------
# KV cache kinds


def test_kv_dtype_axis_applies_to_cache_on_rows_and_refuses_int4_on_head_dim_8():
    specs = grid(kv_dtype=["fp32", "k8v8"])
    assert [(s.kv_cache, s.kv_dtype) for s in specs] == [(False, ""), (True, "fp32"), (True, "k8v8")]
    with pytest.raises(UsageError, match="multiple of 32, got 8"):
        grid(kv_dtype=["int4"])
    with pytest.raises(UsageError, match="unknown KV cache kind"):
        grid(kv_dtype=["q5"])


def test_kv_dtype_rows_report_accuracy_against_the_full_precision_cache():
    from gen_cli.lab.worker import measure

    rows = [measure(s) for s in grid(kv_dtype=["fp32", "int8"], kv_cache=["on"])]
    full, int8 = rows
    assert full["kv_kl_mean"] == full["kv_kl_max"] == 0 and full["kv_top1_agreement"] == 1
    assert 0 < int8["kv_kl_mean"] <= int8["kv_kl_max"] and int8["kv_tokens_before_divergence"] <= 6
    assert int8["kv_cache_bytes_analytic"] == int8["kv_cache_bytes_measured"] < full["kv_cache_bytes_measured"]
