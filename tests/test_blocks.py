"""GGML block formats (quant/blocks.py) against the gguf package, and the block layers (quant/block_linear.py)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gen_cli.errors import GenError
from gen_cli.quant.block_linear import BlockEmbedding, BlockLinear
from gen_cli.quant.blocks import dequantize, max_error, quantize
from gen_cli.quant.formats import BLOCK_TYPES, most_precise, row_bytes

GGML = {name: gguf.GGMLQuantizationType[name.upper()] for name in BLOCK_TYPES}
REFERENCE_QUANTIZERS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # the gguf package quantizes these; not the k-quants


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit, float32 arrays of one shape; NaN where the other has NaN (a NaN made by inf × 0
    carries whatever payload the library's arithmetic gives it: numpy's and torch's differ)."""
    nan = np.isnan(a)
    if a.shape != b.shape or not np.array_equal(nan, np.isnan(b)):
        return False
    return np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32))


def random_blocks(qtype: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random bytes in every field: every code, and fp16 scales of every kind (subnormal, inf, NaN)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (rows, row_bytes(qtype, cols)), dtype=torch.uint8, generator=g)


def test_types_match_ggml() -> None:
    for name, t in BLOCK_TYPES.items():
        assert t.ggml_id == int(GGML[name])
        assert (t.elems, t.nbytes) == gguf.GGML_QUANT_SIZES[GGML[name]]
    assert row_bytes("q4_k", 512) == 2 * 144 and row_bytes("q8_0", 64) == 68
    with pytest.raises(GenError, match="multiple of 256"):
        row_bytes("q6_k", 320)
    assert most_precise(["q4_0", "q6_k", "q4_k"]) == "q6_k" and most_precise(["q4_k", "q8_0"]) == "q8_0"
    assert most_precise(["q4_k", "q5_0"]) == "q5_0" and most_precise(["q5_0", "q5_1", "q4_1"]) == "q5_1"
    assert row_bytes("q5_0", 576) == 18 * 22 and row_bytes("q5_1", 64) == 48


@pytest.mark.parametrize("qtype", list(BLOCK_TYPES))
@pytest.mark.parametrize("seed", range(3))
def test_dequantize_equals_gguf_bit_exactly_on_random_bytes(qtype: str, seed: int) -> None:
    blocks = random_blocks(qtype, 7, 512, seed)
    ours = dequantize(blocks, qtype, 512).numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gguf.quants.dequantize(blocks.numpy(), GGML[qtype])
    assert same_bits(ours, ref)


@settings(max_examples=25, deadline=None)
@given(
    qtype=st.sampled_from(REFERENCE_QUANTIZERS),
    rows=st.integers(1, 5),
    blocks_per_row=st.integers(1, 4),
    scale=st.sampled_from([1e-6, 1e-3, 0.02, 1.0, 300.0]),
    seed=st.integers(0, 2**31 - 1),
    ties=st.booleans(),
)
def test_quantize_equals_gguf_bit_exactly(qtype, rows, blocks_per_row, scale, seed, ties) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 32 * blocks_per_row, generator=g) * scale
    if ties:  # values on rounding boundaries and repeated extremes: round-half-away and argmax's first pick
        w = torch.round(w / scale * 4) / 4 * scale
        w[:, 5] = -w[:, 3]
    ours = quantize(w, qtype).numpy()
    ref = gguf.quants.quantize(w.numpy(), GGML[qtype])
    assert ours.shape == ref.shape and np.array_equal(ours, ref)


