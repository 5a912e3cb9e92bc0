"""A prompt's causal attention on gen's C kernel (prompt_attention.c): the `fused` implementation on the CPU.

PyTorch's CPU flash kernel takes keys 512 at a time, so up to 512 tokens it computes a causal prompt's
masked half too; gen's kernel reads only the key tiles up to each query tile's last position, with 6 x 16
register tiles in its products. Measured on the 2-core AVX2 machine (fp32, 2 threads, against
`F.scaled_dot_product_attention(is_causal=True)`, heads of 64 and 128, GQA and MHA): 1.58-1.84x at 512
tokens, 1.02-1.77x at 1-2k, 1.13-1.46x at 4-8k. `Transformer.causal_kernel` is `causal_attention` once
`use_prompt_attention(model)` (from optimize_for_decode) sets it; the model calls it from
model.attention.KERNEL_MIN_QUERIES queries.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gen_cli.native.build import library


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float | None
) -> torch.Tensor | None:
    """softmax(q kᵀ scale, causal) v for q (B, n_head, T, hd) at positions start … start+T-1 over k, v
    (B, n_kv_head, start+T, hd): (B, n_head, T, hd), or None where the kernel does not apply (not CPU fp32,
    autograd recording, a layout it does not read, no kernel here): the caller runs SDPA instead."""
    lib = library()
    B, H, T, hd = q.shape
    if (
        isinstance(lib, str)
        or any(t.device.type != "cpu" or t.dtype != torch.float32 or t.stride(-1) != 1 for t in (q, k, v))
        or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
        or k.shape != v.shape
        or k.shape[2] != start + T
        or k.shape[-1] != hd
    ):
        return None
    out = torch.empty(B, T, H, hd)  # (B, T, n_head, hd): the layout the output projection reads, no copy
    failed = lib.gen_causal_attention(
        q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
        k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
        v.data_ptr(), v.stride(0), v.stride(1), v.stride(2),
        out.data_ptr(), out.stride(0), out.stride(2), out.stride(1),
        B, H, k.shape[1], T, start, hd, scale if scale is not None else 1 / math.sqrt(hd), torch.get_num_threads(),
    )  # fmt: skip
    return None if failed else out.transpose(1, 2)


def use_prompt_attention(model: nn.Module) -> None:
    """Compute `model`'s causal prompts with `causal_attention` under the `fused` implementation, when the
    kernel builds here."""
    if not isinstance(library(), str):
        model.causal_kernel = causal_attention
