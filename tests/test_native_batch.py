"""The int8 block kernels on several activation rows at once (blocks_batch.h: each weight group unpacked once for
up to 8 rows), through gen_block_matmul, which shares the decode step's block_rows_int8.

Oracle: the activations quantized in PyTorch exactly as the kernel does (per block, d = max|x| / 127, round half
to even), times the gguf package's dequantized weights in float64. The kernel's integer block sums are exact, so
the two agree to fp32 rounding of the scaling and summing.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil

import pytest
import torch
from test_native_blocks import QTYPES, _group, _random_blocks, _reference

from gen_cli.native import build
from gen_cli.native import decoder as native
from gen_cli.native.abi import ACT_MODES, MATRIX_TYPES

pytestmark = [
    pytest.mark.skipif(shutil.which(shlex.split(os.environ.get("CC", "cc"))[0]) is None, reason="no C compiler"),
    pytest.mark.skipif(native.native_status() != "ready", reason="needs the compiled kernel"),
]
BATCHES = (1, 2, 3, 4, 5, 7, 8, 16, 33)  # ragged against the kernel's 8 rows per pass
# 96: no whole group of 4 blocks (tails only); 576 and 608: groups then 2 or 3 tail blocks; 1536: whole groups;
# 4160: column chunks (blocks_batch.h's CHUNK_BYTES) and a tail (the k-quants: 2560, two chunks)
COLS_32 = (96, 576, 608, 1536, 4160)


def _matmul(
    x: torch.Tensor, blocks: torch.Tensor, qtype: str, rows: int, threads: int = 2, act: str = "int8"
) -> torch.Tensor:
    """x (n, cols) -> (n, rows) through the integer kernel, whatever n (block_matmul sends n >= 32 to its GEMM)."""
    lib = build.library()
    n, cols = x.shape
    x = x.float().contiguous()
    y = torch.full((n, rows), float("nan"))
    failed = lib.gen_block_matmul(
        blocks.data_ptr(), MATRIX_TYPES[qtype], rows, cols, x.data_ptr(), n, y.data_ptr(), threads, ACT_MODES[act]
    )
    assert not failed
    return y


def _oracle(x: torch.Tensor, w: torch.Tensor, qtype: str) -> torch.Tensor:
    """x quantized per block as the kernel does, times w (rows, cols) float64: (n, rows)."""
    g = _group(qtype)
    blocks = x.float().reshape(x.shape[0], -1, g)  # (n, cols / g, g)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127).div(amax), 0)  # one fp32 division, as in C
    q = torch.round(blocks * inv)
    return (q.double() * (amax.double() / 127)).reshape(x.shape) @ w.T


def _case(qtype: str, rows: int, cols: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    blocks = _random_blocks(qtype, rows, cols, seed=seed)
    x = torch.randn(n, cols) * torch.rand(1, cols) * 3  # uneven magnitudes: the block scales matter
    return blocks, x, _reference(blocks, qtype, cols)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("cols", COLS_32)
@pytest.mark.parametrize("n", BATCHES)
def test_batch_kernel_equals_the_quantized_oracle(qtype, cols, n):
    if cols % _group(qtype):
        cols = 512 if cols < 1536 else 2560  # the k-quants: whole super-blocks
    rows = 37  # a last row block of 1
    blocks, x, w = _case(qtype, rows, cols, n, seed=n + cols)
    got, want = _matmul(x, blocks, qtype, rows).double(), _oracle(x, w, qtype)
    tol = 2e-6 * (x.double().abs() @ w.abs().T) + 1e-6
    assert ((got - want).abs() <= tol).all(), (got - want).abs().max()


@pytest.mark.parametrize("qtype", QTYPES)
def test_a_row_gets_the_same_bits_in_any_batch_and_alone_within_rounding(qtype):
    """Batched decode gives each sequence the same bits in every batch of 2 or more (each row's sums run in one
    fixed order); a lone row runs the one-row kernel: the same integer sums, fp32 sums in another order."""
    cols = 576 if _group(qtype) == 32 else 512
    blocks, x, _ = _case(qtype, 12, cols, 33, seed=3)
    together = _matmul(x, blocks, qtype, 12)
    for n in (2, 5, 9):
        assert torch.equal(_matmul(x[:n], blocks, qtype, 12), together[:n])
    assert torch.equal(_matmul(x[20:22], blocks, qtype, 12, threads=1), together[20:22])
    alone = _matmul(x[:1], blocks, qtype, 12)
    assert (alone - together[:1]).abs().max() <= 1e-5 * together[:1].abs().max()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for plain x86-64 targets")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64-v2"])  # AVX2, then no vector ISA (portable C)
def test_the_one_row_fallbacks_equal_the_batch_kernel(march, fresh_library, monkeypatch, kernel_builds):
    """Without AVX-512 every activation row runs the one-row dots (on AVX2 Q6_K its own batch kernel): the same
    integer sums as the AVX-512 batch kernel."""
    cases = {}
    for q in QTYPES:
        cols = 608 if _group(q) == 32 else 512
        blocks, x, w = _case(q, 21, cols, 11, seed=7)
        cases[q] = (blocks, x, w, _matmul(x, blocks, q, 21))  # built for this CPU (the batch kernel here)
    monkeypatch.setenv("GEN_HOME", str(kernel_builds))  # each -march builds once per session
    monkeypatch.setattr(build, "FLAGS", tuple(f"-march={march}" if f == "-march=native" else f for f in build.FLAGS))
    build.library.cache_clear()
    assert native.native_status() == "ready"
    for q, (blocks, x, w, want) in cases.items():
        got = _matmul(x, blocks, q, 21)
        tol = 2e-6 * (x.double().abs() @ w.abs().T) + 1e-6
        assert ((got - want).double().abs() <= tol).all(), q
    # Q6_K's AVX2 batch kernel: the oracle over column chunks and a tail, and a row's bits in any batch of 2 or more.
    blocks, x, w = _case("q6_k", 13, 2816, 11, seed=8)
    together = _matmul(x, blocks, "q6_k", 13)
    tol = 2e-6 * (x.double().abs() @ w.abs().T) + 1e-6
    assert ((together.double() - _oracle(x, w, "q6_k")).abs() <= tol).all()
    assert all(torch.equal(_matmul(x[:n], blocks, "q6_k", 13), together[:n]) for n in (2, 3, 9))


@pytest.mark.parametrize("threads", [1, 2])
def test_q6_k_batches_in_lanes_and_in_the_tile_agree_bit_for_bit(threads):
    """Q6_K batches of 6 rows or more go through lanes (blocks_q6k16.h: 16 stored rows transposed per super-block;
    up to 8 rows in one pass that unpacks as it goes, more unpacked once per group), smaller ones through the one-row
    tile. Each row's integer sums and chain of FMAs are the same in both. 37 rows: two whole groups of 16 and a short
    one; 7680 columns: 30 super-blocks, two of the tile's column chunks at 2 rows, three at 5."""
    blocks, x, w = _case("q6_k", 37, 7680, 20, seed=11)
    together = _matmul(x, blocks, "q6_k", 37, threads)
    tol = 2e-6 * (x.double().abs() @ w.abs().T) + 1e-6
    assert ((together.double() - _oracle(x, w, "q6_k")).abs() <= tol).all()
    for n in (2, 5, 6, 8, 9):
        assert torch.equal(_matmul(x[:n], blocks, "q6_k", 37, threads), together[:n]), n


@pytest.mark.parametrize("codes", [0x00, 0xFF])  # every q at -32, or at 31
def test_q6_k_lanes_hold_the_largest_sums_exactly(codes):
    """Codes at either end, every scale at -128, activations at ±127: each super-block's integer sum at its largest
    (256 x 32 x 128 x 127 < 2^31), in the lanes (9 activation rows) and the tile (4) alike."""
    rows, cols = 16, 512
    raw = torch.full((rows, cols // 256, 210), codes, dtype=torch.uint8)
    raw[..., 192:208] = 0x80  # int8 -128
    raw[..., 208:210] = torch.tensor([0x00, 0x3C], dtype=torch.uint8)  # fp16 1.0
    blocks = raw.reshape(rows, -1)
    w = _reference(blocks, "q6_k", cols)
    x = torch.ones(9, cols)
    x[1::2] *= -1  # rows of +1 and of -1: every activation quantizes to ±127
    want = _oracle(x, w, "q6_k")
    assert torch.equal(_matmul(x, blocks, "q6_k", rows).double(), want)
    assert torch.equal(_matmul(x[:4], blocks, "q6_k", rows).double(), want[:4])
