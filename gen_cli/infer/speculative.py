"""Speculative decoding: a cheap proposer guesses K tokens, one target forward over them checks them all.

Greedy output is the target's own greedy output token for token (each guess is kept only while it is the
target's argmax). With sampling, rejection sampling (Leviathan et al. 2023; Chen et al. 2023) keeps each
guess with probability min(1, p/q) and on rejection draws from normalize(max(0, p - q)), so every token
follows the target's distribution p exactly; p and q both pass through gen's sampling filters. The proposers
(prompt lookup, a draft model) live in `infer.proposers`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Protocol

import torch

from gen_cli.cache.spec import CacheSpec
from gen_cli.cache.window import Cache
from gen_cli.errors import UsageError
from gen_cli.infer.batch import native_rows
from gen_cli.infer.generate import (
    GenerationResult,
    StopIds,
    decode_step,
    measured_stats,
    new_cache,
    prefill,
    stop_id_tuple,
)
from gen_cli.infer.options import SamplingConfig
from gen_cli.infer.planner import Planner
from gen_cli.infer.sampling import distribution, draw
from gen_cli.model.transformer import Transformer
from gen_cli.runtime import LoadProbe, PeakMemory, synchronize

MAX_K = 16  # the most guesses an adaptive round makes: a longer verify forward costs more than it saves here


class Proposer(Protocol):
    """Guesses the next tokens of a sequence; `q` (k, V) is None for a deterministic guess (one-hot)."""

    name: str

    def start(self, prompt: list[int], max_tokens: int) -> None: ...

    def propose(
        self, ids: list[int], k: int, sampling: SamplingConfig, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]: ...

    def keep(self, n: int) -> None:
        """Only the first `n` ids of the sequence last proposed from (plus its guesses) are still true."""


def accept_or_resample(
    p: torch.Tensor, q: torch.Tensor | None, guess: int, generator: torch.Generator | None
) -> int | None:
    """Keep `guess` with probability min(1, p/q) (None: kept); else a token from normalize(max(0, p - q)).
    `q` None is a deterministic guess (q one-hot at `guess`). p, q: (V,) probabilities."""
    q_guess = 1.0 if q is None else float(q[guess])
    ratio = float(p[guess]) / q_guess
    if ratio >= 1.0 or float(torch.rand((), generator=generator, device=p.device)) < ratio:
        return None
    residual = p - q if q is not None else p.clone()
    if q is None:
        residual[guess] = 0.0
    residual = residual.clamp(min=0.0)
    total = float(residual.sum())
    if total <= 0.0:  # p == q up to rounding, and rejected on rounding: p itself is the residual's limit
        residual = p
    return int(draw(residual, generator))


@dataclass
class SpeculationStats:
    """What the proposer saved: guesses kept, tokens per target forward, where the time went."""

    proposer: str
    k: int
    adaptive: bool
    rounds: int = 0  # target forwards after the prefill (verifications and plain steps)
    verify_rounds: int = 0  # of which verified at least one guess
    proposed: int = 0
    accepted: int = 0
    target_s: float = 0.0
    draft_s: float = 0.0
    verify_tokens: int = 0  # tokens fed to verify forwards (guesses + the token before them)
    forward_s: float = 0.0  # in the target's forwards alone (the C call and its wrapper)
    rounds_s: float = 0.0  # in the rounds after the prefill, everything included
    held: int = 0  # plain steps the planner chose because no K was expected to beat one
    probes: int = 0  # of the rounds after such steps, those that guessed once to re-measure the acceptance
    k_counts: dict[int, int] = field(default_factory=dict)  # K -> verify rounds that proposed K guesses
    verify_steps: dict[int, float] = field(default_factory=dict)  # rows -> a forward over them, in plain steps

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.__dict__)
        out["acceptance_rate"] = self.accepted / self.proposed if self.proposed else None
        out["tokens_per_forward"] = (self.accepted + self.rounds) / self.rounds if self.rounds else None
        out["mean_k"] = self.proposed / self.verify_rounds if self.verify_rounds else None
        out["k_counts"] = {str(k): n for k, n in sorted(self.k_counts.items())}  # JSON keys are strings
        out["verify_steps"] = {str(n): round(c, 3) for n, c in self.verify_steps.items()}
        return out


@dataclass(frozen=True)
class Speculation:
    """How to speculate: the proposer, K guesses per round, and whether K follows the acceptance."""

    proposer: Proposer
    k: int = 4
    adaptive: bool = True
    on_round: Callable[[SpeculationStats], None] | None = field(default=None, compare=False)
    # Measured forward times, rows -> the latest readings, per (model, threads): later runs start from them.
    memory: dict[tuple[int, int], dict[int, deque[float]]] = field(default_factory=dict, compare=False, repr=False)

    def readings_for(self, model: Transformer) -> dict[int, deque[float]]:
        """The forward times the planner reads and adds to for this model at today's thread count."""
        return self.memory.setdefault((id(model), torch.get_num_threads()), {})

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 64:
            raise UsageError(f"speculation needs 1 to 64 guesses per round, got {self.k}", params=("speculate",))


