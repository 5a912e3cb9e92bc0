"""Autoregressive generation on token ids: prefill, decode_step, a generator of next tokens, timing.

Knows nothing about text. Without a cache every step recomputes the whole sequence: that slow path
is the oracle the cached path is tested against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from time import perf_counter

import torch

from gen_cli.cache.spec import CacheSpec
from gen_cli.cache.window import Cache
from gen_cli.errors import InternalError, UsageError
from gen_cli.infer.options import SamplingConfig, check_lengths
from gen_cli.infer.sampling import sample_next
from gen_cli.infer.stats import GenerationStats
from gen_cli.model.transformer import Transformer
from gen_cli.runtime import LoadProbe, PeakMemory, dtype_name, synchronize


@torch.inference_mode()
def prefill(model: Transformer, idx: torch.Tensor, cache: Cache) -> torch.Tensor:
    """Run the prompt (B, T) through the model, filling the cache; logits (B, V) for the last position."""
    return model(idx, cache=cache, last_only=True)[:, -1]


@torch.inference_mode()
def decode_step(model: Transformer, token: torch.Tensor, cache: Cache) -> torch.Tensor:
    """One token per row (B, 1) through the model at cache.pos; logits (B, V).

    A model prepared by `optimize_for_decode` may carry a native (C) step for CPU decode: one call
    instead of ~20 PyTorch ops per layer, with the same fp32 logits (tested; a bf16 model's come out
    in fp32 and closer to fp32 than PyTorch's bf16 path).
    """
    native = model.native_decoder
    trained = model.config.sliding_window  # the C step has no window mask: past the window PyTorch masks
    if native is not None and (trained is None or cache.pos < trained) and native.accepts(token.shape[0], cache):
        return native(token, cache)
    return model(token, cache=cache)[:, -1]


@torch.inference_mode()
def full_forward(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """The whole sequence (B, T) without a cache; logits (B, V) for the last position: the oracle's step."""
    return model(ids, last_only=True)[:, -1]


StopIds = int | Collection[int] | None  # one end-of-sequence id, several (every end-of-turn id), or none


def stop_id_tuple(stop: StopIds) -> tuple[int, ...]:
    """The stop ids as a tuple (empty for None)."""
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, int) else tuple(dict.fromkeys(stop))


def model_dtype(model: Transformer) -> torch.dtype:
    return next(model.parameters()).dtype


def new_cache(
    model: Transformer,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    num_samples: int = 1,
    spec: CacheSpec | None = None,
) -> Cache:
    """A cache exactly large enough for this generation as `spec` describes it (default: the model's dtype,
    every token kept): prompt + new tokens, B × num_samples rows, or a window's slots however long it runs.
    A model trained with a sliding window gets a ring of that window when the generation is longer (exact:
    same distances).

    Checks the spec, the lengths and the memory first, so nothing is allocated for a generation that cannot run.
    """
    config, (B0, T) = model.config, prompt_ids.shape
    batch, tokens = B0 * num_samples, T + max_new_tokens
    spec = spec or CacheSpec()
    spec.check(config)
    check_lengths(config, T, max_new_tokens, spec)
    trained = config.sliding_window
    if spec.window is None and trained is not None and tokens > trained:
        spec = CacheSpec(spec.k_kind, spec.v_kind, trained)
    check_memory(model, batch, tokens, prompt_ids.device, spec)
    return spec.allocate(config, batch, tokens, model_dtype(model), prompt_ids.device)


