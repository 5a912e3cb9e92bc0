"""`gen compare` measurements: expand a grid of variants, measure each in a fresh process, return plain records.

Every configuration runs in its own `python -m gen_cli.bench` process (a JSON spec on stdin, a JSON
record on stdout), because freed memory stays in the allocator and would pollute the next run's peak.
Variants get random weights, seeded by shape, so cache on and off of one variant share identical
weights; speed and memory do not depend on the weights' values. Correctness is checked against the
fp32 no-cache path of the same weights (the oracle).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gen_cli.config import ATTENTION_KINDS, POS_ENCODINGS, WEIGHT_SEED, ModelConfig, kv_heads_for
from gen_cli.errors import GenError, UsageError

# The --dtype names compare accepts. "int8" means int8 weights (per-channel scales), as `--quantize int8`:
# fp32 activations through the native CPU step, else bfloat16.
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "int8")
CANONICAL_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PROMPT_SEED = 1234


@dataclass(frozen=True)
class Spec:
    """One configuration of the grid: a model variant and a workload."""

    shape: dict[str, Any]  # the ModelConfig (with this variant's n_kv_head and pos_encoding) as a dict
    attention: str
    kv_cache: bool
    prompt_len: int
    gen_len: int
    batch: int
    dtype: str
    device: str = "cpu"
    threads: int | None = None
    repeats: int = 3
    warmup: int = 1

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.shape)

    def variant(self) -> tuple[str, int, str]:
        """What training would distinguish: attention kind, KV heads, positions."""
        return (self.attention, self.shape["n_kv_head"], self.shape["pos_encoding"])


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
            raise UsageError(f"{name}: unknown value {v!r}; choose from {', '.join(choices)}")


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
) -> list[Spec]:
    """Validate the axes and return the grid, MHA first (added when not listed): the first row is the baseline.

    Order: workload (prompt, gen, batch) outermost, then attention, pos, dtype, and cache innermost, so
    each variant's cache settings sit side by side.
    """
    _check_choices("--attention", attention, ATTENTION_KINDS)
    _check_choices("--pos", pos, POS_ENCODINGS)
    _check_choices("--kv-cache", kv_cache, ("on", "off"))
    _check_choices("--dtype", dtype, DTYPES)
    if repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise UsageError(f"--warmup must not be negative, got {warmup}")
    if kv_heads and "gqa" not in attention:
        raise UsageError("--kv-heads sets the KV heads of GQA; add --attention gqa")
    dtypes = list(dict.fromkeys(CANONICAL_DTYPE.get(d, d) for d in dtype))
    # The baseline every speed-up is measured against: MHA, added when the user listed only others.
    kinds = ["mha", *[a for a in attention if a != "mha"]]
    heads: list[tuple[str, int]] = []
    for kind in kinds:
        for kv in kv_heads if kind == "gqa" and kv_heads else [None]:
            n_kv = kv_heads_for(shape.n_head, kind, kv)
            if (kind, n_kv) not in heads:
                heads.append((kind, n_kv))
    limit = shape.context_length
    for p in prompt_len:
        for g in gen_len:
            if p + g > limit:
                raise UsageError(
                    f"--prompt-len {p} + --gen-len {g} = {p + g} tokens exceeds the model's context length "
                    f"of {limit}; keep prompt + generated ≤ {limit}"
                )
    if min(gen_len) < 2:
        raise UsageError("--gen-len must be at least 2: decode speed needs a token after the first")
    specs = []
    for p in prompt_len:
        for g in gen_len:
            for b in batch:
                for kind, n_kv in heads:
                    for pe in pos:
                        variant = shape.replace(n_kv_head=n_kv, pos_encoding=pe)  # validates (e.g. RoPE parity)
                        for dt in dtypes:
                            for cache in kv_cache:
                                specs.append(
                                    Spec(variant.to_dict(), kind, cache == "on", p, g, b, dt, device, threads,
                                         repeats, warmup)
                                )  # fmt: skip
    return specs


# ---------------------------------------------------------------------------------------------
# Measuring one configuration (runs inside the worker process)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _greedy_steps(model: Any, prompt: Any, gen_len: int, use_cache: bool) -> Iterator[tuple[Any, Any]]:
    """Yield (fp32 logits (B, V), greedy token (B,)) per generated token, with or without the cache."""
    import torch

    from gen_cli.generate import _full_forward, decode_step, new_cache, prefill

    # No `with inference_mode()` around a yield: two generators in lockstep would unwind it out of order.
    cache = new_cache(model, prompt, gen_len, 1) if use_cache else None
    ids, token = prompt, None
    for step in range(gen_len):
        with torch.inference_mode():
            if step > 0:
                ids = torch.cat([ids, token[:, None]], dim=1)  # (B, T+step)
            if cache is None:
                logits = _full_forward(model, ids)
            elif step == 0:
                logits = prefill(model, prompt, cache)
            else:
                logits = decode_step(model, token[:, None], cache)
            token = logits.argmax(dim=-1)  # (B,)
            logits = logits.float()
        yield logits, token


def check_against_oracle(model: Any, oracle: Any, prompt: Any, gen_len: int, use_cache: bool) -> tuple[bool, float]:
    """Greedy agreement with the no-cache `oracle` over every step, and the max |logit diff| while rows agree.

    Both run free, in lockstep, so only one step's logits are held (a long run's logits would not fit).
    A row's logits are compared while all its earlier tokens agree: after that the inputs differ.
    """
    import torch

    agreed = torch.ones(prompt.shape[0], dtype=torch.bool, device=prompt.device)  # (B,)
    max_diff = 0.0
    cand, ref = _greedy_steps(model, prompt, gen_len, use_cache), _greedy_steps(oracle, prompt, gen_len, False)
    steps = zip(cand, ref, strict=True)
    for (logits, token), (ref_logits, ref_token) in steps:
        if agreed.any():
            max_diff = max(max_diff, float((logits - ref_logits).abs().amax(dim=-1)[agreed].max()))
        agreed &= token == ref_token
    return bool(agreed.all()), max_diff


def measure(spec: Spec) -> dict[str, Any]:
    """Build the variant, warm up, time `repeats` greedy generations, check against the fp32 oracle."""
    import torch

    from gen_cli.generate import run_generation
    from gen_cli.model import random_model
    from gen_cli.quantize import int8_activation_dtype, optimize_for_decode
    from gen_cli.runtime import resolve_device, resolve_dtype, set_threads
    from gen_cli.sampling import SamplingConfig

    threads = set_threads(spec.threads)
    device = resolve_device(spec.device)
    quantize = "int8" if spec.dtype == "int8" else "none"
    dtype = resolve_dtype(int8_activation_dtype(device) if quantize == "int8" else spec.dtype, device)
    config = spec.config
    # Seeded by shape only: cache on/off and every dtype of one variant start from identical fp32 weights.
    model = random_model(config).to(device)
    params = model.num_parameters()  # before optimising: packed or int8 weights are buffers, not parameters
    prompt = torch.randint(
        0, config.vocab_size, (spec.batch, spec.prompt_len), generator=torch.Generator().manual_seed(PROMPT_SEED)
    ).to(device)
    # The same inference path `gen generate` runs: fused and prepacked (or int8) weights.
    model = optimize_for_decode(model.to(dtype), quantize=quantize)
    greedy = SamplingConfig(temperature=0.0)
    every = [
        run_generation(model, prompt, spec.gen_len, greedy, use_cache=spec.kv_cache).stats
        for _ in range(spec.warmup + spec.repeats)
    ]
    runs = every[spec.warmup :]  # the timed ones
    # The first run in this fresh process allocates from the OS; later runs reuse the allocator's freed
    # memory and show less, so the peak is the largest any run saw (in practice the first's).
    peak = max(every, key=lambda s: s.peak_memory_bytes)
    # Correctness after timing, so the oracle's freed buffers cannot hide the timed runs' peak memory.
    greedy_match, max_diff, has_oracle = None, None, spec.kv_cache or spec.dtype != "float32"
    if has_oracle:
        oracle = random_model(config).to(device)  # the same fp32 weights the variant was built from, unoptimised
        greedy_match, max_diff = check_against_oracle(model, oracle, prompt, spec.gen_len, spec.kv_cache)
    rates = [s.decode_tokens_per_s for s in runs if s.decode_tokens_per_s is not None]
    last = runs[-1]
    bpe = torch.empty((), dtype=dtype).element_size()
    return {
        "attention": spec.attention,
        "kv_heads": config.n_kv_head,
        "n_heads": config.n_head,
        "pos": config.pos_encoding,
        "kv_cache": spec.kv_cache,
        "prompt_len": spec.prompt_len,
        "gen_len": spec.gen_len,
        "batch": spec.batch,
        "dtype": spec.dtype,
        "device": str(device),
        "threads": threads,
        "decode_path": last.decode_path,
        "params": params,
        "decode_tokens_per_s": _median(rates),
        "decode_tokens_per_s_min": min(rates) if rates else None,
        "decode_tokens_per_s_max": max(rates) if rates else None,
        "ttft_s": _median([s.ttft_s for s in runs]),
        "prefill_tokens_per_s": _median([s.prefill_tokens_per_s for s in runs]),
        "ms_per_token": _median([s.ms_per_token for s in runs if s.ms_per_token is not None]),
        "kv_bytes_per_token": config.kv_bytes_per_token(bpe),
        "kv_cache_bytes_analytic": last.kv_cache_bytes_analytic,
        "kv_cache_bytes_measured": last.kv_cache_bytes,
        "peak_memory_bytes": peak.peak_memory_bytes,
        "memory_method": f"{peak.memory_method}, largest over all runs, above the built model",
        "speedup": None,
        "speedup_vs_no_cache": None,
        "baseline": False,
        "greedy_match": greedy_match,
        "max_logit_diff": max_diff,
        "oracle": "float32 no-cache, same weights" if has_oracle else "is the oracle",
        "val_loss": None,
        "bits_per_byte": None,
        "samples": {
            "decode_tokens_per_s": rates,
            "ttft_s": [s.ttft_s for s in runs],
            "per_token_latencies_s": list(last.per_token_latencies),
        },
    }


# ---------------------------------------------------------------------------------------------
# Running the grid


def run_in_subprocess(spec: Spec) -> dict[str, Any]:
    """Measure one spec in a fresh `python -m gen_cli.bench` process; its peak memory is its own."""
    proc = subprocess.run(
        [sys.executable, "-m", "gen_cli.bench"],
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
) -> list[dict[str, Any]]:
    """Measure every spec (each in its own process unless `in_process`) and fill in the speed-ups."""
    rows = []
    for spec in specs:
        row = measure(spec) if in_process else run_in_subprocess(spec)
        rows.append(row)
        if on_done is not None:
            on_done(row)
    add_speedups(rows)
    return rows


def _variant_key(row: dict[str, Any]) -> tuple:
    return (row["attention"], row["kv_heads"], row["pos"], row["dtype"], row["prompt_len"], row["gen_len"],
            row["batch"])  # fmt: skip


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """speedup: decode rate over the baseline (first row of the same workload, MHA, first listed settings);
    speedup_vs_no_cache: a cache-on row over the same variant with the cache off, when measured."""
    baselines: dict[tuple, dict[str, Any]] = {}
    off = {_variant_key(r): r for r in rows if not r["kv_cache"]}
    for row in rows:
        work = (row["prompt_len"], row["gen_len"], row["batch"])
        base = baselines.setdefault(work, row)
        row["baseline"] = base is row
        if base["decode_tokens_per_s"] and row["decode_tokens_per_s"]:
            row["speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        twin = off.get(_variant_key(row))
        if row["kv_cache"] and twin and twin["decode_tokens_per_s"] and row["decode_tokens_per_s"]:
            row["speedup_vs_no_cache"] = row["decode_tokens_per_s"] / twin["decode_tokens_per_s"]


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


# ---------------------------------------------------------------------------------------------
# Quality: train each attention/positional variant briefly on the same data


def measure_quality(
    shape: ModelConfig,
    variants: list[tuple[str, int, str]],
    steps: int,
    preset: str | None = None,
    tokenizer: str | None = None,
    inputs: list[str] | None = None,
    device: str = "auto",
    context: int = 128,
    batch_size: int = 16,
    report: Callable[[Any], None] | None = None,
) -> dict[tuple[str, int, str], dict[str, float | None]]:
    """Train every (attention, kv_heads, pos) variant `steps` steps, same data and seed; held-out figures."""
    from gen_cli.train import TrainArgs, train

    results: dict[tuple[str, int, str], dict[str, float | None]] = {}
    # A preset is named directly; another shape is described to `train` as overrides of one.
    sizes = {} if preset else {"layers": shape.n_layer, "heads": shape.n_head, "d_model": shape.d_model,
                               "d_ff": shape.d_ff, "norm": shape.norm}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gen-compare-") as tmp:
        for i, (kind, n_kv, pos) in enumerate(variants):
            args = TrainArgs(
                inputs=list(inputs or []), tokenizer=tokenizer, vocab_size=shape.vocab_size,
                preset=preset or "tiny", attention=kind, kv_heads=n_kv if kind == "gqa" else None, pos=pos,
                steps=steps, batch_size=batch_size, context=min(context, shape.context_length), eval_every=0,
                save_every=0, seed=0, device=device, dtype="float32", out=os.path.join(tmp, f"v{i}"), force=True,
                **sizes,
            )  # fmt: skip
            summary = train(args, report)
            results[(kind, n_kv, pos)] = {"val_loss": summary.val_loss, "bits_per_byte": summary.val_bits_per_byte}
    return results


def attach_quality(rows: list[dict[str, Any]], quality: dict[tuple[str, int, str], dict[str, float | None]]) -> None:
    for row in rows:
        row.update(quality.get((row["attention"], row["kv_heads"], row["pos"]), {}))


def _worker() -> int:
    """`python -m gen_cli.bench`: a JSON Spec on stdin → one JSON record line on stdout."""
    try:
        spec = Spec(**json.loads(sys.stdin.read()))
        record = measure(spec)
    except GenError as e:
        print(json.dumps({"error": str(e)}))
        return 1
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
