"""generate(): the cached path equals the no-cache oracle; lengths are checked; stats are honest."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from gen_cli.cache.linear import KVCache
from gen_cli.errors import UsageError
from gen_cli.infer import generate as generate_module
from gen_cli.infer.generate import decode_step, generate, new_cache, prefill, run_generation
from gen_cli.infer.options import SamplingConfig
from gen_cli.model.transformer import Transformer

CTX = 16
GREEDY = SamplingConfig(temperature=0.0)
_MODELS: dict[tuple[int, str], Transformer] = {}


def _model(kv: int, pos: str) -> Transformer:
    if (kv, pos) not in _MODELS:
        torch.manual_seed(0)
        # std 0.3 instead of 0.02: sharper logits, so greedy ties cannot hide a difference
        model = Transformer(tiny_config(n_kv_head=kv, pos_encoding=pos, context_length=CTX)).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.3)
        _MODELS[(kv, pos)] = model
    return _MODELS[(kv, pos)]


def _run(model, prompt, new, use_cache, sampling=GREEDY, seed=0, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cache = new_cache(model, prompt, new, kw.get("num_samples", 1)) if use_cache else None
    steps = list(generate(model, prompt, new, sampling, cache, generator=g, **kw))
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("attention,kv", [("mha", 4), ("gqa", 2), ("mqa", 1)])
@pytest.mark.parametrize("pos", ["rope", "sinusoidal", "learned", "alibi"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("prompt_len", [1, 6, CTX - 1])
def test_cache_matches_no_cache_oracle(attention, kv, pos, batch, prompt_len):
    model = _model(kv, pos)
    assert model.config.attention_kind == attention
    prompt = torch.randint(0, 300, (batch, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    new = CTX - prompt_len
    cached, oracle = _run(model, prompt, new, True), _run(model, prompt, new, False)
    assert torch.equal(cached, oracle)

    # Logits: prefill + one decode step per token vs one full no-cache pass over the final sequence.
    seq = torch.cat([prompt, oracle], dim=1)[:, :CTX]
    with torch.no_grad():
        full = model(seq)  # (B, CTX, V)
    cache = KVCache(model.config, batch, CTX)
    got = [prefill(model, prompt, cache)]
    for t in range(prompt_len, CTX):
        got.append(decode_step(model, seq[:, t : t + 1], cache))
    got = torch.stack(got, dim=1)  # (B, CTX - prompt_len + 1, V)
    want = full[:, prompt_len - 1 :]
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("kv", [4, 1])
def test_num_samples_share_one_prefill(kv):
    model = _model(kv, "rope")
    prompt = torch.tensor([[5, 9, 11, 2]])
    greedy = _run(model, prompt, 8, True, num_samples=3)
    assert greedy.shape == (3, 8)
    single = _run(model, prompt, 8, True)
    assert all(torch.equal(row, single[0]) for row in greedy)
    cfg = SamplingConfig(temperature=1.0)
    shared = _run(model, prompt, 10, True, cfg, seed=4, num_samples=3)
    oracle = _run(model, prompt, 10, False, cfg, seed=4, num_samples=3)
    assert torch.equal(shared, oracle)
    assert len({tuple(r) for r in shared.tolist()}) > 1  # the samples are independent draws


def test_same_seed_same_tokens():
    model = _model(2, "rope")
    prompt = torch.tensor([[1, 2, 3]])
    cfg = SamplingConfig(temperature=1.0, top_k=50)
    assert torch.equal(_run(model, prompt, 10, True, cfg, seed=1), _run(model, prompt, 10, True, cfg, seed=1))
    assert not torch.equal(_run(model, prompt, 10, True, cfg, seed=1), _run(model, prompt, 10, True, cfg, seed=2))


def test_context_overflow_refused_up_front():
    model = _model(4, "rope")
    with pytest.raises(UsageError, match=r"context length of 16 tokens; use max_new_tokens 11 or less"):
        generate(model, torch.zeros(1, 5, dtype=torch.long), 12, GREEDY, None)
    with pytest.raises(UsageError, match="context length is 16"):
        generate(model, torch.zeros(1, 16, dtype=torch.long), 1, GREEDY, None)
    assert len(list(generate(model, torch.zeros(1, 5, dtype=torch.long), 11, GREEDY, None))) == 11


def test_stop_token_ends_rows_and_pads_them():
    model = _model(4, "rope")
    prompt = torch.tensor([[3, 4], [7, 8]])
    free = _run(model, prompt, 10, True)
    stop = int(free[0, 2])
    got = _run(model, prompt, 10, True, stop_token_id=stop)
    first = (got[0] == stop).nonzero()[0].item()
    assert first <= 2
    assert torch.equal(got[0, :first], free[0, :first])
    for row in got:  # once a row stopped it only repeats the stop id
        hits = (row == stop).nonzero()
        if len(hits):
            assert (row[hits[0].item() :] == stop).all()


def test_run_generation_stats_are_consistent():
    model = _model(2, "rope")
    prompt = torch.tensor([[1, 2, 3, 4]])
    result = run_generation(model, prompt, 8, GREEDY, use_cache=True, num_samples=2)
    s = result.stats
    assert result.tokens.shape == (2, 8)
    assert (s.prompt_tokens, s.new_tokens, s.batch) == (4, 8, 2)
    assert s.kv_cache_bytes == s.kv_cache_bytes_analytic == 2 * 2 * 2 * 8 * 12 * 2 * 4
    assert len(s.per_token_latencies) == 7
    assert s.dtype == "float32" and s.device == "cpu" and s.memory_method
    assert torch.equal(result.tokens, _run(model, prompt, 8, True, num_samples=2))

    off = run_generation(model, prompt, 3, GREEDY, use_cache=False)
    assert off.stats.kv_cache_bytes == off.stats.kv_cache_bytes_analytic == 0
    assert torch.equal(off.tokens, result.tokens[:1, :3])


def test_run_generation_stops_when_callback_says_so():
    model = _model(1, "learned")
    seen = []
    result = run_generation(model, torch.tensor([[1]]), 10, GREEDY, on_token=lambda t: seen.append(t) or len(seen) == 3)
    assert result.tokens.shape == (1, 3) and not result.interrupted


def test_keyboard_interrupt_keeps_what_was_generated():
    model = _model(4, "rope")

    def on_token(t):
        raise KeyboardInterrupt

    result = run_generation(model, torch.tensor([[1, 2]]), 10, GREEDY, on_token=on_token)
    assert result.interrupted and result.tokens.shape == (1, 1)


def test_run_generation_times_each_step_from_resume_to_yield(monkeypatch):
    """With a clock that ticks 1 s per reading, every figure is known exactly: time spent between
    yields (printing, on_token) is not counted, the first step is the time to first token."""
    ticks = iter(range(1000))
    monkeypatch.setattr(generate_module, "perf_counter", lambda: float(next(ticks)))
    prompt = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    s = run_generation(_model(2, "rope"), prompt, 6, GREEDY, use_cache=True).stats
    # Readings: start, then per token one at the yield and one on resuming: each step takes 1 s.
    assert s.ttft_s == 1.0 and s.per_token_latencies == [1.0] * 5
    assert s.prefill_tokens_per_s == 4 * 2 / 1.0  # prompt tokens × rows over the time to first token
    assert s.decode_tokens_per_s == 2.0 and s.ms_per_token == 1000.0  # 2 rows per 1 s step
