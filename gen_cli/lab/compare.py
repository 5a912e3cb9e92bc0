"""`gen compare`: expand a grid of variants, measure each in a fresh worker process, add the speed-ups.

Variants get random weights, seeded by shape, so cache on and off of one variant share identical
weights; speed and memory do not depend on the weights' values. Each configuration is measured by
`gen_cli.lab.worker` in its own process (see there why).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from gen_cli.errors import GenError, UsageError
from gen_cli.lab.worker import PROMPT_SEED, Spec, measure
from gen_cli.model.config import ATTENTION_KINDS, POS_ENCODINGS, WEIGHT_SEED, ModelConfig, kv_heads_for
from gen_cli.runtime import spread_verdict

# The --dtype names compare accepts. "int8" means int8 weights (per-channel scales), as `--quantize int8`:
# fp32 activations through the native CPU step, else bfloat16.
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "int8")
CANONICAL_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def split_values(values: Iterable[str] | None, default: list[str]) -> list[str]:
    """`--x a,b --x c` → ['a', 'b', 'c'], duplicates dropped, order kept; `default` when not given."""
    out: list[str] = []
    for value in values or []:
        for part in str(value).split(","):
            part = part.strip().lower()
            if part and part not in out:
                out.append(part)
    return out or list(default)


def int_values(name: str, values: Iterable[str] | None, default: list[int], minimum: int = 1) -> list[int]:
    """Comma/repeated integer option values, each at least `minimum`."""
    out: list[int] = []
    for part in split_values(values, [str(d) for d in default]):
        try:
            n = int(part)
        except ValueError:
            raise UsageError(f"{name}: {part!r} is not an integer") from None
        if n < minimum:
            raise UsageError(f"{name} must be at least {minimum}, got {n}")
        if n not in out:
            out.append(n)
    return out


def _check_choices(name: str, values: list[str], choices: Iterable[str]) -> None:
    choices = list(choices)
    for v in values:
        if v not in choices:
            raise UsageError(f"{name}: unknown value {v!r}; choose from {', '.join(choices)}", params=(name,))


def expand_grid(
    shape: ModelConfig,
    attention: list[str],
    kv_heads: list[int],
    pos: list[str],
    kv_cache: list[str],
    prompt_len: list[int],
    gen_len: list[int],
    batch: list[int],
    dtype: list[str],
    device: str = "cpu",
    threads: int | None = None,
    repeats: int = 3,
    warmup: int = 1,
    kv_dtype: list[str] | None = None,
    window: list[int] | None = None,
    sinks: list[int] | None = None,
    attn_impl: list[str] | None = None,
) -> list[Spec]:
    """Validate the axes and return the grid, MHA first (added when not listed): the first row is the baseline.

    Order: workload (prompt, gen, batch) outermost, then attention, pos, dtype, and cache innermost, so
    each variant's cache settings sit side by side.
    """
    _check_choices("attention", attention, ATTENTION_KINDS)
    _check_choices("pos", pos, POS_ENCODINGS)
    _check_choices("kv_cache", kv_cache, ("on", "off"))
    _check_choices("dtype", dtype, DTYPES)
    _check_choices("attn_impl", attn_impl or [], ("fused", "eager"))
    if repeats < 1:
        raise UsageError(f"repeats must be at least 1, got {repeats}", params=("repeats",))
    if warmup < 0:
        raise UsageError(f"warmup must not be negative, got {warmup}", params=("warmup",))
    if kv_heads and "gqa" not in attention:
        raise UsageError("kv_heads sets the KV heads of GQA; add attention gqa", params=("kv_heads", "attention"))
    dtypes = list(dict.fromkeys(CANONICAL_DTYPE.get(d, d) for d in dtype))
    from gen_cli.cache.kinds import check_kind, parse_kv_kinds  # torch: not at CLI import time

    kv_kinds = kv_dtype or [""]  # "": the cache in the compute dtype, as gen generate without --kv-dtype
    for spec in kv_kinds:
        for kind in parse_kv_kinds(spec) if spec else ():
            check_kind(shape, kind)
    # The baseline every speed-up is measured against: MHA, added when the user listed only others.
    kinds = ["mha", *[a for a in attention if a != "mha"]]
    heads: list[tuple[str, int]] = []
    for kind in kinds:
        for kv in kv_heads if kind == "gqa" and kv_heads else [None]:
            n_kv = kv_heads_for(shape.n_head, kind, kv)
            if (kind, n_kv) not in heads:
                heads.append((kind, n_kv))
    windows = _window_kinds(window, sinks)
    # A window cache of a RoPE/ALiBi model runs past the context (positions within the cache); others do not.
    from gen_cli.cache.window import RELATIVE, check_window

    unbounded = kv_cache == ["on"] and all(w for w, _ in windows) and set(pos) <= set(RELATIVE)
    limit = shape.context_length
    for p in prompt_len:
        for g in gen_len:
            if p + g > limit and not unbounded:
                raise UsageError(
                    f"prompt_len {p} + gen_len {g} = {p + g} tokens exceeds the model's context length "
                    f"of {limit}; keep prompt + generated ≤ {limit} (or use a window cache of a rope or alibi "
                    "model, cache on only)",
                    params=("prompt_len", "gen_len"),
                )
    if min(gen_len) < 2:
        raise UsageError("gen_len must be at least 2: decode speed needs a token after the first", params=("gen_len",))
    specs = []
    for p in prompt_len:
        for g in gen_len:
            for b in batch:
                for kind, n_kv in heads:
                    for pe in pos:
                        variant = shape.replace(n_kv_head=n_kv, pos_encoding=pe)  # validates (e.g. RoPE parity)
                        for w, s in windows:
                            if w:
                                check_window(variant, w, s)
                        for dt in dtypes:
                            for cache in kv_cache:
                                # A cache kind means nothing without a cache: one cache-off row per variant.
                                for kvd in kv_kinds if cache == "on" else [""]:
                                    for w, s in windows if cache == "on" else [(0, 0)]:
                                        for impl in attn_impl or ["fused"]:
                                            specs.append(
                                                Spec(variant.to_dict(), kind, cache == "on", p, g, b, dt, device,
                                                     threads, repeats, warmup, kvd, w, s, impl)
                                            )  # fmt: skip
    return specs


def _window_kinds(window: list[int] | None, sinks: list[int] | None) -> list[tuple[int, int]]:
    """(window, sinks) pairs for cache-on rows; window 0 is the full cache (sinks apply to windows only; they
    are the sequence's first tokens, generated ones too when the prompt is shorter)."""
    if sinks and not window:
        raise UsageError("sinks need a window", params=("sinks", "window"))
    pairs = [(w, s) for w in window or [0] for s in (sinks or [0] if w else [0])]
    return list(dict.fromkeys(pairs))


# ---------------------------------------------------------------------------------------------
# Measuring one configuration (runs inside the worker process)


# ---------------------------------------------------------------------------------------------
# Running the grid


def run_in_subprocess(spec: Spec) -> dict[str, Any]:
    """Measure one spec in a fresh `python -m gen_cli.lab.worker` process; its peak memory is its own."""
    proc = subprocess.run(
        [sys.executable, "-m", "gen_cli.lab.worker"],
        input=json.dumps(dataclasses.asdict(spec)),
        capture_output=True,
        text=True,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    try:
        record = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        record = None
    if isinstance(record, dict) and "error" in record:
        raise GenError(record["error"])
    if proc.returncode != 0 or not isinstance(record, dict):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise GenError(f"measuring {spec.attention}/{spec.shape['pos_encoding']} failed: {tail}")
    return record


def run_grid(
    specs: list[Spec], in_process: bool = False, on_done: Callable[[dict[str, Any]], None] | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """Measure every spec (each in its own process unless `in_process`) and fill in the speed-ups.

    Returns (rows, interrupted): Ctrl-C stops the grid and keeps the configurations already measured.
    """
    rows: list[dict[str, Any]] = []
    interrupted = False
    try:
        for spec in specs:
            row = measure(spec) if in_process else run_in_subprocess(spec)
            rows.append(row)
            if on_done is not None:
                on_done(row)
    except KeyboardInterrupt:
        interrupted = True
    add_speedups(rows)
    return rows, interrupted


def _variant_key(row: dict[str, Any]) -> tuple:
    cache_kind = (row.get("kv_dtype", ""), row.get("kv_window", 0), row.get("kv_sinks", 0))
    return (row["attention"], row["kv_heads"], row["pos"], row["dtype"], row["prompt_len"], row["gen_len"],
            row["batch"], row.get("attn_impl", "fused"), cache_kind)  # fmt: skip


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """speedup: decode rate over the baseline (first row of the same workload, MHA, first listed settings);
    speedup_vs_no_cache: a cache-on row over the same variant with the cache off, when measured."""
    baselines: dict[tuple, dict[str, Any]] = {}
    # A cache-off row is the twin of every cache kind of its variant.
    off = {_variant_key(r)[:-1]: r for r in rows if not r["kv_cache"]}
    for row in rows:
        work = (row["prompt_len"], row["gen_len"], row["batch"])
        base = baselines.setdefault(work, row)
        row["baseline"] = base is row
        row["speedup"] = row["speedup_vs_no_cache"] = None
        if base["decode_tokens_per_s"] and row["decode_tokens_per_s"]:
            row["speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            row["speedup_note"] = None if base is row else _verdict(row, base)
        twin = off.get(_variant_key(row)[:-1])
        if row["kv_cache"] and twin and twin["decode_tokens_per_s"] and row["decode_tokens_per_s"]:
            row["speedup_vs_no_cache"] = row["decode_tokens_per_s"] / twin["decode_tokens_per_s"]
            row["speedup_vs_no_cache_note"] = _verdict(row, twin)


def _busy(row: dict[str, Any]) -> bool:
    return bool(row.get("machine_load", {}).get("busy"))


def _verdict(row: dict[str, Any], other: dict[str, Any]) -> str | None:
    """None when the ratio of two rows' decode rates stands, else why it does not (overlap, busy machine)."""
    a, b = (
        row.get("samples", {}).get("decode_tokens_per_s", []),
        other.get("samples", {}).get("decode_tokens_per_s", []),
    )
    return spread_verdict(a, b, _busy(row) or _busy(other))


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(rows: list[dict[str, Any]], shape: ModelConfig, shape_source: str) -> dict[str, Any]:
    """Where the figures were measured: versions, device, dtypes, threads, the shape."""
    import torch

    devices = sorted({r["device"] for r in rows})
    gpu = torch.cuda.get_device_name(0) if any(d.startswith("cuda") for d in devices) else None
    cpu = cpu_name()  # reads /proc/cpuinfo
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": ", ".join(devices),
        "device_name": gpu or cpu,
        "cpu": cpu,
        "gpu": gpu,
        "dtypes": sorted({r["dtype"] for r in rows}),
        "threads": sorted({r["threads"] for r in rows}),
        "memory_method": rows[0]["memory_method"] if rows else "",
        "shape_source": shape_source,
        "shape": shape.to_dict(),
        "weights": f"random (seed {WEIGHT_SEED}) of this shape: speed and memory do not depend on the values",
        "prompts": f"random token ids (seed {PROMPT_SEED}); greedy decoding",
        "baseline": "first row of each workload: MHA with the first listed pos, dtype and cache setting",
    }
