"""What bounds a decode step and a prefill: the machine's measured bandwidth and peak FLOP rate, and what
one token costs in bytes read and in FLOPs. The benchmarks measure the ceilings in the same run as the
speeds they divide, since this machine's bandwidth drifts by tens of percent over minutes."""

from __future__ import annotations

import statistics
import time

import torch

from gen_cli.model.config import ModelConfig
from gen_cli.model.transformer import Transformer
from gen_cli.quant.linear import Int8Linear, OneDNNLinear
from gen_cli.runtime import synchronize


def _best_seconds(op, device: torch.device, repeats: int = 5) -> float:  # type: ignore[no-untyped-def]
    op()  # warm-up: allocation, thread pool, packing
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        op()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_bandwidth(device: torch.device, mib: int = 256) -> float:
    """Memory bandwidth in bytes/s: the best of a timed large sum (read) and copy (read + write).

    On the CPU the buffer sits in 2 MB pages, as the native step's weights do, so the ceiling is
    not set by a slower page size than gen's own kernel streams from.
    """
    n = mib * 2**20 // 4
    if device.type == "cpu":
        from gen_cli.native.decoder import huge_page_arena

        src = huge_page_arena(4 * n).view(torch.float32)
        src.normal_()
    else:
        src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return max(moved / _best_seconds(op, device) for op, moved in ((src.sum, 4 * n), (lambda: dst.copy_(src), 8 * n)))


# The side of the square GEMM a peak rate is timed on: large enough that packing and thread start-up are a small
# share of it. The test suite shrinks it: where bf16 is emulated (no AVX-512) one 1024³ bf16 product takes a second.
PEAK_GEMM_N = 1024


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Operations/s of one square n×n GEMM in `dtype` (2n³, median of 5; n defaults to PEAK_GEMM_N): the rate
    PyTorch's best kernel reaches on this machine now, the ceiling a prefill's matmuls are measured against.
    torch.int8: int8 × int8 → int32 (torch._int_mm), the products block weights' int8 activations run."""
    n = n or PEAK_GEMM_N
    if dtype == torch.int8:
        a, b = (torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device) for _ in range(2))
        return 2 * n**3 / _best_seconds(lambda: torch._int_mm(a, b), device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / _best_seconds(lambda: a @ b, device)


def blended_peak(flops: dict[str, float], peaks: dict[str, float]) -> float:
    """The rate at which work split by kind as `flops` would run, each part at its kind's peak in `peaks` (same
    units): the whole over the sum of the parts' times. int8x2 runs two int8 rows per row: half int8's peak."""
    peak = {**peaks, "int8x2": peaks.get("int8", 0.0) / 2}
    if not flops or any(peak.get(kind, 0.0) <= 0 for kind in flops):
        return 0.0
    return sum(flops.values()) / sum(f / peak[kind] for kind, f in flops.items())


def weight_bytes_by_class(model: torch.nn.Module) -> dict[str, int]:
    """Bytes a decode step reads once per matrix class (attn qkv, attn out, mlp in, mlp out, lm head; embedding:
    one row): linears as stored, block-quantized ones by their blocks (a matrix held in parts of different types,
    each part's own). Names outside gen's classes (a transformers model) count as `other`."""
    from gen_cli.model.info import CLASSES

    out: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            nbytes = m.qweight.numel() + m.scale.numel() * m.scale.element_size()
        elif isinstance(m, torch.nn.Linear | OneDNNLinear):
            nbytes = m.weight.numel() * m.weight.element_size()
        elif hasattr(m, "qtype") and hasattr(m, "out_features"):  # a block-quantized linear: (out, row_bytes) uint8
            nbytes = m.blocks.numel()
        else:
            continue
        # the nearest enclosing name gen classifies: `layers.0.attn.wqkv.parts.1` is attn qkv
        cls = next((CLASSES[part] for part in reversed(name.split(".")) if part in CLASSES), "other")
        out[cls] = out.get(cls, 0) + nbytes
    if hasattr(model, "get_input_embeddings"):
        emb = model.get_input_embeddings().weight
        row = emb.shape[1] * emb.element_size()
    else:
        emb = model.tok_emb
        row = emb.blocks.shape[1] if hasattr(emb, "blocks") else emb.weight.shape[1] * emb.weight.element_size()
    return {"embedding": row, **out}


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of every matrix a decode step reads once: linears as stored (the head included), block-quantized
    ones by their blocks, and one embedding row (weight_bytes_by_class, summed)."""
    return sum(weight_bytes_by_class(model).values())


def kv_bytes_read(config: ModelConfig, dtype: torch.dtype, prompt: int, new_tokens: int) -> int:
    """KV-cache bytes one decode step reads, averaged over the run (the cache grows by one token a step)."""
    avg_len = prompt + new_tokens / 2
    return int(config.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size()) * avg_len)


def prefill_flops_per_token(model: Transformer, prompt_len: int) -> float:
    """FLOPs per prompt token of a prefill: 2 per weight of each layer's matrices, attention's QKᵀ and AV
    over the causal half of the prompt on average, and the head once for the whole prompt (last position)."""
    c = model.config
    layer_weights = sum(p.numel() for n, p in model.layers.named_parameters() if p.dim() == 2)
    attention = 2 * 2 * c.n_layer * c.n_head * c.head_dim * (prompt_len + 1) / 2
    head = 2 * c.vocab_size * c.d_model / prompt_len
    return 2 * layer_weights + attention + head


def dtype_kind(dtype: torch.dtype) -> str:
    """The peak a float product in `dtype` is measured against: bf16's, else fp32's."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def prefill_flops_by_kind(model: Transformer, flops_per_token: float, rows: int) -> dict[str, float]:
    """flops_per_token (prefill_flops_per_token's) split by what computes each part: the layers' block-weight
    matrices by their prompt_kind for `rows` activation rows a product (int8 products or a GEMM's dtype: the
    PyTorch path's prompt takes them all at once; the C step's products never take the tiles, as 1 row), the rest
    (float matrices, attention, the head's share) in the model's dtype."""
    from gen_cli.infer.optimize import activations
    from gen_cli.native.block_matmul import prompt_kind
    from gen_cli.native.build import library
    from gen_cli.quant.block_linear import BlockLinear

    rest = dtype_kind(model.norm.weight.dtype)
    lib, act = library(), activations(model) or "int8"
    out: dict[str, float] = {}
    for m in [] if isinstance(lib, str) else model.layers.modules():
        if isinstance(m, BlockLinear) and m.kernel is not None:
            kind = prompt_kind(lib, m, act, rows)
            out[kind] = out.get(kind, 0.0) + 2 * m.in_features * m.out_features
    out[rest] = out.get(rest, 0.0) + max(0.0, flops_per_token - sum(out.values()))
    return {kind: f for kind, f in out.items() if f > 0}
