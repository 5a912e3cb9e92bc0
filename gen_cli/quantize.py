"""Inference-only fast paths: fused MLP, the native C decode step, oneDNN for CPU products, weight-only
int8, torch.compile.

`optimize_for_decode(model, quantize=..., compile=..., native=...)` turns a trained or random
`Transformer` into an inference-only one (its state_dict changes: w1/w3 become w13, int8 layers hold
`qweight`/`scale`). Call it after `.to(device, dtype)`; generation code is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gen_cli.errors import UsageError
from gen_cli.model import Transformer

QUANTIZE_MODES = ("none", "int8")
# Narrower matrices (d_model 32-96, the tiny preset) run slower through oneDNN: its ~15 µs call overhead
# outweighs what it saves; every matrix of the small (288) and base (768) presets runs faster there.
PACK_MIN_IN_FEATURES = 256
# Inputs of at most this many rows (decode steps) take the prepacked weight; more rows (prompts, the
# no-cache path) take oneDNN's GEMM on the plain weight (`prompt_gemm`).
PACKED_MAX_ROWS = 16


def _mkldnn_ok() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _onednn_applies(weight: torch.Tensor) -> bool:
    """Whether oneDNN runs products with this (out, in) weight faster than F.linear."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and weight.shape[1] >= PACK_MIN_IN_FEATURES
        and _mkldnn_ok()
    )


def prompt_gemm(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2 (M, in) @ weight (out, in)ᵀ -> (M, out) through oneDNN's GEMM, for prompt-sized M on the CPU.

    On this AVX-512 AMD CPU it runs 2-2.5x the FLOP rate of F.linear's MKL path (measured, M = 512:
    327 vs 132 GFLOP/s for 768 -> 2304). oneDNN keeps a compiled kernel of about 1 MB per input shape
    it meets (200 row counts through one layer grew RSS by 200 MB), so rows are zero-padded to a power
    of two: at most log2(context) shapes per matrix, whatever the prompt lengths.
    """
    m = x2.shape[0]
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
            y = (prompt_gemm(x2, dense) if _onednn_applies(dense) else F.linear(x2, dense)) * self.scale
        return y.view(*x.shape[:-1], self.out_features)  # (..., out)


def _linears(model: Transformer) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, module) for every nn.Linear, so it can be swapped in place."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found.append((parent, name, child))
    return found


def _untie(model: Transformer) -> None:
    if model.config.tie_embeddings:
        # The embedding keeps its float table (a lookup reads one row); the head gets its own copy.
        model.tok_emb.weight = nn.Parameter(model.tok_emb.weight.detach().clone(), requires_grad=False)


def _to_onednn(model: Transformer, pack_decode: bool) -> None:
    """Replace every wide enough CPU linear by a OneDNNLinear sharing its weight (a tied head stays tied)."""
    for parent, name, lin in _linears(model):
        if _onednn_applies(lin.weight):
            setattr(parent, name, OneDNNLinear(lin.weight, pack_decode))


def quantize_int8(model: Transformer) -> Transformer:
    """Replace every linear (the lm head included) by an Int8Linear in the model's dtype; in place."""
    _untie(model)
    for parent, name, lin in _linears(model):
        setattr(parent, name, Int8Linear(lin.weight, lin.weight.dtype))  # built on the weight's device
    return model


def int8_activation_dtype(device: torch.device, native: bool = True) -> str:
    """The dtype int8-weight models compute in: fp32 through the native CPU step, else bfloat16.

    PyTorch's own CPU int8 kernel is ~20x slower with fp32 activations than with bf16 ones, so
    without the native step (`native=False`, or none on this machine) int8 computes in bfloat16.
    """
    if native and device.type == "cpu":
        from gen_cli.native import native_status

        if native_status() == "ready":
            return "float32"
    return "bfloat16"


def compile_model(model: Transformer) -> Transformer:
    """Compile the model's forward with torch.compile (inductor); on CPU with weight freezing."""
    import torch._inductor.config as inductor_config

    if next(model.parameters()).device.type == "cpu":
        # Freezing folds the (constant) weights into the graph so inductor can prepack them for its GEMMs.
        inductor_config.freezing = True
    model.forward = torch.compile(model.forward, dynamic=None)
    return model


def optimize_for_decode(
    model: Transformer, quantize: str = "none", compile: bool = False, native: bool = True
) -> Transformer:
    """Make `model` inference-only and fast: fuse w1/w3, int8 weights, then the fastest decode path.

    On the CPU, for fp32 (or int8-weight) and bf16 models, that is the native C step (`gen_cli/native.py`)
    when this machine can compile it; otherwise oneDNN-prepacked weights, or torch.compile when asked.
    fp32 results equal the unoptimised model's within float rounding; bf16 and int8 change them
    (measured by `gen bench decode`). Call it after `.to(device, dtype)`: the native step points at the
    weights as they are then.
    """
    if quantize not in QUANTIZE_MODES:
        raise UsageError(f"unknown --quantize {quantize!r}; choose {', '.join(QUANTIZE_MODES)}")
    model.eval().requires_grad_(False)
    for layer in model.layers:
        if "w13" not in layer.mlp._modules:
            layer.mlp.fuse()
    if quantize == "int8":
        quantize_int8(model)
    if compile:
        return compile_model(model)
    native_step = False
    if native:
        from gen_cli.native import NativeDecoder

        native_step = NativeDecoder.attach(model) is None
    if quantize == "none" and _onednn_applies(model.lm_head.weight):
        _to_onednn(model, pack_decode=not native_step)  # the native step reads the plain weights itself
    return model
