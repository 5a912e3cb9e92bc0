"""KVCache: sized by n_kv_head, bytes match the formula, in-place writes, overflow."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from gen_cli.cache.linear import KVCache
from gen_cli.cache.spec import CacheSpec
from gen_cli.errors import InternalError


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
