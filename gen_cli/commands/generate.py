"""`gen generate`: continue a prompt (or reply to a chat message), optionally streaming and measuring.

The command reads: check the flags, open the model (`infer.engine`), encode, generate, render.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from gen_cli.commands.common import err, print_json, progress_enabled, read_text_arg
from gen_cli.commands.generate_view import print_stats, reuse_note
from gen_cli.commands.options import (
    CACHE,
    INPUT,
    MODEL,
    OUTPUT,
    SAMPLING,
    Act,
    Attention,
    AttnImpl,
    Compile,
    Device,
    Draft,
    Dtype,
    Json,
    KvCache,
    KvDtype,
    KvDtypeK,
    KvDtypeV,
    KvHeads,
    MaxNewTokens,
    MinP,
    Model,
    Native,
    Pos,
    Preset,
    Profile,
    RepetitionPenalty,
    RopeScaling,
    Seed,
    Sinks,
    Speculate,
    Stats,
    Stop,
    System,
    Temperature,
    Threads,
    Tokenizer,
    TopK,
    TopP,
    Window,
    kv_kinds_of,
)
from gen_cli.errors import GenError, UsageError
from gen_cli.model.config import POS_ENCODINGS, parse_rope_scaling
from gen_cli.resources import default_model_dir
from gen_cli.text.tokenizer import EOT

if TYPE_CHECKING:
    from gen_cli.cache.spec import CacheSpec
    from gen_cli.infer.engine import Engine
    from gen_cli.infer.options import EngineOptions, SamplingConfig
    from gen_cli.infer.options import Preset as PresetShape
    from gen_cli.infer.prompt_reuse import PromptReuse
    from gen_cli.infer.speculative import Speculation
    from gen_cli.infer.torch_free import FileEngine
    from gen_cli.lab.profile import StepProfile
    from gen_cli.text.conventions import TextConventions


def _check_model_flags(
    model_dir: Path | None,
    preset: str | None,
    tokenizer: Path | None,
    attention: str | None,
    kv_heads: int | None,
    pos: str | None,
    rope_scaling: str | None,
) -> None:
    """Refuse what names no model, or shape flags that only random weights take."""
    if rope_scaling is not None:
        parse_rope_scaling(rope_scaling)  # a malformed spec fails here, before any weights are read
    if model_dir is not None and preset is not None:
        raise UsageError("pass either --model DIR or --preset NAME, not both")
    if preset is None:
        shape = [name for name, v in (("--attention", attention), ("--kv-heads", kv_heads), ("--pos", pos)) if v]
        if shape:
            raise UsageError(
                f"{', '.join(shape)} describe(s) how a model was trained and only apply with --preset "
                "(random weights); a trained model's config.json fixes them"
            )
        if tokenizer is not None:
            raise UsageError("--tokenizer only applies with --preset; a model has its own tokenizer")
    if pos is not None and pos not in POS_ENCODINGS:
        raise UsageError(f"--pos must be one of {', '.join(POS_ENCODINGS)}, got {pos!r}")
    if kv_heads is not None and kv_heads < 1:
        raise UsageError(f"--kv-heads must be at least 1, got {kv_heads}")


@dataclass(frozen=True)
class Run:
    """What one `gen generate` does, checked: the prompt or message, the cache, the outputs asked for."""

    prompt: str | None
    chat: str | None
    system: str | None
    max_new_tokens: int
    sampling: SamplingConfig
    seed: int
    stops: tuple[str, ...]
    ignore_eot: bool
    num_samples: int
    cache: CacheSpec | None  # None: --no-kv-cache
    prompt_cache: Path | None
    stream: bool
    stats: bool
    json: bool
    profile: bool
    speculate: str | None = None  # ngram[:K] or draft[:K] (infer.speculative)
    draft: str | None = None  # a draft model path or self:MODE

    @property
    def live(self) -> bool:
        """Text goes to stdout as it is generated."""
        return self.stream and not self.json and self.num_samples == 1


def _check_run(run: Run, options: EngineOptions, kv_kinds_given: bool) -> None:
    """Refuse flag combinations that cannot run together, before any weights are read."""
    if run.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {run.max_new_tokens}")
    if run.num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {run.num_samples}")
    if (run.prompt is None) == (run.chat is None):
        raise UsageError("give either PROMPT (text to continue) or --chat MESSAGE (a message to reply to)")
    if run.system is not None and run.chat is None:
        raise UsageError("--system goes with --chat")
    window = run.cache.window if run.cache is not None else None
    if kv_kinds_given and run.cache is None:
        raise UsageError("--kv-dtype sets how the KV cache stores K and V; drop --no-kv-cache or --kv-dtype")
    if window is not None and options.compile:
        raise UsageError("--compile runs the linear cache only; drop --compile or --window")
    if not -(2**63) <= run.seed < 2**64:  # what torch.Generator.manual_seed accepts
        raise UsageError(f"--seed must fit in 64 bits (-2**63 to 2**64 - 1), got {run.seed}")
    if run.prompt_cache is not None:
        _check_prompt_cache(run.prompt_cache, run.cache is None or run.num_samples > 1, window is not None)
    if options.compile and run.cache is None:
        raise UsageError("--compile speeds up the cached decode step; drop --no-kv-cache or --compile")
    if run.speculate is not None or run.draft is not None:
        _check_speculation(run, options)
    if run.profile and (options.compile or run.cache is None or run.max_new_tokens < 2):
        raise UsageError("--profile times the cached decode step op by op: needs the KV cache, no --compile, "
                         "--max-new-tokens ≥ 2")  # fmt: skip


def _check_speculation(run: Run, options: EngineOptions) -> None:  # before any weights are read
    from gen_cli.infer.proposers import parse_speculate

    parse_speculate(run.speculate or "draft")
    taken = [flag for flag, on in (("--no-kv-cache", run.cache is None), ("--window", run.cache and run.cache.window),
             ("--num-samples", run.num_samples > 1), ("--prompt-cache", run.prompt_cache), ("--profile", run.profile),
             ("--compile", options.compile)) if on]  # fmt: skip
    if taken:  # a --window ring overwrites the slots a rollback would need
        raise UsageError(f"--speculate verifies guesses in one linear KV cache and rolls rejected ones back: it does "
                         f"not go with {', '.join(taken)} (yet); drop one")  # fmt: skip


def _check_prompt_cache(path: Path, not_one_cached_sample: bool, windowed: bool) -> None:
    """A prompt-cache file goes with one cached sample on a linear cache, and must be writable before any work."""
    from gen_cli.commands.common import check_writable_output

    if not_one_cached_sample:
        raise UsageError("--prompt-cache goes with the KV cache and one sample: drop --no-kv-cache / --num-samples")
    if windowed:
        raise UsageError("--prompt-cache saves a linear cache; a --window ring holds no whole prefix: drop one")
    try:
        check_writable_output(path, force=True)
    except GenError as e:
        raise UsageError(f"--prompt-cache {e}") from None


def _cache_spec(kv_cache: bool, kinds: tuple[str | None, str | None] | None, window: int | None,
                sinks: int) -> CacheSpec | None:  # fmt: skip
    """The KV cache the flags describe (None: --no-kv-cache)."""
    from gen_cli.cache.spec import CacheSpec

    if window is None and sinks:
        raise UsageError("--sinks goes with --window N")
    if window is not None and not kv_cache:
        raise UsageError("--window is a kind of KV cache; drop --no-kv-cache or --window")
    if not kv_cache:
        return None
    return CacheSpec(*(kinds or (None, None)), window, sinks)


def _open(source: Path | PresetShape | None, options: EngineOptions, run: Run) -> tuple[Engine, PromptReuse | None]:
    """The model laid out for decoding, and the prompt-cache file's use keyed by the weights as stored."""
    from gen_cli.infer.engine import open_model

    if source is None and not default_model_dir().is_dir():
        raise UsageError(
            f"no default model at {default_model_dir()}; pass --model DIR, train one with `gen train`, "
            "or try random weights with --preset tiny --tokenizer PATH"
        )
    reuse: list[PromptReuse] = []

    def fingerprint(loaded: Any) -> None:  # before decode-time rewriting of the modules changes the weights' names
        from gen_cli.infer.prompt_reuse import PromptReuse

        reuse.append(PromptReuse(run.prompt_cache, loaded.model, loaded.tokenizer, options.quantize, run.cache))

    engine = open_model(source, options, fingerprint if run.prompt_cache is not None else None)
    for note in engine.notes:
        err.print(f"[yellow]{escape(note)}[/]" if engine.random_weights else escape(note))
    return engine, reuse[0] if reuse else None


