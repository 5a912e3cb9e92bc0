"""Prompts through block-quantized matrices: Y = X Wᵀ read from the GGML blocks, no matrix ever dequantized whole.

`block_matmul(x, layer)` is `BlockLinear.kernel` once `use_block_kernel(model)` (from optimize_for_decode)
sets it. A few tokens (decode-sized batches) go to the C kernel: activations quantized to int8 blocks, one
integer dot product per (row, token), each weight byte read once. A prompt (≥ TILE_MIN_TOKENS tokens) is a
GEMM: the C side dequantizes one L2-sized row tile at a time into a scratch (bf16 where the CPU multiplies
bf16, else fp32) and PyTorch's GEMM (oneDNN) multiplies every token by it, writing that tile's columns of Y;
dequantizing costs a few percent of the GEMM's time, and a GEMM runs near the CPU's peak while the dot-product
kernel re-reads each weight tile per token tile. Matrices held 16 rows interleaved (blocks_x16.h, blocks_k16.h) are
the exception: their int8 kernel unpacks each group once for 8 tokens and outran the tiles' GEMM at every prompt
length (1.3-1.5x at 512 tokens, 2x at 64; one thread, 2026-12-06), so with int8 activations a prompt runs it too;
so do Q6_K's, which AVX-512 builds transpose into the same lanes as they go (blocks_q6k16.h, gen_block_lanes).
Elsewhere (no compiler, not the CPU) the layer's own fallback runs.

The activation precision (`act`, abi.py's ACT_MODES) changes both paths: int8 as above; bf16: the few-token
kernel multiplies blocks unpacked to fp32 by activations rounded to bf16, a prompt's GEMM runs on bf16 tiles as
for int8; fp32: the few-token kernel multiplies fp32 activations as they are, a prompt's GEMM runs on fp32 tiles
(the blocks' exact values): the same sums as dequantize-then-fp32, to fp32 rounding; int8x2: the int8 kernel on
each row and the int8 rounding of what that row's rounding missed (twice the rows, the weights read once), its
prompts in lanes as int8's, else on fp32 tiles.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from gen_cli.native.abi import ACT_MODES, INTEGER_ACTS, MATRIX_TYPES
from gen_cli.native.build import library
from gen_cli.quant.block_linear import BlockLinear
from gen_cli.quant.linear import onednn_bf16

# From this many tokens on, row tiles are dequantized into a scratch and multiplied by PyTorch's GEMM; below it
# the int8 kernel, which reads each weight byte once, wins: dequantizing costs the same for 8 tokens as for 512
# (measured on the 135M shape: even at 32 tokens, 1.5x at 64, 2-3x at 512).
TILE_MIN_TOKENS = 32
# A tile's scratch. bf16 tiles of 512 KiB to 2 MiB measured alike at 512 tokens (AVX-512); fp32 ones (a CPU
# without native bf16) of 1 MiB left a 8192-wide matrix 32 rows a GEMM, and 8 MiB ran a 1B Q5_K_M file's prompt
# at 1.1x their speed (67-69 against 62 tok/s at 512 tokens, alternating, AVX2): fewer, wider GEMMs.
TILE_BYTES = 8 << 20
TILE_DTYPE = torch.bfloat16  # bf16 GEMM (avx512_bf16 through oneDNN) where the CPU has it, else fp32
TILE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # prompt_kind's names of the tiles' GEMM dtypes


def block_matmul(x: torch.Tensor, layer: BlockLinear, act: str = "int8") -> torch.Tensor:
    """x (..., in_features) -> x Wᵀ (..., out_features) in x's dtype, without the bias; `act`: the activations'
    precision in the products (abi.py's ACT_MODES)."""
    lib = library()
    if isinstance(lib, str) or x.device.type != "cpu" or not layer.blocks.is_contiguous():
        return F.linear(x, layer.dequantized().to(x.dtype))  # (..., out)
    rows = x.reshape(-1, layer.in_features).to(torch.float32).contiguous()  # (n, in)
    kind = prompt_kind(lib, layer, act, rows.shape[0])
    if rows.shape[0] >= TILE_MIN_TOKENS and kind in TILE_DTYPES:
        y = _tiled(lib, rows, layer, TILE_DTYPES[kind])
    else:
        y = torch.empty(rows.shape[0], layer.out_features)  # (n, out)
        failed = lib.gen_block_matmul(
            layer.blocks.data_ptr(), MATRIX_TYPES[layer.native_type], layer.out_features, layer.in_features,
            rows.data_ptr(), rows.shape[0], y.data_ptr(), torch.get_num_threads(), ACT_MODES[act],
        )  # fmt: skip
        if failed:
            raise MemoryError(f"the native block matmul could not allocate its buffers for {rows.shape[0]} rows")
    return y.view(*x.shape[:-1], layer.out_features).to(x.dtype)


def prompt_in_lanes(lib: ctypes.CDLL, layer: BlockLinear) -> bool:
    """Whether the integer kernel multiplies a prompt by this layer in vector lanes (16 rows interleaved, or Q6_K
    where the build transposes it as it goes), which outruns the tiles' GEMM."""
    return layer.interleaved or bool(lib.gen_block_lanes(MATRIX_TYPES[layer.native_type]))


def prompt_kind(lib: ctypes.CDLL, layer: BlockLinear, act: str, rows: int) -> str:
    """What `rows` activation rows' product with this layer computes in (block_matmul's choice): "int8" or "int8x2"
    (the integer kernel: one or two int8 rows per activation row), else "fp32" (the few-token kernel's float
    products) or the dtype of the tiles' GEMM ("bf16", "fp32"). The peak a prompt through it is measured against."""
    if act in INTEGER_ACTS and (rows < TILE_MIN_TOKENS or prompt_in_lanes(lib, layer)):
        return act
    tiles_bf16 = rows >= TILE_MIN_TOKENS and act in ("int8", "bf16") and tile_dtype() == torch.bfloat16
    return "bf16" if tiles_bf16 else "fp32"


def tile_dtype() -> torch.dtype:
    """The dtype a prompt's GEMMs on block weights compute in here (their FLOP ceiling's dtype)."""
    return TILE_DTYPE if onednn_bf16() else torch.float32


def _tiled(lib: ctypes.CDLL, x: torch.Tensor, layer: BlockLinear, dtype: torch.dtype) -> torch.Tensor:
    """x (n, in) fp32 -> x Wᵀ (n, out) fp32: W dequantized a row tile at a time (to `dtype`, the GEMM's), never as
    a whole matrix."""
    cols, out_rows = layer.in_features, layer.out_features
    tile = max(16, min(out_rows, TILE_BYTES // (cols * dtype.itemsize)))
    if layer.interleaved:  # whole groups of 16 rows (out_rows is a multiple of 16)
        tile = max(16, tile // 16 * 16)
    scratch = torch.empty(tile, cols, dtype=dtype)  # (tile, in)
    xs = x.to(dtype)  # (n, in)
    y = torch.empty(x.shape[0], out_rows, dtype=dtype)  # (n, out)
    blocks, rb, threads = layer.blocks, layer.blocks.shape[1], torch.get_num_threads()
    code = MATRIX_TYPES[layer.native_type]
    for r0 in range(0, out_rows, tile):
        r1 = min(out_rows, r0 + tile)
        w = scratch[: r1 - r0]  # (r1 - r0, in)
        bf16 = dtype == torch.bfloat16
        lib.gen_block_dequantize(blocks.data_ptr() + r0 * rb, code, r1 - r0, cols, w.data_ptr(), bf16, threads)
        torch.mm(xs, w.t(), out=y[:, r0:r1])  # a column slice: the GEMM writes it in place with its row stride
    return y.float()


def block_kernel(act: str = "int8") -> Callable[[torch.Tensor, BlockLinear], torch.Tensor]:
    """`block_matmul` with the activation precision `act` (abi.py's ACT_MODES)."""
    if act not in ACT_MODES:
        raise ValueError(f"unknown activation precision {act!r}")
    return block_matmul if act == "int8" else partial(block_matmul, act=act)


def use_block_kernel(model: nn.Module, act: str = "int8") -> int:
    """Route every CPU BlockLinear of `model` through `block_matmul` (activations in `act`) when the kernel builds
    here; how many."""
    if isinstance(library(), str):
        return 0
    layers = [m for m in model.modules() if isinstance(m, BlockLinear) and m.blocks.device.type == "cpu"]
    kernel = block_kernel(act)
    for layer in layers:
        layer.kernel = kernel
    return len(layers)
