"""The paged KV cache: sequences in one pool of blocks give the tokens of the contiguous cache and of each
sequence alone (every KV kind, ragged lengths, sequences joining and leaving, block sizes 1, 5 and 16), share
their cached prompt prefix's full blocks (stored once), and give their blocks back when they end."""

from __future__ import annotations

import itertools
import json
import os
import platform
import shlex
import shutil

import pytest
import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from gen_cli.cache.linear import KVCache
from gen_cli.cache.paged import BlockPool, PoolExhausted, blocks_for, prefix_hashes
from gen_cli.errors import GenError, UsageError
from gen_cli.infer.batch import batched_step, native_rows, prefill_chunk
from gen_cli.infer.generate import greedy_steps, new_cache
from gen_cli.infer.optimize import optimize_for_decode
from gen_cli.model.transformer import Transformer
from gen_cli.native import build

needs_cc = pytest.mark.skipif(
    shutil.which(shlex.split(os.environ.get("CC", "cc"))[0]) is None, reason="no C compiler on this machine"
)
KINDS = [("fp32", "fp32"), ("int8", "int8"), ("int4", "int4"), ("int8", "int4"), ("fp32", "int8")]
TOL, TOL_QUANT = 2e-5, 2e-4  # as test_native_ragged: C and PyTorch sum in different orders


def _model(native: bool = True, n_kv_head: int = 2, dtype: torch.dtype = torch.float32, **changes) -> Transformer:
    config = tiny_config(**{"d_model": 128, "n_head": 4, "n_kv_head": n_kv_head, "context_length": 96, **changes})
    torch.manual_seed(0)
    model = optimize_for_decode(Transformer(config).eval().to(dtype), "none", native=native)
    assert not native or model.native_decoder is not None, build.native_status()
    return model


def _pool(model: Transformer, kinds=("fp32", "fp32"), blocks: int = 64, block_tokens: int = 16) -> BlockPool:
    dtype = model.norm.weight.dtype
    return BlockPool(model.config, blocks, block_tokens, dtype, k_kind=kinds[0], v_kind=kinds[1])


def _single(model: Transformer, prompt: list[int], n: int, kinds) -> list[int]:
    """The oracle: one sequence alone in a contiguous cache, greedy."""
    from gen_cli.cache.spec import CacheSpec

    ids = torch.tensor([prompt])  # (1, T)
    cache = new_cache(model, ids, n, 1, CacheSpec(*kinds))
    return [int(t[0]) for _, t in greedy_steps(model, ids, n, cache)]


def _ragged(model: Transformer, pool: BlockPool, kinds, expect_native: bool) -> None:
    """Sequences of different prompt lengths join at different steps and leave when done, one batched step
    over their paged caches per step; each gets its single-sequence greedy tokens, and the pool is empty after."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (5, 17, 2, 30, 9)]
    wanted, joins = [11, 4, 20, 7, 13], [0, 0, 3, 5, 9]
    want = [_single(model, p, n, kinds) for p, n in zip(prompts, wanted, strict=True)]
    running, calls = {}, 0
    for step in range(60):
        for i, at in enumerate(joins):
            if at == step:
                seq = pool.sequence(len(prompts[i]) + wanted[i])
                running[i] = (seq, [int(prefill_chunk(model, prompts[i], seq).argmax())])
        for i in [i for i in running if len(running[i][1]) == wanted[i]]:
            seq, got = running.pop(i)
            assert got == want[i], i
            seq.free()
        if not running:
            if step > max(joins):
                break
            continue
        live = sorted(running)
        seqs = [running[i][0] for i in live]
        if expect_native and len(live) > 1:
            assert native_rows(model, seqs) is not None
            calls += 1
        logits = batched_step(model, [running[i][1][-1] for i in live], seqs)  # (B, V)
        for i, token in zip(live, logits.argmax(-1).tolist(), strict=True):
            running[i][1].append(token)
    assert not running and (calls > 10 or not expect_native)
    assert pool.blocks_in_use == 0 and pool.available == pool.n_blocks


@needs_cc
@pytest.mark.parametrize("kinds", KINDS, ids="/".join)
@pytest.mark.parametrize("block_tokens", [1, 5, 16])
def test_paged_native_batch_equals_each_sequence_alone(kinds, block_tokens):
    model = _model()
    _ragged(model, _pool(model, kinds, blocks=400 // block_tokens + 8, block_tokens=block_tokens), kinds, True)


@needs_cc
def test_paged_native_batch_of_a_bf16_model():
    """A bf16 model (bf16 weights and K/V): paged rows equal each sequence alone too."""
    model = _model(dtype=torch.bfloat16)
    _ragged(model, _pool(model, ("bf16", "bf16"), blocks=100, block_tokens=5), ("bf16", "bf16"), True)


@pytest.mark.parametrize("kinds", [("fp32", "fp32"), ("int8", "int4")], ids="/".join)
def test_paged_pytorch_batch_equals_each_sequence_alone(kinds):
    """Without the C step the paged cache serves PyTorch's forward through the same interface."""
    model = _model(native=False)
    _ragged(model, _pool(model, kinds, block_tokens=5), kinds, False)


