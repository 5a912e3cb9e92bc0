"""Batched decode throughput: B sequences at ragged positions stepping together (`infer.batch.batched_step`),
tokens per second at each B, the batch sizes interleaved round by round so a busy machine's drift hits all."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from gen_cli.cache.spec import CacheSpec
from gen_cli.infer.batch import batched_step, prefill_chunk
from gen_cli.infer.generate import new_cache
from gen_cli.model.transformer import Transformer


@dataclass
class BatchRate:
    """Decode tokens per second of one batch size: the median over rounds, with the range."""

    batch: int
    tokens_per_s: float
    low: float
    high: float


def _caches(model: Transformer, batch: int, prompt: int, steps: int, spec: CacheSpec) -> list:
    """`batch` caches prefilled with prompts of ragged lengths around `prompt` (rows at different positions)."""
    device = model.norm.weight.device
    caches = []
    for i in range(batch):
        length = max(1, prompt - (i * 7) % max(1, prompt // 2))
        ids = torch.arange(length, device=device)[None] % model.config.vocab_size  # (1, length)
        cache = new_cache(model, ids, steps + 1, 1, spec)
        prefill_chunk(model, ids[0].tolist(), cache)
        caches.append(cache)
    return caches


def batch_rates(
    model: Transformer,
    batches: list[int],
    steps: int = 32,
    rounds: int = 5,
    prompt: int = 64,
    spec: CacheSpec = CacheSpec(),
) -> list[BatchRate]:
    """Decode tokens per second at each batch size: `rounds` rounds, each timing `steps` steps of every B."""
    seen: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(rounds):
        for b in batches:
            caches = _caches(model, b, prompt, steps, spec)
            tokens = [1] * b
            batched_step(model, tokens, caches)  # untimed: the first step's allocations
            start = time.perf_counter()
            for _ in range(steps - 1):
                batched_step(model, tokens, caches)
            seen[b].append(b * (steps - 1) / (time.perf_counter() - start))
    return [BatchRate(b, statistics.median(r), min(r), max(r)) for b, r in seen.items()]
