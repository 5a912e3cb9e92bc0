"""The torch-free sampler (infer/sampling_np.py) against sampling.py: the same probabilities for every filter
and mix of them on random logits, and draws that follow them (a chi-square test over many seeds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gen_cli.infer import sampling, sampling_np
from gen_cli.infer.options import SamplingConfig

configs = st.builds(
    SamplingConfig,
    temperature=st.sampled_from([0.0, 1e-30, 0.3, 0.8, 1.0, 2.5, 1e39]),
    top_k=st.one_of(st.none(), st.integers(1, 70)),
    top_p=st.one_of(st.none(), st.floats(0.05, 1.0)),
    min_p=st.one_of(st.none(), st.floats(0.0, 0.5)),
    repetition_penalty=st.sampled_from([1.0, 0.7, 1.3]),
)


@settings(max_examples=150, deadline=None)
@given(cfg=configs, seed=st.integers(0, 2**32 - 1), history=st.lists(st.integers(0, 63), max_size=12))
def test_the_same_distribution_as_the_torch_sampler(cfg, seed, history):
    # A huge temperature makes every logit tie: which tied tokens top-k / top-p keep is torch.sort's own order.
    assume(not (cfg.temperature > 1e38 and (cfg.top_k is not None or cfg.top_p is not None)))
    logits = np.random.default_rng(seed).standard_normal(64).astype(np.float32) * 3
    got = sampling_np.distribution(logits, history, cfg)
    ids = torch.tensor([history], dtype=torch.long) if history else None
    expected = sampling.distribution(torch.from_numpy(logits)[None], ids, cfg)[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert (got > 0).tolist() == (expected > 0).tolist()  # the same tokens kept


def test_draws_follow_the_distribution_and_a_seed_repeats_them():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.1, 1e-9], np.float32))
    cfg = SamplingConfig(temperature=1.0)
    draws = [sampling_np.sample(logits, [], cfg, sampling_np.generator(seed)) for seed in range(4000)]
    counts = np.bincount(draws, minlength=5)
    expected = 4000 * np.array([0.5, 0.25, 0.15, 0.1])
    chi2 = (((counts[:4] - expected) ** 2) / expected).sum()
    assert chi2 < 16.3 and counts[4] == 0  # 3 degrees of freedom, p = 0.001
    rng_a, rng_b = sampling_np.generator(-5), sampling_np.generator(-5)
    assert [sampling_np.sample(logits, [], cfg, rng_a) for _ in range(20)] == [
        sampling_np.sample(logits, [], cfg, rng_b) for _ in range(20)
    ]


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_is_the_argmax_after_the_penalty(penalty):
    logits = np.array([1.0, 3.0, 2.9, -1.0], np.float32)
    cfg = SamplingConfig(temperature=0.0, repetition_penalty=penalty)
    assert sampling_np.sample(logits, [1], cfg, sampling_np.generator(0)) == (1 if penalty == 1.0 else 2)


@settings(deadline=None)
@given(
    size=st.integers(1, 3 * sampling_np.BLOCK + 5),
    zeros=st.floats(0, 0.9),
    seed=st.integers(0, 2**32 - 1),
    u=st.one_of(st.floats(0, 1, exclude_max=True), st.just(1 - 2**-53)),
)
def test_inverse_cdf_by_blocks_finds_what_one_running_sum_finds(size, zeros, seed, u):
    rng = np.random.default_rng(seed)
    probs = np.where(rng.random(size) < zeros, 0, rng.random(size)).astype(np.float32)  # (size,), some zeros
    assume(probs.sum() > 0)
    got = sampling_np.inverse_cdf(probs, u)
    cdf = np.cumsum(probs, dtype=np.float64)  # the plain inverse: one running sum over every entry
    target = u * cdf[-1]
    want = min(int(np.searchsorted(cdf, target, side="right")), probs.size - 1)
    assert probs[got] > 0
    # The same index, unless the target lies within rounding of the boundary between the two.
    assert got == want or abs(cdf[min(got, want)] - target) <= 1e-9 * cdf[-1]
