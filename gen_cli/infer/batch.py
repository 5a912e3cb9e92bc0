"""Batched decode of sequences at different positions: one step takes B last tokens, runs every matmul once
for all B rows (the weights read once per step), and attends each row over its own cache.

Each sequence owns a batch-1 cache (from a `CacheSpec`) holding its own position; sequences join and leave
between steps. Attention runs per row through the model's own `attention_plan` and `attend`, so RoPE,
ALiBi, windows and every KV kind behave exactly as in a single-sequence forward. Where gen's C step takes
the model and every row's cache (linear layout, CPU, a kind pair it reads), one native call advances all
the rows, each at its own position (`NativeDecoder.rows`); otherwise the batch runs in PyTorch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gen_cli.cache.window import Cache
from gen_cli.errors import UsageError
from gen_cli.infer.generate import decode_step
from gen_cli.infer.options import SamplingConfig
from gen_cli.infer.sampling import sample_next
from gen_cli.model.attention import attend
from gen_cli.model.transformer import RELATIVE, Transformer, check_context
from gen_cli.native.decoder import MAX_BATCH, NativeDecoder


def native_rows(model: Transformer, caches: Sequence[Cache]) -> NativeDecoder | None:
    """The model's C step when it takes one row per entry of `caches` in one call (a cache named r times takes
    r consecutive tokens), else None."""
    native = model.native_decoder
    if not isinstance(native, NativeDecoder) or not caches or len(caches) > MAX_BATCH:
        return None
    trained = model.config.sliding_window  # the C step has no window mask: past the window PyTorch masks
    if trained is not None:
        counts = Counter(id(c) for c in caches)
        if any(c.pos + counts[id(c)] > trained for c in caches):
            return None
    return native if native.accepts_rows(caches) else None  # type: ignore[arg-type]


@torch.inference_mode()
def prefill_chunk(model: Transformer, ids: Sequence[int], cache: Cache) -> torch.Tensor:
    """Run `ids` (one sequence's next prompt tokens) into its batch-1 cache; logits (V,) of the last one."""
    device = model.norm.weight.device
    idx = torch.tensor([list(ids)], dtype=torch.long, device=device)  # (1, T)
    return model(idx, cache=cache, last_only=True)[0, -1]


@torch.inference_mode()
def batched_step(
    model: Transformer, tokens: Sequence[int], caches: Sequence[Cache], by_row: bool = False
) -> torch.Tensor:
    """Logits (B, V) for one new token per sequence, each at its own cache's position; every cache advances.

    gen's C step runs every row in one call where it takes them (`native_rows`). Otherwise `by_row` runs the
    single-sequence step once per row instead of one PyTorch step over B rows."""
    if len(tokens) != len(caches) or not tokens:
        raise UsageError(f"batched_step needs one token per cache, got {len(tokens)} tokens for {len(caches)} caches")
    if len(caches) > 1 and (native := native_rows(model, caches)) is not None:
        return native.rows(list(tokens), caches)  # type: ignore[arg-type]  # (B, V), every cache advanced
    device = model.norm.weight.device
    if len(caches) == 1 or by_row:  # the single-sequence step per row (gen's C step where it applies)
        ids = torch.tensor(list(tokens), device=device)[:, None]  # (B, 1)
        return torch.cat([decode_step(model, ids[i : i + 1], c) for i, c in enumerate(caches)])  # (B, V)
    config, kind = model.config, model.config.pos_encoding
    idx = torch.tensor(list(tokens), dtype=torch.long, device=device)[:, None]  # (B, 1)
    x = model.tok_emb(idx)  # (B, 1, d_model)
    dtype = x.dtype
    plans = []
    for cache in caches:
        at = cache.positions(1, device)
        if at.frame_extent is None or kind not in RELATIVE:
            check_context(config, at.start, 1)
        plans.append(model.attention_plan(at, dtype, device))
    starts = torch.tensor([c.pos for c in caches], device=device)  # (B,) each row's absolute position
    if kind == "sinusoidal":
        x = x + model.sin_table[starts][:, None]  # (B, 1, d_model)
    elif kind == "learned":
        x = x + model.pos_emb.weight[starts][:, None]  # (B, 1, d_model)
    rope = _row_rope(plans, model.config.head_dim, dtype, device)
    for layer, block in enumerate(model.layers):
        x = x + _attention(block.attn, block.attn_norm(x), rope, plans, caches, layer)
        x = x + block.mlp(block.mlp_norm(x))
    for cache in caches:
        cache.advance(1)
    return model.lm_head(model.norm(x))[:, -1]  # (B, V)


def _row_rope(plans, head_dim: int, dtype: torch.dtype, device: torch.device):
    """Per-row RoPE for the new q and k, (B, 1, head_dim) each, or None when no row rotates them as projected.

    A row whose keys are rotated after its cache (a window re-assigning positions) gets the identity
    rotation (cos 1, sin 0: x·1 + swapped·0 is x exactly); its plan rotates q and keys in `attend`."""
    rows = [p.rope_new for p in plans]
    if all(r is None for r in rows):
        return None
    one, zero = (
        torch.ones(1, head_dim, dtype=dtype, device=device),
        torch.zeros(1, head_dim, dtype=dtype, device=device),
    )
    cos = torch.stack([r[0] if r is not None else one for r in rows])  # (B, 1, head_dim)
    sin = torch.stack([r[1] if r is not None else zero for r in rows])  # (B, 1, head_dim)
    return cos, sin


def _attention(attn, x: torch.Tensor, rope, plans, caches: Sequence[Cache], layer: int) -> torch.Tensor:
    """The model's Attention for B rows at their own positions: projections batched, SDPA per row."""
    B = x.shape[0]
    q, k, v = attn.project(x, rope)  # q (B, n_head, 1, hd); k, v (B, n_kv_head, 1, hd)
    gqa = attn.n_kv_head != attn.n_head
    y = torch.empty_like(q)  # (B, n_head, 1, hd)
    plain: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for i, (cache, plan) in enumerate(zip(caches, plans, strict=True)):
        k_i, v_i = cache.update(layer, k[i : i + 1], v[i : i + 1])  # (1, n_kv_head, L_i, hd)
        if plan.mask is None and not plan.is_causal and plan.rope_q is None:
            plain.append((i, k_i, v_i))  # sees every key it holds, as they are: batched below
        else:
            y[i : i + 1] = attend(q[i : i + 1], k_i, v_i, plan, gqa)  # (1, n_head, 1, hd)
    if len(plain) == 1:
        i, k_i, v_i = plain[0]
        y[i : i + 1] = attend(q[i : i + 1], k_i, v_i, plans[i], gqa)
    elif plain:
        # One SDPA for the rows that see all their keys: keys padded to the longest, padding masked out.
        # Copying the keys costs far less than one SDPA call per row (PyTorch's per-call overhead).
        rows = [i for i, _, _ in plain]
        lengths = torch.tensor([k_i.shape[2] for _, k_i, _ in plain], device=q.device)  # (n,)
        longest = int(lengths.max())
        keys = q.new_zeros(len(plain), attn.n_kv_head, longest, attn.head_dim)  # (n, n_kv_head, L, hd)
        values = torch.zeros_like(keys)
        for j, (_, k_i, v_i) in enumerate(plain):
            keys[j, :, : k_i.shape[2]] = k_i[0]
            values[j, :, : v_i.shape[2]] = v_i[0]
        seen = (torch.arange(longest, device=q.device)[None, :] < lengths[:, None])[:, None, None]  # (n, 1, 1, L)
        index = torch.tensor(rows, device=q.device)
        y[index] = F.scaled_dot_product_attention(q[index], keys, values, attn_mask=seen, enable_gqa=gqa)
    y = y.transpose(1, 2).reshape(B, 1, attn.n_head * attn.head_dim)  # (B, 1, n_head × hd)
    return attn.wo(y)


@dataclass
class Row:
    """One sequence of a batch: its cache, ids so far, sampling and generator; `pending` the prompt still to
    prefill."""

    cache: Cache
    ids: list[int]
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    generator: torch.Generator | None = None
    pending: list[int] = field(default_factory=list)


@torch.inference_mode()
def pick(logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
    """The next id of each row from logits (B, V), under the row's own sampling settings and generator."""
    # Greedy rows without a repetition penalty take the argmax alone: one call for all of them, not one each.
    plain = [r.sampling.greedy and r.sampling.repetition_penalty == 1.0 for r in rows]
    top = logits.argmax(dim=-1).tolist() if any(plain) else []  # (B,)
    out = []
    for i, row in enumerate(rows):
        if plain[i]:
            out.append(int(top[i]))
            continue
        history = None
        if row.sampling.repetition_penalty != 1.0:
            history = torch.tensor([row.ids], dtype=torch.long, device=logits.device)  # (1, T)
        out.append(int(sample_next(logits[i : i + 1], history, row.sampling, row.generator)[0]))
    return out
