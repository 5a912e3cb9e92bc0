"""KVCache: preallocated keys and values per layer, sized by n_kv_head; owns the write position."""

from __future__ import annotations

import torch

from gen_cli.errors import InternalError, UsageError
from gen_cli.model.config import ModelConfig


class KVCache:
    """Per-layer k/v tensors of shape (B, n_kv_head, max_tokens, head_dim), filled left to right.

    The caller owns the cache (design rule 3): the model writes each layer's k/v at `pos` and the
    cache advances once per forward pass, after every layer has written.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_tokens: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1 or max_tokens < 1:
            raise UsageError(f"a KV cache needs batch_size and max_tokens ≥ 1, got {batch_size}, {max_tokens}")
        self.config = config
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        # Sized by n_kv_head, never n_head: GQA/MQA share each KV head among n_head/n_kv_head queries.
        shape = (batch_size, config.n_kv_head, max_tokens, config.head_dim)  # (B, n_kv_head, T_max, head_dim)
        # zeros, not empty: the memory is really committed, so measured RSS matches `nbytes`.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.pos = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

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
        k, v = self.k[layer], self.v[layer]
        k[:, :, self.pos : end] = k_new
        v[:, :, self.pos : end] = v_new
        return k[:, :, :end], v[:, :, :end]  # (B, n_kv_head, pos+T, head_dim) views, no copy

    def advance(self, t: int) -> None:
        """Move the write position past `t` tokens (once per forward pass, after all layers)."""
        if self.pos + t > self.max_tokens:
            raise InternalError(f"KV cache overflow: position {self.pos} + {t} > capacity {self.max_tokens}")
        self.pos += t

    def reset(self) -> None:
        """Forget the contents (the tensors are kept and overwritten by the next writes)."""
        self.pos = 0

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
        view.k = [t[:1] for t in self.k]  # (1, n_kv_head, T_max, head_dim) views of the same memory
        view.v = [t[:1] for t in self.v]
        view.pos = self.pos
        return view

    def replicate_first_row(self, pos: int) -> None:
        """Copy row 0's first `pos` tokens to every row and set the position: one prefill, B samples."""
        for t in (*self.k, *self.v):
            t[1:, :, :pos] = t[:1, :, :pos]  # broadcast (1, ...) over the other B-1 rows
        self.pos = pos

    @property
    def nbytes(self) -> int:
        """Bytes the cache tensors actually hold."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @staticmethod
    def analytic_bytes(config: ModelConfig, tokens: int, batch: int, bytes_per_element: int) -> int:
        """2 × n_layer × n_kv_head × head_dim × tokens × batch × bytes_per_element."""
        return config.kv_bytes_per_token(bytes_per_element) * tokens * batch
