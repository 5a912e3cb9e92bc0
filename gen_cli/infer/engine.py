"""One way to open a model for inference: load it, build its decode layout once, and hold what a run needs.

`open_model(source, options)` returns an `Engine`: the model (fused, quantized, kernels attached), its
tokenizer and the model's text conventions (BOS, stop ids, chat template), with methods to encode a
prompt, make a cache from a `CacheSpec`, generate, and start a chat session. Commands parse flags into
`EngineOptions`, call it once, and render what comes back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gen_cli import collector
from gen_cli.cache.spec import CacheSpec
from gen_cli.errors import UsageError
from gen_cli.formats.loaded import Loaded
from gen_cli.infer.generate import GenerationResult, check_memory, new_cache, run_generation
from gen_cli.infer.optimize import (
    QUANTIZE_MODES,
    activations,
    compile_warm_up,
    compute_dtype,
    decode_arena,
    optimize_for_decode,
)
from gen_cli.infer.options import EngineOptions, Preset, SamplingConfig, check_act
from gen_cli.model.transformer import Transformer, set_attention_impl
from gen_cli.text.conventions import TextConventions, check_utf8
from gen_cli.text.tokenizer import EOT, special_id

if TYPE_CHECKING:
    from gen_cli.cache.linear import KVCache
    from gen_cli.cache.window import WindowKVCache
    from gen_cli.infer.session import ChatSession
    from gen_cli.infer.speculative import Speculation


@dataclass
class Engine:
    """A model laid out for decoding, its tokenizer, and what the model says about its own text."""

    model: Transformer
    tokenizer: Any
    source: str  # what was opened, for messages ("preset tiny (random weights)", a path, + ", int8 weights")
    device: torch.device
    options: EngineOptions
    stop_ids: tuple[int, ...]  # end-of-turn ids the model declares, else gen's <|endoftext|>
    bos_id: int | None = None  # the beginning-of-sequence id an imported model declares
    add_special_tokens: bool = False  # prompts encode with the tokenizer's own BOS etc. (imported models)
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # for the user: loading, RoPE scaling, the C step's build
    random_weights: bool = False
    load_s: float = 0.0  # reading the weights (not the layout): part of the time to first token
    load_peak_bytes: int = 0

    @property
    def text(self) -> TextConventions:
        """The model's text rules (tokenizer, BOS, stop ids, chat template), as the torch-free path holds them."""
        return TextConventions(self.tokenizer, self.source, self.stop_ids, self.bos_id, self.add_special_tokens,
                               self.chat_template, self.special_tokens)  # fmt: skip

    def encode(self, text: str) -> list[int]:
        """A prompt's ids as the model reads them (TextConventions.encode)."""
        return self.text.encode(text)

    def chat_ids(self, message: str, system: str | None = None) -> list[int]:
        """The ids of a one-turn conversation rendered by the model's chat template, ready for its reply."""
        return self.text.chat_ids(message, system, self.model.config.context_length)

    def new_cache(
        self, spec: CacheSpec, prompt_len: int, max_new_tokens: int, batch: int = 1
    ) -> KVCache | WindowKVCache:
        """An empty cache for `batch` sequences of a prompt and its continuation, as `spec` stores them."""
        prompt = torch.zeros(1, prompt_len, dtype=torch.long, device=self.device)  # (1, T): only its shape is read
        return new_cache(self.model, prompt, max_new_tokens, batch, spec)

    def check_memory(self, tokens: int, batch: int) -> None:
        """Refuse, before anything is allocated, `batch` sequences of `tokens` that could not fit."""
        check_memory(self.model, batch, tokens, self.device)

    def warm_up(self, ids: list[int], max_new_tokens: int, sampling: SamplingConfig, num_samples: int = 1) -> float:
        """Compile a torch.compile'd model's graphs for this generation's shapes, untimed; seconds it took."""
        prompt = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        return compile_warm_up(self.model, prompt, max_new_tokens, sampling, num_samples)

    def generate(
        self,
        ids: list[int],
        max_new_tokens: int,
        sampling: SamplingConfig,
        cache: CacheSpec | None = CacheSpec(),
        seed: int = 0,
        stop_ids: tuple[int, ...] | None = None,
        num_samples: int = 1,
        on_token: Callable[[torch.Tensor], bool] | None = None,
        restore: Callable[[KVCache], None] | None = None,
        speculation: Speculation | None = None,
    ) -> GenerationResult:
        """Continue `ids` (`infer.generate.run_generation`, timed): `cache` None recomputes every step, a
        spec says how keys and values are kept; stops at `stop_ids` (default: the model's). `speculation`
        verifies a proposer's guesses instead (`infer.speculative`: greedy gives the same ids)."""
        prompt = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        stops = self.stop_ids if stop_ids is None else stop_ids
        if speculation is not None:
            from gen_cli.infer.speculative import check_cache, run_speculative

            check_cache(cache, cache is not None, num_samples)
            if restore is not None:
                raise UsageError(
                    "speculative decoding does not start from a prompt-cache file yet; use one or the other"
                )
            return run_speculative(self.model, prompt, max_new_tokens, sampling, speculation, generator, stops,
                                   on_token, cache)  # fmt: skip
        return run_generation(
            self.model, prompt, max_new_tokens, sampling, cache is not None, generator, stops, num_samples, on_token,
            cache, restore,
        )  # fmt: skip

    def chat(
        self,
        system: str | None = None,
        context_tokens: int | None = None,
        cache: CacheSpec = CacheSpec(),
    ) -> ChatSession:
        """A conversation with this model through its chat template, one KV cache kept across turns."""
        from gen_cli.infer.session import ChatSession

        if self.chat_template is None:
            raise UsageError(f"{self.source} has no chat template, so it cannot chat; continue text instead")
        check_utf8(system or "", "the system message")
        return ChatSession(
            self.model, self.tokenizer, self.chat_template, special_tokens=self.special_tokens,
            stop_ids=self.stop_ids, system=system, context_tokens=context_tokens,
            source=f"{self.source}: chat template", spec=cache,
        )  # fmt: skip

    @property
    def activations(self) -> str | None:
        """What block weights multiply (abi.py's ACT_MODES); None without block weights."""
        return activations(self.model)

    def decode_note(self) -> str:
        """Why PyTorch decodes although the native step was not turned off ("" when it was, or it runs)."""
        from gen_cli.native.decoder import unavailable_reason

        if not self.options.native or self.options.compile or self.model.native_decoder is not None:
            return ""
        return unavailable_reason(self.model) or ""


