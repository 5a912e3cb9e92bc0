"""gen's C kernel for a prompt's causal attention (native/prompt_attention): against the written-out softmax
(eager_attention, the scores materialized) on every head layout, head size, tile edge and cached prefix; where
it declines; and inside a model's prefill, where it replaces SDPA."""

from __future__ import annotations

import platform

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gen_cli.infer.generate import new_cache, prefill
from gen_cli.infer.optimize import optimize_for_decode
from gen_cli.model.attention import causal_mask, eager_attention
from gen_cli.model.transformer import Transformer, set_attention_impl
from gen_cli.native import build
from gen_cli.native import decoder as native
from gen_cli.native.prompt_attention import causal_attention
from tests.conftest import kernel_path, loaded_kernel, tiny_config

pytestmark = pytest.mark.skipif(native.native_status() != "ready", reason="the native kernel does not build here")
FP32 = {"atol": 3e-5, "rtol": 1e-5}  # the same sums in another order, online softmax, exp to 2 ulp: outputs ~2


def _qkv(B: int, H: int, Hkv: int, T: int, start: int, hd: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # q as a projection hands it over: (B, T, H, hd) seen as (B, H, T, hd), heads not contiguous
    q = (2 * torch.randn(B, T, H, hd, generator=g)).transpose(1, 2)
    k, v = (2 * torch.randn(B, Hkv, start + T, hd, generator=g) for _ in range(2))
    return q, k, v


def _oracle(q, k, v, start: int, scale: float | None = None) -> torch.Tensor:
    return eager_attention(q, k, v, causal_mask(start, q.shape[2], q.device), False, scale)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from([(4, 4), (6, 2), (4, 1)]),  # MHA, GQA, MQA
    hd=st.sampled_from([8, 20, 48, 64, 128]),  # below, between and at whole 16-lane steps
    T=st.integers(1, 130),  # one query, query and key tile edges (32, 48, 64, 96), and past them
    start=st.sampled_from([0, 1, 47, 100]),
    B=st.integers(1, 2),
)
def test_the_kernel_is_the_written_out_causal_softmax(kind, hd, T, start, B):
    q, k, v = _qkv(B, *kind, T, start, hd)
    got = causal_attention(q, k, v, start, None)
    assert got is not None and got.shape == q.shape
    torch.testing.assert_close(got, _oracle(q, k, v, start), **FP32)


def test_a_given_scale_and_sharp_scores_agree():
    # Scores spread over ±100: each tile's maximum moves a lot, so a wrong rescale of the running sums shows.
    q, k, v = _qkv(1, 4, 2, 200, 30, 64, seed=3)
    got = causal_attention(q * 8, k, v, 30, 0.5)
    torch.testing.assert_close(got, _oracle(q * 8, k, v, 30, 0.5), **FP32)


def test_it_declines_what_it_does_not_read():
    q, k, v = _qkv(1, 4, 2, 8, 0, 16)
    assert causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0, None) is None  # fp32 only
    assert causal_attention(q, k[:, :, :7], v[:, :, :7], 0, None) is None  # keys are not start + T
    assert causal_attention(q.requires_grad_(), k, v, 0, None) is None  # autograd needs SDPA's backward
    big = _qkv(1, 2, 2, 4, 0, 272)  # heads past the kernel's 256
    assert causal_attention(*big, 0, None) is None
    odd = _qkv(1, 3, 2, 4, 0, 16)  # 3 query heads cannot share 2 KV heads
    assert causal_attention(*odd, 0, None) is None


def _model() -> Transformer:
    torch.manual_seed(0)
    config = tiny_config(n_kv_head=2, context_length=400, d_model=64, n_head=4)  # head_dim 16
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)  # sharp attention: a wrong mask shows in the logits
    return model


def test_a_prefill_runs_the_kernel_and_gives_the_models_logits():
    model, ids = _model(), torch.randint(0, 300, (2, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)  # SDPA, no cache
    optimize_for_decode(model)
    assert model.causal_kernel is causal_attention
    calls = []

    def counted(*args):
        y = causal_attention(*args)
        assert y is not None  # it ran, SDPA did not
        calls.append(args[0].shape[2])
        return y

    model.causal_kernel = counted
    with torch.inference_mode():
        cache = new_cache(model, ids, 4)
        # A prompt, then a chunk after it (the causal mask shifted by the prefix), then one that is too short
        got = torch.cat([model(ids[:, :150], cache), model(ids[:, 150:290], cache), model(ids[:, 290:], cache)], 1)
        # without a cache k and v are views of the projections, with strides of their own
        uncached = model(ids[:, :150])
    # both layers of each chunk of KERNEL_MIN_QUERIES or more; the 10 queries went to SDPA
    assert calls == [150, 150, 140, 140, 150, 150]
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(uncached, want[:, :150], atol=5e-5, rtol=1e-5)
    set_attention_impl(model, "eager")  # eager stays eager
    calls.clear()
    with torch.inference_mode():
        prefill(model, ids, new_cache(model, ids, 4))
    assert calls == []


def test_no_native_keeps_sdpa():
    assert optimize_for_decode(_model(), native=False).causal_kernel is None  # every op in PyTorch


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for plain x86-64 targets")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64-v2"])  # AVX2, then no vector ISA (portable C)
def test_the_avx2_and_portable_paths_agree(march, fresh_library, monkeypatch, kernel_builds):
    monkeypatch.setenv("GEN_HOME", str(kernel_builds))  # each -march builds once per session
    monkeypatch.setattr(build, "FLAGS", tuple(f"-march={march}" if f == "-march=native" else f for f in build.FLAGS))
    build.library.cache_clear()
    assert native.native_status() == "ready"
    assert loaded_kernel() == kernel_path(kernel_builds)  # the build for `march`, not this CPU's
    for hd, T, start in [(64, 130, 0), (20, 50, 47), (8, 1, 5)]:
        q, k, v = _qkv(2, 6, 2, T, start, hd, seed=hd)
        torch.testing.assert_close(causal_attention(q, k, v, start, None), _oracle(q, k, v, start), **FP32)
