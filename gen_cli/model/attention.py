"""Where a forward's queries and keys sit, what each query sees, and attention from those positions.

Every cache reports the same `Positions` for a forward (design rule 3): the absolute positions of the keys
its `update` returns, and, when it re-assigns them (a StreamingLLM window), the positions RoPE and ALiBi
use instead. `plan_attention` turns them into RoPE rows and one mask, once per forward; `attend` applies
them per layer. Nothing here asks which cache produced the positions.

Two implementations compute the same attention (`ATTENTION_IMPLS`, chosen per run, never stored in a
config): `fused`, a tiled online-softmax kernel (the B·h·n² scores never exist in full): the plan's causal
kernel where one is set and applies (gen's C kernel for CPU prompts), else PyTorch's SDPA; and `eager`,
softmax(QKᵀ/√d)·V with the score matrix materialized.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gen_cli.model.positions import alibi_bias, apply_rope

if TYPE_CHECKING:
    from gen_cli.model.config import ModelConfig

Rows = tuple[torch.Tensor, torch.Tensor]  # cos and signed sin rows, each (n, head_dim)
# (q, k, v, first query position, scale or None) -> attention, or None where it does not apply (then SDPA runs)
CausalKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, "float | None"], "torch.Tensor | None"]

ATTENTION_IMPLS = ("fused", "eager")  # the first is the default
# A plan's causal kernel (gen's C kernel on the CPU) runs from this many queries: it takes queries 48 at a
# time, so fewer after a long prefix leave its tiles mostly empty (1-64 queries over 1,000 cached keys ran
# 1.2-10x slower than SDPA; 512 ran 1.5x faster, 2-core AVX2 machine).
KERNEL_MIN_QUERIES = 128


@dataclass(slots=True)
class Positions:
    """One forward of `length` queries at absolute positions start … start+length-1, over the keys a cache
    hands back, and the rule deciding which of those keys each query sees."""

    start: int
    length: int
    keys: torch.Tensor | None = None  # (L,) absolute positions of the returned keys, in order; None: 0 … end-1
    q_frame: torch.Tensor | None = None  # (T,) the queries' positions for RoPE/ALiBi; None: absolute
    k_frame: torch.Tensor | None = None  # (L,) the keys'; None: absolute, and keys are rotated once when written
    sink_frame: torch.Tensor | None = None  # (T,) the queries' positions against sink keys (a second frame)
    sink: torch.Tensor | None = None  # (L,) bool: the keys measured from `sink_frame`
    window: int | None = None  # visibility: the last `window` positions plus `sinks` first ones (None: the
    sinks: int = 0  # model's trained sliding window, if any, else every earlier key)
    frame_extent: int | None = None  # frames stay below this (None: absolute): relative encodings never
    # see a position past it, however long the sequence runs

    @property
    def end(self) -> int:
        return self.start + self.length


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, sinks: int = 0) -> torch.Tensor:
    """(Tq, Tk) bool: query t sees key p when p ≤ t and, under a window, p is a sink (p < sinks) or among
    the last `window` positions (p > t − window). The one rule for plain causal, trained and run-time windows."""
    q, k = q_pos[:, None], k_pos[None, :]
    keep = k <= q
    if window is not None:
        keep = keep & ((k < sinks) | (k > q - window))
    return keep


def causal_mask(pos: int, T: int, device: torch.device) -> torch.Tensor:
    """(T, pos+T) bool, True where query pos+i may attend key j (j ≤ pos+i)."""
    return visible(torch.arange(pos, pos + T, device=device), torch.arange(pos + T, device=device), None)


@dataclass(slots=True)
class AttentionPlan:
    """What every layer of one forward shares: RoPE rows, the mask (or SDPA's is_causal), the frames."""

    rope_new: Rows | None = None  # rotate new q and k as projected (keys are kept rotated)
    rope_q: Rows | None = None  # else: rotate q and the returned keys after the cache
    rope_k: Rows | None = None
    rope_sink: Rows | None = None  # q's rows against sink keys (two frames)
    sink: torch.Tensor | None = None  # (L, 1) 1 for sink keys, 0 otherwise, in the compute dtype
    mask: torch.Tensor | None = None  # bool (T, L) or additive (H, T, L)
    is_causal: bool = False
    causal_start: int | None = None  # plain causal from this query position (is_causal or the mask says so)
    impl: str = "fused"  # one of ATTENTION_IMPLS
    kernel: CausalKernel | None = None  # fused plain-causal attention replacing SDPA where it applies


def plan_attention(
    at: Positions,
    config: ModelConfig,
    rope: Rows | None,
    slopes: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> AttentionPlan:
    """The plan for `at`: `rope` is the model's cos/sin tables (long enough for every frame position),
    `slopes` its ALiBi slopes (fp32), None for the encodings that do not use them."""
    plan = AttentionPlan()
    start, end, T = at.start, at.end, at.length
    if rope is not None:
        cos, sin = rope
        if at.k_frame is None:
            plan.rope_new = (cos[start:end], sin[start:end])  # each (T, head_dim)
        else:
            q_frame = at.q_frame if at.q_frame is not None else torch.arange(start, end, device=device)
            plan.rope_q, plan.rope_k = (cos[q_frame], sin[q_frame]), (cos[at.k_frame], sin[at.k_frame])
            if at.sink_frame is not None and at.sink is not None:
                plan.rope_sink = (cos[at.sink_frame], sin[at.sink_frame])
                plan.sink = at.sink[:, None].to(dtype)  # (L, 1)
    window, sinks = (at.window, at.sinks) if at.window is not None else (config.sliding_window, 0)
    if at.keys is None and (window is None or end <= sinks + window):
        # Keys 0 … end-1 in order and nobody out of reach: plain causal attention. A fresh sequence uses
        # SDPA's own mask and a single new token, which sees every key, none (no tensors built per step);
        # a chunk after a cached prefix needs the causal mask shifted by start (is_causal aligns top-left).
        # A causal kernel needs neither: it is told where the queries start.
        if slopes is not None:
            # The bias depends on query − key distance; built in fp32 (slopes exact), then the compute dtype.
            q_pos, k_pos = torch.arange(start, end, device=device), torch.arange(end, device=device)
            plan.mask = alibi_bias(slopes, q_pos, k_pos).to(dtype)  # (H, T, end)
            return plan
        plan.causal_start = start
        if T == 1 or start == 0:
            plan.is_causal = T > 1
        else:
            plan.mask = causal_mask(start, T, device)  # (T, end)
        return plan
    q_pos = torch.arange(start, end, device=device)
    k_pos = at.keys if at.keys is not None else torch.arange(end, device=device)
    keep = visible(q_pos, k_pos, window, sinks)  # (T, L)
    if slopes is None:
        plan.mask = keep
        return plan
    q_frame = at.q_frame if at.q_frame is not None else q_pos
    k_frame = at.k_frame if at.k_frame is not None else k_pos
    dist = q_frame[:, None] - k_frame[None, :]  # (T, L)
    if at.sink_frame is not None and at.sink is not None:
        dist = torch.where(at.sink[None, :], at.sink_frame[:, None] - k_frame[None, :], dist)
    bias = -slopes[:, None, None] * dist.to(slopes.dtype)  # (H, T, L)
    plan.mask = bias.masked_fill(~keep, float("-inf")).to(dtype)
    return plan


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, gqa: bool) -> torch.Tensor:
    """SDPA of q (B, n_head, T, hd) over k, v (B, n_kv_head, L, hd) under `plan`: (B, n_head, T, hd)."""
    scale = None
    if plan.rope_k is not None and plan.rope_q is not None:
        k = apply_rope(k, *plan.rope_k)
        q_main = apply_rope(q, *plan.rope_q)
        if plan.rope_sink is not None and plan.sink is not None:
            # Two frames in one SDPA call: [q_sink, q]·[k·sink, k·(1−sink)] is q_sink·k for a sink key and
            # q·k for the others (the zero halves add exact zeros); the scale stays 1/sqrt(head_dim).
            q_sink = apply_rope(q, *plan.rope_sink)
            scale = 1 / math.sqrt(q.shape[-1])
            q = torch.cat([q_sink, q_main], dim=-1)  # (B, n_head, T, 2 head_dim)
            k = torch.cat([k * plan.sink, k * (1 - plan.sink)], dim=-1)  # (B, n_kv_head, L, 2 head_dim)
        else:
            q = q_main
    if plan.impl == "eager":
        return eager_attention(q, k, v, plan.mask, plan.is_causal, scale)
    if plan.kernel is not None and plan.causal_start is not None and q.shape[2] >= KERNEL_MIN_QUERIES:
        y = plan.kernel(q, k, v, plan.causal_start, scale)
        if y is not None:
            return y
    mask = plan.mask
    if mask is not None and mask.dim() == 3:
        # PyTorch's CPU flash kernel takes a 4-d additive mask but sends a 3-d one to the math path, which
        # materializes the scores: (H, T, L) → (1, H, T, L), the same memory.
        mask = mask[None]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=plan.is_causal, scale=scale, enable_gqa=gqa
    )


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v with the (B, n_head, T, L) scores materialized: (B, n_head, T, v's hd).

    The arithmetic SDPA fuses, written out. Without autograd the one score matrix is masked and softmaxed
    in place (the least an unfused kernel can hold); with it, autograd keeps the probabilities for backward.
    """
    B, H, T, hd = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1 / math.sqrt(hd)
    # Query head h reads KV head h // group (as enable_gqa): the group's queries stacked, k never repeated.
    qg = (q * scale).reshape(B, Hkv, (H // Hkv) * T, hd)  # (B, n_kv_head, group × T, hd)
    scores = qg @ k.transpose(-1, -2)  # (B, n_kv_head, group × T, L)
    view = scores.view(B, H, T, L)  # (B, n_head, T, L): the same memory
    if is_causal:
        mask = causal_mask(0, T, q.device)  # (T, T): is_causal only comes with L == T
    if mask is not None and mask.dtype == torch.bool:
        view.masked_fill_(~mask, float("-inf"))
    elif mask is not None:
        view.add_(mask)  # additive (H, T, L): ALiBi's bias, -inf where hidden
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad:
        probs = scores.softmax(dim=-1)
    else:
        probs = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()  # every row sees its own key: no NaN
        probs.div_(probs.sum(dim=-1, keepdim=True))
    return (probs @ v).view(B, H, T, v.shape[-1])  # (B, n_kv_head, group × T, hd) → (B, n_head, T, hd)
