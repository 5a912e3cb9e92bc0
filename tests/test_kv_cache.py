"""KVCache: sized by n_kv_head, bytes match the formula, in-place writes, overflow."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from gen_cli.cache.linear import KVCache
from gen_cli.cache.spec import CacheSpec
from gen_cli.errors import InternalError
from gen_cli.model.attention import Positions, visible
from gen_cli.model.transformer import random_model


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_shapes_follow_kv_heads_not_query_heads(kv):
    config = tiny_config(n_head=4, n_kv_head=kv)
    cache = KVCache(config, batch_size=3, max_tokens=10)
    assert len(cache.k) == len(cache.v) == config.n_layer
    for t in (*cache.k, *cache.v):
        assert t.shape == (3, kv, 10, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_bytes_match_the_formula(dtype, kv):
    config = tiny_config(n_kv_head=kv)
    cache = KVCache(config, batch_size=2, max_tokens=12, dtype=dtype)
    size = torch.empty((), dtype=dtype).element_size()
    # 2 (K and V) × n_layer × n_kv_head × head_dim × slots × batch × bytes, written out: tiny_config has
    # 2 layers and head_dim 8.
    expected = 2 * 2 * kv * 8 * 12 * 2 * size
    assert cache.nbytes == expected
    assert CacheSpec().nbytes(config, 12, 2, size) == expected


def test_mqa_cache_is_n_head_times_smaller():
    mha = KVCache(tiny_config(n_kv_head=4), 1, 16)
    mqa = KVCache(tiny_config(n_kv_head=1), 1, 16)
    assert mha.nbytes == 4 * mqa.nbytes


def test_update_writes_in_place_and_returns_views():
    cache = KVCache(tiny_config(n_kv_head=2), 1, 8)
    k1, v1 = torch.ones(1, 2, 3, 8), torch.full((1, 2, 3, 8), 2.0)
    k_all, v_all = cache.update(0, k1, v1)
    assert k_all.shape == (1, 2, 3, 8) and torch.equal(v_all, v1)
    assert k_all.data_ptr() == cache.k[0].data_ptr()  # a view, no copy
    cache.advance(3)
    k_all, _ = cache.update(0, torch.full((1, 2, 1, 8), 5.0), torch.zeros(1, 2, 1, 8))
    assert k_all.shape == (1, 2, 4, 8)
    assert torch.equal(cache.k[0][:, :, 3], torch.full((1, 2, 8), 5.0))
    assert torch.equal(cache.k[0][:, :, :3], k1)
    assert torch.count_nonzero(cache.k[1]) == 0  # other layers untouched


def test_overflow_and_reset():
    cache = KVCache(tiny_config(), 1, 4)
    cache.update(0, torch.zeros(1, 4, 4, 8), torch.zeros(1, 4, 4, 8))
    cache.advance(4)
    with pytest.raises(InternalError, match="4-token capacity"):
        cache.update(0, torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8))
    with pytest.raises(InternalError, match="overflow"):
        cache.advance(1)
    cache.reset()
    assert cache.pos == 0
    cache.update(0, torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8))


def test_first_row_shares_storage_and_replicates():
    cache = KVCache(tiny_config(), 3, 6)
    row = cache.first_row()
    row.update(1, torch.full((1, 4, 2, 8), 7.0), torch.full((1, 4, 2, 8), 9.0))
    row.advance(2)
    cache.replicate_first_row(row.pos)
    assert cache.pos == 2
    assert torch.equal(cache.k[1][:, :, :2], torch.full((3, 4, 2, 8), 7.0))
    assert torch.equal(cache.v[1][:, :, :2], torch.full((3, 4, 2, 8), 9.0))
    assert torch.count_nonzero(cache.k[1][:, :, 2:]) == 0


def test_the_one_visibility_rule_matches_its_definition():
    """Causal, a trained sliding window and a run-time window with sinks: every (query, key) pair checked."""
    q, k = torch.arange(3, 12), torch.arange(12)
    for window, sinks in ((None, 0), (4, 0), (4, 2), (1, 0)):
        got = visible(q, k, window, sinks)
        for i, t in enumerate(q.tolist()):
            for j, p in enumerate(k.tolist()):
                want = p <= t and (window is None or p < sinks or p > t - window)
                assert bool(got[i, j]) == want, (window, sinks, t, p)


class ShuffledCache(KVCache):
    """A linear cache that hands its keys back in a shuffled order and says where each one sits: attention
    must follow the positions a cache reports, never the order or the class."""

    native_layout = False

    def positions(self, T, device):
        end = self.pos + T
        self._order = torch.randperm(end, generator=torch.Generator().manual_seed(end))
        return Positions(self.pos, T, keys=self._order.to(device))

    def update(self, layer, k_new, v_new):
        k, v = super().update(layer, k_new, v_new)
        return k[:, :, self._order], v[:, :, self._order]  # (B, n_kv_head, pos+T, head_dim), shuffled


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi", "learned"])
@pytest.mark.parametrize("sliding_window", [None, 5])
def test_attention_follows_the_positions_any_cache_reports(pos_encoding, sliding_window):
    config = tiny_config(n_kv_head=2, context_length=32, pos_encoding=pos_encoding, sliding_window=sliding_window)
    model = random_model(config)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    cache = ShuffledCache(config, 1, 20)
    got = torch.cat([model(ids[:, :7], cache=cache), model(ids[:, 7:12], cache=cache)]  # chunked prefill
                    + [model(ids[:, t : t + 1], cache=cache) for t in range(12, 20)], dim=1)  # fmt: skip
    torch.testing.assert_close(got, model(ids), atol=1e-5, rtol=1e-5)  # the no-cache oracle
