"""`gen convert` on imported models: a Hugging Face folder pooled into a gen model directory."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")

from hf_builders import SENTENCES, build_hf_model, byte_level_tokenizer

from gen_cli.cli import app
from gen_cli.formats.checkpoint import load_model
from gen_cli.formats.loading import load

runner = CliRunner()
IDS = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def llama(tmp_path, monkeypatch):
    """A tiny llama HF folder (4 query / 2 KV heads, qkv without bias) and a text file to score it on."""
    monkeypatch.setenv("GEN_HOME", str(tmp_path / "gen-home"))
    folder = tmp_path / "llama"
    folder.mkdir()
    build_hf_model("llama", folder, byte_level_tokenizer())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(SENTENCES[j % 4] + "\n" for j in range(60)), encoding="utf-8")
    return folder, corpus


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def test_an_hf_folder_converts_to_a_gen_directory_exact_at_its_own_kv_heads(llama, tmp_path):
    folder, corpus = llama
    out = tmp_path / "converted"
    args = ["convert", str(folder), "--kv-heads", "2,1", "--out", str(out), "--input", str(corpus)]
    result = runner.invoke(app, [*args, "--eval-tokens", "200", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [(r["kv_heads"], r["attention_kind"]) for r in rows] == [(2, "gqa"), (2, "gqa"), (1, "mqa")]
    assert all(r["bits_per_byte"] > 0 for r in rows)
    assert rows[1]["bits_per_byte"] == pytest.approx(rows[0]["bits_per_byte"], abs=1e-6)  # K = n_kv_head: a no-op
    original = load(folder).model.float().eval()
    same, _ = load_model(out / "kv2")
    torch.testing.assert_close(_logits(same), _logits(original), rtol=0, atol=1e-5)
    mqa, _ = load_model(out / "kv1")
    assert mqa.config.n_kv_head == 1 and mqa.layers[0].attn.wqkv.weight.shape[0] == (4 + 2) * 16


def test_uptraining_an_imported_model_is_refused_in_one_line(llama, tmp_path):
    folder, _ = llama
    args = ["convert", str(folder), "--kv-heads", "1", "--out", str(tmp_path / "o"), "--uptrain-steps", "5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--uptrain-steps needs a gen model" in result.stderr
    assert not (tmp_path / "o").exists()
