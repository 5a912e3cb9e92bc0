"""Closed-loop serving bench on the scheduler itself (no HTTP): N clients each send a request, wait for its
last token, and send the next. Throughput, time to first token and inter-token latency per scheduling mode
(one at a time, static batches, continuous batching), the modes interleaved round by round; the prefix cache
on and off with one shared system prompt, or with multi-turn conversations (each prompt the last one + its
answer + a new message)."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gen_cli.cache.paged import BLOCK_TOKENS, PagedSequence, blocks_for
from gen_cli.cache.spec import CacheSpec
from gen_cli.errors import UsageError
from gen_cli.infer.scheduler import MODES, Event, Request, Scheduler
from gen_cli.model.transformer import Transformer


@dataclass
class ServeRun:
    """One mode's figures over one closed-loop run (latencies in milliseconds)."""

    mode: str
    requests: int
    tokens: int
    seconds: float
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    kv_peak: int = 0  # the most KV bytes the running requests held after a step (a paged pool: its own count)
    kv_analytic: int = 0  # at that step, the analytic minimum: distinct tokens held × bytes per token
    prompt_tokens: int = 0  # of the finished requests
    cached_tokens: int | None = 0  # of those, the ones served from the prefix cache (None: the server never said)
    proposed: int = 0  # prompt-lookup guesses made (MODE+lookup), and of them kept
    accepted: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def percentiles(self, which: str) -> tuple[float | None, float | None, float | None]:
        """p50, p90, p99 of `ttft_ms` or `itl_ms`; Nones when nothing was timed (a server that streamed no text)."""
        values = sorted(getattr(self, which))
        if not values:
            return None, None, None
        return tuple(values[min(len(values) - 1, int(q * len(values)))] for q in (0.5, 0.9, 0.99))  # type: ignore[return-value]


Job = tuple[list[int], int]  # prompt ids, max_tokens
# A client's next job, given the client and its request that just finished (None for its first): None when done.
NextJob = Callable[[int, Request | None], Job | None]


def workload(count: int, vocab: int, seed: int = 0, prompt: tuple[int, int] = (8, 64), new: tuple[int, int] = (8, 64)):
    """`count` requests (prompt ids, max_tokens) of random lengths, the same for every mode."""
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(*prompt))], rng.randint(*new)) for _ in range(count)]


def grounded_workload(
    encode: Callable[[str], list[int]], count: int, seed: int = 0, new: tuple[int, int] = (8, 64), limit: int = 10**9
) -> list[Job]:
    """`count` requests that rewrite a given passage (its sentences in a random order, then its start again), as
    summarising or editing a text does: the continuation copies spans of the prompt, which prompt lookup guesses.
    Prompts keep their last `limit` ids (room for the answer in a short context)."""
    from gen_cli.lab.speculative_bench import PASSAGE

    rng = random.Random(seed)
    sentences = [s if s.endswith(".") else s + "." for s in PASSAGE.split(". ")]
    jobs = []
    for _ in range(count):
        text = " ".join(rng.sample(sentences, len(sentences)))
        jobs.append((encode(text + "\n\n" + text[:60])[-limit:], rng.randint(*new)))
    return jobs


def closed_loop(
    model: Transformer,
    mode: str,
    clients: int,
    jobs: list[Job] | NextJob,
    max_batch: int | None = None,
    spec: CacheSpec = CacheSpec(),
    time_limit_s: float = 60.0,
    warm: list[int] | None = None,
    speculate: int = 0,
    **paged: Any,
) -> ServeRun:
    """Run `jobs` from `clients` closed-loop clients under `mode` (`continuous+rows`: each row through the
    single-sequence step, see `infer.batch.batched_step`; `continuous+lookup`: `speculate` prompt-lookup guesses
    per request); stops early past `time_limit_s`. `jobs`: a list (the next one to whichever client is free) or
    each client's next job (`NextJob`). `paged`: the scheduler's kv_blocks, block_tokens, prefix_cache; `warm`: a
    prompt run first, untimed (a cached prefix)."""
    base, suffixes = mode.split("+")[0], mode.split("+")[1:]
    scheduler = Scheduler(
        model, None, spec, max_batch or clients, max_queue=clients + 1, mode=base, by_row="rows" in suffixes,
        speculate=speculate if "lookup" in suffixes else 0, **paged,
    )  # fmt: skip
    if warm is not None:
        scheduler.submit(Request(warm, 1))
        scheduler.run_until_idle()
    if isinstance(jobs, list):
        todo = list(reversed(jobs))
        next_job: NextJob = lambda client, done: todo.pop() if todo else None  # noqa: E731
    else:
        next_job = jobs
    run = ServeRun(mode, 0, 0, 0.0)
    start = time.perf_counter()

    def send(client: int, done: Request | None) -> None:
        job = next_job(client, done) if time.perf_counter() - start <= time_limit_s else None
        if job is None:
            return
        ids, n = job
        sent, last = time.perf_counter(), [0.0]
        request = Request(ids, n)

        def emit(event: Event) -> None:
            now = time.perf_counter()
            if event.finish is not None:
                run.requests += 1
                run.prompt_tokens += len(request.ids)
                run.cached_tokens = (run.cached_tokens or 0) + request.cached_tokens
                send(client, request)
                return
            if event.token is None:
                return
            run.tokens += 1
            if last[0] == 0.0:
                run.ttft_ms.append(1000 * (now - sent))
            else:
                run.itl_ms.append(1000 * (now - last[0]))
            last[0] = now

        request.emit = emit
        scheduler.submit(request)

    for client in range(clients):
        send(client, None)
    while not scheduler.idle():
        scheduler.step()
        if scheduler.kv_in_use > run.kv_peak:
            run.kv_peak, run.kv_analytic = scheduler.kv_in_use, analytic_in_use(scheduler)
    run.seconds = time.perf_counter() - start
    run.proposed, run.accepted = scheduler.proposed, scheduler.accepted
    return run