@settings(max_examples=40, deadline=None)
@given(
    qtype=st.sampled_from(list(BLOCK_TYPES)),
    rows=st.integers(1, 4),
    blocks_per_row=st.integers(1, 3),
    scale=st.sampled_from([1e-5, 0.02, 1.0, 50.0]),
    offset=st.sampled_from([0.0, 1.0, -3.0]),
    seed=st.integers(0, 2**31 - 1),
    zero_block=st.booleans(),
)
def test_round_trip_within_the_bound_from_each_block_range(
    qtype, rows, blocks_per_row, scale, offset, seed, zero_block
) -> None:
    t = BLOCK_TYPES[qtype]
    cols = t.elems * blocks_per_row
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * scale + offset * scale
    if zero_block:
        w[0, : t.elems] = 0
    back = dequantize(quantize(w, qtype), qtype, cols)
    err = (back - w).abs()
    bound = max_error(w, qtype)
    assert (err <= bound).all(), f"worst error {(err / bound).max():.3f}× the bound"
    if zero_block:
        assert (back[0, : t.elems] == 0).all()
    # The bound is a fraction of each block's range (q8_0: half a step, a/254, plus the fp16 rounding of d,
    # a/2048), so the whole matrix is close in relative terms
    # where the scales are normal fp16 numbers (tiny weights get fp16's subnormal grain, in GGML too).
    if scale < 0.02:
        return
    rel = {"q8_0": 1 / 220, "q6_k": 1 / 60, "q4_0": 1 / 7, "q4_1": 1 / 14, "q4_k": 1 / 13, "q5_0": 1 / 15}
    rel["q5_1"], rel["q5_k"] = 1 / 28, 1 / 26
    assert err.max() <= w.abs().amax() * rel[qtype]


def test_k_quants_read_back_by_gguf() -> None:
    # Our own q4_k/q5_k/q6_k blocks are valid GGML: the gguf package decodes them to our values.
    w = torch.randn(6, 512, generator=torch.Generator().manual_seed(1)) * 0.05
    for qtype in ("q4_k", "q5_k", "q6_k"):
        blocks = quantize(w, qtype)
        assert same_bits(gguf.quants.dequantize(blocks.numpy(), GGML[qtype]), dequantize(blocks, qtype, 512).numpy())


def test_quantize_refuses_bad_input() -> None:
    with pytest.raises(GenError, match="multiple of 32"):
        quantize(torch.zeros(2, 48), "q8_0")
    with pytest.raises(GenError, match="inf or NaN"):
        quantize(torch.full((1, 32), float("nan")), "q4_0")
    with pytest.raises(GenError, match="unknown block type"):
        quantize(torch.zeros(1, 32), "q3_k")


@pytest.mark.parametrize("qtype", list(BLOCK_TYPES))
def test_block_linear_equals_linear_on_its_dequantized_weight(qtype: str) -> None:
    g = torch.Generator().manual_seed(2)
    w, bias = torch.randn(48, 256, generator=g) * 0.1, torch.randn(48, generator=g)
    layer = BlockLinear.from_weight(w, qtype, bias)
    assert layer.blocks.dtype == torch.uint8 and layer.blocks.shape == (48, row_bytes(qtype, 256))
    assert layer.weight_bytes == 48 * row_bytes(qtype, 256)
    x = torch.randn(2, 3, 256, generator=g)
    ref = F.linear(x, dequantize(layer.blocks, qtype, 256), bias)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)
    # A kernel replaces the product (not the bias): the infer layer's native matmul plugs in here.
    calls = []
    layer.kernel = lambda x, lin: calls.append(lin) or F.linear(x, lin.dequantized())
    torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=1e-6)
    assert calls == [layer]
    assert not any(p.is_floating_point() and p.numel() >= w.numel() for p in layer.buffers())  # no fp32 copy


def test_block_embedding_looks_up_dequantized_rows_and_ties_the_head() -> None:
    g = torch.Generator().manual_seed(3)
    table = torch.randn(40, 64, generator=g)
    emb = BlockEmbedding(quantize(table, "q8_0"), "q8_0", 64)
    ids = torch.tensor([[3, 0, 39], [7, 7, 1]])
    full = dequantize(emb.blocks, "q8_0", 64)
    assert torch.equal(emb(ids), full[ids])
    head = emb.tied_head()
    assert head.blocks.data_ptr() == emb.blocks.data_ptr()  # shared, not copied
    x = torch.randn(2, 64, generator=g)
    torch.testing.assert_close(head(x), x @ full.T, rtol=0, atol=0)
    emb = emb.to(torch.bfloat16)
    assert emb(ids).dtype == torch.bfloat16 and emb.blocks.dtype == torch.uint8
