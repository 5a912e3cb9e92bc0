"""Generation from a GGUF file without importing torch: the C step alone (infer/file_model.py).

Every `gen generate` is a fresh process; on a GGUF file with the default KV cache the C step runs every forward,
so importing torch only costs time (1.0–1.2 s of a 1.8 s answer on a 135M file). `open_file` opens such a file
(or says why it cannot, and the caller takes the PyTorch path); `FileEngine.generate` prefills the prompt, picks
each next token (sampling_np: sampling.py's filters in numpy) and measures the run as `run_generation` does, into
the same GenerationStats.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gen_cli.cache.spec import CacheSpec
from gen_cli.infer.file_model import FileModel
from gen_cli.infer.options import EngineOptions, SamplingConfig, check_act, check_lengths
from gen_cli.infer.sampling_np import generator, sample
from gen_cli.infer.stats import GenerationStats
from gen_cli.native.abi import ACT_DEFAULT
from gen_cli.runtime import LoadProbe, PeakMemory, check_threads, default_threads
from gen_cli.text.conventions import TextConventions


@dataclass
class FileResult:
    """The new ids, what was measured, and whether Ctrl-C cut the run short."""

    tokens: list[int]
    stats: GenerationStats
    interrupted: bool = False


@dataclass
class FileEngine:
    """A GGUF file laid out for the C step, its text conventions, and what opening it took."""

    model: FileModel
    text: TextConventions
    source: str
    load_s: float
    load_peak_bytes: int
    act: str | None  # block weights' activations (None: the file has no block weights)

    def generate(
        self,
        ids: list[int],
        max_new_tokens: int,
        sampling: SamplingConfig,
        seed: int,
        stop_ids: tuple[int, ...],
        on_token: Callable[[int], bool],
    ) -> FileResult:
        """Continue `ids` (sampling_np: numpy's generator seeded with `seed`): stops after max_new_tokens, a stop id,
        or `on_token(id)` returning True. Each step's latency runs from resuming to the token's pick, so time spent
        in `on_token` is not counted."""
        from gen_cli.memory import check_fits

        model, config = self.model, self.model.config
        check_lengths(config, len(ids), max_new_tokens)
        held = len(ids) + max_new_tokens
        analytic = config.kv_bytes_per_token(4) * held  # fp32 K and V
        check_fits(analytic, f"the KV cache of {held:,} tokens", "use fewer max_new_tokens",
                   params=("max_new_tokens",))  # fmt: skip
        history = list(ids)  # the repetition penalty's: the prompt, then each new token
        tokens: list[int] = []
        latencies: list[float] = []
        rng = generator(seed)
        interrupted = False
        with PeakMemory("cpu") as mem, LoadProbe() as probe:
            start = time.perf_counter()
            model.start(held)
            try:
                logits = model.prefill(ids)
                resumed = start
                while True:
                    token = sample(logits, history, sampling, rng)
                    latencies.append(time.perf_counter() - resumed)
                    tokens.append(token)
                    history.append(token)
                    if on_token(token) or len(tokens) == max_new_tokens or token in stop_ids:
                        break
                    resumed = time.perf_counter()
                    logits = model.forward([token])[0]
            except KeyboardInterrupt:
                interrupted = True
        ttft = latencies[0] if latencies else time.perf_counter() - start
        decode_time, steps = sum(latencies[1:]), len(latencies) - 1
        stats = GenerationStats(
            prompt_tokens=len(ids), new_tokens=len(tokens), ttft_s=ttft, prefill_tokens_per_s=len(ids) / ttft,
            decode_tokens_per_s=steps / decode_time if steps > 0 and decode_time > 0 else None,
            ms_per_token=1000 * decode_time / steps if steps > 0 else None,
            kv_cache_bytes=model.kv_nbytes, kv_cache_bytes_analytic=analytic,
            peak_memory_bytes=mem.bytes, memory_method=mem.method, device="cpu", dtype="float32",
            threads=model.requested, batch=1, decode_path="native (torch-free)", kv_dtype_k="fp32", kv_dtype_v="fp32",
            machine_load=probe.measure().to_dict(), per_token_latencies=latencies[1:],
            native_threads=model.threads.report(),
        )  # fmt: skip
        return FileResult(tokens, stats, interrupted)


TORCH_FREE_ENV = "GEN_TORCH_FREE"  # 0: every run takes the PyTorch path (an A/B switch)


def applies(path: Path, options: EngineOptions, cache: CacheSpec | None, one_plain_sample: bool) -> bool:
    """Whether a run may generate without torch: a GGUF file on the CPU, the default KV cache, every model option at
    its default (threads and --act aside), and `one_plain_sample` (one sample; no prompt cache, profile or
    speculation). The file itself may still refuse (its types, its RoPE…: `FileModel.open`)."""
    import os

    if os.environ.get(TORCH_FREE_ENV, "1") == "0" or path.suffix.lower() != ".gguf" or not path.is_file():
        return False
    # "auto" would pick a GPU where one is: only PyTorch runs there.
    cpu = options.device == "cpu" or (options.device == "auto" and not _may_have_gpu())
    plain = options == EngineOptions(device=options.device, threads=options.threads, act=options.act)
    return cpu and plain and cache == CacheSpec() and one_plain_sample


def _may_have_gpu() -> bool:
    """Whether `--device auto` could find a CUDA or MPS device here (a driver or macOS), judged without torch."""
    import os
    import sys

    return sys.platform == "darwin" or os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl")


def open_file(path: Path, threads: int | None, act: str | None) -> FileEngine | str:
    """The GGUF file at `path` ready for generation without torch, or why it cannot be."""
    from gen_cli.formats.gguf_file import text_conventions
    from gen_cli.memory import check_load_fits

    requested = check_threads(threads) if threads is not None else default_threads()
    if act is not None:
        check_act(act)  # refused before the file is read, as on the PyTorch path
    check_load_fits(path)
    with PeakMemory("cpu") as mem:
        start = time.perf_counter()
        model = FileModel.open(path, requested, act)
        if isinstance(model, str):
            return model
        conventions = text_conventions(model.file, model.config)
        load_s = time.perf_counter() - start
    blocky = any(h.blocks for h in model.helds.values())
    return FileEngine(model, conventions, str(path), load_s, mem.bytes, (act or ACT_DEFAULT) if blocky else None)
