"""Position tables and biases: sinusoidal rows, RoPE (with its scalings) and ALiBi slopes.

Everything here is derived from a ModelConfig, never stored in a checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Encodings that depend on query − key distance only, so a cache may re-assign their positions (a window
# cache keeps them within itself, and the sequence may then run past the trained context).
RELATIVE = ("rope", "alibi")


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """(length, dim) table: PE[pos, 2i] = sin(pos / 10000^(2i/dim)), PE[pos, 2i+1] = cos(same)."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]  # (length, 1)
    inv = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    angles = pos * inv  # (length, dim/2)
    table = torch.empty(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table.float()


def alibi_slopes(n_head: int) -> list[float]:
    """ALiBi's per-head slopes (Press et al. 2022): 2^(-8/n), its powers, for n a power of two; otherwise the
    slopes of the nearest lower power of two, then every other slope of the next power up (the paper's rule)."""

    def powers(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    if closest == n_head:
        return powers(n_head)
    return powers(closest) + powers(2 * closest)[0::2][: n_head - closest]


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """(H, Tq, Tk) additive logits: -slope × (query position − key position), −inf above the diagonal.

    Positions are absolute, so a decode step or a chunk after a cached prefix gets the same bias as the
    same rows of a full no-cache forward.
    """
    distance = (q_pos[:, None] - k_pos[None, :]).to(slopes.dtype)  # (Tq, Tk)
    bias = -slopes[:, None, None] * distance  # (H, Tq, Tk)
    return bias.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))


def yarn_attention_factor(scaling: dict[str, Any]) -> float:
    """YaRN's attention temperature: both cos and sin are multiplied by it, so logits by its square."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling["factor"]
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def _yarn_frequencies(inv: torch.Tensor, scaling: dict[str, Any], base: float) -> torch.Tensor:
    """YaRN (Peng et al. 2023), as transformers computes it: frequencies that rotate fewer than beta_slow times
    in the original context are interpolated (÷ factor), those rotating more than beta_fast times kept, and a
    linear ramp over the dimensions between."""
    dim = 2 * inv.shape[0]
    factor, orig = scaling["factor"], scaling["original_context_length"]
    beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)

    def dim_for(rotations: float) -> float:  # the dimension index whose wavelength fits `rotations` in orig
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(dim_for(beta_fast)), 0), min(math.ceil(dim_for(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=inv.dtype) - low) / (high - low)).clamp(0, 1)  # (head_dim/2,)
    keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate
    return inv / factor * (1 - keep) + inv * keep


def scaled_frequencies(inv: torch.Tensor, scaling: dict[str, Any] | None, base: float = 10000.0) -> torch.Tensor:
    """RoPE inverse frequencies (head_dim/2,) after a `ModelConfig.rope_scaling` (as transformers and llama.cpp do)."""
    if scaling is None:
        return inv
    kind = scaling["type"]
    if kind == "freq_factors":
        return inv / torch.tensor(scaling["factors"], dtype=inv.dtype)
    if kind == "linear":  # position interpolation: position p is rotated as p / factor
        return inv / scaling["factor"]
    if kind == "ntk":
        # NTK-aware: base × factor^(d/(d-2)), so the lowest frequency is interpolated by exactly `factor`
        # while the highest (local order) stays almost unchanged.
        dim = 2 * inv.shape[0]
        new_base = base * scaling["factor"] ** (dim / (dim - 2)) if dim > 2 else base * scaling["factor"]
        return new_base ** (-torch.arange(0, dim, 2, dtype=inv.dtype) / dim)
    if kind == "yarn":
        return _yarn_frequencies(inv, scaling, base)
    # llama3: long wavelengths slowed by `factor`, short ones kept, the band between interpolated.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_context_length"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_angles(positions: torch.Tensor, head_dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """(len(positions), head_dim/2) rotation angles in float64: position × scaled frequency of pair i."""
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (head_dim/2,)
    inv = scaled_frequencies(inv, scaling, base)
    return positions.to(torch.float64)[:, None] * inv  # (len, head_dim/2)


def rope_tables(
    length: int, head_dim: int, base: float, scaling: dict[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, each (length, head_dim), for the rotate-half convention.

    Pair i is (x[i], x[i + head_dim/2]) rotated by pos × base^(-2i/head_dim) (after any scaling); the
    frequencies are repeated over both halves, and rotate-half's minus sign is folded into the first half of
    sin, so `apply_rope` needs no slicing or concatenation. YaRN's temperature multiplies both tables.
    """
    angles = rope_angles(torch.arange(length), head_dim, base, scaling)  # (length, head_dim/2)
    gain = yarn_attention_factor(scaling) if scaling is not None and scaling["type"] == "yarn" else 1.0
    sin = angles.sin() * gain
    cos = torch.cat([angles.cos() * gain] * 2, dim=-1)  # (length, head_dim)
    return cos.float(), torch.cat([-sin, sin], dim=-1).float()  # (length, head_dim) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., head_dim) by tables from `rope_tables` that broadcast against it.

    x*cos + [x2, x1]*[-sin, sin]: the same as x*cos + rotate_half(x)*sin, without a cat.
    """
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)  # (..., head_dim): [x2, x1]
    return torch.addcmul(x * cos, swapped, sin_signed)
