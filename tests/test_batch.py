"""Batched decode at different positions: every row's greedy output equals its single-sequence run, with
ragged prompts, rows joining and leaving between steps, MHA/GQA/MQA, fp32 and int8 KV, and per-row sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from gen_cli.cache.spec import CacheSpec
from gen_cli.infer.batch import Row, batched_step, pick, prefill_chunk
from gen_cli.infer.generate import generate, new_cache
from gen_cli.infer.options import SamplingConfig
from gen_cli.model.transformer import random_model

GREEDY = SamplingConfig(temperature=0.0)


def _model(**changes):
    model = random_model(tiny_config(context_length=48, **changes))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)  # spread logits: no near-ties for greedy to flip on rounding
    return model


def _single(model, prompt: list[int], n: int, spec: CacheSpec) -> list[int]:
    ids = torch.tensor([prompt])
    cache = new_cache(model, ids, n, 1, spec)
    return [int(t[0]) for t in generate(model, ids, n, GREEDY, cache)]


def _row(model, prompt: list[int], n: int, spec: CacheSpec, sampling=GREEDY, generator=None) -> Row:
    cache = new_cache(model, torch.tensor([prompt]), n, 1, spec)
    return Row(cache, list(prompt), sampling, generator, pending=list(prompt))


def _run(model, prompts, n: int, spec: CacheSpec, joins=None) -> list[list[int]]:
    """Rows join at the step `joins` gives (default: all at 0), prefill on joining, leave after n tokens."""
    joins = joins or [0] * len(prompts)
    out: list[list[int]] = [[] for _ in prompts]
    rows: dict[int, Row] = {}
    logits: dict[int, torch.Tensor] = {}
    step = 0
    while any(len(o) < n for o in out):
        for i, prompt in enumerate(prompts):
            if joins[i] == step:
                rows[i] = _row(model, prompt, n, spec)
                logits[i] = prefill_chunk(model, prompt, rows[i].cache)
        live = sorted(rows)
        if live:
            picked = pick(torch.stack([logits[i] for i in live]), [rows[i] for i in live])
            for i, token in zip(live, picked, strict=True):
                out[i].append(token)
                rows[i].ids.append(token)
            for i in [i for i in live if len(out[i]) == n]:
                del rows[i]  # leaves: its cache is dropped
            live = sorted(rows)
            if live:
                step_logits = batched_step(model, [rows[i].ids[-1] for i in live], [rows[i].cache for i in live])
                logits.update({i: step_logits[j] for j, i in enumerate(live)})
        step += 1
    return out


PROMPTS = [[5, 9, 2], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42, 17, 3, 99, 5]]


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("kind", [None, "int8"], ids=["fp32", "int8"])
def test_ragged_rows_decode_as_their_single_runs(kv_heads, kind):
    model = _model(n_kv_head=kv_heads)
    spec = CacheSpec(kind, kind)
    got = _run(model, PROMPTS, 10, spec)
    assert got == [_single(model, p, 10, spec) for p in PROMPTS]


def test_rows_joining_and_leaving_between_steps_decode_as_their_single_runs():
    model = _model(n_kv_head=2)
    got = _run(model, PROMPTS, 8, CacheSpec(), joins=[0, 3, 5, 9])
    assert got == [_single(model, p, 8, CacheSpec()) for p in PROMPTS]


@pytest.mark.parametrize("pos", ["alibi", "learned", "sinusoidal"])
def test_other_position_encodings_decode_as_their_single_runs(pos):
    model = _model(pos_encoding=pos)
    assert _run(model, PROMPTS, 6, CacheSpec()) == [_single(model, p, 6, CacheSpec()) for p in PROMPTS]


def test_window_rows_decode_as_their_single_runs():
    model = _model()
    spec = CacheSpec(window=6, sinks=2)
    assert _run(model, PROMPTS, 12, spec) == [_single(model, p, 12, spec) for p in PROMPTS]


def test_batched_logits_are_the_single_forward_logits():
    model = _model(n_kv_head=2)
    rows = [_row(model, p, 4, CacheSpec()) for p in PROMPTS]
    for row in rows:
        prefill_chunk(model, row.pending, row.cache)
    logits = batched_step(model, [7, 8, 9, 10], [r.cache for r in rows])
    for i, (prompt, token) in enumerate(zip(PROMPTS, [7, 8, 9, 10], strict=True)):
        full = model(torch.tensor([[*prompt, token]]))[0, -1]
        torch.testing.assert_close(logits[i], full, rtol=1e-4, atol=1e-4)
    assert [r.cache.pos for r in rows] == [len(p) + 1 for p in PROMPTS]


def test_each_row_samples_with_its_own_settings_and_generator():
    model = _model()
    hot = SamplingConfig(temperature=1.0, top_p=0.9)

    def tokens(seed: int) -> list[int]:
        rows = [
            _row(model, PROMPTS[0], 1, CacheSpec(), hot, torch.Generator().manual_seed(seed)),
            _row(model, PROMPTS[1], 1, CacheSpec()),
        ]
        logits = torch.stack([prefill_chunk(model, r.pending, r.cache) for r in rows])
        return [pick(logits, rows)[0] for _ in range(1)] + [pick(logits, rows)[1]]

    draws = {tuple(tokens(seed)) for seed in range(12)}
    assert len({d[0] for d in draws}) > 1  # the sampled row varies with its seed
    assert len({d[1] for d in draws}) == 1  # the greedy row does not
    assert tokens(3) == tokens(3)


def test_a_batch_mixing_window_int8_and_plain_rows_decodes_as_single_runs():
    model = _model(n_kv_head=2)
    specs = [CacheSpec(), CacheSpec(window=5, sinks=1), CacheSpec("int8", "int8"), CacheSpec()]
    rows = [_row(model, p, 9, s) for p, s in zip(PROMPTS, specs, strict=True)]
    logits = torch.stack([prefill_chunk(model, r.pending, r.cache) for r in rows])
    got: list[list[int]] = [[] for _ in rows]
    for step in range(9):
        for out, row, token in zip(got, rows, pick(logits, rows), strict=True):
            out.append(token)
            row.ids.append(token)
        if step < 8:
            logits = batched_step(model, [r.ids[-1] for r in rows], [r.cache for r in rows])
    assert got == [_single(model, p, 9, s) for p, s in zip(PROMPTS, specs, strict=True)]


def test_by_row_steps_give_the_batched_steps_logits():
    model = _model(n_kv_head=2)
    rows = [[_row(model, p, 4, CacheSpec()) for p in PROMPTS] for _ in range(2)]
    for group in rows:
        for row in group:
            prefill_chunk(model, row.pending, row.cache)
    batched = batched_step(model, [3, 4, 5, 6], [r.cache for r in rows[0]])
    by_row = batched_step(model, [3, 4, 5, 6], [r.cache for r in rows[1]], by_row=True)
    torch.testing.assert_close(by_row, batched, rtol=1e-4, atol=1e-4)
    assert [r.cache.pos for r in rows[1]] == [len(p) + 1 for p in PROMPTS]
