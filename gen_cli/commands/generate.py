"""`gen generate`: continue a prompt (or reply to a chat message), optionally streaming and measuring."""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from gen_cli.commands.common import err, print_json, progress_enabled, read_text_arg
from gen_cli.commands.options import (
    Device,
    MinP,
    RepetitionPenalty,
    Temperature,
    Threads,
    TopK,
    TopP,
    kv_kinds_of,
)
from gen_cli.errors import GenError, UsageError
from gen_cli.model.config import POS_ENCODINGS, ROPE_SCALING_SPECS, parse_rope_scaling
from gen_cli.resources import default_model_dir
from gen_cli.text.stream import TextStream
from gen_cli.text.tokenizer import EOT, encode, special_id


def _check_options(
    model_dir: Path | None,
    preset: str | None,
    tokenizer: Path | None,
    attention: str | None,
    kv_heads: int | None,
    pos: str | None,
    max_new_tokens: int,
    num_samples: int,
    rope_scaling: str | None = None,
) -> None:
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
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {num_samples}")


def _longest_token(tok: Any) -> int:
    """Bytes the longest token stands for (byte-level pieces are one character per byte), at least 4."""
    return max(4, *(len(piece.encode("utf-8")) for piece in tok.get_vocab()))


def _native_note(model: Any, native: bool, compiled: bool) -> str:
    """Why the PyTorch path decodes although the native step was not turned off, for --stats."""
    from gen_cli.native.decoder import unavailable_reason

    if not native or compiled or model.native_decoder is not None:
        return ""
    reason = unavailable_reason(model)
    return f" (native step unavailable: {escape(reason)})" if reason else ""


def _reuse_note(pc: dict[str, Any]) -> str:
    """What the prompt cache did, in one line for stderr."""
    if pc["action"] == "created":
        return f"prompt cache: saved {pc['file_tokens']} prompt tokens to {pc['file']}"
    reused = f"reused {pc['reused_tokens']} of {pc['prompt_tokens']} prompt tokens from {pc['file']}"
    if pc["action"] == "reused":
        return f"prompt cache: {reused}"
    return f"prompt cache: {reused}; its prompt differs from this one, so it was rewritten with this prompt"


def _print_stats(stats: dict[str, Any], source: str, path_note: str = "") -> None:
    def rate(v: float | None) -> str:
        return "n/a" if v is None else f"{v:,.1f} tok/s"

    ms = "n/a" if stats["ms_per_token"] is None else f"{stats['ms_per_token']:.2f} ms"
    match = "agree" if stats["kv_cache_bytes"] == stats["kv_cache_bytes_analytic"] else "DIFFER"
    lines = [
        f"model            {escape(source)}",
        f"load             {stats['load_s']:.2f} s, peak memory {stats['load_peak_memory_bytes']:,} B",
        f"prompt tokens    {stats['prompt_tokens']}   new tokens {stats['new_tokens']}   batch {stats['batch']}",
        f"time to first    {stats['ttft_s'] * 1000:.1f} ms   (prefill {rate(stats['prefill_tokens_per_s'])})",
        f"decode           {rate(stats['decode_tokens_per_s'])}   {ms} per step",
        f"KV cache         {stats['kv_cache_bytes_analytic']:,} B analytic, {stats['kv_cache_bytes']:,} B actual"
        + (f" ({match})" if stats["kv_cache_bytes"] else " (cache off)"),
        f"peak memory      {stats['peak_memory_bytes']:,} B ({stats['memory_method']})",
        f"device           {stats['device']}   dtype {stats['dtype']}   threads {stats['threads']}   "
        f"decode path {stats['decode_path']}{path_note}",
        f"KV kinds         K {stats['kv_dtype_k'] or '-'}   V {stats['kv_dtype_v'] or '-'}"
        + (f"   window {stats['kv_window']} + {stats['kv_sinks']} sinks" if stats.get("kv_window") else "")
        + (f"   (PyTorch decodes: {escape(stats['decode_path_reason'])})" if stats.get("decode_path_reason") else ""),
    ]
    if load := stats.get("machine_load"):
        from gen_cli.runtime import MachineLoad

        busy = MachineLoad(load["cores"], load["others_cores"], load["load_avg_1m"])
        lines.append(f"machine          {busy.describe()}; one run, no spread (gen bench decode repeats)")
    if pc := stats.get("prompt_cache"):
        lines.append(
            f"prompt cache     {pc['reused_tokens']} of {pc['prompt_tokens']} prompt tokens reused, "
            f"{pc['prompt_tokens'] - pc['reused_tokens']} prefilled (file read in {pc['read_s'] * 1000:.1f} ms, "
            "not in the time to first token)"
        )
    if stats.get("compile_s") is not None:
        lines.append(f"compile          {stats['compile_s']:.1f} s before generating (torch.compile; not in the rates)")
    if weights := stats.get("weights"):
        total = sum(e["bytes"] for e in weights.values())
        parts = [f"{cls} {'+'.join(e['types'])} {e['bytes']:,} B" for cls, e in weights.items()]
        lines.append(f"weights          {total:,} B in memory: " + "; ".join(parts))
    err.print("\n".join(lines))


