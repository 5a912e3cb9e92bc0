"""WindowKVCache: S attention-sink slots kept forever plus a ring of the last N positions (StreamingLLM).

Memory is S + N slots however long generation runs. Keys are stored before RoPE and rotated at
attention time by their position *within the cache* (sinks 0…S-1, then the window in order), as the
StreamingLLM paper does, so positions never pass S + 2N and a RoPE or ALiBi model can generate past its
trained context. Learned and sinusoidal positions are added to the embeddings, so they stay absolute
(the model refuses positions past its context). The sinks are the sequence's first S tokens, prompt or
generated. A run-time choice, never part of ModelConfig.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gen_cli.cache.kinds import KVSide
from gen_cli.cache.linear import KVCache, KVStorage, allocate_kv
from gen_cli.errors import InternalError, UsageError
from gen_cli.model.attention import Positions
from gen_cli.model.config import ModelConfig
from gen_cli.model.positions import RELATIVE


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


@dataclass
class _Plan:
    """One forward's layout, shared by every layer: which slots `update` reads and in what order."""

    T: int
    mode: str  # "linear": nothing evicted yet; "steady": one query over every slot; "chunk": gather
    positions: Positions
    old_slots: torch.Tensor | None = None  # (L - T,) slots of the held keys, oldest first
    new_slots: torch.Tensor | None = None  # (T,)


class WindowKVCache(KVStorage):
    """Per-layer k/v of shape (B, n_kv_head, S + N, head_dim): slots 0…S-1 hold the first S tokens, slots
    S…S+N-1 a ring of the last N (position p ≥ S lives in slot S + (p − S) mod N).

    The same interface as KVCache (`positions`, `update`, `advance`, `pos` counts every token seen); its
    positions re-assign RoPE/ALiBi frames within the cache, and `update` returns the keys each query may
    still see, un-rotated.
    """

    native_layout = False  # a ring of un-rotated keys: gen's C step reads the linear layout only

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
        self._plan: _Plan | None = None

    @property
    def max_tokens(self) -> int:
        """Slots held (S + N): what the cache costs; generation itself may run past it."""
        return self.capacity

    @property
    def chunk_limit(self) -> int:
        """Chunks of at most N tokens: each query's window must stay in the cache beside the chunk."""
        return self.window

    @property
    def sequence_limit(self) -> int | None:
        return None  # a ring: however long the sequence runs

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

    def can_truncate(self, pos: int) -> bool:
        """Whether `truncate(pos)` keeps the prefix before `pos`: to 0 always, else while nothing at or
        after it has been overwritten."""
        return pos == 0 or (0 <= pos <= self.pos and (pos == self.pos or self.pos <= self.capacity))

    def truncate(self, pos: int) -> None:
        """Roll back to `pos` (see `can_truncate`)."""
        if not self.can_truncate(pos):
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

    def positions(self, T: int, device: torch.device) -> Positions:
        """The next forward's queries and the keys `update` returns, with frames within the cache."""
        if self._plan is None or self._plan.T != T:
            self._plan = self._make_plan(T, device)
        return self._plan.positions

    def _make_plan(self, T: int, device: torch.device) -> _Plan:
        P, S, N = self.pos, self.sinks, self.window
        if N < T:
            raise InternalError(f"a window cache takes chunks of at most {N} tokens, got {T} (the model splits them)")
        # Frames stay below S + 2N - 1: a chunk of T ≤ N queries sits at most N - 1 past the window's end.
        extent = S + 2 * N
        if self.capacity >= P + T:
            # Nothing overwritten yet: slots are positions and frames are positions, so attention is exactly a
            # linear cache's (keys rotated at read instead of at write, by the same table rows).
            at = Positions(P, T, k_frame=torch.arange(P + T, device=device), window=N, sinks=S, frame_extent=extent)
            return _Plan(T, "linear", at)
        q_pos = torch.arange(P, P + T, device=device)
        old = self.held().to(device)
        k_pos = torch.cat([old, q_pos])  # (L,) oldest first
        old_slots, new_slots = self.slot(old), self.slot(q_pos)
        sink = k_pos < S
        # Frames: sinks keep 0…S-1 and a query at t sits at min(t, S+N-1) relative to them. The window keeps
        # its own spacing (t − p), shifted so that its oldest visible key sits at S: then one query sits at
        # S+N-1 in both frames, and a chunk of T > 1 needs two (`sink_frame` for the sinks).
        off = max(0, P - N + 1 - S)
        q_sink = torch.clamp(q_pos, max=S + N - 1)
        q_win = q_pos - off
        k_frame = torch.where(sink, k_pos, k_pos - off)
        if T == 1:
            # One query past the first eviction sees exactly every slot (the new token replaced the one just
            # out of reach): `update` hands the slots back in place, in slot order (softmax ignores key
            # order), and the positions follow that order, so no gather is needed.
            by_slot = torch.empty_like(k_pos)
            by_slot[torch.cat([old_slots, new_slots])] = torch.arange(len(k_pos), device=device)
            at = Positions(P, T, k_pos[by_slot], q_win, k_frame[by_slot], window=N, sinks=S, frame_extent=extent)
            return _Plan(T, "steady", at)
        two = S > 0
        at = Positions(
            P, T, k_pos, q_win, k_frame, q_sink if two else None, sink if two else None, N, S, frame_extent=extent
        )
        return _Plan(T, "chunk", at, old_slots, new_slots)

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, n_kv_head, T, head_dim), un-rotated, at the T positions from `pos`; return the keys
        and values `positions` describes (B, n_kv_head, L, head_dim)."""
        T = k_new.shape[2]
        if self._plan is None or self._plan.T != T:
            self._plan = self._make_plan(T, k_new.device)
        plan, P = self._plan, self.pos
        ks, vs = self.k_sides[layer], self.v_sides[layer]
        if plan.mode == "linear":
            ks.write(P, k_new)
            vs.write(P, v_new)
            return ks.read(P + T), vs.read(P + T)  # (B, n_kv_head, P+T, head_dim); views when stored so
        if plan.mode == "steady":
            self._write(ks, P, k_new)
            self._write(vs, P, v_new)
            return ks.read(self.capacity), vs.read(self.capacity)  # (B, n_kv_head, S+N, head_dim), slot order
        assert plan.old_slots is not None and plan.new_slots is not None
        # Read what the chunk may see before writing it: its writes overwrite the oldest window slots.
        old_k, old_v = ks.read(self.capacity)[:, :, plan.old_slots], vs.read(self.capacity)[:, :, plan.old_slots]
        self._write(ks, P, k_new)
        self._write(vs, P, v_new)
        # The new k/v as stored (a quantized kind rounds them), as a linear cache's read would return them.
        new_k, new_v = ks.read(self.capacity)[:, :, plan.new_slots], vs.read(self.capacity)[:, :, plan.new_slots]
        k = torch.cat([old_k, new_k], dim=2)  # (B, n_kv_head, L, head_dim), oldest first
        return k, torch.cat([old_v, new_v], dim=2)

    def _write(self, side: KVSide, pos: int, x: torch.Tensor) -> None:
        """Write x (B, n_kv_head, T, head_dim) for positions pos…pos+T-1, wrapping around the ring."""
        done = 0
        while done < x.shape[2]:
            p = pos + done
            start = p if p < self.sinks else self.sinks + (p - self.sinks) % self.window
            run = min(x.shape[2] - done, self.capacity - start)  # contiguous slots up to the ring's end
            side.write(start, x[:, :, done : done + run])
            done += run


Cache = KVCache | WindowKVCache  # every cache: one interface (positions, update, advance, spec, …)
