"""`gen bench attention`: eager attention (the B·h·n² scores materialized) against fused (a tiled
online-softmax kernel: gen's C kernel for CPU prompts, PyTorch's SDPA elsewhere, and SDPA alone as `sdpa`),
prefill and training step time and peak memory against sequence length.

Every (impl, length, phase) runs in its own `python -m gen_cli.lab.attn_bench` process, so each peak RSS is
its own (freed memory stays in the allocator); impls alternate at each length so drift hits both alike.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from gen_cli.errors import GenError

PREFILL_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
TRAIN_LENGTHS = (256, 512, 1024, 2048)  # eager keeps n_layer score matrices for backward: 4.8 GB at 4k (small)
# fused: what `gen generate` runs (gen's C kernel for CPU prompts where it builds, else SDPA); sdpa: fused with
# PyTorch's SDPA only, prefill only (training's fused is SDPA already): the kernel against PyTorch's, side by side
IMPLS = ("eager", "fused", "sdpa")
SEED = 1234
# glibc keeps freed blocks under its (growing, up to 32 MiB) mmap threshold in its heap, so a process's peak RSS
# counts memory it no longer uses (85 MB of fused's 137 MB at 4k tokens, small preset). A fixed threshold
# maps every block of 64 KiB or more and unmaps it when freed: peak RSS then follows the live tensors.
MMAP_THRESHOLD = 65536


@dataclass
class Point:
    """One measured configuration."""

    phase: str  # "prefill" (one forward of n tokens, logits of the last) or "train" (forward+backward+AdamW)
    impl: str
    tokens: int
    batch: int
    seconds: list[float]  # the timed repeats (after one untimed warm-up)
    peak_bytes: int  # peak RSS above the built model and its inputs, over warm-up and repeats
    memory_method: str
    score_bytes: int  # analytic: B·n_head·n²·bytes of one layer's score matrix
    n_layer: int  # training keeps every layer's scores: n_layer × score_bytes
    kernel: str  # the attention kernel the profiler saw on a short forward of this impl
    threads: int
    load_avg_1m: float | None
    others_cores: float | None  # CPU other processes used meanwhile, in cores
    params: int = 0
    shape: dict[str, Any] = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"median_s": self.median_s}


def score_bytes(batch: int, n_head: int, tokens: int, bytes_per_element: int) -> int:
    """The bytes of one layer's (B, n_head, n, n) score matrix: what eager holds and fused never builds."""
    return batch * n_head * tokens * tokens * bytes_per_element