@needs_cc
@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("block_tokens", [1, 7, 16])
def test_paged_rows_equal_contiguous_rows_and_no_cache(n_kv_head, block_tokens):
    """Rows of three paged sequences (one with 3 consecutive rows) in one call: the logits of the same rows
    over contiguous caches, and of the no-cache forward; past 256 positions attention splits into chunks."""
    model = _model(n_kv_head=n_kv_head, context_length=400)
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (300, 8, 33)]
    pool = _pool(model, blocks=2 * blocks_for(400, block_tokens) + 16, block_tokens=block_tokens)
    for _ in range(pool.n_blocks):
        pool.allocate()
    for block in range(0, pool.n_blocks, 2):  # every other block free: no sequence gets two blocks adjacent
        pool.release(block)
    paged = [pool.sequence(len(s) + 2) for s in seqs]
    linear = [KVCache(model.config, 1, len(s) + 2) for s in seqs]
    for s, p, c in zip(seqs, paged, linear, strict=True):
        prefill_chunk(model, s[:-1], p)
        prefill_chunk(model, s[:-1], c)
    extra = [5, 6]
    rows = [seqs[0][-1], *extra, seqs[1][-1], seqs[2][-1]]
    native = model.native_decoder
    with torch.inference_mode():
        got = native.rows(rows, [paged[0]] * 3 + paged[1:])  # (5, V)
        want = native.rows(rows, [linear[0]] * 3 + linear[1:])
        oracle = torch.cat(
            [model(torch.tensor([seqs[0] + extra]))[0, -3:]] + [model(torch.tensor([s]))[0, -1:] for s in seqs[1:]]
        )
    assert [p.pos for p in paged] == [c.pos for c in linear] == [302, 8, 33]
    assert all(b - a != 1 for p in paged for a, b in itertools.pairwise(p.table))
    assert (got - want).abs().max() <= TOL * want.abs().max()
    assert (got - oracle).abs().max() <= TOL * oracle.abs().max()


def _scattered_rows(model: Transformer, kinds, block_tokens: int, lengths) -> tuple[torch.Tensor, torch.Tensor]:
    """The next row's logits of sequences of `lengths` over paged caches whose blocks are never adjacent in the
    pool, and over contiguous caches of the same kinds: (len(lengths), V) each."""
    gen = torch.Generator().manual_seed(11)
    seqs = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in lengths]
    blocks = 2 * sum(blocks_for(n + 1, block_tokens) for n in lengths) + 8
    pool = _pool(model, kinds, blocks=blocks, block_tokens=block_tokens)
    for _ in range(pool.n_blocks):
        pool.allocate()
    for block in range(0, pool.n_blocks, 2):  # every other block free: each block of a sequence a piece of its own
        pool.release(block)
    paged = [pool.sequence(len(s) + 1) for s in seqs]
    linear = [KVCache(model.config, 1, len(s) + 1, k_kind=kinds[0], v_kind=kinds[1]) for s in seqs]
    for s, p, c in zip(seqs, paged, linear, strict=True):
        prefill_chunk(model, s[:-1], p)
        prefill_chunk(model, s[:-1], c)
    assert all(b - a != 1 for p in paged for a, b in itertools.pairwise(p.table))
    rows = [s[-1] for s in seqs]
    with torch.inference_mode():
        return model.native_decoder.rows(rows, paged), model.native_decoder.rows(rows, linear)


@needs_cc
@pytest.mark.parametrize("kinds", [*KINDS, ("int4", "fp32")], ids="/".join)
@pytest.mark.parametrize("block_tokens", [5, 16])
def test_long_scattered_chunks_equal_contiguous_rows(kinds, block_tokens):
    """head_dim 64, three query heads on one KV head (the vector path's specialised copies): 650 positions in
    scattered blocks split into several chunks across threads, each chunk read block by block, equal the
    contiguous cache's rows (and, fp32, the no-cache forward)."""
    model = _model(n_kv_head=1, d_model=192, n_head=3, context_length=700)
    lengths = (650, 40, 17)
    got, want = _scattered_rows(model, kinds, block_tokens, lengths)
    tol = TOL if kinds == ("fp32", "fp32") else TOL_QUANT
    assert (got - want).abs().max() <= tol * want.abs().max(), (got - want).abs().max()
    if kinds == ("fp32", "fp32"):
        gen = torch.Generator().manual_seed(11)  # _scattered_rows' sequences again
        seqs = [torch.randint(0, 300, (n,), generator=gen) for n in lengths]
        with torch.inference_mode():
            oracle = torch.cat([model(s[None])[0, -1:] for s in seqs])  # (3, V)
        assert (got - oracle).abs().max() <= TOL * oracle.abs().max()


