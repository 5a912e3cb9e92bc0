"""Inference-only linear layers for the CPU: oneDNN (prepacked for decode, GEMM for prompts) and int8 weights."""

from __future__ import annotations

import os
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

# Narrower matrices (d_model 32-96, the tiny preset) run slower through oneDNN: its ~15 µs call overhead
# outweighs what it saves; every matrix of the small (288) and base (768) presets runs faster there.
PACK_MIN_IN_FEATURES = 256


# Inputs of at most this many rows (decode steps) take the prepacked weight; more rows (prompts, the
# no-cache path) take oneDNN's GEMM on the plain weight (`prompt_gemm`).
PACKED_MAX_ROWS = 16

# Prompt rows from which an fp32 GEMM goes to MKL (F.linear) on a CPU without AVX-512, where both libraries run
# AVX2 kernels: MKL's ran 1.05-1.2x oneDNN's at 256 and 512 rows and 1.4-1.6x at 192 and 384 (which oneDNN pads
# to a power of two), while oneDNN's led at 32-128 rows (Zen 3, 2 threads, 576-2048 wide matrices).
MKL_MIN_ROWS = 192


def mkldnn_ok() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) under which it has no native bf16 GEMM: the CPU may, but a user who caps
# oneDNN (to measure what an AVX2 machine does, say) gets what that machine would.
_NO_BF16_ISAS = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"})


@cache
def onednn_bf16() -> bool:
    """Whether oneDNN multiplies bf16 natively here: else it emulates bf16 (slower than fp32) or, on an AVX2-only
    CPU, cannot build a bf16 inner product at all."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in _NO_BF16_ISAS:
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def onednn_applies(weight: torch.Tensor) -> bool:
    """Whether oneDNN runs products with this (out, in) weight faster than F.linear (bf16 only where
    `onednn_bf16`)."""
    return (
        weight.device.type == "cpu"
        and (weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and onednn_bf16()))
        and weight.shape[1] >= PACK_MIN_IN_FEATURES
        and mkldnn_ok()
    )


@cache
def avx512() -> bool:
    """Whether PyTorch's CPU kernels run AVX-512 here (ATEN_CPU_CAPABILITY may cap them)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def prompt_gemm(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2 (M, in) @ weight (out, in)ᵀ -> (M, out) through oneDNN's GEMM, for prompt-sized M on the CPU; on a CPU
    without AVX-512, fp32 prompts of MKL_MIN_ROWS or more through F.linear (MKL).

    On an AVX-512 AMD CPU oneDNN runs 2-2.5x the FLOP rate of F.linear's MKL path, which keeps AVX2 kernels
    there (measured, M = 512: 327 vs 132 GFLOP/s for 768 -> 2304). oneDNN keeps a compiled kernel of about 1 MB
    per input shape it meets (200 row counts through one layer grew RSS by 200 MB), so rows are zero-padded to
    a power of two: at most log2(context) shapes per matrix, whatever the prompt lengths.
    """
    m = x2.shape[0]
    if m >= MKL_MIN_ROWS and weight.dtype == torch.float32 and not avx512():
        return F.linear(x2, weight)
    padded = 1 << (m - 1).bit_length()
    if padded != m:
        x2 = F.pad(x2, (0, 0, 0, padded - m))  # (padded, in)
    return torch.ops.mkldnn._linear_pointwise(x2, weight, None, "none", [], "")[:m]


class OneDNNLinear(nn.Module):
    """A CPU fp32/bf16 linear run by oneDNN: prompts through `prompt_gemm` on the plain weight and,
    with `pack_decode`, decode-sized inputs through a copy prepacked into oneDNN's blocked layout.

    The prepacking is what inductor's freezing does; one token then streams the weight 1.4-2.5x faster
    than F.linear on a plain (out, in) matrix. The native C step reads the plain weight itself, so a
    model that has it skips the packed copy (and its memory).
    """

    def __init__(self, weight: torch.Tensor, pack_decode: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight.detach())
        # An opaque oneDNN tensor, or None: decode rows then use F.linear.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, None) if pack_decode else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (B*T, in)
        if x2.shape[0] > PACKED_MAX_ROWS:
            y = prompt_gemm(x2, self.weight)
        elif self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, None, "none", [], "")
        else:
            y = F.linear(x2, self.weight)
        return y.view(*x.shape[:-1], self.out_features)  # (..., out)


class Int8Linear(nn.Module):
    """Weight-only int8 linear: W ≈ qweight × scale with one scale per output channel (row), symmetric.

    Activations stay in their floating dtype. A few rows (decode) use `torch._weight_int8pack_mm` on
    CPU, which dequantises inside the kernel so only int8 bytes stream from memory; many rows
    (prefill) dequantise the matrix once per call and run a dense GEMM, which is faster there.
    """

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,): the largest |w| of a row maps to 127
        qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.to(dtype))

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel effectively uses, (out, in), in the scale's dtype."""
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (B*T, in)
        if x.device.type == "cpu" and x2.shape[0] <= 8:
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scale)  # (B*T, out)
        else:
            dense = self.qweight.to(x.dtype)  # (out, in), scaled after the product
            # Under torch.compile `dense` is computed in the graph, not a frozen constant, and inductor
            # refuses oneDNN's op on it ("weight must be a graph constant"): its own GEMM runs instead.
            gemm = onednn_applies(dense) and not torch.compiler.is_compiling()
            y = (prompt_gemm(x2, dense) if gemm else F.linear(x2, dense)) * self.scale
        return y.view(*x.shape[:-1], self.out_features)  # (..., out)
