"""What a run asks for, checked before anything is loaded: how to open the model (EngineOptions, or a Preset of
random weights) and how to pick tokens (SamplingConfig). No torch: a command parses its flags into these first."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gen_cli.errors import UsageError

if TYPE_CHECKING:
    from gen_cli.cache.spec import CacheSpec
    from gen_cli.model.config import ModelConfig


@dataclass(frozen=True)
class Preset:
    """Random weights of a preset shape (tiny, small, base), its attention and positions changed as asked."""

    name: str
    tokenizer: Path | None = None  # default: the shipped model's, or the one `gen train-tokenizer` wrote
    attention: str | None = None
    kv_heads: int | None = None
    pos: str | None = None


@dataclass(frozen=True)
class EngineOptions:
    """How to run a model: where, in what dtype, with which weights and decode path (run-time choices only)."""

    device: str = "auto"
    dtype: str | None = None  # None: as stored (gen's models fp32; quantize may pick); `auto`: bf16 on CUDA
    threads: int | None = None
    quantize: str = "none"  # none, int8, q8_0, q4_0, q4_k
    native: bool = True  # gen's C decode step where the model and machine allow it
    compile: bool = False  # torch.compile instead of the native step
    rope_scaling: str | None = None  # e.g. `yarn:4`: the context grows to factor × the trained one
    attn_impl: str = "fused"  # PyTorch's forwards (prefill, decode off the native step): fused SDPA or eager
    act: str | None = None  # block weights' activations: native/abi.py's ACT_MODES (None: ACT_DEFAULT)


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token; validated on construction (temperature 0 = greedy argmax)."""

    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:  # also rejects NaN
            raise UsageError(
                f"temperature must be a finite number ≥ 0 (0 = greedy), got {self.temperature}",
                params=("temperature",),
            )
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"top_k must be at least 1, got {self.top_k}", params=("top_k",))
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}", params=("top_p",))
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise UsageError(f"min_p must be in [0, 1], got {self.min_p}", params=("min_p",))
        if not 0 < self.repetition_penalty < math.inf:
            raise UsageError(
                f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}",
                params=("repetition_penalty",),
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_lengths(config: ModelConfig, prompt_len: int, max_new_tokens: int, spec: CacheSpec | None = None) -> None:
    """Refuse a prompt plus continuation that would not fit the model's context (a window cache of a RoPE
    or ALiBi model has no such limit: it re-assigns positions within itself)."""
    limit = config.context_length
    if prompt_len < 1:
        raise UsageError("the prompt is empty; generation needs at least one token to start from")
    if max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}", params=("max_new_tokens",))
    if spec is not None and spec.unbounded(config):
        return
    if prompt_len >= limit:
        raise UsageError(
            f"the prompt is {prompt_len} tokens but the model's context length is {limit} tokens; "
            f"shorten it to at most {limit - 1} tokens"
        )
    if prompt_len + max_new_tokens > limit:
        raise UsageError(
            f"prompt ({prompt_len} tokens) + max_new_tokens {max_new_tokens} exceeds the context length "
            f"of {limit} tokens; use max_new_tokens {limit - prompt_len} or less",
            params=("max_new_tokens",),
        )


def check_act(act: str) -> str:
    """`act` when it names an activation precision for block weights (abi.py's ACT_MODES), else a usage error."""
    from gen_cli.native.abi import ACT_MODES

    if act not in ACT_MODES:
        raise UsageError(f"unknown activation precision {act!r}; choose {', '.join(ACT_MODES)}", params=("act",))
    return act