@needs_cc
@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for another x86-64 target")
def test_portable_loops_read_scattered_blocks_as_contiguous_ones(monkeypatch, kernel_builds):
    """Without AVX-512 (the plain C loops), scattered 5-token blocks over several chunks give the contiguous
    cache's rows for every kind."""
    monkeypatch.setenv("GEN_HOME", str(kernel_builds))  # each -march builds once per session
    monkeypatch.setattr(build, "FLAGS", tuple("-march=x86-64-v2" if f == "-march=native" else f for f in build.FLAGS))
    build.library.cache_clear()
    try:
        model = _model(n_kv_head=1, d_model=192, n_head=3, context_length=700)
        for kinds in KINDS:
            got, want = _scattered_rows(model, kinds, 5, (650, 40, 17))
            tol = TOL if kinds == ("fp32", "fp32") else TOL_QUANT
            assert (got - want).abs().max() <= tol * want.abs().max(), (kinds, (got - want).abs().max())
    finally:
        build.library.cache_clear()


@needs_cc
def test_single_sequence_generation_on_a_paged_cache():
    """The plain decode loop over one paged sequence runs the C step (one row) and gives the same tokens."""
    model = _model()
    prompt = list(range(3, 40))
    pool = _pool(model, block_tokens=16)
    seq = pool.sequence(len(prompt) + 12)
    assert model.native_decoder.accepts(1, seq)
    got = [int(t[0]) for _, t in greedy_steps(model, torch.tensor([prompt]), 12, seq)]
    assert got == _single(model, prompt, 12, ("fp32", "fp32"))


@needs_cc
@pytest.mark.parametrize("kinds", [("fp32", "fp32"), ("int4", "int8")], ids="/".join)
def test_shared_prefix_is_stored_once_and_gives_the_same_tokens(kinds):
    """A second sequence with the same 40-token system prompt takes its 2 full 16-token blocks from the first
    (refcount 2) and prefills only the rest; both get their tokens alone; the pool counts the shared blocks once."""
    model = _model()
    system = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    prompts = [[*system, 7, 8, 9], [*system, 11, 12]]
    pool = _pool(model, kinds)
    first = pool.admit(prompts[0], len(prompts[0]) + 10)
    logits = [prefill_chunk(model, prompts[0], first)]
    first.commit(prompts[0])
    second = pool.admit(prompts[1], len(prompts[1]) + 10)
    assert second.pos == second.shared_tokens == 32 and second.table[:2] == first.table[:2]
    assert [pool.refs[b] for b in first.table[:2]] == [2, 2]
    logits.append(prefill_chunk(model, prompts[1][32:], second))
    assert pool.blocks_in_use == len(first.table) + len(second.table) - 2
    # Within one block per sequence of the analytic minimum: the distinct tokens, the prefix counted once.
    distinct = len(prompts[0]) + len(prompts[1]) - 32
    assert pool.analytic_bytes(distinct) <= pool.bytes_in_use <= pool.analytic_bytes(distinct) + 2 * pool.block_bytes
    for i, seq in enumerate((first, second)):
        got = [int(logits[i].argmax())]
        for _ in range(9):
            got.append(int(batched_step(model, [got[-1]], [seq]).argmax()))
        assert got == _single(model, prompts[i], 10, kinds), i
    first.free()
    assert [pool.refs[b] for b in second.table[:2]] == [1, 1]
    second.free()
    assert pool.blocks_in_use == 0 and pool.cached == 2  # the prefix stays findable until its blocks are reused
    third = pool.admit(prompts[1], len(prompts[1]) + 1)
    assert third.shared_tokens == 32 and pool.prefix_hits == 4


