"""Sampling filters and sample_next: exact top-k, minimal top-p, min-p, penalty, seeds, validation."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gen_cli.errors import UsageError
from gen_cli.infer.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    draw,
    min_p_filter,
    sample_next,
    top_k_filter,
    top_p_filter,
)

logit_rows = st.lists(
    st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=40), min_size=1, max_size=4
).filter(lambda rows: len({len(r) for r in rows}) == 1)


def _tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_top_k_keeps_exactly_k_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 3.0, 0.0], [2.0] * 6])
    out = top_k_filter(logits, 2)
    assert (torch.isfinite(out).sum(dim=-1) == 2).all()
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) <= {1, 2, 3, 4}


@settings(max_examples=60, deadline=None)
@given(rows=logit_rows, k=st.integers(1, 50))
def test_top_k_count_and_choice(rows, k):
    logits = _tensor(rows)
    out = top_k_filter(logits, k)
    kept = torch.isfinite(out)
    assert (kept.sum(dim=-1) == min(k, logits.shape[-1])).all()
    # every kept logit is ≥ every dropped one, and kept values are unchanged
    for row, out_row, mask in zip(logits, out, kept, strict=True):
        if (~mask).any():
            assert row[mask].min() >= row[~mask].max()
        assert torch.equal(out_row[mask], row[mask])


@settings(max_examples=80, deadline=None)
@given(rows=logit_rows, p=st.floats(0.01, 1.0))
def test_top_p_is_the_smallest_set_reaching_p(rows, p):
    logits = _tensor(rows)
    out = top_p_filter(logits, p)
    probs = torch.softmax(logits.double(), dim=-1)
    for prob, mask in zip(probs, torch.isfinite(out), strict=True):
        kept = prob[mask]
        assert len(kept) >= 1
        assert kept.sum() >= p - 1e-5  # reaches p
        # minimal: dropping the least likely kept token falls short of p
        if len(kept) > 1:
            assert kept.sum() - kept.min() < p + 1e-5
        # and it takes the most likely tokens
        if (~mask).any():
            assert kept.min() >= prob[~mask].max() - 1e-7


def test_top_p_example():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.4)).tolist() == [[True, False, False, False]]


def test_min_p_keeps_tokens_relative_to_the_top():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(min_p_filter(logits, 0.3)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(min_p_filter(logits, 0.61)).tolist() == [[True, False, False, False]]


def test_repetition_penalty_ctrl_style():
    logits = torch.tensor([[2.0, -2.0, 1.0, 4.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 4.0]]
    assert apply_repetition_penalty(logits, torch.tensor([[0]]), 1.0) is logits


@settings(max_examples=40, deadline=None)
@given(rows=logit_rows)
def test_temperature_zero_is_exactly_argmax(rows):
    logits = _tensor(rows)
    got = sample_next(logits, None, SamplingConfig(temperature=0.0), torch.Generator().manual_seed(0))
    assert torch.equal(got, logits.argmax(dim=-1))


def test_fixed_seed_reproduces_and_seeds_differ():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    cfg = SamplingConfig(temperature=1.5, top_k=40, top_p=0.95, min_p=0.01)

    def draw(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [t for _ in range(10) for t in sample_next(logits, None, cfg, g).tolist()]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_samples_only_from_kept_tokens():
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0, -2.0]]).repeat(200, 1)
    got = sample_next(logits, None, SamplingConfig(temperature=1.0, top_k=2), torch.Generator().manual_seed(0))
    assert set(got.tolist()) == {0, 1}


def test_draw_follows_the_weights_unnormalized_and_row_by_row():
    weights = torch.tensor([[0.0, 2.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, 3.0]])  # rows sum to 4, not 1
    got = draw(weights.repeat(4000, 1), torch.Generator().manual_seed(0)).view(4000, 2)  # (4000, 2)
    for row, w in zip(got.T, weights, strict=True):
        counts = torch.bincount(row, minlength=5).double()
        kept = w > 0
        expected = 4000 * w[kept].double() / w.sum()
        chi2 = float((((counts[kept] - expected) ** 2) / expected).sum())
        assert chi2 < 13.8 and counts[~kept].sum() == 0  # ≤ 2 degrees of freedom, p = 0.001
    assert draw(weights[0], torch.Generator()).shape == () and draw(weights, torch.Generator()).shape == (2,)


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=30), st.floats(0, 1, exclude_max=True))
def test_draw_never_picks_a_zero_weight(weights, u):
    w = torch.tensor([*weights, 1.0, 0.0, 0.0], dtype=torch.float32)  # the last positive one, then zeros
    for at in (u, 1 - 2**-53):  # any uniform, and the largest (u × total must stay below the total)
        with mock.patch("torch.rand", return_value=torch.tensor([at], dtype=torch.float64)):
            assert w[int(draw(w, None))] > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_k": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"min_p": -0.1},
        {"min_p": 1.5},
        {"repetition_penalty": 0.0},
    ],
)
def test_invalid_configs_are_usage_errors_naming_the_value(kwargs):
    (name,) = kwargs
    with pytest.raises(UsageError, match=f"^{name} must") as caught:
        SamplingConfig(**kwargs)
    assert caught.value.params == (name,)  # the CLI shows it as --{name with dashes}


@settings(max_examples=60, deadline=None)
@given(rows=logit_rows, k=st.integers(1, 50), p=st.floats(0.01, 1.0), m=st.floats(0.0, 1.0))
def test_filter_chain_leaves_a_distribution(rows, k, p, m):
    logits = min_p_filter(top_p_filter(top_k_filter(_tensor(rows), k), p), m)
    probs = torch.softmax(logits, dim=-1)
    assert torch.isfinite(logits).any(dim=-1).all()  # never an empty set
    assert torch.allclose(probs.sum(dim=-1), torch.ones(len(rows)), atol=1e-5)
