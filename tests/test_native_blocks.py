"""The native kernels on GGML block weights against dequantize-then-fp32 (the gguf package as oracle).

The kernels quantize each activation block to int8 (x ≈ q·d with d = max|x| / 127 over the block: 32 elements
for Q8_0/Q4_x/Q5_x, 256 for the k-quants), so a product differs from the fp32 one by at most
    Σ_i |w_i| · d(i) / 2            (d(i): the scale of the activation block holding element i)
plus fp32 rounding of the sums. `_bound` computes exactly that per output; every kernel must stay inside it.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import kernel_path, loaded_kernel, tiny_config
from gguf.quants import dequantize as gguf_dequantize

from gen_cli.cache.linear import KVCache
from gen_cli.infer.generate import decode_step, prefill
from gen_cli.infer.optimize import fuse_mlp
from gen_cli.model.transformer import Transformer
from gen_cli.native import build
from gen_cli.native import decoder as native
from gen_cli.native.abi import PROFILE_KEYS
from gen_cli.native.block_matmul import block_matmul, use_block_kernel
from gen_cli.quant.block_linear import BlockEmbedding, BlockLinear
from gen_cli.quant.blocks import quantize
from gen_cli.quant.formats import BLOCK_TYPES

pytestmark = [
    pytest.mark.skipif(shutil.which(shlex.split(os.environ.get("CC", "cc"))[0]) is None, reason="no C compiler"),
    pytest.mark.skipif(native.native_status() != "ready", reason="needs the compiled kernel"),
]
QTYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
GGML = {"q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q4_k": 12, "q5_k": 13, "q6_k": 14}
SCALE_AT = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q4_k": (0, 2), "q5_k": (0, 2),
            "q6_k": (208,)}  # fmt: skip


def _group(qtype: str) -> int:
    return 256 if qtype in ("q4_k", "q5_k", "q6_k") else 32


def _random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Every byte random (all nibble, sign and 6-bit scale patterns, Q8_0's -128 included) but the fp16
    scales, kept small and finite."""
    t = BLOCK_TYPES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // t.elems, t.nbytes), dtype=np.uint8)
    for at in SCALE_AT[qtype]:
        half = (rng.random((rows, cols // t.elems)) * 0.02).astype(np.float16)
        raw[..., at : at + 2] = half.view(np.uint8).reshape(rows, cols // t.elems, 2)
    return torch.from_numpy(raw.reshape(rows, -1))


def _reference(blocks: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    """The gguf package's dequantization, (rows, cols) float64: the oracle, independent of gen's."""
    return torch.from_numpy(gguf_dequantize(blocks.numpy(), gguf.GGMLQuantizationType(GGML[qtype]))).double()


def _bound(w: torch.Tensor, x: torch.Tensor, qtype: str, terms: int = 1) -> torch.Tensor:
    """(n, rows): Σ_i |w_i| d(i) / 2, plus fp32 rounding (1e-5 of Σ |w_i x_i|). d(i) = amax / 127 for int8
    activations; with a second int8 term (int8x2) the residual is at most d / 2, so its half step is amax / 254²."""
    g = _group(qtype)
    half_step = x.double().abs().reshape(x.shape[0], -1, g).amax(-1) / 254**terms  # (n, cols / g)
    return half_step.repeat_interleave(g, 1) @ w.abs().T + 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize(("rows", "n"), [(1, 1), (37, 1), (37, 5), (70, 15)])  # int8 kernel (tiles: test_block_prefill)
@pytest.mark.parametrize("source", ["random", "quantized"])
@pytest.mark.parametrize("blocks_per_row", [1, 3, 16])  # odd counts run each kernel's tail
def test_block_matmul_equals_dequantize_then_fp32(qtype, rows, n, source, blocks_per_row):
    cols = blocks_per_row * _group(qtype)
    torch.manual_seed(rows + n)
    blocks = _random_blocks(qtype, rows, cols) if source == "random" else quantize(torch.randn(rows, cols), qtype)
    layer = BlockLinear(blocks, qtype, cols)
    x = torch.randn(n, cols) * torch.rand(1, cols) * 3  # uneven magnitudes: the block scales matter
    w = _reference(blocks, qtype, cols)
    got, want = block_matmul(x, layer).double(), x.double() @ w.T
    assert got.shape == (n, rows)
    assert ((got - want).abs() <= _bound(w, x, qtype)).all(), (got - want).abs().max()


def test_block_matmul_keeps_leading_dims_and_zero_inputs():
    layer = BlockLinear(quantize(torch.randn(8, 64), "q8_0"), "q8_0", 64)
    x = torch.randn(2, 3, 64)
    x[0, 1] = 0  # an all-zero block quantizes with scale 0, not a division by zero
    y = block_matmul(x, layer)
    assert y.shape == (2, 3, 8) and torch.equal(y[0, 1], torch.zeros(8))
    assert block_matmul(torch.randn(0, 64), layer).shape == (0, 8)  # an empty batch: nothing to do
    w, flat = layer.dequantized().double(), x.reshape(6, 64)
    assert ((y.reshape(6, 8) - flat.double() @ w.T).abs() <= _bound(w, flat, "q8_0")).all()


def _block_model(qtype: str, tied: bool = True, **changes) -> Transformer:
    """A tiny fp32 model whose every matrix and embedding is `qtype` blocks (widths a multiple of 256)."""
    torch.manual_seed(0)
    config = tiny_config(d_model=256, d_ff=512, n_head=4, n_kv_head=2, tie_embeddings=tied, **changes)
    model = Transformer(config).eval().requires_grad_(False)
    # Trained-looking norm weights: with all ones, a normed row of a 4-bit embedding sits on a grid whose
    # points fall exactly on the activations' rounding ties (x·127/max = k + ½), where fp32 noise decides.
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))
    for block in model.layers:
        fuse_mlp(block.mlp)
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, BlockLinear.from_weight(child.weight, qtype))
    model.tok_emb = BlockEmbedding(quantize(model.tok_emb.weight, qtype), qtype, config.d_model)
    model.lm_head = model.tok_emb.tied_head() if tied else BlockLinear.from_weight(model.lm_head.weight, qtype)
    return model


def _simulated(x: torch.Tensor, layer: BlockLinear) -> torch.Tensor:
    """x Wᵀ with x quantized per block exactly as the kernel does (round half to even, d = max|x| / 127)."""
    g = _group(layer.qtype)
    blocks = x.float().reshape(*x.shape[:-1], -1, g)  # (..., cols / g, g)
    amax = blocks.abs().amax(-1, keepdim=True)
    # 127 / amax as one fp32 division, as in C (torch's `127 / t` multiplies by a reciprocal: it rounds
    # differently, and activations that sit on a grid, e.g. a dequantized embedding, land on .5 ties).
    q = torch.round(blocks * torch.where(amax > 0, torch.full_like(amax, 127).div(amax), 0))
    return F.linear((q * (amax / 127)).reshape(x.shape), layer.dequantized())


def _steps(model: Transformer, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits (B, steps, V) of a prefill then one decode step per remaining token."""
    cache = KVCache(model.config, ids.shape[0], ids.shape[1], torch.float32)
    with torch.inference_mode():
        prefill(model, ids[:, :prompt_len], cache)
        return torch.stack([decode_step(model, ids[:, t : t + 1], cache) for t in range(prompt_len, ids.shape[1])], 1)


def _set_kernel(model: Transformer, kernel) -> None:
    for m in model.modules():
        if isinstance(m, BlockLinear):
            m.kernel = kernel


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("batch", [1, 3])
def test_native_step_on_blocks_equals_pytorch(qtype, batch):
    """Against the same activation quantization done in PyTorch, the logits agree to fp32 rounding until the
    two fp32 paths round an activation to different sides of a tie: that input moves by one step (max|x| / 127,
    under 1%), the logits by about as much (and later steps too, through the KV cache): all within 3%. Against
    plain fp32 activations the logits move by the activation quantization itself, a few percent of their spread."""
    ids = torch.randint(0, 300, (batch, 12))
    oracle, fallback, fast = _block_model(qtype), _block_model(qtype), _block_model(qtype, tied=True)
    _set_kernel(oracle, _simulated)
    assert native.NativeDecoder.attach(fast) is None
    assert use_block_kernel(fast) == 2 * 4 + 1  # four matrices per layer and the tied head
    want, plain, got = _steps(oracle, ids, 4), _steps(fallback, ids, 4), _steps(fast, ids, 4)
    scale = want.abs().max()
    per_row = (got - want).abs().amax(-1) / scale  # (B, steps)
    assert (per_row[:, 0] <= 1e-5).any(), per_row  # the same sums: equal to rounding until a tie flips
    assert per_row.max() <= 0.03, per_row
    assert (got - plain).abs().max() <= 0.1 * scale


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k", "q5_k", "q5_0", "q5_1"])
def test_native_greedy_on_blocks_agrees_with_the_fallback(qtype):
    from gen_cli.infer.generate import generate
    from gen_cli.infer.options import SamplingConfig

    prompt = torch.randint(0, 300, (1, 4))
    fallback, fast = _block_model(qtype, tied=False), _block_model(qtype, tied=False)
    native.NativeDecoder.attach(fast)
    use_block_kernel(fast)
    greedy = SamplingConfig(temperature=0.0)
    want = torch.stack(list(generate(fallback, prompt, 8, greedy, None)), 1)
    got = torch.stack(list(generate(fast, prompt, 8, greedy, KVCache(fast.config, 1, 12, torch.float32))), 1)
    assert torch.equal(got, want)


def test_block_models_are_refused_in_bf16():
    model = _block_model("q8_0").to(torch.bfloat16)
    assert "fp32 activations only" in native.supports(model)


def test_profile_counts_every_op_class_only_while_on():
    model = _block_model("q4_0")
    native.NativeDecoder.attach(model)
    decoder = model.native_decoder
    assert decoder.stop_profile() == dict.fromkeys(PROFILE_KEYS, 0.0)  # never started: all zero
    ids = torch.randint(0, 300, (1, 8))
    decoder.start_profile()
    _steps(model, ids, 3)
    times = decoder.stop_profile()
    assert list(times) == list(PROFILE_KEYS)
    assert all(times[k] > 0 for k in ("embed", "norm", "qkv", "attention", "mlp_in", "mlp_out", "lm_head"))
    _steps(model, ids, 3)  # stopped: nothing accumulates anywhere
    assert decoder.stop_profile() == dict.fromkeys(PROFILE_KEYS, 0.0)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for plain x86-64 targets")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64-v2"])  # AVX2, then no vector ISA (portable C)
def test_the_avx2_and_portable_paths_equal_the_native_one(march, fresh_library, monkeypatch, kernel_builds):
    x = torch.randn(3, 512)
    layers = {q: BlockLinear(_random_blocks(q, 37, 512, seed=1), q, 512) for q in QTYPES}
    want = {q: block_matmul(x, layer) for q, layer in layers.items()}  # built for this CPU (AVX-512 here)
    monkeypatch.setenv("GEN_HOME", str(kernel_builds))  # each -march builds once per session
    monkeypatch.setattr(build, "FLAGS", tuple(f"-march={march}" if f == "-march=native" else f for f in build.FLAGS))
    build.library.cache_clear()
    assert native.native_status() == "ready"
    assert loaded_kernel() == kernel_path(kernel_builds)  # the build for `march`, not this CPU's
    for q, layer in layers.items():
        got, w = block_matmul(x, layer), _reference(layer.blocks, q, 512)
        # the same integer sums, scaled and added in another order
        tol = 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6
        assert ((got - want[q]).double().abs() <= tol).all(), q


@pytest.mark.parametrize("use_native", [True, False])
def test_optimize_for_decode_routes_block_layers_through_the_kernel_only_natively(use_native):
    from gen_cli.infer.optimize import optimize_for_decode

    torch.manual_seed(0)
    model = optimize_for_decode(Transformer(tiny_config()).eval(), quantize="q8_0", native=use_native)
    kernels = {m.kernel for m in model.modules() if isinstance(m, BlockLinear)}
    assert kernels == ({block_matmul} if use_native else {None})
    assert (model.native_decoder is not None) == use_native


def test_prompt_tiles_are_fp32_under_a_onednn_cap_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Capping oneDNN at AVX2 (to measure what such a machine does) must not leave prompts on bf16 tiles, which
    oneDNN would then emulate; no cap keeps what the CPU has."""
    from gen_cli.native import block_matmul as bm
    from gen_cli.quant.linear import onednn_bf16

    try:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
        onednn_bf16.cache_clear()
        assert bm.tile_dtype() == torch.float32
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        onednn_bf16.cache_clear()
        native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        assert bm.tile_dtype() == (torch.bfloat16 if native else torch.float32)
    finally:
        onednn_bf16.cache_clear()


def _selector(cols: int) -> BlockLinear:
    """Q8_0 rows that each pick one activation (row i: code 1 at column i, scale 1): y is x as the kernel quantized
    it, times its block's scale."""
    raw = np.zeros((cols, cols // 32, 34), np.uint8)
    raw[..., 0:2] = np.frombuffer(np.float16(1).tobytes(), np.uint8)
    for i in range(cols):
        raw[i, i // 32, 2 + i % 32] = 1
    return BlockLinear(torch.from_numpy(raw.reshape(cols, -1)), "q8_0", cols)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for plain x86-64 targets")
@pytest.mark.parametrize("march", ["native", "x86-64-v3", "x86-64-v2"])  # AVX-512 here, AVX2, portable C
def test_activations_round_half_to_even_and_skip_nans_on_every_path(march, fresh_library, monkeypatch, kernel_builds):
    """The int8 activations: the largest |x| of a block is 127 (NaNs skipped), x · 127/max rounded to nearest even,
    a NaN 0: the same codes from the vector paths and the portable loop."""
    monkeypatch.setenv("GEN_HOME", str(kernel_builds))  # each -march builds once per session
    monkeypatch.setattr(build, "FLAGS", tuple(f"-march={march}" if f == "-march=native" else f for f in build.FLAGS))
    build.library.cache_clear()
    assert native.native_status() == "ready"
    ties = [127.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, float("nan"), -0.0, 126.5, -126.5, 0.49999997]
    rest = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 3
    x = torch.cat([torch.tensor(ties + [0.0] * (32 - len(ties))), torch.zeros(32), rest])  # (128,)
    y = block_matmul(x[None], _selector(128))[0].double()
    codes = [127, 2, 4, -2, -0, 0, 2, 0, 0, 126, -126, 0]  # block 0's scale is 127/127 = 1: y is the code itself
    assert y[: len(ties)].tolist() == codes and not y[32:64].any()
    for b in (2, 3):  # random blocks: the code is rint(x · 127/max) in fp32, y that code times max/127
        xb = x[32 * b : 32 * b + 32].numpy()
        amax = np.abs(xb).max()
        want = np.rint(xb * (np.float32(127) / amax)) * (amax / np.float32(127))
        assert np.array_equal(y[32 * b : 32 * b + 32].numpy().astype(np.float32), want.astype(np.float32)), b
