"""`gen compare --quality-steps --convert`: MHA pooled and uptrained, beside GQA/MQA trained from scratch."""

from __future__ import annotations

import json

from conftest import TEXT
from test_compare import FAST  # the same tiny grid settings
from typer.testing import CliRunner

from gen_cli.cli import app


def invoke(*args):
    return CliRunner().invoke(app, ["compare", *FAST, "--kv-cache", "on", "--pos", "rope", "--in-process", *args])


def test_converted_rows_sit_beside_the_from_scratch_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 2, encoding="utf-8")
    args = (
        "--attention",
        "mqa",
        "--quality-steps",
        "2",
        "--quality-data",
        str(corpus),
        "--convert",
        "--format",
        "json",
    )
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    labels = [(r["attention"], r["kv_heads"], r.get("converted")) for r in rows]
    assert labels == [("mha", 4, None), ("mqa", 1, None), ("mqa", 1, "mha")]
    scratch, converted = rows[1], rows[2]
    assert 0 < converted["bits_per_byte"] < float("inf") and converted["val_loss"] > 0
    assert converted["bits_per_byte"] != scratch["bits_per_byte"]  # a different model, same steps
    assert "converted" not in rows[0] and "converted" not in scratch  # the existing rows are unchanged


def test_convert_without_quality_steps_or_a_smaller_variant_is_refused():
    for args in (("--attention", "mqa", "--convert"), ("--attention", "mha", "--quality-steps", "2", "--convert")):
        result = invoke(*args)
        assert result.exit_code == 2 and "--convert goes with --quality-steps" in result.stderr
