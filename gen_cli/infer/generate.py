"""Autoregressive generation on token ids: prefill, decode_step, a generator of next tokens, timing.

Knows nothing about text. Without a cache every step recomputes the whole sequence: that slow path
is the oracle the cached path is tested against.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from gen_cli.errors import UsageError
from gen_cli.infer.sampling import SamplingConfig, sample_next
from gen_cli.model.config import ModelConfig
from gen_cli.model.kv_cache import KVCache
from gen_cli.model.transformer import Transformer
from gen_cli.runtime import LoadProbe, PeakMemory, dtype_name, synchronize


@torch.inference_mode()
def prefill(model: Transformer, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the prompt (B, T) through the model, filling the cache; logits (B, V) for the last position."""
    return model(idx, cache=cache, last_only=True)[:, -1]


@torch.inference_mode()
def decode_step(model: Transformer, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One token per row (B, 1) through the model at cache.pos; logits (B, V).

    A model prepared by `optimize_for_decode` may carry a native (C) step for CPU decode: one call
    instead of ~20 PyTorch ops per layer, with the same fp32 logits (tested; a bf16 model's come out
    in fp32 and closer to fp32 than PyTorch's bf16 path).
    """
    native = getattr(model, "native_decoder", None)
    if native is not None and native.accepts(token.shape[0], cache):
        return native(token, cache)
    return model(token, cache=cache)[:, -1]


@torch.inference_mode()
def _full_forward(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, last_only=True)[:, -1]  # no cache: recompute every position


def check_lengths(config: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse a prompt plus continuation that would not fit the model's context."""
    limit = config.context_length
    if prompt_len < 1:
        raise UsageError("the prompt is empty; generation needs at least one token to start from")
    if max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}", params=("max_new_tokens",))
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


def model_dtype(model: Transformer) -> torch.dtype:
    return next(model.parameters()).dtype


def generate(
    model: Transformer,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    stop_token_id: int | None = None,
    num_samples: int = 1,
    cache: KVCache | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids, (B × num_samples,), once per step; validates lengths before starting.

    Each yielded tensor is one column of the buffer holding every id so far: a view, not to be modified.

    With `num_samples` > 1 each prompt row is continued num_samples times, sharing one prefill.
    Rows that emitted `stop_token_id` keep yielding it; generation ends when every row has.
    Pass `cache` to own it (sized for B × num_samples rows); otherwise one is made when use_cache.
    """
    if prompt_ids.dim() != 2:
        raise UsageError(f"prompt_ids must be (B, T), got shape {tuple(prompt_ids.shape)}")
    if num_samples < 1:
        raise UsageError(f"num_samples must be at least 1, got {num_samples}", params=("num_samples",))
    check_lengths(model.config, prompt_ids.shape[1], max_new_tokens)
    if use_cache and cache is None:
        cache = new_cache(model, prompt_ids, max_new_tokens, num_samples)
    if cache is not None and cache.pos != 0:
        raise UsageError("generate() needs an empty KV cache; call cache.reset() first")
    return _generate(model, prompt_ids, max_new_tokens, sampling, cache, generator, stop_token_id, num_samples)


def new_cache(model: Transformer, prompt_ids: torch.Tensor, max_new_tokens: int, num_samples: int) -> KVCache:
    """A cache exactly large enough for this generation: prompt + new tokens, B × num_samples rows."""
    batch = prompt_ids.shape[0] * num_samples
    tokens = prompt_ids.shape[1] + max_new_tokens
    return KVCache(model.config, batch, tokens, model_dtype(model), prompt_ids.device)


def _generate(
    model: Transformer,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig,
    cache: KVCache | None,
    generator: torch.Generator | None,
    stop_token_id: int | None,
    num_samples: int,
) -> Iterator[torch.Tensor]:
    B0, T = prompt_ids.shape
    B = B0 * num_samples
    # One preallocated id buffer: the no-cache input and the repetition-penalty history are views of it.
    ids = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=prompt_ids.device)
    ids[:, :T] = prompt_ids.repeat_interleave(num_samples, dim=0)  # (B, T)
    if max_new_tokens == 0:
        return
    if cache is None:
        logits = _full_forward(model, ids[:, :T])
    elif num_samples > 1 and B0 == 1:
        # Share one prefill: run the prompt once into row 0 of the cache, copy its k/v to the other rows.
        first = cache.first_row()
        logits = prefill(model, ids[:1, :T], first).expand(B, -1)  # (B, V)
        cache.replicate_first_row(first.pos)
    else:
        logits = prefill(model, ids[:, :T], cache)
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device) if stop_token_id is not None else None
    # Plain greedy beside a native step picks in C, straight into the id buffer: torch's argmax is a
    # scalar loop, and the column write one more op (measured: +10% tok/s on tiny, +2% on small).
    native = getattr(model, "native_decoder", None)
    argmax_into = (
        native.argmax_into if native is not None and sampling.greedy and sampling.repetition_penalty == 1 else None
    )
    cur = T
    for step in range(max_new_tokens):
        token = ids[:, cur]  # (B,) a view: the column this step fills
        if argmax_into is None or not argmax_into(logits, token):
            token.copy_(sample_next(logits, ids[:, :cur], sampling, generator))
        if finished is not None:
            token.masked_fill_(finished, stop_token_id)
            finished |= token == stop_token_id
        cur += 1
        yield token
        if step == max_new_tokens - 1 or (finished is not None and bool(finished.all())):
            return
        # The oracle recomputes the whole sequence; the cached path feeds only the newest token.
        logits = (
            _full_forward(model, ids[:, :cur]) if cache is None else decode_step(model, ids[:, cur - 1 : cur], cache)
        )


@dataclass
class GenerationStats:
    """What one generation measured. Rates count every row; ms_per_token is per decode step."""

    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float | None
    ms_per_token: float | None
    kv_cache_bytes: int
    kv_cache_bytes_analytic: int
    peak_memory_bytes: int
    memory_method: str
    device: str
    dtype: str
    threads: int
    batch: int
    decode_path: str  # "native" (gen's C step) or "torch"
    machine_load: dict[str, Any] = field(default_factory=dict)  # MachineLoad.to_dict() over the run
    per_token_latencies: list[float] = field(default_factory=list)

    def to_dict(self, latencies: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not latencies:
            data.pop("per_token_latencies")
        return data


@dataclass
class GenerationResult:
    """Generated ids (B, new_tokens), the stats, and whether Ctrl-C cut it short."""

    tokens: torch.Tensor
    stats: GenerationStats
    interrupted: bool = False


def run_generation(
    model: Transformer,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    stop_token_id: int | None = None,
    num_samples: int = 1,
    on_token: Callable[[torch.Tensor], bool] | None = None,
) -> GenerationResult:
    """Run `generate` under the clock and a peak-memory probe; `on_token(ids)` returning True stops early.

    Each step's latency runs from resuming the generator to its yield (device synchronised), so time
    spent in `on_token` (printing) is not counted. Ctrl-C ends the run and sets `interrupted`.
    """
    device = prompt_ids.device
    B0, T = prompt_ids.shape
    batch = B0 * num_samples
    dtype = model_dtype(model)
    steps: list[torch.Tensor] = []
    latencies: list[float] = []
    interrupted = False
    cache: KVCache | None = None
    synchronize(device)
    with PeakMemory(device) as mem, LoadProbe() as probe:
        start = time.perf_counter()
        if use_cache:
            check_lengths(model.config, T, max_new_tokens)
            cache = new_cache(model, prompt_ids, max_new_tokens, num_samples)
        tokens = generate(
            model, prompt_ids, max_new_tokens, sampling, use_cache, generator, stop_token_id, num_samples, cache
        )
        resumed = start
        try:
            for token in tokens:
                synchronize(device)
                latencies.append(time.perf_counter() - resumed)
                steps.append(token)
                if on_token is not None and on_token(token):
                    break
                resumed = time.perf_counter()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            tokens.close()
    ttft = latencies[0] if latencies else time.perf_counter() - start
    decode_time = sum(latencies[1:])
    n_decode = len(latencies) - 1
    bpe = torch.empty((), dtype=dtype).element_size()
    native = getattr(model, "native_decoder", None)
    stats = GenerationStats(
        prompt_tokens=T,
        new_tokens=len(steps),
        ttft_s=ttft,
        # The shared prefill processes each distinct prompt row once.
        prefill_tokens_per_s=T * B0 / ttft if ttft > 0 else 0.0,
        decode_tokens_per_s=n_decode * batch / decode_time if n_decode > 0 and decode_time > 0 else None,
        ms_per_token=1000 * decode_time / n_decode if n_decode > 0 else None,
        kv_cache_bytes=cache.nbytes if cache is not None else 0,
        kv_cache_bytes_analytic=(
            KVCache.analytic_bytes(model.config, cache.max_tokens, batch, bpe) if cache is not None else 0
        ),
        peak_memory_bytes=mem.bytes,
        memory_method=mem.method,
        device=str(device),
        dtype=dtype_name(dtype),
        threads=torch.get_num_threads(),
        batch=batch,
        decode_path="native" if native is not None and cache is not None and native.accepts(batch, cache) else "torch",
        machine_load=probe.measure().to_dict(),
        per_token_latencies=latencies[1:],
    )
    out = torch.stack(steps, dim=1) if steps else torch.empty(batch, 0, dtype=torch.long, device=device)
    return GenerationResult(out, stats, interrupted)
