"""Memory checks count the KV cache in the kind it is stored in (int8/int4 with their scales), not fp32."""

from __future__ import annotations

import pytest
import torch

from gen_cli import memory
from gen_cli.cache.linear import KVCache
from gen_cli.cache.spec import CacheSpec
from gen_cli.errors import GenError
from gen_cli.infer.generate import new_cache
from gen_cli.model.transformer import Transformer
from tests.conftest import tiny_config

CONFIG = tiny_config(d_model=128, n_head=4, n_kv_head=2, n_layer=3, context_length=512)  # head_dim 32


@pytest.mark.parametrize(
    ("kinds", "per_head"),
    [
        (None, 4 * 32 + 4 * 32),
        (("int8", "int8"), (32 + 4) * 2),  # int8 values + one fp32 scale per token per head
        (("int4", "int4"), (16 + 8) * 2),  # two values a byte + fp32 scale and zero per group of 32
        (("int8", "int4"), (32 + 4) + (16 + 8)),
        (("bf16", "fp32"), 2 * 32 + 4 * 32),
    ],
)
def test_generation_bytes_counts_the_kv_kind(kinds, per_head):
    batch, tokens = 3, 100
    kv = CONFIG.n_layer * CONFIG.n_kv_head * per_head * tokens * batch
    buffers = batch * (8 * tokens + memory.sampling_bytes(CONFIG.vocab_size))
    assert memory.generation_bytes(CONFIG, batch, tokens, 4, CacheSpec(*(kinds or (None, None)))) == kv + buffers
    k, v = kinds or (None, None)
    assert kv == KVCache(CONFIG, batch, tokens, k_kind=k, v_kind=v).nbytes  # what the cache really holds


def test_a_cache_refused_in_fp32_fits_in_int4(monkeypatch):
    model = Transformer(CONFIG)
    prompt = torch.zeros(1, 10, dtype=torch.long)
    buffers = 8 * (8 * 500 + memory.sampling_bytes(CONFIG.vocab_size))
    fp32 = memory.generation_bytes(CONFIG, 8, 500, 4)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": (fp32 + buffers) // 2)
    with pytest.raises(GenError, match="needs about"):
        new_cache(model, prompt, 490, num_samples=8)
    cache = new_cache(model, prompt, 490, num_samples=8, spec=CacheSpec("int4", "int4"))
    assert cache.nbytes < (fp32 + buffers) // 2
