"""MHA → GQA/MQA conversion: the pooling's algebra, the converted cache's size, and `gen convert` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TEXT, tiny_config
from typer.testing import CliRunner

from gen_cli.cli import app
from gen_cli.errors import UsageError
from gen_cli.formats.checkpoint import load_model
from gen_cli.infer.generate import new_cache
from gen_cli.model.convert import pool_kv_heads
from gen_cli.model.transformer import Transformer


def _model(**changes) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(**changes)).eval()


def _logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("pos", ["rope", "sinusoidal"])
def test_keeping_every_kv_head_is_an_exact_no_op(pos):
    model = _model(pos_encoding=pos)
    same = pool_kv_heads(model, 4)
    assert same.config == model.config
    assert torch.equal(_logits(same, IDS), _logits(model, IDS))


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_pooling_identical_heads_changes_nothing(pooling):
    model = _model()
    H, hd = 4, 8
    with torch.no_grad():
        for block in model.layers:
            w = block.attn.wqkv.weight  # (H*hd + 2*H*hd, d_model)
            for start in (H * hd, 2 * H * hd):  # key rows, then value rows: make heads 1 = 0 and 3 = 2
                w[start + hd : start + 2 * hd] = w[start : start + hd]
                w[start + 3 * hd : start + 4 * hd] = w[start + 2 * hd : start + 3 * hd]
    gqa = pool_kv_heads(model, 2, pooling)
    assert gqa.config.n_kv_head == 2 and gqa.config.attention_kind == "gqa"
    torch.testing.assert_close(_logits(gqa, IDS), _logits(model, IDS), rtol=0, atol=1e-5)


def test_mean_pooling_averages_each_groups_rows_and_first_keeps_the_first():
    model = _model()
    w = model.layers[0].attn.wqkv.weight.detach()
    keys = w[32:64].view(4, 8, 32)  # (old KV heads, head_dim, d_model)
    mean = pool_kv_heads(model, 2, "mean").layers[0].attn.wqkv.weight.detach()
    first = pool_kv_heads(model, 1, "first").layers[0].attn.wqkv.weight.detach()
    torch.testing.assert_close(mean[32:48].view(2, 8, 32), (keys[0::2] + keys[1::2]) / 2)  # heads 0+1, 2+3
    assert torch.equal(first[32:40], keys[0])
    assert torch.equal(mean[:32], w[:32])  # queries untouched


def test_qkv_biases_are_pooled_with_their_rows():
    model = _model(qkv_bias=True)
    with torch.no_grad():
        model.layers[0].attn.wqkv.bias.normal_()
    bias = model.layers[0].attn.wqkv.bias.detach()
    pooled = pool_kv_heads(model, 2).layers[0].attn.wqkv.bias.detach()  # (32 q + 16 k + 16 v,)
    keys, values = bias[32:64].view(4, 8), bias[64:96].view(4, 8)
    torch.testing.assert_close(pooled[32:48].view(2, 8), (keys[0::2] + keys[1::2]) / 2)
    torch.testing.assert_close(pooled[48:64].view(2, 8), (values[0::2] + values[1::2]) / 2)
    assert torch.equal(pooled[:32], bias[:32])


def test_the_converted_models_cache_is_sized_by_its_kv_heads():
    mqa = pool_kv_heads(_model(), 1)
    cache = new_cache(mqa, IDS, 4)
    assert cache.k[0].shape == (2, 1, 16, 8)  # (B, n_kv_head = 1, prompt + new, head_dim)
    assert cache.nbytes == 2 * 2 * 1 * 8 * 16 * 2 * 4  # k and v × layers × 1 head × head_dim × tokens × B × fp32


def test_a_count_that_does_not_divide_is_refused_naming_the_choices():
    with pytest.raises(UsageError, match="choose from 1, 2, 4") as caught:
        pool_kv_heads(_model(), 3)
    assert caught.value.params == ("kv_heads",)


def test_cli_convert_writes_a_loadable_model_and_reports_each_count(model_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "converted"
    args = ["convert", str(model_dir), "--kv-heads", "2,1", "--out", str(out), "--input", str(corpus), "--json"]
    result = CliRunner().invoke(app, [*args, "--eval-tokens", "200"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [(r["kv_heads"], r["attention_kind"]) for r in rows] == [(4, "mha"), (2, "gqa"), (1, "mqa")]
    assert [r["kv_bytes_per_token"] for r in rows] == [2 * 2 * k * 8 * 4 for k in (4, 2, 1)]
    model, _ = load_model(out / "kv2")
    assert model.config.n_kv_head == 2
    again = CliRunner().invoke(app, [*args, "--eval-tokens", "200"])
    assert again.exit_code == 2 and "already holds files" in again.stderr  # nothing overwritten


def test_cli_convert_with_uptraining_improves_on_the_pooled_model(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GEN_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "mqa"
    args = ["convert", str(model_dir), "--kv-heads", "1", "--out", str(out), "--input", str(corpus)]
    result = CliRunner().invoke(app, [*args, "--uptrain-steps", "30", "--lr", "3e-3", "--eval-tokens", "300", "--json"])
    assert result.exit_code == 0, result.output
    original, pooled = json.loads(result.stdout)["rows"]
    assert original["uptrained_bits_per_byte"] is not None  # the control: the original, trained as long
    # A random tiny model on repetitive text: 30 steps learn a lot, so uptraining must beat the pooled weights.
    assert pooled["uptrained_bits_per_byte"] < pooled["bits_per_byte"]
    assert (out / "train_state.safetensors").is_file() and load_model(out)[0].config.n_kv_head == 1


def test_the_quality_chart_plots_both_curves_against_kv_memory():
    from gen_cli.lab.convert import ConvertRow, quality_chart

    rows = [ConvertRow(k, "gqa", 2048 * k, 100.0, 2.0 + 1 / k, 1.8 + 0.1 / k, None) for k in (4, 2, 1)]
    text = quality_chart(rows).plain
    assert "pooled: 2.250 → 3.000" in text and "uptrained: 1.825 → 1.900" in text  # first → last, as listed
    rows[1].uptrained_bits_per_byte = None
    assert "uptrained" not in quality_chart(rows).plain  # a curve only where every row was uptrained
