"""`gen bench decode`: gen's decode modes against HF transformers on the same shapes, side by side in one run.

Every model of a shape is built from the same seeded fp32 weights (HF's LlamaForCausalLM gets a copy of
them, so its logits are checked too); repeats are interleaved across modes so noise hits all alike.
transformers is optional: without it the gen rows still run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch

from gen_cli.errors import UsageError
from gen_cli.infer.engine import decode_layout
from gen_cli.infer.generate import greedy_steps, model_dtype, new_cache, run_generation
from gen_cli.infer.options import EngineOptions, SamplingConfig
from gen_cli.lab.ceilings import (
    blended_peak,
    dtype_kind,
    kv_bytes_read,
    measure_bandwidth,
    measure_peak_flops,
    prefill_flops_by_kind,
    prefill_flops_per_token,
    weight_bytes_by_class,
)
from gen_cli.lab.transformers_peer import build_hf, hf_available, hf_version, time_hf
from gen_cli.model.config import ModelConfig, load_preset
from gen_cli.model.transformer import Transformer, random_model
from gen_cli.runtime import LoadProbe, dtype_name, spread_verdict

# Reference figures for a llama2.c-style C loop on the 2-core CPU machine of the README's table (fp32,
# 2 threads, 256 tokens); fixed numbers, not measured in the run, so compared only with runs of those
# shapes and settings on the CPU.
C_REFERENCE_TOK_S = {"small": 850.0, "base": 105.0}
C_REFERENCE_THREADS, C_REFERENCE_NEW_TOKENS = 2, 256


class Mode(NamedTuple):
    """How `gen generate` runs: the first three modes are its defaults with the matching --dtype or
    --quantize, "-torch" modes add --no-native, "+compile" ones --compile."""

    dtype: torch.dtype | None  # activations; None: as `gen generate` picks them (int8 weights)
    quantize: str
    compile: bool
    native: bool


MODES: dict[str, Mode] = {
    "fp32": Mode(torch.float32, "none", False, True),
    "int8": Mode(None, "int8", False, True),
    "bf16": Mode(torch.bfloat16, "none", False, True),
    "fp32-torch": Mode(torch.float32, "none", False, False),
    "bf16-torch": Mode(torch.bfloat16, "none", False, False),
    "int8-torch": Mode(None, "int8", False, False),
    "fp32+compile": Mode(torch.float32, "none", True, False),
    "bf16+compile": Mode(torch.bfloat16, "none", True, False),
    "int8+compile": Mode(None, "int8", True, False),
    # GGUF's block formats (the native step reads them as stored; activations fp32)
    "q8_0": Mode(None, "q8_0", False, True),
    "q4_0": Mode(None, "q4_0", False, True),
    "q4_1": Mode(None, "q4_1", False, True),
    "q4_k": Mode(None, "q4_k", False, True),
    # a model file's weights as it stores them (a GGUF file's block types), only with a model
    "file": Mode(None, "none", False, True),
}
DEFAULT_MODES = ("fp32", "bf16", "int8", "fp32-torch")
ACT_SEP = "@"  # "q4_0@fp32": a block mode with its activation precision (--act); without it, the default
# A GPU has no native step (fp32 and bf16 run PyTorch's ops there) and int8 no GPU kernel in gen.
DEFAULT_GPU_MODES = ("fp32", "bf16", "fp32+compile", "bf16+compile")
DECODE_PROMPT = 8
PREFILL_PROMPT = 512  # llama-bench's pp512
NEW_TOKENS = 128  # llama-bench's tg128
PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}  # what a prefill computes in


@dataclass
class Row:
    """One measured configuration; rates in tokens/s, deviation measured against gen's unoptimised fp32."""

    shape: str
    mode: str
    path: str  # who ran the decode steps: "native" (gen's C step), "torch" or "transformers"
    decode_tok_s: float
    decode_runs: list[float]
    prefill_tok_s: float
    prefill_prompt: int
    prefill_runs: list[float]
    prefill_flops_per_token: float  # to divide a prefill rate by the peak FLOP rate measured in the run
    peak_gflops: float  # the best GEMM rates measured in the run, blended as this row's prefill computes
    peak_dtype: str  # what it computes in: "fp32", "bf16", "int8", or a mix ("int8 92% + fp32 8%")
    max_logit_diff: float
    greedy_agree: int
    new_tokens: int
    bytes_per_token: int
    bandwidth_gb_s: float  # measured in the same run, beside this shape's repeats
    ceiling_tok_s: float
    vs_hf: float | None = None
    vs_c: float | None = None
    compile_s: float | None = None
    vs_hf_note: str | None = None  # why the ratio to transformers is not significant, or None
    machine_load: dict[str, Any] = field(default_factory=dict)  # during this shape's timed runs
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mix_label(mix: dict[str, float]) -> str:
    """What a prefill computes in: one kind ("int8"), or each kind's share of its FLOPs ("int8 92% + fp32 8%")."""
    if len(mix) == 1:
        return next(iter(mix))
    total = sum(mix.values())
    return " + ".join(f"{kind} {100 * f / total:.0f}%" for kind, f in sorted(mix.items(), key=lambda kv: -kv[1]))


