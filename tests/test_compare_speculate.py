"""`gen compare --speculate`: speculative decoding as a compare axis on a tiny model's own weights — each
proposer's row beside plain decoding's, its text identical (greedy), its acceptance and tokens per forward."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gen_cli.cli import app
from tests.conftest import tiny_config

runner = CliRunner()


def _saved(folder, tokenizer, seed: int):
    from gen_cli.formats.checkpoint import save_model
    from gen_cli.model.transformer import Transformer

    torch.manual_seed(seed)
    model = Transformer(tiny_config(vocab_size=tokenizer.get_vocab_size(), context_length=512))
    save_model(folder, model, tokenizer)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("spec")
    return _saved(root / "target", tokenizer, 0), _saved(root / "draft", tokenizer, 1)


def test_rows_for_off_ngram_and_a_draft_with_identical_text(models):
    target, draft = models
    argv = ["compare", "--model", str(target), "--speculate", f"ngram:3,draft:{draft}", "-n", "24",
            "--repeats", "2", "--warmup", "0", "--threads", "1", "--format", "json"]  # fmt: skip
    done = runner.invoke(app, argv)
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    rows = result["rows"]
    assert [r["speculate"] for r in rows] == ["off", "ngram:3", f"draft:{draft}"]  # off added first
    assert all(r["identical_to_off"] for r in rows)
    assert rows[0]["speedup_vs_off"] == 1.0 and rows[0]["acceptance_rate"] is None
    for r in rows[1:]:
        assert 0 <= r["acceptance_rate"] <= 1 and r["tokens_per_forward"] >= 1
        assert r["decode_tokens_per_s_min"] <= r["decode_tokens_per_s"] <= r["decode_tokens_per_s_max"]
        assert len(r["samples"]["decode_tokens_per_s"]) == 2
    assert result["env"]["gen_len"] == 24 and result["env"]["prompt_tokens"] > 0


def test_the_table_names_each_row(models):
    target, _ = models
    argv = ["compare", "--model", str(target), "--speculate", "off,ngram", "-n", "8", "--repeats", "1", "--warmup", "0"]
    done = runner.invoke(app, argv)
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert lines[1].split()[:2] == ["speculate", "decode"]
    assert lines[2].startswith("off") and lines[3].startswith("ngram")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--speculate", "ngram", "--attention", "gqa"], "drop --attention"),
        (["--speculate", "sideways"], "sideways"),
        (["--speculate", "draft:"], "needs a draft model"),
        (["--speculate", "draft:/no/such/model"], "no draft model"),
    ],
)
def test_refusals_are_one_line(models, extra, message):
    done = runner.invoke(app, ["compare", "--model", str(models[0]), *extra])
    assert done.exit_code == 2 and message in done.output and "Traceback" not in done.output
