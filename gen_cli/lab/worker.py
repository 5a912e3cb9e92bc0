"""One `gen compare` configuration measured in its own process: `python -m gen_cli.lab.worker`.

A JSON Spec arrives on stdin and one JSON record line leaves on stdout. A fresh process per
configuration keeps each peak-memory figure its own: freed memory stays in the allocator and would
pollute the next run's peak. Correctness is checked against the fp32 no-cache path of the same
weights (the oracle).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from gen_cli.errors import GenError
from gen_cli.model.config import ModelConfig

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
    kv_dtype: str = ""  # a KV cache kind spec (int8, int4, k8v4 …); "" stores the compute dtype
    window: int = 0  # a window cache of `sinks` + `window` slots (0: the cache holds every position)
    sinks: int = 0
    attn_impl: str = "fused"  # how attention is computed (model.attention.ATTENTION_IMPLS)

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.shape)

    def cache_spec(self) -> Any:
        """The CacheSpec of a cache-on row (kinds, window, sinks); None without a cache."""
        from gen_cli.cache.kinds import parse_kv_kinds
        from gen_cli.cache.spec import CacheSpec

        if not self.kv_cache:
            return None
        kinds = parse_kv_kinds(self.kv_dtype) if self.kv_dtype else (None, None)
        return CacheSpec(*kinds, self.window or None, self.sinks)

    def variant(self) -> tuple[str, int, str]:
        """What training would distinguish: attention kind, KV heads, positions."""
        return (self.attention, self.shape["n_kv_head"], self.shape["pos_encoding"])


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def check_against_oracle(model: Any, oracle: Any, prompt: Any, gen_len: int, spec: Any = None) -> tuple[bool, float]:
    """Greedy agreement with the no-cache `oracle` over every step, and the max |logit diff| while rows agree.

    Both run free, in lockstep, so only one step's logits are held (a long run's logits would not fit).
    A row's logits are compared while all its earlier tokens agree: after that the inputs differ.
    `spec`: the candidate's CacheSpec (None: no cache).
    """
    import torch

    from gen_cli.infer.generate import greedy_steps, new_cache

    agreed = torch.ones(prompt.shape[0], dtype=torch.bool, device=prompt.device)  # (B,)
    max_diff = 0.0
    cache = new_cache(model, prompt, gen_len, spec=spec) if spec is not None else None
    cand = greedy_steps(model, prompt, gen_len, cache)
    ref = greedy_steps(oracle, prompt, gen_len, None)
    for (logits, token), (ref_logits, ref_token) in zip(cand, ref, strict=True):
        if agreed.any():
            diff = (logits.float() - ref_logits.float()).abs().amax(dim=-1)  # (B,)
            max_diff = max(max_diff, float(diff[agreed].max()))
        agreed &= token == ref_token
    return bool(agreed.all()), max_diff


def measure(spec: Spec) -> dict[str, Any]:
    """Build the variant, warm up, time `repeats` greedy generations, check against the fp32 oracle."""
    import torch

    from gen_cli.cache.spec import CacheSpec
    from gen_cli.infer.generate import run_generation
    from gen_cli.infer.optimize import compute_dtype, optimize_for_decode
    from gen_cli.infer.options import SamplingConfig
    from gen_cli.model.transformer import random_model, set_attention_impl
    from gen_cli.runtime import LoadProbe, resolve_device, resolve_dtype, set_threads

    started = time.perf_counter()
    threads = set_threads(spec.threads)
    device = resolve_device(spec.device)
    quantize = "int8" if spec.dtype == "int8" else "none"
    dtype = compute_dtype(quantize, device, requested=None if quantize == "int8" else resolve_dtype(spec.dtype, device))
    config = spec.config
    # Seeded by shape only: cache on/off and every dtype of one variant start from identical fp32 weights.
    model = random_model(config).to(device)
    params = model.num_parameters()  # before optimising: packed or int8 weights are buffers, not parameters
    prompt = torch.randint(
        0, config.vocab_size, (spec.batch, spec.prompt_len), generator=torch.Generator().manual_seed(PROMPT_SEED)
    ).to(device)
    # The same inference path `gen generate` runs: fused and prepacked (or int8) weights.
    model = optimize_for_decode(model.to(dtype), quantize=quantize)
    set_attention_impl(model, spec.attn_impl)  # prefill and PyTorch's decode steps; the C step is its own
    greedy = SamplingConfig(temperature=0.0)
    cache = spec.cache_spec()
    with LoadProbe() as probe:  # over the timed runs (and warm-up): what other processes took meanwhile
        every = [
            run_generation(
                model,
                prompt,
                spec.gen_len,
                greedy,
                use_cache=spec.kv_cache,
                spec=cache,
            ).stats
            for _ in range(spec.warmup + spec.repeats)
        ]
    runs = every[spec.warmup :]  # the timed ones
    # The first run in this fresh process allocates from the OS; later runs reuse the allocator's freed
    # memory and show less, so the peak is the largest any run saw (in practice the first's).
    peak = max(every, key=lambda s: s.peak_memory_bytes)
    # Correctness after timing, so the oracle's freed buffers cannot hide the timed runs' peak memory.
    # A window changes what attention sees, so the no-cache oracle is not its reference: its cost is the KL
    # against the full cache below (gen's tests check it against a windowed no-cache reference).
    greedy_match, max_diff = None, None
    has_oracle = (spec.kv_cache or spec.dtype != "float32" or spec.attn_impl != "fused") and not spec.window
    if has_oracle:
        oracle = random_model(config).to(device)  # the same fp32 weights the variant was built from, unoptimised
        greedy_match, max_diff = check_against_oracle(model, oracle, prompt, spec.gen_len, cache)
    accuracy = _kv_accuracy(model, prompt, spec.gen_len, cache)
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
        "kv_dtype": spec.kv_dtype,
        "attn_impl": spec.attn_impl,
        "kv_dtype_k": last.kv_dtype_k,
        "kv_dtype_v": last.kv_dtype_v,
        "kv_window": spec.window,
        "kv_sinks": spec.sinks,
        **accuracy,
        "kv_bytes_per_token": (cache or CacheSpec()).bytes_per_token(config, bpe),
        "kv_cache_bytes_analytic": last.kv_cache_bytes_analytic,
        "kv_cache_bytes_measured": last.kv_cache_bytes,
        "peak_memory_bytes": peak.peak_memory_bytes,
        "memory_method": f"{peak.memory_method}, largest over all runs, above the built model",
        "speedup": None,
        "speedup_vs_no_cache": None,
        "baseline": False,
        "greedy_match": greedy_match,
        "max_logit_diff": max_diff,
        "oracle": "float32 no-cache, same weights"
        if has_oracle
        else "window: see KL"
        if spec.window
        else "is the oracle",
        "val_loss": None,
        "bits_per_byte": None,
        "machine_load": probe.load.to_dict(),
        "measure_s": time.perf_counter() - started,
        "samples": {
            "decode_tokens_per_s": rates,
            "ttft_s": [s.ttft_s for s in runs],
            "per_token_latencies_s": list(last.per_token_latencies),
        },
    }


def _kv_accuracy(model: Any, prompt: Any, gen_len: int, cache: Any) -> dict:
    """The cache's cost (a CacheSpec's kinds, window) against the compute-dtype cache of the same model and
    tokens (None without a kind or window, or for a window when the full cache cannot hold the whole run)."""
    from gen_cli.cache.spec import CacheSpec
    from gen_cli.infer.kv_accuracy import kv_accuracy

    keys = ("kl_mean", "kl_max", "top1_agreement", "tokens_before_divergence")
    past_context = prompt.shape[1] + gen_len > model.config.context_length
    if cache is None or cache == CacheSpec() or (cache.window is not None and past_context):
        return {f"kv_{k}": None for k in keys}
    acc = kv_accuracy(model, prompt, gen_len, cache).to_dict()
    return {f"kv_{k}": acc[k] for k in keys}


def _worker() -> int:
    """`python -m gen_cli.lab.worker`: a JSON Spec on stdin → one JSON record line on stdout."""
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