def test_copy_on_write_after_truncate_into_a_shared_block():
    """Rolling a sequence back into a block another one shares and writing there copies the block first:
    the other sequence's K/V are untouched."""
    model = _model(native=False)
    pool = _pool(model, block_tokens=4)
    ids = list(range(10, 23))
    a = pool.admit(ids, 20)
    prefill_chunk(model, ids, a)
    a.commit(ids)
    b = pool.admit(ids, 20)
    assert b.shared_tokens == 12
    before = [x.clone() for side in pool.k_sides for x in side.tensors]
    b.truncate(6)  # inside block 1, which a holds too
    prefill_chunk(model, [1, 2, 3], b)
    assert b.table[1] != a.table[1] and pool.refs[a.table[1]] == 1
    held = torch.tensor([b * 4 + i for b in a.table[:3] for i in range(4)])  # a's pool slots
    for x, y in zip(before, [x for side in pool.k_sides for x in side.tensors], strict=True):
        assert torch.equal(x[:, :, held], y[:, :, held])
    want = model(torch.tensor([[*ids[:6], 1, 2, 3]]))[0, -1]
    b.truncate(6)
    got = prefill_chunk(model, [1, 2, 3], b)
    assert (got - want).abs().max() <= TOL * want.abs().max()


def test_pool_refuses_and_admits():
    model = _model(native=False)
    pool = _pool(model, blocks=4, block_tokens=4)
    with pytest.raises(UsageError, match="more than the pool"):
        pool.admit([1, 2], 17)
    a = pool.admit([1, 2], 12)  # 3 blocks promised
    assert pool.available == 1 and pool.admit([1, 2], 8) is None
    a.free()
    assert pool.available == 4
    seq = pool.sequence(4)
    seq.reserve(4)
    with pytest.raises(PoolExhausted):
        for _ in range(4):
            pool.allocate()


