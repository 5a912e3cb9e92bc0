"""KV element kinds: full-precision storage, int8 (one scale per token per head) and int4 (groups of 32).

One `KVSide` holds one layer's K or V in its stored form; `write` quantizes new tokens, `read` returns
the dequantized prefix for attention. A run-time choice, never part of ModelConfig.
"""

from __future__ import annotations

import torch

from gen_cli.errors import UsageError
from gen_cli.model.config import ModelConfig

FLOAT_KINDS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KV_KINDS = (*FLOAT_KINDS, "int8", "int4")
INT4_GROUP = 32  # values per int4 scale/zero pair, along head_dim (as llama.cpp's q4_1 block)
_SHORT = {"32": "fp32", "16": "fp16", "8": "int8", "4": "int4"}


def kind_of(dtype: torch.dtype) -> str:
    """The kind that stores `dtype` unquantized."""
    return next(name for name, dt in FLOAT_KINDS.items() if dt == dtype)


def parse_kv_kinds(spec: str) -> tuple[str, str]:
    """`int8` → (int8, int8); `k8v4` → (int8, int4): the (K, V) kinds a spec names."""
    spec = spec.strip().lower()
    if spec in KV_KINDS:
        return spec, spec
    if spec.startswith("k") and "v" in spec:
        k, v = spec[1:].split("v", 1)
        k, v = _SHORT.get(k, k), _SHORT.get(v, v)
        if k in KV_KINDS and v in KV_KINDS:
            return k, v
    raise UsageError(
        f"unknown KV cache kind {spec!r}: use one of {', '.join(KV_KINDS)} or a K/V pair such as k8v4",
        params=("kv_dtype",),
    )


def check_kind(config: ModelConfig, kind: str) -> None:
    """Refuse a kind this model's head size cannot store."""
    if kind not in KV_KINDS:
        raise UsageError(f"unknown KV cache kind {kind!r}: use one of {', '.join(KV_KINDS)}", params=("kv_dtype",))
    if kind == "int4" and config.head_dim % INT4_GROUP:
        raise UsageError(
            f"int4 KV needs head_dim to be a multiple of {INT4_GROUP}, got {config.head_dim}: use int8",
            params=("kv_dtype",),
        )


def bytes_per_head_token(kind: str, head_dim: int) -> int:
    """Bytes one token of one KV head costs in `kind`, scales and zero points included."""
    if kind in FLOAT_KINDS:
        return head_dim * torch.empty((), dtype=FLOAT_KINDS[kind]).element_size()
    if kind == "int8":
        return head_dim + 4  # int8 values + one fp32 scale
    return head_dim // 2 + 2 * 4 * (head_dim // INT4_GROUP)  # two values a byte + fp32 scale, zero per group


class KVSide:
    """One layer's K or V, (B, n_kv_head, max_tokens, head_dim) logically, in its stored form."""

    def __init__(
        self, kind: str, shape: tuple[int, int, int, int], compute: torch.dtype, device: torch.device | str
    ) -> None:
        self.kind, self.compute = kind, compute
        B, H, T, D = shape
        # zeros, not empty: the memory is really committed, so measured RSS matches `nbytes`.
        if kind in FLOAT_KINDS:
            self.tensors = [torch.zeros(shape, dtype=FLOAT_KINDS[kind], device=device)]
        elif kind == "int8":
            self.tensors = [
                torch.zeros(shape, dtype=torch.int8, device=device),
                torch.zeros(B, H, T, 1, dtype=torch.float32, device=device),  # scale per token per head
            ]
        else:
            G = D // INT4_GROUP
            self.tensors = [
                torch.zeros(B, H, T, D // 2, dtype=torch.uint8, device=device),  # two 4-bit values per byte
                torch.zeros(B, H, T, G, dtype=torch.float32, device=device),  # scale per group
                torch.zeros(B, H, T, G, dtype=torch.float32, device=device),  # zero point (group minimum)
            ]

    @property
    def data(self) -> torch.Tensor:
        return self.tensors[0]

    def write(self, pos: int, x: torch.Tensor) -> None:
        """Store x (B, n_kv_head, T, head_dim) at [pos:pos+T], quantizing it if the kind says so."""
        end = pos + x.shape[2]
        if self.kind in FLOAT_KINDS:
            self.data[:, :, pos:end] = x
        elif self.kind == "int8":
            xf = x.float()
            # Symmetric: the largest |value| of the token's head maps to 127.
            scale = xf.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127  # (B, H, T, 1)
            self.tensors[0][:, :, pos:end] = (xf / scale).round().clamp(-127, 127).to(torch.int8)
            self.tensors[1][:, :, pos:end] = scale
        else:
            B, H, T, D = x.shape
            g = x.float().reshape(B, H, T, D // INT4_GROUP, INT4_GROUP)  # (B, H, T, G, 32)
            lo, hi = g.amin(-1), g.amax(-1)  # (B, H, T, G)
            scale = ((hi - lo) / 15).clamp_min(1e-12)
            q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(B, H, T, D)
            self.tensors[0][:, :, pos:end] = q[..., 0::2] | (q[..., 1::2] << 4)  # (B, H, T, D/2)
            self.tensors[1][:, :, pos:end] = scale
            self.tensors[2][:, :, pos:end] = lo

    def read(self, end: int) -> torch.Tensor:
        """Tokens [0:end] as (B, n_kv_head, end, head_dim) in the compute dtype; a view when stored so."""
        if self.kind in FLOAT_KINDS:
            view = self.data[:, :, :end]
            return view if view.dtype == self.compute else view.to(self.compute)
        if self.kind == "int8":
            q, scale = self.tensors[0][:, :, :end], self.tensors[1][:, :, :end]
            return (q.float() * scale).to(self.compute)
        packed, scale, zero = (t[:, :, :end] for t in self.tensors)
        B, H, T, half = packed.shape
        q = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(B, H, T, 2 * half // INT4_GROUP, INT4_GROUP)
        x = q.float() * scale[..., None] + zero[..., None]  # (B, H, T, G, 32)
        return x.reshape(B, H, T, 2 * half).to(self.compute)

    def first_row(self) -> KVSide:
        """A view of row 0 only, sharing storage."""
        view = KVSide.__new__(KVSide)
        view.kind, view.compute = self.kind, self.compute
        view.tensors = [t[:1] for t in self.tensors]  # (1, ...) views of the same memory
        return view

    def replicate_first_row(self, pos: int) -> None:
        for t in self.tensors:
            t[1:, :, :pos] = t[:1, :, :pos]  # broadcast (1, ...) over the other B-1 rows

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)