def split_mode(mode: str) -> tuple[str, str | None]:
    """ "q4_0@fp32" -> ("q4_0", "fp32"); a mode without a precision -> (mode, None)."""
    base, _, act = mode.partition(ACT_SEP)
    return base, act or None


def is_block_mode(mode: str) -> bool:
    """Whether `mode`'s weights are GGML blocks (a block quantization, or a file's weights as stored)."""
    from gen_cli.infer.optimize import BLOCK_MODES

    base = split_mode(mode)[0]
    return base == "file" or (base in MODES and MODES[base].quantize in BLOCK_MODES)


def with_acts(modes: tuple[str, ...], acts: tuple[str, ...] | None, file_blocks: bool = True) -> tuple[str, ...]:
    """Each block mode once per activation precision in `acts` ("q4_0" -> "q4_0@int8", "q4_0@fp32"); others as given.
    `file_blocks`: whether the model's own weights are blocks (else "file" has no precision to choose)."""
    if not acts:
        return modes

    def takes_act(mode: str) -> bool:
        return is_block_mode(mode) and (file_blocks or split_mode(mode)[0] != "file")

    return tuple(dict.fromkeys(f"{m}{ACT_SEP}{a}" if takes_act(m) else m for m in modes for a in acts))


def mode_options(mode: str, device: torch.device) -> EngineOptions:
    """The options `gen generate` opens a model with in `mode` (its --dtype, --quantize, --compile, --native, --act)."""
    base, act = split_mode(mode)
    dtype, quantize, compile, native = MODES[base]
    return EngineOptions(device.type, dtype_name(dtype) if dtype else None, None, quantize, native, compile, act=act)


def build_gen(config: ModelConfig, mode: str, device: torch.device) -> Transformer:
    """The seeded model in `mode`, laid out as `gen generate` lays it out (compiling happens on the first run)."""
    return decode_layout(random_model(config), mode_options(mode, device), device)