def test_prefix_hashes_cover_every_token_before():
    assert prefix_hashes([1, 2, 3], 2) == prefix_hashes([1, 2, 9], 2)
    assert prefix_hashes([1, 2, 3, 4], 2)[1] != prefix_hashes([0, 2, 3, 4], 2)[1]  # same block, other prefix


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["join", "share", "grow", "leave", "truncate"]), st.integers(0, 50)), max_size=40
    )
)
def test_refcounts_never_go_negative(ops):
    """Random joins (some sharing a prefix), growth, truncation and leaves: refcounts stay ≥ 0 and equal the
    number of tables holding each block, promises never exceed the free blocks, and all is free at the end."""
    config = tiny_config(n_kv_head=2)
    pool = BlockPool(config, 24, 4)
    live = []
    base = list(range(100, 120))
    for op, n in ops:
        if op in ("join", "share"):
            ids = (base[: 4 + n % 12] if op == "share" else [n] * (1 + n % 9)) + [n]
            seq = pool.admit(ids, len(ids) + n % 7)
            if seq is not None:
                seq.reserve(len(ids) - seq.pos)
                seq.advance(len(ids) - seq.pos)
                seq.commit(ids)
                live.append(seq)
        elif live and op == "grow":
            seq = live[n % len(live)]
            t = min(n % 3 + 1, seq.max_tokens - seq.pos)
            try:
                seq.reserve(t)
            except PoolExhausted:  # a copy on write after a truncate into a shared block takes a block unpromised
                continue
            seq.advance(t)
        elif live and op == "truncate":
            seq = live[n % len(live)]
            seq.truncate(seq.pos // 2)
        elif live:
            live.pop(n % len(live)).free()
        held = [0] * pool.n_blocks
        for seq in live:
            for b in seq.table:
                held[b] += 1
        assert held == pool.refs and min(pool.refs) >= 0
        assert pool._promised >= 0
    for seq in live:
        seq.free()
    assert pool.blocks_in_use == 0 and pool.available == pool.n_blocks


# ---- the scheduler over a paged pool --------------------------------------------------------------------

PROMPTS = [[5, 9, 2], [7], list(range(1, 30)), [42, 17, 3, 99, 5], [8, 8]]


@needs_cc
@pytest.mark.parametrize("mode", ["continuous", "continuous+rows", "single"])
def test_scheduler_on_a_pool_equals_each_single_run(mode):
    """Requests on paged sequences (block size 5) give their single-run greedy tokens; the pool is empty after."""
    from gen_cli.infer.scheduler import Request, Scheduler

    model = _model()
    base, by_row = mode.removesuffix("+rows"), mode.endswith("+rows")
    sched = Scheduler(model, max_batch=3, prefill_chunk=8, mode=base, by_row=by_row, kv_blocks=40, block_tokens=5)
    lengths = [6, 3, 9, 1, 5]
    requests = [sched.submit(Request(p, n)) for p, n in zip(PROMPTS, lengths, strict=True)]
    sched.run_until_idle()
    for request, prompt, n in zip(requests, PROMPTS, lengths, strict=True):
        assert request.tokens == _single(model, prompt, n, ("fp32", "fp32")) and request.finish == "length"
    assert sched.pool.blocks_in_use == 0 and sched.pool.available == 40 and sched.kv_in_use == 0


def test_admission_waits_for_blocks_and_resumes():
    """A pool of 6 blocks of 4 tokens takes two 12-token requests at once: the others wait in the queue and
    start as blocks come back; a cancelled request gives its blocks back before the next step."""
    from gen_cli.infer.scheduler import Request, Scheduler

    model = _model(native=False)
    sched = Scheduler(model, max_batch=8, kv_blocks=6, block_tokens=4)
    with pytest.raises(UsageError, match="KV blocks"):
        sched.submit(Request([1] * 20, 8))
    with pytest.raises(GenError, match="paged KV cache of 1,000,000,000,000 blocks"):
        Scheduler(model, kv_blocks=10**12)  # refused before anything is allocated
    requests = [sched.submit(Request([i + 1, i + 2, i + 3, i + 4], 8)) for i in range(5)]
    most = 0
    sched.step()
    assert sched.running == 2 and sched.waiting == 3 and sched.pool.available == 0
    sched.cancel(requests[0])
    sched.step()  # the cancelled one leaves first, and its blocks admit the next
    assert requests[0].finish == "cancelled" and sched.running == 2 and sched.waiting == 2
    while not sched.idle():
        sched.step()
        most = max(most, sched.running)
        assert sched.pool.blocks_in_use <= 6
    assert most == 2 and all(r.finish == "length" for r in requests[1:])
    assert [r.tokens for r in requests[1:]] == [_single(model, r.ids, 8, ("fp32", "fp32")) for r in requests[1:]]
    assert sched.pool.blocks_in_use == 0 and sched.pool.available == 6


@needs_cc
def test_shared_system_prompt_skips_prefill_and_is_stored_once():
    """Requests with one 40-token system prompt: the later ones take its 2 full 16-token blocks from the
    first (prefilling 8 + their own tokens, not 40+), hold them once, and answer as alone."""
    from gen_cli.infer.scheduler import Request, Scheduler

    model = _model()
    system = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    sched = Scheduler(model, max_batch=4, kv_blocks=32, block_tokens=16)
    first = sched.submit(Request([*system, 1, 2], 6))
    sched.step()  # the first prompt prefilled and indexed
    rest = [sched.submit(Request([*system, 3 + i], 6)) for i in range(3)]
    sched.step()
    assert sched.pool.prefix_hits == 6  # 2 blocks for each of 3 requests
    # 4 sequences of 42-47 tokens: 2 shared blocks once + one block of its own each (tokens 32..47)
    assert sched.pool.blocks_in_use == 2 + 4
    sched.run_until_idle()
    for r in (first, *rest):
        assert r.tokens == _single(model, r.ids, 6, ("fp32", "fp32"))
    assert sched.pool.blocks_in_use == 0


# ---- serving ------------------------------------------------------------------------------------------


def test_server_on_a_paged_pool_answers_as_without_one():
    """`gen serve --kv-blocks`: concurrent HTTP completions over one pool equal the same server's answers
    without paging; a request that cannot fit the pool is a 400 with the OpenAI error JSON."""
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from gen_cli.infer.engine import open_model
    from gen_cli.infer.options import EngineOptions, Preset
    from gen_cli.serve.server import BackgroundServer, ServeOptions, served

    engine = open_model(Preset("tiny"), EngineOptions(device="cpu"))

    def post(url: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    prompts = ["The cat sat on the mat and", "The cat sat on the mat but", "A dog", "The cat sat"]
    answers = []
    for options in (ServeOptions(max_batch=4), ServeOptions(max_batch=4, kv_blocks=12, block_tokens=4)):
        with BackgroundServer(served(engine, "tiny", options)) as srv:
            body = {"model": "tiny", "max_tokens": 8, "temperature": 0}
            url = srv.url + "/v1/completions"
            with ThreadPoolExecutor(4) as pool:
                done = list(pool.map(post, [url] * 4, [{**body, "prompt": p} for p in prompts]))
            assert all(code == 200 for code, _ in done), done
            answers.append([data["choices"][0]["text"] for _, data in done])
            if options.kv_blocks:
                code, data = post(srv.url + "/v1/completions", {**body, "prompt": "word " * 30, "max_tokens": 30})
                assert code == 400 and "KV blocks" in data["error"]["message"]
                assert srv.served.worker.scheduler.pool.blocks_in_use == 0
    assert answers[0] == answers[1]


def test_server_reports_the_cached_tokens_of_a_next_turn():
    """Over HTTP, turn 2 (turn 1's prompt + its answer + a question) is served from the blocks turn 1's prompt
    and answer filled: `usage.prompt_tokens_details.cached_tokens` (OpenAI's field) counts them, beyond the
    prompt's own 2 blocks, and /health shows the pool (nothing held, turn 1's blocks cached)."""
    import urllib.request

    from gen_cli.infer.engine import open_model
    from gen_cli.infer.options import EngineOptions, Preset
    from gen_cli.serve.server import BackgroundServer, ServeOptions, served

    engine = open_model(Preset("tiny"), EngineOptions(device="cpu"))

    def post(url: str, body: dict) -> dict:
        request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            return json.loads(r.read())

    prompt = "The cat sat on the mat and"
    with BackgroundServer(served(engine, "tiny", ServeOptions(kv_blocks=64, block_tokens=4))) as srv:
        body = {"model": "tiny", "max_tokens": 24, "temperature": 0}
        one = post(srv.url + "/v1/completions", {**body, "prompt": prompt})
        assert one["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        second = prompt + one["choices"][0]["text"] + " Then?"
        two = post(srv.url + "/v1/completions", {**body, "prompt": second})
        with urllib.request.urlopen(srv.url + "/health", timeout=60) as r:
            kv = json.loads(r.read())["kv"]
    assert len(engine.encode(prompt)) == 9 and two["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
    assert kv["in_use"] == 0 and kv["prefix_hit_tokens"] == 32 and kv["cached"] >= 8  # 8 blocks shared, not 2
    # the most held: turn 2's blocks once its answer's K/V are in (all but its last token's)
    assert kv["peak_bytes_in_use"] == blocks_for(len(engine.encode(second)) + 23, 4) * kv["block_bytes"]


def test_cli_bench_serve_shared_prefix_json():
    from typer.testing import CliRunner

    from gen_cli.cli import app

    argv = "bench serve --preset tiny --shared-prefix 40 --clients 2 --requests 4 --rounds 1 --json"
    done = CliRunner().invoke(app, argv.split())
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    assert [r["mode"] for r in data["shared_prefix"]] == ["prefix cache on", "prefix cache off"]
    on, off = data["memory"]
    # 2 sequences of 40 + 16 tokens: the 2 full 16-token blocks of the prefix held once when shared
    assert off["blocks_in_use"] == 2 * 4 and on["blocks_in_use"] == 2 + 2 * 2
    assert on["analytic"] <= on["bytes_in_use"] <= on["analytic"] + 2 * on["block_bytes"]


def test_multi_turn_bench_counts_the_answers_blocks_as_cached():
    """One chat of 3 turns (8-token answers): turns 2 and 3 are served the full blocks of the last prompt and
    its answer (all of its tokens but the last answer token are in the cache); with the prefix cache off none."""
    from gen_cli.infer.scheduler import Request
    from gen_cli.lab.serve_bench import closed_loop, conversations

    model = _model()
    chat = conversations(model.config.vocab_size, 1, 1, 3, 8)
    prompts = [chat(0, None)[0]]  # the prompts this chat sends, answers standing in as zeros
    for _ in range(2):
        prompts.append(chat(0, Request(prompts[-1], 8, tokens=[0] * 8))[0])
    assert chat(0, Request(prompts[-1], 8)) is None
    want = sum(16 * ((len(p) + 7) // 16) for p in prompts[:2])
    runs = {}
    for share in (True, False):
        jobs = conversations(model.config.vocab_size, 1, 1, 3, 8)
        runs[share] = closed_loop(model, "continuous", 1, jobs, kv_blocks=20, prefix_cache=share)
    assert runs[True].requests == runs[False].requests == 3
    assert runs[True].prompt_tokens == runs[False].prompt_tokens == sum(len(p) for p in prompts)
    assert runs[True].cached_tokens == want > 16 * (len(prompts[0]) // 16) and runs[False].cached_tokens == 0


def test_cli_bench_serve_turns_json():
    from typer.testing import CliRunner

    from gen_cli.cli import app

    argv = "bench serve --preset tiny --turns 2 --clients 2 --requests 4 --rounds 1 -n 8 --json"
    done = CliRunner().invoke(app, argv.split())
    assert done.exit_code == 0, done.output
    on, off = json.loads(done.stdout)["turns"]
    assert (on["mode"], off["mode"]) == ("prefix cache on", "prefix cache off")
    assert on["prompt_tokens"] == off["prompt_tokens"] and on["cached_tokens"] > 0 == off["cached_tokens"]
    assert 0 < on["kv_analytic"] <= on["kv_peak"]
    done = CliRunner().invoke(app, [*argv.split(), "--shared-prefix", "8"])
    assert done.exit_code == 2 and "not both" in done.output


def test_sequences_growing_in_turn_keep_their_blocks_side_by_side():
    """Four sequences taking a block each in turn (as decode does) get runs of adjacent blocks, not every
    fourth block; a sequence starts in the middle of the longest vacant run when its start is held."""
    pool = _pool(_model(), blocks=64, block_tokens=2)
    seqs = [pool.sequence(24) for _ in range(4)]
    for _ in range(12):
        for s in seqs:
            s.reserve(2)
            s.advance(2)
    tables = [s.table for s in seqs]
    assert sorted(b for t in tables for b in t) == sorted(set(b for t in tables for b in t))  # no block twice
    assert all(b - a == 1 for t in tables for a, b in itertools.pairwise(t)), tables
    assert tables[0][0] == 0 and tables[1][0] == 32  # the second starts halfway into the run after the first


# ---- blocks that decode fills are shared too (a chat's next turn) --------------------------------------


def _turn(sched, ids: list[int], n: int):
    from gen_cli.infer.scheduler import Request

    request = sched.submit(Request(ids, n))
    sched.run_until_idle()
    assert request.finish == "length"
    return request


@needs_cc
@pytest.mark.parametrize("kinds", KINDS, ids="/".join)
@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
def test_a_next_turn_shares_the_blocks_the_answer_filled(kinds, native):
    """Turn 2's prompt is turn 1's prompt + its answer + 3 tokens: it takes every full block turn 1 held (5 of
    4 tokens: 2 of the prompt, 3 the answer filled; not the partly filled 6th) and answers as on a fresh pool."""
    from gen_cli.cache.spec import CacheSpec
    from gen_cli.infer.scheduler import Scheduler

    model = _model(native=native)
    first = torch.randint(0, 300, (10,), generator=torch.Generator().manual_seed(5)).tolist()
    sched = Scheduler(model, spec=CacheSpec(*kinds), kv_blocks=30, block_tokens=4)
    one = _turn(sched, first, 14)  # its cache holds 10 + 13 tokens: 5 full blocks and 3 tokens of a 6th
    assert sched.pool.blocks_in_use == 0 and sched.pool.cached == 5
    second = [*first, *one.tokens, 7, 8, 9]
    two = _turn(sched, second, 6)
    assert two.cached_tokens == 20 and sched.pool.prefix_hits == 5
    fresh = _turn(Scheduler(model, spec=CacheSpec(*kinds), kv_blocks=30, block_tokens=4), second, 6)
    assert fresh.cached_tokens == 0 and two.tokens == fresh.tokens
    if native and kinds == ("fp32", "fp32"):
        assert two.tokens == _single(model, second, 6, kinds)


def test_partly_filled_blocks_are_never_indexed():
    """Decode indexes a block only once all of it is written: a sequence 1 token short of a block boundary
    leaves that block out of the index, and one more token puts it in."""
    model = _model(native=False)
    pool = _pool(model, block_tokens=4)
    ids = list(range(20, 27))  # 7 tokens: block 0 full, block 1 has 3
    seq = pool.admit(ids, 12)
    prefill_chunk(model, ids, seq)
    seq.commit([*ids, 99])  # a picked token not yet fed back: its slot is empty, its block not indexed
    assert len(pool._by_hash) == 1 and seq.hashes == prefix_hashes(ids, 4)
    batched_step(model, [99], [seq])
    seq.commit([*ids, 99, 98])
    assert len(pool._by_hash) == 2 and pool.match(prefix_hashes([*ids, 99], 4)) == seq.table[:2]


def _shadow_write(seq, tokens: list[int]) -> None:
    """Write `tokens` into the pool as K and V whose every element is the token id (fp32 keeps them exactly)."""
    seq.reserve(len(tokens))
    shape = (1, seq.config.n_kv_head, len(tokens), seq.config.head_dim)
    kv = torch.tensor(tokens, dtype=torch.float32)[None, None, :, None].expand(shape)  # (1, H, T, head_dim)
    for layer in range(seq.config.n_layer):
        seq.update(layer, kv, kv)
    seq.advance(len(tokens))


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["join", "grow", "commit", "truncate", "leave"]), st.integers(0, 40)), max_size=50
    )
)
def test_an_indexed_block_always_holds_the_tokens_its_hash_names(ops):
    """Random prompts over a 2-token alphabet (so that prefixes collide), decode growth, commits, truncation
    into indexed blocks and leaves: after every step each indexed block's K/V are the last block of the tokens
    its hash was made from, so a later prompt never takes K/V of tokens other than its own."""
    config = tiny_config(n_kv_head=2)
    pool = BlockPool(config, 20, 4)
    live: list[tuple] = []  # (sequence, its token ids: what its slots below pos hold)
    named: dict[bytes, tuple[int, ...]] = {}  # every hash ever made -> the tokens it covers
    for op, n in ops:
        if op == "join":
            ids = [1 + (n >> i) % 2 for i in range(2 + n % 11)]
            seq = pool.admit(ids, 24)
            if seq is None:
                continue
            assert seq.pos % 4 == 0
            _shadow_write(seq, ids[seq.pos :])
            live.append((seq, ids))
        elif live and op == "grow":
            seq, ids = live[n % len(live)]
            new = [1 + (n >> i) % 2 for i in range(min(1 + n % 5, seq.max_tokens - seq.pos))]
            try:
                _shadow_write(seq, new)
            except PoolExhausted:  # a copy on write takes a block unpromised
                continue
            ids += new
        elif live and op == "commit":
            seq, ids = live[n % len(live)]
            for i, h in enumerate(prefix_hashes(ids, 4)):
                named[h] = tuple(ids[: 4 * (i + 1)])
            seq.commit(ids)
        elif live and op == "truncate":
            seq, ids = live[n % len(live)]
            seq.truncate(n % (seq.pos + 1))
            del ids[seq.pos :]
        elif live:
            live.pop(n % len(live))[0].free()
        k = pool.k_sides[0].tensors[0][0, 0, :, 0]  # (slots,): layer 0, head 0, the token ids written
        for h, block in pool._by_hash.items():
            assert k[block * 4 : block * 4 + 4].tolist() == list(named[h][-4:]), (block, named[h])
    for seq, _ in live:
        seq.free()
    assert pool.blocks_in_use == 0


def test_a_rolled_back_answer_is_not_shared_a_rewritten_one_is():
    """A sequence indexes an answer block, rolls back into it (as speculative decoding does) and writes other
    tokens: a prompt with the old tokens shares only the blocks before, one with the new tokens shares the
    new block, and its logits equal the no-cache forward's."""
    model = _model(native=False)
    pool = _pool(model, block_tokens=4)
    ids = list(range(30, 40))  # 10 tokens, then 6 decoded: blocks 0-3 full
    seq = pool.admit(ids, 24)
    prefill_chunk(model, ids, seq)
    for t in [3, 1, 4, 1, 5, 9]:
        batched_step(model, [t], [seq])
        ids.append(t)
    seq.commit(ids)
    assert len(seq.hashes) == 4
    old = list(ids)
    seq.truncate(13)  # inside block 3 (tokens 12-15)
    del ids[13:]
    for t in [2, 7, 1]:
        batched_step(model, [t], [seq])
        ids.append(t)
    seq.commit(ids)
    assert old[:16] != ids[:16] and pool.match(prefix_hashes(old[:16], 4)) == seq.table[:3]
    later = pool.admit([*ids, 6], 20)
    assert later.shared_tokens == 16 and later.table[:4] == seq.table[:4]
    got = prefill_chunk(model, [6], later)
    want = model(torch.tensor([[*ids, 6]]))[0, -1]
    assert (got - want).abs().max() <= TOL * want.abs().max()


def test_a_cached_chain_is_evicted_from_its_tail():
    """When cached blocks must be reused, a freed sequence's last block goes first: a prefix is found from its
    first block on, so the head of the chain (what most prompts share) stays findable longest."""
    model = _model(native=False)
    pool = _pool(model, blocks=6, block_tokens=4)
    ids = list(range(40, 57))  # 17 tokens: 4 full blocks
    seq = pool.admit(ids, 20)
    prefill_chunk(model, ids, seq)
    seq.commit(ids)
    seq.free()
    assert pool.cached == 4
    other = pool.sequence(12)
    other.reserve(12)  # 3 blocks: the 2 vacant ones, then the oldest free one
    assert len(pool.match(prefix_hashes(ids, 4))) == 3


def test_a_sequence_reusing_cached_blocks_still_gets_them_side_by_side():
    """Once every free block is cached, a sequence growing block by block takes the blocks freed longest ago
    (a chain's tail, its head kept findable) in ascending order, so that they are read as one piece."""
    pool = _pool(_model(native=False), blocks=16, block_tokens=2)
    chains = []
    for first in (0, 100):
        seq = pool.sequence(16)
        ids = list(range(first, first + 16))
        _shadow_write(seq, ids)
        seq.commit(ids)
        chains.append((ids, list(seq.table)))
        seq.free()
    assert chains[0][1] == list(range(8)) and pool.cached == 16
    grower = pool.sequence(6)
    for _ in range(6):
        _shadow_write(grower, [7])
    assert grower.table == [5, 6, 7]  # the first chain's last 3 blocks, side by side
    assert (
        pool.match(prefix_hashes(chains[0][0], 2)) == list(range(5))
        and len(pool.match(prefix_hashes(chains[1][0], 2))) == 8
    )