def generate(
    model: Transformer,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig,
    cache: Cache | None,
    generator: torch.Generator | None = None,
    stop_token_id: StopIds = None,
    num_samples: int = 1,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids, (B × num_samples,), once per step; validates lengths before starting.

    `cache`: an empty cache for this generation (`new_cache`), or None for the no-cache oracle, which
    recomputes the whole sequence every step. Each yielded tensor is one column of the buffer holding
    every id so far: a view, not to be modified. With `num_samples` > 1 each prompt row is continued
    num_samples times, sharing one prefill. Rows that emitted a stop id (`stop_token_id`: one id or
    several, e.g. every end-of-turn id) keep yielding it (the first, when several); generation ends when
    every row has.
    """
    _check(model, prompt_ids, max_new_tokens, num_samples, cache)
    steps = _steps(model, prompt_ids, max_new_tokens, sampling, cache, generator, stop_token_id, num_samples)
    return _tokens(steps)


def greedy_steps(
    model: Transformer,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    cache: Cache | None,
    forced: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (logits (B, V), token (B,)) per step of greedy generation: `generate`'s own loop, for the
    benches and the oracle checks that compare logits. With `forced` (B, max_new_tokens), the given
    tokens are fed instead of the greedy ones (teacher forcing); the logits are still the model's."""
    _check(model, prompt_ids, max_new_tokens, 1, cache)
    if forced is not None and tuple(forced.shape) != (prompt_ids.shape[0], max_new_tokens):
        raise ValueError(f"forced must be (B, max_new_tokens), got {tuple(forced.shape)}")
    return _steps(model, prompt_ids, max_new_tokens, SamplingConfig(temperature=0.0), cache, forced=forced)


def continue_steps(
    model: Transformer,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig,
    cache: Cache,
    generator: torch.Generator | None = None,
    stop_token_id: StopIds = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`generate`'s loop on a cache that already holds the k/v of prompt_ids[:, :cache.pos]: only the rest
    is prefilled. Yields (logits (B, V), token (B,)) per step; the no-cache oracle is `generate` on prompt_ids.
    """
    if prompt_ids.dim() != 2:
        raise UsageError(f"prompt_ids must be (B, T), got shape {tuple(prompt_ids.shape)}")
    check_lengths(model.config, prompt_ids.shape[1], max_new_tokens, CacheSpec.of(cache))
    rows, tokens = prompt_ids.shape
    limit = cache.sequence_limit
    short = limit is not None and limit < tokens + max_new_tokens
    # At least one token must be prefilled: its logits pick the first new token.
    if cache.batch_size != rows or not cache.pos < tokens or short:
        raise InternalError(
            f"continue_steps needs a cache of {rows} rows, at least {tokens + max_new_tokens} tokens, holding fewer "
            f"than the prompt's {tokens}; got {cache.batch_size} rows, {cache.max_tokens} tokens, at {cache.pos}"
        )
    return _steps(model, prompt_ids, max_new_tokens, sampling, cache, generator, stop_token_id)


def _check(
    model: Transformer, prompt_ids: torch.Tensor, max_new_tokens: int, num_samples: int, cache: Cache | None
) -> None:
    if prompt_ids.dim() != 2:
        raise UsageError(f"prompt_ids must be (B, T), got shape {tuple(prompt_ids.shape)}")
    if num_samples < 1:
        raise UsageError(f"num_samples must be at least 1, got {num_samples}", params=("num_samples",))
    spec = CacheSpec.of(cache) if cache is not None else None
    check_lengths(model.config, prompt_ids.shape[1], max_new_tokens, spec)
    if cache is not None:
        rows, tokens = prompt_ids.shape[0] * num_samples, prompt_ids.shape[1] + max_new_tokens
        limit = cache.sequence_limit  # None: a window runs past its slots
        short = limit is not None and limit < tokens
        if cache.pos != 0 or cache.batch_size != rows or short:
            raise InternalError(
                f"generate needs an empty cache of {rows} rows and at least {tokens} tokens; got {cache.batch_size} "
                f"rows, {cache.max_tokens} tokens, at position {cache.pos} (make one with new_cache)"
            )


def check_memory(
    model: Transformer,
    batch: int,
    tokens: int,
    device: torch.device,
    spec: CacheSpec | None = None,
) -> None:
    """Refuse a generation whose KV cache (batch × tokens as `spec` holds them) and buffers cannot fit."""
    from gen_cli.memory import check_fits, generation_bytes

    bpe = torch.empty((), dtype=model_dtype(model)).element_size()
    check_fits(
        generation_bytes(model.config, batch, tokens, bpe, spec),
        f"a KV cache for {batch:,} sequence(s) of {tokens:,} tokens",
        "use fewer num_samples (or a smaller batch) or fewer max_new_tokens",
        device,
        params=("num_samples", "max_new_tokens"),
    )


def _tokens(steps: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[torch.Tensor]:
    with contextlib.closing(steps):  # closing this generator closes the loop's
        for _, token in steps:
            yield token


def _steps(
    model: Transformer,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig,
    cache: Cache | None,
    generator: torch.Generator | None = None,
    stop_token_id: StopIds = None,
    num_samples: int = 1,
    forced: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The one generation loop: prefill (or the oracle's full forward), then pick, yield, decode a step."""
    B0, T = prompt_ids.shape
    B = B0 * num_samples
    # The id buffer and sampling rows, checked here for every caller: a window cache's own estimate
    # counts its slots, not the prompt + max_new_tokens ids this buffer holds.
    from gen_cli.memory import check_fits, sampling_bytes

    check_fits(
        B * (8 * (T + max_new_tokens) + sampling_bytes(model.config.vocab_size)),
        f"the ids and sampling buffers of {B:,} sequence(s) of {T + max_new_tokens:,} tokens",
        "use fewer num_samples or fewer max_new_tokens",
        prompt_ids.device,
        params=("num_samples", "max_new_tokens"),
    )
    # One preallocated id buffer: the no-cache input and the repetition-penalty history are views of it.
    ids = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=prompt_ids.device)
    ids[:, :T] = prompt_ids.repeat_interleave(num_samples, dim=0)  # (B, T)
    if max_new_tokens == 0:
        return
    if cache is None:
        logits = full_forward(model, ids[:, :T])
    elif num_samples > 1 and B0 == 1:
        # Share one prefill: run the prompt once into row 0 of the cache, copy its k/v to the other rows.
        first = cache.first_row()
        logits = prefill(model, ids[:1, :T], first).expand(B, -1)  # (B, V)
        cache.replicate_first_row(first.pos)
    else:  # from cache.pos: 0 for `generate`, the cached prefix's end for `continue_steps`
        logits = prefill(model, ids[:, cache.pos : T], cache)
    stops = stop_id_tuple(stop_token_id)
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device) if stops else None
    stop_set = torch.tensor(stops, dtype=torch.long, device=ids.device) if len(stops) > 1 else None
    # Plain greedy beside a native step picks in C, straight into the id buffer: torch's argmax is a
    # scalar loop, and the column write one more op (measured: +10% tok/s on tiny, +2% on small).
    native = model.native_decoder
    argmax_into = (
        native.argmax_into if native is not None and sampling.greedy and sampling.repetition_penalty == 1 else None
    )
    cur = T
    for step in range(max_new_tokens):
        token = ids[:, cur]  # (B,) a view: the column this step fills
        if forced is not None:
            token.copy_(forced[:, step])
        elif argmax_into is None or not argmax_into(logits, token):
            token.copy_(sample_next(logits, ids[:, :cur], sampling, generator))
        if finished is not None:
            token.masked_fill_(finished, stops[0])
            finished |= token == stops[0] if stop_set is None else torch.isin(token, stop_set)
        cur += 1
        yield logits, token
        if step == max_new_tokens - 1 or (finished is not None and bool(finished.all())):
            return
        # The oracle recomputes the whole sequence; the cached path feeds only the newest token.
        logits = (
            full_forward(model, ids[:, :cur]) if cache is None else decode_step(model, ids[:, cur - 1 : cur], cache)
        )


