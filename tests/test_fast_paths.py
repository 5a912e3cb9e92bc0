"""Every fast path against the plain fp32 model: fused/prepacked fp32 equal, bf16/int8 within stated bounds."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from gen_cli.infer.generate import generate, new_cache
from gen_cli.infer.optimize import fuse_mlp, optimize_for_decode
from gen_cli.infer.options import SamplingConfig
from gen_cli.model.transformer import Transformer
from gen_cli.quant import linear as q
from gen_cli.quant.linear import Int8Linear, OneDNNLinear

GREEDY = SamplingConfig(temperature=0.0)
# int8 / bf16 bounds, relative to the largest |logit| of the fp32 model (tiny random models: ~0.1-0.3).
INT8_REL_TOL = 0.05
BF16_REL_TOL = 0.05


def _pair(**changes) -> tuple[Transformer, Transformer]:
    """(reference fp32, an identical copy to optimise)."""
    torch.manual_seed(0)
    ref = Transformer(tiny_config(**changes)).eval()
    torch.manual_seed(0)
    return ref, Transformer(tiny_config(**changes)).eval()


def _greedy(model: Transformer, prompt: torch.Tensor, n: int, use_cache: bool = True) -> torch.Tensor:
    cache = new_cache(model, prompt, n) if use_cache else None
    return torch.stack(list(generate(model, prompt, n, GREEDY, cache)), dim=1)  # (B, n)


@pytest.fixture(params=[False, True], ids=["plain-layout", "prepacked"])
def packing(request, monkeypatch):
    """Run with and without oneDNN prepacking (tiny matrices are below the packing threshold)."""
    if request.param:
        if not q.mkldnn_ok():
            pytest.skip("oneDNN is not available in this torch build")
        monkeypatch.setattr(q, "PACK_MIN_IN_FEATURES", 1)
    return request.param


@pytest.mark.parametrize("pos", ["rope", "sinusoidal", "learned"])
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_fp32_fast_path_equals_reference(pos, kv, packing):
    ref, fast = _pair(pos_encoding=pos, n_kv_head=kv)
    optimize_for_decode(fast, native=False)  # PyTorch's own fast path (test_native.py covers the C step)
    assert any(isinstance(m, OneDNNLinear) for m in fast.modules()) == packing
    idx = torch.randint(0, 300, (2, 12))
    with torch.inference_mode():
        assert torch.allclose(fast(idx), ref(idx), atol=1e-4, rtol=0)
    prompt = idx[:, :4]
    assert torch.equal(_greedy(fast, prompt, 12), _greedy(ref, prompt, 12))


@pytest.mark.parametrize("rows", [17, 32, 33, 100])
def test_prompt_gemm_pads_rows_to_a_power_of_two_and_matches_linear(rows):
    if not q.mkldnn_ok():
        pytest.skip("oneDNN is not available in this torch build")
    torch.manual_seed(0)
    w, x = torch.randn(48, 256), torch.randn(rows, 256)
    assert torch.allclose(q.prompt_gemm(x, w), x @ w.t(), atol=1e-4)


@pytest.mark.parametrize("avx512", [False, True])
def test_long_fp32_prompts_take_mkl_only_without_avx512(monkeypatch, avx512):
    """Without AVX-512, fp32 prompts of MKL_MIN_ROWS rows or more skip oneDNN's GEMM (MKL's AVX2 one is faster
    there); shorter prompts, and every prompt on an AVX-512 CPU, still take it, padded to a power of two."""
    if not q.mkldnn_ok():
        pytest.skip("oneDNN is not available in this torch build")
    monkeypatch.setattr(q, "avx512", lambda: avx512)
    calls = []
    onednn = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[0].shape[0]) or onednn(*a))
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    for rows in (q.MKL_MIN_ROWS - 1, q.MKL_MIN_ROWS, 300):
        x = torch.randn(rows, 256)
        assert torch.allclose(q.prompt_gemm(x, w), x @ w.t(), atol=1e-4)
    padded = [1 << (q.MKL_MIN_ROWS - 2).bit_length(), 1 << (q.MKL_MIN_ROWS - 1).bit_length(), 512]
    assert calls == (padded if avx512 else padded[:1])


def test_fused_mlp_matches_separate_projections():
    ref, fast = _pair()
    for layer in fast.layers:
        fuse_mlp(layer.mlp)
    assert "w13" in fast.layers[0].mlp._modules and not hasattr(fast.layers[0].mlp, "w1")
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.allclose(fast.layers[0].mlp(x), ref.layers[0].mlp(x), atol=1e-6)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_cached_equals_uncached_on_fast_paths(quantize, packing):
    _, fast = _pair(n_kv_head=2)
    if quantize == "int8":
        fast = fast.to(torch.bfloat16)
    optimize_for_decode(fast, quantize=quantize, native=False)
    prompt = torch.randint(0, 300, (2, 3))
    assert torch.equal(_greedy(fast, prompt, 12), _greedy(fast, prompt, 12, use_cache=False))


def test_int8_linear_is_its_dequantized_weight():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    lin = Int8Linear(w, torch.float32)
    assert lin.qweight.dtype == torch.int8 and lin.scale.shape == (48,)
    # Each row's largest |w| maps to ±127: the scale is the finest that fits the row, not any scale.
    assert torch.allclose(lin.scale, w.abs().amax(dim=1) / 127, rtol=1e-6, atol=0)
    assert (lin.qweight.abs().amax(dim=1) == 127).all()
    # Symmetric rounding per output channel: error at most half a step of that row's scale.
    assert ((lin.dequantized() - w).abs() <= lin.scale[:, None] / 2 + 1e-7).all()
    for rows in (1, 3, 20):  # the int8pack kernel (≤ 8 rows) and the dequantised GEMM (prefill)
        x = torch.randn(rows, 64)
        assert torch.allclose(lin(x), x @ lin.dequantized().t(), atol=1e-4)


def test_int8_prompt_under_compile_avoids_onednn(monkeypatch):
    """Inductor refuses oneDNN's GEMM on a weight computed in the graph: compiled prompts use F.linear."""
    from gen_cli.quant import linear

    lin = Int8Linear(torch.randn(300, 256), torch.float32)
    monkeypatch.setattr(linear, "prompt_gemm", lambda *a: pytest.fail("oneDNN GEMM under compile"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(20, 256)
    assert torch.allclose(lin(x), x @ lin.dequantized().t(), atol=1e-3)


@pytest.mark.parametrize(("dtype", "quantize", "tol"), [(torch.bfloat16, "none", BF16_REL_TOL),
                                                        (torch.bfloat16, "int8", INT8_REL_TOL)])  # fmt: skip
def test_low_precision_within_tolerance_and_greedy_agreement_measured(dtype, quantize, tol):
    ref, fast = _pair()
    optimize_for_decode(fast.to(dtype), quantize=quantize)
    idx = torch.randint(0, 300, (1, 16))
    with torch.inference_mode():
        want, got = ref(idx), fast(idx).float()
    assert (got - want).abs().max() <= tol * want.abs().max()
    prompt = idx[:, :4]
    agree = (_greedy(fast, prompt, 12) == _greedy(ref, prompt, 12)).float().mean().item()
    assert agree >= 0.5, f"greedy agreement {agree:.0%}"  # random tiny logits are near ties; measured, not exact


def test_unknown_quantize_mode_is_refused():
    from gen_cli.errors import UsageError

    _, fast = _pair()
    with pytest.raises(UsageError, match="unknown quantize mode 'int4'"):
        optimize_for_decode(fast, quantize="int4")


@pytest.mark.slow
def test_compiled_model_matches_eager():
    ref, fast = _pair()
    optimize_for_decode(fast, compile=True)
    prompt = torch.randint(0, 300, (1, 4))
    assert torch.equal(_greedy(fast, prompt, 8), _greedy(ref, prompt, 8))


@pytest.mark.slow
def test_the_compile_warm_up_leaves_nothing_to_compile_in_the_measured_run():
    from torch._dynamo.utils import counters

    from gen_cli.infer.generate import run_generation
    from gen_cli.infer.optimize import compile_warm_up

    _, fast = _pair()
    optimize_for_decode(fast, compile=True)
    prompt = torch.randint(0, 300, (1, 4))
    before = counters["stats"]["unique_graphs"]
    compile_warm_up(fast, prompt, 10, GREEDY)
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > before  # the warm-up compiled the prefill and decode graphs
    # `gen generate --compile` then times this run: its prefill and every decode step reuse the graphs.
    assert run_generation(fast, prompt, 10, GREEDY).tokens.shape == (1, 10)
    assert counters["stats"]["unique_graphs"] == compiled


def test_cli_quantize_and_refusals(model_dir):
    from typer.testing import CliRunner

    from gen_cli.cli import app

    def run(*args):
        return CliRunner().invoke(app, ["generate", "hi", "--model", str(model_dir), "--device", "cpu", *args])

    from gen_cli.native.build import native_status

    native_dtype = "float32" if native_status() == "ready" else "bfloat16"
    # Without the native step int8 computes in bf16: PyTorch's int8 kernel is ~20x slower on fp32.
    for args, dtype in ((["--quantize", "int8"], native_dtype), (["--quantize", "int8", "--no-native"], "bfloat16")):
        ok = run(*args, "--max-new-tokens", "5", "--stats")
        assert ok.exit_code == 0, ok.output
        stderr = " ".join(ok.stderr.split())  # the model's path sets where lines wrap
        assert "int8 weights" in stderr and f"dtype {dtype}" in stderr
    for args, message in ((["--quantize", "int4"], "unknown --quantize"),
                          (["--compile", "--no-kv-cache"], "--compile speeds up the cached")):  # fmt: skip
        bad = run(*args)
        assert bad.exit_code == 2 and message in bad.stderr and "Traceback" not in bad.output


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize(("quantize", "compile"), [("none", False), ("int8", False), ("none", True)])
def test_cuda_bf16_fast_paths(quantize, compile):
    ref, fast = _pair()
    device = torch.device("cuda")
    fast = optimize_for_decode(fast.to(device, torch.bfloat16), quantize=quantize, compile=compile)
    idx = torch.randint(0, 300, (1, 16))
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        want, got = ref(idx), fast(idx.to(device)).float().cpu()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated(device) > 0
    assert (got - want).abs().max() <= INT8_REL_TOL * want.abs().max()
    prompt = idx[:, :4].to(device)
    assert torch.equal(_greedy(fast, prompt, 8), _greedy(fast, prompt, 8, use_cache=False))


def test_bf16_weights_skip_onednn_where_it_has_no_bf16_kernels(monkeypatch):
    """On an AVX2-only CPU oneDNN cannot build a bf16 inner product ("could not create a primitive descriptor"):
    bf16 weights keep F.linear there, fp32 ones still go to oneDNN."""
    from gen_cli.quant.linear import mkldnn_ok, onednn_applies, onednn_bf16

    if not mkldnn_ok():
        pytest.skip("this torch has no oneDNN")
    weight = torch.zeros(8, 256)
    try:
        for supported in (False, True):
            monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda s=supported: s)
            onednn_bf16.cache_clear()
            assert onednn_applies(weight) and onednn_applies(weight.bfloat16()) == supported
    finally:
        monkeypatch.undo()
        onednn_bf16.cache_clear()
