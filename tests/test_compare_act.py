"""`gen compare --act`: block weights' activation precisions as a compare axis, on a model's own weights — each
precision's decode speed beside int8's, and its agreement with fp32 activations on real text.

The shipped model's trained weights, exported to Q8_0, are the file: there int8's rounding shows (KL > 0, as a
real model's does) and int8x2's second int8 term removes nearly all of it (its error bound is int8's / 254)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gen_cli.cli import app
from gen_cli.native import decoder as native
from gen_cli.resources import default_model_dir

pytestmark = pytest.mark.skipif(native.native_status() != "ready", reason="needs the compiled kernel")
runner = CliRunner()


@pytest.fixture(scope="module")
def shipped_q8_0(tmp_path_factory):
    from gen_cli.formats.checkpoint import load_model
    from gen_cli.formats.export_gguf import export_gguf

    model, tokenizer = load_model(default_model_dir())
    return Path(export_gguf(model, tokenizer, tmp_path_factory.mktemp("act") / "shipped-q8_0.gguf", "q8_0").path)


def _compare(*args: str):
    done = runner.invoke(app, ["compare", *args, "--repeats", "2", "--warmup", "0", "--threads", "1"])
    assert done.exit_code == 0, done.output
    return done


def test_each_precision_against_int8s_speed_and_fp32s_answers_on_trained_weights(shipped_q8_0):
    result = json.loads(_compare("--model", str(shipped_q8_0), "--act", "int8x2,fp32", "-n", "12", "--json").stdout)
    rows = {r["act"]: r for r in result["rows"]}
    assert [r["act"] for r in result["rows"]] == ["int8", "int8x2", "fp32"]  # int8, the baseline, added first
    assert result["env"]["weights"] == "block weights as stored" and result["env"]["text_positions"] == 256
    int8, int8x2, fp32 = rows["int8"], rows["int8x2"], rows["fp32"]
    assert int8["speed_vs_int8"] == 1.0
    for r in rows.values():
        assert r["decode_tokens_per_s_min"] <= r["decode_tokens_per_s"] <= r["decode_tokens_per_s_max"]
        assert len(r["samples"]["decode_tokens_per_s"]) == 2 and r["speed_vs_int8"] > 0
        assert r["greedy_tokens"] == 12 and r["prefill_tokens_per_s"] > 0
    assert fp32["kl_mean"] == fp32["kl_max"] == 0 and fp32["top1_agreement"] == 1 and fp32["greedy_agree"] == 12
    assert int8["kl_mean"] > 0 and int8["kl_max"] >= int8["kl_mean"]
    assert int8x2["kl_mean"] <= int8["kl_mean"] / 20 and int8x2["top1_agreement"] >= int8["top1_agreement"]


def test_a_model_without_block_weights_is_quantized_and_the_table_names_each_row():
    done = _compare("--act", "int8x2", "-n", "8")  # the shipped model: fp32 weights
    lines = done.stdout.splitlines()
    assert "quantized to Q8_0 at load" in lines[0] and "256 positions of real text" in lines[0]
    assert lines[1].split()[:4] == ["act", "decode", "tok/s", "×"]
    assert lines[2].startswith("int8 ") and lines[3].startswith("int8x2 ")
    assert "1.00×" in lines[2]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--act", "fp16"], "unknown activation precision 'fp16'"),
        (["--act", "int8", "--attention", "gqa"], "--act runs on its own"),
        (["--act", "int8", "--speculate", "ngram"], "drop --act"),
        (["--act", "int8", "--device", "cuda"], "measure them on --device cpu, not cuda"),
        (["--act", ","], "at least one precision"),
    ],
)
def test_refusals_are_one_line(extra, message):
    done = runner.invoke(app, ["compare", *extra])
    assert done.exit_code == 2 and message in done.output and "Traceback" not in done.output


def test_integer_and_float_precisions_run_on_the_layouts_gen_generate_gives_them(shipped_q8_0):
    from gen_cli.lab.compare_act import _open
    from gen_cli.native.repack import repack_wanted
    from gen_cli.quant.block_linear import BlockLinear

    def layouts(act: str) -> set[bool]:
        engine, weights = _open(shipped_q8_0, act, 1)
        assert weights == "none"  # the file's own blocks
        return {m.interleaved for m in engine.model.modules() if isinstance(m, BlockLinear)}

    assert layouts("fp32") == {False}  # float products read stored rows
    assert layouts("int8") == ({True} if repack_wanted("q8_0", 256, "int8") else {False})
