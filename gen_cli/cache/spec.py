"""CacheSpec: what KV cache a run uses (K kind, V kind, window, sinks), as one value with its byte formula.

A run-time choice (design rule 1): it never goes into ModelConfig. Commands build one from their flags;
the library allocates and sizes every cache through it, so no caller threads kinds, window and sinks
separately.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from gen_cli.cache.linear import KVCache
    from gen_cli.cache.window import WindowKVCache
    from gen_cli.model.config import ModelConfig


@dataclass(frozen=True)
class CacheSpec:
    """K and V storage kinds (None: the model's dtype, unquantized) and an optional StreamingLLM window:
    the sequence's first `sinks` tokens kept forever plus a ring of the last `window` (None: every token
    is kept)."""

    k_kind: str | None = None
    v_kind: str | None = None
    window: int | None = None
    sinks: int = 0

    @staticmethod
    def of(cache: KVCache | WindowKVCache) -> CacheSpec:
        """The spec a cache was allocated from (its kinds as stored, its window and sinks)."""
        return CacheSpec(cache.k_kind, cache.v_kind, cache.window, cache.sinks)

    @property
    def kinds(self) -> tuple[str | None, str | None]:
        return self.k_kind, self.v_kind

    def slots(self, tokens: int) -> int:
        """Token slots a cache for a `tokens`-long sequence holds: all of them, or at most sinks + window."""
        return tokens if self.window is None else min(tokens, self.sinks + self.window)

    def check(self, config: ModelConfig) -> None:
        """Refuse kinds this model's head size cannot store and a window it cannot run (one-line UsageErrors)."""
        from gen_cli.cache.kinds import check_kind
        from gen_cli.cache.window import check_window
        from gen_cli.errors import UsageError

        for kind in self.kinds:
            if kind is not None:
                check_kind(config, kind)
        if self.window is not None:
            check_window(config, self.window, self.sinks)
        elif self.sinks:
            raise UsageError("sinks are kept beside a window: give a window too", params=("sinks", "window"))

    def unbounded(self, config: ModelConfig) -> bool:
        """Whether a sequence may run past the model's context: a window of a RoPE/ALiBi model, whose
        positions stay within the cache."""
        from gen_cli.model.positions import RELATIVE

        return self.window is not None and config.pos_encoding in RELATIVE

    def bytes_per_token(self, config: ModelConfig, bytes_per_element: int) -> int:
        """KV bytes one slot of one sequence costs: n_layer × n_kv_head × (K's + V's bytes per head)."""
        from gen_cli.cache.linear import kv_bytes_per_token

        return kv_bytes_per_token(config, self.k_kind, self.v_kind, bytes_per_element)

    def nbytes(self, config: ModelConfig, tokens: int, batch: int, bytes_per_element: int) -> int:
        """The analytic size of the cache this spec allocates for `batch` sequences of `tokens` tokens."""
        return self.bytes_per_token(config, bytes_per_element) * self.slots(tokens) * batch

    def allocate(
        self, config: ModelConfig, batch: int, tokens: int, dtype: torch.dtype, device: torch.device | str
    ) -> KVCache | WindowKVCache:
        """A cache for `batch` sequences of up to `tokens` tokens (a window cache: however long they run)."""
        from gen_cli.cache.linear import KVCache
        from gen_cli.cache.window import WindowKVCache

        if self.window is None:
            if self.sinks:
                self.check(config)  # refuses sinks without a window
            return KVCache(config, batch, tokens, dtype, device, self.k_kind, self.v_kind)
        return WindowKVCache(config, batch, self.window, self.sinks, dtype, device, self.k_kind, self.v_kind)

    def describe(self) -> str:
        """`int8/int4, window 128 + 4 sinks` — for stats lines; the model's dtype when no kind is set."""
        kinds = "model dtype" if self.kinds == (None, None) else f"{self.k_kind or 'model'}/{self.v_kind or 'model'}"
        return kinds if self.window is None else f"{kinds}, window {self.window} + {self.sinks} sinks"
