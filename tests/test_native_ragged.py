"""The native step over rows at their own positions: a ragged batch (sequences at different lengths, joining
and leaving between steps) gives every sequence its single-sequence greedy tokens, and rows of one cache at
consecutive positions are a causal multi-token forward equal to PyTorch's."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from gen_cli.cache.linear import KVCache
from gen_cli.cache.spec import CacheSpec
from gen_cli.infer import scheduler
from gen_cli.infer.batch import batched_step, native_rows, prefill_chunk
from gen_cli.infer.generate import decode_step, greedy_steps, new_cache, prefill
from gen_cli.infer.optimize import optimize_for_decode
from gen_cli.infer.options import SamplingConfig
from gen_cli.infer.proposers import NgramProposer
from gen_cli.infer.scheduler import Request, Scheduler
from gen_cli.infer.speculative import Speculation, speculative_run
from gen_cli.model.transformer import Transformer
from gen_cli.native import build

pytestmark = pytest.mark.skipif(
    shutil.which(shlex.split(os.environ.get("CC", "cc"))[0]) is None, reason="no C compiler on this machine"
)
# MHA, GQA (2 query heads per KV head) and MQA; head_dim 32 so that int4 K/V (groups of 32) fit.
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
KINDS = [("fp32", "fp32"), ("bf16", "bf16"), ("int8", "int8"), ("int4", "int4"), ("int8", "fp32")]
# Relative to the largest logit: the C step and PyTorch sum in different orders (fp32 K/V); a quantized K/V
# value on a rounding boundary may round one step apart (see test_native_kv's TOL_QUANT).
TOL, TOL_QUANT = 2e-5, 2e-4


def _model(
    heads: str = "gqa", native: bool = True, dtype: torch.dtype = torch.float32, quantize: str = "none", **changes
) -> Transformer:
    n_head, n_kv_head = HEADS[heads]
    config = tiny_config(**{"d_model": 128, "n_head": n_head, "n_kv_head": n_kv_head, "context_length": 96, **changes})
    torch.manual_seed(0)
    model = optimize_for_decode(Transformer(config).eval().to(dtype), quantize, native=native)
    assert not native or model.native_decoder is not None, build.native_status()
    return model


def _single(model: Transformer, prompt: list[int], n: int, kinds: tuple[str, str]) -> list[int]:
    """The oracle: one sequence alone, greedy, `n` new tokens."""
    spec = CacheSpec(k_kind=kinds[0], v_kind=kinds[1])
    ids = torch.tensor([prompt])  # (1, T)
    cache = new_cache(model, ids, n, 1, spec)
    return [int(token[0]) for _, token in greedy_steps(model, ids, n, cache)]


@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("kinds", KINDS, ids="/".join)
def test_ragged_batch_equals_each_sequence_alone(heads, kinds):
    """Sequences of different prompt lengths join at different steps and leave when done; one native call
    per step advances all of them; every sequence's greedy tokens equal its single-sequence run."""
    _ragged_run(_model(heads), kinds)


@pytest.mark.parametrize(("dtype", "quantize"), [(torch.bfloat16, "none"), (torch.float32, "int8")])
def test_ragged_batch_of_bf16_and_int8_weight_models(dtype, quantize):
    """A bf16 model (bf16 weights and K/V) and int8 weights: ragged rows equal each sequence alone too."""
    kinds = ("bf16", "bf16") if dtype == torch.bfloat16 else ("fp32", "fp32")
    _ragged_run(_model("gqa", dtype=dtype, quantize=quantize), kinds)


def _ragged_run(model: Transformer, kinds: tuple[str, str]) -> None:
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (5, 17, 2, 30, 9)]
    wanted = [11, 4, 20, 7, 13]  # new tokens per sequence: they leave at different steps
    joins = [0, 0, 3, 5, 9]  # the step at which each sequence joins
    want = [_single(model, p, n, kinds) for p, n in zip(prompts, wanted, strict=True)]
    spec = CacheSpec(k_kind=kinds[0], v_kind=kinds[1])
    running: dict[int, tuple[KVCache, list[int]]] = {}
    native_calls = 0
    for step in range(60):
        for i, at in enumerate(joins):
            if at == step:  # prefill (PyTorch), then its first token joins the batch
                cache = new_cache(model, torch.tensor([prompts[i]]), wanted[i], 1, spec)
                running[i] = (cache, [int(prefill_chunk(model, prompts[i], cache).argmax())])
        live = [i for i in running if len(running[i][1]) < wanted[i]]
        for i in [i for i in running if i not in live]:
            assert running.pop(i)[1] == want[i], i
        if not live:
            if step > max(joins):
                break
            continue
        caches = [running[i][0] for i in live]
        if len(live) > 1:
            assert native_rows(model, caches) is not None
            native_calls += 1
        logits = batched_step(model, [running[i][1][-1] for i in live], caches)  # (B, V)
        for i, row in zip(live, logits.argmax(-1).tolist(), strict=True):
            running[i][1].append(row)
    assert not running and native_calls > 10


