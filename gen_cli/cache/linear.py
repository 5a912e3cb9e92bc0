"""KVCache: preallocated keys and values per layer, sized by n_kv_head; owns the write position."""

from __future__ import annotations

import torch

from gen_cli.cache.kinds import INT4_GROUP, KV_KINDS, KVSide, bytes_per_head_token, check_kind, kind_of
from gen_cli.errors import InternalError, UsageError
from gen_cli.model.attention import Positions
from gen_cli.model.config import ModelConfig


class KVStorage:
    """Per-layer K and V sides (B, n_kv_head, slots, head_dim) in their kinds: what every cache holds."""

    config: ModelConfig
    k_kind: str
    v_kind: str
    k_sides: list[KVSide]
    v_sides: list[KVSide]
    _dtype: torch.dtype

    @property
    def dtype(self) -> torch.dtype:
        """The dtype attention reads (the stored form may be narrower)."""
        return self._dtype

    @property
    def k(self) -> list[torch.Tensor]:
        """Per-layer stored K tensors (the values themselves only when unquantized)."""
        return [s.data for s in self.k_sides]

    @property
    def v(self) -> list[torch.Tensor]:
        return [s.data for s in self.v_sides]

    @property
    def device(self) -> torch.device:
        return self.k_sides[0].data.device

    @property
    def nbytes(self) -> int:
        """Bytes the cache tensors actually hold, scales and zero points included."""
        return sum(s.nbytes for s in (*self.k_sides, *self.v_sides))


def allocate_kv(
    cache: KVStorage,
    config: ModelConfig,
    batch_size: int,
    slots: int,
    dtype: torch.dtype,
    device: torch.device | str,
    k_kind: str | None,
    v_kind: str | None,
) -> None:
    """Give `cache` its config, kinds (checked; default: `dtype` unquantized) and zeroed sides of `slots` slots."""
    cache.config, cache._dtype = config, dtype
    cache.k_kind, cache.v_kind = k_kind or kind_of(dtype), v_kind or kind_of(dtype)
    check_kind(config, cache.k_kind)
    check_kind(config, cache.v_kind)
    # Sized by n_kv_head, never n_head: GQA/MQA share each KV head among n_head/n_kv_head queries.
    shape = (batch_size, config.n_kv_head, slots, config.head_dim)  # (B, n_kv_head, slots, head_dim)
    # zeros, not empty: the memory is really committed, so measured RSS matches `nbytes`.
    cache.k_sides = [KVSide(cache.k_kind, shape, dtype, device) for _ in range(config.n_layer)]
    cache.v_sides = [KVSide(cache.v_kind, shape, dtype, device) for _ in range(config.n_layer)]


class KVCache(KVStorage):
    """Per-layer k/v tensors of shape (B, n_kv_head, max_tokens, head_dim), filled left to right.

    The caller owns the cache (design rule 3): the model writes each layer's k/v at `pos` and the
    cache advances once per forward pass, after every layer has written. `k_kind`/`v_kind` choose how
    each is stored (fp32/bf16/fp16, int8, int4; default: `dtype` itself); reads come back in `dtype`.
    Keys sit at their absolute positions, rotated once when written: a step reads them as they are.
    """

    chunk_limit: int | None = None  # any number of tokens per forward
    window: int | None = None  # every token kept (CacheSpec.of reads these two)
    sinks = 0
    # Slots 0…pos-1 in position order, keys rotated at their absolute positions: what gen's C step reads.
    native_layout = True

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_tokens: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        k_kind: str | None = None,
        v_kind: str | None = None,
    ) -> None:
        if batch_size < 1 or max_tokens < 1:
            raise UsageError(f"a KV cache needs batch_size and max_tokens ≥ 1, got {batch_size}, {max_tokens}")
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        allocate_kv(self, config, batch_size, max_tokens, dtype, device, k_kind, v_kind)
        self.pos = 0

    @property
    def sequence_limit(self) -> int | None:
        """The longest sequence the cache can take (None: a ring, however long)."""
        return self.max_tokens

    def positions(self, T: int, device: torch.device) -> Positions:
        """The next forward's T queries at pos…pos+T-1 over keys 0…pos+T-1, which `update` returns in order."""
        return Positions(self.pos, T)

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, n_kv_head, T, head_dim) at [pos:pos+T] in place; return views of [0:pos+T]."""
        t = k_new.shape[2]
        end = self.pos + t
        if end > self.max_tokens:
            # Callers size the cache for the whole generation and check lengths first: reaching here is a bug.
            raise InternalError(
                f"KV cache is full: writing {t} token(s) at position {self.pos} would pass its "
                f"{self.max_tokens}-token capacity"
            )
        k, v = self.k_sides[layer], self.v_sides[layer]
        k.write(self.pos, k_new)
        v.write(self.pos, v_new)
        # (B, n_kv_head, pos+T, head_dim): views, no copy, when plain; else dequantized copies
        return k.read(end), v.read(end)

    def advance(self, t: int) -> None:
        """Move the write position past `t` tokens (once per forward pass, after all layers)."""
        if self.pos + t > self.max_tokens:
            raise InternalError(f"KV cache overflow: position {self.pos} + {t} > capacity {self.max_tokens}")
        self.pos += t

    def reset(self) -> None:
        """Forget the contents (the tensors are kept and overwritten by the next writes)."""
        self.pos = 0

    def can_truncate(self, pos: int) -> bool:
        """Whether `truncate(pos)` keeps the prefix before `pos`: always, up to the current position."""
        return 0 <= pos <= self.pos

    def truncate(self, pos: int) -> None:
        """Roll the write position back to `pos` (≤ the current one): a shared prefix stays cached, and
        the entries after it are overwritten by the next writes (attention never reads past `pos`)."""
        if not 0 <= pos <= self.pos:
            raise InternalError(f"KV cache truncate to {pos}: must be between 0 and the position {self.pos}")
        self.pos = pos

    def first_row(self) -> KVCache:
        """A batch-1 cache sharing row 0's storage: prefill one prompt there, then `replicate_first_row`."""
        view = KVCache.__new__(KVCache)
        view.config, view.batch_size, view.max_tokens = self.config, 1, self.max_tokens
        view.k_kind, view.v_kind, view._dtype = self.k_kind, self.v_kind, self._dtype
        view.k_sides = [s.first_row() for s in self.k_sides]  # row 0 views of the same memory
        view.v_sides = [s.first_row() for s in self.v_sides]
        view.pos = self.pos
        return view

    def replicate_first_row(self, pos: int) -> None:
        """Copy row 0's first `pos` tokens to every row and set the position: one prefill, B samples."""
        for side in (*self.k_sides, *self.v_sides):
            side.replicate_first_row(pos)
        self.pos = pos


def kv_bytes_per_token(config: ModelConfig, k_kind: str | None, v_kind: str | None, bytes_per_element: int) -> int:
    """KV bytes one token of one sequence costs with these kinds (None: unquantized at bytes_per_element)."""
    plain = config.head_dim * bytes_per_element
    per_head = sum(plain if k is None else bytes_per_head_token(k, config.head_dim) for k in (k_kind, v_kind))
    return config.n_layer * config.n_kv_head * per_head


def kv_kind_bytes(config: ModelConfig) -> dict[str, dict[str, int]]:
    """Per KV cache kind this head size can store: bytes per token and at full context, scales included."""
    kinds = [k for k in KV_KINDS if k != "int4" or config.head_dim % INT4_GROUP == 0]
    per = {k: kv_bytes_per_token(config, k, k, 0) for k in kinds}
    return {k: {"per_token": b, "full_context": b * config.context_length} for k, b in per.items()}