def _longest_token(tok: Any) -> int:
    """Bytes the longest token stands for (byte-level pieces are one character per byte), at least 4."""
    return max(4, *(len(piece.encode("utf-8")) for piece in tok.get_vocab()))


def _encode(text: TextConventions, context_length: int, run: Run) -> tuple[list[int], bool]:
    """The prompt's ids (the model's BOS rules) or the chat message rendered by the model's template, and
    whether an empty prompt starts from the BOS alone."""
    # Read only what the context could hold: a 50 MB prompt on stdin is refused, not tokenized whole.
    limit = context_length * _longest_token(text.tokenizer)
    if run.chat is None:
        prompt = read_text_arg(run.prompt, limit)
        return text.encode(prompt), not prompt
    message = read_text_arg(run.chat, limit)
    if not message:
        raise UsageError("the --chat message is empty; give the message to reply to")
    return text.chat_ids(message, run.system, context_length), False


class _Texts:
    """Each sample's text as its ids come (one TextStream a sample, the prompt's last id as context: a
    SentencePiece decoder would strip the reply's first space); a live run's first sample goes to stdout."""

    def __init__(self, tokenizer: Any, run: Run, stop_ids: tuple[int, ...], ids: list[int]) -> None:
        from gen_cli.text.stream import TextStream

        self.live = run.live
        self.rows = [TextStream(tokenizer, run.stops, stop_ids=stop_ids, context=tuple(ids[-1:]))
                     for _ in range(run.num_samples)]  # fmt: skip

    def push(self, tokens: list[int]) -> bool:
        """One new id per sample; True once every sample is done (a stop id or string)."""
        for row, t in zip(self.rows, tokens, strict=True):
            row.push(t)
        if self.live and (new := self.rows[0].take()):
            sys.stdout.write(new)
            sys.stdout.flush()
        return all(r.done for r in self.rows)

    def finish(self) -> list[str]:
        """Each sample's text, the live one's last piece written."""
        if self.live:
            sys.stdout.write(self.rows[0].take(final=True) + "\n")
            sys.stdout.flush()
        return [r.text for r in self.rows]


