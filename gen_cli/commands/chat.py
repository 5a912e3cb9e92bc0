"""`gen chat`: an interactive conversation with an instruct model that reuses its KV cache every turn."""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from gen_cli.commands.common import err, progress_enabled, read_line
from gen_cli.commands.options import (
    CACHE,
    Act,
    Device,
    Dtype,
    Json,
    KvDtype,
    KvDtypeK,
    KvDtypeV,
    MaxNewTokens,
    MinP,
    Model,
    Native,
    RepetitionPenalty,
    Seed,
    Sinks,
    Stats,
    System,
    Temperature,
    Threads,
    TopK,
    TopP,
    Window,
    kv_kinds_of,
)
from gen_cli.errors import UsageError
from gen_cli.resources import default_model_dir

if TYPE_CHECKING:
    from gen_cli.infer.session import ChatSession, Turn

HELP = "commands: /stats (cache reuse, measured), /reset (start over), /exit (or Ctrl-D); Ctrl-C stops a reply"


def _read_line(interactive: bool, max_bytes: int) -> str | None:
    """The next user line, None at end of input (Ctrl-D); a prompt on stderr only for a person. Piped lines
    are read as bytes, at most `max_bytes` of them, and decoded as UTF-8 by gen under every locale."""
    if interactive:
        line = err.input("[bold cyan]you>[/] ")  # EOFError at Ctrl-D: the caller ends the chat
        if len(line.encode("utf-8", "surrogatepass")) > max_bytes:
            raise UsageError(f"that line is over {max_bytes:,} bytes, more than the context could hold")
        return line
    return read_line(max_bytes, "more than the context could hold")


def _turn_data(turn: Turn) -> dict[str, Any]:
    """A turn's figures for --json (the reply's text and ids left out: the caller adds the text)."""
    return {k: v for k, v in asdict(turn).items() if k not in ("text", "token_ids")}


def _print_turn(turn: Turn) -> None:
    if turn.ttft_s is None:
        err.print(f"[dim]{turn.prompt_tokens:,}-token prompt: stopped before the first token[/]", soft_wrap=True)
        return
    rate = f", {(turn.new_tokens - 1) / turn.decode_s:,.1f} tok/s" if turn.new_tokens > 1 and turn.decode_s else ""
    err.print(
        f"[dim]{turn.prompt_tokens:,}-token prompt: {turn.reused_tokens:,} reused, {turn.prefilled_tokens:,} "
        f"prefilled; time to first token {turn.ttft_s * 1000:.1f} ms; {turn.new_tokens} new tokens{rate}[/]",
        soft_wrap=True,
    )


