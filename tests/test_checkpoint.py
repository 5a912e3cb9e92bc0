"""Model directories: round trip, tied weights stored once, dtype, and every load error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_config

from gen_cli.errors import GenError
from gen_cli.formats.checkpoint import load_model, save_model
from gen_cli.model.transformer import Transformer


@pytest.fixture
def saved(tmp_path, model_dir):
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    return folder


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_round_trip(tmp_path, tokenizer, tie, pos):
    from safetensors import safe_open

    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.get_vocab_size(), tie_embeddings=tie, pos_encoding=pos))
    save_model(tmp_path / "m", model, tokenizer)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tie)  # noqa: SIM118 - safe_open has no __contains__
    loaded, tok = load_model(tmp_path / "m")
    assert not loaded.training
    assert loaded.config == model.config and tok.get_vocab_size() == tokenizer.get_vocab_size()
    if tie:
        assert loaded.lm_head.weight is loaded.tok_emb.weight
    idx = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model.eval()(idx))


def test_dtype_stored_and_cast_on_load(tmp_path, tokenizer):
    from safetensors import safe_open

    model = Transformer(tiny_config(vocab_size=tokenizer.get_vocab_size()))
    save_model(tmp_path / "m", model, tokenizer, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("tok_emb.weight").dtype == torch.bfloat16
    loaded, _ = load_model(tmp_path / "m", dtype=torch.float32)
    assert loaded.tok_emb.weight.dtype == torch.float32
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight.to(torch.bfloat16).float())
    half, _ = load_model(tmp_path / "m", dtype=torch.bfloat16)
    assert half.layers[0].attn.wqkv.weight.dtype == torch.bfloat16


def test_missing_folder(tmp_path):
    with pytest.raises(GenError, match="no such model directory"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file(saved, name):
    (saved / name).unlink()
    with pytest.raises(GenError, match=f"{name} is missing"):
        load_model(saved)


def test_incomplete_and_unknown_config(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "n_head"}))
    with pytest.raises(GenError, match="missing n_head"):
        load_model(saved)
    (saved / "config.json").write_text(json.dumps({**config, "dropout": 0.1}))
    with pytest.raises(GenError, match="unknown model config keys dropout"):
        load_model(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(GenError, match="not readable JSON"):
        load_model(saved)


def test_vocab_mismatch_names_both_sizes(saved, tokenizer):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "vocab_size": 512}))
    with pytest.raises(GenError, match=f"tokenizer has {tokenizer.get_vocab_size()} tokens.*vocab_size 512"):
        load_model(saved)


def test_weights_that_do_not_match_config(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "d_ff": 80}))
    with pytest.raises(GenError, match=r"w1.weight has shape \(64, 32\), config needs \(80, 32\)"):
        load_model(saved)
    (saved / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(GenError, match=r"missing layers\.2"):
        load_model(saved)
    (saved / "config.json").write_text(json.dumps({**config, "tie_embeddings": False}))
    with pytest.raises(GenError, match=r"missing lm_head\.weight"):
        load_model(saved)


def test_corrupt_weights(saved):
    (saved / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(GenError, match="not a valid safetensors"):
        load_model(saved)
