"""The continuous-batching scheduler: admission under a batch size and a KV budget, a bounded queue,
cancellation freeing a cache, stops, and every request's output equal to its single run in every mode."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from gen_cli.cache.spec import CacheSpec
from gen_cli.errors import UsageError
from gen_cli.infer.generate import generate, new_cache
from gen_cli.infer.options import SamplingConfig
from gen_cli.infer.scheduler import QueueFull, Request, Scheduler
from gen_cli.model.transformer import random_model

GREEDY = SamplingConfig(temperature=0.0)
PROMPTS = [[5, 9, 2], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42, 17, 3, 99, 5], [8, 8]]


@pytest.fixture(scope="module")
def model():
    model = random_model(tiny_config(context_length=48, n_kv_head=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def _single(model, prompt, n, spec=CacheSpec(), sampling=GREEDY, seed=None):
    ids = torch.tensor([prompt])
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return [int(t[0]) for t in generate(model, ids, n, sampling, new_cache(model, ids, n, 1, spec), gen)]


@pytest.mark.parametrize("mode", ["continuous", "continuous+rows", "static", "single"])
def test_every_request_equals_its_single_run_in_every_mode(model, mode):
    base, by_row = mode.removesuffix("+rows"), mode.endswith("+rows")
    sched = Scheduler(model, max_batch=3, prefill_chunk=4, mode=base, static_wait_s=0, by_row=by_row)
    lengths = [6, 3, 9, 1, 5]
    requests = [sched.submit(Request(p, n)) for p, n in zip(PROMPTS, lengths, strict=True)]
    sched.run_until_idle()
    for request, prompt, n in zip(requests, PROMPTS, lengths, strict=True):
        assert request.tokens == _single(model, prompt, n) and request.finish == "length"
        assert [e.token for e in request.events if e.finish is None] == request.tokens
    assert sched.reserved == 0 and sched.idle()


def test_requests_joining_mid_run_and_sampling_with_their_own_seed(model):
    sched = Scheduler(model, max_batch=4, prefill_chunk=3)
    hot = SamplingConfig(temperature=1.0, top_k=20)
    first = sched.submit(Request(PROMPTS[2], 8))
    for _ in range(4):
        sched.step()
    second = sched.submit(Request(PROMPTS[0], 6, hot, seed=11))
    third = sched.submit(Request(PROMPTS[3], 4, GREEDY))
    sched.run_until_idle()
    assert first.tokens == _single(model, PROMPTS[2], 8)
    assert second.tokens == _single(model, PROMPTS[0], 6, sampling=hot, seed=11)
    assert third.tokens == _single(model, PROMPTS[3], 4, sampling=GREEDY)


def test_int8_kv_requests_equal_their_single_runs(model):
    spec = CacheSpec("int8", "int8")
    sched = Scheduler(model, spec=spec, max_batch=4)
    requests = [sched.submit(Request(p, 5)) for p in PROMPTS]
    sched.run_until_idle()
    assert [r.tokens for r in requests] == [_single(model, p, 5, spec) for p in PROMPTS]


def test_admission_waits_for_the_batch_and_the_kv_budget(model):
    one = Scheduler(model).kv_bytes(Request(PROMPTS[0], 5))
    sched = Scheduler(model, max_batch=4, kv_budget=2 * one)
    requests = [sched.submit(Request(PROMPTS[0], 5)) for _ in range(3)]
    sched.step()
    assert sched.running == 2 and sched.waiting == 1 and sched.reserved == 2 * one
    sched.run_until_idle()
    assert all(r.finish == "length" for r in requests) and sched.reserved == 0
    with pytest.raises(UsageError, match="budget"):
        sched.submit(Request(PROMPTS[2], 30))  # alone beyond the budget: refused, not queued forever
    batch = Scheduler(model, max_batch=2)
    for _ in range(3):
        batch.submit(Request(PROMPTS[1], 4))
    batch.step()
    assert batch.running == 2 and batch.waiting == 1


def test_a_full_queue_refuses_and_lengths_past_the_context_are_refused(model):
    sched = Scheduler(model, max_queue=2)
    sched.submit(Request(PROMPTS[0], 2))
    sched.submit(Request(PROMPTS[0], 2))
    with pytest.raises(QueueFull, match="queue is full"):
        sched.submit(Request(PROMPTS[0], 2))
    with pytest.raises(UsageError, match="context length"):
        sched.submit(Request(PROMPTS[0], 47))
    with pytest.raises(UsageError, match="max_tokens"):
        sched.submit(Request(PROMPTS[0], 0))


def test_cancel_frees_the_cache_and_leaves_the_others_unchanged(model):
    sched = Scheduler(model, max_batch=4)
    keep = sched.submit(Request(PROMPTS[0], 8))
    drop = sched.submit(Request(PROMPTS[3], 8))
    waiting = Scheduler(model, max_batch=1)
    queued = [waiting.submit(Request(PROMPTS[1], 3)) for _ in range(2)]
    for _ in range(3):
        sched.step()
    held = sched.reserved
    sched.cancel(drop)
    sched.step()
    assert sched.running == 1 and sched.reserved == held - sched.kv_bytes(drop) and drop.finish == "cancelled"
    sched.run_until_idle()
    assert keep.tokens == _single(model, PROMPTS[0], 8) and len(drop.tokens) < 8
    waiting.cancel(queued[1])  # still queued: leaves the queue at once
    assert waiting.waiting == 1 and queued[1].finish == "cancelled"


def test_stop_ids_and_stop_strings_end_a_request(model, tokenizer):
    tok_model = random_model(tiny_config(vocab_size=tokenizer.get_vocab_size(), context_length=48))
    free = Scheduler(tok_model, tokenizer)
    base = free.submit(Request([5, 6], 12))
    free.run_until_idle()
    stop_id = base.tokens[3]
    sched = Scheduler(tok_model, tokenizer)
    by_id = sched.submit(Request([5, 6], 12, stop_ids=(stop_id,)))
    stop_text = base.text[len(base.text) // 2 :][:2]
    by_text = sched.submit(Request([5, 6], 12, stop=(stop_text,)))
    sched.run_until_idle()
    assert by_id.finish == "stop" and by_id.tokens == base.tokens[: base.tokens.index(stop_id) + 1]
    assert by_text.finish == "stop" and stop_text not in by_text.text
    assert base.text.startswith(by_text.text) and len(by_text.tokens) < 12


def test_the_closed_loop_bench_runs_every_request_in_every_mode(model):
    from gen_cli.lab.serve_bench import closed_loop, summary, workload

    jobs = workload(7, model.config.vocab_size, prompt=(2, 9), new=(2, 6))
    runs = {mode: [closed_loop(model, mode, 3, jobs)] for mode in ("continuous", "continuous+rows", "static", "single")}
    for done in runs.values():
        run = done[0]
        assert run.requests == 7 and run.tokens == sum(n for _, n in jobs) and len(run.ttft_ms) == 7
        assert len(run.itl_ms) == run.tokens - 7
    assert [row["mode"] for row in summary(runs)] == list(runs)


def test_a_run_that_timed_no_token_shows_a_dash_not_zeros():
    """A server that streams no text (random weights decoding to unused tokens) gives no first-token time: the
    row says so instead of printing 0 ms."""
    from gen_cli.commands.serve_bench import _p3
    from gen_cli.lab.serve_bench import ServeRun, summary

    timed = ServeRun("a", 2, 8, 1.0, ttft_ms=[30.0, 10.0], itl_ms=[1.0, 2.0, 3.0])
    rows = summary({"timed": [timed], "silent": [ServeRun("b", 2, 8, 1.0)]})
    assert _p3(rows[0], "ttft", ".0f") == "30 / 30 / 30" and _p3(rows[0], "itl", ".1f") == "2.0 / 3.0 / 3.0"
    assert _p3(rows[1], "ttft", ".0f") == "—" and rows[1]["ttft_p50"] is None and rows[1]["tokens_per_s"] == 8.0


def test_batch_rates_time_every_batch_size(model):
    from gen_cli.lab.batch_bench import batch_rates

    rates = batch_rates(model, [1, 3], steps=3, rounds=1, prompt=6)
    assert [r.batch for r in rates] == [1, 3] and all(r.low <= r.tokens_per_s <= r.high for r in rates)


def test_the_bench_asks_every_request_for_the_given_answer_length():
    """`gen bench serve -n N`: every request of the scheduler's modes asks for N tokens (fixed-length answers),
    instead of 8-64 at random."""
    from gen_cli.lab.serve_bench import compare_modes, workload

    model = random_model(tiny_config(context_length=128))  # room for the workload's prompts of up to 64 tokens

    runs = compare_modes(model, 2, 4, rounds=1, modes=("continuous", "single"), new=5)
    assert all(run.tokens == 4 * 5 and run.requests == 4 for done in runs.values() for run in done)
    ragged = compare_modes(model, 2, 4, rounds=1, modes=("continuous",))["continuous"][0]
    lengths = [n for _, n in workload(4, model.config.vocab_size, 0, new=(8, 128 // 4))]  # a quarter of the context
    assert ragged.requests == 4 and ragged.tokens == sum(lengths) and len(set(lengths)) > 1


def test_cli_bench_serve_takes_the_kv_kind_of_the_requests_caches():
    """`gen bench serve --kv-dtype bf16`: the same requests hold half the KV bytes of fp32 caches."""
    import json

    from typer.testing import CliRunner

    from gen_cli.cli import app

    def peak(*extra: str) -> int:
        argv = [
            "bench",
            "serve",
            "--preset",
            "tiny",
            "--clients",
            "2",
            "--requests",
            "3",
            "--rounds",
            "1",
            "--modes",
            "continuous",
            "--json",
        ]
        done = CliRunner().invoke(app, [*argv, *extra])
        assert done.exit_code == 0, done.output
        return json.loads(done.stdout)["modes"][0]["kv_peak"]

    assert peak() == 2 * peak("--kv-dtype", "bf16") > 0
    bad = CliRunner().invoke(app, ["bench", "serve", "--preset", "tiny", "--kv-dtype", "int5"])
    assert bad.exit_code != 0 and "unknown KV cache kind 'int5'" in bad.output
