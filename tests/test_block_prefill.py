"""Prompts on block-quantized weights: row tiles dequantized into a scratch, multiplied by PyTorch's GEMM.

From `TILE_MIN_TOKENS` tokens on, `block_matmul` dequantizes the matrix one row tile at a time (never whole) and
multiplies in bf16 where the CPU has it. Oracle: the gguf package's dequantization, then float64. The bound is
bf16's: with u = 2⁻⁸ (8 significant bits), each product w̃x̃ = wx(1 + δ₁)(1 + δ₂) is off by at most (2u + u²)|wx|,
the fp32 sum over k terms adds at most k·2⁻²⁴ Σ|wx|, and the result is rounded to bf16 once more (u of it). An
fp32 tile (no bf16 on the CPU) is inside the same bound.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil

import pytest
import torch
from test_native_blocks import QTYPES, _block_model, _group, _random_blocks, _reference, _set_kernel

from gen_cli.native import block_matmul as bm
from gen_cli.native import build
from gen_cli.native import decoder as native
from gen_cli.native.abi import ACT_MODES, MATRIX_TYPES
from gen_cli.quant.block_linear import BlockLinear
from gen_cli.quant.blocks import quantize

pytestmark = [
    pytest.mark.skipif(shutil.which(shlex.split(os.environ.get("CC", "cc"))[0]) is None, reason="no C compiler"),
    pytest.mark.skipif(native.native_status() != "ready", reason="needs the compiled kernel"),
]
U = 2.0**-8


def _tile_bound(w: torch.Tensor, x: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """(n, rows): the bf16 rounding bound of the module docstring, from float64 w (rows, k) and x (n, k)."""
    k = w.shape[1]
    s = x.double().abs() @ w.abs().T  # (n, rows): Σ |w x|
    return (2 * U + U * U + k * 2.0**-24) * (1 + U) * s + U * want.abs() + 1e-30


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", [1, 37, 515])  # odd counts; 515 rows of 8 blocks span several tiles
@pytest.mark.parametrize("n", [bm.TILE_MIN_TOKENS, bm.TILE_MIN_TOKENS + 1, 64, 130])
def test_tiled_prefill_equals_dequantize_then_float64(qtype, rows, n, monkeypatch):
    monkeypatch.setattr(bm, "TILE_BYTES", 1 << 14)  # small tiles: many of them, and a ragged last one
    monkeypatch.setattr(bm, "prompt_in_lanes", lambda lib, layer: False)  # Q6_K too, where the lanes would take it
    cols = 8 * _group(qtype) if _group(qtype) == 256 else 3 * _group(qtype)
    torch.manual_seed(rows * n)
    blocks = _random_blocks(qtype, rows, cols, seed=rows + n)
    layer = BlockLinear(blocks, qtype, cols)
    x = torch.randn(n, cols)
    w = _reference(blocks, qtype, cols)
    want = x.double() @ w.T
    got = bm.block_matmul(x, layer).double()
    assert got.shape == (n, rows)
    assert ((got - want).abs() <= _tile_bound(w, x, want)).all(), (got - want).abs().max()


@pytest.mark.parametrize("n", range(1, 131, 7))
def test_every_prompt_length_takes_a_correct_path(n):
    """Below the threshold the int8 kernel runs, from it on the tiles: either way within the looser of the two bounds
    (the int8 one: half an activation step per element, max|x| / 254 of each block)."""
    rows, cols = 33, 64
    layer = BlockLinear(quantize(torch.randn(rows, cols), "q4_0"), "q4_0", cols)
    x = torch.randn(2, n, cols)
    w = layer.dequantized().double()
    flat = x.reshape(-1, cols)  # (2n, cols)
    want = flat.double() @ w.T
    half_step = flat.double().abs().reshape(flat.shape[0], -1, 32).amax(-1) / 254  # (2n, cols / 32)
    bound = half_step.repeat_interleave(32, 1) @ w.abs().T + 1e-5 * (flat.double().abs() @ w.abs().T) + 1e-6
    got = bm.block_matmul(x, layer)
    assert got.shape == (2, n, rows)
    assert ((got.reshape(-1, rows).double() - want).abs() <= torch.maximum(bound, _tile_bound(w, flat, want))).all()


def test_q6_k_prompts_run_the_integer_lanes_where_the_build_has_them():
    """On AVX-512 VNNI a Q6_K prompt skips the tiles for the int8 kernel's lanes (blocks_q6k16.h): the same bits
    as that kernel called directly. Elsewhere it stays on the tiles (bf16 or fp32 products: other bits)."""
    rows, cols, n = 37, 512, bm.TILE_MIN_TOKENS + 8
    blocks = _random_blocks("q6_k", rows, cols, seed=5)
    layer = BlockLinear(blocks, "q6_k", cols)
    x = torch.randn(n, cols)
    lib = build.library()
    direct = torch.empty(n, rows)
    assert not lib.gen_block_matmul(blocks.data_ptr(), MATRIX_TYPES["q6_k"], rows, cols, x.data_ptr(), n,
                                    direct.data_ptr(), 2, ACT_MODES["int8"])  # fmt: skip
    got = bm.block_matmul(x, layer)
    assert torch.equal(got, direct) == bool(lib.gen_block_lanes(MATRIX_TYPES["q6_k"]))


def test_tiles_never_hold_a_whole_matrix(monkeypatch):
    """Each GEMM sees at most a tile's rows, whatever the matrix's size."""
    monkeypatch.setattr(bm, "TILE_BYTES", 1 << 14)
    seen: list[int] = []
    real_mm = torch.mm

    def spy(a, b, *args, **kwargs):
        seen.append(b.shape[1])
        return real_mm(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "mm", spy)
    layer = BlockLinear(quantize(torch.randn(300, 256), "q8_0"), "q8_0", 256)
    bm.block_matmul(torch.randn(40, 256), layer)
    assert sum(seen) == 300 and max(seen) < 300 and len(seen) > 1


@pytest.mark.parametrize("qtype", QTYPES)
def test_a_long_prompts_logits_stay_close_to_the_dequantized_model(qtype):
    """40 prompt tokens through every block matrix on tiles, against the same model computing in fp32 on its
    dequantized weights: bf16 rounds each weight and activation by ≤ 2⁻⁹ relative, which moves the logits by
    well under 2% of their spread (the int8 path moves them by the activation quantization, a few percent)."""
    ids = torch.randint(0, 300, (2, 40))
    plain, fast = _block_model(qtype, context_length=64), _block_model(qtype, context_length=64)
    _set_kernel(fast, bm.block_matmul)
    with torch.inference_mode():
        want, got = plain(ids), fast(ids)
    assert (got - want).abs().max() <= 0.02 * want.abs().max(), (got - want).abs().max() / want.abs().max()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for plain x86-64 targets")
@pytest.mark.parametrize("march", ["native", "x86-64-v3", "x86-64-v2"])  # AVX-512, AVX2, portable C
def test_tile_dequantization_matches_gguf_on_every_build(march, monkeypatch, kernel_builds, default_kernel):
    """A tile's fp32 rows equal the gguf package's dequantization to fp32 rounding (a product and a sum, 2⁻²³
    each); its bf16 rows are exactly those fp32 values rounded to nearest even."""
    monkeypatch.setenv("GEN_HOME", str(kernel_builds))  # each -march builds once per session; native: default_kernel
    monkeypatch.setattr(build, "FLAGS", tuple(f"-march={march}" if f == "-march=native" else f for f in build.FLAGS))
    build.library.cache_clear()
    try:
        lib = build.library()
        assert not isinstance(lib, str), lib
        for qtype in QTYPES:
            rows, cols = 7, 2 * 256
            blocks = _random_blocks(qtype, rows, cols, seed=3)
            want = _reference(blocks, qtype, cols)  # (rows, cols) float64
            slack = 2.0**-22 * want.abs() + 1e-30
            tiles = {}
            for dtype in (torch.float32, torch.bfloat16):
                out = tiles[dtype] = torch.empty(rows, cols, dtype=dtype)
                code = MATRIX_TYPES[qtype]
                bf16 = dtype == torch.bfloat16
                assert lib.gen_block_dequantize(blocks.data_ptr(), code, rows, cols, out.data_ptr(), bf16, 2) == 0
            assert ((tiles[torch.float32].double() - want).abs() <= slack).all(), qtype
            assert torch.equal(tiles[torch.bfloat16], tiles[torch.float32].to(torch.bfloat16)), qtype
    finally:
        build.library.cache_clear()
