"""Widening a trained model: zero padding to a larger shape keeps its logits (any sizes the rules allow), the
shapes it cannot keep are refused in one line, and `gen widen` writes a model every command reads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gen_cli.cli import app
from gen_cli.errors import UsageError
from gen_cli.formats.checkpoint import load_model, save_model
from gen_cli.model.transformer import Transformer
from gen_cli.model.widen import widen, widened_config
from gen_cli.resources import models_dir

IDS = torch.randint(0, 300, (2, 14), generator=torch.Generator().manual_seed(1))


def _model(**changes) -> Transformer:
    """Random weights with norm gains away from 1 and non-zero biases, so each must land in its place."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(**changes)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3 + ("norm" in name))
    return model


def _logits(model: Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


@settings(max_examples=25, deadline=None)
@given(
    extra_dims=st.integers(0, 3),  # d_model = 32 + 8k: head_dim 8 stays, the head count need not divide it
    extra_layers=st.integers(0, 2),
    kv=st.sampled_from([2, 4, 6]),  # KV heads: the model's 2, or more
    wider_groups=st.integers(0, 2),  # query heads per KV head: the model's 2, or more
    extra_ff=st.integers(0, 40),
    pos=st.sampled_from(["rope", "learned"]),
    tied=st.booleans(),
    biases=st.booleans(),
    qk_norm=st.booleans(),
)
def test_a_widened_model_gives_the_originals_logits(extra_dims, extra_layers, kv, wider_groups, extra_ff, pos, tied,
                                                    biases, qk_norm):  # fmt: skip
    model = _model(n_kv_head=2, pos_encoding=pos, tie_embeddings=tied, qkv_bias=biases, attn_out_bias=biases,
                   mlp_bias=biases, qk_norm=qk_norm)  # fmt: skip
    extra_dims = 0 if qk_norm else extra_dims  # q/k norms share the one eps (refused below)
    target = widened_config(model.config, 32 + 8 * extra_dims, 2 + extra_layers, kv * (2 + wider_groups), kv,
                            64 + extra_ff)  # fmt: skip
    wide = widen(model, target)
    assert wide.config == target and wide.config.head_dim == 8
    torch.testing.assert_close(_logits(wide), _logits(model), rtol=1e-5, atol=1e-5)
    assert wide.num_parameters() > model.num_parameters() or target == model.config.replace(norm_eps=target.norm_eps)


def test_every_new_row_and_column_is_zero_and_the_old_ones_are_kept():
    model = _model(n_kv_head=2)
    wide = widen(model, widened_config(model.config, 48, 3, 8, 2, 80))
    w, old = wide.layers[0].mlp.w1.weight, model.layers[0].mlp.w1.weight
    assert torch.equal(w[:64, :32], old) and not w[64:].any() and not w[:, 32:].any()
    assert not any(p.any() for n, p in wide.layers[2].named_parameters() if "norm" not in n)  # an added layer
    # query head 1 (KV head 0's second) stays second in KV head 0's wider group of 4; head 2 opens KV head 1's
    qkv, old_qkv = wide.layers[0].attn.wqkv.weight, model.layers[0].attn.wqkv.weight
    assert torch.equal(qkv[8:16, :32], old_qkv[8:16]) and torch.equal(qkv[32:40, :32], old_qkv[16:24])
    assert not qkv[16:32].any()  # KV head 0's two new query heads
    scale = (32 / 48) ** 0.5  # RMSNorm over 48 dimensions, 32 of them carrying the signal
    torch.testing.assert_close(wide.norm.weight[:32], model.norm.weight * scale)
    assert wide.config.norm_eps == pytest.approx(model.config.norm_eps * 32 / 48)


@pytest.mark.parametrize(
    ("changes", "sizes", "message"),
    [
        ({"norm": "layernorm"}, (48, 2, 4, 4, 64), "needs RMSNorm"),
        ({"pos_encoding": "sinusoidal"}, (48, 2, 4, 4, 64), "keeps rope or learned positions"),
        ({"pos_encoding": "alibi"}, (48, 2, 4, 4, 64), "depends on the model's width"),
        ({}, (16, 2, 4, 4, 64), "d_model 16 is smaller than the model's 32"),
        ({}, (32, 1, 4, 4, 64), "layers 1 is smaller"),
        ({}, (32, 2, 4, 4, 32), "d_ff 32 is smaller"),
        ({}, (64, 2, 6, 4, 64), "heads 6 is not divisible by kv_heads 4"),
        ({"n_kv_head": 2}, (64, 2, 4, 4, 64), "below the model's 2 query heads per KV head"),
        ({"qk_norm": True}, (64, 2, 4, 4, 64), "keeps its d_model"),
    ],
)
def test_shapes_that_cannot_keep_the_function_are_refused(changes, sizes, message):
    model = _model(**changes)
    with pytest.raises(UsageError, match=message):
        widened_config(model.config, *sizes)


def test_gen_widen_writes_a_model_with_the_shipped_models_greedy_text(tmp_path):
    """On trained weights: the widened shipped model writes the shipped model's greedy tokens."""
    out = tmp_path / "wide"
    runner = CliRunner()
    args = ["widen", str(models_dir() / "default"), "--d-model", "384", "--layers", "5", "--heads", "16",
            "--kv-heads", "8", "--d-ff", "768", "--out", str(out), "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["widened"]["d_model"] == 384 and report["widened"]["layers"] == 5
    assert report["widened"]["parameters"] > report["original"]["parameters"] > 0
    assert report["max_logit_difference"] < 1e-4
    texts = []
    for model in (models_dir() / "default", out):
        run = runner.invoke(app, ["generate", "The for statement", "--model", str(model), "-n", "24",
                                  "--temperature", "0", "--no-native"])  # fmt: skip
        assert run.exit_code == 0, run.output
        texts.append(run.stdout)
    assert texts[0] == texts[1] and len(texts[0]) > 40
    again = runner.invoke(app, args)  # the folder holds a model now: kept unless --force
    assert again.exit_code != 0 and "already exists" in again.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0


def test_gen_widen_refuses_a_gguf_file_and_a_missing_out(tmp_path, tokenizer):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    runner = CliRunner()
    refused = runner.invoke(app, ["widen", str(gguf), "--d-model", "64", "--out", str(tmp_path / "w")])
    assert refused.exit_code != 0 and "takes a gen model directory" in refused.output
    folder = tmp_path / "tiny"
    save_model(folder, _model(vocab_size=tokenizer.get_vocab_size()), tokenizer)
    missing = runner.invoke(app, ["widen", str(folder), "--d-model", "64"])
    assert missing.exit_code != 0 and "needs --out" in missing.output
    assert runner.invoke(app, ["widen", str(folder), "--d-model", "64", "--out", str(tmp_path / "w")]).exit_code == 0
    assert load_model(tmp_path / "w")[0].config.d_model == 64
