"""Memory estimates checked before allocating: a request that cannot fit is refused with its estimate.

Estimates are deliberately simple (the big tensors only, erring low): they exist to stop a 16 GB KV
cache or a 60 GB logits tensor up front, not to predict peak RSS to the byte.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from gen_cli.errors import GenError
from gen_cli.model.info import parameter_count

__all__ = ["available_bytes", "check_fits", "generation_bytes", "parameter_count", "training_bytes"]

if TYPE_CHECKING:
    import torch

    from gen_cli.cache.spec import CacheSpec
    from gen_cli.model.config import ModelConfig

NO_CHECK_ENV = "GEN_NO_MEMORY_CHECK"


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def cgroup_free(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")) -> int | None:
    """What this process's memory cgroup still allows (limit − usage; v2 or v1), None without a limit."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, where = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy
            files, base = ("memory.max", "memory.current"), root
        elif "memory" in controllers.split(","):
            files, base = ("memory.limit_in_bytes", "memory.usage_in_bytes"), root / "memory"
        else:
            continue
        # The process's own cgroup, else the mount's root (a container sees its cgroup there).
        for folder in (base / where.lstrip("/"), base):
            limit, used = _read_int(folder / files[0]), _read_int(folder / files[1])
            if limit is not None and used is not None and limit < 1 << 60:  # v1 writes "no limit" as ~2^63
                return max(0, limit - used)
    return None


def address_space_free() -> int | None:
    """What RLIMIT_AS still lets this process map (limit − mapped now), None without a limit."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * resource.getpagesize()
    except (ImportError, OSError, ValueError):
        return None
    return max(0, soft - mapped)


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory free for new tensors on `device` (None when unknown: no check is made). On the CPU the
    smallest of the system's available memory, what RLIMIT_AS still allows and the cgroup's room."""
    kind = getattr(device, "type", str(device).split(":")[0])
    try:
        if kind == "cpu":
            import psutil

            found = [int(psutil.virtual_memory().available), address_space_free(), cgroup_free()]
            return min(n for n in found if n is not None)
        if kind == "cuda":
            import torch

            return int(torch.cuda.mem_get_info(device)[0])
    except Exception:  # an estimate we cannot make must never stop a run
        return None
    return None


def check_fits(need: int, what: str, advice: str, device: torch.device | str = "cpu", params: tuple = ()) -> None:
    """Refuse `need` bytes for `what` when the device has less available (GEN_NO_MEMORY_CHECK=1 skips)."""
    if os.environ.get(NO_CHECK_ENV, "") not in ("", "0"):
        return
    free = available_bytes(device)
    if free is not None and need > free:
        raise GenError(
            f"{what} needs about {gib(need)} but only {gib(free)} of memory is available; {advice}", params=params
        )


def generation_bytes(
    config: ModelConfig,
    batch: int,
    tokens: int,
    bytes_per_element: int,
    spec: CacheSpec | None = None,
    id_tokens: int | None = None,
) -> int:
    """The KV cache `spec` allocates for batch × tokens (its kinds, scales included, and a window's slots;
    None: every token unquantized at bytes_per_element), the int64 id buffer of `id_tokens` (prompt and new
    tokens; `tokens` when None) and the sampling buffers per sequence."""
    from gen_cli.cache.spec import CacheSpec

    kv = (spec or CacheSpec()).nbytes(config, tokens, batch, bytes_per_element)
    return kv + batch * (8 * (tokens if id_tokens is None else id_tokens) + sampling_bytes(config.vocab_size))


def sampling_bytes(vocab_size: int) -> int:
    """One sequence's sampling buffers: fp32 logits, probabilities and a sorted copy with its int64 order."""
    return 32 * vocab_size


def training_bytes(config: ModelConfig, batch: int, context: int, params: int) -> int:
    """fp32 weights, gradients and two AdamW moments, plus one step's saved activations and logits.

    A lower bound (the saved tensors only, no allocator slack): only what surely cannot fit is refused."""
    # Attention runs in a fused kernel (scaled_dot_product_attention): no (T, T) scores are kept.
    activations = batch * context * (config.n_layer * (8 * config.d_model + 2 * config.d_ff) + 2 * config.vocab_size)
    return 16 * params + 4 * activations


def check_tables_fit(config: ModelConfig, source: str) -> None:
    """Refuse, before loading, a config whose position tables (sized by its context length, not by any
    file) would not fit in this machine's free memory: an untrusted config.json may claim any length."""
    if config.pos_encoding != "rope":
        return  # learned tables are weights, checked against the file; sinusoidal ones only in gen's models
    need = 2 * config.context_length * config.head_dim * 4  # cos and sin, fp32
    check_fits(2 * need, f"{source}: the RoPE tables of a {config.context_length:,}-token context (twice, to leave "
               "room for the weights)", "this context length cannot run here")  # fmt: skip