@dataclass
class Outcome:
    """A finished generation: whether Ctrl-C cut it short, each sample's text, the figures --stats and --json show."""

    interrupted: bool
    texts: list[str]
    stats: dict[str, Any]
    profile: StepProfile | None


def _generate(engine: Engine, run: Run, ids: list[int], reuse: PromptReuse | None, spec: Speculation | None) -> Outcome:
    """Generate (streaming the text when live), save the prompt cache, then profile a second run if asked."""
    import torch

    from gen_cli.model.info import weight_summary

    held = len(ids) + run.max_new_tokens
    engine.check_memory(held if run.cache is None else run.cache.slots(held), run.num_samples)  # before the streams
    stop_ids = () if run.ignore_eot else engine.stop_ids
    texts = _Texts(engine.tokenizer, run, stop_ids, ids)

    def on_token(token: torch.Tensor) -> bool:
        return texts.push(token.tolist())

    compile_s = None
    if engine.options.compile:
        with err.status("compiling (torch.compile)", spinner="dots") if progress_enabled() else nullcontext():
            compile_s = engine.warm_up(ids, run.max_new_tokens, run.sampling, run.num_samples)
    restore = reuse.prepare(engine.model, ids) if reuse is not None else None  # reads and checks the file first
    result = engine.generate(ids, run.max_new_tokens, run.sampling, run.cache, run.seed, stop_ids, run.num_samples,
                             on_token, restore, spec)  # fmt: skip
    if reuse is not None:
        reuse.save_if_new(result)
    stats = result.stats.to_dict() | {"load_s": engine.load_s, "load_peak_memory_bytes": engine.load_peak_bytes}
    stats |= {"compile_s": compile_s} if engine.options.compile else {}
    stats |= {"prompt_cache": reuse.summary()} if reuse is not None else {}
    stats |= {"weights": weight_summary(engine.model), "activations": engine.activations}
    profile = None
    if run.profile:  # a second run, timed class by class (hooks slow the PyTorch path: not the run above)
        from gen_cli.lab.profile import profile_decode

        prompt = torch.tensor([ids], dtype=torch.long, device=engine.device)  # (1, T)
        generator = torch.Generator(device=engine.device).manual_seed(run.seed)
        profile = profile_decode(engine.model, prompt, run.max_new_tokens, run.sampling, generator)
        stats["profile"] = profile.to_dict()
    return Outcome(result.interrupted, texts.finish(), stats, profile)


