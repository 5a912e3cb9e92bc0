"""WindowKVCache: S attention-sink slots kept forever plus a ring of the last N positions (StreamingLLM).

Memory is S + N slots however long generation runs. Keys are stored before RoPE and rotated at
attention time by their position *within the cache* (sinks 0…S-1, then the window in order), as the
StreamingLLM paper does, so positions never pass S + N and a RoPE or ALiBi model can generate past its
trained context. Learned and sinusoidal positions are added to the embeddings, so they stay absolute
(the model refuses positions past its context). A run-time choice, never part of ModelConfig.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gen_cli.cache.kinds import KVSide
from gen_cli.cache.linear import KVStorage, allocate_kv
from gen_cli.errors import InternalError, UsageError
from gen_cli.model.config import ModelConfig
from gen_cli.model.positions import alibi_bias, alibi_slopes, apply_rope, rope_tables

# Position encodings whose positions the cache re-assigns (so generation may run past the context).
RELATIVE = ("rope", "alibi")


def check_window(config: ModelConfig, window: int, sinks: int) -> None:
    """Refuse a window the model cannot run: N ≥ 1, S ≥ 0, N > S, and within a trained sliding window."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise UsageError(f"window must be a whole number ≥ 1, got {window!r}", params=("window",))
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise UsageError(f"sinks must be a whole number ≥ 0, got {sinks!r}", params=("sinks",))
    if window <= sinks:
        raise UsageError(f"window must be larger than sinks, got {window} ≤ {sinks}", params=("window", "sinks"))
    if config.pos_encoding in RELATIVE and sinks + window > config.context_length:
        raise UsageError(
            f"window + sinks = {window + sinks} positions pass the model's context of {config.context_length}: "
            "positions within the cache must stay within what it was trained on",
            params=("window", "sinks"),
        )
    trained = config.sliding_window
    if trained is not None and sinks + window > trained:
        raise UsageError(
            f"this model was trained to attend to its last {trained} tokens only; window + sinks = "
            f"{window + sinks} would reach further than it learned to",
            params=("window", "sinks"),
        )


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """(Tq, Tk) bool: query t sees key p when p ≤ t and p is a sink (p < S) or among the last N (p > t − N)."""
    q, k = q_pos[:, None], k_pos[None, :]
    return (k <= q) & ((k < sinks) | (k > q - window))


