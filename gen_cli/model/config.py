"""ModelConfig: the shape of a trained model (never run-time options such as caching or dtype)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gen_cli.errors import GenError, UsageError
from gen_cli.resources import models_dir

POS_ENCODINGS = ("rope", "sinusoidal", "learned")
# Every tool that runs a shape without a trained model draws its weights from this seed, so their
# figures refer to the same model (and --seed changes only the sampling).
WEIGHT_SEED = 0
NORMS = ("rmsnorm", "layernorm")
ATTENTION_KINDS = ("mha", "gqa", "mqa")
# Upper bounds far above any model gen can run, so that a typo or a hostile config.json is refused
# before anything is sized by it (a million layers took minutes to build, 10^12 positions crashed).
SIZE_LIMITS = {
    "vocab_size": 1 << 22, "n_layer": 1024, "n_head": 1024, "n_kv_head": 1024, "d_model": 1 << 16,
    "d_ff": 1 << 18, "context_length": 1 << 20,
}  # fmt: skip
NO_LIMITS_ENV = "GEN_NO_SIZE_LIMITS"


def check_size_limit(name: str, value: int) -> None:
    """Refuse a size above gen's sanity bound for `name` (lifted by GEN_NO_SIZE_LIMITS=1)."""
    limit = SIZE_LIMITS[name]
    if value > limit and os.environ.get(NO_LIMITS_ENV, "") in ("", "0"):
        raise UsageError(
            f"{name} {value} is above gen's limit of {limit:,}; set {NO_LIMITS_ENV}=1 to lift it", params=(name,)
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer's shape; validated on construction."""

    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    d_model: int
    d_ff: int
    context_length: int
    pos_encoding: str = "rope"
    rope_base: float = 10000.0
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
            check_size_limit(name, value)
        for name in ("pos_encoding", "norm"):
            if not isinstance(getattr(self, name), str):
                raise UsageError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise UsageError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        for name in ("rope_base", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise UsageError(f"{name} must be a positive finite number, got {value!r}")
        if self.pos_encoding not in POS_ENCODINGS:
            raise UsageError(f"unknown positional encoding {self.pos_encoding!r}; choose {', '.join(POS_ENCODINGS)}")
        if self.norm not in NORMS:
            raise UsageError(f"unknown norm {self.norm!r}; choose {', '.join(NORMS)}")
        if self.d_model % self.n_head:
            ok = ", ".join(map(str, _divisors(self.d_model)[:12]))
            raise UsageError(
                f"d_model {self.d_model} is not divisible by {self.n_head} heads; head counts that divide it: {ok}"
            )
        if self.n_head % self.n_kv_head:
            ok = ", ".join(map(str, _divisors(self.n_head)))
            raise UsageError(
                f"{self.n_head} heads are not divisible by {self.n_kv_head} KV heads; KV head counts that work: {ok}"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2:
            even = [h for h in _divisors(self.d_model) if (self.d_model // h) % 2 == 0][:12]
            raise UsageError(
                f"RoPE needs an even head size, but {self.d_model}/{self.n_head} = {self.head_dim}; "
                f"head counts that give an even size: {', '.join(map(str, even))}"
            )
        if self.pos_encoding == "sinusoidal" and self.d_model % 2:
            raise UsageError(f"sinusoidal positions need an even d_model, got {self.d_model}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def attention_kind(self) -> str:
        """'mha' when every query head has its own KV head, 'mqa' for one shared, else 'gqa'."""
        if self.n_kv_head == self.n_head:
            return "mha"
        return "mqa" if self.n_kv_head == 1 else "gqa"

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        """KV-cache bytes one token costs for one sequence: 2 (k and v) × layers × kv heads × head size."""
        return 2 * self.n_layer * self.n_kv_head * self.head_dim * bytes_per_element

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from a dict (config.json), naming missing or unknown keys."""
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if missing := sorted(required - data.keys()):
            raise GenError(f"{source}: incomplete model config, missing {', '.join(missing)}")
        if unknown := sorted(data.keys() - fields):
            raise GenError(f"{source}: unknown model config keys {', '.join(unknown)}")
        return cls(**data)


def kv_heads_for(n_head: int, attention: str | None, kv_heads: int | None) -> int:
    """The KV head count that `--attention` / `--kv-heads` ask for, given the query head count."""
    if attention is None:
        return kv_heads if kv_heads is not None else n_head
    if attention not in ATTENTION_KINDS:
        raise UsageError(f"unknown attention kind {attention!r}; choose {', '.join(ATTENTION_KINDS)}")
    if attention == "mha":
        chosen = n_head
    elif attention == "mqa":
        chosen = 1
    else:
        # GQA default: the middle divisor, i.e. groups of about sqrt(n_head) query heads.
        strict = [d for d in _divisors(n_head) if 1 < d < n_head]
        if kv_heads is not None:
            chosen = kv_heads
        elif strict:
            chosen = strict[len(strict) // 2]
        else:
            raise UsageError(f"GQA needs a KV head count strictly between 1 and {n_head}, and none divides it")
    if kv_heads is not None and kv_heads != chosen:
        raise UsageError(
            f"attention {attention} means {chosen} KV heads, but kv_heads {kv_heads} was given",
            params=("attention", "kv_heads"),
        )
    return chosen  # divisibility is ModelConfig's check, when the caller builds the config


def presets_dir() -> Path:
    return models_dir() / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.json"))


def load_preset(name: str) -> ModelConfig:
    """A named preset shape from models/presets/NAME.json."""
    path = presets_dir() / f"{name}.json"
    if not path.is_file():
        raise UsageError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return ModelConfig.from_dict(json.loads(path.read_text(encoding="utf-8")), source=str(path))
