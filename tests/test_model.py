"""The transformer: positional encodings, shapes, init, chunked prefill, context limit."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from gen_cli.cache.linear import KVCache
from gen_cli.errors import GenError
from gen_cli.model.transformer import Transformer, apply_rope, rope_tables, sinusoidal_table


def _model(**changes) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(**changes)).eval()


def test_sinusoidal_values_match_the_original_formula():
    table = sinusoidal_table(3, 4)
    assert torch.allclose(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    expected = torch.tensor([math.sin(1), math.cos(1), math.sin(1 / 100), math.cos(1 / 100)])
    assert torch.allclose(table[1], expected, atol=1e-6)
    assert torch.allclose(table[1], torch.tensor([0.84147, 0.54030, 0.0099998, 0.99995]), atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(1)
    head_dim = 8
    cos, sin = rope_tables(64, head_dim, 10000.0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q.view(1, 1, 1, -1), cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k.view(1, 1, 1, -1), cos[n : n + 1], sin[n : n + 1])
        return float((qm * kn).sum())

    for m, n in [(5, 2), (9, 0), (30, 30), (3, 12)]:
        for shift in (1, 7, 20):
            assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-5)
    # and it is not trivially constant: a different offset gives a different score
    assert abs(score(5, 2) - score(5, 4)) > 1e-4


def test_rope_preserves_norm_and_position_zero_is_identity():
    cos, sin = rope_tables(16, 8, 10000.0)
    x = torch.randn(2, 3, 16, 8)
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.allclose(y[:, :, 0], x[:, :, 0])


@pytest.mark.parametrize("pos", ["rope", "sinusoidal", "learned"])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_forward_shapes(pos, norm):
    model = _model(pos_encoding=pos, norm=norm)
    logits = model(torch.randint(0, 300, (3, 7)))
    assert logits.shape == (3, 7, 300)
    assert model(torch.randint(0, 300, (3, 7)), last_only=True).shape == (3, 1, 300)


@pytest.mark.parametrize(("kv", "features"), [(4, (4 + 8) * 8), (2, (4 + 4) * 8), (1, (4 + 2) * 8)])
def test_fused_qkv_width_follows_kv_heads(kv, features):
    model = _model(n_kv_head=kv)
    assert model.layers[0].attn.wqkv.weight.shape == (features, 32)
    assert all(p.dim() > 1 or "norm" in n for n, p in model.named_parameters())  # no linear biases


def test_tied_embeddings_count_once():
    tied, untied = _model(tie_embeddings=True), _model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.num_parameters() - tied.num_parameters() == 300 * 32


def test_residual_projections_are_scaled():
    torch.manual_seed(0)
    model = Transformer(tiny_config(d_model=256, n_head=4, d_ff=512, n_layer=8))
    std = torch.cat([b.attn.wo.weight.flatten() for b in model.layers]).std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.layers[0].attn.wqkv.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("pos", ["rope", "sinusoidal", "learned"])
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_chunked_prefill_matches_full_forward(pos, kv):
    model = _model(pos_encoding=pos, n_kv_head=kv)
    idx = torch.randint(0, 300, (2, 15))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, 2, 16)
        chunks = [model(idx[:, a:b], cache=cache) for a, b in [(0, 4), (4, 5), (5, 11), (11, 15)]]
    assert cache.pos == 15
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)


def test_cache_advances_once_per_forward():
    model = _model(n_layer=3)
    cache = KVCache(model.config, 1, 16)
    with torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
        assert cache.pos == 5
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    assert cache.pos == 6


def test_context_overflow_is_refused_with_the_limit():
    model = _model()
    with pytest.raises(GenError, match="context length of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = KVCache(model.config, 1, 16)
    with torch.no_grad():
        model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
        with pytest.raises(GenError, match="16"):
            model(torch.zeros(1, 7, dtype=torch.long), cache=cache)
    assert cache.pos == 10  # a refused forward leaves the cache where it was