def generate_command(
    prompt: str = typer.Argument(
        None, help="Text to continue, or '-' to read it from stdin (or give --chat instead).", show_default=False
    ),
    model_dir: Path = typer.Option(
        None,
        "--model",
        help="A gen model directory, a Hugging Face folder (config.json, *.safetensors, tokenizer.json) or a .gguf "
        "file (default: the shipped model).",
        show_default=False,
    ),
    preset: str = typer.Option(
        None, "--preset", help="Random weights of a preset shape (tiny, small, base).", show_default=False
    ),
    tokenizer: Path = typer.Option(
        None,
        "--tokenizer",
        help="tokenizer.json for --preset (default: the default model's, or .gen/tokenizer.json).",
        show_default=False,
    ),
    attention: str = typer.Option(None, "--attention", help="With --preset: mha, gqa or mqa.", show_default=False),
    kv_heads: int = typer.Option(None, "--kv-heads", help="With --preset: number of KV heads.", show_default=False),
    pos: str = typer.Option(
        None, "--pos", help="With --preset: rope, sinusoidal, learned or alibi.", show_default=False
    ),
    rope_scaling: str = typer.Option(
        None,
        "--rope-scaling",
        help=f"Run a RoPE model with this scaling instead of its own ({ROPE_SCALING_SPECS}); the context grows "
        "to factor × the trained one.",
        show_default=False,
    ),
    kv_cache: bool = typer.Option(True, "--kv-cache/--no-kv-cache", help="Reuse keys/values (off = recompute)."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", help="Tokens to generate at most."),
    temperature: Temperature = 0.8,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: int = typer.Option(0, "--seed", help="Sampling seed: same seed, same output."),
    stop: list[str] = typer.Option(
        None, "--stop", help="Stop when the text contains this (repeatable).", show_default=False
    ),
    chat: str = typer.Option(
        None,
        "--chat",
        help="A user message (or '-' for stdin): the model's chat template wraps it and the model replies.",
        show_default=False,
    ),
    system: str = typer.Option(None, "--system", help="With --chat: a system message.", show_default=False),
    ignore_eot: bool = typer.Option(
        False, "--ignore-eot", help=f"Go on past {EOT} (an imported model: past its end-of-turn ids)."
    ),
    num_samples: int = typer.Option(1, "--num-samples", help="Continuations of the prompt, one shared prefill."),
    device_name: Device = "auto",
    dtype_opt: str = typer.Option(
        None,
        "--dtype",
        help="float32, bfloat16 or float16 (default float32, an imported model's stored dtype; float32 for "
        "--quantize q8_0/q4_0/q4_k; bfloat16 for --quantize int8 without the native step).",
        show_default=False,
    ),
    kv_dtype: str = typer.Option(
        None,
        "--kv-dtype",
        help="KV cache kind for K and V: fp32, bf16, fp16, int8, int4 (default: --dtype).",
        show_default=False,
    ),
    kv_dtype_k: str = typer.Option(None, "--kv-dtype-k", help="KV cache kind for K only.", show_default=False),
    kv_dtype_v: str = typer.Option(None, "--kv-dtype-v", help="KV cache kind for V only.", show_default=False),
    window: int = typer.Option(
        None,
        "--window",
        help="Keep only the last N positions in the KV cache (a ring), plus --sinks: memory stays flat and a RoPE "
        "or ALiBi model generates past its context (positions within the cache, as StreamingLLM).",
        show_default=False,
    ),
    sinks: int = typer.Option(0, "--sinks", help="With --window: the first S tokens, kept in the cache forever."),
    quantize: str = typer.Option(
        "none",
        "--quantize",
        help="none; int8 (weight-only, one scale per output channel); q8_0, q4_0 or q4_k (GGML's block formats, "
        "as a GGUF file stores them: a scale per 32 weights; q4_k 256-weight super-blocks). Matrices already "
        "block-quantized (a quantized GGUF) are kept as they are.",
    ),
    compile_: bool = typer.Option(
        False, "--compile", help="torch.compile the model (slow start: tens of seconds; see gen bench decode)."
    ),
    native: bool = typer.Option(
        True,
        "--native/--no-native",
        help="Run CPU decode steps (fp32, bf16 or int8 weights, batch ≤ 16) in gen's C kernel, compiled for this "
        "machine on first use; without a C compiler, or with --no-native, PyTorch runs them.",
    ),
    threads: Threads = None,
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print text as it is generated."),
    show_stats: bool = typer.Option(False, "--stats", help="Timing, KV-cache and memory figures on stderr."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout: text and stats."),
    prompt_cache: Path = typer.Option(
        None,
        "--prompt-cache",
        help="Save the prompt's KV cache to FILE; a later run whose prompt starts with the saved tokens (same "
        "model, tokenizer and KV kinds) loads them and prefills only the rest. A prompt that differs rewrites it.",
        show_default=False,
    ),
    profile: bool = typer.Option(
        False, "--profile", help="Then where a decode step's time goes, per op class (stderr; in --json's output)."
    ),
) -> None:
    """Continue PROMPT with a trained model (--model) or random weights of a preset shape (--preset), or
    reply to --chat MESSAGE through the model's own chat template (instruct models).

    Prints only the continuation. The seed defaults to 0, so a run is reproducible; random preset
    weights always come from seed 0, so --seed changes only the sampling.
    """
    from gen_cli.formats.loading import load
    from gen_cli.infer.sampling import SamplingConfig

    _check_options(model_dir, preset, tokenizer, attention, kv_heads, pos, max_new_tokens, num_samples, rope_scaling)
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty)
    stops = tuple(s for s in (stop or []) if s)
    if (prompt is None) == (chat is None):
        raise UsageError("give either PROMPT (text to continue) or --chat MESSAGE (a message to reply to)")
    if system is not None and chat is None:
        raise UsageError("--system goes with --chat")
    kv_kinds = kv_kinds_of(kv_dtype, kv_dtype_k, kv_dtype_v)
    if kv_kinds is not None and not kv_cache:
        raise UsageError("--kv-dtype sets how the KV cache stores K and V; drop --no-kv-cache or --kv-dtype")
    if window is None and sinks:
        raise UsageError("--sinks goes with --window N")
    if window is not None and not kv_cache:
        raise UsageError("--window is a kind of KV cache; drop --no-kv-cache or --window")
    if window is not None and compile_:
        raise UsageError("--compile runs the linear cache only; drop --compile or --window")
    from gen_cli.cache.spec import CacheSpec

    spec = CacheSpec(*(kv_kinds or (None, None)), window, sinks)
    if not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed accepts
        raise UsageError(f"--seed must fit in 64 bits (-2**63 to 2**64 - 1), got {seed}")
    if prompt_cache is not None and (not kv_cache or num_samples > 1):
        raise UsageError("--prompt-cache goes with the KV cache and one sample: drop --no-kv-cache / --num-samples")
    if prompt_cache is not None and window is not None:
        raise UsageError("--prompt-cache saves a linear cache; a --window ring holds no whole prefix: drop one")
    if prompt_cache is not None:  # a file that could not be (re)written is refused before any work
        from gen_cli.commands.common import check_writable_output

        try:
            check_writable_output(prompt_cache, force=True)
        except GenError as e:
            raise UsageError(f"--prompt-cache {e}") from None

    import torch

    from gen_cli.infer.generate import check_memory, run_generation
    from gen_cli.infer.optimize import QUANTIZE_MODES, compile_warm_up, compute_dtype, optimize_for_decode
    from gen_cli.model.info import weight_summary
    from gen_cli.runtime import resolve_device, resolve_dtype, set_threads

    device = resolve_device(device_name)
    if quantize not in QUANTIZE_MODES:
        raise UsageError(f"unknown --quantize {quantize!r}; choose {', '.join(QUANTIZE_MODES)}")
    dtype = compute_dtype(quantize, device, native, resolve_dtype(dtype_opt, device) if dtype_opt else None)
    if compile_ and not kv_cache:
        raise UsageError("--compile speeds up the cached decode step; drop --no-kv-cache or --compile")
    if profile and (compile_ or not kv_cache or max_new_tokens < 2):
        raise UsageError("--profile times the cached decode step op by op: needs the KV cache, no --compile, "
                         "--max-new-tokens ≥ 2")  # fmt: skip
    set_threads(threads)
    if model_dir is None and preset is None and not default_model_dir().is_dir():
        raise UsageError(
            f"no default model at {default_model_dir()}; pass --model DIR, train one with `gen train`, "
            "or try random weights with --preset tiny --tokenizer PATH"
        )
    from gen_cli.runtime import PeakMemory

    load_start = time.perf_counter()
    with PeakMemory(device) as load_mem:  # part of the time to first token a user feels
        loaded = load(model_dir, preset, tokenizer, attention, kv_heads, pos, device, dtype, rope_scaling)
    load_s = time.perf_counter() - load_start
    for note in loaded.notes:
        err.print(f"[yellow]{escape(note)}[/]" if loaded.random_weights else escape(note))
    model, tok, source = loaded.model, loaded.tokenizer, loaded.source
    reuse = None
    if prompt_cache is not None:  # the weights' fingerprint before decode-time rewriting of the modules
        from gen_cli.infer.prompt_reuse import PromptReuse

        reuse = PromptReuse(prompt_cache, model, tok, quantize, spec)
    # Inference-only fast paths (fused MLP, the native C decode step or prepacked weights; int8 and
    # compile when asked): fp32 results equal the plain model's within float rounding.
    model = optimize_for_decode(model, quantize=quantize, compile=compile_, native=native)
    from gen_cli.native.build import take_notes

    for note in take_notes():
        err.print(escape(note))
    if quantize != "none":
        source += f", {quantize} weights"

    # gen's models end a text with <|endoftext|>; an imported model declares its own end-of-turn ids.
    eot = special_id(tok) if not loaded.stop_ids else loaded.stop_ids[0]
    # Read only what the context could hold: a 50 MB prompt on stdin is refused, not tokenized whole.
    text = read_text_arg(prompt if chat is None else chat, model.config.context_length * _longest_token(tok))
    if chat is not None:
        from gen_cli.text.chat import conversation, encode_rendered, render_chat

        if loaded.chat_template is None:
            raise UsageError(f"{source} has no chat template; give the text as PROMPT to continue it instead")
        rendered = render_chat(loaded.chat_template, conversation(text, system), special_tokens=loaded.special_tokens,
                               source=f"{source}: chat template")  # fmt: skip
        ids = encode_rendered(tok, rendered)
    elif loaded.add_special_tokens:
        ids = tok.encode(text, add_special_tokens=True).ids
    else:
        ids = encode(tok, text)
    if not ids:
        if eot is None:
            raise UsageError(f"the prompt is empty and the tokenizer has no {EOT} token to start from")
        ids = [eot]
    check_memory(model, num_samples, len(ids) + max_new_tokens, device, spec)  # before a text stream per sample
    stop_ids = () if ignore_eot else (loaded.stop_ids or ((eot,) if eot is not None else ()))
    # The prompt's last id as context: a SentencePiece decoder would strip the reply's first space.
    rows = [TextStream(tok, stops, stop_ids=stop_ids, context=tuple(ids[-1:])) for _ in range(num_samples)]
    live = stream and not as_json and num_samples == 1

    def on_token(token: torch.Tensor) -> bool:
        for row, t in zip(rows, token.tolist(), strict=True):
            row.push(t)
        if live and (new := rows[0].take()):
            sys.stdout.write(new)
            sys.stdout.flush()
        return all(r.done for r in rows)

    prompt_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    compile_s = None
    if compile_:
        with err.status("compiling (torch.compile)", spinner="dots") if progress_enabled() else nullcontext():
            compile_s = compile_warm_up(model, prompt_ids, max_new_tokens, sampling, num_samples)
    generator = torch.Generator(device=device).manual_seed(seed)
    restore = reuse.prepare(model, ids) if reuse is not None else None  # reads and checks the file first
    result = run_generation(
        model, prompt_ids, max_new_tokens, sampling, kv_cache, generator, stop_ids, num_samples, on_token, spec,
        restore,
    )  # fmt: skip
    if reuse is not None:
        reuse.save_if_new(result)
    texts = [r.text for r in rows]
    stats = result.stats.to_dict() | {"load_s": load_s, "load_peak_memory_bytes": load_mem.bytes}
    stats |= {"compile_s": compile_s} if compile_ else {}
    stats |= {"prompt_cache": reuse.summary()} if reuse is not None else {}
    stats |= {"weights": weight_summary(model)}
    step_profile = None
    if profile:  # a second run, timed class by class (hooks slow the PyTorch path: not the run above)
        from gen_cli.lab.profile import profile_decode

        gen2 = torch.Generator(device=device).manual_seed(seed)
        step_profile = profile_decode(model, prompt_ids, max_new_tokens, sampling, gen2)
        stats["profile"] = step_profile.to_dict()
    if as_json:
        data: dict[str, Any] = {"text": texts[0]}
        if num_samples > 1:
            data["texts"] = texts
        data |= {"stats": stats, "model": source, "interrupted": result.interrupted}
        print_json(data)
    elif live:
        sys.stdout.write(rows[0].take(final=True) + "\n")
        sys.stdout.flush()
    else:
        for i, t in enumerate(texts):
            if num_samples > 1:
                sys.stdout.flush()
                err.print(f"── sample {i + 1} of {num_samples} ──")
            sys.stdout.write(t + "\n")
            sys.stdout.flush()
    if reuse is not None:
        err.print(escape(_reuse_note(reuse.summary())))
    if show_stats:
        _print_stats(stats, source, _native_note(model, native, compile_))
    if step_profile is not None and not as_json:
        from gen_cli.commands.bench_view import print_profile

        print_profile("decode step", step_profile, err)
    if result.interrupted:
        err.print("interrupted")
        raise typer.Exit(130)


# ----------------------------------------------------------------------------------------------
# gen info


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
