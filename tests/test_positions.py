"""Positions: ALiBi slopes and bias against the paper, cached = no-cache under ALiBi (MHA/GQA/MQA), and the
RoPE scalings (linear, NTK, YaRN) against hand-computed angles and transformers' YaRN."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from gen_cli.cache.linear import KVCache
from gen_cli.errors import UsageError
from gen_cli.model.config import ModelConfig, parse_rope_scaling, with_rope_scaling
from gen_cli.model.positions import alibi_bias, alibi_slopes, rope_angles, rope_tables, yarn_attention_factor
from gen_cli.model.transformer import Transformer, apply_rope, apply_rope_scaling, model_from_tensors
from gen_cli.native.abi import unsupported_properties


def _model(**changes) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny_config(**changes)).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so a wrong bias cannot hide
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


# ---- ALiBi


def test_alibi_slopes_are_the_papers_for_8_and_12_heads():
    assert alibi_slopes(8) == [2.0**-k for k in range(1, 9)]  # 1/2 … 1/256
    # 12 heads: the 8-head slopes, then every other slope of 16 heads (2^-0.5, 2^-1.5, …), four of them
    assert alibi_slopes(12) == pytest.approx(
        [2.0**-k for k in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    )
    assert alibi_slopes(1) == [2.0**-8]


def test_alibi_bias_is_minus_slope_times_distance_and_causal():
    slopes = torch.tensor([0.5, 0.25])
    q_pos, k_pos = torch.arange(3, 5), torch.arange(5)  # two queries after a 3-token prefix
    bias = alibi_bias(slopes, q_pos, k_pos)
    assert bias.shape == (2, 2, 5)
    for h, m in enumerate((0.5, 0.25)):
        for i, q in enumerate((3, 4)):
            for j in range(5):
                want = -m * (q - j) if j <= q else -math.inf
                assert bias[h, i, j].item() == want


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_alibi_cache_equals_no_cache_in_chunks_and_steps(kv):
    model = _model(pos_encoding="alibi", n_kv_head=kv)
    assert "rope_cos" not in dict(model.named_buffers()) and not hasattr(model, "pos_emb")
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(kv))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, 2, 16)
        parts = [model(idx[:, :5], cache), model(idx[:, 5:9], cache)]  # prefill, then a chunk after a prefix
        parts += [model(idx[:, t : t + 1], cache) for t in range(9, 16)]  # decode steps
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_alibi_positions_matter_and_slopes_stay_fp32():
    model = _model(pos_encoding="alibi")
    idx = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(idx)
        model.alibi_slopes = torch.zeros(4)  # no bias: a bag of words, the last row changes
        b = model(idx)
    assert not torch.allclose(a[:, -1], b[:, -1], atol=1e-3)
    bf16 = _model(pos_encoding="alibi", n_head=6, n_kv_head=6, d_model=48).to(torch.bfloat16)
    assert bf16.alibi_slopes.dtype == torch.float32
    assert bf16.alibi_slopes.tolist() == alibi_slopes(6)


def test_alibi_loads_from_tensors_and_the_native_step_refuses_it():
    model = _model(pos_encoding="alibi")
    loaded = model_from_tensors(model.config, {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
    idx = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert any("ALiBi" in p for p in unsupported_properties(model.config))
    assert ModelConfig.from_dict(model.config.to_dict()).pos_encoding == "alibi"


# ---- RoPE scaling


def _plain_angle(p: int, i: int, d: int, base: float = 10000.0) -> float:
    return p * base ** (-2 * i / d)


@pytest.mark.parametrize("p,i", [(0, 0), (5, 0), (37, 3), (100, 7)])
def test_linear_and_ntk_angles_equal_hand_computed_values(p, i):
    d, base, f = 16, 10000.0, 4.0
    pos = torch.tensor([p])
    linear = rope_angles(pos, d, base, {"type": "linear", "factor": f})[0, i].item()
    assert linear == pytest.approx(_plain_angle(p, i, d) / f, rel=1e-12)
    ntk = rope_angles(pos, d, base, {"type": "ntk", "factor": f})[0, i].item()
    assert ntk == pytest.approx(p * (base * f ** (d / (d - 2))) ** (-2 * i / d), rel=1e-12)
    if i == d // 2 - 1:  # NTK's lowest frequency is exactly interpolated by the factor
        assert ntk == pytest.approx(_plain_angle(p, i, d) / f, rel=1e-12)


@pytest.mark.parametrize("kind", ["linear", "ntk"])
def test_factor_one_is_plain_rope_exactly(kind):
    plain = rope_tables(64, 16, 10000.0)
    scaled = rope_tables(64, 16, 10000.0, {"type": kind, "factor": 1.0})
    assert all(torch.equal(a, b) for a, b in zip(plain, scaled, strict=True))
    model = _model()
    idx = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        want = model(idx)
        apply_rope_scaling(model, parse_rope_scaling(f"{kind}:1"))
        assert torch.equal(model(idx), want)


def test_yarn_angles_and_temperature_by_hand():
    d, base, f, orig = 16, 10000.0, 4.0, 64
    scaling = parse_rope_scaling(f"yarn:{f:g},orig={orig}")
    # Ramp bounds: the dimension whose wavelength fits beta rotations in `orig` tokens.
    low = math.floor(d * math.log(orig / (32 * 2 * math.pi)) / (2 * math.log(base)))
    high = math.ceil(d * math.log(orig / (1 * 2 * math.pi)) / (2 * math.log(base)))
    low, high = max(low, 0), min(high, d - 1)
    for i in range(d // 2):
        keep = 1 - min(max((i - low) / (high - low), 0.0), 1.0)
        inv = base ** (-2 * i / d)
        want = 50 * (inv / f * (1 - keep) + inv * keep)
        assert rope_angles(torch.tensor([50]), d, base, scaling)[0, i].item() == pytest.approx(want, rel=1e-12)
    mscale = 0.1 * math.log(f) + 1
    assert yarn_attention_factor(scaling) == pytest.approx(mscale)
    cos, sin = rope_tables(8, d, base, scaling)
    x = torch.randn(1, 1, 1, d)
    # At position 0 the rotation is the identity, so what is left is the temperature: q·k scales by mscale².
    assert torch.allclose(apply_rope(x, cos[:1], sin[:1]), x * mscale, atol=1e-6)
    assert cos[3, 0].item() == pytest.approx(mscale * math.cos(3 * base**0 * 1.0), rel=1e-6)


def test_yarn_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=1024)
    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0}
    config.rope_parameters = params
    inv, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    ours = parse_rope_scaling("yarn:4,orig=256")
    got = rope_angles(torch.tensor([1]), 16, 10000.0, ours)[0]
    assert torch.allclose(got.float(), inv.float(), rtol=1e-6)
    assert yarn_attention_factor(ours) == pytest.approx(attention_factor)


def test_parse_rope_scaling_forms_and_errors_name_the_value():
    assert parse_rope_scaling("linear:4") == {"type": "linear", "factor": 4.0}
    assert parse_rope_scaling("ntk:2.5") == {"type": "ntk", "factor": 2.5}
    assert parse_rope_scaling("none") is None
    y = parse_rope_scaling("yarn:8,orig=128,beta_fast=16")
    assert y == {"type": "yarn", "factor": 8.0, "original_context_length": 128, "beta_fast": 16.0}
    l3 = parse_rope_scaling("llama3:8,orig=8192")
    assert l3["low_freq_factor"] == 1.0 and l3["high_freq_factor"] == 4.0
    for bad in ("cubic:2", "linear:x", "linear:-1", "yarn:4", "linear:2,orig=3", "ntk:"):
        with pytest.raises(UsageError, match="rope_scaling") as info:
            parse_rope_scaling(bad)
        assert repr(bad) in str(info.value) and info.value.params == ("rope_scaling",)


def test_scaling_grows_the_context_and_remembers_the_trained_one():
    config = tiny_config(context_length=16)
    scaled = with_rope_scaling(config, parse_rope_scaling("linear:4"))
    assert scaled.context_length == 64 and scaled.rope_scaling["original_context_length"] == 16
    again = with_rope_scaling(scaled, parse_rope_scaling("ntk:2"))
    assert again.context_length == 32 and again.rope_scaling["original_context_length"] == 16
    assert ModelConfig.from_dict(scaled.to_dict()) == scaled  # a model property: saved and read back
    model = _model()
    apply_rope_scaling(model, parse_rope_scaling("linear:4"))
    assert model.rope_cos.shape == (64, 8) and model.config.context_length == 64
    with torch.no_grad():
        assert model(torch.randint(0, 300, (1, 40))).shape == (1, 40, 300)  # past the trained 16
    with pytest.raises(UsageError, match="needs pos_encoding rope"):
        with_rope_scaling(tiny_config(pos_encoding="alibi"), parse_rope_scaling("linear:2"))


def test_generate_and_eval_take_a_rope_scaling(model_dir, tmp_path):
    from conftest import random_text
    from typer.testing import CliRunner

    from gen_cli.cli import app
    from gen_cli.train.evaluate import evaluate_model

    runner = CliRunner()
    base = ["generate", "The quick", "--model", str(model_dir), "--max-new-tokens", "3", "--temperature", "0"]
    ok = runner.invoke(app, [*base, "--rope-scaling", "linear:2", "--json"])
    assert ok.exit_code == 0, ok.output
    assert "context 64 → 128 tokens" in ok.stderr
    bad = runner.invoke(app, [*base, "--rope-scaling", "yarn:4"])
    assert bad.exit_code == 2 and "--rope-scaling 'yarn:4'" in bad.stderr and "orig=N" in bad.stderr
    zero = runner.invoke(app, [*base, "--rope-scaling", "yarn:2,orig=0"])
    assert zero.exit_code == 2 and "--rope-scaling 'yarn:2,orig=0': yarn original_context_length must be" in zero.stderr
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(random_text(300), encoding="utf-8")
    with pytest.raises(UsageError, match="outside what the model allows"):
        evaluate_model(model_dir, [str(corpus)], "cpu", context=128, max_tokens=200)
    scored = evaluate_model(model_dir, [str(corpus)], "cpu", context=128, max_tokens=200, rope_scaling="linear:2")
    assert scored.tokens == 200 and math.isfinite(scored.loss)


def test_grow_context_extends_tables_and_keeps_the_trained_rows():
    from gen_cli.model.transformer import grow_context

    for pos in ("rope", "sinusoidal", "alibi"):
        model = _model(pos_encoding=pos)
        idx = torch.randint(0, 300, (1, 16))
        with torch.no_grad():
            want = model(idx)
            grow_context(model, 48)
            assert model.config.context_length == 48
            assert torch.allclose(model(idx), want, atol=1e-6)  # the first 16 positions are unchanged
            assert model(torch.randint(0, 300, (1, 48))).shape == (1, 48, 300)
    with pytest.raises(UsageError, match="learned positions end at the trained context of 16"):
        grow_context(_model(pos_encoding="learned"), 32)


def test_eval_by_position_buckets_past_the_trained_context(model_dir, tmp_path):
    from conftest import random_text
    from typer.testing import CliRunner

    from gen_cli.cli import app
    from gen_cli.train.by_position import evaluate_by_position

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(random_text(400), encoding="utf-8")
    res = evaluate_by_position(model_dir, [str(corpus)], context=128, buckets=4, device="cpu", max_tokens=512)
    assert res.trained_context == 64 and res.windows == 4
    assert [(b.start, b.end) for b in res.buckets] == [(0, 32), (32, 64), (64, 96), (96, 128)]
    assert all(b.tokens == 32 * 4 and math.isfinite(b.bits_per_byte) for b in res.buckets)
    args = ["eval", str(model_dir), str(corpus), "--by-position", "--context", "128", "--buckets", "4"]
    out = CliRunner().invoke(app, [*args, "--max-tokens", "512", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert "past training" in out.stdout and "96–127" in out.stdout