@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("kinds", KINDS, ids="/".join)
def test_multi_token_forward_equals_pytorch(heads, kinds):
    """T tokens of one cache in one native call: logits equal PyTorch's forward of the same chunks into a cache
    of the same kinds (fp32: also the no-cache forward of the whole sequence, the oracle)."""
    model = _model(heads)
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(5))
    cuts = [(12, 29), (29, 40)]  # 17 rows at positions 12..28, then 11 more

    def run(native: bool) -> torch.Tensor:
        cache = KVCache(model.config, 1, 48, k_kind=kinds[0], v_kind=kinds[1])
        with torch.inference_mode():
            prefill(model, ids[:, :12], cache)
            if native:
                out = [model.native_decoder.forward(ids[0, a:b], cache) for a, b in cuts]
            else:
                out = [model(ids[:, a:b], cache=cache)[0] for a, b in cuts]
        assert cache.pos == 40
        return torch.cat(out)  # (28, V)

    got, want = run(True), run(False)
    tol = TOL if kinds == ("fp32", "fp32") else TOL_QUANT
    assert (got - want).abs().max() <= tol * want.abs().max(), (got - want).abs().max()
    if kinds == ("fp32", "fp32"):
        oracle = model(ids)[0, 12:]  # (28, V): no cache
        assert (got - oracle).abs().max() <= TOL * oracle.abs().max()
        assert got.argmax(-1).tolist() == oracle.argmax(-1).tolist()


def test_multi_token_rows_mix_with_other_sequences():
    """One call holding 3 rows of one cache and 1 row each of two others equals running them apart."""
    model = _model("gqa")
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (20, 8, 33)]
    caches = []
    for s in seqs:
        cache = KVCache(model.config, 1, 48)
        prefill(model, torch.tensor([s[:-1]]), cache)
        caches.append(cache)
    native = model.native_decoder
    extra = [5, 6]  # two more tokens for sequence 0 after its last prompt token
    rows = [seqs[0][-1], *extra, seqs[1][-1], seqs[2][-1]]
    order = [caches[0], caches[0], caches[0], caches[1], caches[2]]
    with torch.inference_mode():
        got = native.rows(rows, order)  # (5, V)
    assert [c.pos for c in caches] == [22, 8, 33]
    full0 = model(torch.tensor([seqs[0] + extra]))[0, -3:]  # (3, V)
    want = torch.cat([full0, model(torch.tensor([seqs[1]]))[0, -1:], model(torch.tensor([seqs[2]]))[0, -1:]])
    assert (got - want).abs().max() <= TOL * want.abs().max()
    # The same rows again from the same state, the head on the last three only: their logits.
    for cache, back in zip(caches, (3, 1, 1), strict=True):
        cache.truncate(cache.pos - back)
    with torch.inference_mode():
        tail = native.rows(rows, order, logits_from=2)  # (3, V)
    assert [c.pos for c in caches] == [22, 8, 33] and tail.shape == (3, model.config.vocab_size)
    assert (tail - want[2:]).abs().max() <= TOL * want.abs().max()
    with pytest.raises(Exception, match="does not accept"):
        native.rows(rows, order, logits_from=6)


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_position_tables_per_row(pos_encoding):
    """Additive position tables are read at each row's own position."""
    model = _model("mha", pos_encoding=pos_encoding)
    ids = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model.config, 1, 32)
    with torch.inference_mode():
        prefill(model, ids[:, :4], cache)
        got = model.native_decoder.forward(ids[0, 4:], cache)  # (26, V)
    want = model(ids)[0, 4:]
    assert (got - want).abs().max() <= TOL * want.abs().max()


