"""gen's sanity bounds on sizes, checked before anything is allocated by them."""

from __future__ import annotations

import os

from gen_cli.errors import UsageError

# Upper bounds far above any model gen can run, so that a typo or a hostile config.json is refused
# before anything is sized by it (a million layers took minutes to build, 10^12 positions crashed).
SIZE_LIMITS = {
    "vocab_size": 1 << 22, "n_layer": 1024, "n_head": 1024, "n_kv_head": 1024, "d_model": 1 << 16,
    "d_ff": 1 << 18, "context_length": 1 << 20, "head_dim": 1 << 12,
}  # fmt: skip
NO_LIMITS_ENV = "GEN_NO_SIZE_LIMITS"


def check_size_limit(name: str, value: int) -> None:
    """Refuse a size above gen's sanity bound for `name` (lifted by GEN_NO_SIZE_LIMITS=1)."""
    limit = SIZE_LIMITS[name]
    if value > limit and os.environ.get(NO_LIMITS_ENV, "") in ("", "0"):
        raise UsageError(
            f"{name} {value} is above gen's limit of {limit:,}; set {NO_LIMITS_ENV}=1 to lift it", params=(name,)
        )
