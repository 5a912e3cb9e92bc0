"""Closed-loop serving bench on the scheduler itself (no HTTP): N clients each send a request, wait for its
last token, and send the next. Throughput, time to first token and inter-token latency per scheduling mode
(one at a time, static batches, continuous batching), the modes interleaved round by round."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field

from gen_cli.cache.spec import CacheSpec
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

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def percentiles(self, which: str) -> tuple[float, float, float]:
        """p50, p90, p99 of `ttft_ms` or `itl_ms` (0s when empty)."""
        values = sorted(getattr(self, which))
        if not values:
            return 0.0, 0.0, 0.0
        return tuple(values[min(len(values) - 1, int(q * len(values)))] for q in (0.5, 0.9, 0.99))  # type: ignore[return-value]


def workload(count: int, vocab: int, seed: int = 0, prompt: tuple[int, int] = (8, 64), new: tuple[int, int] = (8, 64)):
    """`count` requests (prompt ids, max_tokens) of random lengths, the same for every mode."""
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(*prompt))], rng.randint(*new)) for _ in range(count)]


def closed_loop(
    model: Transformer,
    mode: str,
    clients: int,
    jobs: list[tuple[list[int], int]],
    max_batch: int | None = None,
    spec: CacheSpec = CacheSpec(),
    time_limit_s: float = 60.0,
) -> ServeRun:
    """Run `jobs` from `clients` closed-loop clients under `mode` (`continuous+rows`: each row through the
    single-sequence step, see `infer.batch.batched_step`); stops early past `time_limit_s`."""
    base, by_row = mode.removesuffix("+rows"), mode.endswith("+rows")
    scheduler = Scheduler(model, None, spec, max_batch or clients, max_queue=clients + 1, mode=base, by_row=by_row)
    todo = list(reversed(jobs))
    run = ServeRun(mode, 0, 0, 0.0)
    start = time.perf_counter()

    def send() -> None:
        if not todo or time.perf_counter() - start > time_limit_s:
            return
        ids, n = todo.pop()
        sent, last = time.perf_counter(), [0.0]
        request = Request(ids, n)

        def emit(event: Event) -> None:
            now = time.perf_counter()
            if event.finish is not None:
                run.requests += 1
                send()
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

    for _ in range(clients):
        send()
    while not scheduler.idle():
        scheduler.step()
    run.seconds = time.perf_counter() - start
    return run


def compare_modes(
    model: Transformer, clients: int, count: int, rounds: int = 3, modes: tuple[str, ...] = MODES, seed: int = 0
) -> dict[str, list[ServeRun]]:
    """Every mode on the same workload, `rounds` times, interleaved (a busy machine's drift hits all)."""
    jobs = workload(count, model.config.vocab_size, seed, new=(8, min(64, model.config.context_length // 4)))
    runs: dict[str, list[ServeRun]] = {m: [] for m in modes}
    for _ in range(rounds):
        for mode in modes:
            runs[mode].append(closed_loop(model, mode, clients, jobs))
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
                     "itl_p50": itl[0], "itl_p90": itl[1], "itl_p99": itl[2]})  # fmt: skip
    return rows
