"""The generation loop on a scripted model: stop tokens, several samples, seeds, cache use; no numerics.

The mock returns logits that make token (last id + 1) mod V the clear favourite, or uniform logits, and
records every forward it receives, so each test checks what the loop fed the model, not what a
transformer computed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gen_cli.cache.linear import KVCache
from gen_cli.errors import InternalError
from gen_cli.infer.generate import generate, greedy_steps, new_cache
from gen_cli.infer.options import SamplingConfig
from gen_cli.model.config import ModelConfig

V = 16
GREEDY = SamplingConfig(temperature=0.0)
UNIFORM = SamplingConfig(temperature=1.0)


class Scripted(nn.Module):
    """Stands in for a Transformer: `model(idx, cache=None, last_only=False)` -> logits (B, T', V)."""

    def __init__(self, uniform: bool = False) -> None:
        super().__init__()
        self.config = ModelConfig(vocab_size=V, n_layer=1, n_head=2, n_kv_head=1, d_model=8, d_ff=16, context_length=32)
        self.native_decoder = None
        self.dtype_anchor = nn.Parameter(torch.zeros(()))  # model_dtype() reads the first parameter
        self.uniform = uniform
        self.calls: list[tuple[tuple[int, ...], int | None]] = []  # (idx shape, cache position before)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        self.calls.append((tuple(idx.shape), None if cache is None else cache.pos))
        if cache is not None:
            cache.advance(idx.shape[1])
        logits = torch.zeros(*idx.shape, V)  # (B, T, V)
        if not self.uniform:
            logits.scatter_(-1, ((idx + 1) % V)[..., None], 10.0)  # favour the next id
        return logits[:, -1:] if last_only else logits


def _ids(model, prompt, n, sampling=GREEDY, cached=True, seed=0, **kw) -> torch.Tensor:
    cache = new_cache(model, prompt, n, kw.get("num_samples", 1)) if cached else None
    g = torch.Generator().manual_seed(seed)
    return torch.stack(list(generate(model, prompt, n, sampling, cache, g, **kw)), dim=1)  # (B, n)


def test_greedy_counts_up_and_the_cache_is_fed_one_token_at_a_time():
    model = Scripted()
    out = _ids(model, torch.tensor([[3, 4, 5]]), 4)
    assert out.tolist() == [[6, 7, 8, 9]]
    # One prefill of the whole prompt, then one token per step at the next position; the last token
    # is never fed (nothing would read its logits).
    assert model.calls == [((1, 3), 0), ((1, 1), 3), ((1, 1), 4), ((1, 1), 5)]


def test_without_a_cache_every_step_recomputes_the_whole_sequence():
    model = Scripted()
    out = _ids(model, torch.tensor([[3, 4, 5]]), 4, cached=False)
    assert out.tolist() == [[6, 7, 8, 9]]
    assert model.calls == [((1, 3), None), ((1, 4), None), ((1, 5), None), ((1, 6), None)]


def test_rows_stop_at_the_stop_token_and_keep_yielding_it():
    model = Scripted()
    out = _ids(model, torch.tensor([[9], [5]]), 6, stop_token_id=11)
    # Row 0 reaches 11 after two steps and pads with it; row 1 reaches it after six.
    assert out.tolist() == [[10, 11, 11, 11, 11, 11], [6, 7, 8, 9, 10, 11]]


def test_generation_ends_when_every_row_has_stopped():
    model = Scripted()
    out = _ids(model, torch.tensor([[9], [8]]), 10, stop_token_id=11)
    assert out.tolist() == [[10, 11, 11], [9, 10, 11]]
    assert len(model.calls) == 3  # no forward after the last row finished


def test_several_samples_share_one_prefill():
    model = Scripted(uniform=True)
    out = _ids(model, torch.tensor([[1, 2]]), 5, UNIFORM, num_samples=4)
    assert out.shape == (4, 5)
    assert model.calls[0] == ((1, 2), 0)  # the prompt ran once, for row 0
    assert model.calls[1:] == [((4, 1), p) for p in range(2, 6)]  # then every sample decodes
    assert len({tuple(row) for row in out.tolist()}) > 1  # uniform logits: the samples differ


def test_same_seed_same_tokens_other_seed_other_tokens():
    prompt = torch.tensor([[1, 2]])
    a, b = (_ids(Scripted(uniform=True), prompt, 12, UNIFORM, seed=7) for _ in range(2))
    c = _ids(Scripted(uniform=True), prompt, 12, UNIFORM, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_reset_cache_serves_a_second_generation_identically():
    model = Scripted(uniform=True)
    prompt = torch.tensor([[1, 2]])
    cache = new_cache(model, prompt, 6)
    first = torch.stack(list(generate(model, prompt, 6, UNIFORM, cache, torch.Generator().manual_seed(3))), 1)
    with pytest.raises(InternalError, match="empty cache"):  # a used cache is refused, never silently reused
        next(generate(model, prompt, 6, UNIFORM, cache))
    cache.reset()
    again = torch.stack(list(generate(model, prompt, 6, UNIFORM, cache, torch.Generator().manual_seed(3))), 1)
    assert torch.equal(first, again)


def test_teacher_forcing_feeds_the_given_tokens():
    model = Scripted()
    prompt = torch.tensor([[3]])
    forced = torch.tensor([[7, 0, 12]])
    steps = list(greedy_steps(model, prompt, 3, new_cache(model, prompt, 3), forced))
    assert [int(t) for _, t in steps] == [7, 0, 12]
    # Each step's logits favour (fed id + 1): the model saw the forced ids, not its own picks.
    assert [int(logits.argmax()) for logits, _ in steps] == [4, 8, 1]