class WindowKVCache(KVStorage):
    """Per-layer k/v of shape (B, n_kv_head, S + N, head_dim): slots 0…S-1 hold the first S tokens, slots
    S…S+N-1 a ring of the last N (position p ≥ S lives in slot S + (p − S) mod N).

    Same protocol as KVCache for its callers (`pos` counts every token seen, `advance`, `nbytes`, constant:
    fixed by S + N); the model calls `attend` instead of `update`, because attention needs the positions
    the cache assigns.
    """

    plain = False  # the native decode step reads a linear cache only

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        window: int,
        sinks: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        k_kind: str | None = None,
        v_kind: str | None = None,
    ) -> None:
        check_window(config, window, sinks)
        if batch_size < 1:
            raise UsageError(f"a KV cache needs batch_size ≥ 1, got {batch_size}")
        self.batch_size, self.window, self.sinks = batch_size, window, sinks
        self.capacity = sinks + window
        allocate_kv(self, config, batch_size, self.capacity, dtype, device, k_kind, v_kind)  # (B, H_kv, S+N, D)
        self.pos = 0
        self._plan: dict | None = None
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def max_tokens(self) -> int:
        """Slots held (S + N): what the cache costs; generation itself may run past it."""
        return self.capacity

    def slot(self, positions: torch.Tensor) -> torch.Tensor:
        """The slot each absolute position lives in."""
        S, N = self.sinks, self.window
        return torch.where(positions < S, positions, S + (positions - S) % N)

    def held(self, pos: int | None = None) -> torch.Tensor:
        """Absolute positions the cache holds before position `pos` (default: now) that a query at `pos`
        may still see, oldest first: the sinks, then the window's last N-1."""
        pos = self.pos if pos is None else pos
        sinks = torch.arange(min(pos, self.sinks))
        recent = torch.arange(max(self.sinks, pos - self.window + 1), pos)
        return torch.cat([sinks, recent])

    def advance(self, t: int) -> None:
        """Move past `t` tokens (once per forward pass, after every layer attended)."""
        self.pos += t
        self._plan = None

    def reset(self) -> None:
        self.pos = 0
        self._plan = None

    def truncate(self, pos: int) -> None:
        """Roll back to `pos`: to 0 always, else only while nothing at or after it has been overwritten."""
        if pos == 0:
            return self.reset()
        if not 0 <= pos <= self.pos or (pos < self.pos and self.pos > self.capacity):
            raise InternalError(f"a window cache at {self.pos} (of {self.capacity} slots) cannot roll back to {pos}")
        self.pos = pos
        self._plan = None

    def first_row(self) -> WindowKVCache:
        """A batch-1 cache sharing row 0's storage (one prefill for several samples)."""
        view = WindowKVCache.__new__(WindowKVCache)
        view.__dict__ |= self.__dict__
        view.batch_size, view._plan = 1, None
        view.k_sides = [s.first_row() for s in self.k_sides]
        view.v_sides = [s.first_row() for s in self.v_sides]
        return view

    def replicate_first_row(self, pos: int) -> None:
        for side in (*self.k_sides, *self.v_sides):
            side.replicate_first_row(min(pos, self.capacity))
        self.pos, self._plan = pos, None

    def _rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for cache positions 0 … S + 2N − 1 (a chunk of ≤ N queries needs no more).

        Rows equal the model's own tables (same function, same dtype), so an un-evicted cache is bit-exact.
        """
        if self._tables is None or self._tables[0].device != device:
            c = self.config
            cos, sin = rope_tables(self.sinks + 2 * self.window, c.head_dim, c.rope_base, c.rope_scaling)
            self._tables = cos.to(device, self._dtype), sin.to(device, self._dtype)
        return self._tables

    def _make_plan(self, T: int, device: torch.device) -> dict:
        """What every layer of this forward shares: key positions, their slots, the mask, the frames."""
        P, S, N = self.pos, self.sinks, self.window
        if self.window < T:
            raise InternalError(f"a window cache takes chunks of at most {N} tokens, got {T} (the model splits them)")
        plan: dict = {"T": T, "plain": self.capacity >= P + T}
        q_pos = torch.arange(P, P + T, device=device)
        if plan["plain"]:  # no slot overwritten yet: slots are positions and every query sees every earlier key
            plan["k_pos"], plan["q_pos"] = torch.arange(P + T, device=device), q_pos
            return plan
        old = self.held().to(device)
        k_pos = torch.cat([old, q_pos])  # (L,) oldest first
        plan |= {"old_slots": self.slot(old), "new_slots": self.slot(q_pos), "k_pos": k_pos, "q_pos": q_pos}
        visible = window_mask(q_pos, k_pos, N, S)  # (T, L)
        sink = k_pos < S
        # Positions within the cache. Sinks keep 0…S-1; a query at t sits at min(t, S+N-1) relative to them.
        # The window keeps its own spacing (t − p), shifted so that its oldest visible key sits at S: then
        # one query sits at S+N-1 in both frames; a chunk of T ≤ N needs positions up to S+2N-2 at most.
        off = max(0, P - N + 1 - S)
        q_sink = torch.clamp(q_pos, max=S + N - 1)
        q_win = q_pos - off
        k_frame = torch.where(sink, k_pos, k_pos - off)
        plan |= {"visible": visible, "sink": sink, "q_sink": q_sink, "q_win": q_win, "k_frame": k_frame}
        plan["two_frames"] = bool(S > 0 and T > 1)
        if self.config.pos_encoding == "alibi":
            slopes = torch.tensor(alibi_slopes(self.config.n_head), device=device)  # (n_head,) fp32
            dist = torch.where(sink[None, :], q_sink[:, None] - k_pos[None, :], q_pos[:, None] - k_pos[None, :])
            bias = -slopes[:, None, None] * dist.to(slopes.dtype)  # (H, T, L)
            plan["bias"] = bias.masked_fill(~visible, float("-inf")).to(self._dtype)
        if T == 1:
            # One query past the first eviction sees exactly every slot (the new token replaced the one just
            # out of reach): attend over the slots in place, in slot order (softmax ignores key order), each
            # key at its own frame position, and skip the gathers.
            by_slot = torch.empty_like(k_pos)
            by_slot[torch.cat([plan["old_slots"], plan["new_slots"]])] = torch.arange(len(k_pos), device=device)
            plan["steady"], plan["k_frame"] = True, k_frame[by_slot]
            if "bias" in plan:
                plan["bias"] = plan["bias"][..., by_slot]  # (H, 1, S+N)
        return plan

    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        """Store k/v (B, n_kv_head, T, head_dim), un-rotated, at the T positions from `pos`, and return the
        attention output (B, n_head, T, head_dim) of q (B, n_head, T, head_dim, un-rotated) over the keys
        each query may see."""
        T, device = q.shape[2], q.device
        if self._plan is None or self._plan["T"] != T:
            self._plan = self._make_plan(T, device)
        plan, P = self._plan, self.pos
        ks, vs = self.k_sides[layer], self.v_sides[layer]
        gqa = q.shape[1] != k_new.shape[1]
        kind = self.config.pos_encoding
        if plan["plain"]:
            ks.write(P, k_new)
            vs.write(P, v_new)
            k, v = ks.read(P + T), vs.read(P + T)  # (B, n_kv_head, P+T, head_dim); views when stored so
            return self._plain_attention(q, k, v, plan, gqa)
        if plan.get("steady"):
            self._write(ks, P, k_new)
            self._write(vs, P, v_new)
            k, v = ks.read(self.capacity), vs.read(self.capacity)  # (B, n_kv_head, S+N, head_dim), slot order
            bias = plan.get("bias")
            if kind == "rope":
                k = apply_rope(k, *self._rows(plan, "k_frame"))
                q = apply_rope(q, *self._rows(plan, "q_win"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)
        # Read what the chunk may see before writing it: its writes overwrite the oldest window slots.
        old_k, old_v = ks.read(self.capacity)[:, :, plan["old_slots"]], vs.read(self.capacity)[:, :, plan["old_slots"]]
        self._write(ks, P, k_new)
        self._write(vs, P, v_new)
        # The new k/v as stored (a quantized kind rounds them), as a plain cache's read would return them.
        new_k, new_v = ks.read(self.capacity)[:, :, plan["new_slots"]], vs.read(self.capacity)[:, :, plan["new_slots"]]
        k = torch.cat([old_k, new_k], dim=2)  # (B, n_kv_head, L, head_dim), oldest first
        v = torch.cat([old_v, new_v], dim=2)
        mask: torch.Tensor = plan["visible"]
        scale = None
        if kind == "rope":
            k = apply_rope(k, *self._rows(plan, "k_frame"))
            q_win = apply_rope(q, *self._rows(plan, "q_win"))
            if plan["two_frames"]:
                # Two frames in one SDPA call: [q_sink, q_win]·[k·sink, k·window] is q_sink·k for a sink key
                # and q_win·k for a window key (the zero halves add exact zeros); the scale stays 1/sqrt(hd).
                q_sink = apply_rope(q, *self._rows(plan, "q_sink"))
                is_sink = plan["sink"][:, None].to(k.dtype)  # (L, 1)
                q = torch.cat([q_sink, q_win], dim=-1)  # (B, n_head, T, 2 head_dim)
                k = torch.cat([k * is_sink, k * (1 - is_sink)], dim=-1)  # (B, n_kv_head, L, 2 head_dim)
                scale = 1 / math.sqrt(q_win.shape[-1])
            else:
                q = q_win
        elif kind == "alibi":
            mask = plan["bias"]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)

    def _rows(self, plan: dict, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin rows for the positions `plan[key]`, gathered once per forward for every layer."""
        if (rows := plan.get(key + "_rows")) is None:
            cos, sin = self._rope(plan[key].device)
            rows = plan[key + "_rows"] = (cos[plan[key]], sin[plan[key]])
        return rows

    def _plain_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: dict, gqa: bool
    ) -> torch.Tensor:
        """Exactly what the model does with a plain cache: absolute positions, the same mask choices."""
        P, T = self.pos, plan["T"]
        kind = self.config.pos_encoding
        mask: torch.Tensor | None = None
        is_causal = False
        if kind == "rope":
            cos, sin = self._rope(q.device)
            q = apply_rope(q, cos[P : P + T], sin[P : P + T])
            k = apply_rope(k, cos[: P + T], sin[: P + T])
        if kind == "alibi":
            slopes = torch.tensor(alibi_slopes(self.config.n_head), device=q.device)
            mask = alibi_bias(slopes, plan["q_pos"], plan["k_pos"]).to(q.dtype)
        elif T > 1 and P > 0:
            mask = plan["k_pos"][None, :] <= plan["q_pos"][:, None]  # (T, P+T) causal, shifted by P
        else:
            is_causal = T > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)

    def _write(self, side: KVSide, pos: int, x: torch.Tensor) -> None:
        """Write x (B, n_kv_head, T, head_dim) for positions pos…pos+T-1, wrapping around the ring."""
        done = 0
        while done < x.shape[2]:
            p = pos + done
            start = p if p < self.sinks else self.sinks + (p - self.sinks) % self.window
            run = min(x.shape[2] - done, self.capacity - start)  # contiguous slots up to the ring's end
            side.write(start, x[:, :, done : done + run])
            done += run
