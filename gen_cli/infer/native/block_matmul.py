"""Prompts through block-quantized matrices: Y = X Wᵀ read from the GGML blocks by the native kernel.

`block_matmul(x, layer)` is `BlockLinear.kernel` once `use_block_kernel(model)` (from optimize_for_decode)
sets it: the activations are quantized once (int8 blocks, as the decode step does) and the C kernel tiles
rows × tokens across threads, so no matrix is ever dequantized. Elsewhere (no compiler, not the CPU) the
layer's own fallback runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gen_cli.infer.native.abi import MATRIX_TYPES
from gen_cli.infer.native.build import library
from gen_cli.model.block_linear import BlockLinear


def block_matmul(x: torch.Tensor, layer: BlockLinear) -> torch.Tensor:
    """x (..., in_features) -> x Wᵀ (..., out_features) in x's dtype, without the bias."""
    lib = library()
    if isinstance(lib, str) or x.device.type != "cpu" or not layer.blocks.is_contiguous():
        return F.linear(x, layer.dequantized().to(x.dtype))  # (..., out)
    rows = x.reshape(-1, layer.in_features).to(torch.float32).contiguous()  # (n, in)
    y = torch.empty(rows.shape[0], layer.out_features)  # (n, out)
    code = MATRIX_TYPES[layer.qtype]
    failed = lib.gen_block_matmul(
        layer.blocks.data_ptr(), code, layer.out_features, layer.in_features,
        rows.data_ptr(), rows.shape[0], y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError(f"the native block matmul could not allocate its buffers for {rows.shape[0]} rows")
    return y.view(*x.shape[:-1], layer.out_features).to(x.dtype)


def use_block_kernel(model: nn.Module) -> int:
    """Route every CPU BlockLinear of `model` through `block_matmul` when the kernel builds here; how many."""
    if isinstance(library(), str):
        return 0
    layers = [m for m in model.modules() if isinstance(m, BlockLinear) and m.blocks.device.type == "cpu"]
    for layer in layers:
        layer.kernel = block_matmul
    return len(layers)
