"""ModelConfig: the shape of a trained model (never run-time options such as caching or dtype)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gen_cli.errors import GenError, UsageError
from gen_cli.limits import SIZE_LIMITS, check_size_limit
from gen_cli.resources import models_dir

# alibi: no position embedding; a per-head linear bias on the attention logits (Press et al. 2022).
POS_ENCODINGS = ("rope", "sinusoidal", "learned", "alibi")
# Every tool that runs a shape without a trained model draws its weights from this seed, so their
# figures refer to the same model (and --seed changes only the sampling).
WEIGHT_SEED = 0
NORMS = ("rmsnorm", "layernorm")
ATTENTION_KINDS = ("mha", "gqa", "mqa")
# swiglu: w2(silu(w1 x) * w3 x) (Llama family); gelu / gelu_tanh: w2(gelu(w1 x)) (GPT-2 uses the tanh form).
MLP_KINDS = ("swiglu", "gelu", "gelu_tanh")
# RoPE frequency scalings and their required parameters: position interpolation (linear), NTK-aware base
# scaling, YaRN (optional beta_fast, beta_slow, attention_factor), Llama 3's wavelength bands, or
# per-frequency divisors as GGUF files store them.
ROPE_SCALINGS = {
    "linear": ("factor",),
    "ntk": ("factor",),
    "yarn": ("factor", "original_context_length"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_context_length"),
    "freq_factors": ("factors",),
}
# Properties added for imported models: omitted from to_dict at their defaults, so a standard gen model's
# config.json reads exactly as before (and older gen versions still read it).
_OPTIONAL = (
    "head_dim", "qkv_bias", "attn_out_bias", "mlp_bias", "qk_norm", "mlp", "rope_scaling", "sliding_window"
)  # fmt: skip


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and 0 < value < math.inf


def check_rope_scaling(scaling: Any, head_dim: int | None = None) -> None:
    """Refuse a rope_scaling whose values RoPE cannot use: the one check for config files, imports and the CLI.

    Every number finite and positive, the trained context a whole number within gen's limit, Llama 3's bands
    ordered (low < high) and YaRN's betas ordered (beta_slow < beta_fast), frequency factors one per pair."""
    if scaling is None:
        return
    kind = scaling.get("type") if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALINGS:
        raise UsageError(f"unknown rope_scaling {scaling!r:.200}; supported types: {', '.join(ROPE_SCALINGS)}")
    if missing := [k for k in ROPE_SCALINGS[kind] if k not in scaling]:
        raise UsageError(f"rope_scaling {kind} needs {', '.join(missing)}")
    for key in ("factor", "original_context_length", "low_freq_factor", "high_freq_factor", "beta_fast",
                "beta_slow", "attention_factor"):  # fmt: skip
        if key in scaling and not _positive(scaling[key]):
            raise UsageError(f"rope_scaling {kind} {key} must be a positive finite number, got {scaling[key]!r:.60}")
    orig = scaling.get("original_context_length")
    if orig is not None:
        if not isinstance(orig, int):
            raise UsageError(f"rope_scaling {kind} original_context_length must be a whole number, got {orig!r}")
        check_size_limit("context_length", orig)
    if kind == "llama3" and not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
        raise UsageError(
            f"rope_scaling llama3 needs low_freq_factor < high_freq_factor, got {scaling['low_freq_factor']!r} "
            f"and {scaling['high_freq_factor']!r}"
        )
    if kind == "yarn" and not scaling.get("beta_slow", 1.0) < scaling.get("beta_fast", 32.0):
        raise UsageError(
            f"rope_scaling yarn needs beta_slow < beta_fast, got {scaling.get('beta_slow', 1.0)!r} "
            f"and {scaling.get('beta_fast', 32.0)!r}"
        )
    if kind == "freq_factors":
        factors = scaling["factors"]
        if not isinstance(factors, list) or (head_dim is not None and len(factors) != head_dim // 2):
            raise UsageError(f"rope_scaling freq_factors needs head_dim/2 = {(head_dim or 0) // 2} factors")
        if bad := next(((i, f) for i, f in enumerate(factors) if not _positive(f)), None):
            raise UsageError(f"rope_scaling freq_factors: factor #{bad[0]} is {bad[1]!r}; each must be a positive "
                             "finite number")  # fmt: skip


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
    head_dim: int = None  # type: ignore[assignment]  # None: d_model / n_head (resolved on construction)
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    mlp: str = "swiglu"
    rope_scaling: dict[str, Any] | None = None  # {"type": one of ROPE_SCALINGS, its parameters}
    # Trained with sliding-window attention (Mistral): each query sees its last `sliding_window` positions
    # (itself included), at absolute positions. None: full causal attention.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        explicit_head_dim = self.head_dim is not None
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "context_length", "head_dim"):
            if name == "head_dim" and not explicit_head_dim:
                # Frozen: set through object.__setattr__; the derived size is checked below with d_model.
                object.__setattr__(self, "head_dim", max(1, self.d_model // self.n_head))
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
        if self.mlp not in MLP_KINDS:
            raise UsageError(f"unknown MLP kind {self.mlp!r}; choose {', '.join(MLP_KINDS)}")
        if self.pos_encoding not in POS_ENCODINGS:
            raise UsageError(f"unknown positional encoding {self.pos_encoding!r}; choose {', '.join(POS_ENCODINGS)}")
        if self.norm not in NORMS:
            raise UsageError(f"unknown norm {self.norm!r}; choose {', '.join(NORMS)}")
        if self.d_model % self.n_head and not explicit_head_dim:
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
        self._check_rope_scaling()
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise UsageError(f"sliding_window must be a positive integer or null, got {window!r}")

    def _check_rope_scaling(self) -> None:
        if self.rope_scaling is not None and self.pos_encoding != "rope":
            raise UsageError(
                f"rope_scaling needs pos_encoding rope (this model uses {self.pos_encoding})", params=("rope_scaling",)
            )
        check_rope_scaling(self.rope_scaling, self.head_dim)

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
        """The fields as config.json stores them; imported-model properties only when not at their default."""
        data = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)} | {"head_dim": self.d_model // self.n_head}
        for name in _OPTIONAL:
            if data[name] == defaults[name]:
                del data[name]
        return data

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


# The names a rope-scaling spec's options go by, and the ModelConfig.rope_scaling keys they set.
_SPEC_KEYS = {
    "orig": "original_context_length",
    "low": "low_freq_factor",
    "high": "high_freq_factor",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "attn": "attention_factor",
}
_SPEC_ALLOWED = {"linear": (), "ntk": (), "yarn": ("orig", "beta_fast", "beta_slow", "attn"),
                 "llama3": ("orig", "low", "high")}  # fmt: skip
ROPE_SCALING_SPECS = (
    "none, linear:F, ntk:F, yarn:F,orig=N[,beta_fast=B,beta_slow=B,attn=A], llama3:F,orig=N[,low=L,high=H]"
)


def parse_rope_scaling(spec: str) -> dict[str, Any] | None:
    """A ModelConfig.rope_scaling from a spec such as `linear:4`, `ntk:2`, `yarn:4,orig=256` or `none`."""

    def bad(why: str) -> UsageError:
        return UsageError(f"rope_scaling {spec!r}: {why}; forms: {ROPE_SCALING_SPECS}", params=("rope_scaling",))

    kind, _, rest = spec.strip().partition(":")
    if kind == "none" and not rest:
        return None
    if kind not in _SPEC_ALLOWED:
        raise bad(f"unknown kind {kind!r}")
    factor, *options = rest.split(",")
    scaling: dict[str, Any] = {"type": kind}
    try:
        scaling["factor"] = float(factor)
        for option in options:
            name, eq, value = option.partition("=")
            if not eq or name.strip() not in _SPEC_ALLOWED[kind]:
                allowed = ", ".join(f"{n}=" for n in _SPEC_ALLOWED[kind]) or "none"
                raise bad(f"unknown option {option!r} (options of {kind}: {allowed})")
            key = _SPEC_KEYS[name.strip()]
            scaling[key] = int(value) if key == "original_context_length" else float(value)
    except ValueError:
        raise bad("the factor and options must be numbers (orig a whole number of tokens)") from None
    if not 0 < scaling["factor"] < math.inf:
        raise bad("the factor must be a positive number")
    if kind in ("yarn", "llama3") and "original_context_length" not in scaling:
        raise bad(f"{kind} needs orig=N, the context length the model was trained with")
    if kind == "llama3":
        scaling = {"low_freq_factor": 1.0, "high_freq_factor": 4.0} | scaling  # Llama 3.1's values
    try:
        check_rope_scaling(scaling)
        _grown_context(scaling, scaling.get("original_context_length", 1))
    except UsageError as e:
        raise bad(str(e).removeprefix("rope_scaling ")) from None
    return scaling


def _grown_context(scaling: dict[str, Any], trained: int) -> int:
    """factor × the trained context, refused past gen's context limit (before int() of an overflow)."""
    grown = max(1.0, float(scaling.get("factor", 1.0))) * trained
    if not grown <= SIZE_LIMITS["context_length"] * 1024:  # far past any limit: never an int of inf
        raise UsageError(f"rope_scaling factor {scaling.get('factor')!r} × {trained} positions is beyond any "
                         f"context gen can hold (limit {SIZE_LIMITS['context_length']:,})")  # fmt: skip
    return int(grown)


def with_rope_scaling(config: ModelConfig, scaling: dict[str, Any] | None) -> ModelConfig:
    """The config with this RoPE scaling (None: plain RoPE), its context grown to factor × the trained context.

    The trained context is the scaling's `original_context_length`, else the one a previous scaling recorded,
    else the config's context length; it is recorded in the result, so a saved model keeps knowing it.
    """
    if scaling is None:
        return config.replace(rope_scaling=None)
    previous = (config.rope_scaling or {}).get("original_context_length")
    trained = int(scaling.get("original_context_length") or previous or config.context_length)
    scaling = {"original_context_length": trained} | scaling
    context = max(trained, _grown_context(scaling, trained))
    if config.rope_scaling is None:
        context = max(context, config.context_length)
    return config.replace(rope_scaling=scaling, context_length=context)


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