def _kernel(model: Any, vocab: int, tokens: int) -> str:
    """The attention kernel a causal forward of `tokens` runs, from a shorter forward that makes the same
    choice: gen's, none (eager), or SDPA's as torch's profiler names it. The profiler runs only for SDPA: starting
    it costs seconds a process."""
    import torch
    import torch.nn.functional as F

    from gen_cli.model.attention import KERNEL_MIN_QUERIES

    kernel, sdpa, calls = model.causal_kernel, F.scaled_dot_product_attention, []
    if kernel is not None:

        def counted(*args: Any) -> Any:
            y = kernel(*args)
            calls.append(y is not None)  # None: it declined, SDPA ran
            return y

        model.causal_kernel = counted
    ids = torch.randint(0, vocab, (1, min(tokens, KERNEL_MIN_QUERIES)))
    sdpa_calls = []
    try:
        F.scaled_dot_product_attention = lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k)
        with torch.no_grad():
            model(ids)
    finally:
        F.scaled_dot_product_attention, model.causal_kernel = sdpa, kernel
    if any(calls):
        return "gen_causal_attention (gen's C kernel)"
    if not sdpa_calls:
        return "matmul + in-place softmax (no SDPA)"
    from torch.profiler import profile

    with torch.no_grad(), profile() as prof:
        model(ids)
    keys = sorted(e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product"))
    return ", ".join(k.removeprefix("aten::") for k in keys)


def _trim() -> None:
    """Collect garbage and return glibc's free heap to the OS (Linux), so RSS is what is in use."""
    import gc

    from gen_cli.pages import return_free_heap

    gc.collect()
    return_free_heap()  # not glibc: the baseline keeps what the allocator holds


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model, grow its context to the length, warm up once, time `repeats` runs (this process)."""
    import torch

    from gen_cli.model.config import ModelConfig, load_preset
    from gen_cli.model.transformer import grow_context, random_model, set_attention_impl
    from gen_cli.runtime import LoadProbe, PeakMemory, set_threads

    threads = set_threads(spec.get("threads"))
    config = load_preset(spec["preset"]) if spec.get("preset") else ModelConfig.from_dict(spec["shape"])
    n, batch, phase, impl = spec["tokens"], spec.get("batch", 1), spec["phase"], spec["impl"]
    model = random_model(config)
    grow_context(model, n + 1)  # RoPE rows past the trained context (the position tables only)
    set_attention_impl(model, "fused" if impl == "sdpa" else impl)
    if impl == "fused" and phase == "prefill":
        from gen_cli.native.prompt_attention import use_prompt_attention

        use_prompt_attention(model)  # as optimize_for_decode does for `gen generate`
    ids = torch.randint(0, config.vocab_size, (batch, n + 1), generator=torch.Generator().manual_seed(SEED))
    if phase == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run() -> None:
            logits = model(ids[:, :-1])  # (B, n, vocab)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:

        def run() -> None:
            with torch.inference_mode():
                model(ids[:, :-1], last_only=True)  # prefill: the next token's logits only

    _trim()  # the baseline without freed heap the run would hand back (and so hide part of its peak)
    seconds = []
    with PeakMemory("cpu") as peak, LoadProbe() as probe:
        for i in range(1 + spec.get("repeats", 3)):
            t0 = time.perf_counter()
            run()
            if i:  # the first run is the warm-up (and the one that takes memory from the OS)
                seconds.append(time.perf_counter() - t0)
    # After the timing: a profiled forward beforehand left the forwards timed after it 1.4-1.5x faster
    # (SDPA's prefill of 256 tokens, gqa-135m shape), and not alike for every implementation.
    kernel = _kernel(model, config.vocab_size, n)
    bpe = torch.empty((), dtype=model.norm.weight.dtype).element_size()
    return asdict(
        Point(
            phase=phase,
            impl=impl,
            tokens=n,
            batch=batch,
            seconds=seconds,
            peak_bytes=peak.bytes,
            memory_method=peak.method
            + ", above the built model, over warm-up and repeats"
            + (
                f"; MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
                if "MALLOC_MMAP_THRESHOLD_" in os.environ
                else ""
            ),
            score_bytes=score_bytes(batch, config.n_head, n, bpe),
            n_layer=config.n_layer,
            kernel=kernel,
            threads=threads,
            load_avg_1m=probe.load.load_avg_1m,
            others_cores=probe.load.others_cores,
            params=model.num_parameters(),
            shape=config.to_dict() if hasattr(config, "to_dict") else {},
        )
    )


def run_point(spec: dict[str, Any], mmap_threshold: int | None = MMAP_THRESHOLD, timeout: float = 1800) -> Point:
    """`measure(spec)` in a fresh process: its peak memory is its own (None: glibc's default threshold)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    proc = subprocess.run(
        [sys.executable, "-m", "gen_cli.lab.attn_bench"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise GenError(f"attention bench worker failed ({spec['impl']}, {spec['tokens']} tokens): {tail}")
    record = json.loads(lines[-1])
    if "error" in record:
        raise GenError(record["error"])
    return Point(**record)


def bench_attention(
    preset: str = "small",
    prefill_lengths: tuple[int, ...] = PREFILL_LENGTHS,
    train_lengths: tuple[int, ...] = TRAIN_LENGTHS,
    impls: tuple[str, ...] = IMPLS,
    repeats: int = 3,
    threads: int | None = None,
    batch: int = 1,
    on_step: Callable[[str], None] | None = None,
    mmap_threshold: int | None = MMAP_THRESHOLD,
) -> list[Point]:
    """Prefill points for every length, then training points, impls alternating within each length."""
    points = []
    jobs = [("prefill", n) for n in prefill_lengths] + [("train", n) for n in train_lengths]
    for phase, n in jobs:
        for impl in (i for i in impls if phase == "prefill" or i != "sdpa"):
            if on_step:
                on_step(f"{phase} {impl} {n}")
            spec = {"preset": preset, "phase": phase, "impl": impl, "tokens": n, "batch": batch}
            points.append(run_point(spec | {"repeats": repeats, "threads": threads}, mmap_threshold))
    return points


def summary(points: list[Point]) -> list[dict[str, Any]]:
    """One row per (phase, length): both impls' medians, peaks, the analytic scores and the ratios."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for p in points:
        # What eager holds beyond fused: one layer's scores at a time in prefill (in place); in training
        # autograd keeps every layer's probabilities for backward.
        analytic = p.score_bytes * (p.n_layer if p.phase == "train" else 1)
        row = rows.setdefault((p.phase, p.tokens), {"phase": p.phase, "tokens": p.tokens, "score_bytes": p.score_bytes,
                                                    "analytic_bytes": analytic})  # fmt: skip
        row[f"{p.impl}_s"] = p.median_s
        row[f"{p.impl}_s_range"] = (min(p.seconds), max(p.seconds))
        row[f"{p.impl}_peak_bytes"] = p.peak_bytes
    for row in rows.values():
        if "eager_s" in row and "fused_s" in row:
            row["speedup"] = row["eager_s"] / row["fused_s"]
            row["peak_ratio"] = row["eager_peak_bytes"] / max(row["fused_peak_bytes"], 1)
            row["growth_over_analytic"] = (row["eager_peak_bytes"] - row["fused_peak_bytes"]) / row["analytic_bytes"]
        if "sdpa_s" in row and "fused_s" in row:
            row["sdpa_over_fused"] = row["sdpa_s"] / row["fused_s"]
    return list(rows.values())


def _worker() -> int:
    """`python -m gen_cli.lab.attn_bench`: a JSON spec on stdin → one JSON Point line on stdout."""
    try:
        record = measure(json.loads(sys.stdin.read()))
    except GenError as e:
        print(json.dumps({"error": str(e)}))
        return 1
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