def test_long_contexts_split_into_chunks():
    """Rows past 256 positions split attention into chunks; a short row beside them reads only its own."""
    model = _model("gqa", context_length=700)
    gen = torch.Generator().manual_seed(4)
    long, short = torch.randint(0, 300, (1, 600), generator=gen), torch.randint(0, 300, (1, 5), generator=gen)
    caches = [KVCache(model.config, 1, 640), KVCache(model.config, 1, 16)]
    with torch.inference_mode():
        prefill(model, long[:, :-1], caches[0])
        prefill(model, short[:, :-1], caches[1])
        got = model.native_decoder.rows([int(long[0, -1]), int(short[0, -1])], caches)
    want = torch.cat([model(long)[0, -1:], model(short)[0, -1:]])  # (2, V)
    assert (got - want).abs().max() <= TOL * want.abs().max()


def test_refusals_fall_back_to_pytorch():
    """More rows than the step takes, mixed kinds, or a window cache: native_rows says no; batched_step
    still answers (PyTorch)."""
    model = _model("gqa")
    config = model.config
    native = model.native_decoder
    assert not native.accepts_rows([KVCache(config, 1, 8) for _ in range(65)])
    mixed = [KVCache(config, 1, 8), KVCache(config, 1, 8, k_kind="int8", v_kind="int8")]
    assert native_rows(model, mixed) is None
    assert native_rows(model, [KVCache(config, 2, 8)]) is None  # a multi-row cache is the plain step's
    ring = new_cache(model, torch.tensor([[1, 2]]), 4, 1, CacheSpec(window=8))
    assert native_rows(model, [ring]) is None
    logits = batched_step(model, [3, 4], mixed)
    assert logits.shape == (2, config.vocab_size) and [c.pos for c in mixed] == [1, 1]
    with pytest.raises(Exception, match="does not accept"):
        native.rows([1, 2], mixed)


def test_scheduler_runs_native_rows_with_single_greedy_output(monkeypatch):
    """Continuous batching through the native step, prompts fed in chunks beside the decoding rows in the same
    call (chunked prefill, the head only on rows whose logits are read): every request's tokens equal its
    single run."""
    model = _model("gqa")
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (3, 12, 7, 25, 4, 10)]
    sizes = [9, 3, 14, 6, 11, 5]
    sched = Scheduler(model, max_batch=3, prefill_chunk=8)
    calls = []  # (rows, distinct caches, rows given logits) per native call
    real = model.native_decoder.rows

    def rows(tokens, caches, logits_from=0):
        calls.append((len(caches), len(set(map(id, caches))), len(caches) - logits_from))
        return real(tokens, caches, logits_from)

    model.native_decoder.rows = rows
    prefilled = []  # PyTorch prefills: none while the C step takes the caches
    monkeypatch.setattr(scheduler, "prefill_chunk", lambda *a: prefilled.append(a) or prefill_chunk(*a))
    reqs = [sched.submit(Request(p, n)) for p, n in zip(prompts, sizes, strict=True)]
    sched.run_until_idle()
    for r, p, n in zip(reqs, prompts, sizes, strict=True):
        assert r.tokens == _single(model, p, n, ("fp32", "fp32"))
    assert max(d for _, d, _ in calls) == 3  # three requests decoding in one call
    assert any(rows > d > 1 for rows, d, _ in calls)  # a prompt fed beside a decoding request
    assert max(rows for rows, _, _ in calls) <= 8 + 2  # at most prefill_chunk prompt rows beside 2 decoding
    assert any(head < rows for rows, _, head in calls)  # a prompt's inner rows skip the head
    assert not prefilled  # every prompt token went through the C step, the 25-token one over several calls


@pytest.mark.parametrize("kinds", [("fp32", "fp32"), ("int8", "int4")], ids="/".join)
def test_speculative_verify_runs_native_with_the_same_greedy_output(kinds):
    """Prompt-lookup speculation verifies guesses with one multi-token native call (a round without a guess is a
    one-row call); greedy output unchanged."""
    model = _model("gqa")
    prompt = (list(range(40, 60)) * 3)[:50]  # repetitive: prompt lookup finds continuations
    n = 30
    spec = CacheSpec(k_kind=kinds[0], v_kind=kinds[1])
    calls = []
    real = model.native_decoder.rows
    model.native_decoder.rows = lambda *a: calls.append(len(a[1])) or real(*a)
    cache = new_cache(model, torch.tensor([prompt]), n, 1, spec)
    greedy = SamplingConfig(temperature=0.0)
    got, stats, _ = speculative_run(
        model, prompt, n, greedy, cache, Speculation(NgramProposer(), k=4, adaptive=False), None
    )
    assert got == _single(model, prompt, n, kinds)[: len(got)] and len(got) == n
    assert stats.verify_rounds > 0 and len(calls) == stats.rounds and max(calls) > 1