def check_cache(spec: CacheSpec | None, use_cache: bool, num_samples: int) -> None:
    """Refuse what speculation cannot roll back or verify: no cache, a window ring, several rows."""
    if not use_cache or spec is None:
        raise UsageError("speculative decoding verifies guesses in the KV cache: it needs the cache on")
    if spec.window is not None:
        raise UsageError(
            "speculative decoding rolls rejected guesses back out of the cache, and a window cache overwrites "
            "its oldest slots, which cannot be rolled back; drop the window or the speculation",
            params=("window",),
        )
    if num_samples != 1:
        raise UsageError("speculative decoding continues one sequence; use one sample", params=("num_samples",))


def _pick(p: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    """A token from probabilities p (V,): argmax when greedy."""
    if sampling.greedy:
        return int(p.argmax())
    return int(draw(p, generator))


def plain_greedy(sampling: SamplingConfig) -> bool:
    """Greedy without a repetition penalty: the argmax of the logits alone picks each token."""
    return sampling.greedy and sampling.repetition_penalty == 1.0


def verify_guesses(
    rows: torch.Tensor,
    ids: list[int],
    guesses: list[int],
    q: torch.Tensor | None,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    argmax: Callable[[torch.Tensor], list[int]] | None = None,
) -> tuple[list[int], int]:
    """The guesses kept and the token that follows them, from the target's logits `rows` (K+1, V): row i
    follows ids + guesses[:i]. `argmax` picks each row's greedy token (default: torch's)."""
    if plain_greedy(sampling):  # one argmax over every row, then the longest agreeing prefix
        choices = argmax(rows) if argmax is not None else rows.argmax(-1).tolist()  # (K+1,)
        n = 0
        while n < len(guesses) and choices[n] == guesses[n]:
            n += 1
        return guesses[:n], choices[n]
    L = len(ids)
    history = torch.tensor([ids + guesses], dtype=torch.long, device=rows.device)  # (1, L + K)
    for i, guess in enumerate(guesses):
        p = distribution(rows[i : i + 1], history[:, : L + i], sampling)[0]  # (V,)
        if sampling.greedy:
            choice = int(p.argmax())
            verdict = None if choice == guess else choice
        else:
            verdict = accept_or_resample(p, None if q is None else q[i], guess, generator)
        if verdict is not None:
            return guesses[:i], verdict
    # Every guess kept: the last row gives one more token for free.
    p = distribution(rows[len(guesses) :], history, sampling)[0]
    return guesses, _pick(p, sampling, generator)


class _Argmax:
    """Each logit row's argmax in C where the model's native step has it, as the plain greedy loop picks (torch's
    argmax is a scalar loop: ~20 µs over 4k logits, a twentieth of the shipped model's whole step)."""

    def __init__(self, model: Transformer, rows: int) -> None:
        self.into = getattr(model.native_decoder, "argmax_into", None)
        self.out = torch.zeros(rows, dtype=torch.long)  # (rows,)
        self.view = self.out.numpy()  # reads without a torch op

    def __call__(self, logits: torch.Tensor) -> list[int]:
        n = logits.shape[0]
        if self.into is not None and n <= self.out.shape[0] and self.into(logits, self.out[:n]):
            return self.view[:n].tolist()
        return logits.argmax(-1).tolist()


def verify_forward(model: Transformer, fed: list[int], cache: Cache) -> torch.Tensor:
    """Logits (K+1, V) of the tokens `fed` at the cache's position, row i following fed[:i+1]; the cache
    advances past them. One C call over K+1 rows of the cache where gen's C step takes it (the weights read
    once, as a decode step reads them), else one PyTorch forward."""
    if (native := native_rows(model, [cache] * len(fed))) is not None:
        return native.forward(fed, cache)  # type: ignore[arg-type]
    ids = torch.tensor([fed], dtype=torch.long, device=cache.device)  # (1, K+1)
    return model(ids, cache=cache)[0]


@torch.inference_mode()
def speculative_run(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    sampling: SamplingConfig,
    cache: Cache,
    speculation: Speculation,
    generator: torch.Generator | None,
    stop_token_id: StopIds = None,
    on_tokens: Callable[[list[int]], bool] | None = None,
) -> tuple[list[int], SpeculationStats, list[float]]:
    """Generate up to `max_new_tokens` after `prompt` into the empty `cache`; (new ids, stats, seconds per round
    from the prefill on). `on_tokens(new)` returning True stops early."""
    proposer = speculation.proposer
    stats = SpeculationStats(proposer.name, speculation.k, speculation.adaptive)
    stops = set(stop_id_tuple(stop_token_id))
    device = cache.device
    ids = list(prompt)
    T = len(prompt)
    times: list[float] = []
    start = perf_counter()
    if max_new_tokens == 0:
        return [], stats, times
    t0 = perf_counter()
    logits = prefill(model, torch.tensor([ids], dtype=torch.long, device=device), cache)  # (1, V)
    p = distribution(logits, torch.tensor([ids], device=device), sampling)[0]  # (V,)
    ids.append(_pick(p, sampling, generator))
    stats.target_s += perf_counter() - t0
    proposer.start(prompt, T + max_new_tokens)
    times.append(perf_counter() - start)
    planner = Planner(speculation.readings_for(model), MAX_K) if speculation.adaptive else None
    # Whether the C step takes this cache's rows is settled once (no window: nothing depends on the position).
    rows = native_rows(model, [cache, cache]) if model.config.sliding_window is None else None
    argmax = _Argmax(model, max(MAX_K, speculation.k) + 1)
    fed = torch.zeros((1, 1), dtype=torch.long, device=device)  # (1, 1): a plain round's input, filled in place
    fed_view = fed.numpy() if fed.device.type == "cpu" else None
    new = [ids[-1]]
    stop = ids[-1] in stops or (on_tokens is not None and on_tokens(new))
    while not stop and len(ids) - T < max_new_tokens:
        round_start = perf_counter()
        room = max_new_tokens - (len(ids) - T) - 1  # guesses that fit beside the token each round adds
        k = min(speculation.k, room) if planner is None else planner.choose(room)
        guesses: list[int] = []
        q = None
        if k > 0:
            guesses, q = proposer.propose(ids, k, sampling, generator)
            proposer_s = perf_counter() - round_start
            stats.draft_s += proposer_s
        elif room > 0:
            stats.held += 1
        L = len(ids)  # the cache holds ids[:L-1]; ids[L-1] is fed now, before the guesses
        t0 = perf_counter()
        if not guesses and rows is not None:
            # The same C call as a verify, over one row: switching the native step between its single-token and
            # its rows set-up each round cost more than either (a loaded 2-core machine: plain rounds this way
            # 1.34x plain decoding, through the single-token step 1.15x, interleaved).
            verify = rows.forward(ids[-1:], cache)  # (1, V)
        elif not guesses:
            if fed_view is not None:
                fed_view[0, 0] = ids[-1]
            else:
                fed.fill_(ids[-1])
            verify = decode_step(model, fed, cache)  # (1, V): the C step
        else:
            block = ids[-1:] + guesses
            verify = rows.forward(block, cache) if rows is not None else verify_forward(model, block, cache)  # (K+1, V)
            stats.verify_rounds += 1
            stats.proposed += len(guesses)
            stats.verify_tokens += len(guesses) + 1
            stats.k_counts[len(guesses)] = stats.k_counts.get(len(guesses), 0) + 1
        forward_s = perf_counter() - t0
        stats.forward_s += forward_s
        if planner is not None:
            planner.measured(len(guesses) + 1, forward_s)
        kept, correction = verify_guesses(verify, ids, guesses, q, sampling, generator, argmax)
        stats.rounds += 1
        stats.accepted += len(kept)
        # The cache holds ids[:L-1] + the fed token + every guess; keep up to the last kept guess.
        cache.truncate(L + len(kept))
        proposer.keep(L + len(kept))
        stats.target_s += perf_counter() - t0
        if planner is not None and guesses:
            planner.verified(len(guesses), len(kept), proposer_s)
        new = [*kept, correction]
        for i, token in enumerate(new):
            if token in stops:
                new = new[: i + 1]
                stop = True
                break
        ids.extend(new)
        if on_tokens is not None and on_tokens(new):
            stop = True
        elapsed = perf_counter() - round_start
        stats.rounds_s += elapsed
        times.extend([elapsed / len(new)] * len(new))
        if speculation.on_round is not None:
            speculation.on_round(stats)
    if planner is not None:
        stats.probes = planner.probes
        step = planner.costs.get(1)
        stats.verify_steps = {n: c / step for n, c in sorted(planner.costs.items()) if step and n > 1}
    return ids[T:], stats, times


def run_speculative(
    model: Transformer,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig,
    speculation: Speculation,
    generator: torch.Generator | None = None,
    stop_token_id: StopIds = None,
    on_token: Callable[[torch.Tensor], bool] | None = None,
    spec: CacheSpec | None = CacheSpec(),
) -> GenerationResult:
    """`run_generation` with guesses verified by the target: same result (greedy: the same ids), timed, with
    the speculation's figures in `stats.speculation`."""
    check_cache(spec, spec is not None, prompt_ids.shape[0])
    device = prompt_ids.device
    T = prompt_ids.shape[1]
    interrupted = False
    new: list[int] = []

    def each(tokens: list[int]) -> bool:
        new.extend(tokens)
        stop = False
        if on_token is not None:
            for token in tokens:
                stop = on_token(torch.tensor([token], device=device)) or stop
        return stop

    synchronize(device)
    with PeakMemory(device) as mem, LoadProbe() as probe:
        cache = new_cache(model, prompt_ids, max_new_tokens, 1, spec)
        check_cache(CacheSpec.of(cache), True, 1)  # a model trained with a window may have been given one
        try:
            _, sstats, times = speculative_run(
                model, prompt_ids[0].tolist(), max_new_tokens, sampling, cache, speculation, generator,
                stop_token_id, each,
            )  # fmt: skip
        except KeyboardInterrupt:
            interrupted, sstats, times = True, SpeculationStats(speculation.proposer.name, speculation.k, False), []
    times = times[: len(new)]
    stats = measured_stats(model, cache, device, T, 1, 1, len(new), times[0] if times else 0.0, times[1:], mem, probe,
                           decode_path=_decode_path(model, cache))  # fmt: skip
    stats.speculation = sstats.to_dict()
    out = torch.tensor([new], dtype=torch.long, device=device).view(1, len(new))  # (1, new)
    return GenerationResult(out, stats, interrupted, cache)


def _decode_path(model: Transformer, cache: Cache) -> str:
    """Single-token steps (no guess) and verifications run in C when the native step takes this cache."""
    native = model.native_decoder
    step = "native" if native is not None and native.accepts(1, cache) else "torch"
    verify = "native" if native_rows(model, [cache, cache]) is not None else "torch"
    return f"{step} steps, {verify} verify"