@dataclass
class GenerationResult:
    """Generated ids (B, new_tokens), the stats, and whether Ctrl-C cut it short."""

    tokens: torch.Tensor
    stats: GenerationStats
    interrupted: bool = False
    cache: Cache | None = None  # the generation's cache (its first prompt_tokens positions hold the prompt)


def run_generation(
    model: Transformer,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    stop_token_id: StopIds = None,
    num_samples: int = 1,
    on_token: Callable[[torch.Tensor], bool] | None = None,
    spec: CacheSpec | None = None,
    restore: Callable[[Cache], None] | None = None,
) -> GenerationResult:
    """Run `generate` under the clock and a peak-memory probe; `on_token(ids)` returning True stops early.
    `spec` describes the cache (`new_cache`); it needs `use_cache`.

    `restore(cache)` may fill a prefix of the new cache (a prompt-cache file) inside the clock; only the
    rest of the prompt is then prefilled (`continue_steps`), and the result carries the cache.

    Each step's latency runs from resuming the generator to its yield (device synchronised), so time
    spent in `on_token` (printing) is not counted. Ctrl-C ends the run and sets `interrupted`.
    """
    device = prompt_ids.device
    B0, T = prompt_ids.shape
    batch = B0 * num_samples
    steps: list[torch.Tensor] = []
    latencies: list[float] = []
    interrupted = False
    cache: Cache | None = None
    if spec is not None and spec.window is not None and not use_cache:
        raise UsageError("a window is a kind of KV cache: it needs the cache on", params=("window",))
    synchronize(device)
    with PeakMemory(device) as mem, LoadProbe() as probe:
        start = perf_counter()
        if use_cache:
            cache = new_cache(model, prompt_ids, max_new_tokens, num_samples, spec)
            if restore is not None:
                restore(cache)
        else:  # no cache, but activations of the same order for every row
            check_memory(model, batch, T + max_new_tokens, device)
        reused = cache.pos if cache is not None else 0
        if reused:
            steps_ = continue_steps(model, prompt_ids, max_new_tokens, sampling, cache, generator, stop_token_id)
            tokens = _tokens(steps_)
        else:
            tokens = generate(model, prompt_ids, max_new_tokens, sampling, cache, generator, stop_token_id, num_samples)
        resumed = start
        try:
            for token in tokens:
                synchronize(device)
                latencies.append(perf_counter() - resumed)
                steps.append(token)
                if on_token is not None and on_token(token):
                    break
                resumed = perf_counter()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            tokens.close()
    ttft = latencies[0] if latencies else perf_counter() - start
    stats = measured_stats(model, cache, device, T, B0, batch, len(steps), ttft, latencies[1:], mem, probe, reused)
    out = torch.stack(steps, dim=1) if steps else torch.empty(batch, 0, dtype=torch.long, device=device)
    return GenerationResult(out, stats, interrupted, cache)