@pytest.mark.parametrize("d_model, n_head, d_ff", [(72, 4, 40), (92, 2, 44)])
def test_batched_rows_with_widths_off_the_vector_length(d_model, n_head, d_ff):
    """Widths that are not multiples of 16 (d_model 72, d_ff 40, head_dim 18), nor of 8 (92 and 44: AVX2's
    scalar tail): the four-row matrix kernel's tail and the portable attention give the PyTorch forward's
    logits for 4k and 4k+r rows."""
    config = tiny_config(d_model=d_model, n_head=n_head, n_kv_head=n_head // 2, d_ff=d_ff, context_length=32)
    torch.manual_seed(0)
    model = optimize_for_decode(Transformer(config).eval())
    assert model.native_decoder is not None, build.native_status()
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(8))
    cache = KVCache(config, 1, 24)
    with torch.inference_mode():
        prefill(model, ids[:, :3], cache)
        got = torch.cat(
            [model.native_decoder.forward(ids[0, 3:11], cache), model.native_decoder.forward(ids[0, 11:], cache)]
        )
    want = model(ids)[0, 3:]  # (17, V)
    assert (got - want).abs().max() <= TOL * want.abs().max()


def test_int8_weight_batches_equal_single_steps_bit_for_bit():
    """int8 matrices sum exactly in integers, four rows at a time or one, and attention splits a row's positions at
    the same chunk boundaries alone and in any batch: a ragged batch's logits are each sequence's own single step,
    bit for bit, at short contexts (one chunk) and long ones (past 256 positions: chunks merged)."""
    model = _model("gqa", quantize="int8", context_length=700)
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (4, 9, 15, 6, 11)]
    together, alone = _together_and_alone(model, prompts, 32)
    assert torch.equal(together, alone)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (300, 40, 600, 257)]
    together, alone = _together_and_alone(model, prompts, 640)
    assert torch.equal(together, alone)


def test_plain_steps_and_rows_alternate_without_stale_fields():
    """The plain step (a 2-row int8 K/V cache) and `rows` (fp32 batch-1 caches of other lengths) take turns on
    one decoder; each step's logits equal PyTorch's: neither leaves the other its slots, stride or kinds."""
    native_model, torch_model = _model("gqa"), _model("gqa", native=False)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(11))

    def run(model: Transformer) -> list[torch.Tensor]:
        shared = KVCache(model.config, 2, 40, k_kind="int8", v_kind="int8")
        apart = [KVCache(model.config, 1, 24), KVCache(model.config, 1, 64)]
        out = []
        with torch.inference_mode():
            prefill(model, ids[:, :6], shared)
            prefill(model, ids[:1, :3], apart[0])
            prefill(model, ids[1:, :9], apart[1])
            for t in range(3):
                out.append(decode_step(model, ids[:, 6 + t : 7 + t], shared))
                out.append(batched_step(model, [int(ids[0, 3 + t]), int(ids[1, 9 + t])], apart))
        return out

    for got, want in zip(run(native_model), run(torch_model), strict=True):
        assert (got - want).abs().max() <= TOL_QUANT * want.abs().max()


@pytest.mark.parametrize("d_model", [128, 72])
def test_bf16_batches_equal_single_steps(d_model):
    """A bf16 model's batch (four rows at a time, and d_model 72: the last 8 columns past the vectors) gives
    each sequence's own single-step logits up to fp32 summation order."""
    config = tiny_config(d_model=d_model, n_head=4, n_kv_head=2, d_ff=40 if d_model == 72 else 64)
    torch.manual_seed(0)
    model = optimize_for_decode(Transformer(config).eval().to(torch.bfloat16))
    assert model.native_decoder is not None, build.native_status()
    gen = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (4, 9, 2, 6, 11)]

    together, alone = _together_and_alone(model, prompts, 16, torch.bfloat16)
    assert (together - alone).abs().max() <= 1e-5 * alone.abs().max()


