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

__all__ = ["available_bytes", "check_fits", "check_load_fits", "generation_bytes", "parameter_count", "training_bytes"]

if TYPE_CHECKING:
    import torch

    from gen_cli.cache.spec import CacheSpec
    from gen_cli.model.config import ModelConfig

NO_CHECK_ENV = "GEN_NO_MEMORY_CHECK"


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory free for new tensors on `device` (None when unknown: no check is made); on the CPU the
    smallest of the system's available memory, the address space RLIMIT_AS leaves and the cgroup's room."""
    kind = getattr(device, "type", str(device).split(":")[0])
    try:
        if kind == "cpu":
            import psutil

            limits = [int(psutil.virtual_memory().available), _rlimit_room(), _cgroup_room()]
            return min(x for x in limits if x is not None)
        if kind == "cuda":
            import torch

            return int(torch.cuda.mem_get_info(device)[0])
    except Exception:  # an estimate we cannot make must never stop a run
        return None
    return None


def _rlimit_room() -> int | None:
    """Address space left under RLIMIT_AS (a mapped file counts in full there, touched or not)."""
    import resource

    import psutil

    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(0, soft - int(psutil.Process().memory_info().vms))


def _cgroup_room(root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 memory.max, else v1), None without one."""
    for limit, usage in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            text = (Path(root) / limit).read_text().strip()
            if text == "max" or int(text) >= 1 << 60:  # v1 writes "no limit" as a huge number
                return None
            return max(0, int(text) - int((Path(root) / usage).read_text()))
        except (OSError, ValueError):
            continue
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


def training_bytes(config: ModelConfig, batch: int, context: int, params: int, eager: bool = False) -> int:
    """fp32 weights, gradients and two AdamW moments, plus one step's saved activations and logits.

    A lower bound (the saved tensors only, no allocator slack): only what surely cannot fit is refused."""
    # Fused attention (SDPA) keeps no (T, T) scores; eager keeps every layer's probabilities for backward.
    activations = batch * context * (config.n_layer * (8 * config.d_model + 2 * config.d_ff) + 2 * config.vocab_size)
    scores = config.n_layer * batch * config.n_head * context * context if eager else 0
    return 16 * params + 4 * (activations + scores)


def check_tables_fit(config: ModelConfig, source: str) -> None:
    """Refuse, before loading, a config whose position tables (sized by its context length, not by any
    file) would not fit in this machine's free memory: an untrusted config.json may claim any length."""
    if config.pos_encoding != "rope":
        return  # learned tables are weights, checked against the file; sinusoidal ones only in gen's models
    need = 2 * config.context_length * config.head_dim * 4  # cos and sin, fp32
    check_fits(2 * need, f"{source}: the RoPE tables of a {config.context_length:,}-token context (twice, to leave "
               "room for the weights)", "this context length cannot run here")  # fmt: skip


LOAD_KV_TOKENS = 4096  # the KV cache a load is checked with: llama.cpp's default context, or the model's if shorter


def weight_file_bytes(path: Path) -> int:
    """The bytes of a model's weight files (a .gguf file; a folder's *.safetensors): what a load maps."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors") if p.is_file())


def check_load_fits(path: Path, config: ModelConfig | None = None, bytes_per_element: int = 2) -> None:
    """Refuse, before any weight is read, a model whose weight files plus a KV cache of LOAD_KV_TOKENS tokens
    (one sequence; none without `config`) cannot fit in the memory `available_bytes` finds; the message names
    both byte counts."""
    if os.environ.get(NO_CHECK_ENV, "") not in ("", "0"):
        return
    free = available_bytes("cpu")
    if free is None:
        return
    tokens = 0 if config is None else min(config.context_length, LOAD_KV_TOKENS)
    weights = weight_file_bytes(path)
    need = weights + (0 if config is None else generation_bytes(config, 1, tokens, bytes_per_element))
    if need > free:
        what = f"weights {gib(weights)}" + (f" and a {tokens:,}-token KV cache" if tokens else "")
        raise GenError(
            f"{path} needs {need:,} bytes ({gib(need)}: {what}) but only {free:,} bytes ({gib(free)}) are free "
            f"(the least of available memory, RLIMIT_AS and the cgroup limit); free memory or use a smaller or "
            f"more quantized model ({NO_CHECK_ENV}=1 skips this check)"
        )