def generate_command(
    prompt: str = typer.Argument(
        None, help="Text to continue, or '-' to read it from stdin (or give --chat instead).", show_default=False
    ),
    model_dir: Model = None,
    preset: Preset = None,
    tokenizer: Tokenizer = None,
    attention: Attention = None,
    kv_heads: KvHeads = None,
    pos: Pos = None,
    rope_scaling: RopeScaling = None,
    quantize: str = typer.Option(
        "none",
        "--quantize",
        metavar="KIND",
        help="none; int8 (weight-only, a scale per output channel); q8_0, q4_0 or q4_k (GGML's block formats, "
        "as a GGUF stores them). A quantized GGUF's blocks are kept as they are.",
        rich_help_panel=MODEL,
    ),
    chat: str = typer.Option(
        None,
        "--chat",
        metavar="TEXT",
        help="A user message (or '-' for stdin): the model's chat template wraps it and the model replies.",
        show_default=False,
        rich_help_panel=INPUT,
    ),
    max_new_tokens: MaxNewTokens = 200,
    temperature: Temperature = 0.8,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = 0,
    stop: Stop = None,
    system: System = None,
    ignore_eot: bool = typer.Option(
        False,
        "--ignore-eot",
        help=f"Go on past {EOT} (an imported model: past its end-of-turn ids).",
        rich_help_panel=SAMPLING,
    ),
    num_samples: int = typer.Option(
        1,
        "--num-samples",
        metavar="N",
        help="Continuations of the prompt, one shared prefill.",
        rich_help_panel=SAMPLING,
    ),
    kv_cache: KvCache = True,
    kv_dtype: KvDtype = None,
    kv_dtype_k: KvDtypeK = None,
    kv_dtype_v: KvDtypeV = None,
    window: Window = None,
    sinks: Sinks = 0,
    prompt_cache: Path = typer.Option(
        None,
        "--prompt-cache",
        metavar="PATH",
        help="Save the prompt's KV cache there; a later run whose prompt starts with the saved tokens (same "
        "model, tokenizer and KV kinds) loads them and prefills only the rest. A prompt that differs rewrites it.",
        show_default=False,
        rich_help_panel=CACHE,
    ),
    stream: bool = typer.Option(
        True, "--stream/--no-stream", help="Print text as it is generated.", rich_help_panel=OUTPUT
    ),
    show_stats: Stats = False,
    as_json: Json = False,
    device_name: Device = "auto",
    dtype_opt: Dtype = None,
    threads: Threads = None,
    native: Native = True,
    compile_: Compile = False,
    profile: Profile = False,
    attn_impl: AttnImpl = "fused",
    act: Act = None,
    speculate: Speculate = None,
    draft: Draft = None,
) -> None:
    """Continue PROMPT with a trained model (--model; the shipped one by default) or random weights of a
    preset shape (--preset, which alone takes --tokenizer, --attention, --kv-heads and --pos), or reply
    to --chat MESSAGE (with --system) through the model's own chat template (instruct models).

    Prints only the continuation. The seed defaults to 0, so a run is reproducible; random preset
    weights always come from seed 0, so --seed changes only the sampling. An empty PROMPT is refused
    unless the model has a BOS token to start from. Without --dtype a model computes as stored (gen's
    in float32), --quantize q8_0/q4_0/q4_k in float32 and int8 in bfloat16 without the native step.
    """
    from gen_cli.infer.options import EngineOptions, SamplingConfig
    from gen_cli.infer.options import Preset as PresetShape

    _check_model_flags(model_dir, preset, tokenizer, attention, kv_heads, pos, rope_scaling)
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty)
    kv_kinds = kv_kinds_of(kv_dtype, kv_dtype_k, kv_dtype_v)
    run = Run(prompt, chat, system, max_new_tokens, sampling, seed, tuple(s for s in (stop or []) if s), ignore_eot,
              num_samples, _cache_spec(kv_cache, kv_kinds, window, sinks), prompt_cache, stream, show_stats, as_json,
              profile, speculate, draft)  # fmt: skip
    options = EngineOptions(device_name, dtype_opt, threads, quantize, native, compile_, rope_scaling, attn_impl, act)
    _check_run(run, options, kv_kinds is not None)
    source = PresetShape(preset, tokenizer, attention, kv_heads, pos) if preset is not None else model_dir
    refused = ""
    if isinstance(source, Path) and source.suffix.lower() == ".gguf":
        from gen_cli.infer.torch_free import applies, open_file

        plain = run.num_samples == 1 and not (run.prompt_cache or run.profile or run.speculate or run.draft)
        if applies(source, options, run.cache, plain):
            opened = open_file(source, options.threads, options.act)
            if not isinstance(opened, str):
                _render(opened.source, "", run, *_generate_torch_free(opened, run))
                return
            refused = f"torch-free path not taken: {opened}"
    engine, reuse = _open(source, options, run)
    from gen_cli.infer.proposers import speculation_for

    speculation = speculation_for(engine, source, run.speculate, run.draft)  # None without --speculate / --draft
    ids, from_bos = _encode(engine.text, engine.model.config.context_length, run)
    outcome = _generate(engine, run, ids, reuse, speculation)
    note = engine.decode_note()
    _render(engine.source, f"native step unavailable: {note}" if note else refused, run, outcome, reuse, from_bos)