def _together_and_alone(
    model: Transformer, prompts: list[list[int]], max_tokens: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) of each prompt's first token fed again after it (rows with different inputs from the first
    layer on, so rows mixed up in a kernel show): all N as rows of one step, and each step alone."""

    def caches() -> list[KVCache]:
        out = []
        for p in prompts:
            cache = KVCache(model.config, 1, max_tokens, dtype)
            prefill(model, torch.tensor([p]), cache)
            out.append(cache)
        return out

    with torch.inference_mode():
        together = model.native_decoder.rows([p[0] for p in prompts], caches())
        alone = torch.cat(
            [model.native_decoder(torch.tensor([[p[0]]]), c) for p, c in zip(prompts, caches(), strict=True)]
        )
    return together, alone


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for a plain x86-64 target")
def test_avx2_fp32_rows_get_the_same_bits_in_any_batch_of_nine_or_more(fresh_library, monkeypatch, kernel_builds):
    """The AVX2 build (x86-64-v3) multiplies 9 or more fp32 rows with the inputs transposed, one input a lane:
    each row's sums run in the same order in a batch of 9, 10 or 17 (16- and 8-lane groups, and rows past the
    24-row blocks: d_model 92, vocab 300); 2 to 8 rows take the dot tile, up to 6 inputs a pass over each pair
    of weight rows (7 and 8 in two even passes). All equal PyTorch's logits within fp32 rounding."""
    monkeypatch.setenv("GEN_HOME", str(kernel_builds))
    monkeypatch.setattr(build, "FLAGS", tuple("-march=x86-64-v3" if f == "-march=native" else f for f in build.FLAGS))
    model = _model("gqa", d_model=92, n_head=2, n_kv_head=1, d_ff=44)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (3, 8, 5, 12, 7, 4, 10, 6, 9)]
    nine, _ = _together_and_alone(model, prompts, 32)
    seventeen, _ = _together_and_alone(model, prompts + prompts[:8], 32)
    ten = _together_and_alone(model, prompts + prompts[:1], 32)[0]
    assert torch.equal(seventeen[:9], nine) and torch.equal(seventeen[9:], nine[:8]) and torch.equal(ten[:9], nine)
    with torch.inference_mode():
        want = torch.stack([model(torch.tensor([[*p, p[0]]]))[0, -1] for p in prompts])  # (9, V)
    for got in (nine, *(_together_and_alone(model, prompts[:n], 32)[0] for n in (8, 7, 6, 5, 4, 3, 2))):
        assert (got - want[: len(got)]).abs().max() <= TOL * want.abs().max()


def _cpu_flags() -> set[str]:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    return set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


@pytest.mark.skipif("avx2" not in _cpu_flags(), reason="the transposed fp32 kernels are x86 AVX2 / AVX-512 code")
@pytest.mark.parametrize("d_ff", [44, 4096])  # 4096: the down projection's rows 16 KB apart, packed before use
def test_fp32_rows_get_the_same_bits_in_any_batch_the_transposed_kernels_take(d_ff):
    """This machine's build: 5 or more fp32 rows with 512-bit vectors (9 or more with AVX2 only) are multiplied with
    the inputs transposed; each row's sums run in the same order in a batch of that many, 9 or 17, whether its
    weight rows are read in place or packed first (d_ff 4096), and equal PyTorch's logits within fp32 rounding."""
    fewest = 5 if "avx512f" in _cpu_flags() else 9
    model = _model("gqa", d_model=92, n_head=2, n_kv_head=1, d_ff=d_ff)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (3, 8, 5, 12, 7, 4, 10, 6, 9)]
    nine, _ = _together_and_alone(model, prompts, 32)
    seventeen, _ = _together_and_alone(model, prompts + prompts[:8], 32)
    first = _together_and_alone(model, prompts[:fewest], 32)[0]
    assert (
        torch.equal(seventeen[:9], nine) and torch.equal(seventeen[9:], nine[:8]) and torch.equal(first, nine[:fewest])
    )
    with torch.inference_mode():
        want = torch.stack([model(torch.tensor([[*p, p[0]]]))[0, -1] for p in prompts])  # (9, V)
    assert (nine - want).abs().max() <= TOL * want.abs().max()
