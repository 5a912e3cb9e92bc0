"""`gen bench contention`: decode speed with and without a competing CPU-bound process, side by side.

Each wait mode runs in its own long-lived worker process, because the OpenMP runtime reads its wait
settings once, when torch loads it (see `gen_cli/__init__.py`). This module starts and stops the
competitor itself (a busy Python loop), so every idle/busy pair is measured in the same minute.
Run it as `gen bench contention` or `python -m gen_cli.lab.contention`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

# "spin": libgomp's defaults (idle threads spin ~3 ms at every barrier); "passive": idle OpenMP threads sleep
# at once; "short": gen's default, a brief spin then sleep (see gen_cli/__init__.py).
WAITS = ("spin", "passive", "short")
COMPETITOR = "while True: pass"


@dataclass
class ContentionRow:
    """Median decode tok/s of one (wait mode, threads, path) idle and beside one competitor."""

    wait: str
    threads: int
    path: str
    idle_tok_s: float
    busy_tok_s: float
    idle_runs: list[float]
    busy_runs: list[float]
    idle_others_cores: float | None  # CPU other processes took during the idle runs (the competitor excluded)

    @property
    def slowdown(self) -> float:
        return self.idle_tok_s / self.busy_tok_s if self.busy_tok_s else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"slowdown": self.slowdown}


def _worker(shape: str, tokens: int) -> None:
    """Read {"threads", "native"} requests on stdin; answer each with one timed generation's tok/s."""
    import torch

    from gen_cli.infer.engine import EngineOptions, decode_layout
    from gen_cli.infer.generate import run_generation
    from gen_cli.infer.sampling import SamplingConfig
    from gen_cli.model.config import load_preset
    from gen_cli.model.transformer import random_model
    from gen_cli.runtime import LoadProbe, set_threads

    config = load_preset(shape)
    cpu = torch.device("cpu")
    models = {native: decode_layout(random_model(config), EngineOptions("cpu", native=native), cpu)
              for native in (True, False)}  # fmt: skip
    prompt = torch.randint(0, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    greedy = SamplingConfig(temperature=0.0)
    for model in models.values():
        run_generation(model, prompt, 16, greedy)  # warm-up: thread pools, allocator
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        set_threads(request["threads"])
        with LoadProbe() as probe:
            stats = run_generation(models[request["native"]], prompt, tokens, greedy).stats
        print(json.dumps({"tok_s": stats.decode_tokens_per_s, "others_cores": probe.load.others_cores}), flush=True)


class _Worker:
    """A worker process for one wait mode, driven line by line."""

    def __init__(self, wait: str, shape: str, tokens: int) -> None:
        env = os.environ | {"GEN_OMP_WAIT": wait}
        for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"):
            env.pop(name, None)  # the mode alone decides
        cmd = [sys.executable, "-m", "gen_cli.lab.contention", "--worker", shape, str(tokens)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("contention worker exited early")
        return json.loads(line)

    def measure(self, threads: int, native: bool) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"threads": threads, "native": native}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def bench_contention(
    shape: str = "small",
    threads: tuple[int, ...] = (1, 2),
    waits: tuple[str, ...] = WAITS,
    paths: tuple[str, ...] = ("native",),
    rounds: int = 3,
    tokens: int = 128,
    on_step: Callable[[str], None] | None = None,
) -> list[ContentionRow]:
    """Idle and busy decode tok/s for every wait × threads × path; rounds alternate idle and busy."""
    step = on_step or (lambda _msg: None)
    keys = [(w, t, p) for w in waits for t in threads for p in paths]
    runs: dict[tuple[str, int, str, bool], list[float]] = {(*k, busy): [] for k in keys for busy in (False, True)}
    others: dict[tuple[str, int, str], list[float]] = {k: [] for k in keys}
    step(f"starting {len(waits)} workers")
    workers = {w: _Worker(w, shape, tokens) for w in waits}
    try:
        for r in range(rounds):
            for busy in (False, True):
                competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if busy else None
                try:
                    if competitor:
                        time.sleep(0.5)  # let the scheduler see it and the load settle
                    for w, t, p in keys:
                        step(f"round {r + 1}/{rounds}: {'busy' if busy else 'idle'}, {w}, {t} threads, {p}")
                        got = workers[w].measure(t, p == "native")
                        runs[(w, t, p, busy)].append(got["tok_s"])
                        if not busy and got["others_cores"] is not None:
                            others[(w, t, p)].append(got["others_cores"])
                finally:
                    if competitor:
                        competitor.kill()
                        competitor.wait()
    finally:
        for worker in workers.values():
            worker.close()
    return [
        ContentionRow(
            w,
            t,
            p,
            statistics.median(runs[(w, t, p, False)]),
            statistics.median(runs[(w, t, p, True)]),
            runs[(w, t, p, False)],
            runs[(w, t, p, True)],
            statistics.median(others[(w, t, p)]) if others[(w, t, p)] else None,
        )
        for w, t, p in keys
    ]


def format_rows(rows: list[ContentionRow]) -> list[str]:
    """Plain text lines, one per row (the README and the closing note quote them)."""
    lines = [
        f"{'wait':7} {'threads':>7} {'path':6} {'idle tok/s':>10} {'busy tok/s':>10} {'slowdown':>8} {'idle load':>9}"
    ]
    for r in rows:
        load = f"{r.idle_others_cores:.1f}" if r.idle_others_cores is not None else "?"
        lines.append(
            f"{r.wait:7} {r.threads:>7} {r.path:6} {r.idle_tok_s:>10,.0f} {r.busy_tok_s:>10,.0f} "
            f"{r.slowdown:>7.1f}× {load:>9}"
        )
    return lines


def main(argv: list[str]) -> None:
    if argv[:1] == ["--worker"]:
        _worker(argv[1], int(argv[2]))
        return
    shape = argv[0] if argv else "small"
    rows = bench_contention(shape, paths=("native", "torch"), on_step=lambda m: print(m, file=sys.stderr))
    print("\n".join(format_rows(rows)))


if __name__ == "__main__":
    main(sys.argv[1:])
