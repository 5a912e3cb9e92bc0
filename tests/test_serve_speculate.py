"""Prompt lookup inside continuous batching: each decoding request's guesses verified as rows of its own
cache in the step's one C call. Greedy requests give the ids they give alone, on linear, quantized and paged
caches, joining and leaving; stop ids inside kept guesses end the request there; the guesses and the rows they
take are bounded."""

from __future__ import annotations

import os
import shlex
import shutil

import pytest
import torch
from conftest import tiny_config

from gen_cli.cache.spec import CacheSpec
from gen_cli.errors import UsageError
from gen_cli.infer.generate import generate, new_cache
from gen_cli.infer.optimize import optimize_for_decode
from gen_cli.infer.options import SamplingConfig
from gen_cli.infer.scheduler import SPECULATE_ROWS, Request, Scheduler
from gen_cli.model.transformer import Transformer
from gen_cli.native import build

pytestmark = pytest.mark.skipif(
    shutil.which(shlex.split(os.environ.get("CC", "cc"))[0]) is None, reason="no C compiler on this machine"
)
GREEDY = SamplingConfig(temperature=0.0)
# Prompts that repeat themselves, as a text to rewrite does: prompt lookup finds continuations in them.
PROMPTS = [[5, 9, 2, 5, 9, 2, 5], [7, 7, 7], [1, 2, 3, 4, 5, 6, 1, 2, 3, 4], [42, 17, 3, 42, 17], [8, 30, 8, 30]]
LENGTHS = [24, 9, 30, 17, 20]


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(3)
    model = Transformer(tiny_config(d_model=64, n_head=4, n_kv_head=2, context_length=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)  # sharp logits: greedy runs fall into loops, which prompt lookup guesses
    model = optimize_for_decode(model)
    assert model.native_decoder is not None, build.native_status()
    return model


def _single(model, prompt, n, spec=CacheSpec()):
    ids = torch.tensor([prompt])
    return [int(t[0]) for t in generate(model, ids, n, GREEDY, new_cache(model, ids, n, 1, spec))]


@pytest.mark.parametrize(
    ("spec", "paged", "max_batch"),
    [
        (CacheSpec(), {}, 1),
        (CacheSpec(), {}, 3),
        (CacheSpec("int8", "int8"), {}, 2),
        (CacheSpec(), {"kv_blocks": 60, "block_tokens": 5}, 2),
    ],
    ids=["fp32-one", "fp32-three", "int8", "paged"],
)
def test_speculating_requests_give_their_single_runs_ids(model, spec, paged, max_batch):
    sched = Scheduler(model, spec=spec, max_batch=max_batch, prefill_chunk=4, speculate=4, **paged)
    first = [sched.submit(Request(p, n)) for p, n in zip(PROMPTS[:3], LENGTHS[:3], strict=True)]
    for _ in range(5):
        sched.step()
    later = [sched.submit(Request(p, n)) for p, n in zip(PROMPTS[3:], LENGTHS[3:], strict=True)]  # join mid-run
    sched.run_until_idle()
    for request, prompt, n in zip(first + later, PROMPTS, LENGTHS, strict=True):
        assert request.tokens == _single(model, prompt, n, spec) and request.finish == "length"
        assert [e.token for e in request.events if e.finish is None] == request.tokens  # one event a token
    assert sched.accepted > 0 and sched.proposed >= sched.accepted  # guesses were made, and some kept
    assert sched.reserved == 0 and sched.idle() and (sched.pool is None or sched.pool.bytes_in_use == 0)


def test_a_stop_id_inside_kept_guesses_ends_the_request_there(model):
    plain = Scheduler(model)
    base = plain.submit(Request(PROMPTS[2], 30))
    plain.run_until_idle()
    sched = Scheduler(model, speculate=6)
    stop_id = base.tokens[12]
    stopped = sched.submit(Request(PROMPTS[2], 30, stop_ids=(stop_id,)))
    sched.run_until_idle()
    assert stopped.finish == "stop" and stopped.tokens == base.tokens[: base.tokens.index(stop_id) + 1]
    assert sched.accepted > 0


def test_guesses_stay_within_the_rows_and_max_tokens(model, monkeypatch):
    widths: list[int] = []
    native = model.native_decoder
    rows = native.rows

    def counted(tokens, caches, **kw):
        widths.append(len(tokens))
        return rows(tokens, caches, **kw)

    monkeypatch.setattr(native, "rows", counted)
    sched = Scheduler(model, max_batch=2, speculate=16)
    requests = [sched.submit(Request(p, n)) for p, n in ((PROMPTS[0], 24), (PROMPTS[1], 3))]
    while requests[1].finish is None:  # both prompts prefilled (no chunk rows after), both decoding
        sched.step()
    sched.run_until_idle()
    assert requests[0].tokens == _single(model, PROMPTS[0], 24) and len(requests[1].tokens) == 3
    decode_only = widths[2:]  # the first steps fed the prompts too
    assert decode_only and max(decode_only) <= SPECULATE_ROWS
    assert any(w > 2 for w in decode_only)  # one request alone guesses up to SPECULATE_ROWS - 1


def test_sampled_requests_speculate_and_keep_their_length(model):
    sched = Scheduler(model, speculate=4)
    hot = SamplingConfig(temperature=0.7)
    requests = [sched.submit(Request(p, 20, hot, seed=i)) for i, p in enumerate(PROMPTS[:2])]
    sched.run_until_idle()
    assert all(len(r.tokens) == 20 and r.finish == "length" for r in requests)
    assert sched.proposed > 0  # the target's distribution under rejection sampling: tests/test_speculative.py


def test_speculation_is_refused_where_it_cannot_roll_back_or_is_too_wide(model):
    with pytest.raises(UsageError, match="window"):
        Scheduler(model, spec=CacheSpec(window=16), speculate=4)
    with pytest.raises(UsageError, match="0 to 16 guesses"):
        Scheduler(model, speculate=17)


def test_the_server_speculating_answers_as_without(tmp_path):
    """Over HTTP, on the shipped trained model with gen's C step: a greedy completion whose prompt repeats a
    passage gives the same text with prompt lookup on, and its guesses were made."""
    openai = pytest.importorskip("openai")
    from gen_cli.infer.engine import open_model
    from gen_cli.infer.options import EngineOptions
    from gen_cli.lab.speculative_bench import DEFAULT_PROMPT
    from gen_cli.resources import default_model_dir
    from gen_cli.serve.server import BackgroundServer, ServeOptions, served

    engine = open_model(default_model_dir(), EngineOptions(device="cpu", threads=1))
    assert engine.model.native_decoder is not None
    texts, schedulers = [], []
    for guesses in (0, 4):
        app = served(engine, "shipped", ServeOptions(max_batch=2, speculate=guesses))
        with BackgroundServer(app) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
            done = client.completions.create(model="shipped", prompt=DEFAULT_PROMPT, max_tokens=40, temperature=0)
            texts.append(done.choices[0].text)
            schedulers.append(app.worker.scheduler)
    assert texts[1] == texts[0] and len(texts[0]) > 20
    assert schedulers[0].proposed == 0 and schedulers[1].accepted > 0


def test_bench_serve_adds_a_speculating_row_per_mode():
    import json

    from typer.testing import CliRunner

    from gen_cli.cli import app

    args = ["bench", "serve", "--preset", "tiny", "--requests", "2", "--rounds", "1", "--clients", "1", "-n", "8"]
    modes = ["--modes", "continuous,continuous+rows"]
    result = CliRunner().invoke(app, [*args, *modes, "--prompt-lookup", "2", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["mode"]: r for r in json.loads(result.stdout)["modes"]}
    assert set(rows) == {"continuous", "continuous+lookup", "continuous+rows"}  # +rows has no C rows call to verify in
    assert rows["continuous"]["guesses"] == 0 and rows["continuous"]["kept"] is None
    assert rows["continuous+lookup"]["guesses"] > 0 and 0 <= rows["continuous+lookup"]["kept"] <= 1
    assert rows["continuous"]["prompt_tokens"] == rows["continuous+lookup"]["prompt_tokens"] > 2 * 40  # the passage
    for bad in ("17", "-1"):
        refused = CliRunner().invoke(app, [*args, "--prompt-lookup", bad])
        assert refused.exit_code == 2 and "--prompt-lookup" in refused.output
    refused = CliRunner().invoke(app, [*args, "--prompt-lookup", "2", "--turns", "2"])
    assert refused.exit_code == 2 and "not with --shared-prefix or --turns" in refused.stderr