def _stats(session: ChatSession, source: str, before_measuring: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Cache use over the conversation, then the last turn's prefill measured whole and from the cache
    (`before_measuring` shows the counts first: the measurement can take seconds)."""
    import torch

    from gen_cli.runtime import LoadProbe

    turns = session.turns
    data: dict[str, Any] = {
        "model": source, "cached_tokens": session.cache.pos, "context_tokens": session.cache.max_tokens,
        "turns": len(turns), "reused_tokens": sum(t.reused_tokens for t in turns),
        "prefilled_tokens": sum(t.prefilled_tokens for t in turns),
        "rolled_back_tokens": sum(t.rolled_back for t in turns), "generated_tokens": sum(t.new_tokens for t in turns),
        "last_turn": _turn_data(turns[-1]) if turns else None, "prefill_comparison": None,
    }  # fmt: skip
    before_measuring(data)
    if not turns or not turns[-1].reused_tokens:
        return data
    status = err.status("measuring the prefill, whole and from the cache") if progress_enabled() else nullcontext()
    with status, LoadProbe() as probe:
        try:
            cmp = session.compare_prefill(repeats=3)
        except KeyboardInterrupt:
            err.print("measurement stopped")
            return data
    assert cmp is not None
    data["prefill_comparison"] = {
        "prompt_tokens": cmp.prompt_tokens, "reused_tokens": cmp.reused_tokens, "full_s": cmp.full_s,
        "reuse_s": cmp.reuse_s, "full_median_s": cmp.full_median_s, "reuse_median_s": cmp.reuse_median_s,
        "saved_s": cmp.full_median_s - cmp.reuse_median_s, "device": str(session.cache.device),
        "threads": torch.get_num_threads(), "machine_load": probe.load.to_dict(),
    }  # fmt: skip
    data["machine_load_text"] = probe.load.describe()
    return data


def _show_counts(data: dict[str, Any]) -> None:
    lines = [
        f"model          {escape(data['model'])}",
        f"cache          {data['cached_tokens']:,} of {data['context_tokens']:,} tokens hold the conversation "
        f"({data['turns']} turn(s))",
    ]
    last = data["last_turn"]
    if last is None:
        lines.append("no reply yet: the comparison with re-prefilling needs one turn")
    else:
        lines.append(
            f"all turns      {data['reused_tokens']:,} tokens reused from the cache, {data['prefilled_tokens']:,} "
            f"prefilled, {data['rolled_back_tokens']:,} rolled back, {data['generated_tokens']:,} generated"
        )
        ttft = "none (stopped before it)" if last["ttft_s"] is None else f"{last['ttft_s'] * 1000:.1f} ms (live)"
        lines.append(
            f"last turn      {last['prompt_tokens']:,}-token prompt: {last['reused_tokens']:,} reused, "
            f"{last['prefilled_tokens']:,} prefilled; time to first token {ttft}"
        )
        if not last["reused_tokens"]:
            lines.append(
                "re-prefill     the last turn reused nothing from the cache (a first turn): nothing to compare"
            )
    err.print("\n".join(lines), soft_wrap=True)


def _show_comparison(data: dict[str, Any]) -> None:
    cmp = data["prefill_comparison"]
    if cmp is None:
        return

    def ms(values: list[float]) -> str:
        return f"{1000 * statistics.median(values):.1f} ms ({1000 * min(values):.1f}–{1000 * max(values):.1f})"

    full, reuse = cmp["full_median_s"], cmp["reuse_median_s"]
    err.print(
        f"re-prefill     whole prompt ({cmp['prompt_tokens']:,} tokens) {ms(cmp['full_s'])}; after the cached "
        f"{cmp['reused_tokens']:,}, the new {cmp['prompt_tokens'] - cmp['reused_tokens']:,} tokens "
        f"{ms(cmp['reuse_s'])}\n"
        f"saved          {1000 * (full - reuse):.1f} ms on the last turn (whole / from cache {full / reuse:.1f}×); "
        f"median (min–max) of 3 runs each, alternating, measured now\n"
        f"device         {cmp['device']}   threads {cmp['threads']}   {data['machine_load_text']}",
        soft_wrap=True,
    )


def chat_command(
    model_dir: Model = None,
    system: System = None,
    max_new_tokens: MaxNewTokens = 512,
    temperature: Temperature = 0.8,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = 0,
    context_tokens: int = typer.Option(
        None,
        "--context-tokens",
        metavar="N",
        help="Tokens the conversation may hold (the KV cache's size).",
        show_default="the model's context length",
        rich_help_panel=CACHE,
    ),
    kv_dtype: KvDtype = None,
    kv_dtype_k: KvDtypeK = None,
    kv_dtype_v: KvDtypeV = None,
    window: Window = None,
    sinks: Sinks = 0,
    show_stats: Stats = False,
    as_json: Json = False,
    device_name: Device = "auto",
    dtype_opt: Dtype = None,
    threads: Threads = None,
    native: Native = True,
    act: Act = None,
) -> None:
    """Chat with an instruct model: each line you type is a message, the reply streams back.

    The model needs a chat template: a Hugging Face folder or a .gguf file (gen's own models have
    none). The conversation's KV cache is kept between turns, so each turn prefills only its new
    tokens (`/stats` measures what that saves); with --window it goes on past the context, forgetting
    what left the window. Without --dtype the model computes as stored.

    Commands: /stats, /reset, /exit; Ctrl-C stops a reply, Ctrl-D quits. With stdin not a terminal,
    each line is a turn and the replies go to stdout (with --json, one JSON object per reply and per
    /stats). --max-new-tokens counts per reply; --stats shows each reply's token counts and times.
    """
    from gen_cli.cache.spec import CacheSpec
    from gen_cli.infer.engine import open_model
    from gen_cli.infer.options import EngineOptions, SamplingConfig

    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed accepts
        raise UsageError(f"--seed must fit in 64 bits (-2**63 to 2**64 - 1), got {seed}")
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty)
    spec = CacheSpec(*(kv_kinds_of(kv_dtype, kv_dtype_k, kv_dtype_v) or (None, None)), window, sinks)
    if window is None and sinks:
        raise UsageError("--sinks goes with --window N")
    if window is not None and context_tokens is not None:
        raise UsageError("--context-tokens sizes a linear cache; --window sizes the window cache: give one")
    if model_dir is None and not default_model_dir().is_dir():
        raise UsageError("no model to chat with; pass --model with an instruct model (a Hugging Face folder or .gguf)")

    import torch

    from gen_cli.infer.session import ContextFull
    from gen_cli.text.tokenizer import longest_token_bytes

    engine = open_model(model_dir, EngineOptions(device_name, dtype_opt, threads, native=native, act=act))
    if engine.chat_template is None:
        raise UsageError(
            f"{engine.source} has no chat template, so it cannot chat; continue text with `gen generate` instead"
        )
    for note in engine.notes:
        err.print(escape(note))
    session = engine.chat(system, context_tokens, spec)
    generator = torch.Generator(device=engine.device).manual_seed(seed)
    interactive = sys.stdin.isatty()
    # A line longer than the context could hold is refused before it is tokenized.
    max_line = engine.model.config.context_length * longest_token_bytes(engine.tokenizer)
    if interactive:
        # What a person types is UTF-8 under every locale; a bad byte is one line, then type again.
        with contextlib.suppress(AttributeError, ValueError):
            sys.stdin.reconfigure(encoding="utf-8", errors="strict")
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        err.print(f"[dim]chatting with {escape(engine.source)}; {HELP}[/]")

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def emit(data: dict[str, Any]) -> None:  # --json: one object per line, so a script reads turn by turn
        show(json.dumps(data, default=str) + "\n")

    while True:
        try:
            line = _read_line(interactive, max_line)
        except EOFError:
            line = None
        except KeyboardInterrupt:
            err.print("\n[dim](Ctrl-D or /exit quits)[/]")
            continue
        except UnicodeDecodeError:  # a terminal in another encoding: this line is lost, the conversation is not
            err.print("that line is not valid UTF-8; type it again")
            continue
        if line is None or line.strip() in ("/exit", "/quit"):
            if interactive:
                err.print()
            return
        command = line.strip()
        if not command:
            continue
        if command == "/reset":
            session.reset()
            err.print("[dim]conversation cleared; the cache is empty[/]")
            continue
        if command == "/stats":
            data = _stats(session, engine.source, (lambda _: None) if as_json else _show_counts)
            if as_json:
                emit({"stats": {k: v for k, v in data.items() if k != "machine_load_text"}})
            else:
                _show_comparison(data)
            continue
        if command.startswith("/") and not command.startswith("//"):
            err.print(f"unknown command {escape(command)}; {HELP}; // sends a line starting with /", soft_wrap=True)
            continue
        message = line.lstrip()[1:] if command.startswith("//") else line
        try:
            turn = session.say(message, max_new_tokens, sampling, generator, None if as_json else show)
        except ContextFull as e:
            err.print(f"the context is full: {escape(str(e))} (type /reset)", soft_wrap=True)
            if as_json:
                emit({"error": f"the context is full: {e}", "context_full": True})
            continue
        if as_json:
            emit({"reply": turn.text, **_turn_data(turn)})
        else:
            show("\n")
        if turn.interrupted:
            err.print("[dim](reply stopped)[/]")
        if turn.context_full:
            err.print(
                f"the context is full ({session.cache.max_tokens:,} tokens): the reply was cut; type /reset to "
                "start over",
                soft_wrap=True,
            )
        if show_stats:
            _print_turn(turn)


def register(app: typer.Typer) -> None:
    app.command("chat")(chat_command)