def analytic_in_use(scheduler: Scheduler) -> int:
    """The analytic KV bytes of what the running requests hold: bytes per token × the distinct tokens (a
    prefix shared through the pool counted once)."""
    pool = scheduler.pool
    if pool is None:
        return scheduler.reserved
    seqs = [r.row.cache for r in scheduler._running if isinstance(r.row.cache, PagedSequence)]
    held: dict[int, int] = {}  # block -> tokens written in it (a block several sequences hold counted once)
    for q in seqs:
        for i, block in enumerate(q.table):
            held[block] = max(held.get(block, 0), min(pool.block_tokens, max(q.pos - i * pool.block_tokens, 0)))
    return pool.analytic_bytes(sum(held.values()))


def shared_prefix_runs(
    model: Transformer, clients: int, count: int, prefix: int, rounds: int = 3, seed: int = 0, new: int = 16
) -> dict[str, list[ServeRun]]:
    """Continuous batching on a paged pool, every request a `prefix`-token system prompt plus its own 8-32
    tokens and up to `new` new ones (lengths differ, so that requests do not arrive in lockstep), with the
    prefix cache on (its blocks shared, prefill skipped) and off, interleaved round by round."""
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    system = [rng.randrange(vocab) for _ in range(prefix)]
    jobs = [
        ([*system, *(rng.randrange(vocab) for _ in range(rng.randint(8, 32)))], rng.randint(new // 2, new))
        for _ in range(count)
    ]
    longest = max(len(ids) + n for ids, n in jobs)
    blocks = (clients + 1) * blocks_for(longest, BLOCK_TOKENS)  # enough that admission never waits here
    runs: dict[str, list[ServeRun]] = {"prefix cache on": [], "prefix cache off": []}
    for _ in range(rounds):
        for name in runs:
            share = name.endswith("on")
            warm = [*system, 0]
            runs[name].append(
                closed_loop(model, "continuous", clients, jobs, warm=warm, kv_blocks=blocks, prefix_cache=share)
            )
    return runs


def shared_prefix_memory(model: Transformer, sequences: int, prefix: int, own: int = 16, seed: int = 0) -> list[dict]:
    """KV bytes `sequences` requests hold once their prompts (a `prefix`-token system prompt + `own` tokens
    each) are prefilled, the prefix cache on and off: the pool's own count of blocks in use beside the
    analytic minimum of the distinct tokens held (and of every token, as if nothing were shared)."""
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    system = [rng.randrange(vocab) for _ in range(prefix)]
    prompts = [[*system, *(rng.randrange(vocab) for _ in range(own))] for _ in range(sequences)]
    blocks = (sequences + 1) * blocks_for(prefix + own + 1, BLOCK_TOKENS)
    out = []
    for share in (True, False):
        # Every prompt prefilled in one step, so that none has finished when the pool is counted (by_row: in
        # PyTorch, not fed through the C step's call in chunks of at most MAX_BATCH rows).
        chunk = sequences * (prefix + own)
        scheduler = Scheduler(
            model, None, max_batch=sequences, prefill_chunk=chunk, by_row=True, kv_blocks=blocks, prefix_cache=share
        )
        scheduler.submit(Request([*system, 0], 1))  # an earlier request left the system prompt cached
        scheduler.run_until_idle()
        for ids in prompts:
            scheduler.submit(Request(ids, 2))
        scheduler.step()  # every prompt prefilled; each request then holds its first token
        assert scheduler.running == sequences and not any(r.row.pending for r in scheduler._running)
        pool = scheduler.pool
        assert pool is not None
        tokens = sum(r.row.cache.pos for r in scheduler._running)
        out.append({"prefix_cache": share, "sequences": sequences, "prefix": prefix,
                    "blocks_in_use": pool.blocks_in_use, "bytes_in_use": pool.bytes_in_use,
                    "analytic": analytic_in_use(scheduler),
                    "analytic_unshared": pool.analytic_bytes(tokens), "block_bytes": pool.block_bytes})  # fmt: skip
        scheduler.run_until_idle()
    return out


def conversations(
    vocab: int, clients: int, chats: int, turns: int, new: int, seed: int = 0, opening: tuple[int, int] = (24, 40),
    message: tuple[int, int] = (8, 24),
) -> NextJob:  # fmt: skip
    """`chats` chats of `turns` turns, each client holding one at a time: an `opening`-token prompt first, then
    each prompt the last one + its answer (`new` tokens) + a `message`-token new message (random tokens, the
    same for the same seed)."""
    rng = random.Random(seed)
    first = [[rng.randrange(vocab) for _ in range(rng.randint(*opening))] for _ in range(chats)]
    said = [[[rng.randrange(vocab) for _ in range(rng.randint(*message))] for _ in range(turns - 1)] for _ in first]
    left = iter(range(chats))
    at: dict[int, tuple[int, int]] = {}  # client -> (its chat, the turn it sent last)

    def next_job(client: int, done: Request | None) -> Job | None:
        chat, turn = at.get(client, (0, turns))
        if done is not None and turn + 1 < turns:
            at[client] = (chat, turn + 1)
            return [*done.ids, *done.tokens, *said[chat][turn]], new
        chat = next(left, None)
        if chat is None:
            return None
        at[client] = (chat, 0)
        return first[chat], new

    return next_job


def longest_conversation(turns: int, new: int) -> int:
    """The most tokens a `conversations` prompt + answer reaches (its opening and messages at their longest)."""
    return 40 + turns * new + (turns - 1) * 24


def multi_turn_runs(
    model: Transformer, clients: int, chats: int, turns: int, rounds: int = 3, seed: int = 0, new: int = 32
) -> dict[str, list[ServeRun]]:
    """Continuous batching on a paged pool, `chats` chats of `turns` turns on `clients` clients
    (`conversations`), the prefix cache on (a turn takes the blocks of the last prompt and of its answer) and
    off, rounds interleaved."""
    blocks = (clients + 1) * blocks_for(longest_conversation(turns, new), BLOCK_TOKENS)
    runs: dict[str, list[ServeRun]] = {"prefix cache on": [], "prefix cache off": []}
    for _ in range(rounds):
        for name in runs:
            jobs = conversations(model.config.vocab_size, clients, chats, turns, new, seed)
            share = name.endswith("on")
            runs[name].append(closed_loop(model, "continuous", clients, jobs, kv_blocks=blocks, prefix_cache=share))
    return runs


def compare_modes(
    model: Transformer,
    clients: int,
    count: int,
    rounds: int = 3,
    modes: tuple[str, ...] = MODES,
    seed: int = 0,
    new: int | None = None,
    spec: CacheSpec = CacheSpec(),
    speculate: int = 0,
    encode: Callable[[str], list[int]] | None = None,
) -> dict[str, list[ServeRun]]:
    """Every mode on the same workload, `rounds` times, interleaved (a busy machine's drift hits all); each
    request asks for `new` tokens (None: 8-64 at random, at most a quarter of the context) into a cache of `spec`.
    With `speculate` guesses, every mode without +rows also runs as MODE+lookup, and the requests rewrite a
    passage tokenized by `encode` (`grounded_workload`) instead of random ids."""
    answers = (new, new) if new is not None else (8, min(64, model.config.context_length // 4))
    if speculate:
        if encode is None:  # random ids give prompt lookup nothing to find: its rows would say nothing
            raise UsageError("prompt lookup rewrites a passage of text: it needs the model's tokenizer")
        jobs = grounded_workload(encode, count, seed, answers, model.config.context_length - answers[1])
        modes = tuple(m for mode in modes for m in (mode, *([f"{mode}+lookup"] if "+rows" not in mode else [])))
    else:
        jobs = workload(count, model.config.vocab_size, seed, new=answers)
    runs: dict[str, list[ServeRun]] = {m: [] for m in modes}
    for _ in range(rounds):
        for mode in modes:
            runs[mode].append(closed_loop(model, mode, clients, jobs, spec=spec, speculate=speculate))
    return runs


def summary(runs: dict[str, list[ServeRun]]) -> list[dict[str, float | str]]:
    """Per mode: median throughput (with range) and the latency percentiles of the median run."""
    rows: list[dict[str, float | str]] = []
    for mode, done in runs.items():
        rates = [r.tokens_per_s for r in done]
        middle = sorted(done, key=lambda r: r.tokens_per_s)[len(done) // 2]
        ttft, itl = middle.percentiles("ttft_ms"), middle.percentiles("itl_ms")
        rows.append({"mode": mode, "tokens_per_s": statistics.median(rates), "low": min(rates), "high": max(rates),
                     "ttft_p50": ttft[0], "ttft_p90": ttft[1], "ttft_p99": ttft[2],
                     "itl_p50": itl[0], "itl_p90": itl[1], "itl_p99": itl[2],
                     "ttft_p50_runs": [r.percentiles("ttft_ms")[0] for r in done],
                     "kv_peak": middle.kv_peak, "kv_analytic": middle.kv_analytic,
                     "prompt_tokens": middle.prompt_tokens, "cached_tokens": middle.cached_tokens,
                     "guesses": middle.proposed,
                     "kept": middle.accepted / middle.proposed if middle.proposed else None})  # fmt: skip
    return rows