def _generate_torch_free(engine: FileEngine, run: Run) -> tuple[Outcome, None, bool]:
    """Generation without torch (streaming the text when live): the outcome `_render` shows."""
    ids, from_bos = _encode(engine.text, engine.model.config.context_length, run)
    stop_ids = () if run.ignore_eot else engine.text.stop_ids
    texts = _Texts(engine.text.tokenizer, run, stop_ids, ids)
    result = engine.generate(ids, run.max_new_tokens, run.sampling, run.seed, stop_ids, lambda t: texts.push([t]))
    stats = result.stats.to_dict() | {"load_s": engine.load_s, "load_peak_memory_bytes": engine.load_peak_bytes}
    stats |= {"activations": engine.act}
    return Outcome(result.interrupted, texts.finish(), stats, None), None, from_bos


def _render(source: str, path_note: str, run: Run, out: Outcome, reuse: PromptReuse | None, from_bos: bool) -> None:
    """The text (already streamed when live) or one JSON object on stdout; notes, stats and profile on stderr.
    `path_note`: why the decode path is not the fastest one (shown with --stats)."""
    if run.json:
        data: dict[str, Any] = {"text": out.texts[0]}
        if run.num_samples > 1:
            data["texts"] = out.texts
        data |= {"stats": out.stats, "model": source, "interrupted": out.interrupted}
        print_json(data)
    elif not run.live:
        for i, t in enumerate(out.texts):
            if run.num_samples > 1:
                sys.stdout.flush()
                err.print(f"── sample {i + 1} of {run.num_samples} ──")
            sys.stdout.write(t + "\n")
            sys.stdout.flush()
    if reuse is not None:
        err.print(escape(reuse_note(reuse.summary())))
    if run.stats:
        print_stats(out.stats, source, f" ({escape(path_note)})" if path_note else "", from_bos)
    if out.profile is not None and not run.json:
        from gen_cli.commands.bench_view import print_profile

        print_profile("decode step", out.profile, err)
    if out.interrupted:
        err.print("interrupted")
        raise typer.Exit(130)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