def measured_stats(
    model: Transformer,
    cache: Cache | None,
    device: torch.device,
    prompt_tokens: int,
    prompt_rows: int,
    batch: int,
    new_tokens: int,
    ttft: float,
    step_latencies: list[float],
    mem: PeakMemory,
    probe: LoadProbe,
    reused: int = 0,
    decode_path: str | None = None,
) -> GenerationStats:
    """A run's figures from what was measured: `prompt_rows` distinct prompts prefilled (the rest of a batch
    shares them), `step_latencies` per decode step of all `batch` rows; the decode path as the cache allows
    (with its reason), unless the caller names it."""
    decode_time, n_decode = sum(step_latencies), len(step_latencies)
    dtype = model_dtype(model)
    bpe = torch.empty((), dtype=dtype).element_size()
    native = model.native_decoder
    held = CacheSpec.of(cache) if cache is not None else CacheSpec()
    reason = ""
    if decode_path is None:
        decode_path = "native" if native is not None and cache is not None and native.accepts(batch, cache) else "torch"
        reason = native.refusal(batch, cache) if native is not None and cache is not None else ""
    return GenerationStats(
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        ttft_s=ttft,
        prefill_tokens_per_s=(prompt_tokens - reused) * prompt_rows / ttft if ttft > 0 else 0.0,
        decode_tokens_per_s=n_decode * batch / decode_time if n_decode > 0 and decode_time > 0 else None,
        ms_per_token=1000 * decode_time / n_decode if n_decode > 0 else None,
        kv_cache_bytes=cache.nbytes if cache is not None else 0,
        kv_cache_bytes_analytic=held.nbytes(model.config, cache.max_tokens, batch, bpe) if cache is not None else 0,
        peak_memory_bytes=mem.bytes,
        memory_method=mem.method,
        device=str(device),
        dtype=dtype_name(dtype),
        threads=torch.get_num_threads(),
        batch=batch,
        decode_path=decode_path,
        decode_path_reason=reason,
        kv_dtype_k=cache.k_kind if cache is not None else "",
        kv_dtype_v=cache.v_kind if cache is not None else "",
        kv_window=held.window or 0,
        kv_sinks=held.sinks,
        machine_load=probe.measure().to_dict(),
        per_token_latencies=step_latencies,
        reused_prompt_tokens=reused,
        native_threads=native.threads.report() if native is not None and decode_path == "native" else {},
    )
