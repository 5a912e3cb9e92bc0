"""`gen demo`: sample, then cache on/off with identical greedy tokens."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gen_cli.cli import app
from gen_cli.native.build import native_status

runner = CliRunner()


def test_demo_json_reports_both_settings_and_identical_tokens(model_dir, tokenizer):
    import torch

    from gen_cli.text.tokenizer import encode

    threads = str(torch.get_num_threads())  # the global setting other tests see stays as it was
    args = ["demo", "-m", str(model_dir), "--max-new-tokens", "20", "--sample-tokens", "8", "--repeats", "3"]
    args += ["--threads", threads, "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["greedy_identical"] is True
    on, off = data["kv_cache"]["on"], data["kv_cache"]["off"]
    # 2 (K, V) × n_layer 2 × n_kv_head 4 × head_dim 8 × (prompt + 20 tokens) × batch 1 × 4 B (fp32)
    analytic = 2 * 2 * 4 * 8 * (len(encode(tokenizer, "The for statement")) + 20) * 1 * 4
    assert on["kv_cache_bytes"] == on["kv_cache_bytes_analytic"] == analytic
    assert off["kv_cache_bytes"] == 0
    assert (on["decode_path"], off["decode_path"]) == ("native" if native_status() == "ready" else "torch", "torch")
    assert len(on["decode_tokens_per_s_samples"]) == len(off["decode_tokens_per_s_samples"]) == 3
    # The figures are the middle of three reported runs, and the speed-up their ratio: not one lucky run.
    med_on, med_off = (sorted(r["decode_tokens_per_s_samples"])[1] for r in (on, off))
    assert (on["decode_tokens_per_s"], off["decode_tokens_per_s"]) == (med_on, med_off)
    assert data["speedup"] == pytest.approx(med_on / med_off)
    assert data["threads"] == int(threads) and data["repeats"] == 3
    assert {"others_cores", "load_avg_1m", "busy"} <= set(data["machine_load"])
    assert data["speedup_significance"] in (
        "significant",
        "not significant: machine busy",
        "not significant: spreads overlap",
    )


def test_demo_table_and_missing_model(model_dir, tmp_path):
    result = runner.invoke(
        app, ["demo", "--model", str(model_dir), "--tokens", "10", "--sample-tokens", "4", "--repeats", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "KV cache speed-up" in result.stdout and "identical" in result.stdout
    assert "no spread" in result.stdout or "machine busy" in result.stdout  # one repeat: no claim as fact
    assert "during the timed runs" in result.stderr
    assert result.stderr.splitlines()[0] == "note: --tokens is deprecated; use --max-new-tokens"  # the old spelling
    assert "+ 10 new tokens" in result.stdout
    table = [line for line in result.stdout.splitlines() if "│" in line or "KV cache" in line]
    assert table and max(len(line) for line in table) <= 80  # the table and verdicts fit 80 columns
    missing = runner.invoke(app, ["demo", "--model", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "Traceback" not in missing.output


@pytest.mark.parametrize(
    ("args", "message"),
    [(["-n", "1"], "--max-new-tokens must be at least 2, got 1"), (["--repeats", "0"], "--repeats must be at least 1")],
)
def test_demo_refuses_too_few_tokens_or_repeats_before_loading(tmp_path, args, message):
    result = runner.invoke(app, ["demo", "--model", str(tmp_path / "nope"), *args])
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_demo_refuses_a_prompt_that_is_not_utf8(model_dir):
    import os

    result = runner.invoke(app, ["demo", "--model", str(model_dir), "--prompt", os.fsdecode(b"caf\xe9")])
    assert result.exit_code == 2 and "not valid UTF-8 (byte 0xe9 at offset 3)" in result.stderr