def time_gen(model: Transformer, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """gen's generation path (`run_generation`, as `gen generate` runs it), greedy: same triple as time_hf."""
    result = run_generation(model, prompt, new_tokens, SamplingConfig(temperature=0.0))
    s = result.stats
    return s.decode_tokens_per_s or float("nan"), s.prefill_tokens_per_s, result.tokens[0]


@torch.inference_mode()
def _teacher_forced_logits(model: Any, seq: torch.Tensor, hf: bool) -> torch.Tensor:
    """fp32 logits (T, V) of the whole sequence, without cache and without compile."""
    logits = model(seq).logits if hf else Transformer.forward(model, seq)  # class call bypasses torch.compile
    return logits[0].float()


def _decoded_logits(model: Transformer, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """fp32 logits (T - prompt_len + 1, V) from position prompt_len-1 on, computed the way generation
    computes them (a prefill, then one decode step per token): the path whose deviation is reported."""
    new = seq.shape[1] - prompt_len + 1
    forced = torch.cat([seq[:, prompt_len:], seq[:, -1:]], dim=1)  # (1, new): the last one is never fed
    cache = new_cache(model, seq[:, :prompt_len], new)
    return torch.cat([logits for logits, _ in greedy_steps(model, seq[:, :prompt_len], new, cache, forced)]).float()


def _agree(tokens: torch.Tensor, reference: torch.Tensor) -> int:
    """Tokens identical to the reference before the first divergence."""
    differ = (tokens.cpu() != reference.cpu()).nonzero()
    return int(differ[0, 0]) if len(differ) else len(reference)


def bench_shape(
    shape: str,
    modes: tuple[str, ...],
    repeats: int,
    new_tokens: int,
    device: torch.device,
    with_hf: bool,
    bandwidth: float | None = None,
    on_step: Callable[[str], None] | None = None,
    on_run: Callable[[], None] | None = None,
    **options: Any,
) -> list[Row]:
    """Measure every mode (and HF) on one preset shape; decode repeats interleaved across modes; `options`
    as bench_runners takes them (prompt_len, between, profile).

    The bandwidth for the ceiling is measured once per round of repeats (this machine's bandwidth
    drifts by tens of percent over minutes) and its median used, unless `bandwidth` is given.
    """
    config = load_preset(shape)
    reference = random_model(config).to(device)  # unoptimised fp32: the oracle for every deviation
    hf = (lambda: build_hf(reference, device)) if with_hf else None
    return bench_runners(shape, reference, lambda mode: build_gen(config, mode, device), hf, modes, repeats,
                         new_tokens, bandwidth, on_step, on_run, **options)  # fmt: skip


def bench_runners(
    label: str,
    reference: Transformer,
    build_mode: Callable[[str], Transformer],
    build_transformers: Callable[[], Any] | None,
    modes: tuple[str, ...],
    repeats: int,
    new_tokens: int,
    bandwidth: float | None = None,
    on_step: Callable[[str], None] | None = None,
    on_run: Callable[[], None] | None = None,
    vocab: int | None = None,
    prompt_len: int = PREFILL_PROMPT,
    between: Callable[[int], None] | None = None,
    profile: bool = False,
    text: torch.Tensor | None = None,
    own_timer: Callable[[str], Callable | None] | None = None,
) -> list[Row]:
    """Rows for `reference` (unoptimised fp32, the deviation oracle) in every mode `build_mode` builds, and
    the transformers model `build_transformers` builds; prompts are random ids below `vocab`.

    `between(round)` runs after each round of repeats (a peer such as llama-bench, interleaved with gen's
    runs); `profile` adds each gen mode's decode-step profile to its row's `extra["profile"]`; `text` (1, T) ids
    of real text: each mode with an activation precision gets `extra["act_quality"]` against fp32 activations.
    `own_timer(mode)`: a timer (as time_gen) for a mode `gen generate` runs on another engine than run_generation
    (a GGUF file's torch-free one), or None; that row's path is "torch-free", its deviation still the built model's.
    """
    config, device = reference.config, reference.norm.weight.device
    step = on_step or (lambda _msg: None)
    gen_ = torch.Generator().manual_seed(1)
    vocab = vocab or config.vocab_size
    decode_prompt = torch.randint(0, vocab, (1, DECODE_PROMPT), generator=gen_).to(device)
    prefill_len = min(prompt_len, config.context_length - 1)  # for shapes with a shorter context
    flops = prefill_flops_per_token(reference, prefill_len)
    prefill_prompt = torch.randint(0, vocab, (1, prefill_len), generator=gen_).to(device)

    ref_tokens = time_gen(reference, decode_prompt, new_tokens)[2]
    seq = torch.cat([decode_prompt[0], ref_tokens[:-1]])[None]  # (1, prompt + new - 1): greedy fp32 path
    ref_logits = _teacher_forced_logits(reference, seq, hf=False)[DECODE_PROMPT - 1 :]

    runners: dict[str, tuple[Any, Callable, bool]] = {}
    compile_s: dict[str, float] = {}
    torch_free: set[str] = set()
    for mode in modes:
        step(f"{label}: building {mode}")
        model = build_mode(mode)
        if own_timer is not None and (timer := own_timer(mode)) is not None:
            runners[mode] = (model, timer, False)
            torch_free.add(mode)
            continue
        if MODES[split_mode(mode)[0]].compile:
            start = time.perf_counter()
            time_gen(model, decode_prompt, new_tokens)  # compiles prefill and decode graphs
            time_gen(model, prefill_prompt, 1)
            compile_s[mode] = time.perf_counter() - start
        runners[mode] = (model, time_gen, False)
    if build_transformers is not None:
        step(f"{label}: building transformers")
        runners["transformers"] = (build_transformers(), time_hf, True)
    del reference
    # what each runner's prefill computes in, by FLOPs: the peaks measured beside the runs are those kinds'
    # (a torch-free prompt runs the C step's products, which never take the PyTorch path's tiles: 1 row)
    mixes = {name: {dtype_kind(model_dtype(model)): flops} if hf
             else prefill_flops_by_kind(model, flops, 1 if name in torch_free else prefill_len)
             for name, (model, _, hf) in runners.items()}  # fmt: skip
    kinds = {"int8" if kind == "int8x2" else kind for mix in mixes.values() for kind in mix}

    decode: dict[str, list[float]] = {name: [] for name in runners}
    prefill: dict[str, list[float]] = {name: [] for name in runners}
    tokens: dict[str, torch.Tensor] = {}
    for model, timer, _ in runners.values():  # warm-up: allocator, thread pools, lazy init
        timer(model, decode_prompt, min(new_tokens, 16))
    bandwidths = []
    peaks: dict[str, float] = dict.fromkeys(kinds, 0.0)  # a peak rate is the best seen in the run
    with LoadProbe() as probe:
        for rep in range(repeats):
            if bandwidth is None:
                bandwidths.append(measure_bandwidth(device))
            for key in kinds:
                peaks[key] = max(peaks[key], measure_peak_flops(device, PEAK_DTYPES[key]) / 1e9)
            for name, (model, timer, _) in runners.items():
                step(f"{label}: {name} run {rep + 1}/{repeats}")
                rate, _, toks = timer(model, decode_prompt, new_tokens)
                decode[name].append(rate)
                tokens[name] = toks
                prefill[name].append(timer(model, prefill_prompt, 1)[1])
                if on_run is not None:
                    on_run()
            if between is not None:
                step(f"{label}: peer run {rep + 1}/{repeats}")
                between(rep)

    bandwidth = bandwidth or statistics.median(bandwidths)
    rows = []
    kv_prompt = DECODE_PROMPT
    references: dict[str, Any] = {}  # per block mode: fp32 activations' figures on the real text
    for name, (model, _, hf) in runners.items():
        step(f"{label}: deviation of {name}")
        if hf:
            logits, path = _teacher_forced_logits(model, seq, hf)[DECODE_PROMPT - 1 :], "transformers"
        else:
            logits = _decoded_logits(model, seq, DECODE_PROMPT)
            path = "torch-free" if name in torch_free else "native" if model.native_decoder else "torch"
        dtype = model_dtype(model)
        by_class = weight_bytes_by_class(model) | {"kv cache": kv_bytes_read(config, dtype, kv_prompt, new_tokens)}
        nbytes = sum(by_class.values())
        rows.append(
            Row(
                shape=label,
                mode=name,
                path=path,
                decode_tok_s=statistics.median(decode[name]),
                decode_runs=decode[name],
                prefill_tok_s=statistics.median(prefill[name]),
                prefill_prompt=prefill_len,
                prefill_runs=prefill[name],
                prefill_flops_per_token=flops,
                peak_gflops=blended_peak(mixes[name], peaks),
                peak_dtype=_mix_label(mixes[name]),
                max_logit_diff=float((logits - ref_logits).abs().max()),
                greedy_agree=_agree(tokens[name], ref_tokens),
                new_tokens=new_tokens,
                bytes_per_token=nbytes,
                bandwidth_gb_s=bandwidth / 1e9,
                ceiling_tok_s=bandwidth / nbytes,
                compile_s=compile_s.get(name),
                machine_load=probe.load.to_dict(),
                extra={"bytes_by_class": by_class, "peaks_gflops": dict(peaks)},
            )
        )
        base, act = split_mode(name)
        if act is not None and text is not None:
            from gen_cli.lab.act_quality import act_quality, fp32_reference

            step(f"{label}: {name} against fp32 activations on real text")
            if base not in references:  # on the mode's fp32 build when measured: its stored rows run fp32 fastest
                own = runners.get(f"{base}{ACT_SEP}fp32", (model,))[0]
                references[base] = fp32_reference(own, text.to(device), min(new_tokens, 64))
            (quality,) = act_quality(model, text.to(device), [act], min(new_tokens, 64), references[base])
            rows[-1].extra["act_quality"] = quality.to_dict()
        if profile and not hf:
            step(f"{label}: profiling {name}")
            rows[-1].extra["profile"] = _profile(model, decode_prompt, new_tokens, MODES[base].compile)
    hf = next((r for r in rows if r.mode == "transformers"), None)
    for r in rows:
        r.vs_hf = r.decode_tok_s / hf.decode_tok_s if hf and hf.decode_tok_s else None
        if r.vs_hf is not None and r is not hf:
            r.vs_hf_note = spread_verdict(r.decode_runs, hf.decode_runs, probe.load.busy)
        r.vs_c = vs_c_reference(label, r.decode_tok_s, device, new_tokens)
    return rows


def _profile(model: Transformer, prompt: torch.Tensor, new_tokens: int, compiled: bool) -> dict[str, Any]:
    """The decode step's time per op class (a compiled model runs its graph: the hooks would break it)."""
    from gen_cli.lab.profile import profile_decode

    if compiled:
        return {"note": "compiled: one graph, no per-class times"}
    return profile_decode(model, prompt, new_tokens).to_dict()


def vs_c_reference(shape: str, tok_s: float, device: torch.device, new_tokens: int) -> float | None:
    """tok_s over the fixed C figure, or None where that figure's shape and settings do not apply."""
    same_settings = (torch.get_num_threads(), new_tokens) == (C_REFERENCE_THREADS, C_REFERENCE_NEW_TOKENS)
    if shape not in C_REFERENCE_TOK_S or device.type != "cpu" or not same_settings:
        return None
    return tok_s / C_REFERENCE_TOK_S[shape]


def bench_decode(
    shapes: tuple[str, ...],
    modes: tuple[str, ...] | None = None,
    repeats: int = 3,
    new_tokens: int = NEW_TOKENS,
    device: torch.device | str = "cpu",
    on_step: Callable[[str], None] | None = None,
    on_run: Callable[[], None] | None = None,
    prompt_len: int = PREFILL_PROMPT,
    profile: bool = False,
    acts: tuple[str, ...] | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    """Rows for every shape × mode (+ transformers when installed) and the run's context (threads, bandwidth…).

    `modes` defaults to DEFAULT_MODES on the CPU, DEFAULT_GPU_MODES elsewhere; `acts` runs each block mode once
    per activation precision (random weights: speed only, no quality against fp32 activations).
    """
    device = torch.device(device)
    modes = checked_modes(with_acts(checked_modes(modes, new_tokens, device), acts), new_tokens, device)
    if "file" in modes:
        raise UsageError("mode file runs a model file's weights as stored: it needs a model, not a preset shape")
    with_hf = hf_available()
    rows: list[Row] = []
    for shape in shapes:
        rows += bench_shape(shape, modes, repeats, new_tokens, device, with_hf, on_step=on_step, on_run=on_run,
                            prompt_len=prompt_len, profile=profile)  # fmt: skip
    return rows, run_context(device, rows, shapes, with_hf, repeats, new_tokens, prompt_len)


def checked_modes(modes: tuple[str, ...] | None, new_tokens: int, device: torch.device) -> tuple[str, ...]:
    """The modes asked for, or the device's defaults; unknown modes and too few new tokens refused."""
    modes = modes or (DEFAULT_MODES if device.type == "cpu" else DEFAULT_GPU_MODES)
    if unknown := [m for m in modes if split_mode(m)[0] not in MODES]:
        raise UsageError(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    from gen_cli.infer.optimize import QUANTIZE_MODES
    from gen_cli.infer.options import check_act

    for m in modes:
        if (act := split_mode(m)[1]) is not None:
            check_act(act)
            if not is_block_mode(m):
                raise UsageError(f"mode {m}: an activation precision applies to block weights (q8_0, q4_0, q4_k, file)")
    if missing := [m for m in modes if MODES[split_mode(m)[0]].quantize not in QUANTIZE_MODES]:
        raise UsageError(f"mode(s) {', '.join(missing)}: this build of gen has no such weight format")
    if new_tokens < 2:
        raise UsageError("max_new_tokens must be at least 2 (decode speed needs two steps)", params=("max_new_tokens",))
    return modes


def run_context(
    device: torch.device,
    rows: list[Row],
    labels: tuple[str, ...],
    with_hf: bool,
    repeats: int,
    new_tokens: int,
    prompt_len: int = PREFILL_PROMPT,
) -> dict[str, Any]:
    """What a reader needs beside the rows: device, threads, bandwidth and the peak GEMM FLOP rates (of
    the dtypes the rows compute in) per shape or model, versions, settings."""
    context = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "bandwidth_gb_s": {label: next(r.bandwidth_gb_s for r in rows if r.shape == label) for label in labels},
        "transformers": hf_version() if with_hf else None,
        "torch": torch.__version__,
        "repeats": repeats,
        "new_tokens": new_tokens,
        "decode_prompt": DECODE_PROMPT,
        "prefill_prompt": prompt_len,
        "peak_gflops": {label: next(r.extra["peaks_gflops"] for r in rows if r.shape == label) for label in labels},
        "machine_busy": any(r.machine_load.get("busy") for r in rows),
    }
    if device.type == "cuda":
        context["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
    return context
