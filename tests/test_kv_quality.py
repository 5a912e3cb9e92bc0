"""Δ bits per byte of a KV cache kind: held-out text teacher-forced through the kind, minus full precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gen_cli.cache.spec import CacheSpec
from gen_cli.lab.kv_quality import delta_bits_per_byte, spec_factory, teacher_forced_nats
from gen_cli.model.transformer import Transformer
from tests.conftest import TEXT, fit, tiny_config

CONFIG = tiny_config(d_model=64, n_head=2, n_kv_head=2, context_length=64)  # head_dim 32: int4 fits


@pytest.fixture(scope="module")
def trained(tokenizer) -> tuple[Transformer, np.ndarray, int]:
    """A tiny model trained briefly on TEXT's first 80%, its last 20% as held-out ids and their bytes."""
    from gen_cli.text.tokenizer import encode
    from gen_cli.train.tokens import byte_lengths

    torch.manual_seed(0)
    ids = np.asarray(encode(tokenizer, TEXT), dtype=np.int64)
    cut = int(len(ids) * 0.8)
    model = Transformer(CONFIG.replace(vocab_size=tokenizer.get_vocab_size()))
    data = torch.from_numpy(ids[:cut])
    fit(model, data)
    val = ids[cut : cut + 300]
    return model, val, int(byte_lengths(tokenizer)[val[1:]].sum())


def test_full_precision_kind_costs_exactly_nothing_and_fewer_bits_cost_more(trained):
    model, val, n_bytes = trained
    kinds = {"fp32": ("fp32", "fp32"), "int8": ("int8", "int8"), "int4": ("int4", "int4")}
    res = delta_bits_per_byte(model, val, n_bytes, {k: spec_factory(CacheSpec(*v)) for k, v in kinds.items()})
    assert res["fp32"]["delta_bits_per_byte"] == 0.0  # the same cache, the same sums: exactly
    assert res["int4"]["delta_bits_per_byte"] >= res["int8"]["delta_bits_per_byte"] >= 0
    assert res["int4"]["delta_bits_per_byte"] > 0


def test_teacher_forcing_through_the_cache_equals_the_no_cache_score(trained):
    from gen_cli.train.evaluate import evaluate

    model, val, _ = trained
    nats, targets = teacher_forced_nats(model, val, spec_factory(), context=64, chunk=5)
    ref = evaluate(model, val, np.ones(CONFIG.vocab_size * 4, dtype=np.int64), 64, 4, torch.device("cpu"), None)
    assert targets == ref.tokens
    assert nats == pytest.approx(ref.loss * ref.tokens, rel=1e-5)
    # A quantized kind rounds each token's K/V on its own, so how the text is chunked does not matter.
    one = teacher_forced_nats(model, val, spec_factory(CacheSpec("int4", "int8")), context=64, chunk=1)[0]
    many = teacher_forced_nats(model, val, spec_factory(CacheSpec("int4", "int8")), context=64, chunk=16)[0]
    assert one == pytest.approx(many, rel=1e-5)


def test_any_cache_factory_plugs_in(trained):
    model, val, n_bytes = trained
    made = []

    def counting(model, batch, max_tokens):
        made.append((batch, max_tokens))
        return spec_factory()(model, batch, max_tokens)

    res = delta_bits_per_byte(model, val, n_bytes, {"counted": counting}, context=32)
    assert res["counted"]["delta_bits_per_byte"] == 0.0
    assert sum(b for b, _ in made) == -(-(len(val) - 1) // 32)  # one cache row per window of 32


def test_cli_compare_reports_each_kinds_cost_on_a_trained_models_own_weights(model_dir, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from gen_cli.cli import app

    monkeypatch.setenv("GEN_HOME", str(tmp_path / "home"))  # the token files it writes
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    args = ["compare", "--model", str(model_dir), "--attention", "mha,mqa", "--pos", "rope", "--kv-cache", "on",
            "--kv-dtype", "fp32,int8", "--prompt-len", "8", "--max-new-tokens", "8", "--repeats", "1", "--warmup", "0",
            "--device", "cpu", "--quality-data", str(text), "--in-process", "--format", "json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    own = {r["kv_dtype"]: r for r in data["rows"] if r.get("kv_weights") == "trained"}
    assert set(own) == {"fp32", "int8"} and all(r["attention"] == "mha" for r in own.values())
    assert own["fp32"]["kv_delta_bits_per_byte"] == 0.0 and own["fp32"]["kv_kl_mean"] == 0.0
    assert own["int8"]["kv_reference_bits_per_byte"] > 0
    others = [r for r in data["rows"] if r["attention"] == "mqa"]  # no trained weights of that shape
    assert others and all(r["kv_delta_bits_per_byte"] is None for r in others)
    assert "trained weights" in data["env"]["kv_quality"]
