"""`gen bench decode --model`: gen's modes on a real model's weights, transformers on the same HF folder."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from hf_builders import build_hf_model, byte_level_tokenizer, write_gguf  # noqa: E402

from gen_cli.cli import app  # noqa: E402
from gen_cli.errors import UsageError  # noqa: E402
from gen_cli.lab.model_bench import bench_model_decode  # noqa: E402

runner = CliRunner()
NEW = 12  # the tiny model's context is 64 tokens


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tok = byte_level_tokenizer()
    model = build_hf_model("llama", folder, tok)
    gguf_path = folder.parent / "llama.gguf"
    write_gguf(model, tok, "llama", gguf_path)
    return folder, gguf_path


def test_hf_folder_rows_and_transformers_deviation(llama):
    folder, _ = llama
    rows, context = bench_model_decode(folder, ("fp32", "fp32-torch", "bf16"), 1, NEW, "cpu")
    by_mode = {r.mode: r for r in rows}
    assert set(by_mode) == {"fp32", "fp32-torch", "bf16", "transformers"}
    assert by_mode["transformers"].path == "transformers" and by_mode["fp32-torch"].path == "torch"
    assert by_mode["transformers"].max_logit_diff < 1e-4  # transformers' own load of the folder vs gen's fp32
    assert by_mode["fp32-torch"].max_logit_diff < 1e-4  # measured after bf16 was built: the modes run copies
    assert by_mode["bf16"].max_logit_diff < 0.1
    assert all(r.decode_tok_s > 0 and r.prefill_tok_s > 0 and r.shape == str(folder) for r in rows)
    assert all(r.vs_c is None for r in rows)
    assert context["model"]["kind"] == "hf" and str(folder) in context["bandwidth_gb_s"]


def test_gguf_has_gen_rows_only_and_a_too_long_run_is_refused(llama):
    _, gguf_path = llama
    rows, context = bench_model_decode(gguf_path, ("fp32-torch",), 1, NEW, "cpu")
    assert [r.mode for r in rows] == ["fp32-torch"] and context["model"]["kind"] == "gguf"
    with pytest.raises(UsageError, match=r"new_tokens 100 .* context of 64 tokens"):
        bench_model_decode(gguf_path, ("fp32-torch",), 1, 100, "cpu")


def test_cli_json_and_refusals(llama, tmp_path):
    folder, _ = llama
    args = ["bench", "decode", "--model", str(folder), "--modes", "fp32", "--repeats", "1", "--new-tokens", str(NEW)]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["mode"]: row for row in json.loads(r.stdout)["rows"]}
    assert set(rows) == {"fp32", "transformers"} and rows["transformers"]["max_logit_diff"] < 1e-4
    r = runner.invoke(app, ["bench", "decode", "--model", str(tmp_path / "missing.gguf"), "--json"])
    assert r.exit_code == 2 and "missing.gguf: no such directory or .gguf file" in r.output
    r = runner.invoke(app, ["bench", "decode", "--model", str(folder), "--shapes", "tiny"])
    assert r.exit_code == 2 and "not both" in r.output