def run_dtype(options: EngineOptions, device: torch.device) -> torch.dtype | None:
    """The dtype the options compute in on `device` (None: the model's own), as `gen generate` picks it."""
    from gen_cli import runtime

    if options.quantize not in QUANTIZE_MODES:
        raise UsageError(
            f"unknown quantize mode {options.quantize!r}; choose {', '.join(QUANTIZE_MODES)}", params=("quantize",)
        )
    if options.act is not None:
        check_act(options.act)  # refused before any weight is read
    requested = runtime.run_dtype(options.dtype, device) if options.dtype else None  # `auto` resolved on the device
    return compute_dtype(options.quantize, device, options.native, requested)


def decode_layout(model: Transformer, options: EngineOptions, device: torch.device) -> Transformer:
    """`model` on `device` in the options' dtype, made inference-only: fused, quantized, kernels attached."""
    dtype = run_dtype(options, device)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return optimize_for_decode(model, options.quantize, options.compile, options.native, options.act)


def open_model(
    source: Path | Preset | None,
    options: EngineOptions = EngineOptions(),
    before_layout: Callable[[Loaded], None] | None = None,
) -> Engine:
    """Load a model (a path, a preset's random weights, None: the shipped model) and lay it out for decoding;
    `before_layout(loaded)` sees the weights as stored (a prompt-cache file fingerprints those)."""
    from gen_cli.formats.loading import load
    from gen_cli.native.build import take_notes
    from gen_cli.runtime import PeakMemory, resolve_device, set_threads

    device = resolve_device(options.device)
    dtype = run_dtype(options, device)
    set_threads(options.threads)
    start = time.perf_counter()
    with PeakMemory(device) as memory:
        if isinstance(source, Preset):
            p = source
            loaded = load(
                None, p.name, p.tokenizer, p.attention, p.kv_heads, p.pos, device, dtype, options.rope_scaling
            )
        else:
            arena = decode_arena(options.quantize, options.compile, options.native, device)
            loaded = load(
                source, device=device, dtype=dtype, rope_scaling=options.rope_scaling, arena=arena, act=options.act
            )
    load_s = time.perf_counter() - start
    if before_layout is not None:
        before_layout(loaded)
    set_attention_impl(loaded.model, options.attn_impl)
    model = optimize_for_decode(loaded.model, options.quantize, options.compile, options.native, options.act)
    tok = loaded.tokenizer
    # gen's models end a text with <|endoftext|>; an imported model declares its own end-of-turn ids.
    eot = special_id(tok, EOT)
    stop_ids = loaded.stop_ids or ((eot,) if eot is not None else ())
    source_label = loaded.source + (f", {options.quantize} weights" if options.quantize != "none" else "")
    collector.resume_frozen()  # the model lives as long as the process: out of the collector's walks
    return Engine(
        model, tok, source_label, device, options, stop_ids, loaded.bos_id, loaded.add_special_tokens,
        loaded.chat_template, loaded.special_tokens, [*loaded.notes, *take_notes()], loaded.random_weights,
        load_s, memory.bytes,
    )  # fmt: skip
